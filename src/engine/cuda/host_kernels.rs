//! The kernels' own CUDA source, compiled for the host (testing without a GPU).
//!
//! `kernels/host/cuda_fp16.h` stands in for CUDA's header: with it the system C++ compiler
//! (`$CXX`, else `c++`) builds every `kernels/*.cu` into one shared library in which each thread
//! of a block is a fiber, barriers and warp exchanges wait for the threads they name, and
//! `__shared__` is shared by the block. The emulator (`Gpu::emulator_host_kernels`) then runs
//! that code instead of its Rust re-implementations, so the self-test's kernel rows compare the
//! real kernels (index arithmetic, shared-memory staging, barriers, reduction order) against the
//! CPU twins. The library is cached under the kernel cache (`host/<hash>/`), keyed by the sources,
//! the header, the flags and the compiler's version.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::gpu::Arg;
use super::kernels::{kernel_names, SOURCES};
use super::nvrtc::KernelCache;

/// The stand-in for `<cuda_fp16.h>`.
pub const HOST_HEADER: &str = include_str!("../../../kernels/host/cuda_fp16.h");
/// The stand-in for `<mma.h>` (WMMA).
pub const HOST_MMA_HEADER: &str = include_str!("../../../kernels/host/mma.h");

/// No FMA contraction and no fast math: host results are IEEE, so a mismatch is the kernel's.
/// `-fsanitize=alignment`: a misaligned vector access, which faults on a GPU but not on x86,
/// fails the launch (the handler is in kernels/host/cuda_fp16.h).
const FLAGS: &[&str] = &["-std=c++17", "-O2", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-pthread", SANITIZE_ALIGNMENT];
const SANITIZE_ALIGNMENT: &str = "-fsanitize=alignment";

/// The compiler flags: FLAGS, plus the FMA instruction where the CPU has it (the kernels' explicit
/// fmaf then compiles to one instruction instead of a libm call; same result, exactly rounded).
fn flags() -> Vec<&'static str> {
    let mut f = FLAGS.to_vec();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        f.push("-mfma");
    }
    f
}

type LaunchFn = unsafe extern "C" fn(*const u32, *const *mut c_void, *mut c_char, usize) -> c_int;

pub struct HostKernels {
    _lib: libloading::Library,
    fns: HashMap<String, LaunchFn>,
    pub path: PathBuf,
}

fn compiler() -> String {
    std::env::var("CXX").ok().filter(|c| !c.is_empty()).unwrap_or_else(|| "c++".into())
}

/// The C++ compiler's first `--version` line, or why there is none.
pub fn compiler_version() -> Result<String> {
    let cxx = compiler();
    let out = Command::new(&cxx)
        .arg("--version")
        .output()
        .map_err(|e| anyhow::anyhow!("no C++ compiler to build the kernels for the host ({cxx}: {e}); set CXX"))?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_string())
}

/// The C++ translation unit for one kernels/*.cu file: the source (common.cuh in front) and an
/// exported launcher per kernel.
fn translation_unit(src: &str) -> String {
    let mut s = String::from(src);
    s.push_str("\n// Host launchers (src/engine/cuda/host_kernels.rs)\n");
    for k in kernel_names(src) {
        s.push_str(&format!("FDH_EXPORT({k})\n"));
    }
    s
}

impl HostKernels {
    /// The library for the current sources: built once per process (and once per source version
    /// on disk). Errors say why (no compiler, a compile error with the compiler's output).
    pub fn shared() -> Result<Arc<HostKernels>> {
        static LIB: OnceLock<Mutex<Option<Arc<HostKernels>>>> = OnceLock::new();
        let mut slot = LIB.get_or_init(|| Mutex::new(None)).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = slot.as_ref() {
            return Ok(k.clone());
        }
        let k = Arc::new(HostKernels::build(&KernelCache::default_dir().join("host"))?);
        *slot = Some(k.clone());
        Ok(k)
    }

    /// The library of kernels/*.cu, built under `cache` unless already there.
    pub fn build(cache: &Path) -> Result<HostKernels> {
        let sources: Vec<(String, String)> = SOURCES.iter().map(|(n, s)| (n.to_string(), s.to_string())).collect();
        HostKernels::build_sources(cache, &sources)
    }

