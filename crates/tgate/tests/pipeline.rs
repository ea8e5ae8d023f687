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

/// A folder whose device binds at most `limit` bytes per buffer.
struct Capped(MemorySource, u64);

impl ModelSource for Capped {
    fn read(&self, path: &str) -> tgate::Result<Option<Vec<u8>>> {
        self.0.read(path)
    }
    fn max_tensor_bytes(&self) -> Option<u64> {
        Some(self.1)
    }
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
