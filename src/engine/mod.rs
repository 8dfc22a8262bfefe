//! Inference engines behind one interface: the CPU reference engine (the oracle) and CUDA.
pub mod cpu;
pub mod cuda;

use anyhow::Result;

/// Network outputs for a batch of tiles, f32, C-order.
#[derive(Debug, Clone)]
pub struct Outputs {
    /// `[n, num_classes, d/2, h/2, w/2]` sigmoid scores.
    pub scores: Vec<f32>,
    /// `[n, 3, d/2, h/2, w/2]` offsets in voxels, channels x, y, z.
    pub offsets: Vec<f32>,
    /// `[n, head_in, d/2, h/2, w/2]` when asked for.
    pub fm2: Option<Vec<f32>>,
}

/// Runs one model on batches of tiles.
pub trait TileEngine: Send {
    /// `input` is `[n, in_channels, tile...]` f32.
    fn forward(&mut self, input: &[f32], n: usize, tile: [usize; 3], want_fm2: bool) -> Result<Outputs>;
    fn name(&self) -> String;
    /// Peak bytes of accelerator memory held by the engine's device since it opened (shared by the
    /// engines on one device); None for the CPU engine.
    fn device_memory_peak(&self) -> Option<usize> {
        None
    }
    /// The CUDA engine behind this one, for work that keeps the outputs on its device (the
    /// runner's device blending); None for every other engine.
    fn as_cuda(&mut self) -> Option<&mut cuda::CudaEngine> {
        None
    }
}

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
    /// `emu:N`: the CUDA engine on the host emulator of its kernels (no GPU; slow, small inputs
    /// only). It takes the CUDA path's every step, device blending included, so that the GPU
    /// pipeline and its multi-worker runs are tested without a GPU.
    Emu(usize),
}

impl Device {
    pub fn parse(s: &str) -> Result<Self> {
        if s == "cpu" {
            return Ok(Device::Cpu);
        }
        let bad = || anyhow::anyhow!("bad device {s:?}: expected cpu, cuda:N or emu:N (the kernel emulator, for testing)");
        if let Some(i) = s.strip_prefix("cuda:").or(if s == "cuda" { Some("0") } else { None }) {
            return Ok(Device::Cuda(i.parse().map_err(|_| bad())?));
        }
        if let Some(i) = s.strip_prefix("emu:").or(if s == "emu" { Some("0") } else { None }) {
            return Ok(Device::Emu(i.parse().map_err(|_| bad())?));
        }
        Err(bad())
    }

    /// Whether models on this device run on the CUDA engine (a GPU or its emulator).
    pub fn is_cuda_engine(&self) -> bool {
        matches!(self, Device::Cuda(_) | Device::Emu(_))
    }

    /// This thread's shared handle of the device (`Gpu::open` with the default kernel cache, or
    /// `Gpu::open_emulator`); None for the CPU.
    pub fn open_gpu(self) -> Result<Option<std::sync::Arc<cuda::gpu::Gpu>>> {
        Ok(match self {
            Device::Cpu => None,
            Device::Cuda(i) => Some(cuda::gpu::Gpu::open(i, None)?),
            Device::Emu(i) => Some(cuda::gpu::Gpu::open_emulator(i)?),
        })
    }
}

/// `--device auto`, worked out once per process: every GPU the CUDA driver sees
/// (`CUDA_VISIBLE_DEVICES` limits them), one worker each, when the driver loads and sees one, and
/// NVRTC is there and not newer than the driver; else the CPU. The text says what was found, or
/// why not a GPU.
pub fn auto_devices() -> &'static (Vec<Device>, String) {
    static AUTO: std::sync::OnceLock<(Vec<Device>, String)> = std::sync::OnceLock::new();
    AUTO.get_or_init(|| {
        let probe = cuda::gpu::probe(0);
        let nvrtc = if probe.is_ok() && cuda::nvrtc::nvrtc_available() { cuda::nvrtc::nvrtc_version().ok() } else { None };
        auto_devices_from(probe, nvrtc)
    })
}

