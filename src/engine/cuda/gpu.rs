//! One CUDA device: context + stream, the kernels of `kernels/*.cu` (compiled by NVRTC for the
//! device's own architecture, cached on disk), device buffers and kernel launches.
//!
//! Everything of one handle runs on its own stream, so operations are ordered by issue order and
//! buffers can be reused as soon as the host has issued their last reader. (One exception: a
//! volume copied ahead on a side stream, `side_upload.rs`, ordered against this stream by events.) A handle is shared by
//! the engines one thread opens on a device (one worker's ensemble); another thread opening the
//! same device gets a handle of its own (its own stream, activation arena and byte counts), so
//! two workers on one card (`--gpus 0,0`) neither wait for each other's stream nor capture each
//! other's kernels into their CUDA graphs. Kernel arguments are
//! raw device addresses (`u64`), which lets the engine alias buffers (in-place ops, channel slices
//! of a concat buffer) without fighting the borrow checker; sizes are checked on the host before
//! every launch (see `ops.rs`).
//!
//! cudarc panics when a CUDA library is missing (`CudaContext::new` without libcuda); every entry
//! point here checks the library first and turns panics into errors, so callers get "no CUDA
//! driver found; use --device cpu", never a crash.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

use super::arena::Arena;
use super::emu::{Emu, EmuAlloc};
use super::kernels::{kernel_names, kernel_signatures, ParamKind, SOURCES};
use super::nvrtc::{self, KernelCache, Target};

/// Runs `f`, turning a panic (cudarc panics on a missing library or symbol) into an error.
pub fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    nvrtc::catch_panic(f).unwrap_or_else(|msg| Err(anyhow!("{what}: internal panic in the CUDA layer: {msg}")))
}

/// Whether libcuda (the driver) can be loaded. Never panics.
pub fn driver_available() -> bool {
    // SAFETY: only dlopens the library under cudarc's candidate names.
    std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

/// Whether libcudnn can be loaded. Never panics.
pub fn cudnn_available() -> bool {
    // SAFETY: as above.
    std::panic::catch_unwind(|| unsafe { cudarc::cudnn::sys::is_culib_present() }).unwrap_or(false)
}

/// The message every "no GPU here" path prints.
pub const NO_DRIVER: &str = "no CUDA driver found (libcuda.so cannot be loaded); use --device cpu";
/// How the probe's errors end: advice for a user who asked for a GPU (`--device auto` drops it).
pub const USE_CPU: &str = "; use --device cpu";

/// What the driver says about one device.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_mem: usize,
    pub multiprocessors: i32,
    /// e.g. 13000 for CUDA 13.0.
    pub driver_version: i32,
    pub device_count: usize,
}

impl DeviceInfo {
    pub fn describe(&self) -> String {
        if self.device_count == 0 {
            return self.name.clone();
        }
        format!(
            "cuda:{} {} (sm_{}{}, {} SMs, {:.1} GiB), driver CUDA {}.{}",
            self.ordinal,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.multiprocessors,
            self.total_mem as f64 / (1u64 << 30) as f64,
            self.driver_version / 1000,
            (self.driver_version % 1000) / 10
        )
    }
}

/// Checks the driver and the device without loading any kernel: the cheap "is there a GPU" test.
pub fn probe(ordinal: usize) -> Result<DeviceInfo> {
    if !driver_available() {
        bail!(NO_DRIVER);
    }
    guard("probing the CUDA device", || {
        use cudarc::driver::{result, sys};
        result::init().map_err(|e| {
            if e.0 == sys::cudaError_enum::CUDA_ERROR_STUB_LIBRARY {
                // The toolkit's lib64/stubs/libcuda.so, found before the real driver.
                anyhow!("cuInit failed: {e}: the libcuda.so found is the CUDA toolkit's stub (a .../stubs folder on LD_LIBRARY_PATH?), not the driver: remove that folder from LD_LIBRARY_PATH{USE_CPU}")
            } else {
                anyhow!("cuInit failed: {e} (the CUDA driver loads but does not start: no GPU, or a driver that does not match its kernel module){USE_CPU}")
            }
        })?;
        let count = result::device::get_count().map_err(|e| anyhow!("cuDeviceGetCount: {e}"))? as usize;
        if count == 0 {
            bail!("the CUDA driver sees no GPU{USE_CPU}");
        }
        if ordinal >= count {
            bail!("cuda:{ordinal} does not exist: the driver sees {count} GPU(s) (cuda:0..cuda:{})", count - 1);
        }
        let dev = result::device::get(ordinal as i32).map_err(|e| anyhow!("cuDeviceGet({ordinal}): {e}"))?;
        let name = result::device::get_name(dev).unwrap_or_else(|_| "?".into());
        // SAFETY: valid device handle, plain attribute queries.
        let attr = |a| unsafe { result::device::get_attribute(dev, a) }.unwrap_or(0);
        use sys::CUdevice_attribute_enum as A;
        let cc = (attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR), attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR));
        let sms = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT);
        // SAFETY: valid device handle.
        let total_mem = unsafe { result::device::total_mem(dev) }.unwrap_or(0);
        let mut ver = 0i32;
        // SAFETY: one valid out pointer.
        let _ = unsafe { sys::cuDriverGetVersion(&mut ver) };
        Ok(DeviceInfo { ordinal, name, compute_capability: cc, total_mem, multiprocessors: sms, driver_version: ver, device_count: count })
    })
}

