//! The folder layouts users bring, beyond the fixtures' own: tokenizers saved by transformers 5
//! (`tokenizer.json` only), sharded checkpoints (`*.safetensors.index.json`, diffusers' and
//! transformers' shard names, plain and `fp16` variant), and the choice between weight variants.
//! Each layout runs the reference pipelines of `tests/make_fixtures.py` (diffusers / tgate).

mod common;

use std::ops::ControlFlow;

use burn::tensor::DType;
use common::*;
use tgate::loader::{load_weights_as, MemorySource, ModelSource, Variant};
use tgate::pipeline::StableDiffusion;
use tgate::pipeline_wuerstchen::Wuerstchen;
use tgate::safetensors::{write_f32, SafeTensors};
use tgate::schedulers::SchedulerKind;
use tgate::Error;

fn memory(root: &std::path::Path) -> MemorySource {
    memory_of(root)
}

/// Replaces the tokenizer folder `dir` by the one transformers 5's `save_pretrained` wrote.
fn tokenizer_saved_today(files: &mut MemorySource, name: &str, dir: &str) {
    files
        .files
        .retain(|k, _| !k.starts_with(&format!("{dir}/")));
    let saved = fixture_dir("saved-today").join(name).join(dir);
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        let bytes = std::fs::read(saved.join(file)).unwrap();
        files.files.insert(format!("{dir}/{file}"), bytes);
    }
}

/// Splits `{dir}/{stem}[.variant].safetensors` into `parts` shards named as `save_pretrained`
/// names them (`{stem}[.variant]-00001-of-0000N.safetensors`) plus the index
/// `{stem}.safetensors.index[.variant].json`; tensors go round-robin by name. Returns the shard names.
fn shard(
    files: &mut MemorySource,
    dir: &str,
    stem: &str,
    variant: &str,
    parts: usize,
) -> Vec<String> {
    let base = if variant.is_empty() {
        stem.to_string()
    } else {
        format!("{stem}.{variant}")
    };
    let whole = format!("{dir}/{base}.safetensors");
    let bytes = files.files.remove(&whole).expect("the single file exists");
    let st = SafeTensors::parse(whole, bytes).unwrap();
    let names: Vec<String> = st.names().map(str::to_string).collect();
    let tensors: Vec<_> = names
        .iter()
        .map(|n| (n.clone(), st.read_f32_any(n).unwrap()))
        .collect();
    let shard_names: Vec<String> = (1..=parts)
        .map(|i| format!("{base}-{i:05}-of-{parts:05}.safetensors"))
        .collect();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0;
    for (i, shard_name) in shard_names.iter().enumerate() {
        let mine: Vec<_> = tensors.iter().skip(i).step_by(parts).collect();
        let list: Vec<(&str, &[usize], &[f32])> = mine
            .iter()
            .map(|(n, t)| (n.as_str(), t.shape.as_slice(), t.data.as_slice()))
            .collect();
        for (n, t) in &mine {
            weight_map.insert(n.clone(), shard_name.clone().into());
            total += t.data.len() * 4;
        }
        files
            .files
            .insert(format!("{dir}/{shard_name}"), write_f32(&list));
    }
    let index =
        serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let index_name = if variant.is_empty() {
        format!("{dir}/{stem}.safetensors.index.json")
    } else {
        format!("{dir}/{stem}.safetensors.index.{variant}.json")
    };
    files
        .files
        .insert(index_name, index.to_string().into_bytes());
    shard_names
}

/// The reference pipeline runs of `name` (default scheduler, with and without the gate) on a
/// model loaded from `src`.
fn matches_reference(name: &str, model: &StableDiffusion) {
    let json = reference_json(name);
    let r = reference(name);
    let kind: SchedulerKind = json["default_scheduler"].as_str().unwrap().parse().unwrap();
    let sched = json["default_scheduler"].as_str().unwrap();
    for run in ["full", "tgate"] {
        let mut p = sd_params(&json, &r);
        p.scheduler = Some(kind);
        p.gate = (run != "full").then(|| gate_of(&json, run));
        let out = model
            .generate_latents(&p, &mut |_| ControlFlow::Continue(()))
            .unwrap_or_else(|e| panic!("{name} {run}: {e}"));
        assert_close(out.latents, &r, &format!("pipe.{sched}.{run}"), 1e-3);
    }
}

/// SD 1.x as a user's folder looks today: tokenizer.json only, the UNet in two shards
/// (diffusers' names), the text encoder in three (transformers' names).
#[test]
fn sd1_saved_today_with_sharded_weights_matches_diffusers() {
    let mut files = memory(&fixture_dir("sd1"));
    tokenizer_saved_today(&mut files, "sd1", "tokenizer");
    let unet_shards = shard(&mut files, "unet", "diffusion_pytorch_model", "", 2);
    shard(&mut files, "text_encoder", "model", "", 3);
    assert!(!files.files.contains_key("tokenizer/vocab.json"));
    let model = StableDiffusion::load(&files, Variant::Auto, &cpu()).expect("loads");
    let unet = model
        .loaded
        .iter()
        .find(|l| l.part == "unet")
        .expect("unet listed");
    assert_eq!(
        unet.files,
        unet_shards
            .iter()
            .map(|s| format!("unet/{s}"))
            .collect::<Vec<_>>()
    );
    assert!(unet.reason.contains("f32 compute"), "{}", unet.reason);
    matches_reference("sd1", &model);
}

