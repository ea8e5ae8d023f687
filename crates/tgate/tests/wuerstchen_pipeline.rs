//! The Würstchen pipeline against diffusers 0.42.1 (ungated) and against this project's gated
//! Stage C as defined in tests/make_fixtures_wuerstchen.py (hooks on diffusers' WuerstchenPrior).

mod common;

use std::ops::ControlFlow;

use common::*;
use tgate::loader::{MemorySource, ModelSource, Variant};
use tgate::pipeline::StepInfo;
use tgate::pipeline_wuerstchen::{Wuerstchen, WuerstchenNoise, WuerstchenParams};
use tgate::schedulers::ddpm_wuerstchen::default_stage_c_timesteps;
use tgate::tgate::Phase;
use tgate::Error;

const FIX: &str = "wuerstchen";

fn go(_: &StepInfo) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

fn load(src: &dyn ModelSource, prior: Option<&dyn ModelSource>) -> Wuerstchen {
    Wuerstchen::load(src, prior, Variant::Auto, &cpu()).expect("loads")
}

/// Every file of a fixture folder, under its relative path.
fn memory(name: &str) -> MemorySource {
    memory_of(&fixture_dir(name))
}

/// The two-repository layout (`warp-ai/wuerstchen` + `warp-ai/wuerstchen-prior`) made from the
/// combined fixture: the decoder folder without `prior_*`, and a prior pipeline folder.
fn split_layout() -> (MemorySource, MemorySource) {
    let all = memory(FIX);
    let (mut decoder, mut prior) = (MemorySource::default(), MemorySource::default());
    for (path, bytes) in all.files {
        if let Some(rest) = path.strip_prefix("prior_") {
            let rest = rest
                .strip_prefix("prior/")
                .map(|r| format!("prior/{r}"))
                .unwrap_or(rest.to_string());
            prior.files.insert(rest, bytes);
        } else if !path.starts_with("reference") && path != "model_index.json" {
            decoder.files.insert(path, bytes);
        }
    }
    (decoder, prior)
}

