//! The shared core of `session`: wire types that cross the kernel/user boundary and the
//! pure connection-tracking logic (parser, flow keys, state machines, policy matching).
//!
//! Everything here is `no_std` and takes the current time as an argument, so the very same
//! code runs inside the eBPF program and in host unit tests, property tests and fuzzers.
#![no_std]

pub mod classify;
pub mod engine;
pub mod packet;
pub mod policy;
pub mod track;
pub mod wire;

/// Hides a value's known range from the optimiser, so that a mask applied after it stays
/// in the code: LLVM would drop a mask it can prove redundant, but the BPF verifier needs
/// to see it to bound a table index.
#[inline(always)]
pub fn opaque<T: Copy>(value: T) -> T {
    // SAFETY: reads a valid, initialised local.
    unsafe { core::ptr::read_volatile(&value) }
}
