//! The presence filter in front of the session table: one byte per slot, set for every
//! flow key the table may hold. A connection attempt (a TCP SYN without ACK, RST or FIN)
//! whose slot is clear cannot belong to a session, so it skips both tiers' lookups. Under
//! a SYN flood from many sources those lookups miss the cache in the tiers' bucket arrays,
//! and they were a third of the cost of each dropped SYN (BENCHMARKS.md).
//!
//! A set slot only says "look": the filter has false positives and never false negatives.
//! That holds because of who writes it:
//! - The kernel path sets a key's slot in both banks right after storing a session under
//!   that key (a new session, or one moved into the protected tier).
//! - The reaper rebuilds the inactive bank: it clears it, then sets the slot of every key
//!   it reads from both tiers, then makes that bank active. A session stored before the
//!   clear is read by the sweep that follows it; one stored after the clear sets its own
//!   slot.
//!
//! Slots are bytes, not bits, so that setting one is a plain store: no writer can lose
//! another's slot in a read-modify-write, and the BPF target needs no atomics.
//!
//! Only connection attempts consult the filter, so established packets pay nothing for it.

use crate::packet::{PacketMeta, tcp_flags};
use crate::wire::{FlowKey, proto};

/// Slots per bank as a power of two: 2^20 bytes, 1 MiB, about a core's L2 cache here, and
/// 4 slots per session at the default capacity.
pub const SLOT_BITS: u32 = 20;
/// Slots (bytes) per bank.
pub const SLOTS: u32 = 1 << SLOT_BITS;
/// 64-bit words per bank; the filter map is an array of words.
pub const WORDS_PER_BANK: u32 = SLOTS / 8;
/// Words of the filter map: two banks, one active while the reaper rebuilds the other.
pub const WORDS: u32 = 2 * WORDS_PER_BANK;

/// Whether a packet may only start a flow, not continue one: a TCP SYN without ACK, RST or
/// FIN. These are the packets of a SYN flood, and the only ones asked of the filter.
#[inline(always)]
pub fn is_connection_attempt(meta: &PacketMeta) -> bool {
    meta.proto == proto::TCP
        && meta.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST | tcp_flags::FIN)
            == tcp_flags::SYN
}

/// The slot of `key`, from a multiplicative hash of its five words (the same in the kernel
/// and in the reaper).
#[inline(always)]
pub fn slot(key: &FlowKey) -> u32 {
    let words: &[u64; 5] = bytemuck::cast_ref(key);
    let mut hash = 0u64;
    for word in words {
        hash = (hash ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    (hash >> (64 - SLOT_BITS)) as u32
}

/// Byte offset of `slot` of `bank` (0 or 1) in the filter map: word `offset / 8`, byte
/// `offset % 8` of that word.
#[inline(always)]
pub fn byte_offset(bank: u32, slot: u32) -> u32 {
    (bank & 1) * SLOTS + slot % SLOTS
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::HashSet;

    use super::*;

    fn key(n: u32) -> FlowKey {
        let mut key = FlowKey {
            port_lo: (n % 60000) as u16,
            port_hi: 8080,
            proto: proto::TCP,
            family: crate::wire::FAMILY_IPV4,
            ..FlowKey::default()
        };
        key.addr_lo[10..12].copy_from_slice(&[0xff, 0xff]);
        key.addr_lo[12..].copy_from_slice(&(0xc612_0000 | (n >> 4)).to_be_bytes());
        key.addr_hi[10..12].copy_from_slice(&[0xff, 0xff]);
        key.addr_hi[12..].copy_from_slice(&[198, 18, 0, 1]);
        key
    }

    #[test]
    fn keys_that_differ_in_any_field_spread_over_the_slots() {
        let slots: HashSet<u32> = (0..100_000).map(|n| slot(&key(n))).collect();
        // 100,000 random slots of 2^20 would collide about 4,700 times.
        assert!(
            slots.len() > 94_000,
            "only {} distinct slots for 100,000 keys",
            slots.len()
        );
        assert!(slots.iter().all(|&slot| slot < SLOTS));
        let mut other = key(7);
        other.proto = proto::UDP;
        assert_ne!(slot(&key(7)), slot(&other), "the protocol changes the slot");
    }

    #[test]
    fn the_two_banks_use_disjoint_bytes_of_the_map() {
        for slot in [0, 7, 8, SLOTS - 1] {
            assert_eq!(byte_offset(0, slot), slot);
            assert_eq!(byte_offset(1, slot), slot + SLOTS);
            assert!(byte_offset(1, slot) / 8 < WORDS);
        }
    }

    #[test]
    fn only_a_syn_without_ack_rst_or_fin_is_a_connection_attempt() {
        let mut meta = PacketMeta {
            proto: proto::TCP,
            tcp_flags: tcp_flags::SYN,
            ..PacketMeta::default()
        };
        assert!(is_connection_attempt(&meta));
        for extra in [tcp_flags::ACK, tcp_flags::RST, tcp_flags::FIN] {
            meta.tcp_flags = tcp_flags::SYN | extra;
            assert!(!is_connection_attempt(&meta), "SYN with {extra:#x}");
        }
        meta.tcp_flags = tcp_flags::SYN;
        meta.proto = proto::UDP;
        assert!(!is_connection_attempt(&meta));
    }
}
