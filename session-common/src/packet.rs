//! Packet parsing: from raw frame bytes to the [`PacketMeta`] the tracker works on.
//!
//! The parser reads through [`PacketBytes`], so the kernel can back it with
//! `bpf_xdp_load_bytes`/`bpf_skb_load_bytes` and the host with a slice. Every read is
//! bounds-checked by the backend; every loop has a fixed bound.

use crate::wire::{FAMILY_IPV4, FAMILY_IPV6, proto};

/// Read access to a frame, starting at its Ethernet header.
pub trait PacketBytes {
    /// Total frame length in bytes.
    fn len(&self) -> usize;

    /// Whether the frame is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `N` bytes at `offset`, or `None` when they are not all inside the frame.
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;

    /// Copies the first `len` (at most 40) bytes at `offset` into `buf`: the variable-size
    /// read TCP options need (the buffer is 64 bytes so indices can be masked). False when
    /// they are not all inside the frame.
    fn load_options(&self, offset: usize, len: usize, buf: &mut [u8; 64]) -> bool;
}

impl PacketBytes for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let end = offset.checked_add(N)?;
        let bytes = self.get(offset..end)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Some(out)
    }

    fn load_options(&self, offset: usize, len: usize, buf: &mut [u8; 64]) -> bool {
        if len > 40 {
            return false;
        }
        let Some(bytes) = offset.checked_add(len).and_then(|end| self.get(offset..end)) else {
            return false;
        };
        match buf.get_mut(..len) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                true
            }
            None => false,
        }
    }
}

/// TCP header flag bits, as on the wire.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
    /// URG.
    pub const URG: u8 = 0x20;
}

/// What kind of ICMP/ICMPv6 message a packet carries, as conntrack groups them.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IcmpKind {
    /// Not an ICMP packet.
    #[default]
    None = 0,
    /// A request that opens a query flow (echo request and friends).
    Request,
    /// The answer to a request.
    Reply,
    /// An error carrying the header of the packet it is about.
    Error,
    /// A message the kernel does not track (IPv6 neighbour discovery, MLD, router messages).
    Untracked,
    /// Any other type: cannot start a flow.
    Other,
}

/// Why a frame could not be parsed into a trackable packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Not IPv4 or IPv6 (ARP, LLDP…): not ours to judge.
    NotIp,
    /// Headers truncated, lengths inconsistent or impossible values.
    Malformed,
    /// A fragment after the first: no transport header.
    Fragment,
}

/// The embedded header of an ICMP error, as sent by the host the error is about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InnerTuple {
    /// Source of the embedded packet.
    pub src: [u8; 16],
    /// Destination of the embedded packet.
    pub dst: [u8; 16],
    /// Source port or ICMP id.
    pub sport: u16,
    /// Destination port (0 for ICMP queries).
    pub dport: u16,
    /// Transport protocol of the embedded packet.
    pub proto: u8,
    /// ICMP kind of the embedded packet when it is ICMP.
    pub icmp_kind: IcmpKind,
}

/// Everything the tracker and the policy need to know about one packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketMeta {
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Transport protocol number (after IPv6 extension headers).
    pub proto: u8,
    /// Source address, IPv4-mapped for IPv4.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Source port, or ICMP id for queries.
    pub sport: u16,
    /// Destination port, 0 for ICMP.
    pub dport: u16,
    /// TCP flags byte.
    pub tcp_flags: u8,
    /// TCP data offset in bytes.
    pub tcp_header_len: u8,
    /// Window scale option on a SYN, 0xff when absent.
    pub tcp_wscale: u8,
    /// SACK-permitted option on a SYN.
    pub tcp_sack_perm: bool,
    /// TCP sequence number.
    pub seq: u32,
    /// TCP acknowledgement number.
    pub ack: u32,
    /// TCP raw (unscaled) window.
    pub window: u16,
    /// ICMP type.
    pub icmp_type: u8,
    /// ICMP code.
    pub icmp_code: u8,
    /// How conntrack treats this ICMP message.
    pub icmp_kind: IcmpKind,
    /// Transport payload length in bytes.
    pub payload_len: u32,
    /// Length of the IP packet (header included), for byte counters.
    pub ip_len: u32,
    /// The embedded header when this is an ICMP error.
    pub inner: InnerTuple,
}