    /// The library of `(file name, CUDA source)` pairs (each a translation unit), with the
    /// alignment checks; without them, and a warning, where the toolchain cannot build or load
    /// them (no sanitizer runtime).
    pub fn build_sources(cache: &Path, sources: &[(String, String)]) -> Result<HostKernels> {
        let checked = flags();
        match HostKernels::build_with(cache, sources, &checked) {
            Ok(k) => Ok(k),
            Err(e) => {
                let plain: Vec<&str> = checked.iter().copied().filter(|f| *f != SANITIZE_ALIGNMENT).collect();
                let k = HostKernels::build_with(cache, sources, &plain)?;
                crate::errln!("warning: host kernels built without alignment checks ({SANITIZE_ALIGNMENT} failed: {})", format!("{e:#}").lines().next().unwrap_or(""));
                Ok(k)
            }
        }
    }

    fn build_with(cache: &Path, sources: &[(String, String)], flags: &[&str]) -> Result<HostKernels> {
        let cxx = compiler();
        let version = compiler_version()?;
        let mut h = Sha256::new();
        for part in [HOST_HEADER, HOST_MMA_HEADER, &cxx, &version].into_iter().chain(flags.iter().copied()) {
            h.update(part.as_bytes());
            h.update([0u8]);
        }
        for (name, src) in sources {
            h.update(name.as_bytes());
            h.update([0u8]);
            h.update(src.as_bytes());
            h.update([0u8]);
        }
        let key: String = h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
        let dir = cache.join(&key);
        let lib_path = dir.join("libfastdet_host_kernels.so");
        if !lib_path.exists() {
            static BUILDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let work = dir.join(format!("build-{}-{n}", std::process::id()));
            let inc = work.join("include");
            std::fs::create_dir_all(&inc).with_context(|| format!("creating {}", inc.display()))?;
            std::fs::write(inc.join("cuda_fp16.h"), HOST_HEADER)?;
            std::fs::write(inc.join("mma.h"), HOST_MMA_HEADER)?;
            let mut units = Vec::new();
            for (name, src) in sources {
                let p = work.join(format!("{name}.cpp"));
                std::fs::write(&p, translation_unit(src)).with_context(|| format!("writing {}", p.display()))?;
                units.push(p);
            }
            let tmp = work.join("lib.so");
            let out = Command::new(&cxx)
                .args(flags)
                .arg("-I")
                .arg(&inc)
                .args(&units)
                .arg("-o")
                .arg(&tmp)
                .output()
                .with_context(|| format!("running {cxx}"))?;
            if !out.status.success() {
                let log = String::from_utf8_lossy(&out.stderr);
                let head: String = log.lines().take(60).collect::<Vec<_>>().join("\n");
                bail!("building kernels/*.cu for the host with {cxx} failed:\n{head}");
            }
            // Rename into place so that a concurrent build never loads a half-written library.
            std::fs::rename(&tmp, &lib_path).with_context(|| format!("moving the host kernels to {}", lib_path.display()))?;
            let _ = std::fs::remove_dir_all(&work);
        }
        // SAFETY: a library this function built from kernels/*.cu and the host header; its
        // initialisers only set up function statics.
        let lib = unsafe { libloading::Library::new(&lib_path) }.with_context(|| format!("loading {}", lib_path.display()))?;
        let mut fns = HashMap::new();
        for (_, src) in sources {
            for k in kernel_names(src) {
                let sym = format!("fdh_launch_{k}\0");
                // SAFETY: FDH_EXPORT defines every fdh_launch_* with exactly LaunchFn's signature.
                let f: LaunchFn = *unsafe { lib.get::<LaunchFn>(sym.as_bytes()) }.with_context(|| format!("{} has no launcher for {k}", lib_path.display()))?;
                fns.insert(k, f);
            }
        }
        Ok(HostKernels { _lib: lib, fns, path: lib_path })
    }

