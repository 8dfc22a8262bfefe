//! NVRTC: compiles `kernels/*.cu` at run time for the device's own architecture (PTX for
//! `compute_XX`, a cubin with the ptxas register / spill report for `sm_XX`), and a disk cache of
//! the results keyed by source hash + arch + NVRTC version.
//!
//! NVRTC is loaded dynamically by cudarc (`libnvrtc.so`, `libnvrtc.so.13`, ...) from the loader's
//! search path: with the PyPI wheel `nvidia-cuda-nvrtc`, put its `nvidia/cu13/lib` on
//! `LD_LIBRARY_PATH` (it holds `libnvrtc-builtins.so.13.*` too, which NVRTC opens by name). Every
//! function here answers an error, never a panic, when the library is missing.

use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::nvrtc::{result, sys};
use sha2::{Digest, Sha256};

/// How to get NVRTC on a machine without the CUDA toolkit.
pub const INSTALL_HINT: &str = "pip install nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.88 \
nvidia-cuda-crt==13.0.88 into a venv, put its site-packages/nvidia/cu13/lib on LD_LIBRARY_PATH and set \
FASTDET_CUDA_INCLUDE to site-packages/nvidia/cu13/include (.ci/run does this)";

/// Whether the NVRTC shared library can be loaded. Never panics.
pub fn nvrtc_available() -> bool {
    // SAFETY: only dlopens the library under cudarc's candidate names and drops the handle.
    std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false)
}

/// Runs `f`, turning a panic inside cudarc (a missing library or symbol) into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !nvrtc_available() {
        bail!("NVRTC not found ({INSTALL_HINT})");
    }
    catch_panic(f).unwrap_or_else(|msg| Err(anyhow!("{what}: NVRTC failed: {msg}")))
}

