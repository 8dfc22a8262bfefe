//! Tomogram → picks: tiling, ensemble inference, blending, detection.
pub mod tiling;
pub mod blend;
pub mod detect;
pub mod rescale;
pub mod runner;
