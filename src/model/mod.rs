//! Architecture specs and their lowering to a flat graph of ops.
pub mod spec;
pub mod graph;
