//! `proto::http::parse_head` and what the server does with a parsed head
//! (`query_param`, `percent_decode`, `keep_alive`, `ws::check_upgrade`).
//! Input format and invariants: `kometa_fuzz::checks::http_head`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kometa_fuzz::checks::http_head(data));
