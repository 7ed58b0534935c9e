//! Builds the classifier's rule bitmaps (see `session_common::rule_bitmaps`) from a bank's
//! compiled entries, and backs [`BitTables`] with them on the host so tests can check the
//! bitmap classification against the linear walk.

use std::collections::BTreeMap;

use session_common::{
    rule_bitmaps::{AddrDim, BitTables, PORTS, PortDim, PortIntervals, RuleBits, bits_slot},
    sets::{MAX_SETS_PER_DIM, SET_MASKS, SetRefs, mask_accepts},
    wire::{Rule, rule_flags},
};

use crate::policy::{compile::CompiledSets, sets::HostSet};

/// Why a bank's entries cannot be turned into bitmaps.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleBitmapError {
    /// A network mask is not a run of ones followed by zeros, so no prefix table holds it.
    #[error(
        "kernel entry {entry} has a {side} mask {mask:032x} that is not a prefix mask; \
         the classifier indexes networks by prefix length (this is a bug in whatever built \
         the entry: the policy compiler only makes prefix masks)"
    )]
    NotPrefixMask {
        /// Index of the entry.
        entry: usize,
        /// "source" or "destination".
        side: &'static str,
        /// The mask.
        mask: u128,
    },
    /// A network has bits set outside its mask, so it could never match any address.
    #[error(
        "kernel entry {entry} has a {side} network {net:032x} with bits outside its /{prefix} \
         mask (this is a bug in whatever built the entry: networks must be masked)"
    )]
    HostBitsSet {
        /// Index of the entry.
        entry: usize,
        /// "source" or "destination".
        side: &'static str,
        /// The network.
        net: u128,
        /// Its prefix length.
        prefix: u32,
    },
}

/// One network in an address table, with the entries whose network contains it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetBits {
    /// Prefix length in the 128-bit space.
    pub prefix: u32,
    /// The network (host bits zero), IPv4-mapped for IPv4.
    pub addr: [u8; 16],
    /// Entries whose network contains this one.
    pub bits: RuleBits,
}

/// Everything the kernel needs, besides the entries themselves, to classify against one
/// bank: what `PinnedMaps::apply_policy` writes into the bank's share of the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleBitmaps {
    /// The bank's direct-indexed bitmaps, `bits_slot::BANK_SLOTS` of them.
    pub bits: Vec<RuleBits>,
    /// Each port's interval, indexed by [`PortDim`].
    pub port_tables: [Box<PortIntervals>; 2],
    /// Used port intervals per [`PortDim`]: only these slots of the port tables are read.
    pub port_intervals: [u32; 2],
    /// Interface index to entries matching it; index 0 = entries matching any interface.
    pub ifaces: Vec<(u32, RuleBits)>,
    /// Source networks: every entry's, plus ::/0.
    pub src: Vec<NetBits>,
    /// Destination networks: every entry's, plus ::/0.
    pub dst: Vec<NetBits>,
}

fn mask_of(prefix: u32) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix)
    }
}

/// The prefix length of `mask`, checked to be a prefix mask, and `net` checked to be masked.
fn prefix_of(
    entry: usize,
    side: &'static str,
    net: &[u8; 16],
    mask: &[u8; 16],
) -> Result<(u32, u128), RuleBitmapError> {
    let mask = u128::from_be_bytes(*mask);
    let prefix = mask.leading_ones();
    if mask_of(prefix) != mask {
        return Err(RuleBitmapError::NotPrefixMask { entry, side, mask });
    }
    let net = u128::from_be_bytes(*net);
    if net & mask != net {
        return Err(RuleBitmapError::HostBitsSet {
            entry,
            side,
            net,
            prefix,
        });
    }
    Ok((prefix, net))
}

