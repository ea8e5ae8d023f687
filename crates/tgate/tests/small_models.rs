//! The small distilled UNets people run on laptops (the BK-SDM family: one layer per block, no
//! mid block, fewer levels), fixture-sized, against diffusers (ungated) and tgate (gated); made
//! by `tests/make_fixtures_small.py`.

mod common;

use std::ops::ControlFlow;

use burn::tensor::DType;
use common::*;
use tgate::loader::Variant;
use tgate::text_to_image::{GateKnobs, NoiseSource, Pipeline, Request};

/// Runs every reference of a small-model fixture through the request API.
fn check(name: &str) {
    let src = small_model(name);
    let model = Pipeline::load(&src, None, None, Variant::Auto, DType::F32, &cpu())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let Pipeline::StableDiffusion(sd) = &model else {
        panic!("{name}: not Stable Diffusion")
    };
    // BK-SDM-Small and -Tiny have no mid block (BK-SDM-Base's shape, one layer per block with
    // the mid block, is the sd2 fixture's).
    assert!(!sd.unet.config().mid_block, "{name}");
    let json = reference_json(name);
    let r = reference(name);
    let (n, s) = (host(&r, "pipe.noise"), host(&r, "pipe.step_noise"));
    let noise = tgate::safetensors::write_f32(&[
        ("noise", &n.shape, &n.data),
        ("step_noise", &s.shape, &s.data),
    ]);
    let g = &json["gate_runs"]["tgate"];
    for sched in json["schedulers"].as_array().unwrap() {
        let sched = sched.as_str().unwrap();
        for run in ["full", "tgate"] {
            let mut req = Request::new(
                json["prompt"].as_str().unwrap(),
                NoiseSource::File {
                    name: "noise".into(),
                    bytes: noise.clone(),
                },
            );
            req.negative_prompt = json["negative_prompt"].as_str().unwrap().into();
            req.steps = json["steps"].as_u64().map(|v| v as usize);
            req.guidance = json["guidance"].as_f64();
            req.scheduler = Some(sched.into());
            req.gate = (run == "tgate").then(|| GateKnobs {
                step: g["gate_step"].as_u64().map(|v| v as usize),
                ..GateKnobs::default()
            });
            let out = model
                .generate(&req, &mut |_| ControlFlow::Continue(()))
                .unwrap_or_else(|e| panic!("{name} {sched} {run}: {e}"));
            assert_close(
                out.latents[0].1.clone(),
                &r,
                &format!("pipe.{sched}.{run}"),
                1e-3,
            );
        }
    }
}

#[test]
fn bk_sdm_small_without_a_mid_block_matches_diffusers_and_tgate() {
    check("bk-sdm-small");
}

#[test]
fn bk_sdm_tiny_with_fewer_levels_matches_diffusers_and_tgate() {
    check("bk-sdm-tiny");
}
