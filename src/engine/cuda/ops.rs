//! One typed wrapper per kernel of `kernels/*.cu`: checks the shape limits stated in each file's
//! header, computes the launch geometry the kernel expects (fixed block sizes where the kernel's
//! reduction order depends on them) and passes the arguments in the kernel's order and C types.
//! Pointers are device addresses; `None` passes `nullptr`.

use anyhow::{bail, Context, Result};

use super::gpu::{Arg, DevBuf, Gpu};
use crate::model::graph::Act;

/// `graph::Act` as the kernels' (code, parameter): 0 none, 1 relu, 2 leaky relu(p), 3 silu,
/// 4 sigmoid, 5 tanh(x) * p.
pub fn act_code(a: Act) -> (i32, f32) {
    match a {
        Act::None => (0, 0.0),
        Act::Relu => (1, 0.0),
        Act::LeakyRelu(s) => (2, s),
        Act::Silu => (3, 0.0),
        Act::Sigmoid => (4, 0.0),
        Act::TanhScale(s) => (5, s),
    }
}

fn opt(p: Option<u64>) -> Arg {
    Arg::Ptr(p.unwrap_or(0))
}

const I31: usize = i32::MAX as usize;

/// Blocks for a grid-stride loop over `items` with `threads` per block (capped; the loop covers the rest).
fn gs_blocks(items: usize, threads: usize) -> u32 {
    items.div_ceil(threads).clamp(1, 65535) as u32
}

/// Whether every device address is 16-byte aligned: the elementwise kernels then step 8 halves
/// at a time (common.cuh `fd_aligned16`), and their grids are sized for that.
fn aligned16(ptrs: &[u64]) -> bool {
    ptrs.iter().all(|p| p.is_multiple_of(16))
}

fn check_i31(what: &str, v: usize) -> Result<()> {
    if v > I31 {
        bail!("{what} = {v} exceeds the kernels' 32-bit index range; use smaller tiles");
    }
    Ok(())
}

/// A 3-D volume's element count.
pub fn vol(d: [usize; 3]) -> usize {
    d[0] * d[1] * d[2]
}

// ---------------------------------------------------------------------------------------------- layout.cu

/// `dst[n, v, c] = fp16(src[n, c, v])` (NCDHW f32 → NDHWC fp16).
pub fn to_ndhwc_f16(g: &Gpu, src: u64, dst: u64, n: usize, c: usize, vol: usize) -> Result<()> {
    transpose(g, "ncdhw_f32_to_ndhwc_f16", src, dst, n, c, vol)
}

/// `dst[n, c, v] = f32(src[n, v, c])` (NDHWC fp16 → NCDHW f32).
pub fn to_ncdhw_f32(g: &Gpu, src: u64, dst: u64, n: usize, c: usize, vol: usize) -> Result<()> {
    transpose(g, "ndhwc_f16_to_ncdhw_f32", src, dst, n, c, vol)
}

/// The two layout kernels' launch: 32x32 (voxel, channel) tiles per block, one grid z per sample.
fn transpose(g: &Gpu, kernel: &str, src: u64, dst: u64, n: usize, c: usize, vol: usize) -> Result<()> {
    if n == 0 || c == 0 || vol == 0 {
        return Ok(());
    }
    if n > 65535 || c.div_ceil(32) > 65535 {
        bail!("{kernel}: {n} samples x {c} channels is too many for one launch");
    }
    check_i31("voxels / 32", vol.div_ceil(32))?;
    let grid = (vol.div_ceil(32) as u32, c.div_ceil(32) as u32, n as u32);
    g.launch(kernel, grid, (32, 8, 1), &[Arg::Ptr(src), Arg::Ptr(dst), Arg::I32(c as i32), Arg::I64(vol as i64)])
}

/// `dst[i] = fp16(src[i])` for `n` values (round to nearest even).
pub fn f32_to_f16(g: &Gpu, src: u64, dst: u64, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    g.launch("f32_to_f16", (gs_blocks(n, 256), 1, 1), (256, 1, 1), &[Arg::Ptr(src), Arg::Ptr(dst), Arg::I64(n as i64)])
}

/// `t` windows of `window` voxels at the voxel origins `origins` (device `[t, 3]` i32) of the fp16
/// volume `dims`, zero past the end, into fp16 `dst [t, window]`.
pub fn extract_tiles(g: &Gpu, volume: u64, dims: [usize; 3], origins: u64, t: usize, window: [usize; 3], dst: u64) -> Result<()> {
    if t == 0 {
        return Ok(());
    }
    if t > 65535 {
        bail!("extract_tiles_f16: {t} windows in one launch (max 65535)");
    }
    for v in dims.iter().chain(window.iter()) {
        check_i31("extent", *v)?;
    }
    let a = [
        Arg::Ptr(volume),
        Arg::I32(dims[0] as i32),
        Arg::I32(dims[1] as i32),
        Arg::I32(dims[2] as i32),
        Arg::Ptr(origins),
        Arg::I32(window[0] as i32),
        Arg::I32(window[1] as i32),
        Arg::I32(window[2] as i32),
        Arg::Ptr(dst),
    ];
    g.launch("extract_tiles_f16", (gs_blocks(vol(window), 256), t as u32, 1), (256, 1, 1), &a)
}

/// `dst[r, c_off + c] = src[r, c]`, `rows` rows, `cs` source channels, `cd` destination channels.
pub fn copy_channels(g: &Gpu, src: u64, dst: u64, rows: usize, cs: usize, cd: usize, c_off: usize) -> Result<()> {
    if c_off + cs > cd {
        bail!("copy_channels_f16: channels {c_off}..{} do not fit in {cd}", c_off + cs);
    }
    if rows == 0 || cs == 0 {
        return Ok(());
    }
    let a = [Arg::Ptr(src), Arg::Ptr(dst), Arg::I64(rows as i64), Arg::I32(cs as i32), Arg::I32(cd as i32), Arg::I32(c_off as i32)];
    let per_thread = if (cs | cd | c_off).is_multiple_of(8) && aligned16(&[src, dst]) { 8 } else { 1 };
    g.launch("copy_channels_f16", (gs_blocks(rows * cs / per_thread, 256), 1, 1), (256, 1, 1), &a)
}

// ---------------------------------------------------------------------------------------------- convolutions

/// Most output channels of `conv3d_c1_k3_f16` (CF_MAX_COUT).
pub const CONV_FIRST_MAX_COUT: usize = 64;