/// The address table of one side: every distinct network of the entries plus ::/0, each
/// with the entries whose network contains it, so the longest network holding an address
/// carries exactly the entries whose network holds the address.
fn address_table(networks: &[(u32, u128)]) -> Vec<NetBits> {
    let mut distinct: Vec<(u32, u128)> = networks.to_vec();
    distinct.push((0, 0));
    distinct.sort_unstable();
    distinct.dedup();
    distinct
        .into_iter()
        .map(|(prefix, net)| {
            let mut bits = RuleBits::default();
            for (entry, &(entry_prefix, entry_net)) in networks.iter().enumerate() {
                if entry_prefix <= prefix && net & mask_of(entry_prefix) == entry_net {
                    bits.set(entry);
                }
            }
            NetBits {
                prefix,
                addr: net.to_be_bytes(),
                bits,
            }
        })
        .collect()
}

/// Port intervals of one dimension and each interval's bitmap: entries without a port
/// match, or whose range in this dimension holds the interval.
fn port_table(
    entries: &[Rule],
    no_ports: &RuleBits,
    range: fn(&Rule) -> (u16, u16),
) -> (Box<PortIntervals>, Vec<RuleBits>) {
    let mut starts = vec![0u32];
    for rule in entries
        .iter()
        .filter(|r| r.match_flags & rule_flags::PORTS != 0)
    {
        let (lo, hi) = range(rule);
        starts.push(u32::from(lo));
        starts.push(u32::from(hi) + 1);
    }
    starts.retain(|start| *start <= u32::from(u16::MAX));
    starts.sort_unstable();
    starts.dedup();
    let mut bits = vec![*no_ports; starts.len()];
    for (entry, rule) in entries.iter().enumerate() {
        if rule.match_flags & rule_flags::PORTS == 0 {
            continue;
        }
        let (lo, hi) = range(rule);
        let first = starts.partition_point(|start| *start < u32::from(lo));
        for (start, interval) in starts[first..].iter().zip(&mut bits[first..]) {
            if *start > u32::from(hi) {
                break;
            }
            interval.set(entry);
        }
    }
    let mut intervals = Box::new(PortIntervals {
        of_port: [0; PORTS],
    });
    for (interval, start) in starts.iter().enumerate() {
        let end = starts
            .get(interval + 1)
            .map_or(PORTS, |next| *next as usize);
        intervals.of_port[*start as usize..end].fill(interval as u16);
    }
    (intervals, bits)
}