/// `auto_devices` on a probe of the first GPU (which counts them) and NVRTC's version (None:
/// absent).
fn auto_devices_from(probe: Result<cuda::gpu::DeviceInfo>, nvrtc: Option<(i32, i32)>) -> (Vec<Device>, String) {
    let info = match probe {
        Ok(info) => info,
        Err(e) => {
            // The probe's errors end with advice for `--device cuda:N` users; auto needs none.
            let why = format!("{e:#}");
            return (vec![Device::Cpu], format!("no GPU: {}", why.strip_suffix(cuda::USE_CPU).unwrap_or(&why)));
        }
    };
    let found = format!("{} GPU(s), the first a {}", info.device_count, info.name);
    match nvrtc {
        None => (vec![Device::Cpu], format!("{found}, but no NVRTC to compile their kernels ({})", cuda::nvrtc::INSTALL_HINT)),
        Some(v) => match cuda::gpu::driver_too_old(info.driver_version, v) {
            Some(why) => (vec![Device::Cpu], format!("{found}; {why}")),
            None => ((0..info.device_count).map(Device::Cuda).collect(), found),
        },
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Emu(i) => write!(f, "emu:{i}"),
        }
    }
}

/// Opens an engine for one model on a device.
pub fn open(device: Device, weights: &crate::weights::Weights) -> Result<Box<dyn TileEngine>> {
    match device {
        Device::Cpu => Ok(Box::new(cpu::CpuEngine::new(weights)?)),
        // Kernels are cached under $FASTDET_KERNEL_CACHE (default ~/.cache/fastdet/kernels).
        Device::Cuda(i) => Ok(Box::new(cuda::CudaEngine::new(weights, i, None)?)),
        Device::Emu(i) => Ok(Box::new(cuda::CudaEngine::on(cuda::gpu::Gpu::open_emulator(i)?, weights, cuda::ConvBackend::from_env()?)?)),
    }
}

/// `open`, for an engine that will walk batches of `n` tiles of `tile`: with
/// `FASTDET_CONV=measure`, a CUDA engine runs the convolution path timed fastest on that shape
/// (`cuda::choose`; the choice is remembered beside the compiled kernels), and the returned line
/// says which; otherwise the same as `open`, and None.
pub fn open_for(device: Device, weights: &crate::weights::Weights, n: usize, tile: [usize; 3]) -> Result<(Box<dyn TileEngine>, Option<cuda::choose::Choice>)> {
    let measure = device.is_cuda_engine() && cuda::ConvBackend::from_env()? == cuda::ConvBackend::Measure;
    let gpu = if measure { device.open_gpu()? } else { None };
    let Some(gpu) = gpu else { return Ok((open(device, weights)?, None)) };
    let cache = cuda::choose::ChoiceCache::default_location();
    let (e, choice) = cuda::choose::open_measured(gpu, weights, n, tile, &cache, cuda::choose::Measure::default())?;
    Ok((Box::new(e), Some(choice)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpus(n: usize, driver_version: i32) -> Result<cuda::gpu::DeviceInfo> {
        let name = "Stand-in GPU".to_string();
        Ok(cuda::gpu::DeviceInfo { ordinal: 0, name, compute_capability: (9, 0), total_mem: 1 << 34, multiprocessors: 132, driver_version, device_count: n })
    }

    #[test]
    fn auto_takes_every_gpu_when_they_can_work_else_the_cpu_and_why() {
        let (d, why) = auto_devices_from(gpus(2, 13000), Some((13, 0)));
        assert_eq!((d.as_slice(), why.as_str()), ([Device::Cuda(0), Device::Cuda(1)].as_slice(), "2 GPU(s), the first a Stand-in GPU"));
        let (d, why) = auto_devices_from(Err(anyhow::anyhow!("{}", cuda::NO_DRIVER)), Some((13, 0)));
        assert_eq!((d.as_slice(), why.as_str()), ([Device::Cpu].as_slice(), "no GPU: no CUDA driver found (libcuda.so cannot be loaded)"));
        let (d, why) = auto_devices_from(gpus(1, 13000), None);
        assert!(d == [Device::Cpu] && why.starts_with("1 GPU(s), the first a Stand-in GPU, but no NVRTC to compile their kernels (pip install"), "{why}");
        let (d, why) = auto_devices_from(gpus(1, 12040), Some((13, 0)));
        assert!(d == [Device::Cpu] && why.starts_with("1 GPU(s), the first a Stand-in GPU; the driver supports CUDA 12.4 but NVRTC is 13.0"), "{why}");
    }
}