enum Mem {
    Cuda(#[allow(dead_code)] CudaSlice<u8>),
    Emu(#[allow(dead_code)] EmuAlloc),
    /// A slot of the activation arena (`arena.rs`): offset and length in the arena, the walk it
    /// belongs to, and the buffer of its own when it did not fit in the arena.
    Slot { off: usize, len: usize, walk: u64, own: Option<Box<DevBuf>> },
    /// Memory allocated on a side stream (`side_upload.rs`) and freed there. Once the handle's
    /// own stream has used it (`used`), the side stream waits for that stream before the free.
    Side { mem: SideMem, used: bool },
}

enum SideMem {
    Cuda { slice: CudaSlice<u8>, main: Arc<CudaStream> },
    /// The emulators: a plain allocation, with the same bookkeeping (`MemoryUsage::side_frees_ordered`).
    Emu(#[allow(dead_code)] EmuAlloc),
}

/// A device allocation. Freed (stream-ordered) on drop; an arena slot is handed back with
/// `Arena::give` (dropping one only leaves its range taken until the walk ends).
pub struct DevBuf {
    /// None only inside `drop`.
    _mem: Option<Mem>,
    pub ptr: u64,
    pub bytes: usize,
    /// The device's byte count, for memory of its own (not for arena slots).
    usage: Option<Arc<MemoryUsage>>,
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        let Some(u) = &self.usage else { return };
        // Whether this is a side-stream buffer (`side_upload.rs`), and whether the main stream used it.
        let side_used = match &self._mem {
            Some(Mem::Side { used, .. }) => Some(*used),
            _ => None,
        };
        // A free during a capture would be captured (and repeated by every replay) or break it:
        // the memory is left allocated and the capture fails (`end_capture`). A side-stream
        // buffer the main stream never used is freed on the side stream, which is never captured.
        if u.capturing.load(Ordering::Relaxed) && side_used != Some(false) {
            std::mem::forget(self._mem.take());
            u.freed_in_capture.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if side_used == Some(true) {
            // The free is stream-ordered on the side stream, which knows nothing of the main
            // stream's readers: it waits for them first; without that join, the host waits for
            // the main stream; failing that, the memory is left allocated rather than freed
            // under a reader.
            if let Some(Mem::Side { mem: SideMem::Cuda { slice, main }, .. }) = &self._mem {
                if let Err(e) = slice.stream().join(main) {
                    if let Err(e2) = main.synchronize() {
                        crate::errln!("warning: a side-stream buffer left allocated: its readers could not be waited for ({e}; {e2})");
                        std::mem::forget(self._mem.take());
                        return;
                    }
                }
            }
            u.side_frees_ordered.fetch_add(1, Ordering::Relaxed);
        }
        u.live.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl DevBuf {
    pub(super) fn slot(ptr: u64, bytes: usize, off: usize, len: usize, walk: u64, own: Option<DevBuf>) -> DevBuf {
        DevBuf { _mem: Some(Mem::Slot { off, len, walk, own: own.map(Box::new) }), ptr, bytes, usage: None }
    }

    /// (offset, length, walk, has memory of its own) of an arena slot.
    pub(super) fn slot_range(&self) -> Option<(usize, usize, u64, bool)> {
        match &self._mem {
            Some(Mem::Slot { off, len, walk, own }) => Some((*off, *len, *walk, own.is_some())),
            _ => None,
        }
    }

    pub fn is_slot(&self) -> bool {
        matches!(self._mem, Some(Mem::Slot { .. }))
    }

    /// A side-stream buffer (`Gpu::alloc_side`) is about to be read on the main stream: its free
    /// will then wait for that stream.
    pub(super) fn mark_used_by_main(&mut self) {
        if let Some(Mem::Side { used, .. }) = &mut self._mem {
            *used = true;
        }
    }
}

/// Bytes of device memory held through `Gpu::alloc`, now and at most since the last reset.
#[derive(Debug, Default)]
pub struct MemoryUsage {
    live: AtomicUsize,
    peak: AtomicUsize,
    /// The handle is capturing a graph (see `DevBuf::drop`).
    capturing: AtomicBool,
    /// Buffers dropped during the current capture.
    freed_in_capture: AtomicUsize,
    /// Side-stream buffers freed after waiting for the main stream's use of them.
    side_frees_ordered: AtomicUsize,
}

impl MemoryUsage {
    fn add(&self, bytes: usize) {
        let now = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevBuf({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

/// A kernel argument, typed like the kernel's C parameter.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    /// A device pointer (any `T*`); 0 is `nullptr`.
    Ptr(u64),
    /// `int`
    I32(i32),
    /// `long long`
    I64(i64),
    /// `unsigned`
    U32(u32),
    /// `float`
    F32(f32),
}

impl Arg {
    fn kind(&self) -> ParamKind {
        match self {
            Arg::Ptr(_) => ParamKind::Ptr,
            Arg::I32(_) => ParamKind::I32,
            Arg::I64(_) => ParamKind::I64,
            Arg::U32(_) => ParamKind::U32,
            Arg::F32(_) => ParamKind::F32,
        }
    }
}

/// A timing point in a device's stream (`Gpu::mark`).
pub enum Mark {
    Cuda(cudarc::driver::CudaEvent),
    Host(std::time::Instant),
}

enum Inner {
    Cuda { ctx: Arc<CudaContext>, stream: Arc<CudaStream>, funcs: HashMap<String, CudaFunction>, _modules: Vec<Arc<CudaModule>> },
    Emu(Arc<Emu>),
}

/// One device with its kernels loaded. Shared by every engine on that device (`Gpu::open`).
/// Also a CPU emulator of the same interface (`Gpu::emulator`), which runs every kernel as
/// described in its header on host memory: it lets the engine and the self-test run (slowly)
/// without a GPU, so their plumbing is tested here.
pub struct Gpu {
    pub info: DeviceInfo,
    inner: Inner,
    /// Parameter kinds of every kernel, parsed from kernels/*.cu: every launch is checked against them.
    sigs: HashMap<String, Vec<ParamKind>>,
    /// How the kernels were obtained (target, NVRTC version, cache directory, compiled or cached).
    pub kernels_note: String,
    /// What loading the kernels took (all zero on the emulators).
    pub kernel_load: KernelLoad,
    /// Synchronise after every launch and report the kernel that failed (debugging; the
    /// self-test turns it on; `FASTDET_CUDA_SYNC=1` too).
    sync_each: AtomicBool,
    /// Device memory held by fastdet's buffers on this device (all engines sharing it); cuDNN's
    /// and the driver's own allocations are not counted.
    usage: Arc<MemoryUsage>,
    /// The emulator's device memory size (testing the out-of-memory paths); unlimited by default.
    emu_limit: AtomicUsize,
    /// Bytes copied from the host by `write` (and `upload`) and by side-stream uploads since the
    /// device was opened.
    to_device: AtomicU64,
    to_host: AtomicU64,
    /// The activation arena shared by the engines on this handle (`arena.rs`).
    arena: Mutex<Arena>,
    /// cuDNN's workspace, shared by the engines on this handle (they run one at a time).
    dnn_workspace: Mutex<Option<DevBuf>>,
    /// The thread capturing a graph (work is recorded, not run, and allocations, host copies
    /// and synchronisation, which a capture cannot hold, are errors; so is work from another
    /// thread, which would land in the graph). The flag itself is in `usage`.
    capture_thread: Mutex<Option<std::thread::ThreadId>>,
    /// A real device's capture keeps device-wide calls of other threads waiting (`device_wide`).
    capture_claim: Mutex<Option<super::device_wide::CaptureClaim>>,
    /// The emulator's capture: the operations recorded so far.
    recorded: Mutex<Vec<Recorded>>,
}

/// One operation of an emulated graph.
#[derive(Debug, Clone)]
enum Recorded {
    Launch { name: String, grid: (u32, u32, u32), block: (u32, u32, u32), args: Vec<Arg> },
    Zero { dst: u64, bytes: usize },
    Copy { dst: u64, src: u64, bytes: usize },
    /// The emulator's arena bookkeeping (`Emu::open_slot` / `close_slot`).
    SlotOpen { ptr: u64, bytes: usize },
    SlotClose { ptr: u64 },
}

/// A CUDA graph handle. CUDA graphs are not internally synchronised; the owner (one engine,
/// behind `&mut`) is the only one that launches or drops it, so moving it between threads is safe.
struct SendGraph(cudarc::driver::CudaGraph);
// SAFETY: see above; every use goes through `&mut CudaEngine` or its drop.
unsafe impl Send for SendGraph {}

/// Work captured once on a handle's stream and replayed with the same kernels and arguments:
/// a CUDA graph, or on the emulator the recorded operations.
pub struct DeviceGraph {
    inner: GraphInner,
    /// Operations captured.
    pub nodes: usize,
}

enum GraphInner {
    Cuda(SendGraph),
    Emu(Vec<Recorded>),
}

impl std::fmt::Debug for DeviceGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceGraph({} nodes)", self.nodes)
    }
}

/// Open handles by (ordinal, thread).
type Registry = Mutex<Vec<(usize, std::thread::ThreadId, Weak<Gpu>)>>;
static OPEN: Registry = Mutex::new(Vec::new());
static OPEN_EMULATED: Registry = Mutex::new(Vec::new());

fn signatures() -> Result<HashMap<String, Vec<ParamKind>>> {
    let mut m = HashMap::new();
    for (file, src) in SOURCES {
        for (name, kinds) in kernel_signatures(src) {
            let kinds = kinds.with_context(|| format!("{file}: kernel {name} has a parameter type the launcher does not know"))?;
            m.insert(name, kinds);
        }
    }
    Ok(m)
}

/// After a failed end of capture: when the stream is still capturing (cudarc returned before
/// ending it), ends it here and discards what it recorded, so the stream runs work again.
fn end_capture_left_open(stream: &CudaStream) {
    use cudarc::driver::{result::graph, result::stream as raw, sys::CUstreamCaptureStatus};
    // SAFETY: the handle's own live stream; a graph returned here is owned here and destroyed.
    unsafe {
        if raw::is_capturing(stream.cu_stream()).is_ok_and(|st| st != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE) {
            if let Ok(g) = raw::end_capture(stream.cu_stream()) {
                if !g.is_null() {
                    let _ = graph::destroy(g);
                }
            }
        }
    }
}

impl Gpu {
    /// The device `ordinal` with every kernel loaded, shared with the other users of that device
    /// on this thread (see the module's note). `kernel_cache`: where compiled kernels are kept
    /// (default `KernelCache::default_dir()`).
    pub fn open(ordinal: usize, kernel_cache: Option<PathBuf>) -> Result<Arc<Gpu>> {
        Self::shared(&OPEN, ordinal, || Self::new(ordinal, kernel_cache).map(Arc::new))
    }

    /// Emulated device `ordinal` (`Gpu::emulator`), shared on this thread like `open`'s: the
    /// engines one worker opens on it share its arena, as on a GPU.
    pub fn open_emulator(ordinal: usize) -> Result<Arc<Gpu>> {
        Self::shared(&OPEN_EMULATED, ordinal, || Gpu::emulated(Emu::new(), "emulated on the host", ordinal).map(Arc::new))
    }

    /// The handle of `registry` for (`ordinal`, this thread), made by `make` when there is none.
    fn shared(registry: &Registry, ordinal: usize, make: impl FnOnce() -> Result<Arc<Gpu>>) -> Result<Arc<Gpu>> {
        let me = std::thread::current().id();
        let mut open = registry.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|(_, _, w)| w.strong_count() > 0);
        if let Some(g) = open.iter().find(|(o, t, _)| *o == ordinal && *t == me).and_then(|(_, _, w)| w.upgrade()) {
            return Ok(g);
        }
        let g = make()?;
        open.push((ordinal, me, Arc::downgrade(&g)));
        Ok(g)
    }

    fn new(ordinal: usize, kernel_cache: Option<PathBuf>) -> Result<Gpu> {
        let info = probe(ordinal)?;
        guard("opening the CUDA device", || {
            let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("creating a CUDA context on cuda:{ordinal}: {e}"))?;
            // One stream per handle, and no buffer is shared between handles: cudarc's
            // per-buffer event tracking is not needed.
            // SAFETY: every buffer of this handle is used on its one stream only, except the
            // side-stream volumes of `side_upload.rs`, which order their two streams with
            // events of their own (the copy before any read, the reads before the free).
            unsafe { ctx.disable_event_tracking() };
            // A stream of our own, not the legacy default stream, which cannot be captured
            // into a CUDA graph.
            let stream = ctx.new_stream().map_err(|e| anyhow!("creating a CUDA stream on cuda:{ordinal}: {e}"))?;
            let cache = KernelCache::new(kernel_cache.unwrap_or_else(KernelCache::default_dir));
            let (modules, funcs, kernels_note, kernel_load) = load_kernels(&ctx, &info, &cache)?;
            let sync_each = std::env::var("FASTDET_CUDA_SYNC").is_ok_and(|v| v == "1");
            Gpu::assemble(info, Inner::Cuda { ctx, stream, funcs, _modules: modules }, kernels_note, kernel_load, sync_each)
        })
    }

    /// A handle with nothing allocated, copied or captured yet.
    fn assemble(info: DeviceInfo, inner: Inner, kernels_note: String, kernel_load: KernelLoad, sync_each: bool) -> Result<Gpu> {
        Ok(Gpu {
            info,
            inner,
            sigs: signatures()?,
            kernels_note,
            kernel_load,
            sync_each: AtomicBool::new(sync_each),
            usage: Arc::default(),
            emu_limit: AtomicUsize::new(usize::MAX),
            to_device: AtomicU64::new(0),
            to_host: AtomicU64::new(0),
            arena: Mutex::default(),
            dnn_workspace: Mutex::default(),
            capture_thread: Mutex::default(),
            capture_claim: Mutex::default(),
            recorded: Mutex::default(),
        })
    }

    /// The CPU emulator (testing only: every kernel of kernels/*.cu re-implemented on the host
    /// from its header, no cuDNN). Slow; small shapes only.
    pub fn emulator() -> Result<Arc<Gpu>> {
        Gpu::emulator_on(Emu::new(), "emulated on the host")
    }

    /// The emulator running the kernels' own CUDA source compiled for the host
    /// (`host_kernels`): what the self-test's kernel rows need to test the kernels themselves.
    pub fn emulator_host_kernels() -> Result<Arc<Gpu>> {
        let k = super::host_kernels::HostKernels::shared()?;
        Gpu::emulator_on(Emu::with_host_kernels(k), "kernels/*.cu compiled for the host")
    }

    /// The emulator that allocates as a device would and runs no kernel: the memory a walk
    /// takes, at full size, in seconds (`engine::memory_plan`).
    pub fn emulator_plan() -> Result<Arc<Gpu>> {
        Gpu::emulator_on(Emu::dry(), "memory plan only: allocations as on a device, no kernel run")
    }

    fn emulator_on(emu: Arc<Emu>, note: &str) -> Result<Arc<Gpu>> {
        Gpu::emulated(emu, note, 0).map(Arc::new)
    }

    fn emulated(emu: Arc<Emu>, note: &str, ordinal: usize) -> Result<Gpu> {
        let info = DeviceInfo {
            ordinal,
            name: "CPU emulator of the CUDA kernels".into(),
            compute_capability: (0, 0),
            total_mem: 0,
            // A T4's count, so that the emulators take the same launch decisions (split K) as a card.
            multiprocessors: 40,
            driver_version: 0,
            device_count: 0,
        };
        Gpu::assemble(info, Inner::Emu(emu), note.into(), KernelLoad::default(), false)
    }

    pub fn is_emulator(&self) -> bool {
        matches!(self.inner, Inner::Emu(_))
    }

    /// Whether `conv3d_tc_f16` can run here (WMMA needs compute capability 7.0; the emulators run
    /// it), else why not.
    pub fn check_tensor_cores(&self) -> std::result::Result<(), String> {
        let cc = self.info.compute_capability;
        if self.is_emulator() || cc >= (7, 0) {
            Ok(())
        } else {
            Err(format!("{}: compute capability {}.{} has no tensor cores (conv3d_tc_f16 needs 7.0)", self.info.name, cc.0, cc.1))
        }
    }

    /// The CUDA stream (None for the emulator).
    pub fn stream(&self) -> Option<&Arc<CudaStream>> {
        match &self.inner {
            Inner::Cuda { stream, .. } => Some(stream),
            Inner::Emu(_) => None,
        }
    }

    /// Makes this device's context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        match &self.inner {
            Inner::Cuda { ctx, .. } => ctx.bind_to_thread().map_err(|e| anyhow!("binding the CUDA context of cuda:{}: {e}", self.info.ordinal)),
            Inner::Emu(_) => Ok(()),
        }
    }

    /// Bytes of device memory fastdet's buffers hold now on this device.
    pub fn memory_live(&self) -> usize {
        self.usage.live.load(Ordering::Relaxed)
    }

    /// The most bytes fastdet's buffers held at once on this device since it was opened or
    /// `reset_memory_peak` was called.
    pub fn memory_peak(&self) -> usize {
        self.usage.peak.load(Ordering::Relaxed)
    }

    /// Side-stream buffers freed so far after waiting for this handle's stream (`side_upload`).
    pub fn side_frees_ordered(&self) -> usize {
        self.usage.side_frees_ordered.load(Ordering::Relaxed)
    }

    /// Bytes in use on the whole card now: the driver's total less its free memory, so it counts
    /// what fastdet's own figures leave out (the context, the loaded kernels, the libraries'
    /// buffers, the allocator's reserve) and every other process's memory too. None on an
    /// emulator or when the driver does not answer.
    pub fn card_memory_in_use(&self) -> Option<usize> {
        match &self.inner {
            Inner::Cuda { ctx, .. } => ctx.mem_get_info().ok().map(|(free, total)| total.saturating_sub(free)),
            Inner::Emu(_) => None,
        }
    }

    pub fn reset_memory_peak(&self) {
        self.usage.peak.store(self.memory_live(), Ordering::Relaxed);
    }

    /// Emulator only (tests): allocations that would take the live bytes past `bytes` fail with
    /// `OutOfMemory`, as on a full device.
    pub fn set_emulated_memory_limit(&self, bytes: usize) {
        self.emu_limit.store(bytes, Ordering::Relaxed);
    }

    /// Bytes copied from the host to this device by `write` / `upload` since it was opened.
    pub fn bytes_to_device(&self) -> u64 {
        self.to_device.load(Ordering::Relaxed)
    }

    /// Bytes copied from this device to the host by `read` since it was opened.
    pub fn bytes_to_host(&self) -> u64 {
        self.to_host.load(Ordering::Relaxed)
    }

    pub fn set_sync_each(&self, on: bool) {
        self.sync_each.store(on, Ordering::Relaxed);
    }

    pub fn sync_each(&self) -> bool {
        self.sync_each.load(Ordering::Relaxed)
    }

    /// The activation arena of this handle (`arena.rs`).
    pub fn arena(&self) -> std::sync::MutexGuard<'_, Arena> {
        self.arena.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// cuDNN's workspace on this handle.
    pub fn dnn_workspace(&self) -> std::sync::MutexGuard<'_, Option<DevBuf>> {
        self.dnn_workspace.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Emulator only: the arena buffer at `base` gets slot checks (`Emu::track_slots`).
    pub(super) fn emu_slots_track(&self, base: u64) {
        if let Inner::Emu(e) = &self.inner {
            e.track_slots(base);
        }
    }

    pub(super) fn emu_slots_reset(&self, base: u64) {
        if let Inner::Emu(e) = &self.inner {
            e.reset_slots(base);
        }
    }

    /// (Recorded, not run, during a capture: a replay opens and closes the slots as the
    /// captured walk did.)
    pub(super) fn emu_slot_open(&self, ptr: u64, bytes: usize) {
        if self.record(|| Recorded::SlotOpen { ptr, bytes }) {
            return;
        }
        if let Inner::Emu(e) = &self.inner {
            e.open_slot(ptr, bytes);
        }
    }

    pub(super) fn emu_slot_close(&self, ptr: u64) {
        if self.record(|| Recorded::SlotClose { ptr }) {
            return;
        }
        if let Inner::Emu(e) = &self.inner {
            e.close_slot(ptr);
        }
    }

    /// Whether a graph capture is under way on this handle.
    pub fn capturing(&self) -> bool {
        self.usage.capturing.load(Ordering::Relaxed)
    }

    /// (`what` is only formatted when refusing.)
    fn refuse_in_capture(&self, what: std::fmt::Arguments) -> Result<()> {
        if self.capturing() {
            bail!("{what} during a CUDA graph capture");
        }
        Ok(())
    }

    /// During a capture, work may only come from the capturing thread (another thread's
    /// kernels on this stream would silently become part of the graph).
    fn check_capture_thread(&self) -> Result<()> {
        if self.capturing() {
            let owner = *self.capture_thread.lock().unwrap_or_else(|e| e.into_inner());
            if owner.is_some_and(|t| t != std::thread::current().id()) {
                bail!("work issued from another thread while this device handle captures a CUDA graph");
            }
        }
        Ok(())
    }

    /// Starts capturing this handle's work into a graph (`end_capture`): from here until then,
    /// launches, copies between device buffers and memsets are recorded, not run.
    pub fn begin_capture(&self) -> Result<()> {
        self.refuse_in_capture(format_args!("a second capture"))?;
        if self.sync_each() {
            bail!("no CUDA graphs with FASTDET_CUDA_SYNC=1 (a synchronisation after each kernel cannot be captured)");
        }
        match &self.inner {
            Inner::Cuda { stream, .. } => {
                let claim = super::device_wide::claim_capture(self.info.ordinal);
                // Thread-local mode: another worker's thread allocating on the device does not
                // break this capture.
                stream
                    .begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(|e| anyhow!("cuStreamBeginCapture: {e}"))?;
                *self.capture_claim.lock().unwrap_or_else(|e| e.into_inner()) = Some(claim);
            }
            Inner::Emu(_) => self.recorded.lock().unwrap_or_else(|e| e.into_inner()).clear(),
        }
        *self.capture_thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::thread::current().id());
        self.usage.freed_in_capture.store(0, Ordering::Relaxed);
        self.usage.capturing.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Ends the capture and makes its graph (an error, and no graph, when the capture broke).
    pub fn end_capture(&self) -> Result<DeviceGraph> {
        if !self.usage.capturing.swap(false, Ordering::Relaxed) {
            bail!("internal error: end_capture without begin_capture");
        }
        *self.capture_thread.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let freed = self.usage.freed_in_capture.swap(0, Ordering::Relaxed);
        // Released when this returns or unwinds: a claim left behind would hold other threads'
        // device-wide calls for good.
        let _claim = self.capture_claim.lock().unwrap_or_else(|e| e.into_inner()).take();
        let graph = self.make_graph()?;
        if freed > 0 {
            bail!("{freed} buffer(s) freed during the capture (left allocated)");
        }
        Ok(graph)
    }

    fn make_graph(&self) -> Result<DeviceGraph> {
        match &self.inner {
            Inner::Cuda { ctx, stream, .. } => {
                // An error an earlier drop left in the context (cudarc keeps it for the next
                // call) would make cudarc's end_capture return before ending the capture, and
                // leave the stream capturing: take it first, end the capture, then report it.
                let stale = ctx.check_err();
                let ended = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
                if ended.is_err() {
                    end_capture_left_open(stream);
                }
                let g = ended.map_err(|e| anyhow!("cuStreamEndCapture / cuGraphInstantiate: {e}"))?.context("the capture recorded no work")?;
                if let Err(e) = stale {
                    bail!("a CUDA error left by an earlier call surfaced during the capture: {e}");
                }
                let mut nodes = 0usize;
                // SAFETY: a valid graph owned by `g`; a null node array asks for the count only.
                let _ = unsafe { cudarc::driver::sys::cuGraphGetNodes(g.cu_graph(), std::ptr::null_mut(), &mut nodes) };
                Ok(DeviceGraph { inner: GraphInner::Cuda(SendGraph(g)), nodes })
            }
            Inner::Emu(_) => {
                let ops = std::mem::take(&mut *self.recorded.lock().unwrap_or_else(|e| e.into_inner()));
                let nodes = ops.iter().filter(|o| !matches!(o, Recorded::SlotOpen { .. } | Recorded::SlotClose { .. })).count();
                Ok(DeviceGraph { nodes, inner: GraphInner::Emu(ops) })
            }
        }
    }

    /// Ends a capture still open (after a panic in the middle of one), discarding it.
    pub fn abandon_capture(&self) {
        if self.capturing() {
            let _ = self.end_capture();
        }
    }

    /// Runs a graph captured on this handle.
    pub fn replay(&self, g: &DeviceGraph) -> Result<()> {
        self.refuse_in_capture(format_args!("a graph launch"))?;
        match (&g.inner, &self.inner) {
            (GraphInner::Cuda(c), Inner::Cuda { .. }) => c.0.launch().map_err(|e| anyhow!("cuGraphLaunch: {e}"))?,
            (GraphInner::Emu(ops), Inner::Emu(_)) => {
                for op in ops {
                    match op {
                        Recorded::Launch { name, grid, block, args } => self.launch(name, *grid, *block, args)?,
                        Recorded::Zero { dst, bytes } => self.zero(*dst, *bytes)?,
                        Recorded::Copy { dst, src, bytes } => self.copy(*dst, *src, *bytes)?,
                        Recorded::SlotOpen { ptr, bytes } => self.emu_slot_open(*ptr, *bytes),
                        Recorded::SlotClose { ptr } => self.emu_slot_close(*ptr),
                    }
                }
            }
            _ => bail!("internal error: a graph replayed on a device of another kind"),
        }
        if self.sync_each() {
            self.sync("graph launch")?;
        }
        Ok(())
    }

    /// On the emulator during a capture: records `op` instead of running it (true).
    fn record(&self, op: impl FnOnce() -> Recorded) -> bool {
        if self.is_emulator() && self.capturing() {
            self.recorded.lock().unwrap_or_else(|e| e.into_inner()).push(op());
            return true;
        }
        false
    }

    /// A point in this device's stream whose time can be read once the work before it is done
    /// (`elapsed_ms`): a timing event on a GPU; on the emulator, which runs each launch as it is
    /// issued, the host clock. Not inside a capture (a graph holds no timing events).
    pub fn mark(&self) -> Result<Mark> {
        self.refuse_in_capture(format_args!("a timing mark"))?;
        match &self.inner {
            Inner::Cuda { stream, .. } => stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map(Mark::Cuda)
                .map_err(|e| anyhow!("recording a timing event: {e}")),
            Inner::Emu(_) => Ok(Mark::Host(std::time::Instant::now())),
        }
    }

    /// Milliseconds from `start` to `end` (marks of this device), waiting for `end`'s work.
    pub fn elapsed_ms(&self, start: &Mark, end: &Mark) -> Result<f64> {
        match (start, end) {
            (Mark::Cuda(a), Mark::Cuda(b)) => a.elapsed_ms(b).map(f64::from).map_err(|e| anyhow!("reading a timing event: {e}")),
            (Mark::Host(a), Mark::Host(b)) => Ok(b.saturating_duration_since(*a).as_secs_f64() * 1e3),
            _ => bail!("internal error: timing marks of different devices"),
        }
    }

    /// Waits for all issued work; an error names `what` (asynchronous kernel faults surface here).
    pub fn sync(&self, what: &str) -> Result<()> {
        self.refuse_in_capture(format_args!("a synchronisation ({what})"))?;
        let Inner::Cuda { stream, .. } = &self.inner else { return Ok(()) };
        stream.synchronize().map_err(|e| {
            anyhow!(
                "{what}: CUDA error {e}{}",
                if self.sync_each() { "" } else { " (rerun with FASTDET_CUDA_SYNC=1 to name the failing kernel)" }
            )
        })
    }

    /// `bytes` of uninitialised device memory (at least 1 byte is allocated).
    pub fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        self.refuse_in_capture(format_args!("an allocation of {bytes} bytes"))?;
        match &self.inner {
            Inner::Cuda { ctx, stream, .. } => {
                // SAFETY: uninitialised memory is only read after a kernel or copy wrote it.
                let mem = unsafe { stream.alloc::<u8>(bytes.max(1)) }.map_err(|e| self.alloc_error(ctx, bytes, e))?;
                let (ptr, g) = mem.device_ptr(stream);
                drop(g);
                self.usage.add(bytes);
                Ok(DevBuf { _mem: Some(Mem::Cuda(mem)), ptr, bytes, usage: Some(self.usage.clone()) })
            }
            Inner::Emu(emu) => self.alloc_emulated(emu, bytes),
        }
    }

    /// A failed allocation of `bytes`, with the device's free memory; an `OutOfMemory` error when
    /// the device is full (the runner retries a batch of tiles in halves on that type).
    fn alloc_error(&self, ctx: &CudaContext, bytes: usize, e: cudarc::driver::DriverError) -> anyhow::Error {
        let free = ctx.mem_get_info().map(|(f, _)| format!("{:.2} GiB free", f as f64 / (1u64 << 30) as f64)).unwrap_or_default();
        let msg = format!("allocating {:.1} MiB on cuda:{}: {e} {free}", bytes as f64 / (1u64 << 20) as f64, self.info.ordinal);
        if e.0 == cudarc::driver::sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
            anyhow::Error::new(crate::pipeline::runner::OutOfMemory(msg))
        } else {
            anyhow!(msg)
        }
    }

