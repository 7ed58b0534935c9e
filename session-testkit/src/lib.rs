//! What the tests and benchmarks of session need and the firewall does not: frames built
//! to order, the common pieces of test policies and the structural mutations of the
//! kernel-path differential run. Kept out of
//! the production crates so that nothing here ships in the `session` binary.

pub mod frames;
pub mod mutate;
pub mod policies;
