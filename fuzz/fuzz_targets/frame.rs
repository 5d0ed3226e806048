//! Fuzz target: `vmig::fuzzing::frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmig::fuzzing::frame(data));