/// The 1-input-channel 3x3x3 stride-1 pad-1 convolution: `x [n, dims]` fp16, `w [cout, 27]` f32.
#[allow(clippy::too_many_arguments)]
pub fn conv_first(g: &Gpu, x: u64, w: u64, bias: Option<u64>, out: u64, n: usize, dims: [usize; 3], cout: usize, act: Act) -> Result<()> {
    if cout == 0 || cout > CONV_FIRST_MAX_COUT || !cout.is_multiple_of(2) {
        bail!("conv3d_c1_k3_f16 needs an even output width <= {CONV_FIRST_MAX_COUT}, got {cout}");
    }
    let [d, h, wd] = dims;
    let zb = d.div_ceil(2);
    if n * zb > 65535 || h.div_ceil(4) > 65535 {
        bail!("conv3d_c1_k3_f16: {n} tiles of {dims:?} exceed the launch grid");
    }
    check_i31("output elements", n * vol(dims) * cout)?;
    let (ac, ap) = act_code(act);
    let a = [
        Arg::Ptr(x),
        Arg::Ptr(w),
        opt(bias),
        Arg::Ptr(out),
        Arg::I32(d as i32),
        Arg::I32(h as i32),
        Arg::I32(wd as i32),
        Arg::I32(cout as i32),
        Arg::I32(ac),
        Arg::F32(ap),
    ];
    g.launch("conv3d_c1_k3_f16", (wd.div_ceil(32) as u32, h.div_ceil(4) as u32, (n * zb) as u32), (32, 4, 2), &a)
}

/// Output dims of a cubic convolution.
pub fn conv_out_dims(dims: [usize; 3], k: usize, stride: usize, pad: usize) -> [usize; 3] {
    dims.map(|l| (l + 2 * pad).saturating_sub(k) / stride + 1)
}

/// One cubic convolution's geometry: `n` samples of `dims` voxels and `cin` channels in, `cout`
/// out, kernel `k`, `stride`, `pad` on every side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    pub n: usize,
    pub dims: [usize; 3],
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvShape {
    pub fn out_dims(&self) -> [usize; 3] {
        conv_out_dims(self.dims, self.k, self.stride, self.pad)
    }

    /// Output voxels per sample.
    pub fn out_vol(&self) -> usize {
        vol(self.out_dims())
    }

    /// The implicit GEMM's rows (output voxels of every sample) and depth (k^3 cin).
    pub fn gemm_mk(&self) -> (usize, usize) {
        (self.n * self.out_vol(), self.k * self.k * self.k * self.cin)
    }
}

/// The implicit-GEMM kernels' shape checks (64-wide output-channel tiles, 32-bit indices) and
/// their shared arguments `N, D, H, W, Cin, Cout, k, stride, pad, OD, OH, OW`; also the GEMM's
/// row count M (output voxels).
fn igemm_shape(kernel: &str, s: ConvShape) -> Result<(usize, [Arg; 12])> {
    let ConvShape { n, dims, cin, cout, k, stride, pad } = s;
    if cin == 0 || cout == 0 || k == 0 || stride == 0 {
        bail!("{kernel}: empty shape");
    }
    let o = s.out_dims();
    let (m, depth) = s.gemm_mk();
    check_i31("output voxels", m)?;
    check_i31("input elements", n * vol(dims) * cin)?;
    check_i31("output elements", m * cout)?;
    check_i31("K", depth)?;
    // The tensor-core loads form a tap's offset from the window corner in 32 bits, up to three
    // taps past the last (the tail step's chunks past K, 8 channels each when Cin is 8: for
    // k = 1, tap depth 3).
    check_i31("(k + 3) * H * W * Cin", (k + 3) * dims[1] * dims[2] * cin)?;
    if cout.div_ceil(64) > 65535 {
        bail!("{kernel}: {cout} output channels");
    }
    let i = |v: usize| Arg::I32(v as i32);
    Ok((m, [i(n), i(dims[0]), i(dims[1]), i(dims[2]), i(cin), i(cout), i(k), i(stride), i(pad), i(o[0]), i(o[1]), i(o[2])]))
}

/// The generic implicit-GEMM convolution (no cuDNN): `x [n, dims, cin]` fp16, `w [cout, k, k, k,
/// cin]` fp16, bias f32, out `[n, out dims, cout]` fp16.
pub fn conv_direct(g: &Gpu, x: u64, w: u64, bias: Option<u64>, out: u64, s: ConvShape, act: Act) -> Result<()> {
    let (m, shape) = igemm_shape("conv3d_igemm_f16", s)?;
    let cout = s.cout;
    let (ac, ap) = act_code(act);
    let mut a = vec![Arg::Ptr(x), Arg::Ptr(w), opt(bias), Arg::Ptr(out)];
    a.extend_from_slice(&shape);
    a.extend_from_slice(&[Arg::I32(ac), Arg::F32(ap)]);
    g.launch("conv3d_igemm_f16", (m.div_ceil(64) as u32, cout.div_ceil(64) as u32, 1), (256, 1, 1), &a)
}

/// The previous GroupNorm / InstanceNorm applied while a conv loads its input
/// (`conv3d_tc_f16`): `params` is norm_finalize's `[n][cin][3]` (mean, scale, shift).
#[derive(Debug, Clone, Copy)]
pub struct NormPrologue {
    pub params: u64,
    pub pre: Act,
    pub post: Act,
}

/// One instantiation of conv_tc.cu: its conv and split-K reduce kernels and its block tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcVariant {
    pub kernel: &'static str,
    /// The same tile loading through cp.async (three stages), for a conv that applies no norm in
    /// its loads and whose Cin is a multiple of 8.
    pub kernel_async: &'static str,
    /// The split-K reduce; its block tile is `store_rows x cols`.
    pub reduce: &'static str,
    /// Output voxels per block.
    pub rows: usize,
    /// Output channels per block.
    pub cols: usize,
    /// Output voxels per pass of the store: the unit of the statistics and the reduce's rows.
    pub store_rows: usize,
    /// Whether `conv_tc` takes `kernel_async` where it can (`with_async_loads`).
    pub async_loads: bool,
    /// Whether `conv_tc` runs the halo-tile kernels where a shape allows them (`with_halo`,
    /// `halo_fits`).
    pub halo: bool,
}

impl TcVariant {
    /// This tile, loading through cp.async where a conv allows it when `on`.
    pub fn with_async_loads(self, on: bool) -> TcVariant {
        TcVariant { async_loads: on, ..self }
    }

    /// This tile, with the halo-tile kernels where a shape allows them when `on`.
    pub fn with_halo(self, on: bool) -> TcVariant {
        TcVariant { halo: on, ..self }
    }

    /// Whether `conv_tc` runs shape `s` on a halo-tile kernel (`halo_kernel`).
    pub fn runs_halo(&self, s: ConvShape) -> bool {
        self.halo && halo_fits(s)
    }

    /// The kernel `conv_tc` launches for input `x` and weights `w` (device addresses), with or
    /// without a norm in its loads.
    pub fn kernel_for(&self, s: ConvShape, x: u64, w: u64, norm_in_loads: bool) -> &'static str {
        if self.runs_halo(s) && (x | w).is_multiple_of(16) {
            halo_kernel(s.cout)
        } else if self.async_loads && !norm_in_loads && s.cin.is_multiple_of(8) && (x | w).is_multiple_of(16) {
            self.kernel_async
        } else {
            self.kernel
        }
    }
}