thread_local! {
    /// How many `catch_panic` calls this thread is inside: their panics are not printed.
    static CATCHING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// Where the last panic caught on this thread was raised (file:line).
    static CAUGHT_AT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f`; a panic (cudarc panics on a missing library or symbol) comes back as its message
/// and where it was raised, which the caller reports: the panic hook does not print it as a
/// crash, unless RUST_BACKTRACE is set (a bug of ours inside `f` wants the backtrace).
pub(crate) fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    static QUIET_HOOK: std::sync::Once = std::sync::Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        let backtrace = std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0");
        std::panic::set_hook(Box::new(move |info| {
            if CATCHING.with(|c| c.get()) == 0 || backtrace {
                previous(info);
            } else {
                CAUGHT_AT.with(|at| *at.borrow_mut() = info.location().map(|l| format!("{}:{}", l.file(), l.line())));
            }
        }));
    });
    CATCHING.with(|c| c.set(c.get() + 1));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(c.get() - 1));
    caught.map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        match CAUGHT_AT.with(|at| at.borrow_mut().take()) {
            Some(at) => format!("{msg} (at {at})"),
            None => msg,
        }
    })
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    guarded("nvrtcVersion", || {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out pointers.
        unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| anyhow!("nvrtcVersion: {e:?}"))?;
        Ok((major, minor))
    })
}

/// What NVRTC is asked to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// `compute_XX`: PTX, loadable (JIT-compiled by the driver) on XX and newer.
    Ptx(u32),
    /// `sm_XX`: a cubin for exactly that architecture, with the ptxas report in the log.
    Cubin(u32),
}

impl Target {
    /// Parses `"compute_75"` or `"sm_90"` (also `"sm_90a"`-style suffixes are refused).
    pub fn parse(arch: &str) -> Result<Target> {
        let num = |s: &str| -> Result<u32> {
            if s.len() >= 2 && s.bytes().all(|b| b.is_ascii_digit()) {
                Ok(s.parse()?)
            } else {
                bail!("bad GPU architecture {arch:?}: expected compute_XX or sm_XX")
            }
        };
        if let Some(n) = arch.strip_prefix("compute_") {
            Ok(Target::Ptx(num(n)?))
        } else if let Some(n) = arch.strip_prefix("sm_") {
            Ok(Target::Cubin(num(n)?))
        } else {
            bail!("bad GPU architecture {arch:?}: expected compute_XX or sm_XX")
        }
    }

    /// The `--gpu-architecture` value.
    pub fn arch(&self) -> String {
        match self {
            Target::Ptx(n) => format!("compute_{n}"),
            Target::Cubin(n) => format!("sm_{n}"),
        }
    }

    pub fn is_cubin(&self) -> bool {
        matches!(self, Target::Cubin(_))
    }

    /// Cache file extension.
    pub fn extension(&self) -> &'static str {
        if self.is_cubin() {
            "cubin"
        } else {
            "ptx"
        }
    }
}

/// NVRTC options for `target` (besides the include paths). Part of the cache key.
pub fn options(target: Target) -> Vec<String> {
    let mut o = vec![format!("--gpu-architecture={}", target.arch()), "--std=c++17".to_string()];
    if target.is_cubin() {
        o.push("--ptxas-options=-v".to_string());
    }
    o
}

/// One compiled kernel file.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub target: Target,
    /// PTX text (no trailing NUL) for `compute_XX`, the cubin for `sm_XX`.
    pub ptx_or_cubin: Vec<u8>,
    /// NVRTC's log: warnings, and for a cubin the ptxas `-v` report.
    pub log: String,
}

impl Compiled {
    /// The PTX text, for a `compute_XX` target.
    pub fn ptx(&self) -> Option<&str> {
        if self.target.is_cubin() {
            None
        } else {
            std::str::from_utf8(&self.ptx_or_cubin).ok()
        }
    }
}

fn c_chars_to_string(v: &[c_char]) -> String {
    let bytes: Vec<u8> = v.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Destroys the program on every path.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by create_program, destroyed once.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

/// Compiles one kernel file. `arch` is `"compute_XX"` (PTX) or `"sm_XX"` (cubin + ptxas report);
/// `include_dirs` must hold `cuda_fp16.h` (see `find_cuda_include`). The error carries the log.
pub fn compile(source_name: &str, src: &str, arch: &str, include_dirs: &[PathBuf]) -> Result<Compiled> {
    let target = Target::parse(arch)?;
    let csrc = CString::new(src).with_context(|| format!("{source_name}: NUL byte in the source"))?;
    let cname = CString::new(source_name).with_context(|| format!("{source_name:?}: NUL byte in the name"))?;
    let mut opts = options(target);
    for d in include_dirs {
        opts.push(format!("--include-path={}", d.display()));
    }
    guarded(source_name, || {
        let prog = Program(result::create_program(&csrc, Some(&cname)).map_err(|e| anyhow!("nvrtcCreateProgram: {e:?}"))?);
        // SAFETY: prog is live; options are plain strings without NUL.
        let status = unsafe { result::compile_program(prog.0, &opts) };
        // SAFETY: prog is live.
        let log = unsafe { result::get_program_log(prog.0) }.map(|l| c_chars_to_string(&l)).unwrap_or_default();
        if let Err(e) = status {
            bail!("{source_name} ({arch}): NVRTC {e:?} with options {opts:?}\n{log}");
        }
        let image = if target.is_cubin() {
            let mut size = 0usize;
            // SAFETY: prog compiled; buffer sized by nvrtcGetCUBINSize.
            unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }.result().map_err(|e| anyhow!("nvrtcGetCUBINSize: {e:?}"))?;
            let mut buf = vec![0 as c_char; size];
            unsafe { sys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr()) }.result().map_err(|e| anyhow!("nvrtcGetCUBIN: {e:?}"))?;
            buf.into_iter().map(|c| c as u8).collect::<Vec<u8>>()
        } else {
            // SAFETY: prog compiled.
            let ptx = unsafe { result::get_ptx(prog.0) }.map_err(|e| anyhow!("nvrtcGetPTX: {e:?}"))?;
            c_chars_to_string(&ptx).into_bytes()
        };
        if image.is_empty() {
            bail!("{source_name} ({arch}): NVRTC produced an empty image\n{log}");
        }
        Ok(Compiled { target, ptx_or_cubin: image, log })
    })
}

/// The headers the kernels include besides their own: `cuda_fp16.h`, and `mma.h` with the
/// `crt/mma.h` it includes (in pip wheels the latter comes from `nvidia-cuda-crt`, not from the
/// runtime wheel that has the others).
const KERNEL_HEADERS: [&str; 3] = ["cuda_fp16.h", "mma.h", "crt/mma.h"];

/// The directory holding `cuda_fp16.h`: `$FASTDET_CUDA_INCLUDE`; else the `include` sibling of a
/// `$LD_LIBRARY_PATH` entry (the pip wheel's `nvidia/cu13/lib` → `nvidia/cu13/include`); else the
/// wheel layout under `$VIRTUAL_ENV` (`nvidia/cu13/include`, `nvidia/cuda_runtime/include`); else
/// `$CUDA_HOME/include`, `$CUDA_PATH/include`, `/usr/local/cuda/include`. Among the candidates
/// after `$FASTDET_CUDA_INCLUDE`, the first that holds every header the kernels need wins over
/// an earlier one that lacks some (`include_problems` names what is missing).
pub fn find_cuda_include() -> Option<PathBuf> {
    let has = |d: &Path| d.join("cuda_fp16.h").is_file();
    if let Some(d) = std::env::var_os("FASTDET_CUDA_INCLUDE") {
        let d = PathBuf::from(d);
        if has(&d) {
            return Some(d);
        }
    }
    let mut cands: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("LD_LIBRARY_PATH") {
        for lib in std::env::split_paths(&p) {
            if let Some(parent) = lib.parent() {
                cands.push(parent.join("include"));
            }
        }
    }
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        cands.extend(wheel_includes(Path::new(&venv)));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(d) = std::env::var_os(var) {
            cands.push(PathBuf::from(d).join("include"));
        }
    }
    cands.push(PathBuf::from("/usr/local/cuda/include"));
    let complete = |d: &Path| KERNEL_HEADERS.iter().all(|h| d.join(h).is_file());
    cands.iter().find(|d| complete(d)).or_else(|| cands.iter().find(|d| has(d))).cloned()
}

/// What is wrong with `dir` as the kernels' include directory for NVRTC `nvrtc` (major, minor):
/// headers missing, or headers of another CUDA major version (`CUDA_VERSION` in its `cuda.h`).
pub fn include_problems(dir: &Path, nvrtc: (i32, i32)) -> Vec<String> {
    let mut out: Vec<String> = KERNEL_HEADERS
        .iter()
        .filter(|h| !dir.join(h).is_file())
        .map(|h| format!("{} has no {h}{}", dir.display(), if *h == "crt/mma.h" { " (pip wheel nvidia-cuda-crt)" } else { "" }))
        .collect();
    let version = std::fs::read_to_string(dir.join("cuda.h")).ok().and_then(|t| {
        t.lines().find_map(|l| l.trim().strip_prefix("#define CUDA_VERSION").and_then(|v| v.trim().parse::<i32>().ok()))
    });
    if let Some(v) = version {
        if v / 1000 != nvrtc.0 {
            out.push(format!("{} holds CUDA {}.{}'s headers, NVRTC is {}.{}: put the matching NVRTC first on LD_LIBRARY_PATH or set FASTDET_CUDA_INCLUDE", dir.display(), v / 1000, (v % 1000) / 10, nvrtc.0, nvrtc.1));
        }
    }
    out
}

/// `lib/python3.*/site-packages/nvidia/{cu13,cuda_runtime}/include` under a venv or prefix.
pub fn wheel_includes(prefix: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(prefix.join("lib")) else { return out };
    let mut pys: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("python3"))).collect();
    pys.sort();
    for py in pys {
        for sub in ["nvidia/cu13/include", "nvidia/cuda_runtime/include"] {
            out.push(py.join("site-packages").join(sub));
        }
    }
    out
}

/// One function's line of the ptxas `-v` report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PtxasFunction {
    pub name: String,
    /// Entry functions (kernels) have a `Compiling entry function` line.
    pub entry: bool,
    pub registers: Option<u32>,
    pub stack_frame: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// Parses the ptxas `-v` report in an NVRTC log:
/// `Compiling entry function 'K' for 'sm_90'`, `Function properties for K`,
/// `N bytes stack frame, N bytes spill stores, N bytes spill loads`, `Used N registers, ...`.
pub fn parse_ptxas_report(log: &str) -> Vec<PtxasFunction> {
    let mut funcs: Vec<PtxasFunction> = Vec::new();
    let mut cur: Option<usize> = None;
    let index = |funcs: &mut Vec<PtxasFunction>, name: &str| -> usize {
        if let Some(i) = funcs.iter().position(|f| f.name == name) {
            i
        } else {
            funcs.push(PtxasFunction { name: name.to_string(), ..Default::default() });
            funcs.len() - 1
        }
    };
    let number_before = |line: &str, word: &str| -> Option<u32> {
        let i = line.find(word)?;
        line[..i].split(|c: char| !c.is_ascii_digit()).rfind(|s| !s.is_empty())?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("");
            let i = index(&mut funcs, name);
            funcs[i].entry = true;
            cur = Some(i);
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            cur = Some(index(&mut funcs, rest.trim()));
        } else if line.contains("bytes stack frame") {
            if let Some(i) = cur {
                funcs[i].stack_frame = number_before(line, "bytes stack frame").unwrap_or(0);
                funcs[i].spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                funcs[i].spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            }
        } else if line.contains("Used ") && line.contains(" registers") {
            if let Some(i) = cur {
                funcs[i].registers = number_before(line, " registers");
            }
        }
    }
    funcs
}

/// Compiled kernels on disk: `DIR/<file stem>-<arch>-nvrtc<major>.<minor>-<hash>.<ptx|cubin>`,
/// hash = sha256 of the source and the NVRTC options (so a changed kernel or option never reuses a
/// stale image). Files are written to a temporary name and renamed, so a reader never sees half
/// a file; concurrent writers of one key write the same bytes.
#[derive(Debug, Clone)]
pub struct KernelCache {
    pub dir: PathBuf,
}

impl KernelCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        KernelCache { dir: dir.into() }
    }

    /// `$FASTDET_KERNEL_CACHE`, else `$XDG_CACHE_HOME/fastdet/kernels`, else
    /// `$HOME/.cache/fastdet/kernels`, else `<temp>/fastdet-kernels`.
    pub fn default_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("FASTDET_KERNEL_CACHE") {
            return PathBuf::from(d);
        }
        if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(d).join("fastdet").join("kernels");
        }
        if let Some(d) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(d).join(".cache").join("fastdet").join("kernels");
        }
        std::env::temp_dir().join("fastdet-kernels")
    }

    /// Hex sha256 of the source and the options for `target`.
    pub fn source_hash(src: &str, target: Target) -> String {
        let mut h = Sha256::new();
        h.update(src.as_bytes());
        for o in options(target) {
            h.update([0u8]);
            h.update(o.as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The file for (source, arch, NVRTC version).
    pub fn path(&self, source_name: &str, src: &str, target: Target, nvrtc: (i32, i32)) -> PathBuf {
        let stem = Path::new(source_name).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "kernel".into());
        let stem: String = stem.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
        let hash = Self::source_hash(src, target);
        self.dir.join(format!("{stem}-{}-nvrtc{}.{}-{}.{}", target.arch(), nvrtc.0, nvrtc.1, &hash[..32], target.extension()))
    }

    /// The cached image, if any.
    pub fn load(&self, source_name: &str, src: &str, target: Target, nvrtc: (i32, i32)) -> Option<Vec<u8>> {
        std::fs::read(self.path(source_name, src, target, nvrtc)).ok().filter(|b| !b.is_empty())
    }

    /// Stores an image; returns its path.
    pub fn store(&self, source_name: &str, src: &str, target: Target, nvrtc: (i32, i32), image: &[u8]) -> Result<PathBuf> {
        let path = self.path(source_name, src, target, nvrtc);
        std::fs::create_dir_all(&self.dir).with_context(|| format!("creating kernel cache {}", self.dir.display()))?;
        // Unique per process and call: two workers of one process may store the same image.
        static STORES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STORES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("{}.{}.{n}.tmp", target.extension(), std::process::id()));
        std::fs::write(&tmp, image).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(path)
    }

    /// The cached image for (source, arch, this NVRTC), compiling and storing it on a miss, and
    /// the seconds NVRTC took when it compiled (`None` on a hit). A cache that cannot be written
    /// is not an error (the image is still returned).
    pub fn get_or_compile(&self, source_name: &str, src: &str, arch: &str, include_dirs: &[PathBuf]) -> Result<(Vec<u8>, Option<f64>)> {
        let target = Target::parse(arch)?;
        let ver = nvrtc_version()?;
        if let Some(img) = self.load(source_name, src, target, ver) {
            return Ok((img, None));
        }
        let t = std::time::Instant::now();
        let c = compile(source_name, src, arch, include_dirs)?;
        let compile_s = t.elapsed().as_secs_f64();
        let _ = self.store(source_name, src, target, ver, &c.ptx_or_cubin);
        Ok((c.ptx_or_cubin, Some(compile_s)))
    }

    /// `get_or_compile` for every `(file, source)`, the misses compiled on parallel threads (at
    /// most the machine's parallelism; the longest sources first, so the slowest compile starts
    /// at once): the images in `sources` order, each with its compile seconds, and the wall
    /// seconds of the whole call. A first start then waits for its slowest file, not their sum.
    pub fn get_or_compile_all(&self, sources: &[(&str, &str)], arch: &str, include_dirs: &[PathBuf]) -> Result<(Vec<(Vec<u8>, Option<f64>)>, f64)> {
        let started = std::time::Instant::now();
        let mut order: Vec<usize> = (0..sources.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(sources[i].1.len()));
        let next = std::sync::atomic::AtomicUsize::new(0);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, sources.len().max(1));
        let mut done: Vec<Option<Result<(Vec<u8>, Option<f64>)>>> = (0..sources.len()).map(|_| None).collect();
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&i) = order.get(k) else { break };
                            let (file, src) = sources[i];
                            mine.push((i, self.get_or_compile(file, src, arch, include_dirs).with_context(|| format!("compiling {file} for {arch}"))));
                        }
                        mine
                    })
                })
                .collect();
            for w in workers {
                for (i, r) in w.join().unwrap_or_else(|_| vec![]) {
                    done[i] = Some(r);
                }
            }
        });
        let mut images = Vec::with_capacity(sources.len());
        for (i, r) in done.into_iter().enumerate() {
            images.push(r.with_context(|| format!("compiling {}: the compile thread panicked", sources[i].0))??);
        }
        Ok((images, started.elapsed().as_secs_f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(Target::parse("compute_75").unwrap(), Target::Ptx(75));
        assert_eq!(Target::parse("sm_90").unwrap(), Target::Cubin(90));
        assert_eq!(Target::parse("sm_120").unwrap().arch(), "sm_120");
        for bad in ["", "sm_", "sm_9", "compute_9x", "sm_90a", "gfx90", "90"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        assert!(options(Target::Cubin(75)).iter().any(|o| o == "--ptxas-options=-v"));
        assert!(!options(Target::Ptx(75)).iter().any(|o| o.contains("ptxas")));
    }

    #[test]
    fn cache_key_and_paths() {
        let dir = tempfile::tempdir().unwrap();
        let cache = KernelCache::new(dir.path().join("k"));
        let (src, t75, t90) = ("extern \"C\" __global__ void k() {}", Target::Ptx(75), Target::Ptx(90));
        let p = cache.path("norm.cu", src, t75, (13, 0));
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("norm-compute_75-nvrtc13.0-") && name.ends_with(".ptx"), "{name}");
        assert_eq!(p.parent().unwrap(), dir.path().join("k"));
        // Each part of the key changes the path; the same key gives the same path.
        assert_eq!(p, cache.path("norm.cu", src, t75, (13, 0)));
        assert_ne!(p, cache.path("norm.cu", src, t90, (13, 0)));
        assert_ne!(p, cache.path("norm.cu", src, t75, (13, 1)));
        assert_ne!(p, cache.path("norm.cu", "// changed\n", t75, (13, 0)));
        assert_ne!(p, cache.path("nms.cu", src, t75, (13, 0)));
        assert!(cache.path("nms.cu", src, Target::Cubin(90), (13, 0)).to_str().unwrap().ends_with(".cubin"));
        assert_eq!(KernelCache::source_hash(src, t75).len(), 64);
        // Store and load round trip; the directory is created on demand; no temporary left over.
        assert!(cache.load("norm.cu", src, t75, (13, 0)).is_none());
        let stored = cache.store("norm.cu", src, t75, (13, 0), b"// ptx\n").unwrap();
        assert_eq!(stored, p);
        assert_eq!(cache.load("norm.cu", src, t75, (13, 0)).unwrap(), b"// ptx\n");
        assert!(cache.load("norm.cu", src, t90, (13, 0)).is_none());
        let files: Vec<_> = std::fs::read_dir(dir.path().join("k")).unwrap().collect();
        assert_eq!(files.len(), 1);
        // Odd names stay inside the directory.
        let q = cache.path("../x y.cu", src, t75, (13, 0));
        assert_eq!(q.parent().unwrap(), dir.path().join("k"));
    }

    #[test]
    fn ptxas_report_parses() {
        let log = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'norm_apply' for 'sm_90'
ptxas info    : Function properties for norm_apply
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers
ptxas info    : Function properties for __internal_helper
ptxas         .     16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function 'norm_finalize' for 'sm_75'
ptxas info    : Function properties for norm_finalize
ptxas         .     8 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 12288 bytes smem, 432 bytes cmem[0]
";
        let f = parse_ptxas_report(log);
        assert_eq!(f.len(), 3);
        assert_eq!(f[0], PtxasFunction { name: "norm_apply".into(), entry: true, registers: Some(32), stack_frame: 0, spill_stores: 0, spill_loads: 0 });
        assert_eq!(f[1], PtxasFunction { name: "__internal_helper".into(), entry: false, registers: None, stack_frame: 16, spill_stores: 8, spill_loads: 4 });
        assert_eq!(f[2], PtxasFunction { name: "norm_finalize".into(), entry: true, registers: Some(64), stack_frame: 8, spill_stores: 12, spill_loads: 20 });
    }

    #[test]
    fn include_dir_from_wheel_layout() {
        let dir = tempfile::tempdir().unwrap();
        let inc = dir.path().join("lib/python3.11/site-packages/nvidia/cu13/include");
        std::fs::create_dir_all(&inc).unwrap();
        assert!(wheel_includes(dir.path()).contains(&inc));
        assert!(wheel_includes(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn missing_nvrtc_is_an_error_not_a_panic() {
        // Whether or not NVRTC is installed here, these calls must return.
        let available = nvrtc_available();
        let r = compile("k.cu", "extern \"C\" __global__ void k() {}", "compute_75", &[]);
        if !available {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("NVRTC not found"), "{e}");
            assert!(nvrtc_version().is_err());
        }
        assert!(compile("k.cu", "", "sm_9", &[]).is_err());
    }

    /// An include directory without crt/mma.h, or with another CUDA major's headers, is named
    /// with what is wrong; a complete one of NVRTC's major has no problem.
    #[test]
    fn include_problems_name_missing_headers_and_version_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("cuda_fp16.h"), "").unwrap();
        std::fs::write(d.join("mma.h"), "").unwrap();
        std::fs::write(d.join("cuda.h"), "#pragma once\n#define CUDA_VERSION 12080\n").unwrap();
        let p = include_problems(d, (13, 0));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].ends_with("has no crt/mma.h (pip wheel nvidia-cuda-crt)"), "{p:?}");
        assert!(p[1].contains("holds CUDA 12.8's headers, NVRTC is 13.0"), "{p:?}");
        std::fs::create_dir(d.join("crt")).unwrap();
        std::fs::write(d.join("crt/mma.h"), "").unwrap();
        std::fs::write(d.join("cuda.h"), "#define CUDA_VERSION 13000\n").unwrap();
        assert!(include_problems(d, (13, 0)).is_empty());
    }
}
