//! The session record: one session as it leaves or enters the kernel table, in a fixed,
//! versioned, little-endian layout (docs/RECORDS.md).
//!
//! Every path that moves sessions in or out of the table speaks it: takeover at first
//! start (from conntrack or the host's sockets), `session save` / `session restore`, and
//! state sync to a peer. A record holds what a session *is* (key, protocol state, window
//! data, counters, flags) and times *relative* to the moment it was written (time left,
//! age), so that it can be rebased onto another boot's clock. What only makes sense inside
//! one running table is left out: the cached verdicts (decided afresh by the policy in
//! force), the retransmission-detection scratch (`last_*`), whether the session sits in
//! the protected tier (it follows from `ASSURED`), and numeric rule ids and interface
//! indexes (a record names them by an index into its container's string tables, because
//! ids change with the policy and indexes with the boot).
//!
//! Decoding validates everything a kernel table relies on: a record that would not be a
//! session the kernel path could have made is refused, never stored.

use crate::wire::{
    FAMILY_IPV4, FAMILY_IPV6, FlowKey, FlowState, Session, TcpPeer, TcpState, proto, session_flags,
    tcp_peer_flags,
};

/// Version of the record layout below. A change of layout or meaning bumps it; readers
/// refuse other versions rather than guess.
pub const RECORD_VERSION: u16 = 1;

/// Bytes of one encoded record.
pub const RECORD_LEN: usize = 136;

/// Index meaning "none" in [`SessionRecord::rule`] (the session was admitted by a default
/// action) and [`SessionRecord::origin_iface`] (the interface is unknown).
pub const NO_NAME: u16 = u16::MAX;

/// Session flags a record carries; the others (`PROTECTED`) describe where the session
/// sits in one table and are set again when it is stored.
pub const RECORD_SESSION_FLAGS: u8 = session_flags::ORIG_IS_LO
    | session_flags::SEEN_REPLY
    | session_flags::ASSURED
    | session_flags::PICKED_UP
    | session_flags::ORIGIN_EGRESS
    | session_flags::ADOPT_WINDOW;

/// Peer flags a record carries (all that exist).
const RECORD_PEER_FLAGS: u8 = tcp_peer_flags::WINDOW_SCALE
    | tcp_peer_flags::SACK_PERM
    | tcp_peer_flags::DATA_UNACKNOWLEDGED
    | tcp_peer_flags::CLOSE_INIT
    | tcp_peer_flags::MAXACK_SET
    | tcp_peer_flags::BE_LIBERAL;

/// One session, independent of any table, clock or policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionRecord {
    /// The canonical flow key.
    pub key: FlowKey,
    /// Protocol state ([`TcpState`] for TCP, [`FlowState`] otherwise).
    pub state: u8,
    /// [`session_flags`] bits, limited to [`RECORD_SESSION_FLAGS`].
    pub flags: u8,
    /// ICMP type of the first packet (ICMP sessions), for the policy's re-check.
    pub origin_icmp_type: u8,
    /// Consecutive retransmissions seen.
    pub retrans: u8,
    /// Index of the admitting rule's name in the container's name table, or [`NO_NAME`].
    pub rule: u16,
    /// Index of the first packet's interface name in the container's interface table, or
    /// [`NO_NAME`].
    pub origin_iface: u16,
    /// Nanoseconds the session had left when the record was written.
    pub remaining_ns: u64,
    /// Nanoseconds the session had existed when the record was written.
    pub age_ns: u64,
    /// Packets, `[original, reply]`.
    pub packets: [u64; 2],
    /// Bytes, `[original, reply]`.
    pub bytes: [u64; 2],
    /// TCP window data, `[original, reply]`.
    pub tcp: [TcpPeer; 2],
}

/// Why bytes are not a valid record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// The address family is neither IPv4 nor IPv6.
    Family(u8),
    /// An IPv4 session whose addresses are not IPv4-mapped.
    Ipv4Address,
    /// The key's endpoints are not in canonical order (lower first).
    KeyOrder,
    /// A protocol without ports has ports, or an ICMP query's two ids differ.
    Ports,
    /// The state is not one the protocol has.
    State(u8),
    /// Unknown session or peer flag bits.
    Flags,
    /// Reserved bytes are not zero.
    Reserved,
}

