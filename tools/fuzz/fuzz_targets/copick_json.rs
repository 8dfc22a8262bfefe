//! Arbitrary bytes as a copick picks file → `fastdet::io::copick::read_picks_file`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let mut f = tempfile::Builder::new().suffix(".json").tempfile().unwrap();
    f.write_all(data).unwrap();
    f.flush().unwrap();
    let _ = fastdet::io::copick::read_picks_file(f.path(), "TS_fuzz");
});
