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

/// Fewest slots per bank, as a power of two (64 KiB).
pub const MIN_SLOT_BITS: u32 = 16;
/// Most slots per bank, as a power of two (64 MiB), enough for the largest table.
pub const MAX_SLOT_BITS: u32 = 26;

/// Slots per bank, as a power of two, for a protected tier of `max_sessions`: two per
/// session, so that a full table sets about 39% of the slots (1 - e^(-1/2)).
pub fn slot_bits_for(max_sessions: u32) -> u32 {
    (u64::from(max_sessions) * 2)
        .next_power_of_two()
        .trailing_zeros()
        .clamp(MIN_SLOT_BITS, MAX_SLOT_BITS)
}

/// 64-bit words of the filter map for `slot_bits`: two banks of one-byte slots.
pub const fn words(slot_bits: u32) -> u32 {
    2 * (1 << slot_bits) / 8
}

/// Whether a packet may only start a flow, not continue one: a TCP SYN without ACK, RST or
/// FIN. These are the packets of a SYN flood, and the only ones asked of the filter.
#[inline(always)]
pub fn is_connection_attempt(meta: &PacketMeta) -> bool {
    meta.proto == proto::TCP
        && meta.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST | tcp_flags::FIN)
            == tcp_flags::SYN
}

/// The slot of `key` among `1 << slot_bits` (`slot_bits` within [`MIN_SLOT_BITS`] and
/// [`MAX_SLOT_BITS`]), from a multiplicative hash of its five words: the same in the
/// kernel and in the reaper. Each word is followed by a shift-xor, without which keys
/// that differ only in a few address and port bits (a /16 of clients, say) crowd into a
/// fraction of the slots.
#[inline(always)]
pub fn slot(key: &FlowKey, slot_bits: u32) -> u32 {
    const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
    let words: &[u64; 5] = bytemuck::cast_ref(key);
    let mut hash = 0u64;
    for word in words {
        hash = (hash ^ word).wrapping_mul(MULTIPLIER);
        hash ^= hash >> 29;
    }
    (hash.wrapping_mul(MULTIPLIER) >> (64 - slot_bits.clamp(MIN_SLOT_BITS, MAX_SLOT_BITS))) as u32
}

/// Byte offset of `slot` of `bank` (0 or 1) in the filter map: word `offset / 8`, byte
/// `offset % 8` of that word.
#[inline(always)]
pub fn byte_offset(bank: u32, slot: u32, slot_bits: u32) -> u32 {
    let slot_bits = slot_bits.clamp(MIN_SLOT_BITS, MAX_SLOT_BITS);
    ((bank & 1) << slot_bits) + (slot & ((1 << slot_bits) - 1))
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
        let bits = 20;
        let slots: HashSet<u32> = (0..100_000).map(|n| slot(&key(n), bits)).collect();
        // 100,000 random slots of 2^20 would collide about 4,700 times.
        assert!(
            slots.len() > 94_000,
            "only {} distinct slots for 100,000 keys",
            slots.len()
        );
        assert!(slots.iter().all(|&slot| slot < 1 << bits));
        let mut other = key(7);
        other.proto = proto::UDP;
        assert_ne!(
            slot(&key(7), bits),
            slot(&other, bits),
            "the protocol changes the slot"
        );
    }

    #[test]
    fn a_table_of_similar_keys_fills_the_slots_as_random_ones_would() {
        // Clients of one /16 with four source ports each, to one server port, as in the
        // kernel benchmark's table: 2^18 keys in 2^19 slots set 1 - e^-1/2 = 39.3% of
        // them when spread evenly.
        let server = [198, 18, 0, 1];
        let slots: HashSet<u32> = (0u32..1 << 18)
            .map(|i| {
                let mut key = FlowKey {
                    port_lo: 8080,
                    port_hi: 1024 + (i >> 16) as u16,
                    proto: proto::TCP,
                    family: crate::wire::FAMILY_IPV4,
                    ..FlowKey::default()
                };
                key.addr_lo[10..12].copy_from_slice(&[0xff, 0xff]);
                key.addr_lo[12..].copy_from_slice(&server);
                key.addr_hi[10..12].copy_from_slice(&[0xff, 0xff]);
                key.addr_hi[12..].copy_from_slice(&[198, 19, (i >> 8) as u8, i as u8]);
                slot(&key, 19)
            })
            .collect();
        let fill = slots.len() as f64 / f64::from(1u32 << 19);
        assert!((0.38..0.41).contains(&fill), "{fill:.3} of the slots set");
    }

    #[test]
    fn the_filter_has_two_slots_per_session_within_its_bounds() {
        assert_eq!(slot_bits_for(262_144), 19);
        assert_eq!(slot_bits_for(1 << 20), 21);
        assert_eq!(slot_bits_for(1_000_000), 21);
        assert_eq!(slot_bits_for(1024), MIN_SLOT_BITS);
        assert_eq!(slot_bits_for(16_777_216), 25);
        assert_eq!(slot_bits_for(u32::MAX), MAX_SLOT_BITS);
        assert_eq!(words(19), (1 << 20) / 8);
    }

    #[test]
    fn the_two_banks_use_disjoint_bytes_of_the_map() {
        let bits = 19;
        for slot in [0, 7, 8, (1 << bits) - 1] {
            assert_eq!(byte_offset(0, slot, bits), slot);
            assert_eq!(byte_offset(1, slot, bits), slot + (1 << bits));
            assert!(byte_offset(1, slot, bits) / 8 < words(bits));
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
