//! IP fragments follow their datagram's session, as under the kernel's conntrack (which
//! reassembles first): the first fragment, which carries the transport header, is judged
//! like any packet; its verdict, ct state and session are recorded under the datagram's
//! identity on the wire (family, protocol, addresses, IP id), where the later fragments,
//! which carry no ports, find them again. After Cilium's fragment map (bpf/lib/ipfrag.h).
//!
//! A later fragment whose first fragment was not seen (reordered ahead of it, or its
//! record evicted) is handed to the kernel unjudged: the kernel cannot deliver it without
//! the first fragment, which is judged when it comes, so the datagram is delivered exactly
//! when the policy allows its first fragment. docs/ARCHITECTURE.md says why and what that
//! costs.

use crate::{
    engine::Decision,
    packet::{PacketMeta, fragment_flags},
    wire::{Action, CtState, FAMILY_IPV4, FlowKey, RULE_ID_DEFAULT, proto},
};
use bytemuck::{Pod, Zeroable};

/// How long a datagram's record lives at most: the kernel's IPv4 reassembly timeout
/// (`ipfrag_time`, 30 s), after which it would have given up on the datagram too.
pub const IPV4_FRAGMENT_TIMEOUT_NS: u64 = 30_000_000_000;
/// The same for IPv6 (`ip6frag_time`, 60 s).
pub const IPV6_FRAGMENT_TIMEOUT_NS: u64 = 60_000_000_000;
/// Datagrams whose fragments can be followed at once: the size of the kernel's LRU map,
/// where a flood of first fragments evicts the oldest records (their later fragments then
/// go to the kernel unjudged, see the module's text). About 1.5 MiB of kernel memory.
pub const MAX_FRAGMENT_DATAGRAMS: u32 = 8192;

/// The identity of a datagram as every one of its fragments shows it (RFC 791 and 8200:
/// addresses, protocol and identification). Addresses first, aligned, so it clears and
/// copies in words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct DatagramKey {
    /// Source address (IPv4-mapped for IPv4).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// IP identification: 16 bits on IPv4, 32 on IPv6.
    pub id: u32,
    /// [`crate::wire::FAMILY_IPV4`] or [`crate::wire::FAMILY_IPV6`].
    pub family: u8,
    /// [`PacketMeta::frag_proto`].
    pub proto: u8,
    /// Explicit padding, always zero so keys hash identically.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<DatagramKey>() == 40);

/// What the later fragments of a datagram need from its first: the session, the ct state
/// and the verdict it got, and what a second first fragment must match.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DatagramEntry {
    /// The session's key, under which the later fragments are counted.
    pub flow: FlowKey,
    /// When the record is stale (the kernel's reassembly timeout after the first fragment).
    pub expires_ns: u64,
    /// Rule-hit slot of the decision.
    pub slot: u32,
    /// Rule id of the decision, or [`RULE_ID_DEFAULT`].
    pub rule_id: u16,
    /// Source port (or ICMP id) of the first fragment.
    pub sport: u16,
    /// Destination port of the first fragment.
    pub dport: u16,
    /// [`CtState`] of the first fragment.
    pub state: u8,
    /// [`Action`] of the first fragment.
    pub action: u8,
    /// Whether the deciding rule logs.
    pub log: u8,
    /// Whether the sender is the lower endpoint of `flow` (see `track::flow_key`), which
    /// gives the direction to count in.
    pub src_is_lo: u8,
    /// Transport header length of the first fragment: a later fragment starting inside it
    /// would rewrite it.
    pub header_len: u8,
    /// Explicit padding.
    pub _pad: [u8; 1],
}
const _: () = assert!(core::mem::size_of::<DatagramEntry>() == 64);

/// The records of datagrams in flight: an LRU map in the kernel, a hash map on the host.
pub trait FragmentTable {
    /// The record of `key`, whether stale or not.
    fn get(&self, key: &DatagramKey) -> Option<&DatagramEntry>;
    /// Stores (or replaces) the record of `key`; a full table evicts its least recently
    /// used record.
    fn insert(&mut self, key: &DatagramKey, entry: &DatagramEntry);
    /// Forgets the record of `key`.
    fn remove(&mut self, key: &DatagramKey);
}

/// Fills `key` with the identity of the datagram the fragment `meta` belongs to.
#[inline(always)]
pub fn datagram_key(meta: &PacketMeta, key: &mut DatagramKey) {
    key.src = meta.src;
    key.dst = meta.dst;
    key.id = meta.frag_id;
    key.family = meta.family;
    key.proto = meta.frag_proto;
    key._pad = [0; 2];
}

/// Transport header bytes that no later fragment may overlap without an entry to say
/// more: the smallest header of the protocol (RFC 1858 for TCP).
#[inline(always)]
fn min_header_len(protocol: u8) -> u8 {
    match protocol {
        proto::TCP => 20,
        proto::UDP | proto::ICMP | proto::ICMPV6 => 8,
        _ => 0,
    }
}