impl core::fmt::Display for RecordError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RecordError::Family(family) => write!(f, "unknown address family {family}"),
            RecordError::Ipv4Address => write!(f, "IPv4 session with a non-IPv4 address"),
            RecordError::KeyOrder => write!(f, "flow key endpoints not in canonical order"),
            RecordError::Ports => write!(f, "ports on a protocol that has none"),
            RecordError::State(state) => write!(f, "state {state} invalid for its protocol"),
            RecordError::Flags => write!(f, "unknown flag bits"),
            RecordError::Reserved => write!(f, "reserved bytes are not zero"),
        }
    }
}

impl core::error::Error for RecordError {}

/// Little-endian writer over a record buffer.
struct Writer<'a> {
    out: &'a mut [u8; RECORD_LEN],
    at: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, bytes: &[u8]) {
        self.out[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }
    fn u8(&mut self, value: u8) {
        self.bytes(&[value]);
    }
    fn u16(&mut self, value: u16) {
        self.bytes(&value.to_le_bytes());
    }
    fn u32(&mut self, value: u32) {
        self.bytes(&value.to_le_bytes());
    }
    fn u64(&mut self, value: u64) {
        self.bytes(&value.to_le_bytes());
    }
}

/// Little-endian reader over a record buffer.
struct Reader<'a> {
    bytes: &'a [u8; RECORD_LEN],
    at: usize,
}

impl Reader<'_> {
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.bytes[self.at..self.at + N]);
        self.at += N;
        out
    }
    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// Whether a 16-byte address is IPv4-mapped (`::ffff:a.b.c.d`).
fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10].iter().all(|&b| b == 0) && addr[10] == 0xff && addr[11] == 0xff
}

impl SessionRecord {
    /// The record of `session` stored under `key`, written at monotonic time `now`;
    /// `None` when it has expired by then. `rule` and `origin_iface` are the indexes the
    /// caller's string tables give the session's rule and interface.
    pub fn from_session(
        key: &FlowKey,
        session: &Session,
        now: u64,
        rule: u16,
        origin_iface: u16,
    ) -> Option<SessionRecord> {
        if session.expires_ns <= now {
            return None;
        }
        Some(SessionRecord {
            key: *key,
            state: session.state,
            flags: session.flags & RECORD_SESSION_FLAGS,
            origin_icmp_type: session.origin_icmp_type,
            retrans: session.retrans,
            rule,
            origin_iface,
            remaining_ns: session.expires_ns - now,
            age_ns: now.saturating_sub(session.created_ns),
            packets: session.packets,
            bytes: session.bytes,
            tcp: session.tcp,
        })
    }

    /// The session this record describes, rebased onto monotonic time `now` after the
    /// record waited `waited_ns` (from its writing to now, on the wall clock: it may have
    /// crossed a reboot); `None` when it expired meanwhile. The caller supplies what the
    /// table it goes into decides: the interface index of [`Self::origin_iface`], the id
    /// of the rule that admits it now, and that rule's policy generation. No verdict is
    /// cached: the first packet of each direction asks the policy in force.
    pub fn to_session(
        &self,
        now: u64,
        waited_ns: u64,
        origin_ifindex: u32,
        rule_id: u16,
    ) -> Option<Session> {
        let remaining = self.remaining_ns.checked_sub(waited_ns)?;
        if remaining == 0 {
            return None;
        }
        let mut session = Session {
            created_ns: now.saturating_sub(self.age_ns.saturating_add(waited_ns)),
            expires_ns: now.saturating_add(remaining),
            packets: self.packets,
            bytes: self.bytes,
            tcp: self.tcp,
            rule_id,
            state: self.state,
            flags: self.flags & RECORD_SESSION_FLAGS,
            retrans: self.retrans,
            origin_icmp_type: self.origin_icmp_type,
            origin_ifindex: origin_ifindex.to_ne_bytes(),
            ..Session::default()
        };
        if session.flags & session_flags::ASSURED != 0 {
            session.flags |= session_flags::PROTECTED;
        }
        Some(session)
    }