/// The instantiations, by name (the emulator looks them up here too).
pub const TC_VARIANTS: [TcVariant; 3] = [
    TcVariant { kernel: "conv3d_tc_f16", kernel_async: "conv3d_tc_async_f16", reduce: "conv3d_tc_reduce_f16", rows: 64, cols: 64, store_rows: 64, async_loads: false, halo: false },
    TcVariant { kernel: "conv3d_tc_n32_f16", kernel_async: "conv3d_tc_n32_async_f16", reduce: "conv3d_tc_n32_reduce_f16", rows: 128, cols: 32, store_rows: 128, async_loads: false, halo: false },
    TcVariant { kernel: "conv3d_tc_m128_f16", kernel_async: "conv3d_tc_m128_async_f16", reduce: "conv3d_tc_reduce_f16", rows: 128, cols: 64, store_rows: 64, async_loads: false, halo: false },
];

/// Output voxels (z, y, x) of a halo-tile block (conv_tc.cu's `conv3d_tc_halo`).
pub const HALO_BRICK: [usize; 3] = [2, 4, 16];
/// Output channels of a halo-tile block.
pub const HALO_COLS: usize = 32;

/// Whether the halo-tile kernels run shape `s`: 3x3x3, stride 1, padding 1, Cin a multiple of 16,
/// output dims that whole 2 x 4 x 16 bricks tile (the statistics units stay whole) and at most
/// 65535 blocks of 32 output channels (the grid's y).
pub fn halo_fits(s: ConvShape) -> bool {
    let o = s.out_dims();
    s.k == 3
        && s.stride == 1
        && s.pad == 1
        && s.cin > 0
        && s.cin.is_multiple_of(16)
        && (1..=65535 * HALO_COLS).contains(&s.cout)
        && (0..3).all(|a| o[a] > 0 && o[a].is_multiple_of(HALO_BRICK[a]))
}

/// The halo-tile kernel for `cout` output channels: its statistics unit is `conv_tc_stats_rows`'s
/// (the whole 128-voxel brick for at most 32 channels, else one 64-voxel z-slab of it).
pub fn halo_kernel(cout: usize) -> &'static str {
    if conv_tc_stats_rows(cout) == 128 {
        "conv3d_tc_halo_f16"
    } else {
        "conv3d_tc_halo_s64_f16"
    }
}

/// The halo-tile kernels, by name (the emulator looks them up here).
pub const HALO_KERNELS: [&str; 2] = ["conv3d_tc_halo_f16", "conv3d_tc_halo_s64_f16"];

/// Which block tiles the tensor-core convolutions use (`FASTDET_TC_TILES`). Either way a conv
/// with at most 32 output channels takes the 128 x 32 tile (a 64-wide one would be half
/// padding) and the statistics unit is the same, so the choice changes speed only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcTiles {
    /// 64 x 64 blocks of 4 warps of 32 x 32 (the default).
    #[default]
    Standard,
    /// 128 x 64 blocks of 4 warps of 64 x 32 for more than 32 output channels: a quarter fewer
    /// fragment loads per MMA and global loads per output, for 166-178 registers a thread
    /// instead of 124-126 and half the blocks (a GPU measurement decides).
    Wide,
}

impl TcTiles {
    /// `FASTDET_TC_TILES` = standard | wide (default standard).
    pub fn from_env() -> Result<TcTiles> {
        super::env_choice("FASTDET_TC_TILES", &[("standard", TcTiles::Standard), ("wide", TcTiles::Wide)])
    }

    /// conv_tc.cu's instantiation for `cout` output channels.
    pub fn variant(self, cout: usize) -> TcVariant {
        match self {
            _ if cout <= 32 => TC_VARIANTS[1],
            TcTiles::Standard => TC_VARIANTS[0],
            TcTiles::Wide => TC_VARIANTS[2],
        }
    }
}

/// Output voxels per block of the statistics `conv_tc` writes for `cout` channels: its store's
/// pass, the same for every tile choice.
pub fn conv_tc_stats_rows(cout: usize) -> usize {
    TcTiles::Standard.variant(cout).store_rows
}

/// Statistics blocks per sample that `conv_tc`'s epilogue writes for an output of `ovol` voxels
/// per sample and `cout` channels: `Some(ovol / rows)` when every block of
/// `conv_tc_stats_rows(cout)` output voxels lies in one sample, else `None` (the norm then
/// reduces the output itself).
pub fn conv_tc_stats_blocks(ovol: usize, cout: usize) -> Option<usize> {
    let rows = conv_tc_stats_rows(cout);
    (ovol > 0 && ovol.is_multiple_of(rows)).then_some(ovol / rows)
}

/// Most K splits of one tensor-core convolution: `FASTDET_TC_SPLIT_K` (1 turns split K off),
/// default 16.
fn tc_max_splits() -> usize {
    std::env::var("FASTDET_TC_SPLIT_K").ok().and_then(|v| v.parse().ok()).filter(|&v: &usize| v >= 1).unwrap_or(16)
}

/// `(splits, k-steps per split)` of K for a tensor-core convolution on tile `v` with `m` output
/// voxels, `cout` channels and K = `k_total` on `sms` multiprocessors: one split when the grid already has a
/// block per multiprocessor; else enough splits for about two blocks per multiprocessor, each at
/// least 8 k-steps (256 deep) and none empty. The deep levels of a tile (a few hundred voxels,
/// hundreds of channels) would otherwise leave most of the device idle.
pub fn conv_tc_splits(v: TcVariant, m: usize, cout: usize, k_total: usize, sms: usize) -> (usize, usize) {
    let blocks = m.div_ceil(v.rows) * cout.div_ceil(v.cols);
    let steps = k_total.div_ceil(32).max(1);
    if sms == 0 || blocks >= sms {
        return (1, steps);
    }
    let want = (2 * sms).div_ceil(blocks).min(steps / 8).min(tc_max_splits()).max(1);
    let span = steps.div_ceil(want);
    (steps.div_ceil(span), span)
}

/// How `conv_tc` launches a shape on tile `v` on `g`: `(grid x, grid y, splits, k-steps per
/// split, bytes of the split-K buffer, 0 when it does not split)`.
fn conv_tc_launch(g: &Gpu, v: TcVariant, s: ConvShape) -> (usize, usize, usize, usize, usize) {
    let (m, depth) = s.gemm_mk();
    if v.runs_halo(s) {
        // A block per brick and 32 channels; never split (the bricks of the shapes it takes
        // fill the device).
        return (m / vol(HALO_BRICK), s.cout.div_ceil(HALO_COLS), 1, depth.div_ceil(32), 0);
    }
    let (gx, gy) = (m.div_ceil(v.rows), s.cout.div_ceil(v.cols));
    let (splits, span) = conv_tc_splits(v, m, s.cout, depth, g.info.multiprocessors.max(0) as usize);
    let bytes = if splits > 1 { splits * gx * v.rows * gy * v.cols * 4 } else { 0 };
    (gx, gy, splits, span, bytes)
}

