//! The fuzz targets' bodies, shared by `cargo fuzz` (`fuzz_targets/`) and the corpus replay
//! test of the model crate (`crates/tgate/tests/fuzz_corpus.rs`, which includes this file).
//! Each takes arbitrary bytes and must return (an `Err` is fine) without panicking, hanging or
//! allocating without bound.

#[path = "targets.rs"]
pub mod targets;
