//! CUDA throughput: the fused tensor-core residual block against the cuDNN path, level by level,
//! and one whole tile per architecture and convolution backend.
//!
//! `cargo bench --bench cuda_ops` on a machine with a GPU (cuda:0, or `FASTDET_BENCH_DEVICE=N`).
//! Without one it prints why and measures nothing, unless `FASTDET_BENCH_EMULATOR=1`: then it runs
//! on the CPU emulator of the kernels at toy sizes, which only checks that the bench itself works
//! (CI runs it that way with `-- --test`). `tools/device-check.sh` runs the compiled bench binary.
//!
//! Groups:
//! - `block_<C>ch_<dims>`: one SegResNetV2 residual block at the seed's level widths
//!   (norm + relu -> conv 3x3x3 -> norm + relu -> conv 3x3x3 -> + input, then the next block's
//!   norm statistics), three ways:
//!   `cudnn`: the engine's cuDNN path (norm in three passes, cuDNN conv, bias pass, add pass,
//!   statistics pass);
//!   `tc_unfused`: the same passes with conv3d_tc_f16 in place of cuDNN;
//!   `tc_fused`: conv3d_tc_f16 applying each norm in its loads, adding the residual and writing
//!   the next norm's statistics in its store (norm_finalize_tiles in between);
//!   `tc_halo_fused`: the same on the halo-tile kernels (conv3d_tc_halo: each block stages its
//!   input once per 16 channels, normalised as it is stored; `FASTDET_TC_HALO=on`);
//!   `tc_store_fused`: the same store, each norm a norm_apply pass of its own (what the engine
//!   does by default: a 3x3x3 conv would renormalise each input element 27 times in its loads);
//!   `tc_store_fused_wide`: `tc_store_fused` on the 128 x 64 tile (`FASTDET_TC_TILES=wide`;
//!   levels of more than 32 channels); `tc_store_fused_async`: `tc_store_fused` loading through
//!   cp.async (`FASTDET_TC_ASYNC=on`).
//! - `convt_<cin>to<cout>_<dims>`: DynUNet's transposed convolutions (kernel 2, stride 2) at the
//!   seed widths on a 192x128x128 tile, written into channels [0, cout) of their concat buffer:
//!   `fma` (conv_transpose2_f16, f32 FMAs on the CUDA cores; `FASTDET_CONVT=fma`) and `tc`
//!   (conv_transpose2_tc_f16, tensor cores; the default).
//! - `tile_<arch>`: `CudaEngine::forward_device` on one tile (input upload included, outputs left
//!   on the device), backend `cudnn` (the default), `tc` (`FASTDET_CONV=tc`),
//!   `tc_norm_in_loads` (`FASTDET_CONV=tc FASTDET_TC_NORM_IN_LOADS=all`), `tc_wide`
//!   (`FASTDET_CONV=tc FASTDET_TC_TILES=wide`), `tc_async` (`FASTDET_CONV=tc FASTDET_TC_ASYNC=on`)
//!   and `tc_halo_norm_in_loads` (`FASTDET_CONV=tc FASTDET_TC_HALO=on FASTDET_TC_NORM_IN_LOADS=all`).
//!
//! Throughput is in FLOP/s of the convolutions (2 * MACs).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use criterion::{Criterion, Throughput};
use fastdet::engine::cuda::dnn::{ConvPlan, Dnn, DnnApi};
use fastdet::engine::cuda::gpu::{DevBuf, Gpu};
use fastdet::engine::cuda::ops::{self, vol, ConvShape, NormPrologue, TcTiles};
use fastdet::engine::cuda::engine::TcPolicy;
use fastdet::engine::cuda::{ConvBackend, CudaEngine};
use fastdet::model::graph::{Act, Graph};
use fastdet::model::spec::{Arch, ModelSpec};
use fastdet::util::SplitMix64;
use fastdet::weights::Weights;
use half::f16;

/// Where the bench runs, and at which sizes.
struct Target {
    gpu: Arc<Gpu>,
    /// Toy sizes (the emulator).
    toy: bool,
}

impl Target {
    fn open() -> Option<Target> {
        let ordinal: usize = std::env::var("FASTDET_BENCH_DEVICE").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        match Gpu::open(ordinal, None) {
            Ok(gpu) => Some(Target { gpu, toy: false }),
            Err(e) if std::env::var("FASTDET_BENCH_EMULATOR").is_ok_and(|v| v == "1") => {
                eprintln!("cuda_ops: no GPU ({e:#}); FASTDET_BENCH_EMULATOR=1: toy sizes on the kernel emulator, timings mean nothing");
                Some(Target { gpu: Gpu::emulator().ok()?, toy: true })
            }
            Err(e) => {
                eprintln!("cuda_ops: skipped, no GPU: {e:#} (FASTDET_BENCH_EMULATOR=1 runs it on the kernel emulator)");
                None
            }
        }
    }
}

