//! New-flow rule classification without a walk over the rules: per-dimension rule bitmaps.
//!
//! Every dimension a rule matches on (hook and ct state, family and protocol, interface,
//! source and destination network, source and destination port, ICMP type) has a table
//! that maps a packet's value in that dimension to the bitmap of the bank's entries that
//! accept that value (bit `i` = entry `i`). The first entry matching the packet is the
//! lowest bit set in all of the packet's bitmaps, so finding it costs a fixed number of
//! lookups and at most [`RULE_WORDS`] word ANDs however many entries the bank holds. The
//! result equals the first entry for which [`rule_matches`] holds; the host
//! model keeps that linear walk as the reference the kernel is compared with.
//!
//! The tables live in BPF maps in the kernel and in plain collections on the host, behind
//! [`BitTables`]; their layouts are defined here so both sides agree.

use bytemuck::{Pod, Zeroable};

use crate::{
    packet::PacketMeta,
    policy::rule_matches,
    sets::{SET_MASKS, SetRefs, membership},
    wire::{CtState, FAMILY_IPV6, Hook, MAX_RULES, Rule, proto},
};

/// 64-bit words in a [`RuleBits`]: one bit per entry of a full bank.
pub const RULE_WORDS: usize = MAX_RULES as usize / 64;
const _: () = assert!(RULE_WORDS * 64 == MAX_RULES as usize);

/// A set of entries of one bank: bit `i % 64` of word `i / 64` is entry `i`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct RuleBits {
    /// The bits, lowest entries in word 0.
    pub words: [u64; RULE_WORDS],
}
const _: () = assert!(core::mem::size_of::<RuleBits>() == 128);

impl Default for RuleBits {
    fn default() -> Self {
        Self::zeroed()
    }
}

impl RuleBits {
    /// Adds entry `index`.
    pub fn set(&mut self, index: usize) {
        self.words[index / 64] |= 1 << (index % 64);
    }

    /// Whether entry `index` is in the set.
    pub fn contains(&self, index: usize) -> bool {
        self.words[index / 64] & (1 << (index % 64)) != 0
    }

    /// Adds every entry of `other`.
    pub fn union_with(&mut self, other: &RuleBits) {
        for (word, more) in self.words.iter_mut().zip(other.words.iter()) {
            *word |= more;
        }
    }
}

/// Slots of one bank in the direct-indexed bitmap array (`RULE_BITS`): the bank's first
/// slot is `bank * BANK_SLOTS`, each table below an offset from there.
pub mod bits_slot {
    use super::PORT_INTERVALS;

    /// `hook * 8 + state` (8 slots per hook, 5 used): entries whose state and hook masks
    /// hold both.
    pub const STATE_HOOK: u32 = 0;
    /// `family * 256 + protocol` (family 0 = IPv4, 1 = IPv6): entries whose family and
    /// protocol are that one or 0 (any).
    pub const FAMILY_PROTO: u32 = STATE_HOOK + 16;
    /// Entries without a port match: the ports bitmap of a packet that is not TCP or UDP.
    pub const NO_PORTS: u32 = FAMILY_PROTO + 512;
    /// Entries without an ICMP type match: the ICMP bitmap of a packet that is not ICMP.
    pub const NO_ICMP_TYPE: u32 = NO_PORTS + 1;
    /// `type`: for an ICMP or ICMPv6 packet, entries without an ICMP type match or with
    /// that type.
    pub const ICMP_TYPE: u32 = NO_ICMP_TYPE + 1;
    /// Source-port interval `k` (see [`super::PortBounds`]): entries without a port match
    /// or whose source range holds the interval.
    pub const SPORT: u32 = ICMP_TYPE + 256;
    /// Destination-port interval `k`, as [`SPORT`].
    pub const DPORT: u32 = SPORT + PORT_INTERVALS;
    /// Source-set membership mask `m` (`crate::sets::membership`): entries without a
    /// source set, or whose source set `i` has bit `i` in `m`.
    pub const SRC_SETS: u32 = DPORT + PORT_INTERVALS;
    /// Destination-set membership mask `m`, as [`SRC_SETS`].
    pub const DST_SETS: u32 = SRC_SETS + crate::sets::SET_MASKS;
    /// Slots per bank.
    pub const BANK_SLOTS: u32 = DST_SETS + crate::sets::SET_MASKS;
}

/// Most elementary port intervals one dimension can need: every entry contributes at most
/// two interval starts (`lo` and `hi + 1`) besides port 0.
pub const PORT_INTERVALS: u32 = 2 * MAX_RULES + 1;

/// Ports a [`PortIntervals`] table indexes: every one.
pub const PORTS: usize = 1 << 16;

/// The elementary intervals of one port dimension of one bank, by port: `of_port[p]` is
/// the interval that holds port `p`. A table of every port costs 128 KiB per bank and
/// dimension but one load per packet, where a binary search over the interval starts took
/// twelve dependent steps, a third of a dropped SYN's cost (BENCHMARKS.md). One map value
/// per bank and dimension, so an apply writes it with one update.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct PortIntervals {
    /// Interval of each port, below [`PORT_INTERVALS`].
    pub of_port: [u16; PORTS],
}
const _: () = assert!(core::mem::size_of::<PortIntervals>() == 2 * PORTS);
const _: () = assert!(PORT_INTERVALS <= u16::MAX as u32);

