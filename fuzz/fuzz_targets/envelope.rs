#![no_main]
//! See `kopir_fuzz::envelope`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kopir_fuzz::envelope(data));
