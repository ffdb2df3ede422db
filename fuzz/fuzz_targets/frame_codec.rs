#![no_main]
//! See `tether::fuzzing::frame_codec`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether::fuzzing::frame_codec(data));
