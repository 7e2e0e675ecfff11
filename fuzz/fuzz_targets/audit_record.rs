#![no_main]
//! See `kopir_fuzz::audit_record`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kopir_fuzz::audit_record(data));