/// The transport header length of a parsed first fragment.
#[inline(always)]
fn header_len(meta: &PacketMeta) -> u8 {
    match meta.proto {
        proto::TCP => meta.tcp_header_len,
        other => min_header_len(other),
    }
}

/// Whether a first fragment must be refused because the datagram id it carries belongs,
/// in a live record, to another flow (other ports or ICMP id): the classic id-collision
/// attack, and what the kernel's reassembly would mix into one datagram.
#[inline(always)]
pub fn conflicts(entry: Option<&DatagramEntry>, meta: &PacketMeta, now: u64) -> bool {
    entry.is_some_and(|entry| {
        entry.expires_ns > now && (entry.sport != meta.sport || entry.dport != meta.dport)
    })
}

/// Records what a first fragment got, for its datagram's later fragments.
#[inline(always)]
pub fn fill_entry(
    entry: &mut DatagramEntry,
    meta: &PacketMeta,
    flow: &FlowKey,
    src_is_lo: bool,
    state: CtState,
    decision: &Decision,
    now: u64,
) {
    entry.flow = *flow;
    entry.expires_ns = now
        + if meta.family == FAMILY_IPV4 {
            IPV4_FRAGMENT_TIMEOUT_NS
        } else {
            IPV6_FRAGMENT_TIMEOUT_NS
        };
    entry.slot = decision.slot;
    entry.rule_id = decision.rule_id;
    entry.sport = meta.sport;
    entry.dport = meta.dport;
    entry.state = state as u8;
    entry.action = decision.action as u8;
    entry.log = decision.log as u8;
    entry.src_is_lo = src_is_lo as u8;
    entry.header_len = header_len(meta);
    entry._pad = [0; 1];
}

/// What becomes of a later fragment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Follow {
    /// It gets its datagram's recorded state and verdict.
    Follow,
    /// It starts inside the transport header (its first fragment's, or the smallest of its
    /// protocol): it could rewrite the ports or TCP flags the policy judged. INVALID.
    Overlap,
    /// No live record: handed to the kernel unjudged.
    Unknown,
}

/// Decides what becomes of the later fragment `meta`, given its datagram's record.
#[inline(always)]
pub fn follow(entry: Option<&DatagramEntry>, meta: &PacketMeta, now: u64) -> Follow {
    let live = entry.filter(|entry| entry.expires_ns > now);
    let header = live.map_or(min_header_len(meta.frag_proto), |entry| {
        entry.header_len.max(min_header_len(meta.frag_proto))
    });
    if (meta.frag_offset as u32) < header as u32 {
        return Follow::Overlap;
    }
    if live.is_some() {
        Follow::Follow
    } else {
        Follow::Unknown
    }
}

/// Whether the later fragment `meta` is its datagram's last (no more follow), after which
/// its record is dropped: a record lives only while its datagram is in flight, so a
/// sender's next use of the id for another flow is no collision. Fragments reordered
/// behind the last go to the kernel unjudged, which reassembles them with the first
/// fragment it was given.
#[inline(always)]
pub fn ends_datagram(meta: &PacketMeta) -> bool {
    meta.fragment & fragment_flags::MORE == 0
}

/// The recorded decision, as the policy would give it.
#[inline(always)]
pub fn decision_of(entry: &DatagramEntry) -> Decision {
    Decision {
        action: if entry.action == Action::Drop as u8 {
            Action::Drop
        } else {
            Action::Accept
        },
        rule_id: entry.rule_id,
        slot: entry.slot,
        generation: 0,
        log: entry.log != 0,
        limited: false,
    }
}

/// The recorded ct state.
#[inline(always)]
pub fn state_of(entry: &DatagramEntry) -> CtState {
    match CtState::ALL.get(entry.state as usize) {
        Some(state) => *state,
        None => CtState::Invalid,
    }
}