impl PortIntervals {
    /// The interval that holds `port`, bounded for the bitmap slot it selects.
    #[inline(always)]
    pub fn interval(&self, port: u16) -> u32 {
        u32::from(self.of_port[usize::from(port)]).min(PORT_INTERVALS - 1)
    }
}

/// Which port a [`PortIntervals`] value splits; its index within a bank in `PORT_INTERVALS`
/// (`bank * 2 + dimension`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortDim {
    /// The source port.
    Source = 0,
    /// The destination port.
    Destination = 1,
}

/// Which address an LPM table indexes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrDim {
    /// The source address (`SRC_NETS`).
    Source,
    /// The destination address (`DST_NETS`).
    Destination,
}

/// The data of an address LPM-trie key: the bank, then the address (IPv4-mapped for IPv4).
/// A network of prefix `p` is stored with prefix length [`ADDR_KEY_BANK_BITS`]` + p`, so
/// the banks never see each other's networks. The bank is a whole word (no padding for
/// the kernel path to zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AddrKey {
    /// Policy bank, 0 or 1.
    pub bank: u32,
    /// Network or packet address.
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<AddrKey>() == 20);

/// Bits of an LPM prefix length taken by [`AddrKey::bank`].
pub const ADDR_KEY_BANK_BITS: u32 = 32;

/// Key of the interface table: entries of `bank` bound to `ifindex`. `ifindex` 0 holds the
/// entries that match any interface, which is also the answer for an interface no entry
/// names.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct IfaceKey {
    /// Policy bank, 0 or 1.
    pub bank: u32,
    /// Interface index, 0 for "no interface entry names it".
    pub ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<IfaceKey>() == 8);

/// Where the classifier finds a bank's bitmaps and entries: BPF maps in the kernel, plain
/// collections on the host.
pub trait BitTables {
    /// Slot `slot` (a [`bits_slot`] offset plus index) of `bank`'s direct-indexed bitmaps.
    fn bits(&self, bank: u32, slot: u32) -> Option<&RuleBits>;
    /// Entries of `bank` that match interface `ifindex`, when an entry names it.
    fn iface_bits(&self, bank: u32, ifindex: u32) -> Option<&RuleBits>;
    /// The bitmap of the longest network of `bank` in dimension `dim` that holds `addr`.
    fn addr_bits(&self, dim: AddrDim, bank: u32, addr: &[u8; 16]) -> Option<&RuleBits>;
    /// The port intervals of `bank` in dimension `dim`.
    fn port_intervals(&self, bank: u32, dim: PortDim) -> Option<&PortIntervals>;
    /// Entry `index` of `bank`.
    fn entry(&self, bank: u32, index: u32) -> Option<&Rule>;
    /// The sets `bank` references (`crate::sets`).
    fn set_refs(&self, bank: u32) -> Option<&SetRefs>;
    /// Whether `addr` is in a live prefix of set storage `storage`.
    fn set_member(&self, storage: u32, addr: &[u8; 16]) -> bool;
}

