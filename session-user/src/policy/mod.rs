//! The policy as the operator writes it and as the kernel runs it: the TOML file parsed
//! and validated with `file:line:col` errors, compiled into fixed-size rule entries, and
//! indexed into the per-dimension rule bitmaps the kernel's classifier ANDs.

pub mod compile;
pub mod config;
pub mod limits;
pub mod rule_bitmaps;
pub mod sets;
