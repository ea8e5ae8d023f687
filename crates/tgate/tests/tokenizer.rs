//! Checks `ClipTokenizer` against ids and masks produced by `transformers.CLIPTokenizer`
//! (`padding="max_length", max_length=77, truncation=True`).
//!
//! Fixtures: `tests/fixtures/clip-tokenizer/` (the real CLIP vocabulary plus `cases.json`) and,
//! when present, the tiny-vocab tokenizers of `tests/fixtures/{sd1,sd2}/tokenizer/` with their cases
//! in `tests/fixtures/{sd1,sd2}/reference.json` (key `tokenizer_cases`) or `tokenizer/cases.json`.

use serde_json::Value;
use std::path::{Path, PathBuf};
use tgate::tokenizer::ClipTokenizer;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn read_opt(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

/// Loads a tokenizer folder (vocab.json, merges.txt, optional configs).
fn load(dir: &Path) -> ClipTokenizer {
    let vocab = std::fs::read(dir.join("vocab.json")).expect("vocab.json");
    let merges = std::fs::read(dir.join("merges.txt")).expect("merges.txt");
    let config = read_opt(&dir.join("tokenizer_config.json"));
    let map = read_opt(&dir.join("special_tokens_map.json"));
    ClipTokenizer::from_files(&vocab, &merges, config.as_deref(), map.as_deref())
        .expect("tokenizer loads")
}

fn ints(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("int list")
        .iter()
        .map(|x| x.as_u64().expect("int") as u32)
        .collect()
}

/// Compares every `{"prompt", "ids", "mask"}` case; returns how many were checked.
fn check_cases(name: &str, tok: &ClipTokenizer, cases: &[Value]) -> usize {
    let mut failures = Vec::new();
    for case in cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        let (want_ids, want_mask) = (ints(&case["ids"]), ints(&case["mask"]));
        let (ids, mask) = tok.encode_with_mask(prompt).expect("encode");
        assert_eq!(
            ids,
            tok.encode(prompt).expect("encode"),
            "{name}: encode != encode_with_mask"
        );
        if ids != want_ids || mask != want_mask {
            failures.push(format!(
                "{name}: {prompt:?}\n  want {want_ids:?} {want_mask:?}\n  got  {ids:?} {mask:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    cases.len()
}

/// Reads a JSON file; Python's non-standard `NaN` / `Infinity` / `-Infinity` (outside strings)
/// are read as `null`, since reference files written by `json.dump` may contain them.
fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("read json");
    let (mut out, mut rest, mut in_str, mut escaped) = (
        String::with_capacity(text.len()),
        text.as_str(),
        false,
        false,
    );
    while let Some(c) = rest.chars().next() {
        if !in_str {
            if let Some(word) = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|w| rest.starts_with(w))
            {
                out.push_str("null");
                rest = &rest[word.len()..];
                continue;
            }
        }
        match c {
            _ if escaped => escaped = false,
            '\\' if in_str => escaped = true,
            '"' => in_str = !in_str,
            _ => {}
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    serde_json::from_str(&out).expect("parse json")
}

#[test]
fn clip_vocabulary_matches_transformers() {
    let dir = fixtures().join("clip-tokenizer");
    let tok = load(&dir);
    assert_eq!(tok.max_length(), 77);
    assert_eq!((tok.bos_id(), tok.eos_id()), (49406, 49407));
    let cases = json(&dir.join("cases.json"));
    let n = check_cases("clip-tokenizer", &tok, cases.as_array().expect("case list"));
    assert!(n > 0, "no cases");
}

#[test]
fn sd_tokenizer_folders_match_transformers() {
    for name in ["sd1", "sd2"] {
        let dir = fixtures().join(name);
        let tok_dir = dir.join("tokenizer");
        let cases = match (dir.join("reference.json"), tok_dir.join("cases.json")) {
            (r, _) if r.exists() => json(&r).get("tokenizer_cases").cloned(),
            (_, c) if c.exists() => Some(json(&c)),
            _ => None,
        };
        let Some(Value::Array(cases)) = cases else {
            eprintln!("skipping {name}: no tokenizer cases yet");
            continue;
        };
        if !tok_dir.join("vocab.json").exists() {
            eprintln!("skipping {name}: no tokenizer folder yet");
            continue;
        }
        check_cases(name, &load(&tok_dir), &cases);
    }
}

#[test]
fn pad_token_comes_from_config() {
    let dir = fixtures().join("clip-tokenizer");
    let vocab = std::fs::read(dir.join("vocab.json")).expect("vocab.json");
    let merges = std::fs::read(dir.join("merges.txt")).expect("merges.txt");
    // SD 1.x style (also the default): pad with <|endoftext|>.
    let sd1 = ClipTokenizer::from_files(&vocab, &merges, None, None).expect("loads");
    assert_eq!((sd1.pad_id(), sd1.max_length()), (49407, 77));
    // SD 2.x style: pad with "!" (id 0), as a string or as an AddedToken object.
    let cfg = br#"{"model_max_length": 77, "pad_token": "!"}"#;
    let sd2 = ClipTokenizer::from_files(&vocab, &merges, Some(cfg), None).expect("loads");
    assert_eq!(sd2.pad_id(), 0);
    let (ids, mask) = sd2.encode_with_mask("a photo").expect("encode");
    assert_eq!(&ids[..5], &[49406, 320, 1125, 49407, 0]);
    assert_eq!(mask.iter().sum::<u32>(), 4);
    let map = br#"{"pad_token": {"content": "!", "normalized": false}}"#;
    let sd2 = ClipTokenizer::from_files(&vocab, &merges, None, Some(map)).expect("loads");
    assert_eq!(sd2.pad_id(), 0);
    // special_tokens_map.json wins over tokenizer_config.json.
    let map = br#"{"pad_token": "<|endoftext|>"}"#;
    let tok = ClipTokenizer::from_files(&vocab, &merges, Some(cfg), Some(map)).expect("loads");
    assert_eq!(tok.pad_id(), 49407);
    // Another model_max_length changes the padded length; the "no limit" sentinel means 77.
    let cfg = br#"{"model_max_length": 16}"#;
    let tok = ClipTokenizer::from_files(&vocab, &merges, Some(cfg), None).expect("loads");
    let long = tok.encode(&"word ".repeat(40)).expect("encode");
    assert_eq!((long.len(), long[0], long[15]), (16, 49406, 49407));
    let cfg = br#"{"model_max_length": 1000000000000000019884624838656}"#;
    let tok = ClipTokenizer::from_files(&vocab, &merges, Some(cfg), None).expect("loads");
    assert_eq!(tok.max_length(), 77);
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let dir = fixtures().join("clip-tokenizer");
    let vocab = std::fs::read(dir.join("vocab.json")).expect("vocab.json");
    let merges = std::fs::read(dir.join("merges.txt")).expect("merges.txt");
    assert!(ClipTokenizer::from_files(b"not json", &merges, None, None).is_err());
    assert!(ClipTokenizer::from_files(&vocab, b"#version: 0.2\na b c\n", None, None).is_err());
    assert!(ClipTokenizer::from_files(&vocab, b"#version: 0.2\nzzzzqq xx\n", None, None).is_err());
    assert!(ClipTokenizer::from_files(&vocab, &merges, Some(b"{"), None).is_err());
    assert!(ClipTokenizer::from_files(&vocab, &merges, Some(b"[1]"), None).is_err());
    assert!(
        ClipTokenizer::from_files(&vocab, &merges, Some(br#"{"pad_token": 3}"#), None).is_err()
    );
    assert!(
        ClipTokenizer::from_files(&vocab, &merges, Some(br#"{"model_max_length": 1}"#), None)
            .is_err()
    );
    assert!(
        ClipTokenizer::from_files(&vocab, &merges, None, Some(br#"{"pad_token": {}}"#)).is_err()
    );
    // The unknown token must be in the vocabulary once a character falls outside it.
    let tiny = br#"{"a</w>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}"#;
    let tok = ClipTokenizer::from_files(tiny, b"#version: 0.2\n", None, None).expect("loads");
    assert_eq!(
        tok.encode("a b").expect("unk falls back")[..4],
        [1, 0, 2, 2]
    );
}

/// A tokenizer folder as transformers 5's `save_pretrained` writes it today (`tokenizer.json` +
/// `tokenizer_config.json`, no vocab.json / merges.txt): the ids transformers gives for it, and
/// the same ids as the vocab.json / merges.txt layout of the same tokenizer.
#[test]
fn tokenizer_json_layout_matches_transformers_and_the_other_layout() {
    use tgate::loader::DirSource;
    let folders = [
        ("sd1", "tokenizer"),
        ("sd2", "tokenizer"),
        ("wuerstchen", "tokenizer"),
        ("wuerstchen", "prior_tokenizer"),
    ];
    for (name, folder) in folders {
        let saved = fixtures().join("saved-today").join(name);
        assert!(
            !saved.join(folder).join("vocab.json").exists(),
            "the fixture must hold tokenizer.json only"
        );
        let from_json = ClipTokenizer::from_folder(&DirSource::new(&saved), folder).expect("loads");
        let cases = json(&saved.join(folder).join("cases.json"));
        let cases = cases["cases"].as_array().expect("case list");
        assert!(check_cases(name, &from_json, cases) > 0, "no cases");
        let classic = load(&fixtures().join(name).join(folder));
        for case in cases {
            let prompt = case["prompt"].as_str().expect("prompt");
            assert_eq!(
                from_json.encode_with_mask(prompt).expect("encode"),
                classic.encode_with_mask(prompt).expect("encode"),
                "{name}: layouts differ on {prompt:?}"
            );
        }
        assert_eq!(from_json.pad_id(), classic.pad_id());
    }
}

/// Old `tokenizers` versions write merges as "left right" strings, new ones as pairs.
#[test]
fn tokenizer_json_merges_in_either_form() {
    let path = fixtures().join("saved-today/sd1/tokenizer/tokenizer.json");
    let mut doc: Value = serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json");
    let pairs =
        ClipTokenizer::from_tokenizer_json(doc.to_string().as_bytes(), None, None).expect("pairs");
    let merges = doc["model"]["merges"].as_array_mut().expect("merges");
    for m in merges.iter_mut() {
        let parts: Vec<&str> = m
            .as_array()
            .expect("pair")
            .iter()
            .map(|p| p.as_str().expect("str"))
            .collect();
        *m = Value::String(parts.join(" "));
    }
    let strings = ClipTokenizer::from_tokenizer_json(doc.to_string().as_bytes(), None, None)
        .expect("strings");
    for prompt in ["a photo of an astronaut", "Hello, WORLD!!  é ü 42"] {
        assert_eq!(
            pairs.encode(prompt).expect("encode"),
            strings.encode(prompt).expect("encode")
        );
    }
}

#[test]
fn bad_tokenizer_json_is_a_named_error() {
    use tgate::loader::MemorySource;
    let msg = |bytes: &[u8]| match ClipTokenizer::from_tokenizer_json(bytes, None, None) {
        Ok(_) => panic!("accepted {:?}", String::from_utf8_lossy(bytes)),
        Err(e) => e.to_string(),
    };
    assert!(msg(b"{").contains("tokenizer.json"));
    assert!(msg(br#"{"model": {"type": "Unigram", "vocab": []}}"#).contains("Unigram"));
    assert!(msg(br#"{"model": {"type": "BPE", "merges": []}}"#).contains("model.vocab"));
    let bad_merge = br#"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [["a"]]}}"#;
    assert!(msg(bad_merge).contains("merges[0]"));
    // A folder with neither layout names both.
    let err = ClipTokenizer::from_folder(&MemorySource::default(), "tokenizer")
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("tokenizer/tokenizer.json") && err.contains("tokenizer/merges.txt"),
        "{err}"
    );
}
