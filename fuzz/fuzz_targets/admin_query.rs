#![no_main]
//! See `tether::fuzzing::admin_query`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether::fuzzing::admin_query(data));
