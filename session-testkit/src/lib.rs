//! What the tests and benchmarks of session need and the firewall does not: frames built
//! to order, the structural mutations of the kernel-path differential run, the TOML
//! pieces of the tests' policies and what the benchmarks share. Kept out of the
//! production crates so that nothing here ships in the `session` binary.

pub mod bench;
pub mod frames;
pub mod mutate;
pub mod policy;