/// A residual block's 3x3x3 stride-1 convolution: one sample of `dims`, `c` channels in and out.
fn block_conv(dims: [usize; 3], c: usize) -> ConvShape {
    ConvShape { n: 1, dims, cin: c, cout: c, k: 3, stride: 1, pad: 1 }
}

fn random16(r: &mut SplitMix64, n: usize, lo: f32, hi: f32) -> Vec<f16> {
    let mut v = vec![0.0f32; n];
    r.fill_uniform(&mut v, lo, hi);
    v.into_iter().map(f16::from_f32).collect()
}

fn random32(r: &mut SplitMix64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut v = vec![0.0f32; n];
    r.fill_uniform(&mut v, lo, hi);
    v
}

/// One residual block's device buffers: input (also the identity), two convs' weights and
/// biases, two GroupNorms' affines, scratch.
struct Block {
    c: usize,
    dims: [usize; 3],
    groups: usize,
    x: DevBuf,
    w: [DevBuf; 2],
    b: [DevBuf; 2],
    gamma: [DevBuf; 2],
    beta: [DevBuf; 2],
    t: DevBuf,
    y: DevBuf,
    out: DevBuf,
    partial: DevBuf,
    params: [DevBuf; 2],
    tiles: [DevBuf; 3],
}

impl Block {
    fn new(gpu: &Gpu, c: usize, dims: [usize; 3]) -> Result<Block> {
        let mut r = SplitMix64::new(c as u64);
        let v = vol(dims);
        let e = v * c;
        let scale = (1.0 / (27.0 * c as f32)).sqrt();
        let w = |r: &mut SplitMix64| gpu.upload(&random16(r, c * 27 * c, -scale, scale));
        let f = |r: &mut SplitMix64, lo, hi| gpu.upload(&random32(r, c, lo, hi));
        let tiles = ops::conv_tc_stats_bytes(1, v, c).context("block volume must be a multiple of 64 voxels")?;
        Ok(Block {
            c,
            dims,
            groups: 8,
            x: gpu.upload(&random16(&mut r, e, -1.0, 1.0))?,
            w: [w(&mut r)?, w(&mut r)?],
            b: [f(&mut r, -0.1, 0.1)?, f(&mut r, -0.1, 0.1)?],
            gamma: [f(&mut r, 0.5, 1.5)?, f(&mut r, 0.5, 1.5)?],
            beta: [f(&mut r, -0.5, 0.5)?, f(&mut r, -0.5, 0.5)?],
            t: gpu.alloc(e * 2)?,
            y: gpu.alloc(e * 2)?,
            out: gpu.alloc(e * 2)?,
            partial: gpu.alloc(ops::norm_scratch_bytes(1, c, v).0)?,
            params: [gpu.alloc(c * 3 * 4)?, gpu.alloc(c * 3 * 4)?],
            tiles: [gpu.alloc(tiles)?, gpu.alloc(tiles)?, gpu.alloc(tiles)?],
        })
    }

    fn flops(&self) -> u64 {
        2 * 2 * (27 * self.c * self.c * vol(self.dims)) as u64
    }

    /// GroupNorm(+ relu) of `x` into `y` in three passes (statistics, finalize, apply).
    fn norm(&self, gpu: &Gpu, i: usize, x: u64, y: Option<u64>) -> Result<()> {
        ops::norm(gpu, x, y, 1, self.c, vol(self.dims), self.groups, Some(self.gamma[i].ptr), Some(self.beta[i].ptr), Act::None, Act::Relu, self.partial.ptr, self.params[i].ptr)
    }

    /// The unfused block with `conv(i, x, y)` for the convolutions.
    fn unfused(&self, gpu: &Gpu, mut conv: impl FnMut(usize, u64, u64) -> Result<()>) -> Result<()> {
        let e = vol(self.dims) * self.c;
        self.norm(gpu, 0, self.x.ptr, Some(self.t.ptr))?;
        conv(0, self.t.ptr, self.y.ptr)?;
        ops::bias_act(gpu, self.y.ptr, self.y.ptr, Some(self.b[0].ptr), e, self.c, Act::None)?;
        self.norm(gpu, 1, self.y.ptr, Some(self.t.ptr))?;
        conv(1, self.t.ptr, self.y.ptr)?;
        ops::bias_act(gpu, self.y.ptr, self.y.ptr, Some(self.b[1].ptr), e, self.c, Act::None)?;
        ops::add_act(gpu, self.y.ptr, self.x.ptr, self.out.ptr, e, Act::None)?;
        // The next block's norm statistics.
        self.norm(gpu, 0, self.out.ptr, None)
    }

