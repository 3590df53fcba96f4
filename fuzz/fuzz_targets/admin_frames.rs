//! `proto::admin::split_frame` in a loop, `Reader` over every field type,
//! and the admin client's reply decoders.
//! Input format and invariants: `kometa_fuzz::checks::admin_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kometa_fuzz::checks::admin_frames(data));