/// Index of the first of the `count` entries of `bank` that match the packet, as the first
/// `i` for which [`rule_matches`] holds; `None` when none does (or a table is missing,
/// which a bank the daemon wrote never has). `meta.family` must be IPv4 or IPv6, as the
/// parser guarantees for every packet that reaches the policy.
///
/// The five dimensions read by direct index (hook and state, family and protocol, ports,
/// ICMP type) go first: their lowest common entry is the only candidate for the first
/// match, because any earlier entry already fails one of them. When that candidate
/// matches outright (an established packet on the `established` rule, a new flow on a
/// port rule) the answer costs no hash or LPM lookup; otherwise the interface and both
/// networks join the AND.
#[inline(always)]
pub fn first_match_index<T: BitTables>(
    tables: &T,
    bank: u32,
    count: u32,
    meta: &PacketMeta,
    state: CtState,
    hook: Hook,
    ifindex: u32,
) -> Option<u32> {
    let bank = bank & 1;
    let state_hook = tables.bits(
        bank,
        bits_slot::STATE_HOOK + ((hook as u32 & 1) << 3) + (state as u32 & 7),
    )?;
    let family = u32::from(meta.family == FAMILY_IPV6);
    let family_proto = tables.bits(
        bank,
        bits_slot::FAMILY_PROTO + (family << 8) + u32::from(meta.proto),
    )?;
    let (sport, dport) = if meta.proto == proto::TCP || meta.proto == proto::UDP {
        let sports = tables.port_intervals(bank, PortDim::Source)?;
        let dports = tables.port_intervals(bank, PortDim::Destination)?;
        (
            tables.bits(bank, bits_slot::SPORT + sports.interval(meta.sport))?,
            tables.bits(bank, bits_slot::DPORT + dports.interval(meta.dport))?,
        )
    } else {
        let none = tables.bits(bank, bits_slot::NO_PORTS)?;
        (none, none)
    };
    let icmp = if meta.proto == proto::ICMP || meta.proto == proto::ICMPV6 {
        tables.bits(bank, bits_slot::ICMP_TYPE + u32::from(meta.icmp_type))?
    } else {
        tables.bits(bank, bits_slot::NO_ICMP_TYPE)?
    };
    let words = (count.min(MAX_RULES) as usize).div_ceil(64);
    let direct = [state_hook, family_proto, sport, dport, icmp];
    let candidate = lowest_common(&direct, words).filter(|found| *found < count)?;
    let entry = tables.entry(bank, candidate)?;
    if entry.src_set | entry.dst_set == 0 && rule_matches(entry, meta, state, hook, ifindex) {
        return Some(candidate);
    }
    let iface = match tables.iface_bits(bank, ifindex) {
        Some(bits) => bits,
        None => tables.iface_bits(bank, 0)?,
    };
    let src = tables.addr_bits(AddrDim::Source, bank, &meta.src)?;
    let dst = tables.addr_bits(AddrDim::Destination, bank, &meta.dst)?;
    // Set dimensions: a bank without sets ANDs `state_hook` again, which changes nothing
    // and costs no lookup.
    let refs = tables.set_refs(bank)?;
    let src_sets = if refs.src_count == 0 {
        state_hook
    } else {
        let mask = membership(refs.src_count, &refs.src, |storage| {
            tables.set_member(storage, &meta.src)
        });
        tables.bits(bank, bits_slot::SRC_SETS + (mask & (SET_MASKS - 1)))?
    };
    let dst_sets = if refs.dst_count == 0 {
        state_hook
    } else {
        let mask = membership(refs.dst_count, &refs.dst, |storage| {
            tables.set_member(storage, &meta.dst)
        });
        tables.bits(bank, bits_slot::DST_SETS + (mask & (SET_MASKS - 1)))?
    };
    let all = [
        state_hook,
        family_proto,
        sport,
        dport,
        icmp,
        iface,
        src,
        dst,
        src_sets,
        dst_sets,
    ];
    lowest_common(&all, words).filter(|found| *found < count)
}

/// The lowest entry set in every one of `maps`, looking at the first `words` words only.
#[inline(always)]
fn lowest_common<const N: usize>(maps: &[&RuleBits; N], words: usize) -> Option<u32> {
    let mut i = 0;
    while i < RULE_WORDS {
        if i >= words {
            return None;
        }
        let mut common = u64::MAX;
        let mut m = 0;
        while m < N {
            common &= maps[m].words[i];
            m += 1;
        }
        if common != 0 {
            return Some(i as u32 * 64 + lowest_bit(common));
        }
        i += 1;
    }
    None
}

/// Position of the lowest set bit of a non-zero word: the number of ones below it, counted
/// in parallel. Branch-free (the verifier walks one path) and without a table or loop (BPF
/// has no count-trailing-zeros instruction).
#[inline(always)]
pub fn lowest_bit(word: u64) -> u32 {
    // Ones exactly below the lowest set bit; opaque so LLVM does not turn the count back
    // into a `cttz` that the BPF backend would expand with a lookup table.
    let below = crate::opaque((word & word.wrapping_neg()).wrapping_sub(1));
    let pairs = below - ((below >> 1) & 0x5555_5555_5555_5555);
    let nibbles = (pairs & 0x3333_3333_3333_3333) + ((pairs >> 2) & 0x3333_3333_3333_3333);
    let bytes = (nibbles + (nibbles >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    (bytes.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::{AddrKey, IfaceKey, PortIntervals, RuleBits};

    // aya's Pod asks what bytemuck's does; the derive checks it at compile time
    // (`#[repr(C)]`, `Copy`, no implicit padding).
    // SAFETY: `RuleBits` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for RuleBits {}
    // SAFETY: `PortIntervals` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for PortIntervals {}
    // SAFETY: `AddrKey` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for AddrKey {}
    // SAFETY: `IfaceKey` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for IfaceKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_bit_equals_trailing_zeros_for_every_single_bit_and_mixtures() {
        for bit in 0..64 {
            let word = 1u64 << bit;
            assert_eq!(lowest_bit(word), bit);
            assert_eq!(lowest_bit(word | (u64::MAX << bit)), bit);
            assert_eq!(lowest_bit(word | (1 << 63)), bit);
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x != 0 {
                assert_eq!(lowest_bit(x), x.trailing_zeros(), "{x:#x}");
            }
        }
    }

    #[test]
    fn a_port_finds_its_interval_and_a_bad_table_value_stays_in_bounds() {
        let mut table = PortIntervals {
            of_port: [0; PORTS],
        };
        table.of_port[22] = 1;
        table.of_port[65535] = 7;
        table.of_port[80] = u16::MAX;
        assert_eq!(table.interval(0), 0);
        assert_eq!(table.interval(22), 1);
        assert_eq!(table.interval(65535), 7);
        assert_eq!(table.interval(80), PORT_INTERVALS - 1);
    }
}