    fn alloc_emulated(&self, emu: &Arc<Emu>, bytes: usize) -> Result<DevBuf> {
        if self.memory_live().saturating_add(bytes) > self.emu_limit.load(Ordering::Relaxed) {
            let msg = format!("allocating {bytes} bytes on the emulator: over its limit of {} bytes", self.emu_limit.load(Ordering::Relaxed));
            return Err(anyhow::Error::new(crate::pipeline::runner::OutOfMemory(msg)));
        }
        let a = emu.alloc(bytes.max(1));
        self.usage.add(bytes);
        Ok(DevBuf { ptr: a.base, _mem: Some(Mem::Emu(a)), bytes, usage: Some(self.usage.clone()) })
    }

    /// A second stream on this handle's context for work the main stream must not wait for
    /// (`side_upload.rs`); None on the emulators, whose side work is modelled there.
    pub(super) fn new_side_stream(&self) -> Result<Option<Arc<CudaStream>>> {
        match &self.inner {
            Inner::Cuda { ctx, .. } => ctx.new_stream().map(Some).map_err(|e| anyhow!("creating a side stream on cuda:{}: {e}", self.info.ordinal)),
            Inner::Emu(_) => Ok(None),
        }
    }

    /// `bytes` of uninitialised device memory allocated (and later freed) on `side`, a stream of
    /// `new_side_stream`, so that another thread may allocate while this handle captures a
    /// graph. On the emulators (`side` None) an emulated allocation with the same bookkeeping.
    pub(super) fn alloc_side(&self, side: Option<&Arc<CudaStream>>, bytes: usize) -> Result<DevBuf> {
        match (&self.inner, side) {
            (Inner::Cuda { ctx, stream, .. }, Some(side)) => {
                // SAFETY: uninitialised memory is only read after the copy wrote it.
                let slice = unsafe { side.alloc::<u8>(bytes.max(1)) }.map_err(|e| self.alloc_error(ctx, bytes, e))?;
                let (ptr, g) = slice.device_ptr(side);
                drop(g);
                self.usage.add(bytes);
                Ok(DevBuf { _mem: Some(Mem::Side { mem: SideMem::Cuda { slice, main: stream.clone() }, used: false }), ptr, bytes, usage: Some(self.usage.clone()) })
            }
            (Inner::Emu(emu), _) => {
                let mut b = self.alloc_emulated(emu, bytes)?;
                if let Some(Mem::Emu(a)) = b._mem.take() {
                    b._mem = Some(Mem::Side { mem: SideMem::Emu(a), used: false });
                }
                Ok(b)
            }
            (Inner::Cuda { .. }, None) => bail!("internal error: a side allocation without a side stream"),
        }
    }

