//! Builders for Ethernet frames, so tests, the kernel-path checks, benchmarks and the
//! netns tests' injected packets can craft exactly the packets a scenario needs. IP and
//! transport checksums are filled in: the tracked path ignores them, but a real stack
//! behind the firewall drops packets whose checksums are wrong.

use std::net::IpAddr;

use session_common::wire::proto;

/// TCP flag bits, re-exported for test readability.
pub use session_common::packet::tcp_flags;

/// A TCP segment's header fields.
#[derive(Clone, Copy, Debug)]
pub struct Tcp {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// Flags byte.
    pub flags: u8,
    /// Raw window.
    pub window: u16,
    /// Window scale option (SYNs), if any.
    pub wscale: Option<u8>,
    /// Payload length in bytes (zero-filled).
    pub payload: usize,
}

impl Tcp {
    /// A segment with the given ports and flags, window 64240, no payload.
    pub fn new(sport: u16, dport: u16, flags: u8) -> Tcp {
        Tcp {
            sport,
            dport,
            seq: 0,
            ack: 0,
            flags,
            window: 64240,
            wscale: None,
            payload: 0,
        }
    }

    /// Sets sequence and acknowledgement numbers.
    pub fn seq_ack(mut self, seq: u32, ack: u32) -> Tcp {
        self.seq = seq;
        self.ack = ack;
        self
    }

    /// Sets the payload length.
    pub fn payload(mut self, len: usize) -> Tcp {
        self.payload = len;
        self
    }

    /// Adds a window-scale option.
    pub fn wscale(mut self, scale: u8) -> Tcp {
        self.wscale = Some(scale);
        self
    }

    /// Sets the raw window.
    pub fn window(mut self, window: u16) -> Tcp {
        self.window = window;
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let options: Vec<u8> = match self.wscale {
            Some(scale) => vec![1, 3, 3, scale],
            None => Vec::new(),
        };
        let header_len = 20 + options.len();
        let mut out = Vec::with_capacity(header_len + self.payload);
        out.extend_from_slice(&self.sport.to_be_bytes());
        out.extend_from_slice(&self.dport.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.ack.to_be_bytes());
        out.push(((header_len / 4) as u8) << 4);
        out.push(self.flags);
        out.extend_from_slice(&self.window.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&options);
        out.resize(header_len + self.payload, 0);
        out
    }
}

/// A UDP datagram with a zero-filled payload of `payload` bytes.
pub fn udp(sport: u16, dport: u16, payload: usize) -> (u8, Vec<u8>) {
    udp_carrying(sport, dport, &vec![0; payload])
}

/// A UDP datagram carrying `payload`.
pub fn udp_carrying(sport: u16, dport: u16, payload: &[u8]) -> (u8, Vec<u8>) {
    let len = 8 + payload.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&dport.to_be_bytes());
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    (proto::UDP, out)
}

/// A TCP segment as a transport payload.
pub fn tcp(segment: Tcp) -> (u8, Vec<u8>) {
    (proto::TCP, segment.bytes())
}

/// An ICMP (v4 when `v6` is false) message with an id/sequence word and a body.
pub fn icmp(v6: bool, icmp_type: u8, code: u8, rest: [u8; 4], body: &[u8]) -> (u8, Vec<u8>) {
    let mut out = vec![icmp_type, code, 0, 0];
    out.extend_from_slice(&rest);
    out.extend_from_slice(body);
    (if v6 { proto::ICMPV6 } else { proto::ICMP }, out)
}

/// An echo request (`reply` false) or reply with the given id.
pub fn echo(v6: bool, reply: bool, id: u16, sequence: u16) -> (u8, Vec<u8>) {
    let icmp_type = match (v6, reply) {
        (false, false) => 8,
        (false, true) => 0,
        (true, false) => 128,
        (true, true) => 129,
    };
    let [a, b] = id.to_be_bytes();
    let [c, d] = sequence.to_be_bytes();
    icmp(v6, icmp_type, 0, [a, b, c, d], &[0; 16])
}

/// An IPv4 (DF set, TTL 64) or IPv6 (hop limit 64, no extension header) packet, without
/// Ethernet header, carrying `payload` as protocol `protocol`. The IPv4 header checksum
/// and the TCP, UDP, ICMP or ICMPv6 checksum are filled in (the payload's checksum field
/// must be zero; a payload too short to hold one is left as it is).
pub fn ip_packet(src: IpAddr, dst: IpAddr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let (mut out, pseudo) = match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut out = vec![0x45, 0];
            out.extend_from_slice(&((20 + len) as u16).to_be_bytes());
            out.extend_from_slice(&[0, 1, 0x40, 0, 64, protocol, 0, 0]);
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
            let sum = checksum(&[&out]);
            out[10..12].copy_from_slice(&sum.to_be_bytes());
            let mut pseudo = Vec::with_capacity(12);
            pseudo.extend_from_slice(&src.octets());
            pseudo.extend_from_slice(&dst.octets());
            pseudo.extend_from_slice(&[0, protocol]);
            pseudo.extend_from_slice(&(len as u16).to_be_bytes());
            (out, pseudo)
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let mut out = vec![0x60, 0, 0, 0];
            out.extend_from_slice(&(len as u16).to_be_bytes());
            out.extend_from_slice(&[protocol, 64]);
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
            let mut pseudo = Vec::with_capacity(40);
            pseudo.extend_from_slice(&src.octets());
            pseudo.extend_from_slice(&dst.octets());
            pseudo.extend_from_slice(&(len as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, protocol]);
            (out, pseudo)
        }
        _ => panic!("ip_packet: {src} and {dst} are of different families"),
    };
    let header_len = out.len();
    out.extend_from_slice(payload);
    let checksum_at = match protocol {
        proto::TCP => Some((16, &pseudo[..])),
        proto::UDP => Some((6, &pseudo[..])),
        proto::ICMPV6 => Some((2, &pseudo[..])),
        proto::ICMP => Some((2, &[][..])),
        _ => None,
    };
    if let Some((offset, pseudo)) = checksum_at
        && len >= offset + 2
    {
        let mut sum = checksum(&[pseudo, payload]);
        if protocol == proto::UDP && sum == 0 {
            sum = 0xffff;
        }
        let at = header_len + offset;
        out[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }
    out
}

