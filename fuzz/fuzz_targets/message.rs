//! Fuzz target: `vmig::fuzzing::message`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmig::fuzzing::message(data));
