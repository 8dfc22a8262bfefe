//! Arbitrary bytes as a checkpoint file → `fastdet::checkpoint::read_checkpoint` (zip + pickle +
//! storages; bytes that look like safetensors take that path instead).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let mut f = tempfile::Builder::new().suffix(".ckpt").tempfile().unwrap();
    f.write_all(data).unwrap();
    f.flush().unwrap();
    let _ = fastdet::checkpoint::read_checkpoint(f.path());
});
