//! Fuzz target: `vmig::fuzzing::definition`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmig::fuzzing::definition(data));