    /// The emulator of this handle, if it is one.
    pub(super) fn emu(&self) -> Option<&Arc<Emu>> {
        match &self.inner {
            Inner::Emu(e) => Some(e),
            Inner::Cuda { .. } => None,
        }
    }

    /// Counts `bytes` copied to this device outside `write` (`bytes_to_device`).
    pub(super) fn count_to_device(&self, bytes: usize) {
        self.to_device.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A new buffer holding `data`.
    pub fn upload<T: cudarc::driver::DeviceRepr>(&self, data: &[T]) -> Result<DevBuf> {
        let b = self.alloc(std::mem::size_of_val(data))?;
        self.write(b.ptr, data)?;
        Ok(b)
    }

    /// Copies `data` to device address `dst` (which must hold `size_of_val(data)` bytes).
    pub fn write<T>(&self, dst: u64, data: &[T]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.refuse_in_capture(format_args!("a copy from the host"))?;
        self.to_device.fetch_add(std::mem::size_of_val(data) as u64, Ordering::Relaxed);
        let stream = match &self.inner {
            Inner::Cuda { stream, .. } => stream,
            Inner::Emu(emu) => {
                // SAFETY: plain-old-data host values viewed as bytes.
                let bytes = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data)) };
                return emu.write_bytes(dst, bytes);
            }
        };
        self.bind()?;
        // SAFETY: dst holds enough bytes (callers allocate from the same sizes); pageable source
        // memory is staged by the driver before the call returns.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, data, stream.cu_stream()) }
            .map_err(|e| anyhow!("copy of {} bytes to the device: {e}", std::mem::size_of_val(data)))
    }

    /// Copies `len` elements from device address `src` to the host (waits for the stream).
    pub fn read<T: Default + Clone>(&self, src: u64, len: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); len];
        if len == 0 {
            return Ok(out);
        }
        self.refuse_in_capture(format_args!("a copy to the host"))?;
        self.to_host.fetch_add((len * std::mem::size_of::<T>()) as u64, Ordering::Relaxed);
        let stream = match &self.inner {
            Inner::Cuda { stream, .. } => stream,
            Inner::Emu(emu) => {
                // SAFETY: plain-old-data host values viewed as bytes.
                let bytes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, len * std::mem::size_of::<T>()) };
                emu.read_bytes(src, bytes)?;
                return Ok(out);
            }
        };
        self.bind()?;
        // SAFETY: src holds len elements (checked by the callers' sizes).
        unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut out[..], src, stream.cu_stream()) }
            .map_err(|e| anyhow!("copy of {} bytes from the device: {e}", len * std::mem::size_of::<T>()))?;
        self.sync("copying results to the host")?;
        Ok(out)
    }

    /// Zeroes `bytes` at `dst`.
    pub fn zero(&self, dst: u64, bytes: usize) -> Result<()> {
        self.check_capture_thread()?;
        if bytes == 0 || self.record(|| Recorded::Zero { dst, bytes }) {
            return Ok(());
        }
        let stream = match &self.inner {
            Inner::Cuda { stream, .. } => stream,
            Inner::Emu(emu) => return emu.write_bytes(dst, &vec![0u8; bytes]),
        };
        self.bind()?;
        // SAFETY: dst holds `bytes` bytes.
        unsafe { cudarc::driver::result::memset_d8_async(dst, 0, bytes, stream.cu_stream()) }.map_err(|e| anyhow!("memset of {bytes} bytes: {e}"))
    }

    /// Device-to-device copy of `bytes`.
    pub fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.check_capture_thread()?;
        if bytes == 0 || self.record(|| Recorded::Copy { dst, src, bytes }) {
            return Ok(());
        }
        let stream = match &self.inner {
            Inner::Cuda { stream, .. } => stream,
            Inner::Emu(emu) => {
                let mut tmp = vec![0u8; bytes];
                emu.read_bytes(src, &mut tmp)?;
                return emu.write_bytes(dst, &tmp);
            }
        };
        self.bind()?;
        // SAFETY: both ranges hold `bytes` bytes.
        unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, stream.cu_stream()) }.map_err(|e| anyhow!("device copy of {bytes} bytes: {e}"))
    }

    pub fn has_kernel(&self, name: &str) -> bool {
        self.sigs.contains_key(name)
    }

    /// Launches kernel `name`. `args` must match the kernel's C parameters in order and type
    /// (checked against the signature parsed from kernels/*.cu: a mismatch is an error, not UB).
    pub fn launch(&self, name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), args: &[Arg]) -> Result<()> {
        let sig = self.sigs.get(name).with_context(|| format!("no kernel {name} in kernels/*.cu"))?;
        let kinds: Vec<ParamKind> = args.iter().map(Arg::kind).collect();
        if &kinds != sig {
            bail!("internal error: {name} takes {sig:?}, the launcher passed {kinds:?}");
        }
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 || grid.1 > 65535 || grid.2 > 65535 || grid.0 > i32::MAX as u32 {
            bail!("{name}: invalid grid {grid:?}");
        }
        if block.0 * block.1 * block.2 == 0 || block.0 * block.1 * block.2 > 1024 {
            bail!("{name}: invalid block {block:?}");
        }
        self.check_capture_thread()?;
        if self.record(|| Recorded::Launch { name: name.to_string(), grid, block, args: args.to_vec() }) {
            return Ok(());
        }
        let (stream, funcs) = match &self.inner {
            Inner::Cuda { stream, funcs, .. } => (stream, funcs),
            Inner::Emu(emu) => return emu.launch(name, grid, block, args).with_context(|| format!("emulated {name} (grid {grid:?}, block {block:?})")),
        };
        let f = funcs.get(name).with_context(|| format!("kernel {name} is not loaded (kernels/*.cu out of date?)"))?;
        let mut b = stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::I32(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::U32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig { grid_dim: grid, block_dim: block, shared_mem_bytes: 0 };
        // SAFETY: the argument list matches the kernel's signature (ops.rs, one wrapper per
        // kernel) and every pointer holds the sizes the kernel's header requires (checked there).
        unsafe { b.launch(cfg) }.map_err(|e| anyhow!("launching {name} (grid {grid:?}, block {block:?}): {e}"))?;
        if self.sync_each() && !self.capturing() {
            stream.synchronize().map_err(|e| anyhow!("kernel {name} (grid {grid:?}, block {block:?}) failed: {e}"))?;
        }
        Ok(())
    }
}

