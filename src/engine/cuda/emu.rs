//! A host emulator of the CUDA kernels (testing only).
//!
//! Device memory is a map of host byte blocks (real host addresses, guard bands around each);
//! each kernel of `kernels/*.cu` is re-implemented here from its header comment (layouts,
//! argument order, the launch geometry the kernel expects, fp16 storage with round-to-nearest-
//! even). The launcher
//! (`Gpu::launch`) has already checked the argument kinds against the `.cu` signatures, so running
//! the engine and the self-test on the emulator exercises everything but the CUDA code itself:
//! argument order and types, buffer sizes and aliasing, layouts, launch grids, fusion decisions.
//! Out-of-bounds accesses are errors. It is not a model of CUDA's arithmetic beyond fp16 rounding.
//!
//! `Emu::with_host_kernels` runs the kernels' own source instead (`host_kernels`): then the CUDA
//! code itself is exercised too, and writes out of bounds show in the guard bands.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{bail, ensure, Context, Result};
use half::f16;

use super::gpu::Arg;
use super::host_kernels::HostKernels;
use super::ops::vol;
use crate::engine::cpu::{conv, resample};
use crate::model::graph::Act;

/// One allocation: real host memory (so kernels compiled for the host can use the addresses),
/// 256-byte aligned, between guard bands whose canary bytes show writes out of bounds.
struct Block {
    buf: Vec<u8>,
    off: usize,
    len: usize,
    /// For the activation arena's buffer: the live slots (address → bytes). An access must then
    /// lie inside one of them, so a read of a released slot or past a slot's end is an error, as
    /// an access outside an allocation is.
    slots: Option<BTreeMap<u64, usize>>,
}

const GUARD: usize = 1024;
const CANARY: u8 = 0x5C;

impl Block {
    /// Whether `[ptr, ptr + len)` lies inside one live slot (always, for a block without slots).
    fn in_live_slot(&self, ptr: u64, len: usize) -> bool {
        match &self.slots {
            None => true,
            Some(s) => s.range(..=ptr).next_back().is_some_and(|(&start, &bytes)| ptr + len as u64 <= start + bytes as u64 && (len > 0 || ptr < start + bytes.max(1) as u64)),
        }
    }
    fn data(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }
    /// Whether the guard bands still hold their canaries; refills them either way, so that the
    /// next launch reports only its own faults.
    fn check_and_repair_guards(&mut self) -> bool {
        let (off, len) = (self.off, self.len);
        let intact = self.buf[..off].iter().chain(&self.buf[off + len..]).all(|&b| b == CANARY);
        if !intact {
            self.buf[..off].fill(CANARY);
            self.buf[off + len..].fill(CANARY);
        }
        intact
    }
}

struct Mem {
    blocks: BTreeMap<u64, Block>,
}

pub struct Emu {
    mem: Mutex<Mem>,
    /// Run the kernels' own source compiled for the host instead of the re-implementations below.
    host: Option<Arc<HostKernels>>,
    /// Memory plan only: launches check their pointer arguments and run nothing.
    dry: bool,
    /// Tests of the checks that must catch a kernel computing wrongly on some card: the
    /// tensor-core convolution kernels whose names contain this add 1 to every sum.
    wrong_kernel: Mutex<Option<String>>,
    /// Launches run so far, by kernel name (what tests ask of a path: which kernels it took).
    launches: Mutex<BTreeMap<String, usize>>,
}

/// An emulated allocation; freed on drop.
pub struct EmuAlloc {
    emu: Arc<Emu>,
    pub base: u64,
}

impl Drop for EmuAlloc {
    fn drop(&mut self) {
        let mut m = self.emu.mem.lock().unwrap_or_else(|e| e.into_inner());
        m.blocks.remove(&self.base);
    }
}

/// The output voxels of a halo-tile conv (conv_tc.cu's `conv3d_tc_halo`) in the order of its
/// statistics units: sample by sample, brick by brick (x fastest), each brick's voxels as its
/// rows (z, then y, then x).
fn halo_unit_order(n: usize, od: [usize; 3]) -> Vec<usize> {
    let b = super::ops::HALO_BRICK;
    let [bz, by, bx] = [0, 1, 2].map(|a| od[a] / b[a]);
    let mut o = Vec::with_capacity(n * vol(od));
    for s in 0..n {
        for (z0, y0, x0) in (0..bz).flat_map(|z| (0..by).flat_map(move |y| (0..bx).map(move |x| (b[0] * z, b[1] * y, b[2] * x)))) {
            for r in 0..vol(b) {
                o.push(((s * od[0] + z0 + r / (b[1] * b[2])) * od[1] + y0 + r / b[2] % b[1]) * od[2] + x0 + r % b[2]);
            }
        }
    }
    o
}

fn act_of(code: i32, p: f32) -> Result<Act> {
    Ok(match code {
        0 => Act::None,
        1 => Act::Relu,
        2 => Act::LeakyRelu(p),
        3 => Act::Silu,
        4 => Act::Sigmoid,
        5 => Act::TanhScale(p),
        _ => bail!("unknown activation code {code}"),
    })
}

/// Every non-null pointer argument points into an allocation (and a live slot of an arena).
fn check_pointer_args(m: &Mem, args: &[Arg]) -> Result<()> {
    for a in args {
        if let Arg::Ptr(p) = *a {
            if p != 0 {
                let (&base, b) = m.blocks.range(..=p).next_back().with_context(|| format!("pointer argument {p:#x} is not allocated"))?;
                ensure!(p - base < b.len.max(1) as u64, "pointer argument {p:#x} is past its allocation ({} bytes at {base:#x})", b.len);
                ensure!(b.in_live_slot(p, 0), "pointer argument {p:#x} is not inside a live arena slot");
            }
        }
    }
    Ok(())
}

/// The memory a pointer argument reaches: its arena slot, or its whole allocation.
fn region(m: &Mem, p: u64) -> Option<(u64, u64)> {
    let (&base, b) = m.blocks.range(..=p).next_back()?;
    match &b.slots {
        None => Some((base, base + b.len as u64)),
        Some(s) => s.range(..=p).next_back().map(|(&start, &bytes)| (start, start + bytes as u64)),
    }
}

/// `__restrict__` promises the compiler that nothing else reaches that parameter's memory in
/// this launch, and a GPU compiler acts on it (a const restrict pointer may be read through the
/// non-coherent cache, past writes through another pointer); the host compiler far less. So a
/// restrict parameter sharing its buffer (arena slot, or allocation) with another pointer
/// parameter, where either may be written (its data is not const), is refused here: on a GPU
/// it may compute something else.
fn check_restrict_aliasing(m: &Mem, name: &str, args: &[Arg]) -> Result<()> {
    let Some(quals) = super::kernels::all_pointer_qualifiers().get(name) else { return Ok(()) };
    let ptr = |i: usize| match args.get(i) {
        Some(&Arg::Ptr(p)) if p != 0 => Some(p),
        _ => None,
    };
    for (i, qi) in quals.iter().enumerate() {
        let (Some(qi), Some(pi)) = (qi, ptr(i)) else { continue };
        let Some(ri) = region(m, pi).filter(|_| qi.restrict) else { continue };
        for (j, qj) in quals.iter().enumerate() {
            let (Some(qj), Some(pj)) = (qj, ptr(j)) else { continue };
            if i == j || (qi.const_data && qj.const_data) {
                continue;
            }
            if region(m, pj) == Some(ri) {
                bail!("{name}: __restrict__ parameter {i} ({pi:#x}) and parameter {j} ({pj:#x}) reach the same buffer, and one of them may be written");
            }
        }
    }
    Ok(())
}

