//! Harnesses for the cargo-fuzz targets in `fuzz_targets/`; the same file is
//! compiled into `tests/parsers_never_panic.rs`, so CI checks the same
//! invariants on proptest inputs that the fuzzer checks on its own.

pub mod checks;