/// NVRTC targets to try for compute capability `cc`, best first: the exact cubin (no JIT, no PTX
/// version issue with the driver), the PTX of the same arch (JIT by the driver), and compute_75 PTX
/// (for an NVRTC that does not know this GPU yet).
fn targets(cc: (i32, i32)) -> Vec<Target> {
    let a = (cc.0 * 10 + cc.1).max(0) as u32;
    let mut t = vec![Target::Cubin(a), Target::Ptx(a)];
    if a != 75 {
        t.push(Target::Ptx(75));
    }
    t
}

/// Loaded modules and their kernels by name.
type Modules = (Vec<Arc<CudaModule>>, HashMap<String, CudaFunction>);
type Loaded = (Vec<Arc<CudaModule>>, HashMap<String, CudaFunction>, String, KernelLoad);

/// How a handle's kernels were loaded: a first start compiles them with NVRTC, later ones load the
/// cached images (the cold start's two cases, reported apart).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KernelLoad {
    /// Kernel files (modules) loaded.
    pub files: usize,
    /// Of those, the ones NVRTC compiled (not in the cache).
    pub compiled: usize,
    /// Wall seconds NVRTC spent compiling them (the files compile in parallel).
    pub compile_s: f64,
    /// Seconds for the whole load: cache reads, compiles and module loads.
    pub load_s: f64,
}