/// SD 2.x's fixture ships `fp16` variant files: the same, sharded with variant names
/// (`diffusion_pytorch_model.safetensors.index.fp16.json` + `diffusion_pytorch_model.fp16-0000i-of-00002.safetensors`).
#[test]
fn sd2_saved_today_with_sharded_fp16_variant_matches_diffusers() {
    let mut files = memory(&fixture_dir("sd2"));
    tokenizer_saved_today(&mut files, "sd2", "tokenizer");
    shard(&mut files, "unet", "diffusion_pytorch_model", "fp16", 2);
    shard(&mut files, "vae", "diffusion_pytorch_model", "fp16", 2);
    let model = StableDiffusion::load(&files, Variant::Auto, &cpu()).expect("loads");
    let vae = model
        .loaded
        .iter()
        .find(|l| l.part == "vae")
        .expect("vae listed");
    assert_eq!(vae.files.len(), 2);
    assert!(vae.reason.contains("only this variant"), "{}", vae.reason);
    matches_reference("sd2", &model);
}

/// Würstchen's two tokenizers saved by transformers 5: the pipelines load, and both layouts
/// give the same ids (all the text encoders see).
#[test]
fn wuerstchen_saved_today_tokenizers_load() {
    let classic = memory(&fixture_dir("wuerstchen"));
    let mut files = classic.clone();
    tokenizer_saved_today(&mut files, "wuerstchen", "tokenizer");
    tokenizer_saved_today(&mut files, "wuerstchen", "prior_tokenizer");
    let device = cpu();
    let a = Wuerstchen::load(&classic, None, Variant::Auto, &device).expect("classic loads");
    let b = Wuerstchen::load(&files, None, Variant::Auto, &device).expect("saved-today loads");
    let prompt = reference_json("wuerstchen")["prompt"]
        .as_str()
        .unwrap()
        .to_string();
    for p in [prompt.as_str(), "A, b!  c's  naïve 🦊 12"] {
        assert_eq!(
            a.prior_tokenizer.encode(p).unwrap(),
            b.prior_tokenizer.encode(p).unwrap()
        );
        assert_eq!(
            a.tokenizer.encode(p).unwrap(),
            b.tokenizer.encode(p).unwrap()
        );
    }
}

