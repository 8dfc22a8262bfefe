//! Trilinear x2 upsampling with align_corners = False (PyTorch / MONAI semantics), done as three
//! separable linear passes. Output index o reads source coordinate max(0, (o + 0.5) / 2 - 0.5).

use rayon::prelude::*;

/// Upsamples one axis by 2: `src` is `[outer, len, inner]`, `dst` is `[outer, 2*len, inner]`.
fn upsample_axis(src: &[f32], outer: usize, len: usize, inner: usize, dst: &mut [f32]) {
    dst.par_chunks_mut(2 * len * inner).zip(src.par_chunks(len * inner)).for_each(|(d, s)| {
        for o in 0..2 * len {
            // Source coordinate (o + 0.5) / 2 - 0.5, clamped at 0; neighbours i0, i1 = min(i0+1, len-1).
            let (i0, i1, l1) = if o == 0 {
                (0, 0, 0.0f32)
            } else if o % 2 == 0 {
                (o / 2 - 1, o / 2, 0.75f32)
            } else {
                (o / 2, (o / 2 + 1).min(len - 1), 0.25f32)
            };
            let l0 = 1.0 - l1;
            let (a, b) = (&s[i0 * inner..(i0 + 1) * inner], &s[i1 * inner..(i1 + 1) * inner]);
            for ((dv, &av), &bv) in d[o * inner..(o + 1) * inner].iter_mut().zip(a).zip(b) {
                *dv = l0 * av + l1 * bv;
            }
        }
    });
    let _ = outer;
}

/// `x` is `[nc, d, h, w]`; returns `[nc, 2d, 2h, 2w]`.
pub fn upsample2x(x: &[f32], nc: usize, dims: [usize; 3]) -> Vec<f32> {
    let [d, h, w] = dims;
    // Each pass writes every value of its output.
    let mut a = super::pool::for_overwrite(nc * d * h * 2 * w);
    upsample_axis(x, nc * d * h, w, 1, &mut a);
    let mut b = super::pool::for_overwrite(nc * d * 2 * h * 2 * w);
    upsample_axis(&a, nc * d, h, 2 * w, &mut b);
    super::pool::release(a);
    let mut c = super::pool::for_overwrite(nc * 2 * d * 2 * h * 2 * w);
    upsample_axis(&b, nc, d, 4 * h * w, &mut c);
    super::pool::release(b);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PyTorch's formula for one axis, written out directly.
    fn src_index(o: usize, len: usize) -> (usize, usize, f64) {
        let s = ((o as f64 + 0.5) / 2.0 - 0.5).max(0.0);
        let i0 = s.floor() as usize;
        let i1 = (i0 + 1).min(len - 1);
        (i0, i1, s - i0 as f64)
    }

    #[test]
    fn matches_trilinear_formula_including_borders() {
        let dims = [2, 3, 5];
        let x: Vec<f32> = (0..30).map(|i| ((i * 7919) % 31) as f32 * 0.1 - 1.0).collect();
        let y = upsample2x(&x, 1, dims);
        let (od, oh, ow) = (4, 6, 10);
        for z in 0..od {
            for yy in 0..oh {
                for xx in 0..ow {
                    let (z0, z1, lz) = src_index(z, 2);
                    let (y0, y1, ly) = src_index(yy, 3);
                    let (x0, x1, lx) = src_index(xx, 5);
                    let g = |a: usize, b: usize, c: usize| x[(a * 3 + b) * 5 + c] as f64;
                    let mut want = 0.0;
                    for (zi, wz) in [(z0, 1.0 - lz), (z1, lz)] {
                        for (yi, wy) in [(y0, 1.0 - ly), (y1, ly)] {
                            for (xi, wx) in [(x0, 1.0 - lx), (x1, lx)] {
                                want += wz * wy * wx * g(zi, yi, xi);
                            }
                        }
                    }
                    let got = y[(z * oh + yy) * ow + xx] as f64;
                    assert!((got - want).abs() < 1e-6, "({z},{yy},{xx}) {got} vs {want}");
                }
            }
        }
        // Corners copy the corner voxel exactly.
        assert_eq!(y[0], x[0]);
        assert_eq!(y[y.len() - 1], x[29]);
    }
}
