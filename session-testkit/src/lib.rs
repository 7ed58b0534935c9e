//! What the tests and benchmarks of session need and the firewall does not: frames built
//! to order, the structural mutations of the kernel-path differential run and the TOML
//! pieces of the tests' policies. Kept out of the production crates so that nothing here
//! ships in the `session` binary.

pub mod frames;
pub mod mutate;
pub mod policy;