#[test]
fn pipeline_matches_diffusers() {
    let model = load(&source(FIX), None);
    let r = reference(FIX);
    let p = wuerstchen_params();
    let mut seen = Vec::new();
    let prior = model
        .generate_prior(&p, &mut |s| {
            seen.push((s.index, s.total, s.phase));
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(seen.len(), p.prior_steps);
    assert!(seen.iter().all(|s| s.2 == Phase::SemanticsPlanning));
    assert_close(prior.latents.clone(), &r, "pipe.prior_latents", 1e-5);
    // Decoder from the reference prior latents (so each stage is measured on its own) ...
    let emb = tensor(&r, "pipe.prior_latents", &cpu());
    let dec = model.generate_decoder(emb.clone(), &p, &mut go).unwrap();
    assert_eq!(dec.steps.len(), p.decoder_steps);
    assert_close(dec.latents.clone(), &r, "pipe.decoder_latents", 1e-5);
    // Stage A on the reference decoder latents, then on ours (Stage A amplifies: its pre-clamp
    // values reach ~20, so the chained comparison gets the wider tolerance).
    let ref_latents = tensor(&r, "pipe.decoder_latents", &cpu());
    assert_close(model.decode(ref_latents), &r, "pipe.image", 1e-5);
    assert_close(model.decode(dec.latents), &r, "pipe.image", 1e-4);
    // ... and end to end from our own prior output.
    let dec2 = model.generate_decoder(prior.latents, &p, &mut go).unwrap();
    assert_close(dec2.latents, &r, "pipe.decoder_latents", 1e-4);
    assert_eq!(model.output_size(p.width, p.height), (p.width, p.height));

    // Decoder guidance on: [text, negative] batch, zero image embedding for the second half.
    let mut dg = p.clone();
    dg.decoder_guidance = reference_json(FIX)["decoder_guidance_on"].as_f64().unwrap();
    let dec = model.generate_decoder(emb, &dg, &mut go).unwrap();
    assert_close(dec.latents, &r, "pipe_dg.decoder_latents", 1e-5);
}

#[test]
fn prior_default_timesteps() {
    let model = load(&source(FIX), None);
    let r = reference(FIX);
    let mut p = wuerstchen_params();
    p.prior_timesteps = Some(default_stage_c_timesteps());
    if let WuerstchenNoise::Tensors {
        prior_step_noise, ..
    } = &mut p.noise
    {
        *prior_step_noise = host(&r, "prior_default.step_noise").data;
    }
    let prior = model.generate_prior(&p, &mut go).unwrap();
    assert_eq!(prior.steps.len(), 29);
    assert_close(prior.latents, &r, "prior_default.prior_latents", 1e-5);
}

#[test]
fn gated_prior_matches_definition() {
    let model = load(&source(FIX), None);
    let r = reference(FIX);
    for gate_step in [2usize, 4] {
        let mut p = wuerstchen_params();
        p.gate_step = Some(gate_step);
        let prior = model.generate_prior(&p, &mut go).unwrap();
        let phases: Vec<Phase> = prior.steps.iter().map(|s| s.phase).collect();
        assert_eq!(
            phases
                .iter()
                .filter(|&&ph| ph == Phase::SemanticsPlanning)
                .count(),
            gate_step
        );
        assert_close(
            prior.latents.clone(),
            &r,
            &format!("gate{gate_step}.prior_latents"),
            1e-5,
        );
        if gate_step == 2 {
            let dec = model.generate_decoder(prior.latents, &p, &mut go).unwrap();
            assert_close(dec.latents, &r, "gate2.decoder_latents", 1e-4);
        }
    }
}

#[test]
fn two_repository_layout() {
    let (decoder, prior) = split_layout();
    let model = load(&decoder, Some(&prior));
    let r = reference(FIX);
    let out = model.generate_prior(&wuerstchen_params(), &mut go).unwrap();
    assert_close(out.latents, &r, "pipe.prior_latents", 1e-5);

    // The decoder folder alone, or the prior folder as the model, is refused with a hint.
    let err = Wuerstchen::load(&decoder, None, Variant::Auto, &cpu())
        .err()
        .unwrap();
    assert!(matches!(err, Error::InvalidParameter { .. }), "{err}");
    let err = Wuerstchen::load(&prior, None, Variant::Auto, &cpu())
        .err()
        .unwrap();
    assert!(matches!(err, Error::InvalidParameter { .. }), "{err}");
    let err = Wuerstchen::load(&decoder, Some(&decoder), Variant::Auto, &cpu())
        .err()
        .unwrap();
    assert!(matches!(err, Error::MissingFile(_)), "{err}");
}

#[test]
fn bad_folders_give_typed_errors() {
    let device = cpu();
    let load = |m: &MemorySource| Wuerstchen::load(m, None, Variant::Auto, &device).err();

    let mut m = memory(FIX);
    m.files
        .remove("prior_prior/diffusion_pytorch_model.safetensors");
    let err = load(&m).unwrap();
    assert!(
        matches!(err, Error::MissingFile(ref f) if f.contains("prior_prior")),
        "{err}"
    );

    let mut m = memory(FIX);
    let f = m
        .files
        .get_mut("decoder/diffusion_pytorch_model.safetensors")
        .unwrap();
    f.truncate(f.len() / 2);
    let err = load(&m).unwrap();
    assert!(matches!(err, Error::CorruptWeights { .. }), "{err}");

    // A config that disagrees with the weights: a shape mismatch names the tensor.
    let mut m = memory(FIX);
    let cfg = String::from_utf8(m.files["vqgan/config.json"].clone()).unwrap();
    m.files.insert(
        "vqgan/config.json".into(),
        cfg.replace("\"embed_dim\": 16", "\"embed_dim\": 32")
            .into_bytes(),
    );
    let err = load(&m).unwrap();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");

    // Components that cannot work together are refused before any weights are read.
    let mut m = memory(FIX);
    let cfg = String::from_utf8(m.files["decoder/config.json"].clone()).unwrap();
    m.files.insert(
        "decoder/config.json".into(),
        cfg.replace("\"effnet_embd\": 16", "\"effnet_embd\": 8")
            .into_bytes(),
    );
    let err = load(&m).unwrap();
    assert!(matches!(err, Error::Config { .. }), "{err}");

    let mut m = memory(FIX);
    m.files
        .insert("prior_prior/config.json".into(), b"{not json".to_vec());
    assert!(matches!(load(&m).unwrap(), Error::Config { .. }));
}

#[test]
fn impossible_parameters_and_cancel() {
    let model = load(&source(FIX), None);
    let check = |p: WuerstchenParams, name: &str| {
        let err = model.generate_prior(&p, &mut go).err().expect("refused");
        let text = err.to_string();
        assert!(text.contains(name), "{name}: {text}");
    };
    let mut p = wuerstchen_params();
    p.width = 200; // Stage B latent 53 wide: not a multiple of 4
    check(p, "width/height");
    let mut p = wuerstchen_params();
    p.prior_steps = 0;
    check(p, "steps");
    let mut p = wuerstchen_params();
    p.gate_step = Some(7);
    check(p, "gate_step");
    let mut p = wuerstchen_params();
    p.prior_guidance = f64::NAN;
    check(p, "guidance");
    let mut p = wuerstchen_params();
    p.decoder_steps = usize::MAX;
    let err = model.generate_decoder(
        tensor(&reference(FIX), "pipe.prior_latents", &cpu()),
        &p,
        &mut go,
    );
    assert!(err.err().unwrap().to_string().contains("decoder_steps"));
    let mut p = wuerstchen_params();
    p.prior_steps = usize::MAX;
    check(p, "steps");
    let mut p = wuerstchen_params();
    p.prior_timesteps = Some(vec![1.0]);
    check(p, "timesteps");
    let mut p = wuerstchen_params();
    if let WuerstchenNoise::Tensors { decoder_noise, .. } = &mut p.noise {
        decoder_noise.pop();
    }
    check(p, "decoder_noise");

    // Cancel after two steps, then generate again with the same model.
    let p = wuerstchen_params();
    let err = model
        .generate_prior(&p, &mut |s| {
            if s.index == 1 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .err()
        .unwrap();
    assert!(matches!(err, Error::Cancelled));
    let again = model.generate_prior(&p, &mut go).unwrap();
    assert_close(again.latents, &reference(FIX), "pipe.prior_latents", 1e-5);
}

#[test]
fn gate_without_guidance_and_at_the_last_step() {
    let model = load(&source(FIX), None);
    // Guidance off: one batch throughout; the gate still switches the attention to the cache.
    let mut p = wuerstchen_params();
    p.prior_guidance = 1.0;
    p.noise = WuerstchenNoise::Seed(1);
    let plain = model.generate_prior(&p, &mut go).unwrap().latents;
    p.gate_step = Some(2);
    let gated = model.generate_prior(&p, &mut go).unwrap();
    assert_eq!(
        gated
            .steps
            .iter()
            .filter(|s| s.phase == Phase::FidelityImproving)
            .count(),
        4
    );
    let (a, b) = (
        plain.into_data().try_to_vec::<f32>().unwrap(),
        gated.latents.into_data().try_to_vec::<f32>().unwrap(),
    );
    assert!(compare(&b, &a).0 > 1e-3, "the gate changed nothing");
    // A gate at the last step leaves nothing to gate: the ungated result.
    let mut p = wuerstchen_params();
    p.gate_step = Some(p.prior_steps);
    let out = model.generate_prior(&p, &mut go).unwrap();
    assert_close(out.latents, &reference(FIX), "pipe.prior_latents", 1e-5);
}

#[test]
fn seeded_runs_are_deterministic() {
    let model = load(&source(FIX), None);
    let mut p = wuerstchen_params();
    p.noise = WuerstchenNoise::Seed(5);
    p.gate_step = Some(3);
    let a = model.generate_prior(&p, &mut go).unwrap().latents;
    let b = model.generate_prior(&p, &mut go).unwrap().latents;
    let (a, b) = (
        a.into_data().try_to_vec::<f32>().unwrap(),
        b.into_data().try_to_vec::<f32>().unwrap(),
    );
    assert_eq!(a, b);
    p.noise = WuerstchenNoise::Seed(6);
    let c = model.generate_prior(&p, &mut go).unwrap().latents;
    assert_ne!(a, c.into_data().try_to_vec::<f32>().unwrap());
}

/// The step-wise API (what a browser drives with asynchronous waits) gives the same result.
#[test]
fn step_wise_stages_match() {
    let model = load(&source(FIX), None);
    let r = reference(FIX);
    let p = wuerstchen_params();
    let mut d = model.prior_denoiser(&p).unwrap();
    let mut n = 0;
    while let Some(step) = d.step().unwrap() {
        assert_eq!((step.index, step.total), (n, p.prior_steps));
        n += 1;
    }
    assert_eq!(n, d.total());
    let emb = model.finish_prior(d.latents().clone());
    assert_close(emb.clone(), &r, "pipe.prior_latents", 1e-5);
    let mut d = model
        .decoder_denoiser(tensor(&r, "pipe.prior_latents", &cpu()), &p)
        .unwrap();
    while d.step().unwrap().is_some() {}
    assert_close(d.latents().clone(), &r, "pipe.decoder_latents", 1e-5);
}

#[test]
fn sizes_whose_activations_exceed_the_binding_limit_are_refused() {
    // The tiny model's largest activation at 128×256 is Stage A's channel MLP at half the image
    // size: 128 × 64 × 32 f32 = 1 MiB. Under exactly that limit the reference size runs; twice
    // the size is refused before any step, naming the tensor.
    let p = wuerstchen_params();
    let largest = load(&source(FIX), None).largest_activation(&p);
    assert_eq!(largest.bytes, 128 * 64 * 32 * 4, "{largest:?}");
    let device = cpu();
    let model = Wuerstchen::load(
        &Capped(memory(FIX), largest.bytes),
        None,
        Variant::Auto,
        &device,
    )
    .expect("loads under the limit");
    assert!(model.validate(&p).is_ok());
    let big = WuerstchenParams {
        width: 256,
        height: 512,
        noise: WuerstchenNoise::Seed(1),
        ..wuerstchen_params()
    };
    let e = refused_before_any_step(|on_step| model.generate_prior(&big, on_step));
    assert!(
        matches!(&e, Error::ActivationTooLarge { width: 256, height: 512, what, bytes: 4_194_304, limit: 1_048_576 }
            if what.contains("Stage A channel MLP")),
        "{e}"
    );
}