    /// Runs kernel `name` on the host. Every pointer in `args` must be a host address holding
    /// what the kernel reads and writes (the emulator's allocations are).
    ///
    /// # Safety
    /// The arguments must match the kernel's signature (checked by `Gpu::launch`) and every
    /// pointer must hold the sizes the kernel's header requires.
    pub unsafe fn launch(&self, name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), args: &[Arg]) -> Result<()> {
        let f = self.fns.get(name).with_context(|| format!("no host launcher for {name}"))?;
        let mut slots: Vec<[u8; 8]> = args
            .iter()
            .map(|a| {
                let mut s = [0u8; 8];
                match *a {
                    Arg::Ptr(p) => s.copy_from_slice(&p.to_ne_bytes()),
                    Arg::I64(v) => s.copy_from_slice(&v.to_ne_bytes()),
                    Arg::I32(v) => s[..4].copy_from_slice(&v.to_ne_bytes()),
                    Arg::U32(v) => s[..4].copy_from_slice(&v.to_ne_bytes()),
                    Arg::F32(v) => s[..4].copy_from_slice(&v.to_ne_bytes()),
                }
                s
            })
            .collect();
        let params: Vec<*mut c_void> = slots.iter_mut().map(|s| s.as_mut_ptr() as *mut c_void).collect();
        let dims = [grid.0, grid.1, grid.2, block.0, block.1, block.2];
        let mut err = [0 as c_char; 512];
        // SAFETY: the caller's contract; `dims`, `params` and `err` outlive the call.
        let rc = unsafe { f(dims.as_ptr(), params.as_ptr(), err.as_mut_ptr(), err.len()) };
        if rc != 0 {
            // SAFETY: the launcher NUL-terminates what it writes (snprintf).
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
            bail!("{name} on the host: {msg}");
        }
        Ok(())
    }
}