/// The decision an unknown fragment gets: passed, under no rule.
#[inline(always)]
pub fn unjudged(slot: u32) -> Decision {
    Decision {
        action: Action::Accept,
        rule_id: RULE_ID_DEFAULT,
        slot,
        generation: 0,
        log: false,
        limited: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::FAMILY_IPV6;

    fn first(sport: u16, dport: u16) -> PacketMeta {
        PacketMeta {
            family: FAMILY_IPV4,
            proto: proto::UDP,
            frag_proto: proto::UDP,
            sport,
            dport,
            fragment: fragment_flags::FIRST | fragment_flags::MORE,
            frag_id: 77,
            ..PacketMeta::default()
        }
    }

    fn later(protocol: u8, offset: u16, more: bool) -> PacketMeta {
        PacketMeta {
            family: FAMILY_IPV4,
            proto: protocol,
            frag_proto: protocol,
            fragment: fragment_flags::LATER | if more { fragment_flags::MORE } else { 0 },
            frag_offset: offset,
            frag_id: 77,
            ..PacketMeta::default()
        }
    }

    fn accept() -> Decision {
        Decision {
            action: Action::Accept,
            rule_id: 3,
            slot: 3,
            generation: 1,
            log: true,
            limited: false,
        }
    }

    fn entry_for(meta: &PacketMeta, now: u64) -> DatagramEntry {
        let mut entry = DatagramEntry::default();
        let flow = FlowKey {
            port_lo: 1,
            ..FlowKey::default()
        };
        fill_entry(
            &mut entry,
            meta,
            &flow,
            true,
            CtState::Established,
            &accept(),
            now,
        );
        entry
    }

    #[test]
    fn every_fragment_of_a_datagram_has_one_key_and_other_datagrams_another() {
        let mut a = DatagramKey::default();
        let mut b = DatagramKey::default();
        datagram_key(&first(1, 2), &mut a);
        datagram_key(&later(proto::UDP, 1480, false), &mut b);
        assert_eq!(a, b);
        let mut other = later(proto::UDP, 1480, false);
        other.frag_id = 78;
        datagram_key(&other, &mut b);
        assert_ne!(a, b, "another id");
        other.frag_id = 77;
        other.frag_proto = proto::ICMP;
        datagram_key(&other, &mut b);
        assert_ne!(a, b, "another protocol");
    }

    #[test]
    fn a_record_gives_back_the_state_and_verdict_of_the_first_fragment() {
        let entry = entry_for(&first(53, 40000), 1_000);
        assert_eq!(state_of(&entry), CtState::Established);
        assert_eq!(decision_of(&entry).action, Action::Accept);
        assert_eq!(decision_of(&entry).rule_id, 3);
        assert!(decision_of(&entry).log);
        assert_eq!(entry.expires_ns, 1_000 + IPV4_FRAGMENT_TIMEOUT_NS);
        let mut v6 = first(53, 40000);
        v6.family = FAMILY_IPV6;
        assert_eq!(entry_for(&v6, 0).expires_ns, IPV6_FRAGMENT_TIMEOUT_NS);
    }

    #[test]
    fn later_fragments_follow_a_live_record_and_are_unknown_without_one() {
        let entry = entry_for(&first(53, 40000), 0);
        let frag = later(proto::UDP, 1480, true);
        assert_eq!(follow(Some(&entry), &frag, 1), Follow::Follow);
        assert_eq!(follow(None, &frag, 1), Follow::Unknown);
        assert_eq!(
            follow(Some(&entry), &frag, IPV4_FRAGMENT_TIMEOUT_NS),
            Follow::Unknown,
            "a stale record is none"
        );
        assert!(!ends_datagram(&frag));
        assert!(ends_datagram(&later(proto::UDP, 2960, false)));
    }

    #[test]
    fn a_later_fragment_inside_the_transport_header_is_an_overlap() {
        // RFC 1858: offset 8 of TCP could rewrite the flags, whatever the record says.
        assert_eq!(
            follow(None, &later(proto::TCP, 8, true), 0),
            Follow::Overlap
        );
        assert_eq!(
            follow(None, &later(proto::TCP, 16, true), 0),
            Follow::Overlap
        );
        assert_eq!(
            follow(None, &later(proto::TCP, 24, true), 0),
            Follow::Unknown
        );
        // The first fragment had a 40-byte TCP header: offset 24 and 32 rewrite options.
        let mut syn = first(1, 2);
        syn.proto = proto::TCP;
        syn.frag_proto = proto::TCP;
        syn.tcp_header_len = 40;
        let entry = entry_for(&syn, 0);
        assert_eq!(
            follow(Some(&entry), &later(proto::TCP, 32, true), 0),
            Follow::Overlap
        );
        assert_eq!(
            follow(Some(&entry), &later(proto::TCP, 40, true), 0),
            Follow::Follow
        );
        // UDP's 8 bytes end where the smallest offset begins.
        assert_eq!(
            follow(None, &later(proto::UDP, 8, true), 0),
            Follow::Unknown
        );
    }

    #[test]
    fn a_first_fragment_conflicts_only_with_a_live_record_of_other_ports() {
        let entry = entry_for(&first(53, 40000), 0);
        assert!(!conflicts(None, &first(53, 40000), 0));
        assert!(
            !conflicts(Some(&entry), &first(53, 40000), 0),
            "the same flow again"
        );
        assert!(conflicts(Some(&entry), &first(53, 40001), 0));
        assert!(conflicts(Some(&entry), &first(54, 40000), 0));
        assert!(!conflicts(
            Some(&entry),
            &first(54, 40000),
            IPV4_FRAGMENT_TIMEOUT_NS
        ));
    }
}

#[cfg(feature = "user")]
mod user {
    use super::{DatagramEntry, DatagramKey};

    // SAFETY: `DatagramKey` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for DatagramKey {}
    // SAFETY: `DatagramEntry` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for DatagramEntry {}
}
