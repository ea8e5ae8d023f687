//! The pipeline on burn-wgpu (Mesa's software Vulkan on CI) against the same references.
#![cfg(feature = "wgpu")]

mod common;

use std::ops::ControlFlow;

use burn::tensor::Device;
use common::*;
use tgate::loader::Variant;
use tgate::pipeline::{GenerateParams, Noise, StableDiffusion};
use tgate::pipeline_wuerstchen::{Wuerstchen, WuerstchenNoise, WuerstchenParams};
use tgate::tgate::GateConfig;

/// The wgpu runtime can be initialised once per process: share one device.
fn gpu() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| {
            Device::wgpu_options()
                .init()
                .expect("a wgpu adapter (install mesa-vulkan-drivers)")
        })
        .clone()
}

fn check(name: &str, sched: &str, run: &str) {
    let device = gpu();
    let model =
        StableDiffusion::load(&source(name), Variant::Auto, &device).expect("loads on wgpu");
    let json = reference_json(name);
    let r = reference(name);
    let gate = (run != "full").then(|| {
        let g = &json["gate_runs"][run];
        let n = |k: &str| g[k].as_u64().unwrap() as usize;
        GateConfig {
            gate_step: n("gate_step"),
            sp_interval: n("sp_interval"),
            fi_interval: n("fi_interval"),
            warm_up: n("warm_up"),
        }
    });
    let p = GenerateParams {
        prompt: json["prompt"].as_str().unwrap().into(),
        negative_prompt: json["negative_prompt"].as_str().unwrap().into(),
        steps: json["steps"].as_u64().unwrap() as usize,
        guidance: json["guidance"].as_f64().unwrap(),
        scheduler: Some(sched.parse().unwrap()),
        width: 64,
        height: 64,
        gate,
        noise: Noise::Tensors {
            noise: host(&r, "pipe.noise").data,
            step_noise: Some(host(&r, "pipe.step_noise").data),
        },
        clip_skip: 0,
    };
    let out = model
        .generate_latents(&p, &mut |_| ControlFlow::Continue(()))
        .expect("generates");
    assert_close(out.latents, &r, &format!("pipe.{sched}.{run}"), 1e-3);
}

/// Würstchen on wgpu: the gated prior, the decoder (grouped and transposed convolutions, pixel
/// (un)shuffle, the resize matmuls) and Stage A.
fn check_wuerstchen() {
    let device = gpu();
    let model = Wuerstchen::load(&source("wuerstchen"), None, Variant::Auto, &device)
        .expect("loads on wgpu");
    let json = reference_json("wuerstchen");
    let r = reference("wuerstchen");
    let noise = WuerstchenNoise::Tensors {
        prior_noise: host(&r, "pipe.prior_noise").data,
        prior_step_noise: host(&r, "pipe.prior_step_noise").data,
        decoder_noise: host(&r, "pipe.decoder_noise").data,
        decoder_step_noise: host(&r, "pipe.decoder_step_noise").data,
    };
    let mut p = WuerstchenParams::new(json["prompt"].as_str().unwrap(), noise);
    p.negative_prompt = json["negative_prompt"].as_str().unwrap().into();
    p.width = 128;
    p.height = 256;
    p.prior_steps = 6;
    p.decoder_steps = 4;
    p.gate_step = Some(2);
    let go = &mut |_: &tgate::pipeline::StepInfo| ControlFlow::Continue(());
    let prior = model.generate_prior(&p, go).expect("prior");
    assert_close(prior.latents.clone(), &r, "gate2.prior_latents", 1e-3);
    let dec = model
        .generate_decoder(prior.latents, &p, go)
        .expect("decoder");
    assert_close(dec.latents.clone(), &r, "gate2.decoder_latents", 1e-3);
    let image = model.decode(tensor(&r, "pipe.decoder_latents", &device));
    assert_close(image, &r, "pipe.image", 1e-3);
}

/// One test, so kernels compiled for the first case serve the others.
#[test]
fn wgpu_pipelines_match_references() {
    check("sd1", "pndm", "full");
    check("sd1", "pndm", "tgate");
    check("sd2", "ddim", "tgate_sp");
    check("sd2", "euler-a", "tgate");
    check_wuerstchen();
}
