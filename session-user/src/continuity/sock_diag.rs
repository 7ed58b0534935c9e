//! Reading the host's own connections through sock_diag (`NETLINK_SOCK_DIAG`,
//! `inet_diag`), for the takeover at first start when conntrack has nothing to give.
//!
//! TCP: established sockets, with `tcp_info` for the window scales and SACK each side
//! announced and the segments each way; listening sockets tell which side opened a
//! connection (a connection on a listening port was accepted, so the peer opened it).
//! UDP: connected sockets. A socket shows no sequence edges, so its TCP session carries
//! `ADOPT_WINDOW`.

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

use crate::continuity::netlink::{self, NLM_F_DUMP, NLM_F_REQUEST, Socket, attr};

/// `SOCK_DIAG_BY_FAMILY` (`sock_diag.h`).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `INET_DIAG_INFO` (`inet_diag.h`): the attribute holding `struct tcp_info`.
const INET_DIAG_INFO: u16 = 2;
/// Size of `struct inet_diag_msg`, after which the attributes start.
const INET_DIAG_MSG_LEN: usize = 72;
/// Kernel TCP states (`tcp_states.h`), as bits of `idiag_states`.
const TCP_ESTABLISHED: u8 = 1;
const TCP_LISTEN: u8 = 10;
/// `TCPI_OPT_SACK` and `TCPI_OPT_WSCALE` of `tcp_info.tcpi_options`.
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;

/// One socket as inet_diag reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiagSocket {
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Kernel TCP state of the socket (UDP: 1 when connected).
    pub state: u8,
    /// Local address (IPv4-mapped for IPv4).
    pub local: [u8; 16],
    /// Local port.
    pub local_port: u16,
    /// Remote address.
    pub remote: [u8; 16],
    /// Remote port.
    pub remote_port: u16,
    /// From `tcp_info`: (the peer's window scale, ours) when scaling was negotiated.
    pub wscale: Option<(u8, u8)>,
    /// Whether SACK was negotiated.
    pub sack: bool,
    /// Segments (sent, received), from `tcp_info`.
    pub segs: (u32, u32),
}

/// The request of a dump of `protocol` sockets of `family` in `states` (bits by kernel
/// TCP state), with `tcp_info` for TCP.
pub fn request(family: u8, protocol: u8, states: u32, seq: u32) -> Vec<u8> {
    let mut req = vec![0u8; 56];
    req[0] = family;
    req[1] = protocol;
    req[2] = if protocol == proto::TCP {
        1 << (INET_DIAG_INFO - 1)
    } else {
        0
    };
    req[4..8].copy_from_slice(&states.to_ne_bytes());
    netlink::request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, &req)
}

fn address(family: u8, raw: &[u8]) -> Option<[u8; 16]> {
    if family == libc::AF_INET as u8 {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(raw.get(..4)?);
        Some(addr)
    } else {
        raw.get(..16)?.try_into().ok()
    }
}

/// Parses one `inet_diag_msg` (and its `tcp_info`, when there).
pub fn parse(payload: &[u8]) -> Option<DiagSocket> {
    let msg = payload.get(..INET_DIAG_MSG_LEN)?;
    let family_raw = msg[0];
    let family = match family_raw as i32 {
        libc::AF_INET => FAMILY_IPV4,
        libc::AF_INET6 => FAMILY_IPV6,
        _ => return None,
    };
    let id = &msg[4..52];
    let mut socket = DiagSocket {
        family,
        state: msg[1],
        local_port: u16::from_be_bytes([id[0], id[1]]),
        remote_port: u16::from_be_bytes([id[2], id[3]]),
        local: address(family_raw, &id[4..20])?,
        remote: address(family_raw, &id[20..36])?,
        ..DiagSocket::default()
    };
    if let Some(info) = attr(&payload[INET_DIAG_MSG_LEN..], INET_DIAG_INFO) {
        let options = *info.get(5)?;
        let scales = *info.get(6)?;
        if options & TCPI_OPT_WSCALE != 0 {
            // `tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4` (low bits first): the peer's
            // shift, then ours.
            socket.wscale = Some((scales & 0xf, scales >> 4));
        }
        socket.sack = options & TCPI_OPT_SACK != 0;
        // tcpi_segs_out and tcpi_segs_in follow 24 u32s and four u64s.
        let u32_at = |at: usize| {
            info.get(at..at + 4)
                .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
        };
        socket.segs = (u32_at(136).unwrap_or(0), u32_at(140).unwrap_or(0));
    }
    Some(socket)
}

