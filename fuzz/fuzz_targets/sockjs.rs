//! `sockjs::decode_messages`, `sockjs::route` and `jii::parse`, and the
//! frames written back. Input format and invariants:
//! `kometa_fuzz::checks::sockjs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kometa_fuzz::checks::sockjs(data));
