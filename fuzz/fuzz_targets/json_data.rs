//! `proto::json::validate` and `single_line` (publication data, SSE lines).
//! Input format and invariants: `kometa_fuzz::checks::json_data`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kometa_fuzz::checks::json_data(data));
