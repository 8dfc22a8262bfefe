//! Arbitrary bytes as a fastdet weights file → `fastdet::weights::Weights::load` (safetensors
//! header, fastdet metadata, spec JSON, tensor table).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let mut f = tempfile::Builder::new().suffix(".safetensors").tempfile().unwrap();
    f.write_all(data).unwrap();
    f.flush().unwrap();
    let _ = fastdet::weights::Weights::load(f.path());
});
