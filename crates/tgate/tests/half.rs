//! The half-precision path: f16 parameters and activations (norms, GRN statistics and the
//! attention softmax in f32), run on the CPU backend, which panics on any f16/f32 operand mix, so
//! a missed cast cannot hide. The results follow the same f32 references as the other tests, at
//! a tolerance that f16's 11-bit mantissa allows; they must also differ from the f32 run (proof
//! that f16 was used).

mod common;

use std::ops::ControlFlow;

use burn::tensor::DType;
use common::*;
use tgate::loader::{check_dtype, Variant};
use tgate::pipeline::{StableDiffusion, StepInfo};
use tgate::pipeline_wuerstchen::Wuerstchen;
use tgate::schedulers::SchedulerKind;
use tgate::Error;

fn go(_: &StepInfo) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

fn latents(t: burn::tensor::Tensor<4>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().expect("f32 latents")
}

#[test]
fn sd_in_f16_follows_the_references() {
    let device = cpu();
    let half = StableDiffusion::load_as(&source("sd1"), Variant::Auto, DType::F16, &device)
        .expect("loads in f16");
    let full = StableDiffusion::load(&source("sd1"), Variant::Auto, &device).expect("loads");
    assert_eq!(half.unet.dtype(), DType::F16);
    assert_eq!(full.unet.dtype(), DType::F32);
    let json = reference_json("sd1");
    let r = reference("sd1");
    for run in ["full", "tgate"] {
        let mut p = sd_params(&json, &r);
        p.scheduler = Some(SchedulerKind::Pndm);
        p.gate = (run != "full").then(|| gate_of(&json, run));
        let key = format!("pipe.pndm.{run}");
        let run_on = |m: &StableDiffusion| {
            m.generate_latents(&p, &mut go)
                .unwrap_or_else(|e| panic!("{run}: {e}"))
                .latents
        };
        let (h, f) = (run_on(&half), run_on(&full));
        let (diff, scale) = compare(&latents(h.clone()), &latents(f));
        assert!(diff > 1e-4 * scale, "{run}: f16 equals f32 ({diff})");
        assert_close(h.clone(), &r, &key, HALF);
        // The VAE in f16 too.
        let image = half.vae.decode_latents(h);
        assert_eq!(image.dims()[1], 3);
        assert!(latents(image).iter().all(|v| v.is_finite()));
    }
}

#[test]
fn wuerstchen_in_f16_follows_the_references() {
    let device = cpu();
    let model = Wuerstchen::load_as(
        &source("wuerstchen"),
        None,
        Variant::Auto,
        DType::F16,
        &device,
    )
    .expect("loads in f16");
    assert_eq!(model.prior.dtype(), DType::F16);
    let r = reference("wuerstchen");
    let p = wuerstchen_params();
    for (gate, prefix) in [(None, "pipe"), (Some(2), "gate2")] {
        let mut p = p.clone();
        p.gate_step = gate;
        let prior = model.generate_prior(&p, &mut go).unwrap();
        assert_close(
            prior.latents.clone(),
            &r,
            &format!("{prefix}.prior_latents"),
            HALF,
        );
        // Stage B from the reference prior latents, then Stage A.
        let emb = tensor(&r, &format!("{prefix}.prior_latents"), &device);
        let dec = model.generate_decoder(emb, &p, &mut go).unwrap();
        assert_close(
            dec.latents.clone(),
            &r,
            &format!("{prefix}.decoder_latents"),
            HALF,
        );
        if gate.is_none() {
            let ref_latents = tensor(&r, "pipe.decoder_latents", &device);
            assert_close(model.decode(ref_latents), &r, "pipe.image", HALF_IMAGE);
        }
    }
}

#[test]
fn only_f32_and_supported_f16_are_accepted() {
    let device = cpu();
    assert!(check_dtype(DType::F32, &device).is_ok());
    assert_eq!(
        check_dtype(DType::F16, &device).is_ok(),
        device.supports_dtype(DType::F16)
    );
    let e = StableDiffusion::load_as(&source("sd1"), Variant::Auto, DType::F64, &device)
        .err()
        .expect("f64 is refused");
    assert!(
        matches!(&e, Error::InvalidParameter { name, .. } if name == "dtype"),
        "{e}"
    );
}