/// Builds the tables of a bank holding `entries` (at most `MAX_RULES`, which the compiler
/// guarantees).
pub fn build(entries: &[Rule]) -> Result<RuleBitmaps, RuleBitmapError> {
    let mut bits = vec![RuleBits::default(); bits_slot::BANK_SLOTS as usize];
    let slot = |offset: u32, index: u32| (offset + index) as usize;
    let mut src_nets = Vec::with_capacity(entries.len());
    let mut dst_nets = Vec::with_capacity(entries.len());
    let mut no_ports = RuleBits::default();
    let mut no_icmp = RuleBits::default();
    let mut any_iface = RuleBits::default();
    let mut by_iface: BTreeMap<u32, RuleBits> = BTreeMap::new();
    for (entry, rule) in entries.iter().enumerate() {
        for hook in 0..2u32 {
            for state in 0..5u32 {
                if rule.hook_mask & (1 << hook) != 0 && rule.state_mask & (1 << state) != 0 {
                    bits[slot(bits_slot::STATE_HOOK, hook * 8 + state)].set(entry);
                }
            }
        }
        for (family_index, family) in [4u8, 6].into_iter().enumerate() {
            if rule.family != 0 && rule.family != family {
                continue;
            }
            let base = family_index as u32 * 256;
            if rule.proto == 0 {
                for protocol in 0..256 {
                    bits[slot(bits_slot::FAMILY_PROTO, base + protocol)].set(entry);
                }
            } else {
                bits[slot(bits_slot::FAMILY_PROTO, base + u32::from(rule.proto))].set(entry);
            }
        }
        if rule.match_flags & rule_flags::PORTS == 0 {
            no_ports.set(entry);
        }
        if rule.match_flags & rule_flags::ICMP_TYPE == 0 {
            no_icmp.set(entry);
        } else {
            bits[slot(bits_slot::ICMP_TYPE, u32::from(rule.icmp_type))].set(entry);
        }
        for mask in 0..SET_MASKS {
            if mask_accepts(rule.src_set, mask) {
                bits[slot(bits_slot::SRC_SETS, mask)].set(entry);
            }
            if mask_accepts(rule.dst_set, mask) {
                bits[slot(bits_slot::DST_SETS, mask)].set(entry);
            }
        }
        if rule.ifindex == 0 {
            any_iface.set(entry);
        } else {
            by_iface.entry(rule.ifindex).or_default().set(entry);
        }
        src_nets.push(prefix_of(entry, "source", &rule.src_net, &rule.src_mask)?);
        dst_nets.push(prefix_of(
            entry,
            "destination",
            &rule.dst_net,
            &rule.dst_mask,
        )?);
    }
    bits[slot(bits_slot::NO_PORTS, 0)] = no_ports;
    bits[slot(bits_slot::NO_ICMP_TYPE, 0)] = no_icmp;
    for icmp_type in 0..256 {
        bits[slot(bits_slot::ICMP_TYPE, icmp_type)].union_with(&no_icmp);
    }
    let (sport_intervals, sport_bits) =
        port_table(entries, &no_ports, |r| (r.sport_lo, r.sport_hi));
    let (dport_intervals, dport_bits) =
        port_table(entries, &no_ports, |r| (r.dport_lo, r.dport_hi));
    let port_intervals = [sport_bits.len() as u32, dport_bits.len() as u32];
    for (offset, table) in [
        (bits_slot::SPORT, sport_bits),
        (bits_slot::DPORT, dport_bits),
    ] {
        for (k, interval) in table.into_iter().enumerate() {
            bits[slot(offset, k as u32)] = interval;
        }
    }
    let mut ifaces = vec![(0, any_iface)];
    for (ifindex, mut named) in by_iface {
        named.union_with(&any_iface);
        ifaces.push((ifindex, named));
    }
    Ok(RuleBitmaps {
        bits,
        port_tables: [sport_intervals, dport_intervals],
        port_intervals,
        ifaces,
        src: address_table(&src_nets),
        dst: address_table(&dst_nets),
    })
}

impl RuleBitmaps {
    /// The direct-indexed slots `apply_policy` must write: all but the unused port
    /// intervals, which no lookup can reach.
    pub fn used_slots(&self) -> impl Iterator<Item = (u32, &RuleBits)> {
        let [sports, dports] = self.port_intervals;
        self.bits
            .iter()
            .enumerate()
            .map(|(slot, bits)| (slot as u32, bits))
            .filter(move |(slot, _)| {
                let slot = *slot;
                if (bits_slot::SPORT..bits_slot::DPORT).contains(&slot) {
                    slot - bits_slot::SPORT < sports
                } else if (bits_slot::DPORT..bits_slot::SRC_SETS).contains(&slot) {
                    slot - bits_slot::DPORT < dports
                } else {
                    true
                }
            })
    }
}

/// One bank on the host: its entries and their [`RuleBitmaps`], behind [`BitTables`]
/// (whatever bank is asked for), with the LPM lookup done as a longest-prefix search. What
/// tests compare with the linear walk.
pub struct HostBank<'a> {
    /// The bank's tables.
    pub tables: &'a RuleBitmaps,
    /// The bank's entries.
    pub entries: &'a [Rule],
    /// The bank's sets.
    pub sets: &'a HostSets,
}

/// The sets of one bank on the host: its [`SetRefs`] and, by storage number, each set's
/// [`HostSet`].
#[derive(Clone, Debug, Default)]
pub struct HostSets {
    /// What the bank's `SET_REFS` value would hold.
    pub refs: SetRefs,
    /// Membership index per storage number.
    pub storages: Vec<HostSet>,
}

