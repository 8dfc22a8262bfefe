//! Hand-built `torch.save` pickles for the checkpoint reader's tests.

/// A pickle BININT (`J`) or, beyond 32 bits, LONG1 of 8 bytes.
fn pint(v: i64) -> Vec<u8> {
    if let Ok(v) = i32::try_from(v) {
        let mut b = vec![b'J'];
        b.extend(v.to_le_bytes());
        b
    } else {
        let mut b = vec![0x8a, 8];
        b.extend(v.to_le_bytes());
        b
    }
}

fn pstr(s: &str) -> Vec<u8> {
    let mut b = vec![b'X'];
    b.extend((s.len() as u32).to_le_bytes());
    b.extend(s.as_bytes());
    b
}

fn ptuple(items: &[i64]) -> Vec<u8> {
    let mut b = vec![b'('];
    for &i in items {
        b.extend(pint(i));
    }
    b.push(b't');
    b
}

/// `{'w': _rebuild_tensor_v2(('storage', FloatStorage, '0', 'cpu', numel), offset, shape, stride)}`
/// as `torch.save` pickles it (protocol 2).
pub fn tensor_pickle(numel: i64, offset: i64, shape: &[i64], stride: &[i64]) -> Vec<u8> {
    let mut b = b"\x80\x02}".to_vec();
    b.extend(pstr("w"));
    b.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
    b.push(b'(');
    b.extend(pstr("storage"));
    b.extend(b"ctorch\nFloatStorage\n");
    b.extend(pstr("0"));
    b.extend(pstr("cpu"));
    b.extend(pint(numel));
    b.extend(b"tQ");
    b.extend(pint(offset));
    b.extend(ptuple(shape));
    b.extend(ptuple(stride));
    b.extend(b"\x89)tRs.");
    b
}