/// Typed view of a kernel's argument list.
struct A<'a>(&'a [Arg]);

impl A<'_> {
    fn p(&self, i: usize) -> u64 {
        match self.0[i] {
            Arg::Ptr(p) => p,
            _ => unreachable!("argument kinds are checked by Gpu::launch"),
        }
    }
    fn i(&self, i: usize) -> i64 {
        match self.0[i] {
            Arg::I32(v) => v as i64,
            Arg::I64(v) => v,
            Arg::U32(v) => v as i64,
            _ => unreachable!("argument kinds are checked by Gpu::launch"),
        }
    }
    fn u(&self, i: usize) -> usize {
        self.i(i).max(0) as usize
    }
    fn f(&self, i: usize) -> f32 {
        match self.0[i] {
            Arg::F32(v) => v,
            _ => unreachable!("argument kinds are checked by Gpu::launch"),
        }
    }
    fn opt(&self, i: usize) -> Option<u64> {
        Some(self.p(i)).filter(|&p| p != 0)
    }
}

impl Emu {
    pub fn new() -> Arc<Emu> {
        Arc::new(Emu { mem: Mutex::new(Mem { blocks: BTreeMap::new() }), host: None, dry: false, wrong_kernel: Mutex::default(), launches: Mutex::default() })
    }

    /// The emulator running the kernels' own source (`host_kernels`).
    pub fn with_host_kernels(k: Arc<HostKernels>) -> Arc<Emu> {
        Arc::new(Emu { mem: Mutex::new(Mem { blocks: BTreeMap::new() }), host: Some(k), dry: false, wrong_kernel: Mutex::default(), launches: Mutex::default() })
    }

    /// An emulator that allocates as the device would but runs no kernel (pointer arguments are
    /// still checked): what a walk asks of the device memory, at full size, in seconds.
    pub fn dry() -> Arc<Emu> {
        Arc::new(Emu { mem: Mutex::new(Mem { blocks: BTreeMap::new() }), host: None, dry: true, wrong_kernel: Mutex::default(), launches: Mutex::default() })
    }

    pub fn alloc(self: &Arc<Self>, bytes: usize) -> EmuAlloc {
        let mut m = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        // 256-byte alignment, like cudaMalloc; uninitialised memory holds NaN-ish junk.
        let mut buf = vec![CANARY; bytes + 2 * GUARD + 256];
        let addr = buf.as_ptr() as usize;
        let off = GUARD + (256 - (addr + GUARD) % 256) % 256;
        buf[off..off + bytes].fill(0xA5);
        let base = (addr + off) as u64;
        m.blocks.insert(base, Block { buf, off, len: bytes, slots: None });
        EmuAlloc { emu: self.clone(), base }
    }

    /// Makes the block at `base` an arena: from now on only its live slots may be accessed.
    pub fn track_slots(&self, base: u64) {
        let mut m = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = m.blocks.get_mut(&base) {
            b.slots = Some(BTreeMap::new());
        }
    }

    /// Closes every slot of the arena block at `base` (a new walk).
    pub fn reset_slots(&self, base: u64) {
        let mut m = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = m.blocks.get_mut(&base).and_then(|b| b.slots.as_mut()) {
            s.clear();
        }
    }

