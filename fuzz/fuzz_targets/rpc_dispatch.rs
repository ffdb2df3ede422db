#![no_main]
//! See `tether::fuzzing::dispatch`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether::fuzzing::dispatch(data));
