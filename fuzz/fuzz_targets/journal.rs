#![no_main]
//! See `kopir_fuzz::journal`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kopir_fuzz::journal(data));
