//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz targets' bodies
//! (`fuzz/src/targets.rs`, included here): CI's smoke run of every fuzz target without a
//! libFuzzer build. `cargo fuzz run <target>` (in `fuzz/`) explores from the same corpus.

#[allow(dead_code)]
#[path = "../../../fuzz/src/targets.rs"]
mod targets;

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    files
}

#[test]
fn fuzz_corpus_replays_without_panics() {
    for (_, data) in corpus("safetensors") {
        targets::safetensors(&data);
    }
    for (_, data) in corpus("configs") {
        targets::configs(&data);
    }
    for (_, data) in corpus("tokenizer") {
        targets::tokenizer(&data);
    }
    let model = targets::tiny_sd();
    for (_, data) in corpus("noise") {
        targets::noise(&data, &model);
    }
}
