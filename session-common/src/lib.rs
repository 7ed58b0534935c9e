//! The shared core of `session`: wire types that cross the kernel/user boundary and the
//! pure connection-tracking logic (parser, flow keys, state machines, policy matching).
//!
//! Everything here is `no_std` and takes the current time as an argument, so the very same
//! code runs inside the eBPF program and in host unit tests, property tests and fuzzers.
#![no_std]

pub mod clock;
pub mod engine;
pub mod expect;
pub mod forward;
pub mod fragment;
pub mod limits;
pub mod packet;
pub mod policy;
pub mod presence;
pub mod record;
pub mod rule_bitmaps;
pub mod sets;
pub mod syn_defence;
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

/// Zeroes `value` with one volatile store per 8-byte word (4-byte for 4-aligned types).
/// LLVM merges runs of plain zero stores into a `memset` call, and in BPF that call is
/// aya-ebpf's byte loop: about five instructions per byte, a third of an established
/// packet's cost before this existed. Volatile stores are never merged.
#[inline(always)]
pub fn zero_words<T: bytemuck::Zeroable>(value: &mut T) {
    const {
        assert!(core::mem::align_of::<T>() >= 4 && core::mem::size_of::<T>().is_multiple_of(4));
    }
    if core::mem::align_of::<T>() >= 8 && core::mem::size_of::<T>().is_multiple_of(8) {
        write_zeros(
            (value as *mut T).cast::<u64>(),
            core::mem::size_of::<T>() / 8,
        );
    } else {
        write_zeros(
            (value as *mut T).cast::<u32>(),
            core::mem::size_of::<T>() / 4,
        );
    }
}

/// `count` volatile zero stores of `W` from `words` on.
#[inline(always)]
fn write_zeros<W: bytemuck::Zeroable>(words: *mut W, count: usize) {
    let mut i = 0;
    while i < count {
        // SAFETY: the caller's value spans `count` aligned words of `W`, and all zero
        // bytes are a valid value of it (`Zeroable`).
        unsafe { words.add(i).write_volatile(W::zeroed()) };
        i += 1;
    }
}
