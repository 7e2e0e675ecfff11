#![no_main]
//! See `kopir_fuzz::meta`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kopir_fuzz::meta(data));
