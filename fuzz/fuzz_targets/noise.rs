#![no_main]

use std::sync::OnceLock;

use tgate::text_to_image::Pipeline;

static MODEL: OnceLock<Pipeline> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let model = MODEL.get_or_init(tgate_fuzz::targets::tiny_sd);
    tgate_fuzz::targets::noise(data, model);
});
