//! Readers and writers: OME-Zarr tomograms, copick picks, Kaggle CSV.
pub mod zarr;
pub mod dataset;
pub mod copick;
pub mod csv;
pub mod tensors;
pub mod mrc;
pub mod star;
