//! fastdet: particle picking in cryo-electron tomograms with SegResNet / DynUNet point detectors.
//!
//! Data flows one way: checkpoint → [`convert`] → fp16 weights → [`model`] graph → [`engine`];
//! tomogram → [`io`] → [`pipeline`] (tiling, engine, blending, detection) → picks → [`io`] writers,
//! and [`metric`] scores picks against ground truth.

// Comparisons written `!(a <= b)` are NaN-aware on purpose (a NaN fails them, as in PyTorch's
// max-pool and in the checks of user input).
#![allow(clippy::neg_cmp_op_on_partial_ord)]

/// The git commit this build comes from (build.rs; "unknown" outside a git checkout).
pub const COMMIT: &str = env!("FASTDET_COMMIT");
/// What `fastdet --version` prints after the name, e.g. "0.1.0 (commit 1a2b3c4)".
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("FASTDET_COMMIT"), ")");

pub mod particles;
pub mod pickle;
pub mod checkpoint;
pub mod convert;
pub mod weights;
pub mod model;
pub mod engine;
pub mod pipeline;
pub mod io;
pub mod metric;
pub mod util;
pub mod synth;
pub mod qc;
