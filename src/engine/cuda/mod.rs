//! The CUDA engine (cudarc): one context + stream per GPU, the kernels of `kernels/*.cu` compiled by
//! NVRTC for the device's own architecture at first use and cached on disk, cuDNN for the
//! convolutions (with our own implicit-GEMM kernel as the fallback), and the self-test that checks
//! every kernel and both networks against the CPU engine.
//!
//! Nothing here panics when there is no GPU: `gpu::probe` / `CudaEngine::new` answer
//! "no CUDA driver found; use --device cpu" as an ordinary error.
//!
//! Environment:
//! - `FASTDET_KERNEL_CACHE`: compiled-kernel cache (default `~/.cache/fastdet/kernels`);
//! - `FASTDET_CUDA_INCLUDE`: directory holding `cuda_fp16.h` for NVRTC (else found next to the
//!   NVRTC library on `LD_LIBRARY_PATH`, in `$VIRTUAL_ENV`, `$CUDA_HOME`, `/usr/local/cuda`);
//! - `FASTDET_CHECK_KERNELS=once|always|never`: when a run checks the kernels on its device
//!   against the CPU engine before using it (default once per card model, driver, NVRTC, cuDNN and
//!   kernels, remembered in `kernel-checks.json`; `kernel_check.rs`);
//! - `FASTDET_CONV=auto|cudnn|direct|tc|measure`: convolution backend (default auto: cuDNN, falling
//!   back to `conv3d_igemm_f16` per shape, and the tc path when cuDNN does not load on a card with
//!   tensor cores; tc: `conv3d_tc_f16` on tensor cores, each norm read by one conv applied in that
//!   conv's loads; measure: whichever of cuDNN and the tc variants walks the network fastest on
//!   the run's batch and tile, timed once per device, network and shape and remembered in
//!   `conv-choices.json` beside the compiled kernels, `choose.rs`);
//! - `FASTDET_TC_NORM_IN_LOADS=pointwise|all|never`: which norms a tensor-core conv applies in
//!   its loads (default pointwise: before 1x1x1 convs only);
//! - `FASTDET_TC_TILES=standard|wide`: the tensor-core convs' block tiles for more than 32
//!   output channels (default standard, 64x64; wide, 128x64);
//! - `FASTDET_TC_ASYNC=off|on`: tensor-core convs load through cp.async (three stages; sm_80+)
//!   where no norm is applied in their loads (default off);
//! - `FASTDET_TC_HALO=off|on`: 3x3x3 stride-1 tensor-core convs with Cin a multiple of 16 whose
//!   output whole 2x4x16 bricks tile run on halo tiles, each block staging its input once per 16 channels (default off;
//!   `ops::halo_fits`);
//! - `FASTDET_CONVT=tc|fma`: transposed convolutions on the tensor cores where Cin % 16 == 0 and
//!   Cout % 8 == 0 (default tc), or on the f32 FMA kernel (`ops::ConvtKernel`);
//! - `FASTDET_TC_SPLIT_K=N`: most K splits of a tensor-core convolution whose grid cannot fill
//!   the device (default 16; 1 turns split K off);
//! - `FASTDET_CUDA_GRAPHS=0`: no CUDA graphs (by default the second walk of each shape is
//!   captured and later ones replay it; see `engine.rs`);
//! - `FASTDET_CUDA_SYNC=1`: synchronise after every kernel and name the one that failed (no
//!   graphs then);
//! - `FASTDET_CUDNN_WORKSPACE_MIB`: largest cuDNN workspace (default 1024);
//! - `FASTDET_CUDNN_FIND=1`: cuDNN's algorithms timed on the real buffers at each convolution
//!   shape's first run, fastest deterministic one kept (as PyTorch's `cudnn.benchmark`; once per
//!   device and shape in a process), instead of its heuristic order (`dnn.rs`);
//! - `FASTDET_CUDNN_API=legacy|graph`: plan cuDNN's convolutions with its legacy descriptors
//!   (default) or its graph API, whose heuristics list every engine and knob setting for a shape
//!   (`dnn_graph.rs`; the measured choice times both); `FASTDET_CUDNN_RUNTIME_COMPILED=1` lets it
//!   use engines cuDNN compiles at run time (at each process start; left out by default);
//! - `FASTDET_OVERLAP_UPLOAD=0`: `fastdet run` copies each volume to the device when its turn
//!   comes, instead of on a side stream while the previous one is computed (`side_upload`).
//!
//! `tomogram` keeps a tomogram's volume, tile extraction, ensemble averaging, tile blending and
//! the first stage of detection (peaks, thresholds) on the device (the runner's
//! `Settings::device_blend`).
//!
//! `arena` is the activation memory of one device handle (one per worker thread), shared by the
//! worker's engines and handed out in the same order every walk, which is what lets a walk be
//! captured into a CUDA graph and replayed.
//!
//! `emu` is a host emulator of every kernel (tests only): the engine and the self-test run on it
//! here, without a GPU. `host_kernels` builds the kernels' own source for the host (the C++
//! compiler and `kernels/host/`), so that the emulator can run the real kernel code instead.
pub mod arena;
pub mod choose;
pub mod device_wide;
pub mod dnn;
pub mod dnn_graph;
pub mod emu;
pub mod engine;
pub mod gpu;
pub mod host_kernels;
pub mod kernel_check;
pub mod kernels;
pub mod nvrtc;
pub mod ops;
pub mod remembered;
pub mod selftest;
pub mod side_upload;
pub mod tomogram;

pub use engine::{memory_plan, ConvBackend, CudaEngine, DeviceOutputs, MemoryPlan};
pub use side_upload::{PendingVolume, SideUploader};
pub use tomogram::{DeviceVolume, TomogramAccumulator};
pub use gpu::{driver_available, probe, DeviceInfo, NO_DRIVER, USE_CPU};

/// The choice environment variable `var` names among `choices`; unset or empty is the first.
pub(crate) fn env_choice<T: Copy>(var: &str, choices: &[(&str, T)]) -> anyhow::Result<T> {
    let value = std::env::var(var).unwrap_or_default();
    if value.is_empty() {
        return Ok(choices[0].1);
    }
    if let Some(&(_, c)) = choices.iter().find(|(name, _)| *name == value) {
        return Ok(c);
    }
    let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
    let (last, rest) = names.split_last().expect("at least one choice");
    anyhow::bail!("{var}={value:?}: expected {} or {last}", rest.join(", "))
}

#[cfg(test)]
mod tests {
    use super::env_choice;

    /// A choice variable: unset or empty is the first choice, a known name its value, anything
    /// else an error listing the names.
    #[test]
    fn env_choice_reads_the_named_choice() {
        let var = "FASTDET_TEST_ENV_CHOICE";
        let choices = [("a", 1), ("b", 2), ("c", 3)];
        std::env::remove_var(var);
        assert_eq!(env_choice(var, &choices).unwrap(), 1);
        std::env::set_var(var, "");
        assert_eq!(env_choice(var, &choices).unwrap(), 1);
        std::env::set_var(var, "c");
        assert_eq!(env_choice(var, &choices).unwrap(), 3);
        std::env::set_var(var, "d");
        assert_eq!(env_choice(var, &choices).unwrap_err().to_string(), "FASTDET_TEST_ENV_CHOICE=\"d\": expected a, b or c");
        std::env::remove_var(var);
    }
}
