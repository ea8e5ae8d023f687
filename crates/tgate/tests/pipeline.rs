//! Whole pipelines against diffusers (no gate) and the official `tgate` package (gated), for
//! every scheduler, on the tiny fixtures; plus the typed errors of bad input.

mod common;

use std::ops::ControlFlow;

use common::*;
use tgate::loader::{MemorySource, ModelSource, Variant};
use tgate::pipeline::{GenerateParams, Noise, StableDiffusion};
use tgate::schedulers::SchedulerKind;
use tgate::tgate::{GateConfig, Phase};
use tgate::Error;

/// Pipelines accumulate rounding over 8 steps: within 1e-3 of max(1, max |reference|).
const REL: f32 = 1e-3;

fn run_all(name: &str) {
    let device = cpu();
    let model = StableDiffusion::load(&source(name), Variant::Auto, &device).expect("model loads");
    let json = reference_json(name);
    let r = reference(name);
    let base = sd_params(&json, &r);
    for sched in json["schedulers"].as_array().unwrap() {
        let sched = sched.as_str().unwrap();
        let kind: SchedulerKind = sched.parse().unwrap();
        for run in ["full", "tgate", "tgate_sa", "tgate_sp"] {
            let mut p = base.clone();
            p.scheduler = Some(kind);
            p.gate = (run != "full").then(|| gate_of(&json, run));
            let mut phases = Vec::new();
            let out = model
                .generate_latents(&p, &mut |s| {
                    phases.push(s.phase);
                    ControlFlow::Continue(())
                })
                .unwrap_or_else(|e| panic!("{name} {sched} {run}: {e}"));
            assert_close(out.latents, &r, &format!("pipe.{sched}.{run}"), REL);
            if let Some(g) = p.gate {
                let gated = phases
                    .iter()
                    .filter(|&&ph| ph == Phase::FidelityImproving)
                    .count();
                assert_eq!(
                    gated,
                    p.steps - g.gate_step,
                    "{sched} {run}: steps after the gate"
                );
            }
        }
    }
    // The image of the default scheduler's un-gated run.
    let default: SchedulerKind = json["default_scheduler"].as_str().unwrap().parse().unwrap();
    assert_eq!(model.default_scheduler().unwrap(), default);
    let image = model.vae.decode_latents(tensor(
        &r,
        &format!("pipe.{}.full", json["default_scheduler"].as_str().unwrap()),
        &device,
    ));
    assert_close(image, &r, "pipe.default.image", 1e-4);
}

#[test]
fn sd1_pipelines_all_schedulers_gated_and_not() {
    run_all("sd1");
}

#[test]
fn sd2_pipelines_all_schedulers_gated_and_not() {
    run_all("sd2");
}

/// A copy of the sd1 folder in memory, to break on purpose.
fn sd1_files() -> MemorySource {
    let mut files = MemorySource::default();
    let root = fixture_dir("sd1");
    for dir in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let entry = entry.unwrap();
            let rel = format!("{dir}/{}", entry.file_name().to_string_lossy());
            files
                .files
                .insert(rel, std::fs::read(entry.path()).unwrap());
        }
    }
    files
}

