//! Würstchen parts against diffusers 0.42.1 (references from tests/make_fixtures_wuerstchen.py).

mod common;

use burn::tensor::{Tensor, TensorData};
use common::*;
use tgate::clip::{ClipTextConfig, ClipTextModel};
use tgate::loader::{load_weights, read_required, ModelSource, Variant};
use tgate::nn::resize_bicubic_antialias;
use tgate::paella_vq_model::{PaellaConfig, PaellaDecoder};
use tgate::schedulers::ddpm_wuerstchen::{
    default_stage_c_timesteps, DdpmWuerstchenConfig, DdpmWuerstchenScheduler,
};
use tgate::tgate::AttentionCache;
use tgate::tokenizer::ClipTokenizer;
use tgate::weights::Weights;
use tgate::wuerstchen_diffnext::{DiffNeXtConfig, WuerstchenDiffNeXt};
use tgate::wuerstchen_prior::{PriorConfig, WuerstchenPrior};

const FIX: &str = "wuerstchen";

fn weights(dir: &str) -> Weights {
    load_weights(
        &source(FIX),
        dir,
        "diffusion_pytorch_model",
        Variant::Auto,
        &cpu(),
    )
    .expect("weights")
}

fn config(path: &str) -> Vec<u8> {
    read_required(&source(FIX), path).expect("config")
}

fn host_vec(key: &str) -> Vec<f32> {
    host(&reference(FIX), key).data
}

fn assert_all_used(w: &Weights, allowed_unused: &[&str]) {
    let unused: Vec<String> = w
        .unused_keys()
        .into_iter()
        .filter(|k| !allowed_unused.iter().any(|p| k.starts_with(p)))
        .collect();
    assert!(
        unused.is_empty(),
        "checkpoint tensors never read: {unused:?}"
    );
}

#[test]
fn prior_forward() {
    let device = cpu();
    let r = reference(FIX);
    let cfg = PriorConfig::from_json(
        "prior_prior/config.json",
        &config("prior_prior/config.json"),
    )
    .unwrap();
    let w = weights("prior_prior");
    let prior = WuerstchenPrior::load(&cfg, &w).unwrap();
    assert_all_used(&w, &[]);
    let text = prior.map_text(tensor(&r, "prior.c", &device));
    let out = prior.forward(
        tensor(&r, "prior.x", &device),
        &host_vec("prior.r"),
        &text,
        &mut AttentionCache::new(),
    );
    assert_close(out, &r, "prior.out", 1e-5);

    // A generation's table (every step's ratio mapped at once): each row, broadcast over the
    // batch, gives what a call mapping its own ratio gives.
    let x = tensor(&r, "prior.x", &device);
    let b = x.dims()[0];
    let ratios = [0.99f32, 0.5, 0.0];
    let table = prior.r_table(&ratios);
    assert_eq!(table.rows(), 3);
    assert!(table.row(3).is_none());
    for (i, &ri) in ratios.iter().enumerate() {
        let row = table.row(i).unwrap();
        let from_table = prior.forward_table(x.clone(), &row, &text, &mut AttentionCache::new());
        let own = prior.forward(x.clone(), &vec![ri; b], &text, &mut AttentionCache::new());
        assert_agree(from_table, own, 1e-5, &format!("prior at r {ri}"));
    }
}

#[test]
fn decoder_forward() {
    let device = cpu();
    let r = reference(FIX);
    let cfg =
        DiffNeXtConfig::from_json("decoder/config.json", &config("decoder/config.json")).unwrap();
    let w = weights("decoder");
    let decoder = WuerstchenDiffNeXt::load(&cfg, &w).unwrap();
    assert_all_used(&w, &[]);
    let mut cond = decoder.condition(
        tensor(&r, "decoder.effnet", &device),
        tensor(&r, "decoder.clip", &device),
    );
    let x = tensor(&r, "decoder.x", &device);
    let out = decoder.forward(x.clone(), &host_vec("decoder.r"), &mut cond);
    assert_close(out, &r, "decoder.out", 1e-5);
    // A second call reuses the kept effnet conditioning and gives the same result.
    let again = decoder.forward(x.clone(), &host_vec("decoder.r"), &mut cond);
    assert_close(again, &r, "decoder.out", 1e-5);

    // A row of a generation's table, broadcast over the batch, as in `prior_forward`.
    let b = x.dims()[0];
    let ratios = [0.99f32, 0.25];
    let table = decoder.r_table(&ratios);
    for (i, &ri) in ratios.iter().enumerate() {
        let from_table = decoder.forward_table(x.clone(), &table.row(i).unwrap(), &mut cond);
        let own = decoder.forward(x.clone(), &vec![ri; b], &mut cond);
        assert_agree(from_table, own, 1e-5, &format!("decoder at r {ri}"));
    }
}

