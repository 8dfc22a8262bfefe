//! Arbitrary bytes as a checkpoint file → `fastdet::checkpoint::read_checkpoint`.
//!
//! Bytes that start like a pickle (`0x80`, the PROTO opcode torch's pickles begin with) are taken as
//! the `data.pkl` of a `torch.save` zip built around them, with two small storages `data/0`
//! (32 bytes) and `data/1` (16 bytes): the zip's CRCs would otherwise reject nearly every mutation
//! of a pickle inside a zip, and the state-dict and tensor-view code behind it would go unfuzzed.
//! Any other bytes (`PK` zips, safetensors, garbage) are the file as they are.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fn torch_zip(pkl: &[u8]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let s0: Vec<u8> = (0..8u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let s1: Vec<u8> = (0..16u8).collect();
    for (name, data) in [
        ("archive/data.pkl", pkl),
        ("archive/byteorder", b"little".as_slice()),
        ("archive/data/0", &s0),
        ("archive/data/1", &s1),
    ] {
        zip.start_file(name, opts).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

fuzz_target!(|data: &[u8]| {
    let wrapped;
    let bytes = if data.first() == Some(&0x80) {
        wrapped = torch_zip(data);
        &wrapped
    } else {
        data
    };
    let mut f = tempfile::Builder::new().suffix(".ckpt").tempfile().unwrap();
    f.write_all(bytes).unwrap();
    f.flush().unwrap();
    let _ = fastdet::checkpoint::read_checkpoint(f.path());
});