    /// The fused block, on the halo-tile kernels when `halo`; `tiles[0]` holds the input's
    /// statistics (written once by `prepare`).
    fn fused(&self, gpu: &Gpu, halo: bool) -> Result<()> {
        let (c, d, v) = (self.c, self.dims, vol(self.dims));
        let tc = TcTiles::Standard.variant(c).with_halo(halo);
        let fin = |i: usize, tiles: &DevBuf| ops::norm_params_from_tiles(gpu, tiles.ptr, 1, c, v, self.groups, Some(self.gamma[i].ptr), Some(self.beta[i].ptr), self.params[i].ptr);
        let pro = |i: usize| Some(NormPrologue { params: self.params[i].ptr, pre: Act::None, post: Act::Relu });
        fin(0, &self.tiles[0])?;
        ops::conv_tc(gpu, tc, self.x.ptr, self.w[0].ptr, Some(self.b[0].ptr), None, pro(0), self.y.ptr, Some(self.tiles[1].ptr), None, block_conv(d, c), Act::None)?;
        fin(1, &self.tiles[1])?;
        ops::conv_tc(gpu, tc, self.y.ptr, self.w[1].ptr, Some(self.b[1].ptr), Some(self.x.ptr), pro(1), self.out.ptr, Some(self.tiles[2].ptr), None, block_conv(d, c), Act::None)?;
        fin(0, &self.tiles[2])
    }

    /// The engine's default tensor-core block: each norm a pass of its own (norm_apply on the
    /// statistics the previous conv's store wrote), the residual and the next norm's statistics
    /// in the store, on block tiles `tiles`, with cp.async loads when `async_loads`; `tiles[0]`
    /// as for `fused`.
    fn store_fused(&self, gpu: &Gpu, tiles: TcTiles, async_loads: bool) -> Result<()> {
        let (c, d, v) = (self.c, self.dims, vol(self.dims));
        let tc = tiles.variant(c).with_async_loads(async_loads);
        let fin = |i: usize, tiles: &DevBuf| ops::norm_params_from_tiles(gpu, tiles.ptr, 1, c, v, self.groups, Some(self.gamma[i].ptr), Some(self.beta[i].ptr), self.params[i].ptr);
        let apply = |i: usize, x: u64| ops::norm_apply(gpu, x, self.t.ptr, 1, c, v, self.params[i].ptr, Act::None, Act::Relu);
        fin(0, &self.tiles[0])?;
        apply(0, self.x.ptr)?;
        ops::conv_tc(gpu, tc, self.t.ptr, self.w[0].ptr, Some(self.b[0].ptr), None, None, self.y.ptr, Some(self.tiles[1].ptr), None, block_conv(d, c), Act::None)?;
        fin(1, &self.tiles[1])?;
        apply(1, self.y.ptr)?;
        ops::conv_tc(gpu, tc, self.t.ptr, self.w[1].ptr, Some(self.b[1].ptr), Some(self.x.ptr), None, self.out.ptr, Some(self.tiles[2].ptr), None, block_conv(d, c), Act::None)?;
        fin(0, &self.tiles[2])
    }

    /// The input's per-block statistics, as the previous fused conv would have left them.
    fn prepare(&self, gpu: &Gpu) -> Result<()> {
        // An identity-free 1x1x1 pass is not available; a 3x3x3 conv of x into scratch writes
        // statistics of the right shape (their values only steer the normalisation).
        ops::conv_tc(gpu, TcTiles::Standard.variant(self.c), self.x.ptr, self.w[0].ptr, None, None, None, self.t.ptr, Some(self.tiles[0].ptr), None, block_conv(self.dims, self.c), Act::None)
    }
}