/// The Internet checksum over the concatenation of `parts` (each of even length except
/// possibly the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for pair in part.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame around an IP packet between two fixed, locally administered MACs.
pub fn ethernet(ip: &[u8]) -> Vec<u8> {
    ethernet_between([0x02, 0, 0, 0, 0, 2], [0x02, 0, 0, 0, 0, 1], ip)
}

/// An Ethernet frame from `src_mac` to `dst_mac` around an IP packet (ethertype from the
/// IP version nibble).
pub fn ethernet_between(src_mac: [u8; 6], dst_mac: [u8; 6], ip: &[u8]) -> Vec<u8> {
    let ethertype: u16 = if ip.first().is_some_and(|b| b >> 4 == 6) {
        0x86dd
    } else {
        0x0800
    };
    let mut out = Vec::with_capacity(14 + ip.len());
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&src_mac);
    out.extend_from_slice(&ethertype.to_be_bytes());
    out.extend_from_slice(ip);
    out
}

/// An IP packet carrying a transport built by [`tcp`], [`udp`], [`icmp`] or [`echo`].
pub fn packet(src: IpAddr, dst: IpAddr, transport: (u8, Vec<u8>)) -> Vec<u8> {
    ip_packet(src, dst, transport.0, &transport.1)
}

/// A complete frame: Ethernet, IP, transport.
pub fn frame(src: IpAddr, dst: IpAddr, transport: (u8, Vec<u8>)) -> Vec<u8> {
    ethernet(&packet(src, dst, transport))
}

/// An ICMP error (destination unreachable, code `code`) from `from` to `to`, quoting the
/// first bytes of `original` (an IP packet, as built by [`ip_packet`]).
pub fn icmp_error(from: IpAddr, to: IpAddr, icmp_type: u8, code: u8, original: &[u8]) -> Vec<u8> {
    let v6 = from.is_ipv6();
    let quoted = &original[..original.len().min(if v6 { 1232 } else { 548 })];
    frame(from, to, icmp(v6, icmp_type, code, [0; 4], quoted))
}

/// The IP packet [`packet`] builds (checksums filled in) cut into fragments of at most
/// `chunk` bytes of its transport data each (rounded down to a multiple of 8), as
/// Ethernet frames in order: IPv4 with identification `id` (its low 16 bits), IPv6 with a
/// fragment header of identification `id`.
pub fn fragments(
    src: IpAddr,
    dst: IpAddr,
    transport: (u8, Vec<u8>),
    chunk: usize,
    id: u32,
) -> Vec<Vec<u8>> {
    let protocol = transport.0;
    let whole = packet(src, dst, transport);
    let data = &whole[if src.is_ipv6() { 40 } else { 20 }..];
    let chunk = (chunk / 8 * 8).max(8);
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < data.len() {
        let end = (offset + chunk).min(data.len());
        out.push(fragment(
            src,
            dst,
            protocol,
            id,
            offset,
            end < data.len(),
            &data[offset..end],
        ));
        offset = end;
    }
    out
}

/// One fragment, as an Ethernet frame: `data` at byte `offset` (a multiple of 8) of a
/// datagram of protocol `protocol` and identification `id`, with "more fragments" set
/// when `more`. For crafting fragments that no stack would send: overlapping, out of
/// order, claiming another flow's id.
pub fn fragment(
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    id: u32,
    offset: usize,
    more: bool,
    data: &[u8],
) -> Vec<u8> {
    assert!(
        offset.is_multiple_of(8),
        "fragment offsets are multiples of 8, not {offset}"
    );
    let ip = match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let flags = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
            let mut out = vec![0x45, 0];
            out.extend_from_slice(&((20 + data.len()) as u16).to_be_bytes());
            out.extend_from_slice(&(id as u16).to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&[64, protocol, 0, 0]);
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
            let sum = checksum(&[&out]);
            out[10..12].copy_from_slice(&sum.to_be_bytes());
            out.extend_from_slice(data);
            out
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let word = offset as u16 | u16::from(more);
            let mut out = vec![0x60, 0, 0, 0];
            out.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
            out.extend_from_slice(&[44, 64]);
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
            out.extend_from_slice(&[protocol, 0]);
            out.extend_from_slice(&word.to_be_bytes());
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(data);
            out
        }
        _ => panic!("fragment: {src} and {dst} are of different families"),
    };
    ethernet(&ip)
}
