//! The CUDA engine's building blocks (cudarc). So far: the kernel sources (`kernels/*.cu`) and
//! their run-time compilation by NVRTC with an on-disk cache. The engine itself
//! (`Device::Cuda`) is not wired yet: `engine::open` still answers with an error for it.
pub mod kernels;
pub mod nvrtc;
