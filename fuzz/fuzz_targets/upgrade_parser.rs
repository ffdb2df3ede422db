#![no_main]
//! See `tether::fuzzing::upgrade`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether::fuzzing::upgrade(data));