impl PacketMeta {
    /// Resets every field, one store each: a whole-struct assignment becomes a byte loop
    /// in BPF, which the verifier then walks byte by byte.
    #[inline(always)]
    pub fn clear(&mut self) {
        self.family = 0;
        self.proto = 0;
        self.src = [0; 16];
        self.dst = [0; 16];
        self.sport = 0;
        self.dport = 0;
        self.tcp_flags = 0;
        self.tcp_header_len = 0;
        self.tcp_wscale = 0xff;
        self.tcp_sack_perm = false;
        self.seq = 0;
        self.ack = 0;
        self.window = 0;
        self.icmp_type = 0;
        self.icmp_code = 0;
        self.icmp_kind = IcmpKind::None;
        self.payload_len = 0;
        self.ip_len = 0;
        self.inner.src = [0; 16];
        self.inner.dst = [0; 16];
        self.inner.sport = 0;
        self.inner.dport = 0;
        self.inner.proto = 0;
        self.inner.icmp_kind = IcmpKind::None;
    }
}

/// Ethernet header length.
const ETH_HLEN: usize = 14;
/// 802.1Q / 802.1ad tag length.
const VLAN_HLEN: usize = 4;
/// VLAN tags skipped at most (QinQ).
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers skipped at most before giving up as malformed.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
const IPV6_MOBILITY: u8 = 135;

#[inline(always)]
fn be16(bytes: [u8; 2]) -> u16 {
    u16::from_be_bytes(bytes)
}

#[inline(always)]
fn be32(bytes: [u8; 4]) -> u32 {
    u32::from_be_bytes(bytes)
}

/// Maps an IPv4 address into the IPv6 space (`::ffff:a.b.c.d`).
#[inline(always)]
pub fn ipv4_mapped(addr: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
    ]
}

/// Classifies an ICMPv4 type the way nf_conntrack does.
#[inline(always)]
pub fn icmpv4_kind(icmp_type: u8) -> IcmpKind {
    match icmp_type {
        8 | 13 | 15 | 17 => IcmpKind::Request,
        0 | 14 | 16 | 18 => IcmpKind::Reply,
        3 | 4 | 5 | 11 | 12 => IcmpKind::Error,
        _ => IcmpKind::Other,
    }
}

/// Classifies an ICMPv6 type the way nf_conntrack does.
#[inline(always)]
pub fn icmpv6_kind(icmp_type: u8) -> IcmpKind {
    match icmp_type {
        128 | 139 => IcmpKind::Request,
        129 | 140 => IcmpKind::Reply,
        1..=4 => IcmpKind::Error,
        130..=137 | 141..=143 | 151..=153 => IcmpKind::Untracked,
        _ => IcmpKind::Other,
    }
}

/// Parses a frame starting at its Ethernet header into `meta` (which it resets first, so
/// the kernel can keep it in scratch memory instead of its small stack).
#[inline(always)]
pub fn parse<P: PacketBytes + ?Sized>(pkt: &P, meta: &mut PacketMeta) -> Result<(), ParseError> {
    meta.clear();
    let mut offset = ETH_HLEN - 2;
    let mut ethertype = be16(pkt.load::<2>(offset).ok_or(ParseError::Malformed)?);
    offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        ethertype = be16(pkt.load::<2>(offset + 2).ok_or(ParseError::Malformed)?);
        offset += VLAN_HLEN;
    }
    let frame_len = pkt.len();
    match ethertype {
        ETH_P_IP => parse_ipv4(pkt, meta, offset, frame_len),
        ETH_P_IPV6 => parse_ipv6(pkt, meta, offset, frame_len),
        _ => Err(ParseError::NotIp),
    }
}

#[inline(always)]
fn parse_ipv4<P: PacketBytes + ?Sized>(
    pkt: &P,
    meta: &mut PacketMeta,
    offset: usize,
    frame_len: usize,
) -> Result<(), ParseError> {
    let hdr = pkt.load::<20>(offset).ok_or(ParseError::Malformed)?;
    if hdr[0] >> 4 != 4 {
        return Err(ParseError::Malformed);
    }
    let header_len = ((hdr[0] & 0x0f) as usize) * 4;
    let total_len = be16([hdr[2], hdr[3]]) as usize;
    if header_len < 20 || total_len < header_len || offset + total_len > frame_len {
        return Err(ParseError::Malformed);
    }
    let frag = be16([hdr[6], hdr[7]]);
    if frag & 0x1fff != 0 {
        return Err(ParseError::Fragment);
    }
    meta.family = FAMILY_IPV4;
    meta.proto = hdr[9];
    meta.src = ipv4_mapped([hdr[12], hdr[13], hdr[14], hdr[15]]);
    meta.dst = ipv4_mapped([hdr[16], hdr[17], hdr[18], hdr[19]]);
    meta.ip_len = total_len as u32;
    parse_l4(pkt, meta, offset + header_len, total_len - header_len)
}

