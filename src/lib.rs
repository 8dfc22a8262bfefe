//! fastdet: particle picking in cryo-electron tomograms with SegResNet / DynUNet point detectors.
//!
//! Data flows one way: checkpoint → [`convert`] → fp16 weights → [`model`] graph → [`engine`];
//! tomogram → [`io`] → [`pipeline`] (tiling, engine, blending, detection) → picks → [`io`] writers,
//! and [`metric`] scores picks against ground truth.

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