/// Bytes of the f32 buffer `conv_tc` needs for its K splits on tile `v` on `g` (0 when it does
/// not split).
pub fn conv_tc_splitk_bytes(g: &Gpu, v: TcVariant, s: ConvShape) -> usize {
    conv_tc_launch(g, v, s).4
}

/// Bytes of `conv_tc`'s statistics for `n` samples of `ovol` voxels and `cout` channels.
pub fn conv_tc_stats_bytes(n: usize, ovol: usize, cout: usize) -> Option<usize> {
    conv_tc_stats_blocks(ovol, cout).map(|b| n * b * cout * 2 * 4)
}

/// The tensor-core implicit-GEMM convolution: `x [n, dims, cin]` fp16, `w [cout, k, k, k, cin]`
/// fp16, bias f32, `residual` fp16 shaped like the output (may be `out`), `norm` applied to the
/// input first; out `[n, out dims, cout]` = act(conv + bias + residual) fp16. With `stats`
/// (`conv_tc_stats_bytes` bytes; `conv_tc_stats_blocks` must be `Some`), the per-block channel
/// statistics of `out` for `norm_params_from_tiles`. `splitk`: the buffer for its K splits
/// (`conv_tc_splitk_bytes`; allocated here when `None` or too small). `v`: the block tile
/// (`TcTiles::variant`; any works for any shape), and with `v.halo` the halo-tile kernels for
/// the shapes they take (`halo_fits`). Needs sm_70+.
#[allow(clippy::too_many_arguments)]
pub fn conv_tc(
    g: &Gpu,
    v: TcVariant,
    x: u64,
    w: u64,
    bias: Option<u64>,
    residual: Option<u64>,
    norm: Option<NormPrologue>,
    out: u64,
    stats: Option<u64>,
    splitk: Option<&DevBuf>,
    s: ConvShape,
    act: Act,
) -> Result<()> {
    let cout = s.cout;
    let kernel = v.kernel_for(s, x, w, norm.is_some());
    let (m, shape) = igemm_shape(kernel, s)?;
    let ovol = s.out_vol();
    if stats.is_some() {
        let unit = conv_tc_stats_rows(cout);
        if v.store_rows != unit {
            bail!("{kernel}: its statistics come in blocks of {} voxels, the norm reads blocks of {unit} for {cout} channels", v.store_rows);
        }
        if conv_tc_stats_blocks(ovol, cout).is_none() {
            bail!("{kernel}: statistics need an output volume divisible by {unit}, got {ovol}");
        }
    }
    let (ac, ap) = act_code(act);
    let (pre, pre_p) = act_code(norm.map_or(Act::None, |p| p.pre));
    let (post, post_p) = act_code(norm.map_or(Act::None, |p| p.post));
    // The halo kernels unless a pointer is not 16-byte aligned (then the implicit GEMM).
    let v = if kernel == halo_kernel(cout) { v } else { v.with_halo(false) };
    // Split K: the partial sums of each split go to a padded f32 buffer (the caller's, or one
    // freed stream-ordered after the reduce that finishes the store).
    let (gx, gy, splits, span, need) = conv_tc_launch(g, v, s);
    let own = match splitk {
        Some(b) if b.bytes >= need => None,
        _ if need > 0 => Some(g.alloc(need)?),
        _ => None,
    };
    let buf = if need == 0 { None } else { own.as_ref().or(splitk) };
    let mut a = vec![Arg::Ptr(x), Arg::Ptr(w), opt(bias), opt(residual), opt(norm.map(|p| p.params)), Arg::Ptr(out)];
    a.extend_from_slice(&shape);
    a.extend_from_slice(&[Arg::I32(pre), Arg::F32(pre_p), Arg::I32(post), Arg::F32(post_p), Arg::I32(ac), Arg::F32(ap), opt(stats)]);
    a.extend_from_slice(&[opt(buf.as_ref().map(|b| b.ptr)), Arg::I32(span as i32)]);
    g.launch(kernel, (gx as u32, gy as u32, splits as u32), (128, 1, 1), &a)?;
    let Some(buf) = buf else { return Ok(()) };
    debug_assert!(buf.bytes >= need);
    let i = |v: usize| Arg::I32(v as i32);
    let r = [Arg::Ptr(buf.ptr), i(splits), opt(bias), opt(residual), Arg::Ptr(out), opt(stats), i(m), i(ovol), i(cout), Arg::I32(ac), Arg::F32(ap)];
    // The reduce's block covers store_rows of the conv's rows.
    g.launch(v.reduce, ((gx * v.rows / v.store_rows) as u32, gy as u32, 1), (128, 1, 1), &r)
}

/// The kernel a kernel-2 stride-2 transposed convolution runs on (`FASTDET_CONVT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvtKernel {
    /// `conv_transpose2_tc_f16`: tensor cores, for Cin % 16 == 0, Cout % 8 == 0, 16-byte-aligned
    /// input and weights; other shapes fall back to `Fma`.
    TensorCore,
    /// `conv_transpose2_f16`: f32 FMAs on the CUDA cores, any shape.
    Fma,
}

impl ConvtKernel {
    /// `FASTDET_CONVT=tc|fma` (default tc).
    pub fn from_env() -> Result<ConvtKernel> {
        super::env_choice("FASTDET_CONVT", &[("tc", ConvtKernel::TensorCore), ("fma", ConvtKernel::Fma)])
    }

    /// The kernel that runs this shape when `self` is asked for: the tensor cores only where they fit.
    pub fn for_shape(self, cin: usize, cout: usize, x: u64, w: u64) -> ConvtKernel {
        let fits = cin.is_multiple_of(16) && cout.is_multiple_of(8) && (x | w).is_multiple_of(16);
        if self == ConvtKernel::TensorCore && fits {
            ConvtKernel::TensorCore
        } else {
            ConvtKernel::Fma
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ConvtKernel::TensorCore => "conv_transpose2_tc_f16",
            ConvtKernel::Fma => "conv_transpose2_f16",
        }
    }
}

