//! `proto::ws::decode_frame` fed a stream in chunks, carrying `Fragments`,
//! with a small message limit; the outcome must not depend on the chunking.
//! Input format and invariants: `kometa_fuzz::checks::ws_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kometa_fuzz::checks::ws_frames(data));
