//! Reading the kernel's conntrack table through ctnetlink (`NETLINK_NETFILTER`,
//! `IPCTNL_MSG_CT_GET` dump), for the takeover at first start.
//!
//! ctnetlink gives each entry's tuples, status (seen-reply, assured, NAT), remaining
//! timeout, counters (with `nf_conntrack_acct`) and, for TCP, the state and per direction
//! the window scale and flags. It does not export the sequence-tracking edges
//! (`td_end`, `td_maxend`, `td_maxwin`), so taken-over TCP sessions carry
//! `ADOPT_WINDOW` and learn them from their first segments.

use anyhow::Result;
use session_common::{
    packet::PacketMeta,
    record::{NO_NAME, SessionRecord},
    track::flow_key,
    wire::{
        FAMILY_IPV4, FAMILY_IPV6, FlowState, TcpPeer, TcpState, proto, session_flags,
        tcp_peer_flags,
    },
};

use crate::continuity::netlink::{self, NLM_F_DUMP, NLM_F_REQUEST, Socket, attr, attrs};

/// `(NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET` (`nfnetlink.h`,
/// `nfnetlink_conntrack.h`).
const CT_GET: u16 = (1 << 8) | 1;

// Attribute types of `nfnetlink_conntrack.h`.
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_TIMEOUT: u16 = 7;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
const CTA_PROTOINFO_TCP_WSCALE_ORIGINAL: u16 = 2;
const CTA_PROTOINFO_TCP_WSCALE_REPLY: u16 = 3;
const CTA_PROTOINFO_TCP_FLAGS_ORIGINAL: u16 = 4;
const CTA_PROTOINFO_TCP_FLAGS_REPLY: u16 = 5;
const CTA_COUNTERS_PACKETS: u16 = 1;
const CTA_COUNTERS_BYTES: u16 = 2;

// `enum ip_conntrack_status` bits.
const IPS_SEEN_REPLY: u32 = 1 << 1;
const IPS_ASSURED: u32 = 1 << 2;
const IPS_NAT_MASK: u32 = (1 << 4) | (1 << 5);

// `IP_CT_TCP_FLAG_*` of `nf_conntrack_tcp.h`.
const CT_TCP_WINDOW_SCALE: u8 = 0x01;
const CT_TCP_SACK_PERM: u8 = 0x02;
const CT_TCP_CLOSE_INIT: u8 = 0x04;
const CT_TCP_BE_LIBERAL: u8 = 0x08;

/// One direction's tuple.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuple {
    /// Source address (IPv4-mapped for IPv4).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Source port, or the ICMP id.
    pub sport: u16,
    /// Destination port (0 for ICMP).
    pub dport: u16,
    /// ICMP type (ICMP only).
    pub icmp_type: u8,
}

/// One conntrack entry, as far as a session needs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// IANA protocol number.
    pub proto: u8,
    /// The originator's direction.
    pub orig: Tuple,
    /// The reply direction.
    pub reply: Tuple,
    /// `CTA_STATUS` bits.
    pub status: u32,
    /// Seconds left.
    pub timeout_secs: u32,
    /// TCP state (nf_conntrack numbering, as ours).
    pub tcp_state: u8,
    /// TCP window scale `[original, reply]`.
    pub wscale: [u8; 2],
    /// TCP `IP_CT_TCP_FLAG_*` `[original, reply]`.
    pub tcp_flags: [u8; 2],
    /// Packets `[original, reply]` (0 without `nf_conntrack_acct`).
    pub packets: [u64; 2],
    /// Bytes `[original, reply]`.
    pub bytes: [u64; 2],
}

fn be16(value: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(value.get(..2)?.try_into().ok()?))
}

fn be32(value: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(value.get(..4)?.try_into().ok()?))
}

fn be64(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.get(..8)?.try_into().ok()?))
}

fn mapped_v4(value: &[u8]) -> Option<[u8; 16]> {
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12..].copy_from_slice(value.get(..4)?);
    Some(addr)
}