#[test]
fn vqgan_decode() {
    let device = cpu();
    let r = reference(FIX);
    let cfg = PaellaConfig::from_json("vqgan/config.json", &config("vqgan/config.json")).unwrap();
    let w = weights("vqgan");
    let vqgan = PaellaDecoder::load(&cfg, &w).unwrap();
    // The encoder and the codebook are not part of the decode path.
    assert_all_used(&w, &["in_block.", "down_blocks.", "vquantizer."]);
    let out = vqgan.decode(tensor(&r, "vqgan.latents", &device));
    assert_close(out, &r, "vqgan.out", 1e-5);
}

#[test]
fn antialiased_bicubic_resize() {
    let device = cpu();
    let r = reference(FIX);
    for (h, w) in [(16, 11), (3, 4), (9, 2), (1, 1)] {
        let out = resize_bicubic_antialias(tensor(&r, "resize.in", &device), h, w);
        assert_close(out, &r, &format!("resize.{h}x{w}"), 2e-6);
    }
}

#[test]
fn text_encoders_with_padding_mask() {
    let device = cpu();
    let r = reference(FIX);
    let src = source(FIX);
    for (dir, tok_dir, key) in [
        ("prior_text_encoder", "prior_tokenizer", "prior_text"),
        ("text_encoder", "tokenizer", "decoder_text"),
    ] {
        let tok = ClipTokenizer::from_files(
            &read_required(&src, &format!("{tok_dir}/vocab.json")).unwrap(),
            &read_required(&src, &format!("{tok_dir}/merges.txt")).unwrap(),
            src.read(&format!("{tok_dir}/tokenizer_config.json"))
                .unwrap()
                .as_deref(),
            src.read(&format!("{tok_dir}/special_tokens_map.json"))
                .unwrap()
                .as_deref(),
        )
        .unwrap();
        let cfg_path = format!("{dir}/config.json");
        let cfg =
            ClipTextConfig::from_json(&cfg_path, &read_required(&src, &cfg_path).unwrap()).unwrap();
        let w = load_weights(&src, dir, "model", Variant::Auto, &device).unwrap();
        let te = ClipTextModel::load(&cfg, &w).unwrap();
        let json = reference_json(FIX);
        for (which, text) in [
            ("cond", json["prompt"].as_str().unwrap()),
            ("uncond", json["negative_prompt"].as_str().unwrap()),
        ] {
            let (ids, mask) = tok.encode_with_mask(text).unwrap();
            let out = te.forward(&[ids], Some(&[mask]), 0, &device).unwrap();
            assert_close(out, &r, &format!("{key}.{which}"), 1e-5);
        }
    }
}

fn check_schedule(actual: &[f32], expected: &[f32], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (a, e) in actual.iter().zip(expected) {
        assert!((a - e).abs() <= 1e-7, "{what}: {actual:?} vs {expected:?}");
    }
}

#[test]
fn ddpm_wuerstchen_scheduler() {
    let device = cpu();
    let r = reference(FIX);
    let json = reference_json(FIX);
    let steps = json["sched_steps"].as_u64().unwrap() as usize;
    let plain = DdpmWuerstchenScheduler::new(DdpmWuerstchenConfig::default(), steps).unwrap();
    check_schedule(plain.timesteps(), &host_vec("sched.timesteps"), "linspace");
    let default = DdpmWuerstchenScheduler::with_timesteps(
        DdpmWuerstchenConfig::default(),
        &default_stage_c_timesteps(),
    )
    .unwrap();
    assert_eq!(default.steps(), 29);
    check_schedule(
        default.timesteps(),
        &host_vec("sched.default_timesteps"),
        "default",
    );

    for (name, scaler) in json["sched_scalers"].as_object().unwrap() {
        let cfg = DdpmWuerstchenConfig {
            scaler: scaler.as_f64().unwrap() as f32,
            ..Default::default()
        };
        let sched = DdpmWuerstchenScheduler::new(cfg, steps).unwrap();
        let samples = host(&r, &format!("{name}.samples"));
        let outs = host(&r, &format!("{name}.model_output"));
        let noise = host(&r, &format!("{name}.noise"));
        let n: usize = samples.shape[1..].iter().product();
        let shape = [1, 16, 6, 3];
        let slice = |v: &[f32], i: usize| {
            Tensor::<4>::from_data(
                TensorData::new(v[i * n..(i + 1) * n].to_vec(), shape),
                &device,
            )
        };
        let mut sample = slice(&samples.data, 0);
        for i in 0..steps {
            let noise_i = (i + 1 < steps).then(|| slice(&noise.data, i));
            sample = sched
                .step(slice(&outs.data, i), i, sample, noise_i)
                .unwrap();
            // Compare every intermediate sample.
            let expected = &samples.data[(i + 1) * n..(i + 2) * n];
            let got = sample.clone().into_data().try_to_vec::<f32>().unwrap();
            let (err, scale) = compare(&got, expected);
            assert!(
                err <= 2e-6 * scale,
                "{name} step {i}: {err} (scale {scale})"
            );
        }
    }
    // A missing noise tensor before the last step is an error, not a panic.
    let zeros = Tensor::<4>::zeros([1, 16, 6, 3], &device);
    assert!(plain.step(zeros.clone(), 0, zeros.clone(), None).is_err());
    assert!(plain.step(zeros.clone(), steps, zeros, None).is_err());
}
