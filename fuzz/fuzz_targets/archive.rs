#![no_main]
//! See `kopir_fuzz::archive`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kopir_fuzz::archive(data));