/// The kernel-2 stride-2 transposed convolution into channels `[c_off, c_off + cout)` of an
/// output with `ctot` channels: `x [n, dims, cin]`, `w [cin, cout, 2, 2, 2]` fp16, on `kernel`
/// where the shape fits it (`ConvtKernel::for_shape`). Returns the kernel that ran.
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose2(g: &Gpu, kernel: ConvtKernel, x: u64, w: u64, out: u64, n: usize, dims: [usize; 3], cin: usize, cout: usize, ctot: usize, c_off: usize) -> Result<ConvtKernel> {
    let kernel = kernel.for_shape(cin, cout, x, w);
    let name = kernel.name();
    if c_off + cout > ctot {
        bail!("{name}: channels {c_off}..{} do not fit in {ctot}", c_off + cout);
    }
    let m = n * vol(dims);
    check_i31("input voxels", m)?;
    // Both kernels tile the 8 * cout columns 64 at a time.
    if (8 * cout).div_ceil(64) > 65535 {
        bail!("{name}: {cout} output channels");
    }
    let i = |v: usize| Arg::I32(v as i32);
    let a = [Arg::Ptr(x), Arg::Ptr(w), Arg::Ptr(out), i(n), i(dims[0]), i(dims[1]), i(dims[2]), i(cin), i(cout), i(ctot), i(c_off)];
    let threads = match kernel {
        ConvtKernel::TensorCore => 128,
        ConvtKernel::Fma => 256,
    };
    g.launch(name, (m.div_ceil(64) as u32, (8 * cout).div_ceil(64) as u32, 1), (threads, 1, 1), &a)?;
    Ok(kernel)
}

// ---------------------------------------------------------------------------------------------- elementwise

/// `y = act(x + bias[c])` over `elems` fp16 values with `c` channels (even); y may alias x.
pub fn bias_act(g: &Gpu, x: u64, y: u64, bias: Option<u64>, elems: usize, c: usize, act: Act) -> Result<()> {
    if !c.is_multiple_of(2) || !elems.is_multiple_of(c) {
        bail!("bias_act_f16 needs an even channel count dividing the element count ({elems} elements, {c} channels)");
    }
    let pairs = elems / 2;
    let (ac, ap) = act_code(act);
    let a = [Arg::Ptr(x), Arg::Ptr(y), opt(bias), Arg::I64(pairs as i64), Arg::I32(c as i32), Arg::I32(ac), Arg::F32(ap)];
    let per_thread = if c.is_multiple_of(8) && aligned16(&[x, y]) { 4 } else { 1 };
    g.launch("bias_act_f16", (gs_blocks(pairs / per_thread, 256), 1, 1), (256, 1, 1), &a)
}

/// `y = act(a + b)` over `elems` (even) fp16 values; y may alias a or b.
pub fn add_act(g: &Gpu, a: u64, b: u64, y: u64, elems: usize, act: Act) -> Result<()> {
    if !elems.is_multiple_of(2) {
        bail!("add_act_f16 needs an even element count, got {elems}");
    }
    let pairs = elems / 2;
    let (ac, ap) = act_code(act);
    let args = [Arg::Ptr(a), Arg::Ptr(b), Arg::Ptr(y), Arg::I64(pairs as i64), Arg::I32(ac), Arg::F32(ap)];
    let per_thread = if pairs.is_multiple_of(4) && aligned16(&[a, b, y]) { 4 } else { 1 };
    g.launch("add_act_f16", (gs_blocks(pairs / per_thread, 256), 1, 1), (256, 1, 1), &args)
}

// ---------------------------------------------------------------------------------------------- norm.cu

/// NORM_THREADS of norm.cu: the three norm kernels run with exactly this block size.
pub const NORM_THREADS: usize = 256;
/// NORM_MAX_CPG of norm.cu.
pub const NORM_MAX_CPG: usize = 512;

/// (voxels per stats block, number of blocks) for a volume: at most 1024 partials per sample,
/// at least 32 voxels per block. The deep levels are small (768 voxels at 12x8x8): blocks of
/// 256 voxels gave them three blocks on the whole device, each thread walking its voxels one
/// load after another; blocks of 32 give them 24.
pub fn norm_blocks(vol: usize) -> (usize, usize) {
    let per = vol.div_ceil(1024).max(32);
    (per, vol.div_ceil(per).max(1))
}

/// Scratch bytes `(partials, params)` that `norm` needs.
pub fn norm_scratch_bytes(n: usize, c: usize, vol: usize) -> (usize, usize) {
    let (_, nblk) = norm_blocks(vol);
    (n * nblk * c * 2 * 4, n * c * 3 * 4)
}

/// Checks the norm kernels' shape limits.
pub fn norm_check(c: usize, groups: usize, vol: usize) -> Result<()> {
    if c == 0 || !c.is_multiple_of(2) || c / 2 > NORM_THREADS {
        bail!("the norm kernels need an even channel count <= {}, got {c}", 2 * NORM_THREADS);
    }
    if groups == 0 || !c.is_multiple_of(groups) || c / groups > NORM_MAX_CPG {
        bail!("the norm kernels need groups dividing {c} with at most {NORM_MAX_CPG} channels per group, got {groups} groups");
    }
    check_i31("voxels x channels / 2", vol * c / 2)?;
    Ok(())
}

/// GroupNorm / InstanceNorm (groups = c, no affine) with activations before (`pre`) and after
/// (`post`): `x, y [n, vol, c]` fp16 (y may alias x); `partial` and `params` hold
/// `norm_scratch_bytes` bytes. Without `y` only the statistics are computed: `params` then holds
/// `[n][c][3]` (mean, scale, shift) for `NormPrologue`.
#[allow(clippy::too_many_arguments)]
pub fn norm(
    g: &Gpu,
    x: u64,
    y: Option<u64>,
    n: usize,
    c: usize,
    vol: usize,
    groups: usize,
    gamma: Option<u64>,
    beta: Option<u64>,
    pre: Act,
    post: Act,
    partial: u64,
    params: u64,
) -> Result<()> {
    norm_check(c, groups, vol)?;
    if n == 0 || vol == 0 {
        return Ok(());
    }
    if n > 65535 || groups > i32::MAX as usize {
        bail!("norm: {n} samples");
    }
    let (per, nblk) = norm_blocks(vol);
    let (pc, pp) = act_code(pre);
    let t = (NORM_THREADS as u32, 1, 1);
    g.launch(
        "norm_stats_partial",
        (nblk as u32, n as u32, 1),
        t,
        &[Arg::Ptr(x), Arg::I64(vol as i64), Arg::I32(c as i32), Arg::I32(per as i32), Arg::I32(pc), Arg::F32(pp), Arg::Ptr(partial)],
    )?;
    g.launch(
        "norm_finalize",
        (groups as u32, n as u32, 1),
        t,
        &[
            Arg::Ptr(x),
            Arg::Ptr(partial),
            Arg::I64(vol as i64),
            Arg::I32(c as i32),
            Arg::I32(groups as i32),
            Arg::I32(nblk as i32),
            Arg::I32(pc),
            Arg::F32(pp),
            opt(gamma),
            opt(beta),
            Arg::F32(crate::engine::cpu::norm::EPS as f32),
            Arg::Ptr(params),
        ],
    )?;
    // Without an output, the statistics only: the next conv applies them while loading
    // (conv3d_tc_f16's prologue).
    match y {
        Some(y) => norm_apply(g, x, y, n, c, vol, params, pre, post),
        None => Ok(()),
    }
}