/// Whether the peer opened `socket`'s connection. inet_diag does not say whether a
/// socket was accepted or connected, so: the local port is one a listening socket serves;
/// or (the listener may have closed since) the local port lies outside the range the
/// kernel picks connecting ports from (`ephemeral`, `net.ipv4.ip_local_port_range`) and
/// the peer's inside it.
pub fn accepted(socket: &DiagSocket, listeners: &[DiagSocket], ephemeral: (u16, u16)) -> bool {
    let listening = listeners.iter().any(|listener| {
        listener.local_port == socket.local_port
            && (listener.local == socket.local
                || listener.local == [0; 16]
                || listener.local == mapped_any())
    });
    let in_range = |port: u16| (ephemeral.0..=ephemeral.1).contains(&port);
    listening || (!in_range(socket.local_port) && in_range(socket.remote_port))
}

/// The range the kernel picks connecting ports from in this network namespace.
pub fn ephemeral_ports() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((parts.next()??, parts.next()??))
        })
        .unwrap_or((32768, 60999))
}

fn mapped_any() -> [u8; 16] {
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr
}

/// The record of a connected socket; `opened_by_peer` says who opened it (see
/// [`accepted`]), `timeout_ns` is the time it gets (the configured timeout of its state).
pub fn to_record(
    socket: &DiagSocket,
    protocol: u8,
    opened_by_peer: bool,
    timeout_ns: u64,
) -> Option<SessionRecord> {
    let ((src, sport), (dst, dport)) = if opened_by_peer {
        (
            (socket.remote, socket.remote_port),
            (socket.local, socket.local_port),
        )
    } else {
        (
            (socket.local, socket.local_port),
            (socket.remote, socket.remote_port),
        )
    };
    let family = socket.family;
    // A v4-mapped IPv6 socket talks IPv4 on the wire.
    let family = if family == FAMILY_IPV6 && src[..12] == mapped_any()[..12] {
        FAMILY_IPV4
    } else {
        family
    };
    let meta = PacketMeta {
        family,
        proto: protocol,
        src,
        dst,
        sport,
        dport,
        ..PacketMeta::default()
    };
    let (key, src_is_lo) = flow_key(&meta);
    let mut flags = if src_is_lo {
        session_flags::ORIG_IS_LO
    } else {
        0
    };
    let mut tcp = [TcpPeer::default(); 2];
    let state = if protocol == proto::TCP {
        if socket.state != TCP_ESTABLISHED {
            return None;
        }
        flags |= session_flags::SEEN_REPLY | session_flags::ASSURED | session_flags::ADOPT_WINDOW;
        // tcp[0] is the originator: the peer when it opened the connection.
        let (ours, theirs) = socket.wscale.map_or((0, 0), |(peer, ours)| (ours, peer));
        let (orig_scale, reply_scale) = if opened_by_peer {
            (theirs, ours)
        } else {
            (ours, theirs)
        };
        for (peer, scale) in tcp.iter_mut().zip([orig_scale, reply_scale]) {
            if socket.wscale.is_some() {
                peer.scale = scale.min(14);
                peer.flags |= tcp_peer_flags::WINDOW_SCALE;
            }
            if socket.sack {
                peer.flags |= tcp_peer_flags::SACK_PERM;
            }
        }
        TcpState::Established as u8
    } else {
        FlowState::Unreplied as u8
    };
    let (sent, received) = (u64::from(socket.segs.0), u64::from(socket.segs.1));
    let packets = if opened_by_peer {
        [received, sent]
    } else {
        [sent, received]
    };
    let record = SessionRecord {
        key,
        state,
        flags,
        rule: NO_NAME,
        origin_iface: NO_NAME,
        remaining_ns: timeout_ns,
        packets,
        tcp,
        ..SessionRecord::default()
    };
    record.validate().ok()?;
    Some(record)
}