    /// Opens the slot `[ptr, ptr + bytes)` of the arena block holding `ptr`.
    pub fn open_slot(&self, ptr: u64, bytes: usize) {
        let mut m = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, b)) = m.blocks.range_mut(..=ptr).next_back() {
            if let Some(s) = b.slots.as_mut() {
                s.insert(ptr, bytes);
            }
        }
    }

    /// Closes the slot at `ptr` and fills it with junk, so that a kernel still reading it
    /// through a stale address gets garbage even where the address checks cannot see it.
    pub fn close_slot(&self, ptr: u64) {
        let mut m = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((&base, b)) = m.blocks.range_mut(..=ptr).next_back() {
            if let Some(bytes) = b.slots.as_mut().and_then(|s| s.remove(&ptr)) {
                let off = (ptr - base) as usize;
                let end = (off + bytes).min(b.len);
                b.data()[off..end].fill(0xA5);
            }
        }
    }

    fn with<R>(&self, ptr: u64, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> Result<R> {
        let mut m = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        let (&base, block) = m.blocks.range_mut(..=ptr).next_back().with_context(|| format!("address {ptr:#x} is not allocated"))?;
        let off = (ptr - base) as usize;
        ensure!(off + len <= block.len, "access of {len} bytes at {ptr:#x} runs past its allocation ({} bytes at {base:#x})", block.len);
        ensure!(block.in_live_slot(ptr, len), "access of {len} bytes at {ptr:#x} is not inside one live arena slot (a released slot, or past a slot's end)");
        Ok(f(&mut block.data()[off..off + len]))
    }

    pub fn write_bytes(&self, dst: u64, data: &[u8]) -> Result<()> {
        self.with(dst, data.len(), |b| b.copy_from_slice(data))
    }

    pub fn read_bytes(&self, src: u64, out: &mut [u8]) -> Result<()> {
        self.with(src, out.len(), |b| out.copy_from_slice(b))
    }

    fn rf32(&self, p: u64, n: usize) -> Result<Vec<f32>> {
        self.with(p, n * 4, |b| b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
    fn rf16(&self, p: u64, n: usize) -> Result<Vec<f32>> {
        self.with(p, n * 2, |b| b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect())
    }
    fn ru32(&self, p: u64, n: usize) -> Result<Vec<u32>> {
        self.with(p, n * 4, |b| b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
    fn ri32(&self, p: u64, n: usize) -> Result<Vec<i32>> {
        self.with(p, n * 4, |b| b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
    fn ru64(&self, p: u64, n: usize) -> Result<Vec<u64>> {
        self.with(p, n * 8, |b| b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect())
    }
    /// conv_tc.cu's epilogue on the f32 sums `y` (`[m][cout]`): + bias, + residual, act, fp16
    /// store to `out`; with `stats`, per block of `rows` voxels and channel, (sum, squared
    /// deviations from the block mean) of the stored fp16 values, f32 in row order. The blocks
    /// are consecutive voxels, or with `order` consecutive entries of it (the halo kernels'
    /// bricks: every voxel once).
    #[allow(clippy::too_many_arguments)]
    fn tc_store(&self, mut y: Vec<f32>, bias: Option<u64>, residual: Option<u64>, act: Act, out: u64, stats: Option<u64>, ovol: usize, cout: usize, rows: usize, order: Option<&[usize]>) -> Result<()> {
        let bias = match bias {
            Some(p) => Some(self.rf32(p, cout)?),
            None => None,
        };
        let res = match residual {
            Some(p) => Some(self.rf16(p, y.len())?),
            None => None,
        };
        for (i, v) in y.iter_mut().enumerate() {
            if let Some(b) = &bias {
                *v += b[i % cout];
            }
            if let Some(r) = &res {
                *v += r[i];
            }
            *v = act.apply(*v);
        }
        if let Some(sp) = stats {
            ensure!(ovol.is_multiple_of(rows), "statistics need OD*OH*OW % {rows} == 0");
            let nblk = y.len() / cout / rows;
            let mut part = vec![0.0f32; nblk * cout * 2];
            let ordered: Vec<f32>;
            let by_unit = match order {
                Some(o) => {
                    ensure!(o.len() * cout == y.len(), "the unit order must list every voxel once");
                    ordered = o.iter().flat_map(|&m| y[m * cout..(m + 1) * cout].iter().copied()).collect();
                    &ordered
                }
                None => &y,
            };
            for (blk, vals) in by_unit.chunks(rows * cout).enumerate() {
                for co in 0..cout {
                    let col = || vals.iter().skip(co).step_by(cout).map(|&v| f16::from_f32(v).to_f32());
                    let s: f32 = col().fold(0.0, |a, v| a + v);
                    let mean = s / rows as f32;
                    let q: f32 = col().fold(0.0, |a, v| a + (v - mean) * (v - mean));
                    part[(blk * cout + co) * 2] = s;
                    part[(blk * cout + co) * 2 + 1] = q;
                }
            }
            self.wf32(sp, &part)?;
        }
        self.wf16(out, &y)
    }

    fn wf32(&self, p: u64, v: &[f32]) -> Result<()> {
        self.with(p, v.len() * 4, |b| {
            for (c, x) in b.chunks_exact_mut(4).zip(v) {
                c.copy_from_slice(&x.to_le_bytes());
            }
        })
    }
    /// Stores f32 values as fp16 (round to nearest even).
    fn wf16(&self, p: u64, v: &[f32]) -> Result<()> {
        self.with(p, v.len() * 2, |b| {
            for (c, x) in b.chunks_exact_mut(2).zip(v) {
                c.copy_from_slice(&f16::from_f32(*x).to_le_bytes());
            }
        })
    }
    fn wu32(&self, p: u64, v: &[u32]) -> Result<()> {
        self.with(p, v.len() * 4, |b| {
            for (c, x) in b.chunks_exact_mut(4).zip(v) {
                c.copy_from_slice(&x.to_le_bytes());
            }
        })
    }

    /// How many times kernel `name` was launched on this emulator.
    pub fn launches(&self, name: &str) -> usize {
        self.launches.lock().unwrap_or_else(|e| e.into_inner()).get(name).copied().unwrap_or(0)
    }

    /// Tests only: the re-implemented tensor-core convolutions whose names contain `part` compute
    /// wrongly from now on (every sum + 1), as kernels miscompiled for some card would.
    #[cfg(test)]
    pub fn compute_wrongly(&self, part: &str) {
        *self.wrong_kernel.lock().unwrap_or_else(|e| e.into_inner()) = Some(part.to_string());
    }

    /// Runs kernel `name`: its own source compiled for the host when this emulator has it, else
    /// the re-implementation below.
    pub fn launch(&self, name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), args: &[Arg]) -> Result<()> {
        *self.launches.lock().unwrap_or_else(|e| e.into_inner()).entry(name.to_string()).or_default() += 1;
        check_restrict_aliasing(&self.mem.lock().unwrap_or_else(|e| e.into_inner()), name, args)?;
        if self.dry {
            let m = self.mem.lock().unwrap_or_else(|e| e.into_inner());
            return check_pointer_args(&m, args);
        }
        match &self.host {
            Some(k) => self.launch_host(k, name, grid, block, args),
            None => self.launch_reimplemented(name, grid, block, args),
        }
    }

    fn launch_host(&self, k: &HostKernels, name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), args: &[Arg]) -> Result<()> {
        // Holding the memory lock keeps every allocation alive and untouched during the kernel.
        let m = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        check_pointer_args(&m, args)?;
        // SAFETY: Gpu::launch checked the argument kinds against the kernel's signature; every
        // non-null pointer is inside one of this emulator's allocations (checked above), which
        // the ops layer sized as the kernel's header requires; writes past them land in the
        // guard bands and are reported below.
        unsafe { k.launch(name, grid, block, args) }?;
        let mut m = m;
        let mut bad = None;
        for (base, b) in m.blocks.iter_mut() {
            if !b.check_and_repair_guards() {
                bad.get_or_insert((*base, b.len));
            }
        }
        match bad {
            Some((base, len)) => bail!("{name} wrote outside the allocation of {len} bytes at {base:#x}"),
            None => Ok(()),
        }
    }

    /// Runs kernel `name` as its header describes.
    fn launch_reimplemented(&self, name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), args: &[Arg]) -> Result<()> {
        let a = A(args);
        let (gx, gy, gz) = (grid.0 as usize, grid.1 as usize, grid.2 as usize);
        let threads = (block.0 * block.1 * block.2) as usize;
        match name {
            "ncdhw_f32_to_ndhwc_f16" | "ndhwc_f16_to_ncdhw_f32" => {
                let (src, dst, c, vol) = (a.p(0), a.p(1), a.u(2), a.u(3));
                ensure!(block == (32, 8, 1), "block must be (32, 8, 1)");
                ensure!(gx == vol.div_ceil(32) && gy == c.div_ceil(32), "grid must be (ceil(vol/32), ceil(C/32), N)");
                let n = gz;
                if name.starts_with("ncdhw") {
                    let x = self.rf32(src, n * c * vol)?;
                    let mut y = vec![0.0; x.len()];
                    for b in 0..n {
                        for ch in 0..c {
                            for v in 0..vol {
                                y[(b * vol + v) * c + ch] = x[(b * c + ch) * vol + v];
                            }
                        }
                    }
                    self.wf16(dst, &y)
                } else {
                    let x = self.rf16(src, n * c * vol)?;
                    let mut y = vec![0.0; x.len()];
                    for b in 0..n {
                        for ch in 0..c {
                            for v in 0..vol {
                                y[(b * c + ch) * vol + v] = x[(b * vol + v) * c + ch];
                            }
                        }
                    }
                    self.wf32(dst, &y)
                }
            }
            "f32_to_f16" => {
                let n = a.u(2);
                let x = self.rf32(a.p(0), n)?;
                self.wf16(a.p(1), &x)
            }
            "extract_tiles_f16" => {
                let (d, h, w) = (a.u(1), a.u(2), a.u(3));
                let (wd, wh, ww) = (a.u(5), a.u(6), a.u(7));
                let t = gy;
                let volume = self.rf16(a.p(0), d * h * w)?;
                let origins = self.ri32(a.p(4), 3 * t)?;
                let wvol = wd * wh * ww;
                let mut out = vec![0.0; t * wvol];
                for ti in 0..t {
                    let o = &origins[3 * ti..3 * ti + 3];
                    for z in 0..wd {
                        for y in 0..wh {
                            for x in 0..ww {
                                let (gz_, gy_, gx_) = (o[0] as usize + z, o[1] as usize + y, o[2] as usize + x);
                                if gz_ < d && gy_ < h && gx_ < w {
                                    out[ti * wvol + (z * wh + y) * ww + x] = volume[(gz_ * h + gy_) * w + gx_];
                                }
                            }
                        }
                    }
                }
                self.wf16(a.p(8), &out)
            }
            "copy_channels_f16" => {
                let (rows, cs, cd, off) = (a.u(2), a.u(3), a.u(4), a.u(5));
                ensure!(off + cs <= cd, "channel slice out of range");
                let src = self.rf16(a.p(0), rows * cs)?;
                let mut dst = self.rf16(a.p(1), rows * cd)?;
                for r in 0..rows {
                    dst[r * cd + off..r * cd + off + cs].copy_from_slice(&src[r * cs..(r + 1) * cs]);
                }
                self.wf16(a.p(1), &dst)
            }
            "conv3d_c1_k3_f16" => {
                let (d, h, w, cout) = (a.u(4), a.u(5), a.u(6), a.u(7));
                let act = act_of(a.i(8) as i32, a.f(9))?;
                ensure!(block == (32, 4, 2), "block must be (CF_TX, CF_TY, CF_TZ) = (32, 4, 2)");
                ensure!((1..=64).contains(&cout) && cout % 2 == 0, "unsupported Cout {cout}");
                let zb = d.div_ceil(2);
                ensure!(gx == w.div_ceil(32) && gy == h.div_ceil(4) && gz % zb == 0, "grid must be (ceil(W/32), ceil(H/4), N*ceil(D/2))");
                let n = gz / zb;
                let vol = d * h * w;
                let x = self.rf16(a.p(0), n * vol)?;
                let wt = self.rf32(a.p(1), cout * 27)?;
                let bias = match a.opt(2) {
                    Some(p) => Some(self.rf32(p, cout)?),
                    None => None,
                };
                let s = conv::ConvShape { cin: 1, cout, k: 3, stride: 1, pad: 1, dims: [d, h, w] };
                let mut o = vec![0.0; n * cout * vol];
                conv::conv3d(&x, n, s, &wt, bias.as_deref(), act, &mut o);
                self.wf16(a.p(3), &to_ndhwc(&o, n, cout, vol))
            }
            "conv3d_igemm_f16" => {
                let (n, d, h, w, cin, cout, k, st, pad, od, oh, ow) =
                    (a.u(4), a.u(5), a.u(6), a.u(7), a.u(8), a.u(9), a.u(10), a.u(11), a.u(12), a.u(13), a.u(14), a.u(15));
                let act = act_of(a.i(16) as i32, a.f(17))?;
                ensure!(threads == 256 && block.1 == 1, "block must be CV_THREADS = 256");
                let s = conv::ConvShape { cin, cout, k, stride: st, pad, dims: [d, h, w] };
                ensure!(s.out_dims() == [od, oh, ow], "output dims {:?} passed, {:?} expected", [od, oh, ow], s.out_dims());
                let m = n * od * oh * ow;
                ensure!(gx == m.div_ceil(64) && gy == cout.div_ceil(64), "grid must be (ceil(M/64), ceil(Cout/64))");
                let kk = k * k * k;
                let x = from_ndhwc(&self.rf16(a.p(0), n * d * h * w * cin)?, n, cin, d * h * w);
                let wk = self.rf16(a.p(1), cout * kk * cin)?;
                let wt = from_ktrsc(&wk, cout, cin, kk);
                let bias = match a.opt(2) {
                    Some(p) => Some(self.rf32(p, cout)?),
                    None => None,
                };
                let ovol = od * oh * ow;
                let mut o = vec![0.0; n * cout * ovol];
                conv::conv3d(&x, n, s, &wt, bias.as_deref(), act, &mut o);
                self.wf16(a.p(3), &to_ndhwc(&o, n, cout, ovol))
            }
            _ if super::ops::TC_VARIANTS.iter().any(|v| v.kernel == name || v.kernel_async == name) || super::ops::HALO_KERNELS.contains(&name) => {
                let halo = super::ops::HALO_KERNELS.contains(&name);
                // Block tile (output voxels, channels) of the instantiation and its store's pass.
                let (rows, cols, store_rows) = match super::ops::TC_VARIANTS.iter().find(|v| v.kernel == name || v.kernel_async == name) {
                    Some(v) => (v.rows, v.cols, v.store_rows),
                    None => (vol(super::ops::HALO_BRICK), super::ops::HALO_COLS, if name == super::ops::HALO_KERNELS[0] { 128 } else { 64 }),
                };
                if name.contains("_async_") {
                    // The cp.async loads: no norm, whole 16-byte chunks.
                    ensure!(a.opt(4).is_none() && a.u(10) % 8 == 0 && (a.p(0) | a.p(1)) % 16 == 0, "{name}: needs Cin % 8 == 0, 16-byte aligned x and w, no norm");
                }
                let (n, d, h, w, cin, cout, k, st, pad, od, oh, ow) =
                    (a.u(6), a.u(7), a.u(8), a.u(9), a.u(10), a.u(11), a.u(12), a.u(13), a.u(14), a.u(15), a.u(16), a.u(17));
                let pre = act_of(a.i(18) as i32, a.f(19))?;
                let post = act_of(a.i(20) as i32, a.f(21))?;
                let act = act_of(a.i(22) as i32, a.f(23))?;
                ensure!(block == (128, 1, 1), "block must be TC_THREADS = 128");
                let s = conv::ConvShape { cin, cout, k, stride: st, pad, dims: [d, h, w] };
                ensure!(s.out_dims() == [od, oh, ow], "output dims {:?} passed, {:?} expected", [od, oh, ow], s.out_dims());
                let ovol = od * oh * ow;
                let m = n * ovol;
                if halo {
                    // Anything else traps on the device. Whole bricks: the grid check below is
                    // the bricks' count, and no split K leaves grid.z 1 (checked after the sums).
                    let shape = super::ops::ConvShape { n, dims: [d, h, w], cin, cout, k, stride: st, pad };
                    ensure!(super::ops::halo_fits(shape) && (a.p(0) | a.p(1)) % 16 == 0 && a.opt(25).is_none(), "{name}: needs a 3x3x3 stride-1 conv, Cin % 16 == 0, output dims in whole 2x4x16 bricks, 16-byte aligned x and w, no split K");
                }
                ensure!(gx == m.div_ceil(rows) && gy == cout.div_ceil(cols), "grid must be (ceil(M/{rows}), ceil(Cout/{cols}))");
                let ivol = d * h * w;
                let mut xh = self.rf16(a.p(0), n * ivol * cin)?;
                if let Some(pp) = a.opt(4) {
                    // norm_apply's formula, element by element, rounded to fp16.
                    let prm = self.rf32(pp, n * cin * 3)?;
                    for (i, v) in xh.iter_mut().enumerate() {
                        let (b, c) = (i / (ivol * cin), i % cin);
                        let q = &prm[(b * cin + c) * 3..][..3];
                        *v = f16::from_f32(post.apply((pre.apply(*v) - q[0]) * q[1] + q[2])).to_f32();
                    }
                }
                let x = from_ndhwc(&xh, n, cin, ivol);
                let kk = k * k * k;
                let wk = self.rf16(a.p(1), cout * kk * cin)?;
                let wt = from_ktrsc(&wk, cout, cin, kk);
                let mut o = vec![0.0; n * cout * ovol];
                conv::conv3d(&x, n, s, &wt, None, Act::None, &mut o);
                let mut y = to_ndhwc(&o, n, cout, ovol);
                if self.wrong_kernel.lock().unwrap_or_else(|e| e.into_inner()).as_deref().is_some_and(|part| name.contains(part)) {
                    y.iter_mut().for_each(|v| *v += 1.0);
                }
                if let Some(sk) = a.opt(25) {
                    // Split K: the whole sum in plane 0 of the padded buffer, the other planes 0
                    // (the reduce adds them); the host-built kernels test the real split.
                    let (splits, kspan, steps) = (gz, a.u(26), (kk * cin).div_ceil(32));
                    ensure!(kspan > 0 && (splits - 1) * kspan < steps && splits * kspan >= steps, "{splits} splits of {kspan} k-steps do not cover {steps} without an empty one");
                    let ldc = gy * cols;
                    let mut planes = vec![0.0f32; splits * gx * rows * ldc];
                    for (i, v) in y.iter().enumerate() {
                        planes[(i / cout) * ldc + i % cout] = *v;
                    }
                    return self.wf32(sk, &planes);
                }
                ensure!(gz == 1, "grid.z > 1 needs a split-K buffer");
                let order = halo.then(|| halo_unit_order(n, [od, oh, ow]));
                self.tc_store(y, a.opt(2), a.opt(3), act, a.p(5), a.opt(24), ovol, cout, store_rows, order.as_deref())
            }
            _ if super::ops::TC_VARIANTS.iter().any(|v| v.reduce == name) => {
                // splitk, splits, bias, residual, out, stats, M, ovol, Cout, act, p
                // The reduce's tile: store_rows x cols.
                let v = super::ops::TC_VARIANTS.iter().find(|v| v.reduce == name).context("tc variant")?;
                let (rows, cols) = (v.store_rows, v.cols);
                let (splits, m, ovol, cout) = (a.u(1), a.u(6), a.u(7), a.u(8));
                let act = act_of(a.i(9) as i32, a.f(10))?;
                ensure!(block == (128, 1, 1), "block must be TC_THREADS = 128");
                // The grid of a conv this reduce finishes, its rows in store passes.
                let conv_grid = |c: &super::ops::TcVariant| m.div_ceil(c.rows) * c.rows / c.store_rows;
                ensure!(
                    super::ops::TC_VARIANTS.iter().any(|c| c.reduce == name && gx == conv_grid(c)) && gy == cout.div_ceil(cols) && gz == 1,
                    "grid must be (ceil(M/{rows}), ceil(Cout/{cols}), 1), or a 128 x 64 conv's with x doubled"
                );
                let ldc = gy * cols;
                let plane = gx * rows * ldc;
                let planes = self.rf32(a.p(0), splits * plane)?;
                let mut y = vec![0.0f32; m * cout];
                for (i, v) in y.iter_mut().enumerate() {
                    let at = (i / cout) * ldc + i % cout;
                    *v = (0..splits).fold(0.0f32, |acc, z| acc + planes[z * plane + at]);
                }
                self.tc_store(y, a.opt(2), a.opt(3), act, a.p(4), a.opt(5), ovol, cout, rows, None)
            }
            "conv_transpose2_f16" | "conv_transpose2_tc_f16" => {
                let (n, d, h, w, cin, cout, ctot, off) = (a.u(3), a.u(4), a.u(5), a.u(6), a.u(7), a.u(8), a.u(9), a.u(10));
                let vol = d * h * w;
                if name == "conv_transpose2_tc_f16" {
                    ensure!(threads == 128, "block must be CTT_THREADS = 128");
                    ensure!(cin % 16 == 0 && cout % 8 == 0, "needs Cin % 16 == 0 and Cout % 8 == 0");
                    ensure!(a.p(0) % 16 == 0 && a.p(1) % 16 == 0, "x and w must be 16-byte aligned");
                } else {
                    ensure!(threads == 256, "block must be CT_THREADS = 256");
                }
                ensure!(gx == (n * vol).div_ceil(64) && gy == (8 * cout).div_ceil(64), "grid must be (ceil(M/64), ceil(8*Cout/64))");
                ensure!(off + cout <= ctot, "channel slice out of range");
                let x = from_ndhwc(&self.rf16(a.p(0), n * vol * cin)?, n, cin, vol);
                let wt = self.rf16(a.p(1), cin * cout * 8)?;
                let mut o = vec![0.0; n * cout * vol * 8];
                conv::conv_transpose2(&x, n, cin, cout, [d, h, w], &wt, &mut o);
                let o = to_ndhwc(&o, n, cout, 8 * vol);
                let mut dst = self.rf16(a.p(2), n * 8 * vol * ctot)?;
                for r in 0..n * 8 * vol {
                    dst[r * ctot + off..r * ctot + off + cout].copy_from_slice(&o[r * cout..(r + 1) * cout]);
                }
                self.wf16(a.p(2), &dst)
            }
            "bias_act_f16" => {
                let (pairs, c) = (a.u(3), a.u(4));
                let act = act_of(a.i(5) as i32, a.f(6))?;
                ensure!(c % 2 == 0, "C must be even");
                let x = self.rf16(a.p(0), 2 * pairs)?;
                let bias = match a.opt(2) {
                    Some(p) => Some(self.rf32(p, c)?),
                    None => None,
                };
                let y: Vec<f32> = x.iter().enumerate().map(|(i, &v)| act.apply(v + bias.as_ref().map_or(0.0, |b| b[i % c]))).collect();
                self.wf16(a.p(1), &y)
            }
            "add_act_f16" => {
                let pairs = a.u(3);
                let act = act_of(a.i(4) as i32, a.f(5))?;
                let x = self.rf16(a.p(0), 2 * pairs)?;
                let y = self.rf16(a.p(1), 2 * pairs)?;
                let o: Vec<f32> = x.iter().zip(&y).map(|(a, b)| act.apply(a + b)).collect();
                self.wf16(a.p(2), &o)
            }
            "norm_stats_partial" => {
                // x, vol, C, vox_per_block, pre, pre_p, partial; grid (nblk, N), block NORM_THREADS.
                let (vol, c, per) = (a.u(1), a.u(2), a.u(3));
                let pre = act_of(a.i(4) as i32, a.f(5))?;
                ensure!(threads == 256 && block.1 == 1, "block must be NORM_THREADS = 256");
                ensure!(c % 2 == 0 && c / 2 <= 256, "C must be even and <= 512");
                let (nblk, n) = (gx, gy);
                ensure!(nblk * per >= vol, "{nblk} blocks of {per} voxels do not cover {vol}");
                let x = self.rf16(a.p(0), n * vol * c)?;
                let mut part = vec![0.0f32; n * nblk * c * 2];
                for b in 0..n {
                    for ch in 0..c {
                        let pivot = pre.apply(x[b * vol * c + ch]);
                        for blk in 0..nblk {
                            let (mut s, mut q) = (0.0f32, 0.0f32);
                            for v in blk * per..((blk + 1) * per).min(vol) {
                                let dv = pre.apply(x[(b * vol + v) * c + ch]) - pivot;
                                s += dv;
                                q += dv * dv;
                            }
                            let o = ((b * nblk + blk) * c + ch) * 2;
                            part[o] = s;
                            part[o + 1] = q;
                        }
                    }
                }
                self.wf32(a.p(6), &part)
            }
            "norm_finalize" => {
                // x, partial, vol, C, groups, nblk, pre, pre_p, gamma, beta, eps, params; grid (G, N).
                let (vol, c, groups, nblk) = (a.u(2), a.u(3), a.u(4), a.u(5));
                let pre = act_of(a.i(6) as i32, a.f(7))?;
                let eps = a.f(10) as f64;
                ensure!(threads == 256, "block must be NORM_THREADS = 256");
                ensure!(gx == groups && groups > 0 && c % groups == 0 && c / groups <= 512, "grid.x must be the group count");
                let n = gy;
                let cpg = c / groups;
                let x = self.rf16(a.p(0), n * vol * c)?;
                let part = self.rf32(a.p(1), n * nblk * c * 2)?;
                let gamma = match a.opt(8) {
                    Some(p) => Some(self.rf32(p, c)?),
                    None => None,
                };
                let beta = match a.opt(9) {
                    Some(p) => Some(self.rf32(p, c)?),
                    None => None,
                };
                let mut params = vec![0.0f32; n * c * 3];
                let cnt = vol as f64;
                for b in 0..n {
                    for g in 0..groups {
                        let mut means = Vec::with_capacity(cpg);
                        let mut m2s = Vec::with_capacity(cpg);
                        for k in 0..cpg {
                            let ch = g * cpg + k;
                            let (mut s1, mut s2) = (0.0f64, 0.0f64);
                            for blk in 0..nblk {
                                let o = ((b * nblk + blk) * c + ch) * 2;
                                s1 += part[o] as f64;
                                s2 += part[o + 1] as f64;
                            }
                            let pivot = pre.apply(x[b * vol * c + ch]) as f64;
                            means.push(pivot + s1 / cnt);
                            m2s.push((s2 - s1 * s1 / cnt).max(0.0));
                        }
                        group_params(&means, &m2s, cnt, eps, g * cpg, gamma.as_deref(), beta.as_deref(), &mut params[b * c * 3..(b + 1) * c * 3]);
                    }
                }
                self.wf32(a.p(11), &params)
            }
            "norm_finalize_tiles" => {
                // partial, vol, C, groups, nblk, per, gamma, beta, eps, params; grid (G, N).
                let (vol, c, groups, nblk, per) = (a.u(1), a.u(2), a.u(3), a.u(4), a.u(5));
                let eps = a.f(8) as f64;
                ensure!(threads == 256, "block must be NORM_THREADS = 256");
                ensure!(gx == groups && groups > 0 && c % groups == 0 && c / groups <= 512, "grid.x must be the group count");
                ensure!(nblk * per == vol, "{nblk} blocks of {per} voxels are not the volume {vol}");
                let n = gy;
                let cpg = c / groups;
                let part = self.rf32(a.p(0), n * nblk * c * 2)?;
                let gamma = match a.opt(6) {
                    Some(p) => Some(self.rf32(p, c)?),
                    None => None,
                };
                let beta = match a.opt(7) {
                    Some(p) => Some(self.rf32(p, c)?),
                    None => None,
                };
                let mut params = vec![0.0f32; n * c * 3];
                let (cnt, bc) = (vol as f64, per as f64);
                for b in 0..n {
                    for g in 0..groups {
                        let (mut means, mut m2s) = (Vec::with_capacity(cpg), Vec::with_capacity(cpg));
                        for ch in g * cpg..(g + 1) * cpg {
                            let blk = |i: usize| &part[((b * nblk + i) * c + ch) * 2..][..2];
                            let mean = (0..nblk).map(|i| blk(i)[0] as f64).sum::<f64>() / cnt;
                            let m2: f64 = (0..nblk)
                                .map(|i| {
                                    let d = blk(i)[0] as f64 / bc - mean;
                                    blk(i)[1] as f64 + bc * d * d
                                })
                                .sum();
                            means.push(mean);
                            m2s.push(m2);
                        }
                        group_params(&means, &m2s, cnt, eps, g * cpg, gamma.as_deref(), beta.as_deref(), &mut params[b * c * 3..(b + 1) * c * 3]);
                    }
                }
                self.wf32(a.p(9), &params)
            }
            "norm_apply" => {
                // x, y, vol, C, params, pre, pre_p, post, post_p; grid (any, N).
                let (vol, c) = (a.u(2), a.u(3));
                let pre = act_of(a.i(5) as i32, a.f(6))?;
                let post = act_of(a.i(7) as i32, a.f(8))?;
                let n = gy;
                let x = self.rf16(a.p(0), n * vol * c)?;
                let prm = self.rf32(a.p(4), n * c * 3)?;
                let y: Vec<f32> = x
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let (b, ch) = (i / (vol * c), i % c);
                        let p = &prm[(b * c + ch) * 3..];
                        post.apply((pre.apply(v) - p[0]) * p[1] + p[2])
                    })
                    .collect();
                self.wf16(a.p(1), &y)
            }
            "upsample2x_add_f16" => {
                let (d, h, w, c) = (a.u(3), a.u(4), a.u(5), a.u(6));
                let n = gy;
                let vol = d * h * w;
                let x = from_ndhwc(&self.rf16(a.p(0), n * vol * c)?, n, c, vol);
                let up = to_ndhwc(&resample::upsample2x(&x, n * c, [d, h, w]), n, c, 8 * vol);
                let out = match a.opt(1) {
                    Some(s) => {
                        let sk = self.rf16(s, n * 8 * vol * c)?;
                        up.iter().zip(&sk).map(|(u, s)| u + s).collect()
                    }
                    None => up,
                };
                self.wf16(a.p(2), &out)
            }
            "head_conv1x1_act_f32" => {
                let (vol, cin, cout) = (a.u(4), a.u(5), a.u(6));
                let act = act_of(a.i(7) as i32, a.f(8))?;
                ensure!(threads <= 256, "block must be at most HEAD_THREADS = 256");
                ensure!(cin <= 64 && cin % 2 == 0 && cout <= 8, "unsupported head shape");
                ensure!(gx * threads >= vol, "grid does not cover the voxels");
                let n = gy;
                let x = self.rf16(a.p(0), n * vol * cin)?;
                let wt = self.rf32(a.p(1), cout * cin)?;
                let bias = match a.opt(2) {
                    Some(p) => Some(self.rf32(p, cout)?),
                    None => None,
                };
                let mut out = vec![0.0f32; n * cout * vol];
                for b in 0..n {
                    for v in 0..vol {
                        let xs = &x[(b * vol + v) * cin..(b * vol + v + 1) * cin];
                        for co in 0..cout {
                            let mut s = 0.0f32;
                            for ci in 0..cin {
                                s = wt[co * cin + ci].mul_add(xs[ci], s);
                            }
                            out[(b * cout + co) * vol + v] = act.apply(s + bias.as_ref().map_or(0.0, |bb| bb[co]));
                        }
                    }
                }
                self.wf32(a.p(3), &out)
            }
            "head_act_f32" => {
                let (vol, c) = (a.u(2), a.u(3));
                let act = act_of(a.i(4) as i32, a.f(5))?;
                let n = gy;
                let x = self.rf16(a.p(0), n * vol * c)?;
                let y: Vec<f32> = from_ndhwc(&x, n, c, vol).into_iter().map(|v| act.apply(v)).collect();
                self.wf32(a.p(1), &y)
            }
            "ensemble_accumulate_f32" | "blend_merge_f32" => {
                let n = a.u(2);
                let mut acc = self.rf32(a.p(0), n)?;
                let src = self.rf32(a.p(1), n)?;
                acc.iter_mut().zip(&src).for_each(|(a, s)| *a += s);
                self.wf32(a.p(0), &acc)
            }
            "ensemble_accumulate_view_f32" => {
                let (n, c, d, h, w, view, vector) = (a.u(2), a.u(3), a.u(4), a.u(5), a.u(6), a.u(7), a.i(8) != 0);
                let vol = d * h * w;
                let mut acc = self.rf32(a.p(0), n * c * vol)?;
                let src = self.rf32(a.p(1), n * c * vol)?;
                for (i, av) in acc.iter_mut().enumerate() {
                    let x = i % w;
                    let y = (i / w) % h;
                    let z = (i / (w * h)) % d;
                    let ch = (i / vol) % c;
                    let b = i / (vol * c);
                    let (mut sz, mut sy, mut sx, mut sc) = (z, y, x, ch);
                    let mut sign = 1.0f32;
                    if (1..=3).contains(&view) {
                        let ax = view - 1;
                        match ax {
                            0 => sz = d - 1 - z,
                            1 => sy = h - 1 - y,
                            _ => sx = w - 1 - x,
                        }
                        if vector && ch == 2 - ax {
                            sign = -1.0;
                        }
                    } else if (4..=6).contains(&view) {
                        let k = view - 3;
                        match (4 - k) & 3 {
                            1 => {
                                sy = x;
                                sx = w - 1 - y;
                            }
                            2 => {
                                sy = h - 1 - y;
                                sx = w - 1 - x;
                            }
                            3 => {
                                sy = h - 1 - x;
                                sx = y;
                            }
                            _ => {}
                        }
                        if vector && ch < 2 {
                            match k {
                                1 => {
                                    sc = if ch == 0 { 1 } else { 0 };
                                    sign = if ch == 0 { -1.0 } else { 1.0 };
                                }
                                2 => sign = -1.0,
                                _ => {
                                    sc = if ch == 0 { 1 } else { 0 };
                                    sign = if ch == 0 { 1.0 } else { -1.0 };
                                }
                            }
                        }
                    }
                    *av += sign * src[(((b * c + sc) * d + sz) * h + sy) * w + sx];
                }
                self.wf32(a.p(0), &acc)
            }
            "ensemble_divide_f32" => {
                let n = a.u(1);
                let count = a.f(2);
                let acc: Vec<f32> = self.rf32(a.p(0), n)?.into_iter().map(|v| v / count).collect();
                self.wf32(a.p(0), &acc)
            }
            "ensemble_mean_f32" => {
                let (m, n, count) = (a.u(2), a.u(3), a.f(4));
                let srcs = self.ru64(a.p(1), m)?;
                let mut s = vec![0.0f32; n];
                for p in srcs {
                    let v = self.rf32(p, n)?;
                    s.iter_mut().zip(&v).for_each(|(a, b)| *a += b);
                }
                if count > 1.0 {
                    s.iter_mut().for_each(|v| *v /= count);
                }
                self.wf32(a.p(0), &s)
            }
            "blend_tiles_f32" => {
                let cs = a.u(3);
                let (gd, gh, gw) = (a.u(4), a.u(5), a.u(6));
                let t = a.u(11);
                let (td, th, tw) = (a.u(12), a.u(13), a.u(14));
                let (bz, by, bx, bd, bh, bw) = (a.u(15), a.u(16), a.u(17), a.u(18), a.u(19), a.u(20));
                let g = gd * gh * gw;
                let tv = td * th * tw;
                let mut acc_s = self.rf32(a.p(0), cs * g)?;
                let mut acc_o = self.rf32(a.p(1), 3 * g)?;
                let mut counter = self.rf32(a.p(2), g)?;
                let ts = self.rf32(a.p(7), t * cs * tv)?;
                let to = self.rf32(a.p(8), t * 3 * tv)?;
                let wt = self.rf32(a.p(9), tv)?;
                let org = self.ri32(a.p(10), 3 * t)?;
                for z in bz..bz + bd {
                    for y in by..by + bh {
                        for x in bx..bx + bw {
                            if z >= gd || y >= gh || x >= gw {
                                continue;
                            }
                            let cell = (z * gh + y) * gw + x;
                            for ti in 0..t {
                                let (lz, ly, lx) = (z as i64 - org[3 * ti] as i64, y as i64 - org[3 * ti + 1] as i64, x as i64 - org[3 * ti + 2] as i64);
                                if lz < 0 || ly < 0 || lx < 0 || lz >= td as i64 || ly >= th as i64 || lx >= tw as i64 {
                                    continue;
                                }
                                let local = ((lz as usize * th) + ly as usize) * tw + lx as usize;
                                let wv = wt[local];
                                counter[cell] += wv;
                                for ch in 0..cs {
                                    acc_s[ch * g + cell] += ts[(ti * cs + ch) * tv + local] * wv;
                                }
                                for ch in 0..3 {
                                    acc_o[ch * g + cell] += to[(ti * 3 + ch) * tv + local] * wv;
                                }
                            }
                        }
                    }
                }
                self.wf32(a.p(0), &acc_s)?;
                self.wf32(a.p(1), &acc_o)?;
                self.wf32(a.p(2), &counter)
            }
            "blend_finish_f32" => {
                let (c, g) = (a.u(2), a.u(3));
                let mut acc = self.rf32(a.p(0), c * g)?;
                let counter = self.rf32(a.p(1), g)?;
                for (i, v) in acc.iter_mut().enumerate() {
                    let k = counter[i % g];
                    *v = if k > 0.0 { *v / k } else { 0.0 };
                }
                self.wf32(a.p(0), &acc)
            }
            "nms_count" | "nms_write" => {
                let (d, h, w) = (a.u(1), a.u(2), a.u(3));
                ensure!(threads == 256, "block must be NMS_THREADS = 256");
                let cells = d * h * w;
                let (nblk, c) = (gx, gy);
                ensure!(nblk * 2048 >= cells, "grid does not cover the cells");
                let scores = self.rf32(a.p(0), c * cells)?;
                let thr = self.rf32(a.p(4), c)?;
                let mut flags: Vec<Vec<(bool, f32)>> = Vec::with_capacity(c);
                for ch in 0..c {
                    let s = &scores[ch * cells..(ch + 1) * cells];
                    let f = (0..cells)
                        .map(|i| {
                            let (x, y, z) = (i % w, (i / w) % h, i / (w * h));
                            let v = s[i];
                            let mut m = v;
                            for zz in z.saturating_sub(1)..(z + 2).min(d) {
                                for yy in y.saturating_sub(1)..(y + 2).min(h) {
                                    for xx in x.saturating_sub(1)..(x + 2).min(w) {
                                        let b = s[(zz * h + yy) * w + xx];
                                        // pmax: NaN in m stays; NaN in b wins over a number.
                                        if !m.is_nan() && !(b <= m) {
                                            m = b;
                                        }
                                    }
                                }
                            }
                            let peak = if v == m { v } else { v * 0.0 };
                            (peak >= thr[ch], peak)
                        })
                        .collect();
                    flags.push(f);
                }
                if name == "nms_count" {
                    let mut counts = vec![0u32; c * nblk];
                    for ch in 0..c {
                        for (i, (k, _)) in flags[ch].iter().enumerate() {
                            if *k {
                                counts[ch * nblk + i / 2048] += 1;
                            }
                        }
                    }
                    self.wu32(a.p(5), &counts)
                } else {
                    let cap = a.u(6);
                    let offs = self.ru32(a.p(5), c * nblk)?;
                    let mut idx = self.ru32(a.p(7), c * cap)?;
                    let mut sc = self.rf32(a.p(8), c * cap)?;
                    for ch in 0..c {
                        for blk in 0..nblk {
                            let mut pos = offs[ch * nblk + blk] as usize;
                            for (i, &(k, p)) in flags[ch].iter().enumerate().take(((blk + 1) * 2048).min(cells)).skip(blk * 2048) {
                                if k {
                                    if pos < cap {
                                        idx[ch * cap + pos] = i as u32;
                                        sc[ch * cap + pos] = p;
                                    }
                                    pos += 1;
                                }
                            }
                        }
                    }
                    self.wu32(a.p(7), &idx)?;
                    self.wf32(a.p(8), &sc)
                }
            }
            "nms_scan" => {
                let nblk = a.u(3);
                ensure!(threads == 1024, "block must be NMS_SCAN_THREADS = 1024");
                let c = gx;
                let counts = self.ru32(a.p(0), c * nblk)?;
                let mut offs = vec![0u32; c * nblk];
                let mut totals = vec![0u32; c];
                for ch in 0..c {
                    let mut run = 0u32;
                    for b in 0..nblk {
                        offs[ch * nblk + b] = run;
                        run += counts[ch * nblk + b];
                    }
                    totals[ch] = run;
                }
                self.wu32(a.p(1), &offs)?;
                self.wu32(a.p(2), &totals)
            }
            "nms_gather_offsets" => {
                let (cells, cap) = (a.u(1), a.u(4));
                let c = gy;
                ensure!(gx * threads >= cap, "grid does not cover the capacity");
                let totals = self.ru32(a.p(2), c)?;
                let idx = self.ru32(a.p(3), c * cap)?;
                let offsets = self.rf32(a.p(0), 3 * cells)?;
                let mut out = self.rf32(a.p(5), c * cap * 3)?;
                for ch in 0..c {
                    for k in 0..(totals[ch] as usize).min(cap) {
                        let i = idx[ch * cap + k] as usize;
                        for ax in 0..3 {
                            out[(ch * cap + k) * 3 + ax] = offsets[ax * cells + i];
                        }
                    }
                }
                self.wf32(a.p(5), &out)
            }
            _ => bail!("the emulator has no implementation of kernel {name}"),
        }
    }
}

/// `[n, c, vol]` → `[n, vol, c]`.
pub fn to_ndhwc(x: &[f32], n: usize, c: usize, vol: usize) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    for b in 0..n {
        for ch in 0..c {
            for v in 0..vol {
                y[(b * vol + v) * c + ch] = x[(b * c + ch) * vol + v];
            }
        }
    }
    y
}

