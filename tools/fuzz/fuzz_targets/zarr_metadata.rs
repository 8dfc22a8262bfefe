//! Arbitrary bytes as the `.zarray` (zarr v2 metadata) of an array directory that also holds small
//! valid chunks → `fastdet::io::zarr::read_zarr_volume`.
//!
//! The chunks fit the seed metadata (`shape` = `chunks` = [2, 2, 2], `<f4`, no compressor): a raw
//! 32-byte chunk `0.0.0` (`.` separator) and the same chunk at `0/0/0` (`/` separator).
#![no_main]
use libfuzzer_sys::fuzz_target;

fn chunk() -> Vec<u8> {
    (0..8u32).flat_map(|i| (i as f32 * 0.5 - 1.0).to_le_bytes()).collect()
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let arr = dir.path().join("0");
    std::fs::create_dir_all(arr.join("0").join("0")).unwrap();
    std::fs::write(arr.join(".zarray"), data).unwrap();
    std::fs::write(arr.join("0.0.0"), chunk()).unwrap();
    std::fs::write(arr.join("0").join("0").join("0"), chunk()).unwrap();
    std::fs::write(dir.path().join(".zgroup"), br#"{"zarr_format": 2}"#).unwrap();
    // Both ways in: the array itself, and the group naming level "0".
    let _ = fastdet::io::zarr::read_zarr_volume(&arr, "0");
    let _ = fastdet::io::zarr::read_zarr_volume(dir.path(), "0");
});
