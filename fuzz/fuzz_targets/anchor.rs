#![no_main]
//! See `kopir_fuzz::anchor`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kopir_fuzz::anchor(data));