/// Conv weights `[cout, k, k, k, cin]` (the kernels' layout) → `[cout, cin, k, k, k]` (the CPU's);
/// `kk` = k³.
/// norm.cu::norm_group_params: one group's `(mean, rstd * gamma, beta)` into `params[c0..c0 +
/// cpg]` (a sample's `[c][3]` slice) from its channels' means and M2 (each over `cnt` values).
#[allow(clippy::too_many_arguments)]
fn group_params(means: &[f64], m2s: &[f64], cnt: f64, eps: f64, c0: usize, gamma: Option<&[f32]>, beta: Option<&[f32]>, params: &mut [f32]) {
    let cpg = means.len() as f64;
    let mean = means.iter().sum::<f64>() / cpg;
    let m2: f64 = means.iter().zip(m2s).map(|(mc, m2c)| m2c + cnt * (mc - mean) * (mc - mean)).sum();
    let var = (m2 / cnt / cpg).max(0.0);
    let rstd = 1.0 / (var + eps).sqrt();
    for k in 0..means.len() {
        let ch = c0 + k;
        params[ch * 3] = mean as f32;
        params[ch * 3 + 1] = (rstd * gamma.map_or(1.0, |v| v[ch] as f64)) as f32;
        params[ch * 3 + 2] = beta.map_or(0.0, |v| v[ch]);
    }
}