fn blocks(c: &mut Criterion, t: &Target) {
    let gpu = &t.gpu;
    // SegResNetV2 (init_filters 32) levels on a 192x128x128 tile (toy: a 16- and a 64-channel one, so
    // that every variant runs).
    let levels: Vec<(usize, [usize; 3])> =
        if t.toy { vec![(16, [8, 8, 16]), (64, [4, 4, 8])] } else { vec![(32, [192, 128, 128]), (64, [96, 64, 64]), (128, [48, 32, 32]), (256, [24, 16, 16])] };
    let dnn = match Dnn::new(gpu) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("cuda_ops: cudnn variants skipped: {e:#}");
            None
        }
    };
    let tc = gpu.check_tensor_cores();
    if let Err(why) = &tc {
        eprintln!("cuda_ops: tensor-core variants skipped: {why}");
    }
    for (ch, dims) in levels {
        let b = match Block::new(gpu, ch, dims) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("cuda_ops: block {ch}ch {dims:?} skipped: {e:#}");
                continue;
            }
        };
        let mut g = c.benchmark_group(format!("block_{ch}ch_{}x{}x{}", dims[0], dims[1], dims[2]));
        g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_millis(if t.toy { 1000 } else { 1500 }));
        g.throughput(Throughput::Elements(b.flops()));
        // cuDNN on its legacy API and on its graph API.
        for (api, label) in [(DnnApi::Legacy, "cudnn"), (DnnApi::Graph, "cudnn_graph")] {
            let Some(dnn) = &dnn else { break };
            let plan = ConvPlan::new_api(dnn, block_conv(dims, ch), api);
            match plan {
                Ok(mut plan) => {
                    let mut ws = None;
                    let mut run = || -> Result<()> {
                        b.unfused(gpu, |i, x, y| plan.run(dnn, gpu, x, b.w[i].ptr, y, &mut ws))?;
                        gpu.sync("block")
                    };
                    match run() {
                        Ok(()) => {
                            g.bench_function(label, |it| it.iter(|| run().unwrap()));
                        }
                        Err(e) => eprintln!("cuda_ops: block {ch}ch {dims:?} {label} skipped: {e:#}"),
                    }
                }
                Err(e) => eprintln!("cuda_ops: {label} plan for {ch}ch {dims:?}: {e:#}"),
            }
        }
        if tc.is_ok() {
            let unfused = || -> Result<()> {
                b.unfused(gpu, |i, x, y| ops::conv_tc(gpu, TcTiles::Standard.variant(ch), x, b.w[i].ptr, None, None, None, y, None, None, block_conv(dims, ch), Act::None))?;
                gpu.sync("block")
            };
            let fused = |halo: bool| -> Result<()> {
                b.fused(gpu, halo)?;
                gpu.sync("block")
            };
            // One untimed pass each: a variant that fails is reported and skipped, not a panic
            // that ends the whole bench.
            match unfused() {
                Ok(()) => {
                    g.bench_function("tc_unfused", |it| it.iter(|| unfused().unwrap()));
                }
                Err(e) => eprintln!("cuda_ops: block {ch}ch {dims:?} tc_unfused skipped: {e:#}"),
            }
            // The halo kernels where the level's bricks fit (every seed level; the toy's first).
            for (label, halo) in [("tc_fused", false), ("tc_halo_fused", true)] {
                if halo && !ops::halo_fits(block_conv(dims, ch)) {
                    eprintln!("cuda_ops: block {ch}ch {dims:?} {label} skipped: the halo kernels do not fit {dims:?}");
                    continue;
                }
                match b.prepare(gpu).and_then(|()| fused(halo)) {
                    Ok(()) => {
                        g.bench_function(label, |it| it.iter(|| fused(halo).unwrap()));
                    }
                    Err(e) => eprintln!("cuda_ops: block {ch}ch {dims:?} {label} skipped: {e:#}"),
                }
            }
            for (label, tiles, async_loads) in [("tc_store_fused", TcTiles::Standard, false), ("tc_store_fused_wide", TcTiles::Wide, false), ("tc_store_fused_async", TcTiles::Standard, true)] {
                if tiles != TcTiles::Standard && tiles.variant(ch) == TcTiles::Standard.variant(ch) {
                    continue;
                }
                let store_fused = || -> Result<()> {
                    b.store_fused(gpu, tiles, async_loads)?;
                    gpu.sync("block")
                };
                match b.prepare(gpu).and_then(|()| store_fused()) {
                    Ok(()) => {
                        g.bench_function(label, |it| it.iter(|| store_fused().unwrap()));
                    }
                    Err(e) => eprintln!("cuda_ops: block {ch}ch {dims:?} {label} skipped: {e:#}"),
                }
            }
        }
        g.finish();
    }
}

