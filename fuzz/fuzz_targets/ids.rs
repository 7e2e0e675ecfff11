#![no_main]
//! See `kopir_fuzz::ids`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kopir_fuzz::ids(data));
