#![no_main]
//! See `kopir_fuzz::management_request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kopir_fuzz::management_request(data));
