//! The request → result API every front end uses ([`tgate::text_to_image`]), against the same
//! diffusers / tgate references as the per-family pipelines: a request with the reference's
//! noise file gives the reference latents, pieces of work come in the documented order, and bad
//! requests are refused by name before any work.

mod common;

use std::ops::ControlFlow;

use burn::tensor::DType;
use common::*;
use tgate::loader::{DirSource, MemorySource, ModelSource, Variant};
use tgate::safetensors::write_f32;
use tgate::text_to_image::{GateKnobs, NoiseSource, Pipeline, Request, Work};
use tgate::Error;

fn load(name: &str, src: &DirSource) -> Pipeline {
    Pipeline::load(src, None, None, Variant::Auto, DType::F32, &cpu())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The SD reference noise as the CLI's `--noise` file.
fn sd_noise_file() -> NoiseSource {
    let r = reference("sd1");
    let (n, s) = (host(&r, "pipe.noise"), host(&r, "pipe.step_noise"));
    NoiseSource::File {
        name: "noise.safetensors".into(),
        bytes: write_f32(&[
            ("noise", &n.shape, &n.data),
            ("step_noise", &s.shape, &s.data),
        ]),
    }
}

fn sd_request() -> Request {
    let json = reference_json("sd1");
    let mut r = Request::new(json["prompt"].as_str().unwrap(), sd_noise_file());
    r.negative_prompt = json["negative_prompt"].as_str().unwrap().into();
    r.steps = Some(json["steps"].as_u64().unwrap() as usize);
    r.guidance = json["guidance"].as_f64();
    r
}

fn go(_: &tgate::stage::StepInfo) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

#[test]
fn sd_requests_match_diffusers_and_tgate() {
    let model = load("sd1", &source("sd1"));
    let json = reference_json("sd1");
    let r = reference("sd1");
    let sched = json["default_scheduler"].as_str().unwrap();
    // Width and height come from the noise file; the scheduler from the folder.
    let mut req = sd_request();
    req.gate = None;
    let out = model.generate(&req, &mut go).unwrap();
    let (name, latents) = &out.latents[0];
    assert_eq!(*name, "latents");
    assert_close(latents.clone(), &r, &format!("pipe.{sched}.full"), 1e-3);
    // Every iteration reported once (PNDM runs one more than `steps`).
    let total = out.steps[0].total;
    assert!(total >= req.steps.unwrap());
    assert!(out
        .steps
        .iter()
        .enumerate()
        .all(|(i, s)| s.stage == "unet" && s.index == i && s.total == total));
    assert_eq!(out.steps.len(), total);
    // The reference image is the VAE's output in [-1, 1]; results are in [0, 1].
    let want = tensor::<4>(&r, "pipe.default.image", &cpu())
        .div_scalar(2.0)
        .add_scalar(0.5)
        .clamp(0.0, 1.0);
    let (err, _) = compare(
        &out.image.into_data().try_to_vec::<f32>().unwrap(),
        &want.into_data().try_to_vec::<f32>().unwrap(),
    );
    assert!(err < 1e-3, "image: {err}");
    // The default gate knobs, with the reference's gate step.
    let g = gate_of(&json, "tgate");
    req.gate = Some(GateKnobs {
        step: Some(g.gate_step),
        ..GateKnobs::default()
    });
    let out = model.generate(&req, &mut go).unwrap();
    assert_close(
        out.latents[0].1.clone(),
        &r,
        &format!("pipe.{sched}.tgate"),
        1e-3,
    );
}

#[test]
fn pieces_of_work_come_in_order() {
    let model = load("sd1", &source("sd1"));
    let mut req = sd_request();
    req.steps = Some(3);
    req.scheduler = Some("ddim".into());
    req.noise = NoiseSource::Seed(1);
    req.width = Some(64);
    req.height = Some(64);
    let plan = model.plan(&req).unwrap();
    let mut g = model.start(plan);
    let mut seen = Vec::new();
    while let Some(a) = g.advance().unwrap() {
        assert_eq!(a.probe.dims(), [1]);
        seen.push(match a.work {
            Work::TextEncoded { stage } => format!("text {stage}"),
            Work::Step(s) => {
                g.record(s, 0.0);
                format!("{} {}", s.stage, s.index)
            }
            Work::Decoded => "decoded".into(),
        });
    }
    assert_eq!(seen, ["text unet", "unet 0", "unet 1", "unet 2", "decoded"]);
    assert!(g.advance().unwrap().is_none(), "stays finished");
    let out = g.finish().unwrap();
    assert_eq!(out.image.dims(), [1, 3, 64, 64]);
    assert_eq!(out.steps.len(), 3);
    // finish() before the end is refused, not a panic.
    let mut g = model.start(model.plan(&req).unwrap());
    g.advance().unwrap();
    assert!(matches!(g.finish(), Err(Error::InvalidParameter { .. })));
}

#[test]
fn wuerstchen_requests_run_both_stages() {
    let model = load("wuerstchen", &source("wuerstchen"));
    let json = reference_json("wuerstchen");
    let r = reference("wuerstchen");
    let (pn, ps, dn, ds) = (
        host(&r, "pipe.prior_noise"),
        host(&r, "pipe.prior_step_noise"),
        host(&r, "pipe.decoder_noise"),
        host(&r, "pipe.decoder_step_noise"),
    );
    let file = write_f32(&[
        ("prior_noise", &pn.shape, &pn.data),
        ("prior_step_noise", &ps.shape, &ps.data),
        ("decoder_noise", &dn.shape, &dn.data),
        ("decoder_step_noise", &ds.shape, &ds.data),
    ]);
    let mut req = Request::new(
        json["prompt"].as_str().unwrap(),
        NoiseSource::File {
            name: "noise.safetensors".into(),
            bytes: file,
        },
    );
    req.negative_prompt = json["negative_prompt"].as_str().unwrap().into();
    req.width = json["width"].as_u64().map(|v| v as usize);
    req.height = json["height"].as_u64().map(|v| v as usize);
    req.steps = json["prior_steps"].as_u64().map(|v| v as usize);
    req.guidance = json["prior_guidance"].as_f64();
    req.decoder_steps = json["decoder_steps"].as_u64().map(|v| v as usize);
    req.decoder_guidance = json["decoder_guidance"].as_f64();
    req.gate = None;
    let mut stages = Vec::new();
    let out = model
        .generate(&req, &mut |s| {
            if stages.last() != Some(&s.stage) {
                stages.push(s.stage);
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(stages, ["prior", "decoder"]);
    let names: Vec<&str> = out.latents.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["prior_latents", "decoder_latents"]);
    assert_close(out.latents[0].1.clone(), &r, "pipe.prior_latents", 1e-5);
    assert_close(out.latents[1].1.clone(), &r, "pipe.decoder_latents", 1e-4);
}

#[test]
fn bad_requests_are_refused_by_name_before_any_work() {
    let sd = load("sd1", &source("sd1"));
    let wu = load("wuerstchen", &source("wuerstchen"));
    let base = || Request::new("x", NoiseSource::Seed(0));
    let name_of = |e: Error| match e {
        Error::InvalidParameter { name, .. } | Error::Input { name, .. } => name,
        other => panic!("unexpected error: {other}"),
    };
    let mut r = base();
    r.decoder_steps = Some(3);
    assert_eq!(name_of(sd.plan(&r).unwrap_err()), "decoder_steps");
    let mut r = base();
    r.scheduler = Some("lms".into());
    assert!(sd.plan(&r).unwrap_err().to_string().contains("lms"));
    let mut r = base();
    r.scheduler = Some("ddim".into());
    assert_eq!(name_of(wu.plan(&r).unwrap_err()), "scheduler");
    let mut r = base();
    r.gate = Some(GateKnobs {
        warm_up: Some(1),
        ..GateKnobs::default()
    });
    assert_eq!(name_of(wu.plan(&r).unwrap_err()), "warm_up");
    // A noise file without the tensor this family needs.
    let mut r = base();
    r.noise = NoiseSource::File {
        name: "n.safetensors".into(),
        bytes: write_f32(&[("other", &[1], &[0.0])]),
    };
    let e = sd.plan(&r).unwrap_err();
    assert!(e.to_string().contains("has no tensor `noise`"), "{e}");
    let e = wu.plan(&r).unwrap_err();
    assert!(e.to_string().contains("prior_noise"), "{e}");
    // A noise file that is not safetensors.
    r.noise = NoiseSource::File {
        name: "n.safetensors".into(),
        bytes: b"not safetensors".to_vec(),
    };
    assert!(matches!(sd.plan(&r), Err(Error::CorruptWeights { .. })));
    // A noise file for another size than the one asked for.
    let mut r = sd_request();
    r.width = Some(128);
    assert_eq!(name_of(sd.plan(&r).unwrap_err()), "noise");
    // An SD folder takes no prior folder.
    let e = Pipeline::load(
        &source("sd1"),
        Some(&source("wuerstchen")),
        None,
        Variant::Auto,
        DType::F32,
        &cpu(),
    )
    .err()
    .expect("refused");
    assert_eq!(name_of(e), "prior");
}

/// The memory budget refuses a size whose largest feature map cannot fit three times, on every
/// family, before any work (the CPU otherwise runs for minutes toward a failed allocation).
#[test]
fn sizes_over_the_memory_budget_are_refused_up_front() {
    for name in ["sd1", "wuerstchen"] {
        let model = load(name, &source(name).with_max_memory_bytes(Some(50_000_000)));
        let mut r = Request::new("x", NoiseSource::Seed(0));
        r.width = Some(4096);
        r.height = Some(4096);
        match model.plan(&r) {
            Err(Error::MemoryTooLarge {
                width,
                bytes,
                limit,
                ..
            }) => {
                assert_eq!((width, limit), (4096, 50_000_000));
                assert!(bytes > limit);
            }
            Err(e) => panic!("{name}: {e}"),
            Ok(_) => panic!("{name}: accepted"),
        }
        // The default size fits the same budget.
        let r = Request::new("x", NoiseSource::Seed(0));
        let mut small = r.clone();
        if name == "wuerstchen" {
            small.width = Some(128);
            small.height = Some(256);
        }
        model.plan(&small).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn cancelling_stops_with_cancelled() {
    let model = load("sd1", &source("sd1"));
    let mut r = Request::new("x", NoiseSource::Seed(0));
    r.steps = Some(4);
    let mut n = 0;
    let e = model
        .generate(&r, &mut |_| {
            n += 1;
            if n == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .err()
        .expect("cancelled");
    assert!(matches!(e, Error::Cancelled));
    assert_eq!(n, 2);
}

/// Every file of a fixture folder except weights (and the references), as a page has them before
/// its weight downloads start.
fn configs_only(name: &str) -> MemorySource {
    fn walk(dir: &std::path::Path, root: &std::path::Path, out: &mut MemorySource) {
        for entry in std::fs::read_dir(dir).expect("fixture folder") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if !path
                .extension()
                .is_some_and(|e| e == "safetensors" || e == "onnx")
            {
                let rel = path.strip_prefix(root).expect("inside").to_string_lossy();
                let bytes = std::fs::read(&path).expect("readable");
                out.files.insert(rel.replace('\\', "/"), bytes);
            }
        }
    }
    let root = fixture_dir(name);
    let mut out = MemorySource::default();
    walk(&root, &root, &mut out);
    assert!(out.files.keys().any(|k| k.ends_with("config.json")));
    out
}

#[test]
fn placeholder_pipelines_read_no_weights_and_run_a_whole_warm_up() {
    for (name, size) in [("sd1", 64), ("wuerstchen", 128)] {
        let src = configs_only(name);
        let model = Pipeline::placeholder(&src, None, None, DType::F32, &cpu())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!model.loaded().is_empty());
        for part in model.loaded() {
            assert!(
                part.files.is_empty() && part.bytes == 0,
                "{name}: {}",
                part.part
            );
            assert_eq!(part.reason, "placeholder parameters");
        }
        let request = model.warm_up_request(Some(size), Some(size));
        // Enqueued all at once, as a warm-up does: the last piece's probe is readable.
        let mut generation = model.start(model.plan(&request).expect("planned"));
        let probe = generation
            .enqueue_all()
            .expect("enqueued")
            .expect("a last piece");
        let value = probe.into_data().try_to_vec::<f32>().unwrap();
        assert!(value.iter().all(|v| v.is_finite()), "{name}: {value:?}");
        let out = generation.finish().expect("finished");
        assert_eq!(out.image.dims(), [1, 3, size, size], "{name}");
        // Piece by piece: every stage's planning steps, its gate step and gated steps.
        let mut generation = model.start(model.plan(&request).expect("planned"));
        let mut phases = Vec::new();
        while let Some(a) = generation.advance().expect("advanced") {
            if let Work::Step(s) = a.work {
                phases.push((s.stage, s.phase.name()));
            }
        }
        let stage = if name == "sd1" { "unet" } else { "prior" };
        for phase in ["semantics-planning", "fidelity-improving"] {
            assert!(phases.contains(&(stage, phase)), "{name}: {phases:?}");
        }
    }
    // (`configs_only` holds no weight file: a placeholder load that read one would fail above.)
    // A missing config is refused by name.
    let mut bare = configs_only("sd1");
    bare.files.remove("unet/config.json");
    let err = Pipeline::placeholder(&bare, None, None, DType::F32, &cpu())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("unet/config.json"), "{err}");
    // The device's buffer limit holds for placeholders too (CLIP's token embedding is the tiny
    // model's largest tensor, 193792 bytes in f32), and they never open a weight file.
    let limited = source("sd1").with_max_tensor_bytes(Some(193_791));
    match Pipeline::placeholder(&limited, None, None, DType::F32, &cpu()) {
        Err(Error::TensorTooLarge { file, tensor, .. }) => {
            assert_eq!(file, "placeholder parameters");
            assert!(tensor.contains("token_embedding"), "{tensor}");
        }
        other => panic!("expected TensorTooLarge, got {:?}", other.err()),
    }
    let weights = "unet/diffusion_pytorch_model.safetensors";
    assert!(tgate::loader::Placeholders(&limited).open(weights).is_err());
}
