//! The presence filter (`session_common::presence`) as the daemon sees it: the mappable
//! array mapped into this process, so the reaper can rebuild a bank with memory writes.

use std::{
    path::Path,
    sync::atomic::{AtomicU8, AtomicU64, Ordering},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::MapData;
use rustix::mm::{MapFlags, ProtFlags};
use session_common::{
    presence,
    wire::{FlowKey, map_names},
};

/// The presence filter map, mapped into this process: the reaper rebuilds a bank of up to
/// 64 MiB with memory writes, where a system call per word would take seconds.
pub(crate) struct PresenceFilter {
    bytes: *mut u8,
    len: usize,
    /// Slots per bank as a power of two, from the map's size.
    slot_bits: u32,
}

impl PresenceFilter {
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        use std::os::fd::AsFd as _;
        let path = dir.join(map_names::PRESENCE);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("cannot open pinned map {}", path.display()))?;
        let words = data
            .info()
            .with_context(|| format!("reading the size of {}", path.display()))?
            .max_entries();
        let slot_bits = (words * 8 / 2).trailing_zeros();
        if presence::words(slot_bits) != words
            || !(presence::MIN_SLOT_BITS..=presence::MAX_SLOT_BITS).contains(&slot_bits)
        {
            bail!(
                "{} holds {words} words, not two banks of a power of two of slots: it was pinned by another version; run `session down` and start again",
                path.display()
            );
        }
        let len = words as usize * 8;
        // SAFETY: a new shared mapping at an address the kernel picks, so it overlaps no
        // memory Rust knows about; it covers exactly the value area of an array created
        // with BPF_F_MMAPABLE (its size checked above), and it keeps the map alive after
        // `data` closes its descriptor. Every access to it is atomic (see `clear`).
        let bytes = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                data.fd().as_fd(),
                0,
            )
        }
        .map_err(std::io::Error::from)
        .with_context(|| format!("mapping {} into memory", path.display()))?;
        Ok(PresenceFilter {
            bytes: bytes.cast(),
            len,
            slot_bits,
        })
    }

    /// Clears every slot of `bank`.
    pub(crate) fn clear(&self, bank: u32) {
        let first = presence::byte_offset(bank, 0, self.slot_bits) as usize;
        for word in (first..first + (1 << self.slot_bits)).step_by(8) {
            // SAFETY: an 8-aligned word inside the mapping; the kernel writes the same
            // memory, so every access here is atomic.
            unsafe { AtomicU64::from_ptr(self.bytes.add(word).cast()) }.store(0, Ordering::Relaxed);
        }
    }

    /// The slot of `key` in `bank`.
    fn slot(&self, bank: u32, key: &FlowKey) -> &AtomicU8 {
        let slot = presence::slot(key, self.slot_bits);
        let offset = presence::byte_offset(bank, slot, self.slot_bits) as usize;
        // SAFETY: a byte inside the mapping, accessed atomically as in `clear`.
        unsafe { AtomicU8::from_ptr(self.bytes.add(offset)) }
    }

    /// Sets the slot of `key` in `bank`.
    pub(crate) fn set(&self, bank: u32, key: &FlowKey) {
        self.slot(bank, key).store(1, Ordering::Relaxed);
    }

    /// Whether the slot of `key` in `bank` is set.
    pub(crate) fn get(&self, bank: u32, key: &FlowKey) -> bool {
        self.slot(bank, key).load(Ordering::Relaxed) != 0
    }

    /// The share of `bank`'s slots that are set.
    pub(crate) fn fill(&self, bank: u32) -> f64 {
        let first = presence::byte_offset(bank, 0, self.slot_bits) as usize;
        let slots = 1usize << self.slot_bits;
        let set = (first..first + slots)
            .filter(|&i| {
                // SAFETY: a byte inside the mapping, accessed atomically as in `clear`.
                unsafe { AtomicU8::from_ptr(self.bytes.add(i)) }.load(Ordering::Relaxed) != 0
            })
            .count();
        set as f64 / slots as f64
    }
}

impl Drop for PresenceFilter {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `open` made; nothing refers to it any more,
        // since the slot references `slot` hands out borrow `self`. Failing to unmap only
        // leaks the mapping, so the result is ignored.
        let _ = unsafe { rustix::mm::munmap(self.bytes.cast(), self.len) };
    }
}