impl std::fmt::Display for KernelLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.compiled == 0 {
            write!(f, "{} files from the cache, loaded in {:.2} s", self.files, self.load_s)
        } else {
            write!(f, "{} files, {} compiled by NVRTC in {:.1} s, loaded in {:.1} s", self.files, self.compiled, self.compile_s, self.load_s)
        }
    }
}

fn load_kernels(ctx: &Arc<CudaContext>, info: &DeviceInfo, cache: &KernelCache) -> Result<Loaded> {
    let cc = info.compute_capability;
    if !nvrtc::nvrtc_available() {
        bail!("NVRTC (libnvrtc.so) not found: the CUDA kernels are compiled at first use ({})", nvrtc::INSTALL_HINT);
    }
    let ver = nvrtc::nvrtc_version()?;
    let include: Vec<PathBuf> = nvrtc::find_cuda_include().into_iter().collect();
    let mut errors: Vec<String> = Vec::new();
    let started = std::time::Instant::now();
    // Compiles for targets that then failed count too: they are part of this start.
    let mut load = KernelLoad::default();
    for target in targets(cc) {
        match load_all(ctx, cache, target, &include, &mut load) {
            Ok((m, f)) => {
                load.load_s = started.elapsed().as_secs_f64();
                let note = format!(
                    "{} from NVRTC {}.{} (cache {}; {load}{})",
                    target.arch(),
                    ver.0,
                    ver.1,
                    cache.dir.display(),
                    if errors.is_empty() { String::new() } else { format!("; after: {}", errors.join("; ")) }
                );
                return Ok((m, f, note, load));
            }
            Err(e) => errors.push(format!("{}: {e:#}", target.arch())),
        }
    }
    let mut hint = match include.first() {
        None => "; cuda_fp16.h was not found: set FASTDET_CUDA_INCLUDE to a directory holding it (pip wheel nvidia/cu13/include or /usr/local/cuda/include)".to_string(),
        Some(dir) => nvrtc::include_problems(dir, ver).iter().map(|p| format!("; {p}")).collect(),
    };
    hint.push_str(&driver_too_old(info.driver_version, ver).map(|p| format!("; {p}")).unwrap_or_default());
    bail!("could not compile and load the CUDA kernels for sm_{}{}:\n  {}{hint}", cc.0, cc.1, errors.join("\n  "))
}