/// `norm`'s statistics from `conv_tc`'s epilogue (`partial`, `conv_tc_stats_bytes` bytes of a
/// conv with `c` output channels) instead of a pass over the activation: `params` (`[n][c][3]`)
/// as `norm` writes them, no pre-activation.
#[allow(clippy::too_many_arguments)]
pub fn norm_params_from_tiles(g: &Gpu, partial: u64, n: usize, c: usize, vol: usize, groups: usize, gamma: Option<u64>, beta: Option<u64>, params: u64) -> Result<()> {
    norm_check(c, groups, vol)?;
    let rows = conv_tc_stats_rows(c);
    let nblk = conv_tc_stats_blocks(vol, c).with_context(|| format!("norm_finalize_tiles: volume {vol} is not a whole number of {rows}-voxel blocks"))?;
    if n == 0 {
        return Ok(());
    }
    if n > 65535 {
        bail!("norm: {n} samples");
    }
    g.launch(
        "norm_finalize_tiles",
        (groups as u32, n as u32, 1),
        (NORM_THREADS as u32, 1, 1),
        &[
            Arg::Ptr(partial),
            Arg::I64(vol as i64),
            Arg::I32(c as i32),
            Arg::I32(groups as i32),
            Arg::I32(nblk as i32),
            Arg::I32(rows as i32),
            opt(gamma),
            opt(beta),
            Arg::F32(crate::engine::cpu::norm::EPS as f32),
            Arg::Ptr(params),
        ],
    )
}

/// `y = post((pre(x) - mean) * scale + shift)` with `params` from `norm` or
/// `norm_params_from_tiles`; `x, y [n, vol, c]` fp16, y may alias x.
#[allow(clippy::too_many_arguments)]
pub fn norm_apply(g: &Gpu, x: u64, y: u64, n: usize, c: usize, vol: usize, params: u64, pre: Act, post: Act) -> Result<()> {
    norm_check(c, 1, vol)?;
    if n == 0 || vol == 0 {
        return Ok(());
    }
    let (pc, pp) = act_code(pre);
    let (qc, qp) = act_code(post);
    let per_thread = if c.is_multiple_of(8) && aligned16(&[x, y]) { 8 } else { 2 };
    g.launch(
        "norm_apply",
        (gs_blocks(vol * c / per_thread, NORM_THREADS), n as u32, 1),
        (NORM_THREADS as u32, 1, 1),
        &[Arg::Ptr(x), Arg::Ptr(y), Arg::I64(vol as i64), Arg::I32(c as i32), Arg::Ptr(params), Arg::I32(pc), Arg::F32(pp), Arg::I32(qc), Arg::F32(qp)],
    )
}

// ---------------------------------------------------------------------------------------------- resample.cu

/// Trilinear x2 upsampling of `x [n, dims, c]` (+ `skip [n, 2 dims, c]`) into `out`; out may alias skip.
pub fn upsample_add(g: &Gpu, x: u64, skip: Option<u64>, out: u64, n: usize, dims: [usize; 3], c: usize) -> Result<()> {
    if !c.is_multiple_of(2) {
        bail!("upsample2x_add_f16 needs an even channel count, got {c}");
    }
    if n > 65535 {
        bail!("upsample2x_add_f16: {n} samples");
    }
    let pairs = 8 * vol(dims) * c / 2;
    check_i31("output pairs per sample", pairs)?;
    if n == 0 || pairs == 0 {
        return Ok(());
    }
    let i = |v: usize| Arg::I32(v as i32);
    let per_thread = if c.is_multiple_of(8) && aligned16(&[x, skip.unwrap_or(0), out]) { 4 } else { 1 };
    g.launch("upsample2x_add_f16", (gs_blocks(pairs / per_thread, 256), n as u32, 1), (256, 1, 1), &[Arg::Ptr(x), opt(skip), Arg::Ptr(out), i(dims[0]), i(dims[1]), i(dims[2]), i(c)])
}

// ---------------------------------------------------------------------------------------------- heads.cu

/// HEAD_MAX_CIN / HEAD_MAX_COUT of heads.cu.
pub const HEAD_MAX_CIN: usize = 64;
pub const HEAD_MAX_COUT: usize = 8;

/// Whether `head_conv1x1_act_f32` takes this shape.
pub fn head_conv_fits(cin: usize, cout: usize) -> bool {
    cin > 0 && cin <= HEAD_MAX_CIN && cin.is_multiple_of(2) && cout > 0 && cout <= HEAD_MAX_COUT
}

/// The last 1x1x1 conv of a head: `x [n, vol, cin]` fp16, `w [cout, cin]` f32 → `out [n, cout, vol]` f32.
#[allow(clippy::too_many_arguments)]
pub fn head_conv(g: &Gpu, x: u64, w: u64, bias: Option<u64>, out: u64, n: usize, vol: usize, cin: usize, cout: usize, act: Act) -> Result<()> {
    if !head_conv_fits(cin, cout) {
        bail!("head_conv1x1_act_f32 needs an even input width <= {HEAD_MAX_CIN} and <= {HEAD_MAX_COUT} outputs, got {cin} -> {cout}");
    }
    if n > 65535 {
        bail!("head_conv1x1_act_f32: {n} samples");
    }
    if n == 0 || vol == 0 {
        return Ok(());
    }
    check_i31("voxel blocks", vol.div_ceil(256))?;
    let (ac, ap) = act_code(act);
    let a = [Arg::Ptr(x), Arg::Ptr(w), opt(bias), Arg::Ptr(out), Arg::I64(vol as i64), Arg::I32(cin as i32), Arg::I32(cout as i32), Arg::I32(ac), Arg::F32(ap)];
    g.launch("head_conv1x1_act_f32", (vol.div_ceil(256) as u32, n as u32, 1), (256, 1, 1), &a)
}

/// `out[n, c, v] = act(x[n, v, c])`: NDHWC fp16 → NCDHW f32 with an activation.
pub fn head_act(g: &Gpu, x: u64, out: u64, n: usize, vol: usize, c: usize, act: Act) -> Result<()> {
    check_i31("elements per sample", vol * c)?;
    if n > 65535 {
        bail!("head_act_f32: {n} samples");
    }
    if n == 0 || vol * c == 0 {
        return Ok(());
    }
    let (ac, ap) = act_code(act);
    let a = [Arg::Ptr(x), Arg::Ptr(out), Arg::I32(vol as i32), Arg::I32(c as i32), Arg::I32(ac), Arg::F32(ap)];
    g.launch("head_act_f32", (gs_blocks(vol * c, 256), n as u32, 1), (256, 1, 1), &a)
}

// ---------------------------------------------------------------------------------------------- ensemble.cu

/// `acc[i] += src[i]`, `len` f32.
pub fn ensemble_accumulate(g: &Gpu, acc: u64, src: u64, len: usize) -> Result<()> {
    g.launch("ensemble_accumulate_f32", (gs_blocks(len, 256), 1, 1), (256, 1, 1), &[Arg::Ptr(acc), Arg::Ptr(src), Arg::I64(len as i64)])
}