    /// Forgets the TCP sequence edges while keeping what the handshake negotiated
    /// (window scales, SACK): the session re-learns the edges from its first segment each
    /// way (`ADOPT_WINDOW`). A restore does this, because a saved edge is only as good as
    /// the moment of the save: the connection may have moved on by more than a window
    /// while the file waited (the firewall was down, or a peer carried it), and stale
    /// edges would make every segment of a live connection INVALID.
    pub fn forget_edges(&mut self) {
        if self.key.proto != proto::TCP {
            return;
        }
        for peer in &mut self.tcp {
            peer.end = 0;
            peer.maxend = 0;
            peer.maxwin = 0;
            peer.maxack = 0;
            peer.flags &= !(tcp_peer_flags::DATA_UNACKNOWLEDGED | tcp_peer_flags::MAXACK_SET);
        }
        self.flags |= session_flags::ADOPT_WINDOW;
    }

    /// Writes the record into `out` (docs/RECORDS.md gives the layout).
    pub fn encode(&self, out: &mut [u8; RECORD_LEN]) {
        let mut w = Writer { out, at: 0 };
        w.u8(self.key.family);
        w.u8(self.key.proto);
        w.u8(self.state);
        w.u8(self.flags);
        w.bytes(&self.key.addr_lo);
        w.bytes(&self.key.addr_hi);
        w.u16(self.key.port_lo);
        w.u16(self.key.port_hi);
        w.u8(self.origin_icmp_type);
        w.u8(self.retrans);
        w.u16(self.rule);
        w.u16(self.origin_iface);
        w.u16(0);
        w.u64(self.remaining_ns);
        w.u64(self.age_ns);
        for value in self.packets.iter().chain(self.bytes.iter()) {
            w.u64(*value);
        }
        for peer in &self.tcp {
            w.u32(peer.end);
            w.u32(peer.maxend);
            w.u32(peer.maxwin);
            w.u32(peer.maxack);
            w.u8(peer.scale);
            w.u8(peer.flags);
            w.u16(0);
        }
        debug_assert_eq!(w.at, RECORD_LEN);
    }

    /// Reads and validates a record.
    pub fn decode(bytes: &[u8; RECORD_LEN]) -> Result<SessionRecord, RecordError> {
        let mut r = Reader { bytes, at: 0 };
        let mut record = SessionRecord::default();
        record.key.family = r.u8();
        record.key.proto = r.u8();
        record.state = r.u8();
        record.flags = r.u8();
        record.key.addr_lo = r.array();
        record.key.addr_hi = r.array();
        record.key.port_lo = r.u16();
        record.key.port_hi = r.u16();
        record.origin_icmp_type = r.u8();
        record.retrans = r.u8();
        record.rule = r.u16();
        record.origin_iface = r.u16();
        if r.u16() != 0 {
            return Err(RecordError::Reserved);
        }
        record.remaining_ns = r.u64();
        record.age_ns = r.u64();
        record.packets = [r.u64(), r.u64()];
        record.bytes = [r.u64(), r.u64()];
        for peer in &mut record.tcp {
            peer.end = r.u32();
            peer.maxend = r.u32();
            peer.maxwin = r.u32();
            peer.maxack = r.u32();
            peer.scale = r.u8();
            peer.flags = r.u8();
            if r.u16() != 0 {
                return Err(RecordError::Reserved);
            }
        }
        record.validate()?;
        Ok(record)
    }