impl HostSets {
    /// The sets of a compiled policy: source set `i` in storage `i`, destination set `j` in
    /// storage `src.len() + j`.
    pub fn new(sets: &CompiledSets) -> HostSets {
        let mut out = HostSets::default();
        for (dim, names) in [(0, &sets.src), (1, &sets.dst)] {
            for (i, name) in names.iter().take(MAX_SETS_PER_DIM as usize).enumerate() {
                let storage = out.storages.len() as u32;
                let nets = sets.contents.get(name).map_or(&[][..], |nets| &nets[..]);
                out.storages.push(HostSet::new(nets));
                if dim == 0 {
                    out.refs.src[i] = storage;
                    out.refs.src_count += 1;
                } else {
                    out.refs.dst[i] = storage;
                    out.refs.dst_count += 1;
                }
            }
        }
        out
    }

    /// The membership masks of `src` and `dst` (see `session_common::sets::membership`).
    pub fn masks(&self, src: &[u8; 16], dst: &[u8; 16]) -> (u32, u32) {
        let member = |storage: u32, addr: &[u8; 16]| {
            self.storages
                .get(storage as usize)
                .is_some_and(|set| set.contains(addr))
        };
        (
            session_common::sets::membership(self.refs.src_count, &self.refs.src, |s| {
                member(s, src)
            }),
            session_common::sets::membership(self.refs.dst_count, &self.refs.dst, |s| {
                member(s, dst)
            }),
        )
    }
}

impl BitTables for HostBank<'_> {
    fn bits(&self, _bank: u32, slot: u32) -> Option<&RuleBits> {
        self.tables.bits.get(slot as usize)
    }

    fn iface_bits(&self, _bank: u32, ifindex: u32) -> Option<&RuleBits> {
        self.tables
            .ifaces
            .iter()
            .find(|(index, _)| *index == ifindex)
            .map(|(_, bits)| bits)
    }

    fn addr_bits(&self, dim: AddrDim, _bank: u32, addr: &[u8; 16]) -> Option<&RuleBits> {
        let table = match dim {
            AddrDim::Source => &self.tables.src,
            AddrDim::Destination => &self.tables.dst,
        };
        let addr = u128::from_be_bytes(*addr);
        table
            .iter()
            .filter(|net| addr & mask_of(net.prefix) == u128::from_be_bytes(net.addr))
            .max_by_key(|net| net.prefix)
            .map(|net| &net.bits)
    }

    fn port_intervals(&self, _bank: u32, dim: PortDim) -> Option<&PortIntervals> {
        Some(&self.tables.port_tables[dim as usize])
    }

    fn entry(&self, _bank: u32, index: u32) -> Option<&Rule> {
        self.entries.get(index as usize)
    }

    fn set_refs(&self, _bank: u32) -> Option<&SetRefs> {
        Some(&self.sets.refs)
    }

    fn set_member(&self, storage: u32, addr: &[u8; 16]) -> bool {
        self.sets
            .storages
            .get(storage as usize)
            .is_some_and(|set| set.contains(addr))
    }
}

#[cfg(test)]
mod tests {
    use session_common::{
        packet::PacketMeta,
        policy::rule_matches,
        rule_bitmaps::first_match_index,
        wire::{CtState, FAMILY_IPV4, FAMILY_IPV6, Hook, MAX_RULES, proto},
    };

    use super::*;
    use session_testkit::mutate::Rng;

    const PROTOS: [u8; 6] = [proto::TCP, proto::UDP, proto::ICMP, proto::ICMPV6, 47, 132];
    const IFACES: [u32; 4] = [1, 2, 7, 300];

    /// A random address of `family` near a few shared networks, so rules overlap.
    fn address(rng: &mut Rng, family: u8) -> u128 {
        let noise = rng.next_u64();
        let low = u128::from(rng.pick(&[0u64, 1, 0xff, 0x1_0001, noise]))
            & u128::from(rng.pick(&[0xffu64, 0xffff, u64::MAX]));
        if family == FAMILY_IPV4 {
            let v4 = (0xc612_0000u128 | (u128::from(rng.below(4)) << 8)) ^ (low & 0xffff);
            (0xffffu128 << 32) | (v4 & 0xffff_ffff)
        } else {
            (0x2001_0002u128 << 96) | (u128::from(rng.below(4)) << 64) | low
        }
    }