/// Why a driver cannot load what this NVRTC makes, when it is older than NVRTC's CUDA release
/// (`driver` as cuDriverGetVersion gives it, e.g. 12040 for CUDA 12.4): images of a newer
/// toolkit need a driver of at least its major release.
pub(crate) fn driver_too_old(driver: i32, nvrtc: (i32, i32)) -> Option<String> {
    (driver > 0 && driver / 1000 < nvrtc.0).then(|| {
        format!(
            "the driver supports CUDA {}.{} but NVRTC is {}.{}: its kernels need a driver for CUDA {}.0 or newer (update the driver, or put an NVRTC {}.x with its headers on LD_LIBRARY_PATH / FASTDET_CUDA_INCLUDE)",
            driver / 1000,
            (driver % 1000) / 10,
            nvrtc.0,
            nvrtc.1,
            nvrtc.0,
            driver / 1000
        )
    })
}

/// Every kernel file's module for `target`; adds its NVRTC compiles to `load` (their count, and
/// the wall seconds of the compiling: the files compile in parallel).
fn load_all(ctx: &Arc<CudaContext>, cache: &KernelCache, target: Target, include: &[PathBuf], load: &mut KernelLoad) -> Result<Modules> {
    let mut modules = Vec::new();
    let mut funcs = HashMap::new();
    load.files = SOURCES.len();
    let (images, wall_s) = cache.get_or_compile_all(SOURCES, &target.arch(), include)?;
    let compiled = images.iter().filter(|(_, t)| t.is_some()).count();
    if compiled > 0 {
        load.compiled += compiled;
        load.compile_s += wall_s;
    }
    for ((file, src), (image, compiled_now)) in SOURCES.iter().zip(images) {
        let (module, recompile_s) = load_one(ctx, cache, file, src, target, include, image)?;
        if let Some(t) = recompile_s {
            load.compiled += usize::from(compiled_now.is_none());
            load.compile_s += t;
        }
        for name in kernel_names(src) {
            let f = module.load_function(&name).map_err(|e| anyhow!("{file}: kernel {name} not in the module: {e}"))?;
            funcs.insert(name, f);
        }
        modules.push(module);
    }
    Ok((modules, funcs))
}