/// Tests: whether the host kernels can be built here. Without a C++ compiler, prints why and
/// answers false, unless FASTDET_REQUIRE_HOST_KERNELS=1 (CI), which makes it a failure.
#[cfg(test)]
pub(crate) fn available_for_tests() -> bool {
    match compiler_version() {
        Ok(_) => true,
        Err(e) => {
            assert!(std::env::var("FASTDET_REQUIRE_HOST_KERNELS").map_or(true, |v| v != "1"), "{e:#}");
            println!("SKIP: {e:#}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cuda::emu::Emu;

    /// Kernels that exercise the host header itself: barriers, thread numbering, warp exchanges,
    /// fp16 rounding, and the faults it must report.
    const PROBES: &str = r#"
#include <cuda_fp16.h>
#include <mma.h>

// Each thread reads its neighbour's slot: right only when the barrier separates writes and reads.
extern "C" __global__ void probe_neighbour(int* out, int with_barrier) {
    __shared__ int s[64];
    s[threadIdx.x] = (int)(threadIdx.x + 100 * blockIdx.x);
    if (with_barrier) __syncthreads();
    out[blockIdx.x * 64 + threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

// Two warps: each lane writes its slot, the warp exchanges a value (a warp operation, as WMMA
// calls are), then reads the other warp's slot: right only with the block barrier, since nothing
// orders one warp's writes before another warp's reads.
extern "C" __global__ void probe_warp_skew(int* out, int with_barrier, int salt) {
    __shared__ int s[64];
    const int t = threadIdx.x;
    s[t] = t + salt + 100 * blockIdx.x;
    const int v = __shfl_xor_sync(0xffffffffu, t, 1);
    if (with_barrier) __syncthreads();
    out[64 * blockIdx.x + t] = s[(t + 32) % 64] + 0 * v;
}

// Block (8, 4, 2) x grid (2, 3, 1): numbering, then warp scan / ballot / butterfly / shift and a
// block-wide count, each written to its own plane of `out` (7 planes of 384 ints).
extern "C" __global__ void probe_warps(int* out) {
    const int t = threadIdx.x + 8 * (threadIdx.y + 4 * threadIdx.z);
    const int b = blockIdx.x + 2 * blockIdx.y;
    const int g = b * 64 + t, lane = t & 31;
    out[g] = threadIdx.x + 10 * threadIdx.y + 100 * threadIdx.z + 1000 * blockIdx.y + 10000 * blockIdx.x;
    int inc = lane + 1;
    for (int o = 1; o < 32; o <<= 1) {
        const int u = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += u;
    }
    out[384 + g] = inc;
    out[2 * 384 + g] = (int)__ballot_sync(0xffffffffu, lane % 3 == 0);
    int sum = lane;
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    out[3 * 384 + g] = sum;
    out[4 * 384 + g] = __shfl_down_sync(0xffffffffu, lane * 2, 3);
    out[5 * 384 + g] = __syncthreads_count(t % 5 == 0);
    out[6 * 384 + g] = __shfl_sync(0xffffffffu, lane * 7, 5, 8);
}

extern "C" __global__ void probe_half(const float* x, unsigned short* bits, float* back, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const __half h = __float2half_rn(x[i]);
    unsigned short u;
    memcpy(&u, &h, 2);
    bits[i] = u;
    back[i] = __half2float(h);
}

extern "C" __global__ void probe_exit_before_barrier(int* out) {
    if (threadIdx.x >= 16) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

extern "C" __global__ void probe_lane_missing(int* out) {
    if (threadIdx.x == 3) return;
    out[threadIdx.x] = __shfl_sync(0xffffffffu, (int)threadIdx.x, 0);
}

// One warp: C = A (row-major) x B (col-major), 16x16x16, staged through shared memory. With
// `diverge`, lane 5 passes another (aligned) pointer: a different operation on a GPU, an error here.
extern "C" __global__ void probe_wmma(const float* a, const float* b, float* c, int diverge) {
    __shared__ __align__(32) __half as[512];
    __shared__ __align__(32) __half bs[256];
    __shared__ __align__(32) float cs[256];
    for (int i = threadIdx.x; i < 256; i += 32) {
        as[i] = __float2half_rn(a[i]);
        bs[i] = __float2half_rn(b[i]);
    }
    __syncthreads();
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> fa;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __half, nvcuda::wmma::col_major> fb;
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> fc;
    nvcuda::wmma::fill_fragment(fc, 1.0f);
    nvcuda::wmma::load_matrix_sync(fa, as + (diverge && threadIdx.x == 5 ? 256 : 0), 16);
    nvcuda::wmma::load_matrix_sync(fb, bs, 16);
    nvcuda::wmma::mma_sync(fc, fa, fb, fc);
    nvcuda::wmma::store_matrix_sync(cs, fc, 16, nvcuda::wmma::mem_row_major);
    __syncthreads();
    for (int i = threadIdx.x; i < 256; i += 32) c[i] = cs[i];
}

// Asynchronous copies: thread t (of 4) fills its 16 bytes of shared memory with -7, copies
// src[4t, 4t + 4) over them (thread 3 a zero fill), then reads its second int before and after
// the wait: out[8 b + t] before, out[8 b + 4 + t] after.
extern "C" __global__ void probe_async_copy(int* out, const int* src) {
    __shared__ __align__(16) int s[16];
    const int t = threadIdx.x;
    for (int i = 0; i < 4; ++i) s[4 * t + i] = -7;
    fd_cp_async16(&s[4 * t], src + 4 * t, t < 3 ? 16 : 0);
    fd_cp_async_commit();
    out[8 * blockIdx.x + t] = s[4 * t + 1];
    fd_cp_async_wait<0>();
    out[8 * blockIdx.x + 4 + t] = s[4 * t + 1];
}

// Thread `who` traps; the others reach a barrier it never will.
extern "C" __global__ void probe_trap(int* out, int who) {
    if ((int)threadIdx.x == who) __trap();
    __syncthreads();
    out[threadIdx.x] = 1;
}

// Thread 0 reads 4 ints as one int4 from out + shift (16-byte aligned only when shift % 4 == 0).
extern "C" __global__ void probe_vector_load(int* out, int shift) {
    if (threadIdx.x == 0) {
        const int4 v = *reinterpret_cast<const int4*>(out + shift);
        out[8] = v.x + v.y + v.z + v.w;
    }
}

// Block b's thread 0 writes out[b] = out[b - 1] + 1 (out[0] = 1): a race between blocks.
extern "C" __global__ void probe_block_chain(int* out) {
    if (threadIdx.x == 0) out[blockIdx.x] = blockIdx.x == 0 ? 1 : out[blockIdx.x - 1] + 1;
}

extern "C" __global__ void probe_write_past_end(float* out, int n) {
    out[threadIdx.x] = 1.0f;
    if (threadIdx.x == 0) out[n] = 2.0f;
}
"#;

    fn probes() -> Option<HostKernels> {
        if !available_for_tests() {
            return None;
        }
        let dir = KernelCache::default_dir().join("host-probes");
        Some(HostKernels::build_sources(&dir, &[("probes.cu".into(), PROBES.into())]).unwrap())
    }

    fn run_i32(k: &HostKernels, name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), out: &mut [i32], extra: &[Arg]) -> Result<()> {
        let mut args = vec![Arg::Ptr(out.as_mut_ptr() as u64)];
        args.extend_from_slice(extra);
        // SAFETY: each probe writes at most `out.len()` ints (its comment gives the size).
        unsafe { k.launch(name, grid, block, &args) }
    }

    #[test]
    fn a_missing_barrier_changes_the_result() {
        let Some(k) = probes() else { return };
        let want: Vec<i32> = (0..128).map(|i| (i % 64 + 1) % 64 + 100 * (i / 64)).collect();
        let mut out = vec![-1; 128];
        run_i32(&k, "probe_neighbour", (2, 1, 1), (64, 1, 1), &mut out, &[Arg::I32(1)]).unwrap();
        assert_eq!(out, want);
        // Fibers run one after another between barriers, so the race shows as stale slots.
        let mut racy = vec![-1; 128];
        run_i32(&k, "probe_neighbour", (2, 1, 1), (64, 1, 1), &mut racy, &[Arg::I32(0)]).unwrap();
        assert_ne!(racy, want);
        assert_eq!(racy[63], want[63], "thread 63 reads slot 0, written before it runs");
    }

    /// An asynchronous copy lands at its wait in blocks of even index (a read before the wait
    /// sees the old bytes) and at its issue in odd ones (the destination changes at once); a
    /// zero fill writes zeros either way.
    #[test]
    fn async_copies_land_at_the_two_ends_of_their_window() {
        let Some(k) = probes() else { return };
        let src: Vec<i32> = (0..16).map(|i| 10 + i).collect();
        let mut out = vec![-1; 16];
        run_i32(&k, "probe_async_copy", (2, 1, 1), (4, 1, 1), &mut out, &[Arg::Ptr(src.as_ptr() as u64)]).unwrap();
        let landed = [11, 15, 19, 0];
        assert_eq!(out[..4], [-7; 4], "block 0: nothing before the wait");
        assert_eq!(out[4..8], landed);
        assert_eq!(out[8..12], landed, "block 1: landed at issue");
        assert_eq!(out[12..], landed);
    }

    /// `__trap()` fails the launch with its name, as a GPU aborts it.
    #[test]
    fn a_trap_fails_the_launch() {
        let Some(k) = probes() else { return };
        let mut out = vec![0; 64];
        run_i32(&k, "probe_trap", (1, 1, 1), (64, 1, 1), &mut out, &[Arg::I32(-1)]).unwrap();
        assert_eq!(out, vec![1; 64]);
        let e = run_i32(&k, "probe_trap", (1, 1, 1), (64, 1, 1), &mut out, &[Arg::I32(5)]).unwrap_err();
        assert!(format!("{e:#}").contains("__trap() called"), "{e:#}");
    }

    /// A vector load from an address that is not a multiple of its size faults on a GPU; here
    /// the alignment check the kernels are built with fails the launch and names the access.
    #[test]
    fn a_misaligned_vector_load_fails_the_launch() {
        let Some(k) = probes() else { return };
        // A 16-byte aligned buffer of 16 ints (u128 is 16-byte aligned).
        let mut backing = vec![0u128; 4];
        // SAFETY: 64 bytes of plain ints.
        let out: &mut [i32] = unsafe { std::slice::from_raw_parts_mut(backing.as_mut_ptr() as *mut i32, 16) };
        out[..8].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        run_i32(&k, "probe_vector_load", (1, 1, 1), (32, 1, 1), out, &[Arg::I32(4)]).unwrap();
        assert_eq!(out[8], 5 + 6 + 7 + 8);
        let e = run_i32(&k, "probe_vector_load", (1, 1, 1), (32, 1, 1), out, &[Arg::I32(1)]).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("misaligned access at 0x") && msg.contains("needs 16-byte alignment (probes.cu.cpp line "), "{msg}");
    }

    /// Blocks do not run in ascending order (on a GPU they run in any order, at once): a kernel
    /// whose blocks read each other's writes does not get the sequential answer.
    #[test]
    fn blocks_of_a_launch_run_out_of_order() {
        let Some(k) = probes() else { return };
        let chain: Vec<i32> = (1..=64).collect();
        for _ in 0..2 {
            let mut out = vec![0; 64];
            run_i32(&k, "probe_block_chain", (64, 1, 1), (32, 1, 1), &mut out, &[]).unwrap();
            assert_ne!(out, chain);
            // Every block ran once: out[0] = 1 and each later slot is its predecessor's value
            // then, plus one (0 + 1 where that block had not run yet).
            assert_eq!(out[0], 1);
            assert!(out.iter().all(|&v| (1..=64).contains(&v)), "{out:?}");
        }
    }

    /// Warps do not run in step: a warp runs on until it waits at a barrier, so a read of
    /// another warp's shared data without one sees stale values even when warp operations in
    /// between would have kept lock-stepped warps together.
    #[test]
    fn a_missing_barrier_between_warps_shows() {
        let Some(k) = probes() else { return };
        // Block b's slot t holds t + salt + 100 b; thread t reads slot (t + 32) % 64.
        let want = |salt: i32, b: i32| -> Vec<i32> { (0..64).map(|t| (t + 32) % 64 + salt + 100 * b).collect() };
        let mut out = vec![-1; 128];
        run_i32(&k, "probe_warp_skew", (2, 1, 1), (64, 1, 1), &mut out, &[Arg::I32(1), Arg::I32(1000)]).unwrap();
        assert_eq!(out[..64], want(1000, 0));
        assert_eq!(out[64..], want(1000, 1));
        let mut racy = vec![-1; 128];
        run_i32(&k, "probe_warp_skew", (2, 1, 1), (64, 1, 1), &mut racy, &[Arg::I32(0), Arg::I32(2000)]).unwrap();
        // Block 0 runs warp 0 first: it reads what the block run before it (the other block, or
        // the previous launch's last one: blocks run in a scrambled order) left in warp 1's
        // slots; warp 1 then reads warp 0's fresh ones.
        assert!(racy[..32].iter().zip(&want(2000, 0)[..32]).all(|(r, w)| r != w), "{racy:?}");
        assert_eq!(racy[32..64], want(2000, 0)[32..]);
        // Block 1 runs warp 1 first: it reads stale slots of warp 0; warp 0 then reads fresh.
        assert_eq!(racy[64..96], want(2000, 1)[..32]);
        assert!(racy[96..].iter().zip(&want(2000, 1)[32..]).all(|(r, w)| r != w), "{racy:?}");
    }

    #[test]
    fn thread_numbering_and_warp_operations_follow_cuda() {
        let Some(k) = probes() else { return };
        let mut out = vec![-1; 7 * 384];
        run_i32(&k, "probe_warps", (2, 3, 1), (8, 4, 2), &mut out, &[]).unwrap();
        for bx in 0..2 {
            for by in 0..3 {
                for t in 0..64usize {
                    let g = (bx + 2 * by) * 64 + t;
                    let (x, y, z) = (t % 8, (t / 8) % 4, t / 32);
                    let lane = (t % 32) as i32;
                    assert_eq!(out[g], (x + 10 * y + 100 * z + 1000 * by + 10000 * bx) as i32, "numbering at {g}");
                    assert_eq!(out[384 + g], (lane + 1) * (lane + 2) / 2, "scan at {g}");
                    let ballot = (0..32).filter(|l| l % 3 == 0).fold(0u32, |m, l| m | 1 << l);
                    assert_eq!(out[2 * 384 + g] as u32, ballot, "ballot at {g}");
                    assert_eq!(out[3 * 384 + g], 496, "butterfly sum at {g}");
                    let down = if lane + 3 < 32 { (lane + 3) * 2 } else { lane * 2 };
                    assert_eq!(out[4 * 384 + g], down, "shfl_down at {g}");
                    assert_eq!(out[5 * 384 + g], 13, "syncthreads_count at {g}");
                    assert_eq!(out[6 * 384 + g], (lane - lane % 8 + 5) * 7, "shfl width 8 at {g}");
                }
            }
        }
    }

    #[test]
    fn fp16_rounding_matches_ieee_round_to_nearest_even() {
        let Some(k) = probes() else { return };
        let mut x: Vec<f32> = vec![0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 1e9, -1e9, f32::INFINITY, f32::NAN, 6.1e-5, 5.96e-8, 2.98e-8, 2.99e-8, 1e-10];
        // Halfway cases (ties to even) and a dense sweep over several binades, subnormals included.
        for m in 0..64u32 {
            x.push(f32::from_bits(0x3f80_0000 | (m << 13) | 0x1000));
        }
        let mut r = 0x9E37_79B9u32;
        for _ in 0..4000 {
            r ^= r << 13;
            r ^= r >> 17;
            r ^= r << 5;
            x.push(f32::from_bits((r & 0x8fff_ffff) | 0x3000_0000) * if r & 1 == 0 { 1.0 } else { 1e-4 });
        }
        let n = x.len();
        let (mut bits, mut back) = (vec![0u16; n], vec![0f32; n]);
        let args = [Arg::Ptr(x.as_ptr() as u64), Arg::Ptr(bits.as_mut_ptr() as u64), Arg::Ptr(back.as_mut_ptr() as u64), Arg::I32(n as i32)];
        // SAFETY: n floats in, n halves and n floats out.
        unsafe { k.launch("probe_half", ((n as u32).div_ceil(128), 1, 1), (128, 1, 1), &args) }.unwrap();
        for i in 0..n {
            let want = half::f16::from_f32(x[i]);
            if x[i].is_nan() {
                assert!(half::f16::from_bits(bits[i]).is_nan() && back[i].is_nan());
                continue;
            }
            assert_eq!(bits[i], want.to_bits(), "{:e} ({:#x})", x[i], x[i].to_bits());
            assert_eq!(back[i].to_bits(), want.to_f32().to_bits(), "{:e}", x[i]);
        }
    }

    #[test]
    fn wmma_multiplies_and_must_be_warp_uniform() {
        let Some(k) = probes() else { return };
        // Small integers: exact in fp16 and in any summation order.
        let a: Vec<f32> = (0..256).map(|i| ((i * 7) % 5) as f32 - 2.0).collect();
        let b: Vec<f32> = (0..256).map(|i| ((i * 3) % 7) as f32 - 3.0).collect();
        let mut c = vec![0f32; 256];
        let args = |c: &mut Vec<f32>, d: i32| [Arg::Ptr(a.as_ptr() as u64), Arg::Ptr(b.as_ptr() as u64), Arg::Ptr(c.as_mut_ptr() as u64), Arg::I32(d)];
        // SAFETY: 256 floats each.
        unsafe { k.launch("probe_wmma", (1, 1, 1), (32, 1, 1), &args(&mut c, 0)) }.unwrap();
        for i in 0..16 {
            for j in 0..16 {
                // B is column-major: element (q, j) at b[j * 16 + q].
                let want = 1.0 + (0..16).map(|q| a[i * 16 + q] * b[j * 16 + q]).sum::<f32>();
                assert_eq!(c[i * 16 + j], want, "({i}, {j})");
            }
        }
        // SAFETY: as above.
        let e = unsafe { k.launch("probe_wmma", (1, 1, 1), (32, 1, 1), &args(&mut c, 1)) }.unwrap_err();
        assert!(format!("{e}").contains("load_matrix_sync: lanes of one warp passed different pointers"), "{e}");
    }

    #[test]
    fn barrier_and_warp_deadlocks_are_errors() {
        let Some(k) = probes() else { return };
        let mut out = vec![0; 64];
        let e = run_i32(&k, "probe_exit_before_barrier", (1, 1, 1), (64, 1, 1), &mut out, &[]).unwrap_err();
        assert!(format!("{e}").contains("__syncthreads reached by 16 threads after 48 had exited"), "{e}");
        let e = run_i32(&k, "probe_lane_missing", (1, 1, 1), (32, 1, 1), &mut out, &[]).unwrap_err();
        assert!(format!("{e}").contains("deadlock"), "{e}");
    }

    #[test]
    fn writes_past_an_allocation_are_reported() {
        let Some(k) = probes() else { return };
        let emu = Emu::with_host_kernels(Arc::new(k));
        let buf = emu.alloc(32 * 4);
        let e = emu.launch("probe_write_past_end", (1, 1, 1), (32, 1, 1), &[Arg::Ptr(buf.base), Arg::I32(32)]).unwrap_err();
        assert!(format!("{e}").contains("probe_write_past_end wrote outside the allocation of 128 bytes"), "{e}");
        let ok = emu.alloc(33 * 4);
        emu.launch("probe_write_past_end", (1, 1, 1), (32, 1, 1), &[Arg::Ptr(ok.base), Arg::I32(32)]).unwrap();
        let mut back = vec![0u8; 33 * 4];
        emu.read_bytes(ok.base, &mut back).unwrap();
        assert_eq!(f32::from_le_bytes(back[128..].try_into().unwrap()), 2.0);
    }
}
