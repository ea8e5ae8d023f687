//! Every error class, seen through the one entry point front ends use
//! ([`tgate::text_to_image::Pipeline`]): each broken input gives its typed error, and the message
//! names the file, tensor, parameter or size at fault. (A lost device is seen in Chromium, where
//! it can be provoked: `web/test/browser.test.mjs`, "device lost".)

mod common;

use std::ops::ControlFlow;

use burn::tensor::DType;
use common::*;
use tgate::loader::{MemorySource, ModelSource, Variant};
use tgate::safetensors::write_f32;
use tgate::text_to_image::{NoiseSource, Pipeline, Request};
use tgate::Error;

const UNET: &str = "unet/diffusion_pytorch_model.safetensors";
const TEXT: &str = "text_encoder/model.safetensors";

fn load(src: &dyn ModelSource) -> tgate::Result<Pipeline> {
    Pipeline::load(src, None, None, Variant::Auto, DType::F32, &cpu())
}

fn load_err(src: &dyn ModelSource) -> Error {
    match load(src) {
        Ok(_) => panic!("loaded"),
        Err(e) => e,
    }
}

/// A safetensors file's header and data, to rewrite tensors.
fn split(bytes: &[u8]) -> (serde_json::Map<String, serde_json::Value>, &[u8]) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, &bytes[8 + n..])
}

fn join(header: &serde_json::Map<String, serde_json::Value>, data: &[u8]) -> Vec<u8> {
    let mut json = serde_json::to_vec(header).unwrap();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(data);
    out
}

/// The sd1 fixture with `file` rewritten by `edit` (header entries; the data is kept).
fn with_header(
    file: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> MemorySource {
    let mut src = memory_of(&fixture_dir("sd1"));
    let (mut header, data) = {
        let bytes = &src.files[file];
        let (h, d) = split(bytes);
        (h, d.to_vec())
    };
    edit(&mut header);
    src.files.insert(file.into(), join(&header, &data));
    src
}

fn message_has(e: &Error, parts: &[&str]) {
    let m = e.to_string();
    for p in parts {
        assert!(m.contains(p), "`{p}` not in: {m}");
    }
}

#[test]
fn load_errors_name_what_is_wrong() {
    // Config: an activation the UNet does not implement.
    let mut src = memory_of(&fixture_dir("sd1"));
    let cfg = String::from_utf8(src.files["unet/config.json"].clone()).unwrap();
    assert!(cfg.contains("\"act_fn\": \"silu\""));
    let cfg = cfg.replace("\"act_fn\": \"silu\"", "\"act_fn\": \"gelu\"");
    src.files
        .insert("unet/config.json".into(), cfg.into_bytes());
    let e = load_err(&src);
    assert!(matches!(e, Error::Config { .. }), "{e}");
    message_has(&e, &["unet/config.json", "act_fn"]);

    // MissingFile: no VAE config.
    let mut src = memory_of(&fixture_dir("sd1"));
    src.files.remove("vae/config.json");
    let e = load_err(&src);
    assert!(matches!(e, Error::MissingFile(_)), "{e}");
    message_has(&e, &["vae/config.json"]);

    // CorruptWeights: a header that claims more data than the file has.
    let mut src = memory_of(&fixture_dir("sd1"));
    let bytes = src.files.get_mut(UNET).unwrap();
    bytes.truncate(bytes.len() - 100);
    let e = load_err(&src);
    assert!(matches!(e, Error::CorruptWeights { .. }), "{e}");
    message_has(&e, &[UNET]);

    // MissingTensor: the UNet's conv_in weight renamed.
    let src = with_header(UNET, |h| {
        let v = h.remove("conv_in.weight").unwrap();
        h.insert("conv_in.renamed".into(), v);
    });
    let e = load_err(&src);
    assert!(matches!(e, Error::MissingTensor { .. }), "{e}");
    message_has(&e, &["conv_in.weight", UNET]);

    // ShapeMismatch: the same bytes declared with another shape.
    let src = with_header(UNET, |h| {
        let shape = h["conv_in.weight"]["shape"].as_array().unwrap().clone();
        let n: u64 = shape.iter().map(|d| d.as_u64().unwrap()).product();
        h["conv_in.weight"]["shape"] = serde_json::json!([n]);
    });
    let e = load_err(&src);
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    message_has(&e, &["conv_in.weight"]);

    // DtypeMismatch: the token embedding's bytes declared as integers.
    let src = with_header(TEXT, |h| {
        let key = h
            .keys()
            .find(|k| k.ends_with("token_embedding.weight"))
            .unwrap()
            .clone();
        h[&key]["dtype"] = "I32".into();
    });
    let e = load_err(&src);
    assert!(matches!(e, Error::DtypeMismatch { .. }), "{e}");
    message_has(&e, &["token_embedding", "I32"]);

    // TensorTooLarge: a device that binds under CLIP's token embedding (193792 bytes).
    let e = load_err(&Capped(memory_of(&fixture_dir("sd1")), 193_791));
    assert!(matches!(e, Error::TensorTooLarge { .. }), "{e}");
    message_has(&e, &["token_embedding", "193792", "193791"]);

    // Tokenizer: a vocabulary that is not JSON.
    let mut src = memory_of(&fixture_dir("sd1"));
    src.files
        .insert("tokenizer/vocab.json".into(), b"{not json".to_vec());
    let e = load_err(&src);
    assert!(
        matches!(e, Error::Tokenizer(_) | Error::Config { .. }),
        "{e}"
    );
    message_has(&e, &["vocab.json"]);
}

#[test]
fn request_errors_name_what_is_wrong() {
    let base = || Request::new("x", NoiseSource::Seed(0));
    // ActivationTooLarge: every weight fits, the VAE's last feature map at 64×64 (262144
    // bytes) does not.
    let model = load(&Capped(memory_of(&fixture_dir("sd1")), 193_792)).unwrap();
    let e = model.plan(&base()).err().expect("refused");
    assert!(matches!(e, Error::ActivationTooLarge { .. }), "{e}");
    message_has(&e, &["64×64", "VAE decoder feature map", "262144"]);

    let model = load(&source("sd1").with_max_memory_bytes(Some(10_000_000))).unwrap();
    // MemoryTooLarge: 1024² needs 3 × 16 MiB... of the VAE's last feature map at once.
    let mut r = base();
    r.width = Some(1024);
    r.height = Some(1024);
    let e = model.plan(&r).err().expect("refused");
    assert!(matches!(e, Error::MemoryTooLarge { .. }), "{e}");
    message_has(&e, &["1024×1024", "10000000", "VAE decoder feature map"]);

    // InvalidParameter: no steps.
    let mut r = base();
    r.steps = Some(0);
    let e = model.plan(&r).err().expect("refused");
    assert!(matches!(e, Error::InvalidParameter { .. }), "{e}");
    message_has(&e, &["steps", "got 0"]);

    // Input: a noise tensor of the wrong shape.
    let mut r = base();
    r.noise = NoiseSource::File {
        name: "noise.safetensors".into(),
        bytes: write_f32(&[("noise", &[1, 3, 8, 8], &[0.0; 192])]),
    };
    let e = model.plan(&r).err().expect("refused");
    assert!(matches!(e, Error::Input { .. }), "{e}");
    message_has(&e, &["noise", "[1, 3, 8, 8]", "expected"]);

    // Cancelled: the progress callback stops the run.
    let e = model
        .generate(&base(), &mut |_| ControlFlow::Break(()))
        .err()
        .expect("cancelled");
    assert!(matches!(e, Error::Cancelled), "{e}");
    message_has(&e, &["cancelled"]);
}
