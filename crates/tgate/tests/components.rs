//! Each model part against diffusers / transformers on the tiny random-weight fixtures.

mod common;

use common::*;
use tgate::clip::{ClipTextConfig, ClipTextModel};
use tgate::loader::{load_weights, read_required, Variant};
use tgate::tgate::AttentionCache;
use tgate::unet_2d_condition::{UNet2DConditionModel, UNetConfig};
use tgate::vae::{VaeConfig, VaeDecoder};

const REL: f32 = 1e-4;

fn ids(r: &tgate::safetensors::SafeTensors, key: &str) -> Vec<Vec<u32>> {
    let (shape, data) = r.read_i64_any(key).expect("ids");
    data.chunks(shape[1])
        .map(|row| row.iter().map(|&v| v as u32).collect())
        .collect()
}

fn text_encoder(name: &str) {
    let device = cpu();
    let src = source(name);
    let r = reference(name);
    let cfg = ClipTextConfig::from_json(
        "config.json",
        &read_required(&src, "text_encoder/config.json").unwrap(),
    )
    .unwrap();
    let w = load_weights(&src, "text_encoder", "model", Variant::Auto, &device).unwrap();
    let model = ClipTextModel::load(&cfg, &w).unwrap();
    let unused: Vec<_> = w
        .unused_keys()
        .into_iter()
        .filter(|k| !k.ends_with("position_ids"))
        .collect();
    assert!(unused.is_empty(), "unused text-encoder tensors: {unused:?}");

    let input = ids(&r, "text.input_ids");
    let out = model.forward(&input, None, 0, &device).unwrap();
    assert_close(out, &r, "text.last_hidden_state", REL);
    let out = model.forward(&input, None, 1, &device).unwrap();
    assert_close(out, &r, "text.clip_skip_1", REL);
    let mask = ids(&r, "text.attention_mask");
    let out = model.forward(&input, Some(&mask), 0, &device).unwrap();
    assert_close(out, &r, "text.masked_last_hidden_state", REL);
}

fn unet(name: &str) {
    let device = cpu();
    let src = source(name);
    let r = reference(name);
    let cfg = UNetConfig::from_json(
        "config.json",
        &read_required(&src, "unet/config.json").unwrap(),
    )
    .unwrap();
    let w = load_weights(
        &src,
        "unet",
        "diffusion_pytorch_model",
        Variant::Auto,
        &device,
    )
    .unwrap();
    let model = UNet2DConditionModel::load(&cfg, &w).unwrap();
    assert!(
        w.unused_keys().is_empty(),
        "unused UNet tensors: {:?}",
        w.unused_keys()
    );
    let t = host(&r, "unet.timestep").data[0] as f64;
    let out = model.forward(
        tensor(&r, "unet.sample", &device),
        t,
        &tensor(&r, "unet.encoder_hidden_states", &device),
        &mut AttentionCache::new(),
    );
    assert_close(out, &r, "unet.out", REL);
    time_table_matches_per_call_time(&model, &r, t);

    // Where the joined time projections would not fit the device's largest buffer, each block
    // keeps its own (and projects the one-row time embedding for the whole batch).
    let joined = model
        .joined_time_projection_bytes()
        .expect("the fixture's time projections are joined");
    let capped = source(name).with_max_tensor_bytes(Some(joined - 1));
    let w = load_weights(
        &capped,
        "unet",
        "diffusion_pytorch_model",
        Variant::Auto,
        &device,
    )
    .unwrap();
    let separate = UNet2DConditionModel::load(&cfg, &w).unwrap();
    assert_eq!(separate.joined_time_projection_bytes(), None);
    let sample = tensor(&r, "unet.sample", &device);
    assert!(sample.dims()[0] > 1, "a batch of several rows");
    let out = separate.forward(
        sample,
        t,
        &tensor(&r, "unet.encoder_hidden_states", &device),
        &mut AttentionCache::new(),
    );
    assert_close(out, &r, "unet.out", REL);
    time_table_matches_per_call_time(&separate, &r, t);
}

/// A generation's time table (every call's time input made at once, or per call where the
/// table is over its byte cap) gives each call the output of a call that computes its own.
fn time_table_matches_per_call_time(
    model: &UNet2DConditionModel,
    r: &tgate::safetensors::SafeTensors,
    t: f64,
) {
    let device = cpu();
    let timesteps = [999.0, t, 1.0];
    let sample = tensor(r, "unet.sample", &device);
    let context = tensor(r, "unet.encoder_hidden_states", &device);
    for max_bytes in [u64::MAX, 0] {
        let table = model.time_table_within(&timesteps, None, &device, max_bytes);
        assert_eq!(table.is_precomputed(), max_bytes > 0);
        assert_eq!(table.len(), 3);
        assert!(model.time_at(&table, 3).is_none());
        for (i, &ti) in timesteps.iter().enumerate() {
            let time = model.time_at(&table, i).unwrap();
            let out = model.forward_time(
                sample.clone(),
                &time,
                &context,
                &mut AttentionCache::new(),
                None,
            );
            if ti == t {
                assert_close(out, r, "unet.out", REL);
            } else {
                let own = model.forward(sample.clone(), ti, &context, &mut AttentionCache::new());
                assert_agree(out, own, 1e-5, &format!("timestep {ti}"));
            }
        }
    }
}

fn vae(name: &str) {
    let device = cpu();
    let src = source(name);
    let r = reference(name);
    let cfg = VaeConfig::from_json(
        "config.json",
        &read_required(&src, "vae/config.json").unwrap(),
    )
    .unwrap();
    let w = load_weights(
        &src,
        "vae",
        "diffusion_pytorch_model",
        Variant::Auto,
        &device,
    )
    .unwrap();
    let model = VaeDecoder::load(&cfg, &w).unwrap();
    let unused: Vec<_> = w
        .unused_keys()
        .into_iter()
        .filter(|k| !k.starts_with("encoder.") && !k.starts_with("quant_conv."))
        .collect();
    assert!(unused.is_empty(), "unused VAE decoder tensors: {unused:?}");
    assert_close(
        model.decode(tensor(&r, "vae.z", &device)),
        &r,
        "vae.image",
        REL,
    );
}

#[test]
fn sd1_text_encoder() {
    text_encoder("sd1");
}
#[test]
fn sd2_text_encoder() {
    text_encoder("sd2");
}
#[test]
fn sd1_unet() {
    unet("sd1");
}
#[test]
fn sd2_unet_linear_projection_head_list_fp16_weights() {
    unet("sd2");
}
#[test]
fn sd1_vae_decoder() {
    vae("sd1");
}
#[test]
fn sd2_vae_decoder_legacy_attention_keys() {
    let w = load_weights(
        &source("sd2"),
        "vae",
        "diffusion_pytorch_model",
        Variant::Auto,
        &cpu(),
    )
    .unwrap();
    assert!(
        w.contains("decoder.mid_block.attentions.0.query.weight"),
        "fixture should use the legacy names"
    );
    vae("sd2");
}