fn parse_tuple(buf: &[u8]) -> Option<(u8, u8, Tuple)> {
    let ip = attr(buf, CTA_TUPLE_IP)?;
    let mut tuple = Tuple::default();
    let family = if let Some(src) = attr(ip, CTA_IP_V4_SRC) {
        tuple.src = mapped_v4(src)?;
        tuple.dst = mapped_v4(attr(ip, CTA_IP_V4_DST)?)?;
        FAMILY_IPV4
    } else {
        tuple.src = attr(ip, CTA_IP_V6_SRC)?.try_into().ok()?;
        tuple.dst = attr(ip, CTA_IP_V6_DST)?.try_into().ok()?;
        FAMILY_IPV6
    };
    let l4 = attr(buf, CTA_TUPLE_PROTO)?;
    let protocol = *attr(l4, CTA_PROTO_NUM)?.first()?;
    match protocol {
        proto::TCP | proto::UDP => {
            tuple.sport = be16(attr(l4, CTA_PROTO_SRC_PORT)?)?;
            tuple.dport = be16(attr(l4, CTA_PROTO_DST_PORT)?)?;
        }
        proto::ICMP => {
            tuple.sport = be16(attr(l4, CTA_PROTO_ICMP_ID)?)?;
            tuple.icmp_type = *attr(l4, CTA_PROTO_ICMP_TYPE)?.first()?;
        }
        proto::ICMPV6 => {
            tuple.sport = be16(attr(l4, CTA_PROTO_ICMPV6_ID)?)?;
            tuple.icmp_type = *attr(l4, CTA_PROTO_ICMPV6_TYPE)?.first()?;
        }
        _ => {}
    }
    Some((family, protocol, tuple))
}

fn parse_counters(buf: &[u8]) -> (u64, u64) {
    (
        attr(buf, CTA_COUNTERS_PACKETS).and_then(be64).unwrap_or(0),
        attr(buf, CTA_COUNTERS_BYTES).and_then(be64).unwrap_or(0),
    )
}

/// Parses one ctnetlink message's payload (`nfgenmsg`, then attributes); `None` when it
/// lacks what an entry must have.
pub fn parse_entry(payload: &[u8]) -> Option<CtEntry> {
    let buf = payload.get(4..)?;
    let (family, protocol, orig) = parse_tuple(attr(buf, CTA_TUPLE_ORIG)?)?;
    let (_, _, reply) = parse_tuple(attr(buf, CTA_TUPLE_REPLY)?)?;
    let mut entry = CtEntry {
        family,
        proto: protocol,
        orig,
        reply,
        status: attr(buf, CTA_STATUS).and_then(be32)?,
        timeout_secs: attr(buf, CTA_TIMEOUT).and_then(be32).unwrap_or(0),
        ..CtEntry::default()
    };
    if let Some(tcp) = attr(buf, CTA_PROTOINFO).and_then(|p| attr(p, CTA_PROTOINFO_TCP)) {
        for (kind, value) in attrs(tcp) {
            let byte = value.first().copied().unwrap_or(0);
            match kind {
                CTA_PROTOINFO_TCP_STATE => entry.tcp_state = byte,
                CTA_PROTOINFO_TCP_WSCALE_ORIGINAL => entry.wscale[0] = byte,
                CTA_PROTOINFO_TCP_WSCALE_REPLY => entry.wscale[1] = byte,
                CTA_PROTOINFO_TCP_FLAGS_ORIGINAL => entry.tcp_flags[0] = byte,
                CTA_PROTOINFO_TCP_FLAGS_REPLY => entry.tcp_flags[1] = byte,
                _ => {}
            }
        }
    }
    for (i, kind) in [CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY]
        .into_iter()
        .enumerate()
    {
        if let Some(counters) = attr(buf, kind) {
            (entry.packets[i], entry.bytes[i]) = parse_counters(counters);
        }
    }
    Some(entry)
}

/// Why an entry is not taken over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unusable {
    /// Its addresses or ports are translated (NAT), which session does not do.
    Nat,
    /// A protocol state the tracker cannot continue from (TCP NONE, an ICMP flow that is
    /// not a query).
    State,
}