fn load_err(files: &MemorySource) -> Error {
    match StableDiffusion::load(files, Variant::Auto, &cpu()) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

/// The pipelines make RGB images: a decoder with another channel count is refused at load
/// (it would otherwise trap the browser module when the image is shaped).
#[test]
fn non_rgb_decoders_are_refused_at_load() {
    let mut files = sd1_files();
    let cfg = String::from_utf8(files.files["vae/config.json"].clone()).unwrap();
    assert!(cfg.contains("\"out_channels\": 3"));
    let cfg = cfg.replace("\"out_channels\": 3", "\"out_channels\": 1");
    files
        .files
        .insert("vae/config.json".into(), cfg.into_bytes());
    let e = load_err(&files);
    assert!(
        matches!(&e, Error::Config { file, message } if file == "vae/config.json" && message.contains("out_channels 1")),
        "{e}"
    );
}

#[test]
fn bad_weights_give_typed_errors() {
    let unet = "unet/diffusion_pytorch_model.safetensors";
    // Missing file.
    let mut files = sd1_files();
    files.files.remove(unet);
    assert!(
        matches!(load_err(&files), Error::MissingFile(m) if m.contains("unet/diffusion_pytorch_model"))
    );
    // Truncated file.
    let mut files = sd1_files();
    let bytes = files.files.get_mut(unet).unwrap();
    bytes.truncate(bytes.len() / 2);
    assert!(
        matches!(load_err(&files), Error::CorruptWeights { file, .. } if file.contains("unet"))
    );
    // Garbage header.
    let mut files = sd1_files();
    files
        .files
        .insert(unet.into(), b"\x10\0\0\0\0\0\0\0not json at all!".to_vec());
    assert!(matches!(load_err(&files), Error::CorruptWeights { .. }));
    // Wrong shape: a config that disagrees with the weights.
    let mut files = sd1_files();
    let cfg = String::from_utf8(files.files["text_encoder/config.json"].clone()).unwrap();
    assert!(cfg.contains("\"intermediate_size\": 64"));
    let cfg = cfg.replace("\"intermediate_size\": 64", "\"intermediate_size\": 48");
    files
        .files
        .insert("text_encoder/config.json".into(), cfg.into_bytes());
    let e = load_err(&files);
    assert!(
        matches!(&e, Error::ShapeMismatch { tensor, expected, .. } if tensor.contains("fc1") && expected[0] == 48),
        "{e}"
    );
    // Components that disagree with each other.
    let mut files = sd1_files();
    let cfg = String::from_utf8(files.files["unet/config.json"].clone()).unwrap();
    let cfg = cfg.replace("\"cross_attention_dim\": 32", "\"cross_attention_dim\": 48");
    files
        .files
        .insert("unet/config.json".into(), cfg.into_bytes());
    assert!(
        matches!(load_err(&files), Error::Config { message, .. } if message.contains("cross_attention_dim 48"))
    );
    // An inpainting-style UNet (9 input channels) is refused at load, not mid-run.
    let mut files = sd1_files();
    let cfg = String::from_utf8(files.files["unet/config.json"].clone()).unwrap();
    let cfg = cfg.replace("\"in_channels\": 4", "\"in_channels\": 9");
    files
        .files
        .insert("unet/config.json".into(), cfg.into_bytes());
    assert!(
        matches!(load_err(&files), Error::Config { message, .. } if message.contains("in_channels 9"))
    );
    // Unsupported config value.
    let mut files = sd1_files();
    let cfg = String::from_utf8(files.files["unet/config.json"].clone()).unwrap();
    let cfg = cfg.replace("\"CrossAttnDownBlock2D\"", "\"SimpleCrossAttnDownBlock2D\"");
    files
        .files
        .insert("unet/config.json".into(), cfg.into_bytes());
    assert!(
        matches!(load_err(&files), Error::Config { message, .. } if message.contains("SimpleCrossAttnDownBlock2D"))
    );
    assert!(files.read("nope").unwrap().is_none());
}

#[test]
fn tensors_over_the_binding_limit_are_refused_before_upload() {
    // The largest tensor of the tiny model is CLIP's token embedding: 1514 × 32 f32 = 193792 bytes.
    let e = match StableDiffusion::load(&Capped(sd1_files(), 193_791), Variant::Auto, &cpu()) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    };
    assert!(
        matches!(&e, Error::TensorTooLarge { file, tensor, bytes: 193_792, limit: 193_791 }
            if file.starts_with("text_encoder/") && tensor.ends_with("token_embedding.weight")),
        "{e}"
    );
    assert!(StableDiffusion::load(&Capped(sd1_files(), 193_792), Variant::Auto, &cpu()).is_ok());
}

#[test]
fn attention_split_to_the_binding_limit_matches_unsplit() {
    let device = cpu();
    let whole = StableDiffusion::load(&sd1_files(), Variant::Auto, &device).unwrap();
    let json = reference_json("sd1");
    let p = GenerateParams {
        width: 256,
        height: 256,
        steps: 3,
        noise: Noise::Seed(5),
        gate: Some(GateConfig::original(2)),
        scheduler: Some(SchedulerKind::Ddim),
        ..sd_params(&json, &reference("sd1"))
    };
    // At 256×256 the largest feature map is the VAE's last (16 channels at full size, 4 MiB);
    // with the limit there, the UNet's first-level self-attention (2 × 4 heads × 1024² f32
    // scores, 32 MiB) is split into blocks of 128 query rows (256 once gated: batch 1).
    let limit = whole.largest_activation(&p).bytes;
    assert_eq!(limit, 16 * 256 * 256 * 4);
    assert_eq!(
        tgate::nn::attention_row_block(8, 1024, 1024, Some(limit)),
        Some(128)
    );
    assert_eq!(
        tgate::nn::attention_row_block(4, 1024, 1024, Some(limit)),
        Some(256)
    );
    let split = StableDiffusion::load(&Capped(sd1_files(), limit), Variant::Auto, &device).unwrap();
    let run = |m: &StableDiffusion| {
        let l = m
            .generate_latents(&p, &mut |_| ControlFlow::Continue(()))
            .unwrap();
        let image = m.decode(l.latents.clone());
        let v = |t: burn::tensor::Tensor<4>| t.into_data().try_to_vec::<f32>().unwrap();
        (v(l.latents), v(image))
    };
    let blocks = tgate::nn::split_attention_blocks;
    let before = blocks();
    let a = run(&whole);
    assert_eq!(blocks(), before, "nothing is split without a limit");
    let b = run(&split);
    // Only the first level's self-attentions split (2 transformers in its down block, 3 in its
    // up block; level 1 has 2 MiB of scores, cross-attention 2.5 MB, the VAE's exactly 4 MiB):
    // 5 × 8 blocks in each of the 2 planning steps, 5 × 4 in the gated step (batch 1); DDIM
    // makes one UNet pass a step.
    assert_eq!(blocks() - before, 2 * 5 * 8 + 5 * 4);
    for (name, x, y) in [("latents", &a.0, &b.0), ("image", &a.1, &b.1)] {
        let (err, scale) = compare(y, x);
        eprintln!("split vs whole {name}: max abs err {err:.3e} (scale {scale:.3})");
        assert!(err <= 1e-5 * scale, "{name}: {err}");
    }
}