/// Which variant is read: by compute dtype under `Auto`, the requested one first otherwise, the
/// others as fallbacks; the reason says which case it was.
#[test]
fn variant_follows_dtype_and_request() {
    let device = cpu();
    let unet =
        std::fs::read(fixture_dir("sd1").join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let with = |names: &[&str]| {
        let mut m = MemorySource::default();
        for n in names {
            m.files.insert(
                format!("unet/diffusion_pytorch_model{n}.safetensors"),
                unet.clone(),
            );
        }
        m
    };
    let chosen = |src: &MemorySource, v: Variant, dtype: DType| {
        let w = load_weights_as(src, "unet", "diffusion_pytorch_model", v, dtype, &device).unwrap();
        let c = w.checkpoint().unwrap();
        (c.name().to_string(), c.reason().to_string(), w.dtype())
    };
    let all = with(&["", ".fp16", ".bf16"]);
    let (f, why, dt) = chosen(&all, Variant::Auto, DType::F32);
    assert_eq!(
        (f.as_str(), dt),
        ("unet/diffusion_pytorch_model.safetensors", DType::F32)
    );
    assert!(why.contains("f32 compute"), "{why}");
    let (f, why, dt) = chosen(&all, Variant::Auto, DType::F16);
    assert_eq!(
        (f.as_str(), dt),
        ("unet/diffusion_pytorch_model.fp16.safetensors", DType::F16)
    );
    assert!(why.contains("f16 compute"), "{why}");
    let (f, _, _) = chosen(&all, Variant::Bf16, DType::F32);
    assert_eq!(f, "unet/diffusion_pytorch_model.bf16.safetensors");
    let (f, _, _) = chosen(&all, Variant::Fp32, DType::F16);
    assert_eq!(f, "unet/diffusion_pytorch_model.safetensors");
    // Fallbacks say so.
    let (f, why, _) = chosen(&with(&[".bf16"]), Variant::Auto, DType::F16);
    assert_eq!(f, "unet/diffusion_pytorch_model.bf16.safetensors");
    assert!(why.contains("only this variant"), "{why}");
    // Nothing there: every name tried is listed.
    let err = load_weights_as(
        &MemorySource::default(),
        "unet",
        "diffusion_pytorch_model",
        Variant::Auto,
        DType::F32,
        &device,
    )
    .err()
    .unwrap()
    .to_string();
    for n in [
        ".safetensors",
        ".fp16.safetensors",
        ".bf16.safetensors",
        ".safetensors.index.json",
        ".safetensors.index.fp16.json",
    ] {
        assert!(
            err.contains(&format!("diffusion_pytorch_model{n}")),
            "{err}"
        );
    }
    assert!(matches!(
        Variant::parse("fp8"),
        Err(Error::InvalidParameter { .. })
    ));
}

/// A broken sharded checkpoint is a typed error naming the index or the shard.
#[test]
fn broken_shards_give_typed_errors() {
    let base = {
        let mut files = memory(&fixture_dir("sd1"));
        shard(&mut files, "unet", "diffusion_pytorch_model", "", 2);
        files
    };
    let index = "unet/diffusion_pytorch_model.safetensors.index.json";
    let shard1 = "unet/diffusion_pytorch_model-00001-of-00002.safetensors";
    let shard2 = "unet/diffusion_pytorch_model-00002-of-00002.safetensors";
    let mut case = 0;
    let mut load = |files: &MemorySource| {
        case += 1;
        match StableDiffusion::load(files, Variant::Auto, &cpu()) {
            Ok(_) => panic!("case {case}: expected an error"),
            Err(e) => e,
        }
    };
    let edit_index = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut files = base.clone();
        let mut doc: serde_json::Value = serde_json::from_slice(&files.files[index]).unwrap();
        f(&mut doc);
        files
            .files
            .insert(index.into(), doc.to_string().into_bytes());
        files
    };
    // A shard is missing.
    let mut files = base.clone();
    files.files.remove(shard2);
    let e = load(&files);
    assert!(
        matches!(&e, Error::MissingFile(m) if m.contains(shard2) && m.contains("index")),
        "{e}"
    );
    // The index puts a tensor in a shard that lacks it.
    let files = edit_index(&|doc| {
        let map = doc["weight_map"].as_object_mut().unwrap();
        let (k, _) = map
            .iter()
            .find(|(_, v)| v.as_str().unwrap().contains("-00002-of"))
            .unwrap();
        let k = k.clone();
        map.insert(
            k,
            "diffusion_pytorch_model-00001-of-00002.safetensors".into(),
        );
    });
    let e = load(&files);
    assert!(
        matches!(&e, Error::CorruptWeights { file, message } if file == shard1 && message.contains("lacks")),
        "{e}"
    );
    // A tensor in both shards.
    let mut files = base.clone();
    let one = SafeTensors::parse("1", files.files[shard1].clone()).unwrap();
    let two = SafeTensors::parse("2", files.files[shard2].clone()).unwrap();
    let dup = one.names().next().unwrap().to_string();
    let mut all: Vec<(String, tgate::safetensors::HostTensor)> = two
        .names()
        .map(|n| (n.to_string(), two.read_f32_any(n).unwrap()))
        .collect();
    all.push((dup.clone(), one.read_f32_any(&dup).unwrap()));
    let list: Vec<(&str, &[usize], &[f32])> = all
        .iter()
        .map(|(n, t)| (n.as_str(), t.shape.as_slice(), t.data.as_slice()))
        .collect();
    files.files.insert(shard2.into(), write_f32(&list));
    let e = load(&files);
    assert!(
        matches!(&e, Error::CorruptWeights { file, message } if file == index && message.contains(&dup)),
        "{e}"
    );
    // A shard path outside the folder, a non-object map, invalid JSON.
    let files = edit_index(&|doc| {
        let map = doc["weight_map"].as_object_mut().unwrap();
        let k = map.keys().next().unwrap().clone();
        map.insert(k, "../vae/diffusion_pytorch_model.safetensors".into());
    });
    assert!(
        matches!(load(&files), Error::Config { file, message } if file == index && message.contains("beside"))
    );
    let files = edit_index(&|doc| doc["weight_map"] = serde_json::json!([1, 2]));
    assert!(matches!(load(&files), Error::Config { file, .. } if file == index));
    let mut files = base.clone();
    files.files.insert(index.into(), b"{".to_vec());
    assert!(
        matches!(load(&files), Error::Config { file, message } if file == index && message.contains("JSON"))
    );
}

/// A source must never be asked for paths outside its folder because of an index.
#[test]
fn shard_names_stay_in_the_folder() {
    struct Watch(MemorySource, std::cell::RefCell<Vec<String>>);
    impl ModelSource for Watch {
        fn read(&self, path: &str) -> tgate::Result<Option<Vec<u8>>> {
            self.1.borrow_mut().push(path.to_string());
            self.0.read(path)
        }
    }
    let mut files = memory(&fixture_dir("sd1"));
    shard(&mut files, "unet", "diffusion_pytorch_model", "", 2);
    let index = "unet/diffusion_pytorch_model.safetensors.index.json";
    let mut doc: serde_json::Value = serde_json::from_slice(&files.files[index]).unwrap();
    let k = doc["weight_map"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    doc["weight_map"][&k] = "/etc/passwd".into();
    files
        .files
        .insert(index.into(), doc.to_string().into_bytes());
    let watch = Watch(files, Default::default());
    assert!(StableDiffusion::load(&watch, Variant::Auto, &cpu()).is_err());
    assert!(watch.1.borrow().iter().all(|p| !p.contains("passwd")));
}