    /// Checks that the record is a session the kernel path could have made.
    pub fn validate(&self) -> Result<(), RecordError> {
        let key = &self.key;
        match key.family {
            FAMILY_IPV4 => {
                if !is_v4_mapped(&key.addr_lo) || !is_v4_mapped(&key.addr_hi) {
                    return Err(RecordError::Ipv4Address);
                }
            }
            FAMILY_IPV6 => {}
            other => return Err(RecordError::Family(other)),
        }
        if (key.addr_lo, key.port_lo) > (key.addr_hi, key.port_hi) {
            return Err(RecordError::KeyOrder);
        }
        let state_ok = match key.proto {
            proto::TCP => {
                self.state != TcpState::None as u8
                    && TcpState::from_u8(self.state) != TcpState::None
            }
            _ => self.state <= FlowState::Replied as u8,
        };
        if !state_ok {
            return Err(RecordError::State(self.state));
        }
        match key.proto {
            proto::TCP | proto::UDP => {}
            // Queries are keyed by their id on both sides (`track::flow_key`).
            proto::ICMP | proto::ICMPV6 => {
                if key.port_lo != key.port_hi {
                    return Err(RecordError::Ports);
                }
            }
            _ => {
                if key.port_lo != 0 || key.port_hi != 0 {
                    return Err(RecordError::Ports);
                }
            }
        }
        if self.flags & !RECORD_SESSION_FLAGS != 0
            || self
                .tcp
                .iter()
                .any(|peer| peer.flags & !RECORD_PEER_FLAGS != 0)
        {
            return Err(RecordError::Flags);
        }
        if self.tcp.iter().any(|peer| peer._pad != [0; 2]) || key._pad != [0; 2] {
            return Err(RecordError::Reserved);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(last: u8) -> [u8; 16] {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&[198, 18, 0, last]);
        addr
    }

    fn sample() -> (FlowKey, Session) {
        let key = FlowKey {
            addr_lo: v4(1),
            addr_hi: v4(2),
            port_lo: 22,
            port_hi: 40000,
            proto: proto::TCP,
            family: FAMILY_IPV4,
            _pad: [0; 2],
        };
        let session = Session {
            created_ns: 1_000,
            expires_ns: 50_000,
            packets: [5, 4],
            bytes: [400, 300],
            tcp: [
                TcpPeer {
                    end: 11,
                    maxend: 22,
                    maxwin: 33,
                    maxack: 44,
                    scale: 7,
                    flags: tcp_peer_flags::WINDOW_SCALE | tcp_peer_flags::MAXACK_SET,
                    _pad: [0; 2],
                },
                TcpPeer {
                    end: 55,
                    maxend: 66,
                    maxwin: 77,
                    maxack: 88,
                    scale: 2,
                    flags: tcp_peer_flags::SACK_PERM,
                    _pad: [0; 2],
                },
            ],
            verdict_generation: 9,
            last_seq: 123,
            rule_id: 5,
            state: TcpState::Established as u8,
            flags: session_flags::ASSURED
                | session_flags::SEEN_REPLY
                | session_flags::PROTECTED
                | session_flags::ORIGIN_EGRESS,
            retrans: 1,
            origin_ifindex: 3u32.to_ne_bytes(),
            verdict_flags: [1, 1],
            ..Session::default()
        };
        (key, session)
    }

    #[test]
    fn a_record_survives_encoding_and_rebases_onto_another_clock() {
        let (key, session) = sample();
        let record = SessionRecord::from_session(&key, &session, 10_000, 2, 0).expect("live");
        assert_eq!(record.remaining_ns, 40_000);
        assert_eq!(record.age_ns, 9_000);
        let mut bytes = [0u8; RECORD_LEN];
        record.encode(&mut bytes);
        let back = SessionRecord::decode(&bytes).expect("valid");
        assert_eq!(back, record);

        // Another boot: the clock reads 5, the file waited 1,000 ns.
        let restored = back.to_session(5, 1_000, 8, 3).expect("still live");
        assert_eq!(restored.expires_ns, 5 + 39_000);
        assert_eq!(restored.created_ns, 0, "age saturates at the clock's start");
        assert_eq!(restored.tcp, session.tcp);
        assert_eq!(restored.packets, session.packets);
        assert_eq!(restored.bytes, session.bytes);
        assert_eq!(restored.state, session.state);
        assert_eq!(
            restored.flags, session.flags,
            "assured goes back to the protected tier"
        );
        assert_eq!(restored.rule_id, 3);
        assert_eq!(u32::from_ne_bytes(restored.origin_ifindex), 8);
        assert_eq!(restored.verdict_flags, [0, 0], "no verdict is carried over");
        assert_eq!(restored.verdict_generation, 0);
        assert_eq!(restored.last_seq, 0);
    }

    #[test]
    fn forgetting_edges_keeps_the_negotiated_options_and_marks_the_session_to_adopt() {
        let (key, session) = sample();
        let mut record = SessionRecord::from_session(&key, &session, 10_000, 0, 0).expect("live");
        record.forget_edges();
        for (peer, was) in record.tcp.iter().zip(session.tcp) {
            assert_eq!(
                (peer.end, peer.maxend, peer.maxwin, peer.maxack),
                (0, 0, 0, 0)
            );
            assert_eq!(peer.scale, was.scale);
            assert_eq!(peer.flags, was.flags & !tcp_peer_flags::MAXACK_SET);
        }
        assert_ne!(record.flags & session_flags::ADOPT_WINDOW, 0);
        assert_eq!(record.validate(), Ok(()));
    }

    #[test]
    fn expired_sessions_have_no_record_and_records_expire_while_they_wait() {
        let (key, session) = sample();
        assert!(SessionRecord::from_session(&key, &session, 50_000, 0, 0).is_none());
        let record = SessionRecord::from_session(&key, &session, 49_000, 0, 0).expect("live");
        assert!(record.to_session(0, 1_000, 0, 0).is_none());
        assert!(record.to_session(0, 999, 0, 0).is_some());
    }

    #[test]
    fn the_layout_is_little_endian_at_documented_offsets() {
        let (key, session) = sample();
        let record =
            SessionRecord::from_session(&key, &session, 10_000, 0x0102, 0xffff).expect("live");
        let mut bytes = [0u8; RECORD_LEN];
        record.encode(&mut bytes);
        assert_eq!(&bytes[..4], &[4, 6, 3, record.flags]);
        assert_eq!(&bytes[36..40], &[22, 0, 0x40, 0x9c]);
        assert_eq!(&bytes[42..46], &[0x02, 0x01, 0xff, 0xff]);
        assert_eq!(&bytes[48..56], &40_000u64.to_le_bytes());
        assert_eq!(&bytes[96..100], &11u32.to_le_bytes());
        assert_eq!(bytes[112], 7);
        assert_eq!(&bytes[116..120], &55u32.to_le_bytes());
    }

    #[test]
    fn decoding_refuses_what_the_kernel_path_could_not_have_made() {
        let (key, session) = sample();
        let record = SessionRecord::from_session(&key, &session, 10_000, 0, 0).expect("live");
        let mut good = [0u8; RECORD_LEN];
        record.encode(&mut good);
        let broken = |at: usize, value: u8| {
            let mut bytes = good;
            bytes[at] = value;
            SessionRecord::decode(&bytes)
        };
        assert_eq!(broken(0, 5), Err(RecordError::Family(5)));
        assert_eq!(broken(2, 0), Err(RecordError::State(0)));
        assert_eq!(broken(2, 10), Err(RecordError::State(10)));
        assert_eq!(broken(3, 0x80), Err(RecordError::Flags));
        assert_eq!(broken(4 + 10, 0), Err(RecordError::Ipv4Address));
        assert_eq!(broken(4 + 15, 9), Err(RecordError::KeyOrder));
        assert_eq!(broken(46, 1), Err(RecordError::Reserved));
        assert_eq!(broken(113, 0x40), Err(RecordError::Flags));
        assert_eq!(broken(114, 1), Err(RecordError::Reserved));
        assert_eq!(
            broken(1, 17),
            Err(RecordError::State(3)),
            "UDP has two states"
        );
        let mut gre = record;
        gre.key.proto = 47;
        gre.state = FlowState::Replied as u8;
        gre.tcp = [TcpPeer::default(); 2];
        assert_eq!(gre.validate(), Err(RecordError::Ports));
        gre.key.port_lo = 0;
        gre.key.port_hi = 0;
        assert_eq!(gre.validate(), Ok(()));
    }
}
