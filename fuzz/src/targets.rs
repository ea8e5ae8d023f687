//! Fuzz target bodies: every parser of untrusted input in the model crate.

use burn::tensor::{DType, Device};
use tgate::clip::ClipTextConfig;
use tgate::loader::{load_weights_as, MemorySource, Variant};
use tgate::paella_vq_model::PaellaConfig;
use tgate::pipeline_wuerstchen::WuerstchenSettings;
use tgate::safetensors::SafeTensors;
use tgate::schedulers::ddpm_wuerstchen::DdpmWuerstchenConfig;
use tgate::schedulers::SchedulerConfig;
use tgate::text_to_image::{NoiseSource, Pipeline, Request};
use tgate::tokenizer::ClipTokenizer;
use tgate::unet_2d_condition::UNetConfig;
use tgate::vae::VaeConfig;
use tgate::wuerstchen_diffnext::DiffNeXtConfig;
use tgate::wuerstchen_prior::PriorConfig;

/// A safetensors file: the header, then every tensor read as f32 (and as i64).
pub fn safetensors(data: &[u8]) {
    let Ok(st) = SafeTensors::parse("fuzz.safetensors", data.to_vec()) else {
        return;
    };
    let names: Vec<String> = st.names().map(String::from).collect();
    for name in &names {
        let _ = st.shape(name);
        let _ = st.dtype(name);
        let _ = st.read_f32_any(name);
        let _ = st.read_i64_any(name);
    }
}

/// Every JSON file of a folder: the first byte picks the parser.
pub fn configs(data: &[u8]) {
    let Some((&pick, json)) = data.split_first() else {
        return;
    };
    match pick % 11 {
        0 => drop(UNetConfig::from_json("unet/config.json", json)),
        1 => drop(VaeConfig::from_json("vae/config.json", json)),
        2 => drop(ClipTextConfig::from_json("text_encoder/config.json", json)),
        3 => drop(SchedulerConfig::from_json(
            "scheduler/scheduler_config.json",
            json,
        )),
        4 => drop(PriorConfig::from_json("prior/config.json", json)),
        5 => drop(DiffNeXtConfig::from_json("decoder/config.json", json)),
        6 => drop(PaellaConfig::from_json("vqgan/config.json", json)),
        7 => drop(DdpmWuerstchenConfig::from_json(
            "scheduler/scheduler_config.json",
            json,
        )),
        8 => drop(WuerstchenSettings::from_model_index(Some(json), None)),
        9 => drop(WuerstchenSettings::from_model_index(None, Some(json))),
        _ => shard_index(json),
    }
}

/// A sharded checkpoint's `*.safetensors.index.json` (its shards are absent or empty).
fn shard_index(json: &[u8]) {
    let mut src = MemorySource::default();
    src.files.insert(
        "unet/diffusion_pytorch_model.safetensors.index.json".into(),
        json.to_vec(),
    );
    src.files.insert(
        "unet/a.safetensors".into(),
        b"\x02\0\0\0\0\0\0\0{}".to_vec(),
    );
    let _ = load_weights_as(
        &src,
        "unet",
        "diffusion_pytorch_model",
        Variant::Auto,
        DType::F32,
        &Device::flex(),
    );
}

/// Tokenizer files: the first byte picks the layout; the rest is split at the first NUL into
/// the two files (`vocab.json` + `merges.txt`, or `tokenizer.json` + `tokenizer_config.json`);
/// a prompt is encoded with whatever loads.
pub fn tokenizer(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let (a, b) = match rest.iter().position(|&c| c == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let mut src = MemorySource::default();
    if pick % 2 == 0 {
        src.files.insert("tokenizer/vocab.json".into(), a.to_vec());
        src.files.insert("tokenizer/merges.txt".into(), b.to_vec());
    } else {
        src.files
            .insert("tokenizer/tokenizer.json".into(), a.to_vec());
        src.files
            .insert("tokenizer/tokenizer_config.json".into(), b.to_vec());
    }
    if let Ok(tok) = ClipTokenizer::from_folder(&src, "tokenizer") {
        let _ = tok.encode("a photo of a cat, très café 🐈 <|endoftext|>");
        let _ = tok.encode_with_mask(&String::from_utf8_lossy(b));
    }
}

/// A `--noise` file planned against the bundled tiny Stable Diffusion model (loaded once).
pub fn noise(data: &[u8], model: &Pipeline) {
    let request = Request::new(
        "x",
        NoiseSource::File {
            name: "fuzz.safetensors".into(),
            bytes: data.to_vec(),
        },
    );
    let _ = model.plan(&request);
}

/// The tiny Stable Diffusion fixture, for [`noise`].
pub fn tiny_sd() -> Pipeline {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/sd1")
        .canonicalize()
        .or_else(|_| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/sd1")
                .canonicalize()
        })
        .expect("the tests/fixtures/sd1 folder");
    let src = tgate::loader::DirSource::new(root);
    Pipeline::load(&src, None, None, Variant::Auto, DType::F32, &Device::flex())
        .expect("the tiny fixture loads")
}
