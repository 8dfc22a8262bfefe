//! Subcommand implementations.
pub mod convert;
pub mod forward;
pub mod run;
pub mod score;
pub mod selftest;
