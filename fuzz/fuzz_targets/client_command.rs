//! `proto::client::decode`: one client JSON command.
//! Input format and invariants: `kometa_fuzz::checks::client_command`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kometa_fuzz::checks::client_command(data));