/// `acc += inverse_view(src)` for `[n, c, dims]` f32; view 0 plain, 1..3 flips of z, y, x,
/// 4..6 rot90 k = 1..3 in the yx plane; `vector`: the 3 channels are offsets (x, y, z).
pub fn ensemble_accumulate_view(g: &Gpu, acc: u64, src: u64, n: usize, c: usize, dims: [usize; 3], view: usize, vector: bool) -> Result<()> {
    if view > 6 {
        bail!("ensemble_accumulate_view_f32: view {view} (0..=6)");
    }
    if view >= 4 && dims[1] != dims[2] {
        bail!("ensemble_accumulate_view_f32: rot90 views need H == W, got {dims:?}");
    }
    let i = |v: usize| Arg::I32(v as i32);
    let a = [Arg::Ptr(acc), Arg::Ptr(src), i(n), i(c), i(dims[0]), i(dims[1]), i(dims[2]), i(view), Arg::I32(vector as i32)];
    g.launch("ensemble_accumulate_view_f32", (gs_blocks(n * c * vol(dims), 256), 1, 1), (256, 1, 1), &a)
}

/// `acc[i] /= count`.
pub fn ensemble_divide(g: &Gpu, acc: u64, len: usize, count: f32) -> Result<()> {
    g.launch("ensemble_divide_f32", (gs_blocks(len, 256), 1, 1), (256, 1, 1), &[Arg::Ptr(acc), Arg::I64(len as i64), Arg::F32(count)])
}

/// `dst[i] = (sum_k srcs[k][i]) / count`; `srcs` is a device array of `m` device pointers.
pub fn ensemble_mean(g: &Gpu, dst: u64, srcs: u64, m: usize, len: usize, count: f32) -> Result<()> {
    g.launch("ensemble_mean_f32", (gs_blocks(len, 256), 1, 1), (256, 1, 1), &[Arg::Ptr(dst), Arg::Ptr(srcs), Arg::I32(m as i32), Arg::I64(len as i64), Arg::F32(count)])
}

// ---------------------------------------------------------------------------------------------- blend.cu

/// Adds `t` weighted tiles (`tiles_s [t, cs, tile]`, `tiles_o [t, 3, tile]`, origins `[t, 3]` i32
/// cells) onto the accumulators of grid `grid`, over the cell box `[lo, lo + size)`.
#[allow(clippy::too_many_arguments)]
pub fn blend_tiles(
    g: &Gpu,
    acc_s: u64,
    acc_o: u64,
    counter: u64,
    cs: usize,
    grid: [usize; 3],
    tiles_s: u64,
    tiles_o: u64,
    weight: u64,
    origins: u64,
    t: usize,
    tile: [usize; 3],
    lo: [usize; 3],
    size: [usize; 3],
) -> Result<()> {
    for v in grid.iter().chain(tile.iter()).chain(lo.iter()).chain(size.iter()) {
        check_i31("extent", *v)?;
    }
    if vol(size) == 0 || t == 0 {
        return Ok(());
    }
    let i = |v: usize| Arg::I32(v as i32);
    let a = [
        Arg::Ptr(acc_s),
        Arg::Ptr(acc_o),
        Arg::Ptr(counter),
        i(cs),
        i(grid[0]),
        i(grid[1]),
        i(grid[2]),
        Arg::Ptr(tiles_s),
        Arg::Ptr(tiles_o),
        Arg::Ptr(weight),
        Arg::Ptr(origins),
        i(t),
        i(tile[0]),
        i(tile[1]),
        i(tile[2]),
        i(lo[0]),
        i(lo[1]),
        i(lo[2]),
        i(size[0]),
        i(size[1]),
        i(size[2]),
    ];
    g.launch("blend_tiles_f32", (gs_blocks(vol(size), 256), 1, 1), (256, 1, 1), &a)
}

/// `acc[c, i] = counter[i] > 0 ? acc[c, i] / counter[i] : 0` for `c` channels of `cells`.
pub fn blend_finish(g: &Gpu, acc: u64, counter: u64, c: usize, cells: usize) -> Result<()> {
    g.launch("blend_finish_f32", (gs_blocks(c * cells, 256), 1, 1), (256, 1, 1), &[Arg::Ptr(acc), Arg::Ptr(counter), Arg::I32(c as i32), Arg::I64(cells as i64)])
}

/// `dst[i] += src[i]`.
pub fn blend_merge(g: &Gpu, dst: u64, src: u64, len: usize) -> Result<()> {
    g.launch("blend_merge_f32", (gs_blocks(len, 256), 1, 1), (256, 1, 1), &[Arg::Ptr(dst), Arg::Ptr(src), Arg::I64(len as i64)])
}

// ---------------------------------------------------------------------------------------------- nms.cu

/// NMS_THREADS * NMS_ITEMS of nms.cu: cells per block.
pub const NMS_CELLS: usize = 256 * 8;

/// Blocks per class for `cells` cells.
pub fn nms_blocks(cells: usize) -> usize {
    cells.div_ceil(NMS_CELLS).max(1)
}

/// Candidates of every class of `scores [c, dims]` f32 (peaks >= thresholds[c]); device buffers:
/// `thresholds [c]` f32, `block_counts`/`block_offsets [c, nms_blocks]` u32, `totals [c]` u32,
/// `out_index`/`out_score [c, capacity]`.
#[allow(clippy::too_many_arguments)]
pub fn nms(
    g: &Gpu,
    scores: u64,
    c: usize,
    dims: [usize; 3],
    thresholds: u64,
    block_counts: u64,
    block_offsets: u64,
    totals: u64,
    capacity: usize,
    out_index: u64,
    out_score: u64,
) -> Result<()> {
    let cells = vol(dims);
    if cells >= u32::MAX as usize || capacity > u32::MAX as usize {
        bail!("nms: {cells} cells exceed the kernels' 32-bit index");
    }
    if c == 0 || cells == 0 {
        return Ok(());
    }
    if c > 65535 {
        bail!("nms: {c} classes");
    }
    let nblk = nms_blocks(cells);
    let i = |v: usize| Arg::I32(v as i32);
    g.launch("nms_count", (nblk as u32, c as u32, 1), (256, 1, 1), &[Arg::Ptr(scores), i(dims[0]), i(dims[1]), i(dims[2]), Arg::Ptr(thresholds), Arg::Ptr(block_counts)])?;
    g.launch("nms_scan", (c as u32, 1, 1), (1024, 1, 1), &[Arg::Ptr(block_counts), Arg::Ptr(block_offsets), Arg::Ptr(totals), i(nblk)])?;
    g.launch(
        "nms_write",
        (nblk as u32, c as u32, 1),
        (256, 1, 1),
        &[
            Arg::Ptr(scores),
            i(dims[0]),
            i(dims[1]),
            i(dims[2]),
            Arg::Ptr(thresholds),
            Arg::Ptr(block_offsets),
            Arg::U32(capacity as u32),
            Arg::Ptr(out_index),
            Arg::Ptr(out_score),
        ],
    )
}