/// The session record of `entry` (with no interface: the caller decides it from the
/// routes) and whether the host itself originated it is left to the caller too.
pub fn to_record(entry: &CtEntry) -> Result<SessionRecord, Unusable> {
    let (orig, reply) = (&entry.orig, &entry.reply);
    let is_icmp = entry.proto == proto::ICMP || entry.proto == proto::ICMPV6;
    let ports_mirror = if is_icmp {
        reply.sport == orig.sport
    } else {
        reply.sport == orig.dport && reply.dport == orig.sport
    };
    if entry.status & IPS_NAT_MASK != 0
        || reply.src != orig.dst
        || reply.dst != orig.src
        || !ports_mirror
    {
        return Err(Unusable::Nat);
    }
    let meta = PacketMeta {
        family: entry.family,
        proto: entry.proto,
        src: orig.src,
        dst: orig.dst,
        sport: orig.sport,
        dport: orig.dport,
        ..PacketMeta::default()
    };
    let (key, src_is_lo) = flow_key(&meta);
    let mut flags = if src_is_lo {
        session_flags::ORIG_IS_LO
    } else {
        0
    };
    if entry.status & IPS_SEEN_REPLY != 0 {
        flags |= session_flags::SEEN_REPLY;
    }
    if entry.status & IPS_ASSURED != 0 {
        flags |= session_flags::ASSURED;
    }
    let mut tcp = [TcpPeer::default(); 2];
    let state = match entry.proto {
        proto::TCP => {
            if entry.tcp_state == TcpState::None as u8
                || TcpState::from_u8(entry.tcp_state) == TcpState::None
            {
                return Err(Unusable::State);
            }
            flags |= session_flags::ADOPT_WINDOW;
            for (d, peer) in tcp.iter_mut().enumerate() {
                let ct = entry.tcp_flags[d];
                peer.scale = entry.wscale[d].min(14);
                for (theirs, ours) in [
                    (CT_TCP_WINDOW_SCALE, tcp_peer_flags::WINDOW_SCALE),
                    (CT_TCP_SACK_PERM, tcp_peer_flags::SACK_PERM),
                    (CT_TCP_CLOSE_INIT, tcp_peer_flags::CLOSE_INIT),
                    (CT_TCP_BE_LIBERAL, tcp_peer_flags::BE_LIBERAL),
                ] {
                    if ct & theirs != 0 {
                        peer.flags |= ours;
                    }
                }
            }
            entry.tcp_state
        }
        proto::ICMP | proto::ICMPV6 => {
            let query = match entry.proto {
                proto::ICMP => matches!(orig.icmp_type, 8 | 13 | 15 | 17),
                _ => matches!(orig.icmp_type, 128 | 139),
            };
            if !query {
                return Err(Unusable::State);
            }
            flow_state(entry.status)
        }
        _ => flow_state(entry.status),
    };
    Ok(SessionRecord {
        key,
        state,
        flags,
        origin_icmp_type: orig.icmp_type,
        rule: NO_NAME,
        origin_iface: NO_NAME,
        remaining_ns: u64::from(entry.timeout_secs) * 1_000_000_000,
        packets: entry.packets,
        bytes: entry.bytes,
        tcp,
        ..SessionRecord::default()
    })
}

fn flow_state(status: u32) -> u8 {
    if status & IPS_SEEN_REPLY != 0 {
        FlowState::Replied as u8
    } else {
        FlowState::Unreplied as u8
    }
}

/// Present in every network namespace while nf_conntrack is loaded.
const CONNTRACK_COUNT: &str = "/proc/sys/net/netfilter/nf_conntrack_count";