    fn network(rng: &mut Rng, family: u8) -> ([u8; 16], [u8; 16]) {
        if family == 0 || rng.chance(20) {
            return ([0; 16], [0; 16]);
        }
        let prefix = if family == FAMILY_IPV4 {
            96 + rng.below(33) as u32
        } else {
            rng.below(129) as u32
        };
        let mask = mask_of(prefix);
        (
            (address(rng, family) & mask).to_be_bytes(),
            mask.to_be_bytes(),
        )
    }

    fn port_range(rng: &mut Rng) -> (u16, u16) {
        match rng.below(4) {
            0 => (0, u16::MAX),
            1 => {
                let port = rng.pick(&[0u16, 22, 53, 80, 443, 8080, 65535]);
                (port, port)
            }
            _ => {
                let a = rng.below(65536) as u16;
                let b = rng.below(65536) as u16;
                (a.min(b), a.max(b))
            }
        }
    }

    fn random_rule(rng: &mut Rng) -> Rule {
        let family = rng.pick(&[0, FAMILY_IPV4, FAMILY_IPV6]);
        let protocol = if rng.chance(30) { 0 } else { rng.pick(&PROTOS) };
        let (mut src_net, mut src_mask) = network(rng, family);
        let (mut dst_net, mut dst_mask) = network(rng, family);
        // A set entry's network is ::/0, as the compiler makes it.
        let mut set = |net: &mut [u8; 16], mask: &mut [u8; 16]| {
            if rng.chance(15) {
                (*net, *mask) = ([0; 16], [0; 16]);
                1 + rng.below(u64::from(RANDOM_SETS)) as u8
            } else {
                0
            }
        };
        let src_set = set(&mut src_net, &mut src_mask);
        let dst_set = set(&mut dst_net, &mut dst_mask);
        let mut match_flags = 0;
        let (mut sport, mut dport) = ((0, u16::MAX), (0, u16::MAX));
        if matches!(protocol, 0 | proto::TCP | proto::UDP) && rng.chance(50) {
            match_flags |= rule_flags::PORTS;
            sport = port_range(rng);
            dport = port_range(rng);
        }
        let mut icmp_type = 0;
        if matches!(protocol, 0 | proto::ICMP | proto::ICMPV6) && rng.chance(40) {
            match_flags |= rule_flags::ICMP_TYPE;
            icmp_type = rng.pick(&[0, 3, 8, 128, 129, 255]);
        }
        Rule {
            src_net,
            src_mask,
            dst_net,
            dst_mask,
            sport_lo: sport.0,
            sport_hi: sport.1,
            dport_lo: dport.0,
            dport_hi: dport.1,
            ifindex: if rng.chance(15) { rng.pick(&IFACES) } else { 0 },
            state_mask: if rng.chance(50) {
                0x1f
            } else {
                rng.below(32) as u8
            },
            hook_mask: rng.pick(&[1, 2, 3, 3]),
            proto: protocol,
            family,
            icmp_type,
            match_flags,
            src_set,
            dst_set,
            ..Rule::default()
        }
    }

    /// Sets per dimension the random policies use.
    const RANDOM_SETS: u32 = 3;

    /// Random sets for the random policies: networks near the generator's addresses, so
    /// packets are members of some and not of others.
    fn random_sets(rng: &mut Rng) -> HostSets {
        let mut out = HostSets::default();
        for i in 0..RANDOM_SETS as usize {
            let mut set = HostSet::default();
            for _ in 0..1 + rng.below(12) {
                let family = rng.pick(&[FAMILY_IPV4, FAMILY_IPV6]);
                let (addr, mask) = network(rng, family);
                let prefix = u128::from_be_bytes(mask).leading_ones() as u8;
                set.insert(&crate::policy::config::Network {
                    addr,
                    prefix,
                    family,
                });
            }
            out.storages.push(set);
            // Storages in another order than the indexes, as after a replace.
            out.refs.src[i] = (RANDOM_SETS as usize - 1 - i) as u32;
            out.refs.dst[i] = i as u32;
        }
        out.refs.src_count = RANDOM_SETS;
        out.refs.dst_count = RANDOM_SETS;
        out
    }

