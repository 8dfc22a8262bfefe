//! A storage entry that inflates far past what the pickle declares (a decompression bomb) was read
//! whole: 10 MB of checkpoint took 6 GB of memory. Alone in its test binary, so that the peak
//! memory it measures is its own.

use std::io::Write;

#[path = "common/torch_pickle.rs"]
mod torch_pickle;
use torch_pickle::tensor_pickle;

fn peak_rss_bytes() -> i64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) }, 0);
    u.ru_maxrss * 1024
}

#[test]
fn storage_is_read_only_as_far_as_declared() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bomb.pt");
    // Written in pieces so that this test's own memory stays small: 4 declared f32s, then 384 MiB
    // of zeros, deflated to well under a MiB.
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", stored).unwrap();
    zip.write_all(&tensor_pickle(4, 0, &[2, 2], &[2, 1])).unwrap();
    zip.start_file("archive/byteorder", stored).unwrap();
    zip.write_all(b"little").unwrap();
    let deflated = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated).large_file(true);
    zip.start_file("archive/data/0", deflated).unwrap();
    zip.write_all(&[1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..384 {
        zip.write_all(&zeros).unwrap();
    }
    drop(zeros);
    zip.finish().unwrap();
    assert!(std::fs::metadata(&path).unwrap().len() < 4 << 20);
    let before = peak_rss_bytes();
    let c = fastdet::checkpoint::read_checkpoint(&path).unwrap();
    assert_eq!(c.get("w").unwrap().data, [1.0f32, 2.0, 3.0, 4.0]);
    let grew = peak_rss_bytes() - before;
    assert!(grew < 128 << 20, "reading the checkpoint raised the peak memory by {} MiB", grew >> 20);
}
