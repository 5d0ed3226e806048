//! Fuzz target: `vmig::fuzzing::pages`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmig::fuzzing::pages(data));