#[inline(always)]
fn parse_ipv6<P: PacketBytes + ?Sized>(
    pkt: &P,
    meta: &mut PacketMeta,
    offset: usize,
    frame_len: usize,
) -> Result<(), ParseError> {
    let hdr = pkt.load::<40>(offset).ok_or(ParseError::Malformed)?;
    if hdr[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    let payload_len = be16([hdr[4], hdr[5]]) as usize;
    if offset + 40 + payload_len > frame_len {
        return Err(ParseError::Malformed);
    }
    meta.src.copy_from_slice(&hdr[8..24]);
    meta.dst.copy_from_slice(&hdr[24..40]);
    let (next, ext_len) = skip_ipv6_extensions(pkt, offset + 40, hdr[6], payload_len)?;
    meta.family = FAMILY_IPV6;
    meta.proto = next;
    meta.ip_len = (40 + payload_len) as u32;
    parse_l4(pkt, meta, offset + 40 + ext_len, payload_len - ext_len)
}

/// Walks IPv6 extension headers; returns the transport protocol and the bytes skipped.
#[inline(always)]
fn skip_ipv6_extensions<P: PacketBytes + ?Sized>(
    pkt: &P,
    start: usize,
    first: u8,
    payload_len: usize,
) -> Result<(u8, usize), ParseError> {
    let mut next = first;
    let mut skipped = 0usize;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        let len = match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_MOBILITY => {
                let ext = pkt.load::<2>(start + skipped).ok_or(ParseError::Malformed)?;
                next = ext[0];
                (ext[1] as usize + 1) * 8
            }
            IPV6_AH => {
                let ext = pkt.load::<2>(start + skipped).ok_or(ParseError::Malformed)?;
                next = ext[0];
                (ext[1] as usize + 2) * 4
            }
            IPV6_FRAGMENT => {
                let ext = pkt.load::<4>(start + skipped).ok_or(ParseError::Malformed)?;
                if be16([ext[2], ext[3]]) & 0xfff8 != 0 {
                    return Err(ParseError::Fragment);
                }
                next = ext[0];
                8
            }
            _ => return Ok((next, skipped)),
        };
        skipped += len;
        if skipped > payload_len {
            return Err(ParseError::Malformed);
        }
    }
    match next {
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_MOBILITY | IPV6_AH | IPV6_FRAGMENT => {
            Err(ParseError::Malformed)
        }
        _ => Ok((next, skipped)),
    }
}

#[inline(always)]
fn parse_l4<P: PacketBytes + ?Sized>(
    pkt: &P,
    meta: &mut PacketMeta,
    offset: usize,
    l4_len: usize,
) -> Result<(), ParseError> {
    match meta.proto {
        proto::TCP => parse_tcp(pkt, meta, offset, l4_len),
        proto::UDP => {
            let hdr = pkt.load::<8>(offset).ok_or(ParseError::Malformed)?;
            let udp_len = be16([hdr[4], hdr[5]]) as usize;
            if l4_len < 8 || udp_len < 8 || udp_len > l4_len {
                return Err(ParseError::Malformed);
            }
            meta.sport = be16([hdr[0], hdr[1]]);
            meta.dport = be16([hdr[2], hdr[3]]);
            meta.payload_len = (udp_len - 8) as u32;
            Ok(())
        }
        proto::ICMP | proto::ICMPV6 => parse_icmp(pkt, meta, offset, l4_len),
        _ => {
            meta.payload_len = l4_len as u32;
            Ok(())
        }
    }
}

#[inline(always)]
fn parse_tcp<P: PacketBytes + ?Sized>(
    pkt: &P,
    meta: &mut PacketMeta,
    offset: usize,
    l4_len: usize,
) -> Result<(), ParseError> {
    let hdr = pkt.load::<20>(offset).ok_or(ParseError::Malformed)?;
    let header_len = ((hdr[12] >> 4) as usize) * 4;
    if header_len < 20 || header_len > l4_len {
        return Err(ParseError::Malformed);
    }
    meta.sport = be16([hdr[0], hdr[1]]);
    meta.dport = be16([hdr[2], hdr[3]]);
    meta.seq = be32([hdr[4], hdr[5], hdr[6], hdr[7]]);
    meta.ack = be32([hdr[8], hdr[9], hdr[10], hdr[11]]);
    meta.tcp_flags = hdr[13];
    meta.window = be16([hdr[14], hdr[15]]);
    meta.tcp_header_len = header_len as u8;
    meta.payload_len = (l4_len - header_len) as u32;
    if meta.tcp_flags & tcp_flags::SYN != 0 && header_len > 20 {
        parse_tcp_options(pkt, meta, offset + 20, header_len - 20);
    }
    Ok(())
}