/// Every entry of this network namespace's conntrack table, both families; `Ok(None)`
/// when conntrack is not loaded, or the kernel has no ctnetlink. Conntrack not loaded is
/// checked first: a ctnetlink request would make the kernel load the conntrack modules
/// on a host that does not use them.
pub fn dump() -> Result<Option<Vec<CtEntry>>> {
    if !std::path::Path::new(CONNTRACK_COUNT).exists() {
        return Ok(None);
    }
    let socket = match Socket::open(Some(rustix::net::netlink::NETFILTER)) {
        Ok(socket) => socket,
        Err(_) => return Ok(None),
    };
    // nfgenmsg: family AF_UNSPEC (every family), version 0, resource id 0.
    let request = netlink::request(CT_GET, NLM_F_REQUEST | NLM_F_DUMP, 1, &[0, 0, 0, 0]);
    let mut entries = Vec::new();
    match socket.dump(&request, |message| {
        if let Some(entry) = parse_entry(message.payload) {
            entries.push(entry);
        }
    }) {
        Ok(()) => Ok(Some(entries)),
        Err(error) => {
            let absent = error.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .and_then(std::io::Error::raw_os_error)
                    .is_some_and(|errno| {
                        // EINVAL: nfnetlink has no ctnetlink subsystem to hand the
                        // request to (nf_conntrack_netlink neither loaded nor loadable).
                        [
                            libc::EOPNOTSUPP,
                            libc::ENOENT,
                            libc::EPROTONOSUPPORT,
                            libc::EINVAL,
                        ]
                        .contains(&errno)
                    })
            });
            if absent { Ok(None) } else { Err(error) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::continuity::netlink::put_attr;

    fn nested(kind: u16, inner: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_attr(&mut out, kind | 0x8000, inner);
        out
    }

    fn tuple_v4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut ip = Vec::new();
        put_attr(&mut ip, CTA_IP_V4_SRC, &src);
        put_attr(&mut ip, CTA_IP_V4_DST, &dst);
        let mut l4 = Vec::new();
        put_attr(&mut l4, CTA_PROTO_NUM, &[proto::TCP]);
        put_attr(&mut l4, CTA_PROTO_SRC_PORT, &sport.to_be_bytes());
        put_attr(&mut l4, CTA_PROTO_DST_PORT, &dport.to_be_bytes());
        let mut out = nested(CTA_TUPLE_IP, &ip);
        out.extend(nested(CTA_TUPLE_PROTO, &l4));
        out
    }

    /// A message as `conntrack -L` shows an assured SSH connection 198.18.0.1:40000 →
    /// 198.18.0.2:22, with the attributes the kernel writes.
    fn ssh_message(reply_dst: [u8; 4]) -> Vec<u8> {
        let mut buf = vec![libc::AF_INET as u8, 0, 0, 0];
        buf.extend(nested(
            CTA_TUPLE_ORIG,
            &tuple_v4([198, 18, 0, 1], [198, 18, 0, 2], 40000, 22),
        ));
        buf.extend(nested(
            CTA_TUPLE_REPLY,
            &tuple_v4([198, 18, 0, 2], reply_dst, 22, 40000),
        ));
        put_attr(
            &mut buf,
            CTA_STATUS,
            &(IPS_SEEN_REPLY | IPS_ASSURED | 8).to_be_bytes(),
        );
        put_attr(&mut buf, CTA_TIMEOUT, &431_999u32.to_be_bytes());
        let mut tcp = Vec::new();
        put_attr(&mut tcp, CTA_PROTOINFO_TCP_STATE, &[3]);
        put_attr(&mut tcp, CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, &[7]);
        put_attr(&mut tcp, CTA_PROTOINFO_TCP_WSCALE_REPLY, &[9]);
        put_attr(&mut tcp, CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, &[0x23, 0x23]);
        put_attr(&mut tcp, CTA_PROTOINFO_TCP_FLAGS_REPLY, &[0x0b, 0x0b]);
        buf.extend(nested(CTA_PROTOINFO, &nested(CTA_PROTOINFO_TCP, &tcp)));
        let mut counters = Vec::new();
        put_attr(&mut counters, CTA_COUNTERS_PACKETS, &5u64.to_be_bytes());
        put_attr(&mut counters, CTA_COUNTERS_BYTES, &400u64.to_be_bytes());
        buf.extend(nested(CTA_COUNTERS_ORIG, &counters));
        buf
    }

    #[test]
    fn an_assured_tcp_entry_becomes_an_established_record_that_adopts_its_windows() {
        let entry = parse_entry(&ssh_message([198, 18, 0, 1])).expect("parses");
        assert_eq!(entry.family, FAMILY_IPV4);
        assert_eq!((entry.orig.sport, entry.orig.dport), (40000, 22));
        assert_eq!(entry.timeout_secs, 431_999);
        assert_eq!((entry.packets, entry.bytes), ([5, 0], [400, 0]));
        let record = to_record(&entry).expect("usable");
        record.validate().expect("a valid record");
        assert_eq!(record.state, TcpState::Established as u8);
        let want = session_flags::ORIG_IS_LO
            | session_flags::SEEN_REPLY
            | session_flags::ASSURED
            | session_flags::ADOPT_WINDOW;
        assert_eq!(record.flags, want);
        assert_eq!((record.tcp[0].scale, record.tcp[1].scale), (7, 9));
        assert_eq!(
            record.tcp[0].flags,
            tcp_peer_flags::WINDOW_SCALE | tcp_peer_flags::SACK_PERM,
            "MAXACK_SET is dropped: ctnetlink gives no maxack"
        );
        assert_eq!(
            record.tcp[1].flags,
            tcp_peer_flags::WINDOW_SCALE | tcp_peer_flags::SACK_PERM | tcp_peer_flags::BE_LIBERAL
        );
        assert_eq!(record.tcp[0].maxwin, 0, "window edges unknown");
        assert_eq!(record.remaining_ns, 431_999_000_000_000);
        assert_eq!(record.key.port_lo, 40000);
    }

    #[test]
    fn translated_and_truncated_entries_are_not_taken_over() {
        let nat = parse_entry(&ssh_message([198, 18, 0, 9])).expect("parses");
        assert_eq!(to_record(&nat), Err(Unusable::Nat));
        let whole = ssh_message([198, 18, 0, 1]);
        for len in 0..40 {
            assert!(parse_entry(&whole[..len]).is_none(), "cut at {len}");
        }
    }
}