    /// A packet aimed at a random entry (so the interesting bounds are hit), then jiggled.
    fn random_packet(rng: &mut Rng, entries: &[Rule]) -> (PacketMeta, CtState, Hook, u32) {
        let aim = entries.get(rng.below(entries.len().max(1) as u64) as usize);
        let family = match aim.map(|r| r.family) {
            Some(family) if family != 0 => family,
            _ => rng.pick(&[FAMILY_IPV4, FAMILY_IPV6]),
        };
        let inside = |rng: &mut Rng, net: &[u8; 16], mask: &[u8; 16]| {
            let mask = u128::from_be_bytes(*mask);
            let net = u128::from_be_bytes(*net);
            let any = address(rng, family);
            if mask == 0 || rng.chance(20) {
                any
            } else {
                net | (any & !mask)
            }
        };
        let (src, dst) = match aim {
            Some(rule) => (
                inside(rng, &rule.src_net, &rule.src_mask),
                inside(rng, &rule.dst_net, &rule.dst_mask),
            ),
            None => (address(rng, family), address(rng, family)),
        };
        let protocol = match aim.map(|r| r.proto) {
            Some(protocol) if protocol != 0 && rng.chance(80) => protocol,
            _ => rng.pick(&PROTOS),
        };
        let near = |rng: &mut Rng, lo: u16, hi: u16| {
            let anywhere = rng.below(65536) as u16;
            let base = rng.pick(&[lo, hi, anywhere]);
            match rng.below(3) {
                0 => base.wrapping_sub(1),
                1 => base,
                _ => base.wrapping_add(1),
            }
        };
        let (sport, dport) = match aim {
            Some(rule) => (
                near(rng, rule.sport_lo, rule.sport_hi),
                near(rng, rule.dport_lo, rule.dport_hi),
            ),
            None => (rng.below(65536) as u16, rng.below(65536) as u16),
        };
        let icmp_type = match aim {
            Some(rule) if rng.chance(70) => rule.icmp_type,
            _ => rng.below(256) as u8,
        };
        let meta = PacketMeta {
            family,
            proto: protocol,
            src: src.to_be_bytes(),
            dst: dst.to_be_bytes(),
            sport,
            dport,
            icmp_type,
            ..PacketMeta::default()
        };
        let state = rng.pick(&CtState::ALL);
        let hook = rng.pick(&[Hook::Ingress, Hook::Egress]);
        let ifindex = match aim {
            Some(rule) if rule.ifindex != 0 && rng.chance(70) => rule.ifindex,
            _ => rng.pick(&[0, 1, 2, 7, 300, 999]),
        };
        (meta, state, hook, ifindex)
    }

    fn linear(
        entries: &[Rule],
        sets: &HostSets,
        meta: &PacketMeta,
        state: CtState,
        hook: Hook,
        ifindex: u32,
    ) -> Option<u32> {
        let (src_mask, dst_mask) = sets.masks(&meta.src, &meta.dst);
        entries
            .iter()
            .position(|rule| {
                rule_matches(rule, meta, state, hook, ifindex)
                    && session_common::sets::sets_match(rule, src_mask, dst_mask)
            })
            .map(|index| index as u32)
    }

    /// Checks `packets` random packets against `entries`; returns how many matched a rule,
    /// and how many of those matched an entry with a set.
    fn check(rng: &mut Rng, seed: u64, entries: &[Rule], packets: usize) -> (usize, usize) {
        let tables = build(entries).expect("random entries use prefix masks");
        let sets = if entries.iter().any(|e| e.src_set | e.dst_set != 0) || rng.chance(50) {
            random_sets(rng)
        } else {
            HostSets::default()
        };
        let bank = HostBank {
            sets: &sets,
            tables: &tables,
            entries,
        };
        let mut matched = 0;
        let mut by_set = 0;
        for _ in 0..packets {
            let (meta, state, hook, ifindex) = random_packet(rng, entries);
            let expected = linear(entries, &sets, &meta, state, hook, ifindex);
            let got =
                first_match_index(&bank, 1, entries.len() as u32, &meta, state, hook, ifindex);
            assert_eq!(
                got,
                expected,
                "seed {seed:#x}, {} entries: bitmaps say {got:?}, the linear walk {expected:?} for \
                 {meta:?} {state:?} {hook:?} ifindex {ifindex}; entry: {:?}",
                entries.len(),
                expected.or(got).map(|i| entries[i as usize])
            );
            matched += usize::from(expected.is_some());
            by_set +=
                usize::from(expected.is_some_and(|i| {
                    entries[i as usize].src_set | entries[i as usize].dst_set != 0
                }));
        }
        (matched, by_set)
    }