fn transposed_convs(c: &mut Criterion, t: &Target) {
    let gpu = &t.gpu;
    // (cin, cout, input dims): DynUNet's up blocks on a 192x128x128 tile (`fastdet inspect --arch
    // dynunet --graph`); toy: two small ones.
    let shapes: Vec<(usize, usize, [usize; 3])> = if t.toy {
        vec![(32, 16, [4, 4, 8]), (64, 32, [2, 4, 4])]
    } else {
        vec![(320, 320, [6, 4, 4]), (320, 256, [12, 8, 8]), (256, 128, [24, 16, 16]), (128, 64, [48, 32, 32])]
    };
    let mut r = SplitMix64::new(5);
    for (cin, cout, dims) in shapes {
        let m = vol(dims);
        let bufs = (|| -> Result<(DevBuf, DevBuf, DevBuf)> {
            Ok((gpu.upload(&random16(&mut r, m * cin, -1.0, 1.0))?, gpu.upload(&random16(&mut r, cin * cout * 8, -0.1, 0.1))?, gpu.alloc(8 * m * 2 * cout * 2)?))
        })();
        let (x, w, out) = match bufs {
            Ok(b) => b,
            Err(e) => {
                eprintln!("cuda_ops: convt {cin}->{cout} {dims:?} skipped: {e:#}");
                continue;
            }
        };
        let mut g = c.benchmark_group(format!("convt_{cin}to{cout}_{}x{}x{}", dims[0], dims[1], dims[2]));
        g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_millis(if t.toy { 500 } else { 700 }));
        g.throughput(Throughput::Elements((2 * m * cin * 8 * cout) as u64));
        for (label, kernel) in [("fma", ops::ConvtKernel::Fma), ("tc", ops::ConvtKernel::TensorCore)] {
            let run = || -> Result<()> {
                let ran = ops::conv_transpose2(gpu, kernel, x.ptr, w.ptr, out.ptr, 1, dims, cin, cout, 2 * cout, 0)?;
                anyhow::ensure!(ran == kernel, "{} ran instead of {}", ran.name(), kernel.name());
                gpu.sync("convt")
            };
            match run() {
                Ok(()) => {
                    g.bench_function(label, |it| it.iter(|| run().unwrap()));
                }
                Err(e) => eprintln!("cuda_ops: convt {cin}->{cout} {dims:?} {label} skipped: {e:#}"),
            }
        }
        g.finish();
    }
}

fn tiles(c: &mut Criterion, t: &Target) {
    let gpu = &t.gpu;
    let tile = if t.toy { [32, 32, 32] } else { [192, 128, 128] };
    for arch in [Arch::Segresnetv2, Arch::Dynunet] {
        let spec = ModelSpec::seed(arch);
        let w = Weights::random(&spec, 1);
        let flops = Graph::build(&spec).unwrap().flops(tile);
        let mut input = vec![0.0f32; vol(tile)];
        SplitMix64::new(2).fill_uniform(&mut input, 0.0, 1.0);
        let mut g = c.benchmark_group(format!("tile_{}", arch.name()));
        g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(if t.toy { 1 } else { 2 }));
        g.throughput(Throughput::Elements(flops));
        // The tensor-core path as it runs by default, with every norm in the next conv's loads,
        // on the wide tiles and with cp.async loads.
        // cuDNN on its legacy API and on its graph API (engines in heuristic order).
        let mut variants = vec![("cudnn", ConvBackend::Cudnn, TcPolicy::default(), DnnApi::Legacy), ("cudnn_graph", ConvBackend::Cudnn, TcPolicy::default(), DnnApi::Graph)];
        variants.extend(TcPolicy::compared().map(|(label, _, policy)| (label, ConvBackend::TensorCore, policy, DnnApi::Legacy)));
        for (label, backend, policy, api) in variants {
            let mut e = match CudaEngine::on_with(gpu.clone(), &w, backend, policy) {
                Ok(mut e) => {
                    e.set_cudnn_api(api);
                    e
                }
                Err(err) => {
                    eprintln!("cuda_ops: tile_{} {label} skipped: {err:#}", arch.name());
                    continue;
                }
            };
            let mut run = || -> Result<()> {
                let out = e.forward_device(&input, 1, tile, false)?;
                e.recycle(out);
                gpu.sync("tile")
            };
            match run() {
                Ok(()) => {
                    g.bench_function(label, |it| it.iter(|| run().unwrap()));
                }
                Err(err) => eprintln!("cuda_ops: tile_{} {label} skipped: {err:#}", arch.name()),
            }
        }
        g.finish();
    }
}

fn main() {
    let Some(target) = Target::open() else { return };
    let mut c = Criterion::default().configure_from_args();
    blocks(&mut c, &target);
    tiles(&mut c, &target);
    // Last: the device check gives the whole bench a fixed time, and these matter least.
    transposed_convs(&mut c, &target);
    c.final_summary();
}
