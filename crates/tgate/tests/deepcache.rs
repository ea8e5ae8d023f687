//! DeepCache alone (DeepCache 0.1.1's `DeepCacheSDHelper` on diffusers' StableDiffusionPipeline)
//! and with T-GATE (tgate 1.0.0's `TgateSDDeepCacheLoader`), on the sd1 fixture: the references
//! of `tests/make_fixtures_deepcache.py`, through the request API.

mod common;

use std::ops::ControlFlow;

use common::*;
use tgate::deepcache::DeepCacheConfig;
use tgate::text_to_image::{GateKnobs, NoiseSource, Request};

fn sd1_noise() -> Vec<u8> {
    let r = reference("sd1");
    let (n, s) = (host(&r, "pipe.noise"), host(&r, "pipe.step_noise"));
    tgate::safetensors::write_f32(&[
        ("noise", &n.shape, &n.data),
        ("step_noise", &s.shape, &s.data),
    ])
}

#[test]
fn deepcache_alone_and_with_the_gate_match_the_packages() {
    let model = load_pipeline(&source("sd1"), &cpu());
    let json = reference_json("deepcache");
    let r = reference("deepcache");
    let noise = sd1_noise();
    let runs = json["runs"].as_object().unwrap();
    assert_eq!(runs.len(), 6);
    for (name, run) in runs {
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
        req.scheduler = run["scheduler"].as_str().map(Into::into);
        req.gate = run["gate_step"].as_u64().map(|s| GateKnobs {
            step: Some(s as usize),
            ..GateKnobs::default()
        });
        let interval = run["cache_interval"].as_u64().unwrap() as usize;
        req.deep_cache = Some(DeepCacheConfig {
            interval,
            branch: run["cache_branch_id"].as_u64().unwrap() as usize,
        });
        let out = model
            .generate(&req, &mut |_| ControlFlow::Continue(()))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_close(out.latents[0].1.clone(), &r, &format!("pipe.{name}"), 1e-4);
        let shallow: Vec<usize> = out
            .steps
            .iter()
            .filter(|s| s.shallow)
            .map(|s| s.index)
            .collect();
        eprintln!("{name}: shallow steps {shallow:?}");
        if name == "deepcache.ddim.i3b0" {
            assert_eq!(shallow, [1, 2, 4, 5, 7]);
        }
        if name == "tgate_deepcache.ddim.i3b0" {
            // Restarts at steps 2 and 3 (gate_step − 1 and gate_step).
            assert_eq!(shallow, [1, 4, 5, 7]);
        }
    }
}

/// A UNet without a mid block (BK-SDM-Tiny: DeepCache 0.1.1 cannot wrap it): a branch cut inside
/// the UNet changes the result, one below its deepest level skips nothing and equals the plain
/// run.
#[test]
fn deepcache_on_a_unet_without_a_mid_block() {
    let model = load_pipeline(&small_model("bk-sdm-tiny"), &cpu());
    let run = |deep: Option<DeepCacheConfig>| {
        let mut req = Request::new("a fox", NoiseSource::Seed(3));
        req.steps = Some(6);
        req.scheduler = Some("ddim".into());
        req.gate = None;
        req.deep_cache = deep;
        let out = model
            .generate(&req, &mut |_| ControlFlow::Continue(()))
            .unwrap();
        let shallow = out.steps.iter().filter(|s| s.shallow).count();
        let latents = out.latents[0]
            .1
            .clone()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        (latents, shallow)
    };
    let (plain, _) = run(None);
    let (cut, shallow) = run(Some(DeepCacheConfig {
        interval: 2,
        branch: 0,
    }));
    assert_eq!(shallow, 3, "shallow steps");
    let moved = plain
        .iter()
        .zip(&cut)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-3, "branch 0 changed nothing ({moved})");
    // Two levels of one layer each: branch 4 (block 1, layer 1) keeps every down layer.
    let (deep, _) = run(Some(DeepCacheConfig {
        interval: 2,
        branch: 4,
    }));
    assert_eq!(deep, plain);
}

#[test]
fn deepcache_settings_are_checked() {
    let model = load_pipeline(&source("sd1"), &cpu());
    let mut req = Request::new("x", NoiseSource::Seed(1));
    req.deep_cache = Some(DeepCacheConfig {
        interval: 0,
        branch: 0,
    });
    let e = model.plan(&req).unwrap_err();
    assert!(
        matches!(&e, tgate::Error::InvalidParameter { name, .. } if name == "deepcache_interval"),
        "{e}"
    );
    // Interval 1: every step is full, the same as without DeepCache.
    req.steps = Some(3);
    req.deep_cache = Some(DeepCacheConfig {
        interval: 1,
        branch: 0,
    });
    let a = model
        .generate(&req, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert!(a.steps.iter().all(|s| !s.shallow));
    req.deep_cache = None;
    let b = model
        .generate(&req, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    let (x, y) = (
        a.latents[0]
            .1
            .clone()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap(),
        b.latents[0]
            .1
            .clone()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap(),
    );
    assert_eq!(x, y);
}
