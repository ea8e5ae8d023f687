#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tgate_fuzz::targets::tokenizer(data));
