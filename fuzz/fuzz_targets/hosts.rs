//! Fuzz target: `vmig::fuzzing::hosts`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmig::fuzzing::hosts(data));
