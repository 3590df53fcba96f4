//! `auth::Verifier::verify` with fixed secrets, on raw tokens and on claims
//! the harness signs itself.
//! Input format and invariants: `kometa_fuzz::checks::token`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kometa_fuzz::checks::token(data));