fn from_ktrsc(w: &[f32], cout: usize, cin: usize, kk: usize) -> Vec<f32> {
    let mut out = vec![0.0; w.len()];
    for co in 0..cout {
        for t in 0..kk {
            for ci in 0..cin {
                out[(co * cin + ci) * kk + t] = w[(co * kk + t) * cin + ci];
            }
        }
    }
    out
}

/// `[n, vol, c]` → `[n, c, vol]`.
pub fn from_ndhwc(x: &[f32], n: usize, c: usize, vol: usize) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    for b in 0..n {
        for ch in 0..c {
            for v in 0..vol {
                y[(b * c + ch) * vol + v] = x[(b * vol + v) * c + ch];
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The halo kernels' statistics units list every output voxel once, each 128-voxel brick
    /// inside one sample and 2x4x16 in shape.
    #[test]
    fn the_halo_unit_order_lists_every_voxel_once_brick_by_brick() {
        let od = [4, 8, 32];
        let o = halo_unit_order(2, od);
        let mut seen = o.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..2 * vol(od)).collect::<Vec<_>>());
        for brick in o.chunks(128) {
            let at = |m: usize| (m / vol(od), m / (od[1] * od[2]) % od[0], m / od[2] % od[1], m % od[2]);
            let (s0, z0, y0, x0) = at(brick[0]);
            for (r, &m) in brick.iter().enumerate() {
                assert_eq!(at(m), (s0, z0 + r / 64, y0 + r / 16 % 4, x0 + r % 16));
            }
        }
    }
}
