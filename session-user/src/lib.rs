//! The `session` daemon and CLI as a library: configuration, policy compilation, loading
//! and attaching the eBPF programs, reading the pinned maps back.

pub mod classify;
pub mod clock;
pub mod compile;
pub mod config;
pub mod daemon;
pub mod events;
pub mod frames;
pub mod instance;
pub mod links;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod mutate;
pub mod privileges;
pub mod readmit;
pub mod report;
pub mod teardown;
pub mod xdp_features;