fn module_from(ctx: &Arc<CudaContext>, target: Target, mut image: Vec<u8>) -> Result<Arc<CudaModule>> {
    if target.is_cubin() {
        if !image.starts_with(b"\x7fELF") {
            bail!("not a cubin (no ELF header)");
        }
    } else {
        if image.contains(&0) {
            bail!("PTX text holds a NUL byte");
        }
        image.push(0);
    }
    ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image)).map_err(|e| anyhow!("cuModuleLoadData: {e}"))
}

/// One kernel file's module from its compiled or cached `image`, and NVRTC's seconds when that
/// image would not load and it had to compile the file afresh.
fn load_one(ctx: &Arc<CudaContext>, cache: &KernelCache, file: &str, src: &str, target: Target, include: &[PathBuf], image: Vec<u8>) -> Result<(Arc<CudaModule>, Option<f64>)> {
    let arch = target.arch();
    match module_from(ctx, target, image) {
        Ok(m) => Ok((m, None)),
        Err(first) => {
            // A stale or damaged cache entry: compile afresh once.
            let t = std::time::Instant::now();
            let c = nvrtc::compile(file, src, &arch, include).with_context(|| format!("recompiling {file} for {arch}"))?;
            let recompile_s = t.elapsed().as_secs_f64();
            let m = module_from(ctx, target, c.ptx_or_cubin.clone()).with_context(|| format!("loading {file} ({arch}); the cached image failed too: {first:#}"))?;
            if let Ok(ver) = nvrtc::nvrtc_version() {
                let _ = cache.store(file, src, target, ver, &c.ptx_or_cubin);
            }
            Ok((m, Some(recompile_s)))
        }
    }
}

/// Reusable device buffers: best fit on take, kept on give. An engine keeps its outputs here
/// (activations live in the arena), so a batch's outputs can outlive the walk that made them.
#[derive(Default)]
pub struct Pool {
    free: Vec<DevBuf>,
}

impl Pool {
    pub fn take(&mut self, gpu: &Gpu, bytes: usize) -> Result<DevBuf> {
        let bytes = bytes.max(1);
        let best = self.free.iter().enumerate().filter(|(_, b)| b.bytes >= bytes).min_by_key(|(_, b)| b.bytes).map(|(i, _)| i);
        if let Some(i) = best {
            return Ok(self.free.swap_remove(i));
        }
        match gpu.alloc(bytes) {
            Ok(b) => Ok(b),
            Err(e) if !self.free.is_empty() && e.is::<crate::pipeline::runner::OutOfMemory>() => {
                // Out of memory with idle buffers around: give them back and retry once.
                self.free.clear();
                gpu.alloc(bytes).with_context(|| format!("after freeing the pool: {e:#}"))
            }
            Err(e) => Err(e),
        }
    }

    /// The pooled buffer at `ptr` when it holds at least `bytes` (what a replayed graph writes to).
    pub fn take_at(&mut self, ptr: u64, bytes: usize) -> Option<DevBuf> {
        let i = self.free.iter().position(|b| b.ptr == ptr && b.bytes >= bytes)?;
        Some(self.free.swap_remove(i))
    }

    pub fn give(&mut self, b: DevBuf) {
        self.free.push(b);
    }

    pub fn clear(&mut self) {
        self.free.clear();
    }

    pub fn pooled_bytes(&self) -> usize {
        self.free.iter().map(|b| b.bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::{driver_too_old, Arg, Gpu, KernelLoad};

    /// A driver for CUDA 12.4 cannot load NVRTC 13's images, and the reason says what to do;
    /// a driver of NVRTC's release or newer (or an unknown one) gets no such note.
    #[test]
    fn a_driver_older_than_nvrtc_is_named() {
        let note = driver_too_old(12040, (13, 0)).unwrap();
        assert!(note.contains("the driver supports CUDA 12.4 but NVRTC is 13.0") && note.contains("CUDA 13.0 or newer") && note.contains("NVRTC 12.x"), "{note}");
        assert_eq!(driver_too_old(13000, (13, 0)), None);
        assert_eq!(driver_too_old(13020, (13, 0)), None);
        assert_eq!(driver_too_old(0, (13, 0)), None);
    }

    /// On the emulator, a `__restrict__` parameter that shares its buffer with a parameter that
    /// may be written is refused (a GPU compiler may assume they do not); separate buffers, or
    /// a plain parameter written in place, are fine.
    #[test]
    fn restrict_parameters_sharing_a_written_buffer_are_refused() {
        let gpu = Gpu::emulator().unwrap();
        let (x, y) = (gpu.alloc(256).unwrap(), gpu.alloc(256).unwrap());
        let bias = gpu.alloc(64).unwrap();
        for b in [&x, &y, &bias] {
            gpu.zero(b.ptr, b.bytes).unwrap();
        }
        // bias_act_f16(const __half* x, __half* y, const float* __restrict__ bias, long long pairs, int C, int act, float p)
        let args = |x: u64, y: u64, bias: u64| [Arg::Ptr(x), Arg::Ptr(y), Arg::Ptr(bias), Arg::I64(64), Arg::I32(16), Arg::I32(0), Arg::F32(0.0)];
        gpu.launch("bias_act_f16", (1, 1, 1), (128, 1, 1), &args(x.ptr, y.ptr, bias.ptr)).unwrap();
        gpu.launch("bias_act_f16", (1, 1, 1), (128, 1, 1), &args(x.ptr, x.ptr, bias.ptr)).unwrap();
        let e = gpu.launch("bias_act_f16", (1, 1, 1), (128, 1, 1), &args(x.ptr, y.ptr, y.ptr + 128)).unwrap_err();
        assert!(format!("{e:#}").contains("bias_act_f16: __restrict__ parameter 2") && format!("{e:#}").contains("and parameter 1"), "{e:#}");
    }

    /// The kernels note tells a first start (NVRTC compiled) from a cached one, with its seconds.
    #[test]
    fn kernel_load_tells_a_compiling_start_from_a_cached_one() {
        let cached = KernelLoad { files: 13, compiled: 0, compile_s: 0.0, load_s: 0.042 };
        assert_eq!(cached.to_string(), "13 files from the cache, loaded in 0.04 s");
        let first = KernelLoad { files: 13, compiled: 12, compile_s: 20.94, load_s: 21.3 };
        assert_eq!(first.to_string(), "13 files, 12 compiled by NVRTC in 20.9 s, loaded in 21.3 s");
    }
}
