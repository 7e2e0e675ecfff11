#![no_main]
//! See `kopir_fuzz::globalconf`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kopir_fuzz::globalconf(data));