#[test]
fn sizes_whose_activations_exceed_the_binding_limit_are_refused_before_any_step() {
    // 193792 bytes (the token embedding) loads the tiny model; its VAE's last feature map at
    // 64×64 is 16 × 64 × 64 f32 = 262144 bytes, and at 56×56 16 × 56 × 56 × 4 = 200704.
    let model =
        StableDiffusion::load(&Capped(sd1_files(), 193_792), Variant::Auto, &cpu()).unwrap();
    let json = reference_json("sd1");
    let base = GenerateParams {
        noise: Noise::Seed(1),
        steps: 2,
        ..sd_params(&json, &reference("sd1"))
    };
    let e = refused_before_any_step(|on_step| model.generate_latents(&base, on_step));
    assert!(
        matches!(&e, Error::ActivationTooLarge { width: 64, height: 64, what, bytes: 262_144, limit: 193_792 }
            if what.contains("VAE decoder feature map (1×16×64×64)")),
        "{e}"
    );
    let small = GenerateParams {
        width: 48,
        height: 48,
        ..base.clone()
    };
    assert!(model
        .validate(&GenerateParams {
            width: 56,
            height: 56,
            ..base
        })
        .is_err());
    assert!(model.validate(&small).is_ok());
    assert!(model
        .generate_latents(&small, &mut |_| ControlFlow::Continue(()))
        .is_ok());
}

#[test]
fn impossible_parameters_are_refused() {
    let model = StableDiffusion::load(&source("sd1"), Variant::Auto, &cpu()).unwrap();
    let json = reference_json("sd1");
    let r = reference("sd1");
    let base = sd_params(&json, &r);
    let go = |p: GenerateParams| {
        model
            .generate_latents(&p, &mut |_| ControlFlow::Continue(()))
            .err()
            .expect("refused")
    };
    assert!(
        matches!(go(GenerateParams { steps: 0, ..base.clone() }), Error::InvalidParameter { name, .. } if name == "steps")
    );
    assert!(
        matches!(go(GenerateParams { width: 60, ..base.clone() }), Error::InvalidParameter { name, .. } if name == "width")
    );
    assert!(matches!(
        go(GenerateParams { gate: Some(GateConfig::original(9)), ..base.clone() }),
        Error::InvalidParameter { name, .. } if name == "gate_step"
    ));
    assert!(matches!(
        go(GenerateParams { noise: Noise::Tensors { noise: vec![0.0; 5], step_noise: None }, ..base.clone() }),
        Error::Input { name, .. } if name == "noise"
    ));
    assert!(matches!(
        go(GenerateParams { scheduler: Some(SchedulerKind::EulerAncestral), noise: Noise::Tensors { noise: host(&r, "pipe.noise").data, step_noise: None }, ..base.clone() }),
        Error::Input { name, .. } if name == "step_noise"
    ));
    assert!("lms".parse::<SchedulerKind>().is_err());
}

#[test]
fn cancel_between_steps_and_seeded_noise_is_deterministic() {
    let model = StableDiffusion::load(&source("sd1"), Variant::Auto, &cpu()).unwrap();
    let json = reference_json("sd1");
    let r = reference("sd1");
    let p = GenerateParams {
        noise: Noise::Seed(7),
        steps: 4,
        gate: Some(GateConfig::original(2)),
        ..sd_params(&json, &r)
    };
    let mut seen = 0;
    let e = model.generate_latents(&p, &mut |_| {
        seen += 1;
        if seen == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    assert!(matches!(e, Err(Error::Cancelled)));
    assert_eq!(seen, 2);
    let a = model
        .generate_latents(&p, &mut |_| ControlFlow::Continue(()))
        .unwrap()
        .latents;
    let b = model
        .generate_latents(&p, &mut |_| ControlFlow::Continue(()))
        .unwrap()
        .latents;
    let (a, b) = (
        a.into_data().try_to_vec::<f32>().unwrap(),
        b.into_data().try_to_vec::<f32>().unwrap(),
    );
    assert_eq!(a, b);
    assert!(a.iter().all(|v| v.is_finite()));
}