/// The offsets `[3, cells]` f32 at each candidate `nms` wrote: `out_offsets [c, capacity, 3]`
/// from `totals [c]` and `out_index [c, capacity]`.
pub fn nms_gather_offsets(g: &Gpu, offsets: u64, cells: usize, c: usize, totals: u64, capacity: usize, out_index: u64, out_offsets: u64) -> Result<()> {
    if cells >= u32::MAX as usize || capacity > u32::MAX as usize {
        bail!("nms_gather_offsets: {cells} cells exceed the kernels' 32-bit index");
    }
    if c == 0 || capacity == 0 {
        return Ok(());
    }
    let nblk = capacity.div_ceil(256);
    g.launch(
        "nms_gather_offsets",
        (nblk as u32, c as u32, 1),
        (256, 1, 1),
        &[Arg::Ptr(offsets), Arg::U32(cells as u32), Arg::Ptr(totals), Arg::Ptr(out_index), Arg::U32(capacity as u32), Arg::Ptr(out_offsets)],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The norm statistics' blocks cover the volume, at most 1024 of them, at least 32 voxels
    /// each; small deep levels get more than a handful of blocks.
    #[test]
    fn norm_statistics_blocks_cover_the_volume_and_spread_small_ones() {
        for vol in [1, 31, 32, 33, 96, 768, 6144, 49152, 262144, 262145, 192 * 128 * 128] {
            let (per, nblk) = norm_blocks(vol);
            assert!(per >= 32 && (1..=1024).contains(&nblk), "{vol}: {per} x {nblk}");
            assert!(per * nblk >= vol && per * (nblk - 1) < vol, "{vol}: {per} x {nblk} must cover it, no block empty");
        }
        assert_eq!(norm_blocks(768), (32, 24), "DynUNet's 12x8x8 level");
        assert_eq!(norm_blocks(6144), (32, 192), "24x16x16");
        assert_eq!(norm_blocks(192 * 128 * 128), (3072, 1024), "a full 192x128x128 tile, as before");
    }

    #[test]
    fn split_k_fills_small_grids_and_never_leaves_a_split_empty() {
        // A 192x128x128 tile's first level: the grid fills any card, no split.
        assert_eq!(conv_tc_splits(TC_VARIANTS[0], 96 * 64 * 64, 32, 27 * 32, 132), (1, 27));
        // DynUNet's bottleneck (6x4x4 voxels, 320 channels) on 132 multiprocessors: 10 blocks,
        // split 16 ways (the cap), 17 k-steps each.
        assert_eq!(conv_tc_splits(TC_VARIANTS[0], 96, 320, 27 * 320, 132), (16, 17));
        // No multiprocessor count (unknown device), or K too short to split: one split.
        assert_eq!(conv_tc_splits(TC_VARIANTS[0], 96, 320, 27 * 320, 0), (1, 270));
        assert_eq!(conv_tc_splits(TC_VARIANTS[0], 64, 64, 64, 132), (1, 2));
        for m in [1, 60, 64, 96, 300, 768, 5000] {
            for cout in [16, 32, 48, 320] {
                for k_total in [27, 27 * 16, 27 * 80, 27 * 320, 27 * 640] {
                    for sms in [1, 40, 132] {
                        let (splits, span) = conv_tc_splits(TcTiles::Standard.variant(cout), m, cout, k_total, sms);
                        let steps = k_total.div_ceil(32);
                        assert!((1..=16).contains(&splits) && span >= 1, "{m} {cout} {k_total} {sms}");
                        assert!((splits - 1) * span < steps && splits * span >= steps, "{m} {cout} {k_total} {sms}: {splits} x {span} for {steps}");
                        assert!(splits == 1 || span >= 8, "{m} {cout} {k_total} {sms}: splits of {span} k-steps");
                    }
                }
            }
        }
    }

    /// The halo tiles take the 3x3x3 stride-1 convs of the seed levels down to 24x16x16 and
    /// nothing else; their kernel's statistics unit is the one the norm reads; a pointer they
    /// cannot load from sends the conv back to the implicit GEMM.
    #[test]
    fn halo_tiles_take_whole_bricks_of_3x3x3_stride_1_convs() {
        let conv = |dims: [usize; 3], cin: usize, cout: usize, k: usize, stride: usize| ConvShape { n: 1, dims, cin, cout, k, stride, pad: k / 2 };
        for (dims, c) in [([192, 128, 128], 32), ([96, 64, 64], 64), ([48, 32, 32], 128), ([24, 16, 16], 256), ([24, 16, 16], 320)] {
            assert!(halo_fits(conv(dims, c, c, 3, 1)), "{dims:?} {c}");
        }
        // 8 voxels in x, 2 in z, Cin % 16, a strided or pointwise conv: not theirs.
        assert!(!halo_fits(conv([12, 8, 8], 320, 320, 3, 1)));
        assert!(!halo_fits(conv([1, 4, 16], 32, 32, 3, 1)));
        assert!(!halo_fits(conv([2, 4, 16], 8, 32, 3, 1)));
        assert!(!halo_fits(conv([4, 8, 32], 32, 64, 3, 2)));
        assert!(!halo_fits(conv([2, 4, 16], 32, 32, 1, 1)));
        // Each entry point instantiates the unit its name promises (the host and the emulator
        // take the unit from the name): the brick's 128 voxels, or 64 for the _s64_ one.
        let src = crate::engine::cuda::kernels::SOURCES.iter().find(|(f, _)| *f == "conv_tc.cu").unwrap().1;
        for (kernel, unit) in [(HALO_KERNELS[0], 128), (HALO_KERNELS[1], 64)] {
            let entry = &src[src.find(&format!("\n{kernel}(")).unwrap()..];
            let body = &entry[entry.find('{').unwrap()..];
            assert!(body.trim_start_matches('{').trim_start().starts_with(&format!("conv3d_tc_halo<{unit}>(")), "{kernel}: {}", &body[..80]);
        }
        for (cout, kernel) in [(8, 0), (32, 0), (33, 1), (64, 1), (320, 1)] {
            assert_eq!(halo_kernel(cout), HALO_KERNELS[kernel], "{cout}");
            assert_eq!(conv_tc_stats_rows(cout), [128, 64][kernel], "{cout}");
        }
        assert!(!halo_fits(conv([2, 4, 16], 32, 65535 * 32 + 1, 3, 1)));
        let s = conv([4, 8, 32], 32, 48, 3, 1);
        let v = TcTiles::Standard.variant(48);
        assert_eq!(v.with_halo(true).kernel_for(s, 256, 512, true), "conv3d_tc_halo_s64_f16");
        assert_eq!(v.with_halo(true).kernel_for(s, 256 + 8, 512, false), v.kernel);
        assert_eq!(v.kernel_for(s, 256, 512, false), v.kernel);
        assert!(v.with_halo(true).runs_halo(s) && !v.runs_halo(s));
    }
}