    #[test]
    fn bitmap_classification_equals_the_linear_first_match_on_random_policies() {
        let mut matched = 0;
        let mut by_set = 0;
        let mut total = 0;
        for seed in 1..=300u64 {
            let mut rng = Rng::new(seed);
            let size = match seed % 10 {
                0 => 1 + rng.below(u64::from(MAX_RULES)) as usize,
                1 => 0,
                _ => 1 + rng.below(80) as usize,
            };
            let entries: Vec<Rule> = (0..size).map(|_| random_rule(&mut rng)).collect();
            let (hits, set_hits) = check(&mut rng, seed, &entries, 300);
            matched += hits;
            by_set += set_hits;
            total += 300;
        }
        assert!(
            by_set > total / 100,
            "only {by_set} of {total} packets matched an entry with a set: the generator no longer tests sets"
        );
        // The packets are aimed at rules: most must match one, and some must miss.
        assert!(
            matched > total / 4 && matched < total,
            "{matched} of {total} packets matched a rule: the generator no longer tests both outcomes"
        );
    }

    #[test]
    fn a_full_bank_finds_entries_in_every_word() {
        // 1024 entries that each match only their own destination port: every bit position
        // of every word must be found, and the last entry too.
        let entries: Vec<Rule> = (0..MAX_RULES as u16)
            .map(|i| Rule {
                state_mask: 0x1f,
                hook_mask: 3,
                proto: proto::TCP,
                dport_lo: 1000 + i,
                dport_hi: 1000 + i,
                sport_hi: u16::MAX,
                match_flags: rule_flags::PORTS,
                ..Rule::default()
            })
            .collect();
        let tables = build(&entries).expect("builds");
        let no_sets = HostSets::default();
        let bank = HostBank {
            sets: &no_sets,
            tables: &tables,
            entries: &entries,
        };
        for i in 0..MAX_RULES {
            let meta = PacketMeta {
                family: FAMILY_IPV4,
                proto: proto::TCP,
                sport: 5,
                dport: 1000 + i as u16,
                ..PacketMeta::default()
            };
            let got = first_match_index(&bank, 0, MAX_RULES, &meta, CtState::New, Hook::Ingress, 1);
            assert_eq!(got, Some(i), "dport {}", meta.dport);
            let fewer = first_match_index(&bank, 0, i, &meta, CtState::New, Hook::Ingress, 1);
            assert_eq!(
                fewer, None,
                "with a rule count of {i}, entry {i} and beyond must not be seen"
            );
        }
    }

    #[test]
    fn non_prefix_masks_and_unmasked_networks_are_refused() {
        let mut rule = Rule {
            src_mask: 0x00ff_0000u128.to_be_bytes(),
            ..Rule::default()
        };
        assert!(matches!(
            build(&[Rule::default(), rule]),
            Err(RuleBitmapError::NotPrefixMask {
                entry: 1,
                side: "source",
                ..
            })
        ));
        rule.src_mask = [0; 16];
        rule.dst_mask = mask_of(120).to_be_bytes();
        rule.dst_net = 0x1ffu128.to_be_bytes();
        let error = build(&[rule]).expect_err("host bits set");
        assert_eq!(
            error,
            RuleBitmapError::HostBitsSet {
                entry: 0,
                side: "destination",
                net: 0x1ff,
                prefix: 120
            }
        );
    }
}
