//! Latent-consistency Stable Diffusion (LCM-distilled SD 1.5: a guidance embedding in the UNet,
//! `LCMScheduler`, no classifier-free guidance) against diffusers' `LatentConsistencyModelPipeline`,
//! and the project's no-guidance gate against its Python reference (both made by
//! `tests/make_fixtures_lcm.py`; the scheduler's trajectory is checked with the others in
//! `schedulers::fixture_tests`).

mod common;

use std::ops::ControlFlow;

use common::*;
use tgate::embeddings::guidance_scale_embedding;
use tgate::loader::{load_weights, read_required, Variant};
use tgate::text_to_image::{GateKnobs, NoiseSource, Request};
use tgate::tgate::{AttentionCache, Phase};
use tgate::unet_2d_condition::{UNet2DConditionModel, UNetConfig};

#[test]
fn the_guidance_embedding_and_the_unet_match_diffusers() {
    let device = cpu();
    let src = small_model("lcm");
    let r = reference("lcm");
    let cfg = UNetConfig::from_json(
        "config.json",
        &read_required(&src, "unet/config.json").unwrap(),
    )
    .unwrap();
    let dim = cfg.time_cond_proj_dim.expect("an LCM UNet");
    let w = load_weights(
        &src,
        "unet",
        "diffusion_pytorch_model",
        Variant::Auto,
        &device,
    )
    .unwrap();
    let model = UNet2DConditionModel::load(&cfg, &w).unwrap();
    assert!(w.unused_keys().is_empty(), "unused: {:?}", w.unused_keys());
    let guidance = host(&r, "unet.guidance").data[0] as f64;
    let emb = guidance_scale_embedding(&[guidance - 1.0], dim, &device);
    assert_close(emb.clone(), &r, "unet.timestep_cond", 1e-6);
    let t = host(&r, "unet.timestep").data[0] as f64;
    let out = model.forward_with_cond(
        tensor(&r, "unet.sample", &device),
        t,
        &tensor(&r, "unet.encoder_hidden_states", &device),
        Some(&emb),
        &mut AttentionCache::new(),
    );
    assert_close(out, &r, "unet.out", 1e-4);

    // A generation's time table with a two-row guidance embedding (one per batch row): each
    // call's rows are that call's own, in the batch's order.
    let two = guidance_scale_embedding(&[guidance - 1.0, 2.0], dim, &device);
    let sample = tensor::<4>(&r, "unet.sample", &device);
    let sample = burn::tensor::Tensor::cat(vec![sample.clone(), sample], 0);
    let context = tensor::<3>(&r, "unet.encoder_hidden_states", &device);
    let context = burn::tensor::Tensor::cat(vec![context.clone(), context], 0);
    let timesteps = [999.0, t, 1.0];
    let table = model.time_table(&timesteps, Some(&two), &device);
    assert!(table.is_precomputed());
    for (i, &ti) in timesteps.iter().enumerate() {
        let time = model.time_at(&table, i).unwrap();
        let from_table = model.forward_time(
            sample.clone(),
            &time,
            &context,
            &mut AttentionCache::new(),
            None,
        );
        let own = model.forward_with_cond(
            sample.clone(),
            ti,
            &context,
            Some(&two),
            &mut AttentionCache::new(),
        );
        assert_agree(from_table, own, 1e-5, &format!("timestep {ti}"));
    }
}

/// The pipeline with the folder's defaults (LCMScheduler, 4 steps, guidance 8.5), ungated and
/// gated at step 2 (the default gate step for 4 steps).
#[test]
fn lcm_pipeline_matches_diffusers_and_the_no_guidance_gate() {
    let src = small_model("lcm");
    let model = load_pipeline(&src, &cpu());
    let json = reference_json("lcm");
    let r = reference("lcm");
    let (n, s) = (host(&r, "pipe.noise"), host(&r, "pipe.step_noise"));
    let noise = tgate::safetensors::write_f32(&[
        ("noise", &n.shape, &n.data),
        ("step_noise", &s.shape, &s.data),
    ]);
    assert_eq!(json["steps"], 4);
    assert_eq!(json["guidance"], 8.5);
    assert_eq!(json["gate_step"], 2);
    for (run, gate) in [("full", None), ("gated", Some(GateKnobs::default()))] {
        let mut req = Request::new(
            json["prompt"].as_str().unwrap(),
            NoiseSource::File {
                name: "noise".into(),
                bytes: noise.clone(),
            },
        );
        req.gate = gate;
        let plan = model.plan(&req).unwrap();
        let line = plan.describe(&model);
        assert!(
            line.contains("4 steps, guidance 8.5, scheduler lcm"),
            "{line}"
        );
        let out = model
            .generate(&req, &mut |_| ControlFlow::Continue(()))
            .unwrap_or_else(|e| panic!("{run}: {e}"));
        assert_close(
            out.latents[0].1.clone(),
            &r,
            &format!("pipe.lcm.{run}"),
            1e-4,
        );
        let phases: Vec<Phase> = out.steps.iter().map(|s| s.phase).collect();
        let planning = if run == "full" { 4 } else { 2 };
        assert!(phases[..planning]
            .iter()
            .all(|p| *p == Phase::SemanticsPlanning));
        assert!(phases[planning..]
            .iter()
            .all(|p| *p == Phase::FidelityImproving));
    }
}

/// Without its guidance embedding weights the LCM UNet is refused by name.
#[test]
fn an_lcm_config_without_cond_proj_weights_is_refused() {
    let device = cpu();
    let src = small_model("lcm");
    let mut cfg = UNetConfig::from_json(
        "config.json",
        &read_required(&src, "unet/config.json").unwrap(),
    )
    .unwrap();
    let sd1 = source("sd1");
    cfg.time_cond_proj_dim = Some(32);
    let w = load_weights(
        &sd1,
        "unet",
        "diffusion_pytorch_model",
        Variant::Auto,
        &device,
    )
    .unwrap();
    let err = UNet2DConditionModel::load(&cfg, &w)
        .unwrap_err()
        .to_string();
    assert!(err.contains("time_embedding.cond_proj.weight"), "{err}");
}