/// Reads the window-scale and SACK-permitted options of a SYN, as `tcp_options()` does.
#[inline(always)]
fn parse_tcp_options<P: PacketBytes + ?Sized>(
    pkt: &P,
    meta: &mut PacketMeta,
    offset: usize,
    len: usize,
) {
    let mut options = [0u8; 64];
    if pkt.load_options(offset, len, &mut options) {
        scan_tcp_options(&options, len, meta);
    }
}

/// Options examined at most in one header; real stacks send five or six on a SYN.
pub const MAX_TCP_OPTIONS: usize = 16;

#[inline(always)]
fn scan_tcp_options(options: &[u8; 64], len: usize, meta: &mut PacketMeta) {
    let mut i = 0usize;
    for _ in 0..MAX_TCP_OPTIONS {
        if i + 1 >= len {
            break;
        }
        let kind = options[i & 63];
        if kind == 0 {
            break;
        }
        if kind == 1 {
            i += 1;
            continue;
        }
        let size = options[(i + 1) & 63] as usize;
        if size < 2 || i + size > len {
            break;
        }
        if kind == 3 && size == 3 {
            let scale = options[(i + 2) & 63];
            meta.tcp_wscale = if scale > 14 { 14 } else { scale };
        } else if kind == 4 && size == 2 {
            meta.tcp_sack_perm = true;
        }
        i += size;
    }
}

#[inline(always)]
fn parse_icmp<P: PacketBytes + ?Sized>(
    pkt: &P,
    meta: &mut PacketMeta,
    offset: usize,
    l4_len: usize,
) -> Result<(), ParseError> {
    if l4_len < 8 {
        return Err(ParseError::Malformed);
    }
    let hdr = pkt.load::<8>(offset).ok_or(ParseError::Malformed)?;
    meta.icmp_type = hdr[0];
    meta.icmp_code = hdr[1];
    meta.payload_len = (l4_len - 8) as u32;
    meta.icmp_kind = if meta.proto == proto::ICMP {
        icmpv4_kind(hdr[0])
    } else {
        icmpv6_kind(hdr[0])
    };
    match meta.icmp_kind {
        IcmpKind::Request | IcmpKind::Reply => {
            meta.sport = be16([hdr[4], hdr[5]]);
        }
        IcmpKind::Error => {
            parse_embedded(pkt, meta, offset + 8, l4_len - 8)?;
        }
        IcmpKind::None | IcmpKind::Untracked | IcmpKind::Other => {}
    }
    Ok(())
}

/// Parses the IP header and first 8 transport bytes quoted in an ICMP error.
#[inline(always)]
fn parse_embedded<P: PacketBytes + ?Sized>(
    pkt: &P,
    meta: &mut PacketMeta,
    offset: usize,
    len: usize,
) -> Result<(), ParseError> {
    let family = meta.family;
    let inner = &mut meta.inner;
    let l4_offset;
    if family == FAMILY_IPV4 {
        let hdr = pkt.load::<20>(offset).ok_or(ParseError::Malformed)?;
        let header_len = ((hdr[0] & 0x0f) as usize) * 4;
        if hdr[0] >> 4 != 4 || header_len < 20 || header_len + 8 > len {
            return Err(ParseError::Malformed);
        }
        inner.proto = hdr[9];
        inner.src = ipv4_mapped([hdr[12], hdr[13], hdr[14], hdr[15]]);
        inner.dst = ipv4_mapped([hdr[16], hdr[17], hdr[18], hdr[19]]);
        l4_offset = offset + header_len;
    } else {
        let hdr = pkt.load::<40>(offset).ok_or(ParseError::Malformed)?;
        if hdr[0] >> 4 != 6 || len < 48 {
            return Err(ParseError::Malformed);
        }
        inner.src.copy_from_slice(&hdr[8..24]);
        inner.dst.copy_from_slice(&hdr[24..40]);
        let (next, ext_len) = skip_ipv6_extensions(pkt, offset + 40, hdr[6], len - 40)?;
        if 40 + ext_len + 8 > len {
            return Err(ParseError::Malformed);
        }
        inner.proto = next;
        l4_offset = offset + 40 + ext_len;
    }
    let l4 = pkt.load::<8>(l4_offset).ok_or(ParseError::Malformed)?;
    match inner.proto {
        proto::ICMP | proto::ICMPV6 => {
            inner.icmp_kind = if inner.proto == proto::ICMP {
                icmpv4_kind(l4[0])
            } else {
                icmpv6_kind(l4[0])
            };
            if inner.icmp_kind != IcmpKind::Request && inner.icmp_kind != IcmpKind::Reply {
                return Err(ParseError::Malformed);
            }
            inner.sport = be16([l4[4], l4[5]]);
        }
        _ => {
            inner.sport = be16([l4[0], l4[1]]);
            inner.dport = be16([l4[2], l4[3]]);
        }
    }
    Ok(())
}