/// The sockets of `protocol` in `states` (bits by kernel TCP state), both families.
pub fn dump(protocol: u8, states: u32) -> Result<Vec<DiagSocket>> {
    let socket = Socket::open(Some(rustix::net::netlink::SOCK_DIAG))?;
    let mut out = Vec::new();
    for (seq, family) in [libc::AF_INET as u8, libc::AF_INET6 as u8]
        .into_iter()
        .enumerate()
    {
        socket.dump(
            &request(family, protocol, states, seq as u32 + 1),
            |message| {
                if let Some(found) = parse(message.payload) {
                    out.push(found);
                }
            },
        )?;
    }
    Ok(out)
}

/// Established TCP sockets and the listening ones, for [`to_record`] and [`accepted`].
pub fn tcp() -> Result<(Vec<DiagSocket>, Vec<DiagSocket>)> {
    Ok((
        dump(proto::TCP, 1 << TCP_ESTABLISHED)?,
        dump(proto::TCP, 1 << TCP_LISTEN)?,
    ))
}

/// Connected UDP sockets (the kernel reports them as ESTABLISHED).
pub fn udp() -> Result<Vec<DiagSocket>> {
    dump(proto::UDP, 1 << TCP_ESTABLISHED)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diag(local_port: u16, remote_port: u16, wscale: Option<(u8, u8)>) -> DiagSocket {
        let v4 = |last: u8| {
            let mut addr = mapped_any();
            addr[12..].copy_from_slice(&[198, 18, 0, last]);
            addr
        };
        DiagSocket {
            family: FAMILY_IPV4,
            state: TCP_ESTABLISHED,
            local: v4(2),
            local_port,
            remote: v4(1),
            remote_port,
            wscale,
            sack: true,
            segs: (10, 20),
        }
    }

    #[test]
    fn an_accepted_connection_is_opened_by_its_peer_with_the_scales_each_side_announced() {
        let socket = diag(22, 40000, Some((9, 7)));
        let listener = DiagSocket {
            state: TCP_LISTEN,
            local: [0; 16],
            local_port: 22,
            remote_port: 0,
            ..socket
        };
        assert!(accepted(&socket, &[listener], (32768, 60999)));
        assert!(
            accepted(&socket, &[], (32768, 60999)),
            "a server port, a client port"
        );
        let record = to_record(&socket, proto::TCP, true, 5).expect("a record");
        // The peer 198.18.0.1:40000 opened it and sorts lower.
        assert_eq!(record.key.port_lo, 40000);
        assert_ne!(record.flags & session_flags::ORIG_IS_LO, 0);
        assert_ne!(record.flags & session_flags::ADOPT_WINDOW, 0);
        assert_eq!(record.tcp[0].scale, 9, "originator: the peer's scale");
        assert_eq!(record.tcp[1].scale, 7, "responder: ours");
        assert_eq!(record.packets, [20, 10]);
        assert_eq!(record.remaining_ns, 5);

        let outgoing = diag(50000, 443, None);
        assert!(!accepted(&outgoing, &[listener], (32768, 60999)));
        assert!(!accepted(&outgoing, &[], (32768, 60999)));
        let record = to_record(&outgoing, proto::TCP, false, 5).expect("a record");
        assert_eq!(
            record.flags & session_flags::ORIG_IS_LO,
            0,
            "we opened it and sort higher"
        );
        assert_eq!(record.tcp[0].flags & tcp_peer_flags::WINDOW_SCALE, 0);
    }

    #[test]
    fn a_diag_message_parses_with_its_tcp_info() {
        let mut msg = vec![0u8; INET_DIAG_MSG_LEN];
        msg[0] = libc::AF_INET as u8;
        msg[1] = TCP_ESTABLISHED;
        msg[4..6].copy_from_slice(&22u16.to_be_bytes());
        msg[6..8].copy_from_slice(&40000u16.to_be_bytes());
        msg[8..12].copy_from_slice(&[198, 18, 0, 2]);
        msg[24..28].copy_from_slice(&[198, 18, 0, 1]);
        let mut info = vec![0u8; 160];
        info[5] = TCPI_OPT_WSCALE | TCPI_OPT_SACK;
        info[6] = (7 << 4) | 9;
        info[136..140].copy_from_slice(&10u32.to_ne_bytes());
        info[140..144].copy_from_slice(&20u32.to_ne_bytes());
        netlink::put_attr(&mut msg, INET_DIAG_INFO, &info);
        let socket = parse(&msg).expect("parses");
        assert_eq!(socket, diag(22, 40000, Some((9, 7))));
        assert!(parse(&msg[..INET_DIAG_MSG_LEN - 1]).is_none());
    }
}
