#![no_main]
//! See `kopir_fuzz::jws`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kopir_fuzz::jws(data));
