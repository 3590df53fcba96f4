//! `session_id::parse_session_id` and `parse_event_id`.
//! Input format and invariants: `kometa_fuzz::checks::session_ids`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kometa_fuzz::checks::session_ids(data));
