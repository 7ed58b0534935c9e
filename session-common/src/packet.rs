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

    /// The first `N` bytes of the frame in place, or `None` when the frame (or, in the
    /// kernel, its directly readable part) is shorter. A read at a fixed offset is what
    /// the BPF verifier can check cheaply, so the common case reads all its headers here.
    fn head<const N: usize>(&self) -> Option<&[u8; N]>;

    /// Parses the frame into `meta`: [`parse`], which the kernel side runs as a BPF
    /// function of its own so that the verifier checks the parser once, not once more for
    /// every path after it.
    fn parse_into(&self, meta: &mut PacketMeta) -> Result<(), ParseError> {
        parse(self, meta)
    }

    /// Copies the first `len` (at most [`MAX_TCP_OPTION_BYTES`]) bytes at `offset` into
    /// `buf`: the variable-size read TCP options need. False when they are not all inside
    /// the frame.
    fn load_options(&self, offset: usize, len: usize, buf: &mut [u8; MAX_TCP_OPTION_BYTES])
    -> bool;

    /// Reads a SYN's options into `meta`: [`read_syn_options`], which the kernel side runs
    /// as a BPF function of its own, as it does the parser.
    fn syn_options_into(&self, meta: &mut PacketMeta, room: &mut OptionBytes) {
        read_syn_options(self, meta, room)
    }
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

    fn head<const N: usize>(&self) -> Option<&[u8; N]> {
        self.first_chunk::<N>()
    }

    fn load_options(
        &self,
        offset: usize,
        len: usize,
        buf: &mut [u8; MAX_TCP_OPTION_BYTES],
    ) -> bool {
        if len > MAX_TCP_OPTION_BYTES {
            return false;
        }
        let Some(bytes) = offset
            .checked_add(len)
            .and_then(|end| self.get(offset..end))
        else {
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
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Not IPv4 or IPv6 (ARP, LLDP…): not ours to judge.
    NotIp,
    /// Headers truncated, lengths inconsistent or impossible values.
    Malformed,
    /// A fragment after the first: it has no transport header, and `meta` holds only its
    /// datagram's identity ([`PacketMeta::fragment`] and the fields it lists), which
    /// [`crate::fragment`] looks up.
    Fragment,
    /// The first fragment of a datagram, parsed in full into `meta` like a whole packet.
    /// An error only so that the common case's success test stays the one test a whole
    /// packet pays; the engine judges it as any packet, then records its verdict.
    FirstFragment,
    /// A first fragment too short to hold its whole transport header: the classic
    /// tiny-fragment attack (RFC 1858), which would let later fragments supply the ports
    /// or TCP flags the policy never saw.
    TinyFragment,
}

/// The embedded header of an ICMP error, as sent by the host the error is about.
/// Addresses first and 8-byte aligned so copies and clears are word stores in BPF.
#[repr(C, align(8))]
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

// SAFETY: every field is an integer, a byte array or `IcmpKind`, whose zero is `None`.
unsafe impl bytemuck::Zeroable for InnerTuple {}

/// Everything the tracker and the policy need to know about one packet. Laid out with
/// the addresses first and 8-byte aligned, so that in BPF their stores are words and the
/// whole struct clears with [`crate::zero_words`].
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketMeta {
    /// Source address, IPv4-mapped for IPv4.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// The embedded header when this is an ICMP error.
    pub inner: InnerTuple,
    /// TCP sequence number.
    pub seq: u32,
    /// TCP acknowledgement number.
    pub ack: u32,
    /// Transport payload length in bytes.
    pub payload_len: u32,
    /// Length of the IP packet (header included), for byte counters.
    pub ip_len: u32,
    /// Source port, or ICMP id for queries.
    pub sport: u16,
    /// Destination port, 0 for ICMP.
    pub dport: u16,
    /// TCP raw (unscaled) window.
    pub window: u16,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Transport protocol number (after IPv6 extension headers).
    pub proto: u8,
    /// TCP flags byte.
    pub tcp_flags: u8,
    /// TCP data offset in bytes.
    pub tcp_header_len: u8,
    /// Window scale option on a SYN, 0xff when absent or not read yet
    /// ([`read_syn_options`]).
    pub tcp_wscale: u8,
    /// SACK-permitted option on a SYN, once read ([`read_syn_options`]).
    pub tcp_sack_perm: bool,
    /// ICMP type.
    pub icmp_type: u8,
    /// ICMP code.
    pub icmp_code: u8,
    /// How conntrack treats this ICMP message.
    pub icmp_kind: IcmpKind,
    /// Frame offset of the UDP payload, for the few packets whose payload the engine
    /// reads (DHCP, [`crate::expect`]); 0 when not UDP or beyond 255 bytes (IPv6 with
    /// long extension headers), where nothing is read. A byte of what was padding.
    pub udp_payload_at: u8,
    /// [`fragment_flags`] of an IP fragment, 0 for a whole packet.
    pub fragment: u8,
    /// The protocol every fragment of the datagram names: IPv4's protocol field, or the
    /// next header of IPv6's fragment header (extension headers may follow it in the
    /// first fragment only).
    pub frag_proto: u8,
    /// Byte offset of a fragment in its datagram (0 for the first).
    pub frag_offset: u16,
    /// IP identification of a fragment's datagram: 16 bits on IPv4, the fragment header's
    /// 32 on IPv6.
    pub frag_id: u32,
    /// Frame offset of a SYN's TCP options, which [`read_syn_options`] reads into
    /// `tcp_wscale` and `tcp_sack_perm` when the SYN builds or moves a session; 0 when
    /// there are none or they have been read.
    pub tcp_options_at: u16,
    /// The packet changed its session's state or its seen-reply or assured flag
    /// (`engine::sync_marks`) while state sync listens: reported as
    /// [`crate::wire::event_kind::CHANGED`]. A byte of what was padding.
    pub sync_changed: u8,
}
const _: () = assert!(core::mem::size_of::<PacketMeta>() == 120);

/// What [`PacketMeta::fragment`] says about a fragment. For a later fragment only the
/// family, protocol, addresses, `ip_len`, `payload_len` (the fragment's data) and the
/// fragment fields are filled.
pub mod fragment_flags {
    /// The first fragment (offset 0) of a datagram that has more.
    pub const FIRST: u8 = 1;
    /// A fragment at a nonzero offset.
    pub const LATER: u8 = 2;
    /// More fragments follow this one (IPv4 MF, IPv6 M).
    pub const MORE: u8 = 4;
}

// SAFETY: every field is an integer, a bool, a byte array, `IcmpKind` (zero is `None`) or
// `InnerTuple` (itself `Zeroable`).
unsafe impl bytemuck::Zeroable for PacketMeta {}

impl PacketMeta {
    /// Resets every field: zero, but no window scale seen.
    #[inline(always)]
    pub fn clear(&mut self) {
        crate::zero_words(self);
        self.tcp_wscale = 0xff;
    }
}

/// Ethernet header length, without VLAN tags: where the IP header starts in an untagged
/// frame.
pub const ETH_HLEN: usize = 14;
/// 802.1Q / 802.1ad tag length.
const VLAN_HLEN: usize = 4;
/// VLAN tags skipped at most (QinQ).
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers skipped at most before giving up as malformed.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;

/// Ethernet type of IPv4: the parser and the fast path both dispatch on it.
pub const ETH_P_IP: u16 = 0x0800;
/// Ethernet type of IPv6, for the same two readers.
pub const ETH_P_IPV6: u16 = 0x86dd;
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
    // An opaque zero, so that LLVM cannot turn the leading zeros into a `memset` call
    // (see [`crate::zero_words`]).
    let zero = crate::opaque(0u8);
    [
        zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, 0xff, 0xff, addr[0], addr[1],
        addr[2], addr[3],
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
        0..=127 => IcmpKind::Error,
        130..=136 | 143 | 151 | 152 => IcmpKind::Untracked,
        _ => IcmpKind::Other,
    }
}

/// Parses a frame starting at its Ethernet header into `meta` (which it resets first, so
/// the kernel can keep it in scratch memory instead of its small stack).
#[inline(always)]
pub fn parse<P: PacketBytes + ?Sized>(pkt: &P, meta: &mut PacketMeta) -> Result<(), ParseError> {
    if parse_common_case(pkt, meta) {
        return Ok(());
    }
    parse_general(pkt, meta)
}

/// Parses any frame the common case ([`parse_common_case`]) refused: VLAN tags, IP
/// options, extension headers, fragments, other protocols, and malformed frames, which
/// it names.
#[inline(always)]
pub fn parse_general<P: PacketBytes + ?Sized>(
    pkt: &P,
    meta: &mut PacketMeta,
) -> Result<(), ParseError> {
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

/// Frame bytes the common case reads at once: Ethernet without VLAN tags, then IPv4
/// without options and a TCP header without options (or a UDP header and 12 more
/// bytes), or a fixed IPv6 header.
const COMMON_HEAD: usize = ETH_HLEN + 40;

/// Where the transport header of an IPv6 packet without extension headers starts.
const IPV6_L4: usize = ETH_HLEN + 40;

/// Parses the common case ([`parse_common`]) only: true when the frame is one and `meta`
/// holds it. The kernel runs this in place and calls [`parse_general`], a separate
/// function there, only for the other frames: a call costs more than the common case.
#[inline(always)]
pub fn parse_common_case<P: PacketBytes + ?Sized>(pkt: &P, meta: &mut PacketMeta) -> bool {
    pkt.head::<COMMON_HEAD>()
        .is_some_and(|head| parse_common(pkt, head, meta))
}

/// The common case, TCP or UDP over IPv4 without options or over IPv6 without extension
/// headers, no VLAN tags, parsed from the frame's first bytes read in place. False when
/// the frame is anything else or anything is wrong with it: [`parse`] then starts over
/// on the general path, which decides.
#[inline(always)]
fn parse_common<P: PacketBytes + ?Sized>(
    pkt: &P,
    head: &[u8; COMMON_HEAD],
    meta: &mut PacketMeta,
) -> bool {
    let frame_len = pkt.len();
    match be16([head[12], head[13]]) {
        ETH_P_IP => {
            let (Some(ip), Some(l4)) = (sub::<20>(head, ETH_HLEN), sub::<20>(head, ETH_HLEN + 20))
            else {
                return false;
            };
            if ip[0] != 0x45 {
                return false;
            }
            meta.clear();
            let Ok((header_len, total_len)) = read_ipv4(meta, ip, ETH_HLEN, frame_len) else {
                return false;
            };
            let l4_len = total_len - header_len;
            match meta.proto {
                proto::TCP => read_tcp(meta, l4, ETH_HLEN + 20, l4_len).is_ok(),
                proto::UDP => sub::<8>(l4, 0)
                    .is_some_and(|udp| read_udp(meta, udp, ETH_HLEN + 20, l4_len).is_ok()),
                _ => false,
            }
        }
        ETH_P_IPV6 => {
            let Some(ip) = sub::<40>(head, ETH_HLEN) else {
                return false;
            };
            let next = ip[6];
            if next != proto::TCP && next != proto::UDP {
                return false;
            }
            meta.clear();
            let Ok(payload_len) = read_ipv6(meta, ip, ETH_HLEN, frame_len) else {
                return false;
            };
            meta.family = FAMILY_IPV6;
            meta.proto = next;
            meta.ip_len = (40 + payload_len) as u32;
            if next == proto::TCP {
                pkt.head::<{ IPV6_L4 + 20 }>()
                    .and_then(|frame| sub::<20>(frame, IPV6_L4))
                    .is_some_and(|tcp| read_tcp(meta, tcp, IPV6_L4, payload_len).is_ok())
            } else {
                pkt.head::<{ IPV6_L4 + 8 }>()
                    .and_then(|frame| sub::<8>(frame, IPV6_L4))
                    .is_some_and(|udp| read_udp(meta, udp, IPV6_L4, payload_len).is_ok())
            }
        }
        _ => false,
    }
}

/// The `N` bytes of `bytes` at `at`.
#[inline(always)]
fn sub<const N: usize>(bytes: &[u8], at: usize) -> Option<&[u8; N]> {
    bytes.get(at..at + N)?.try_into().ok()
}

#[inline(always)]
fn parse_ipv4<P: PacketBytes + ?Sized>(
    pkt: &P,
    meta: &mut PacketMeta,
    offset: usize,
    frame_len: usize,
) -> Result<(), ParseError> {
    let hdr = pkt.load::<20>(offset).ok_or(ParseError::Malformed)?;
    let (header_len, total_len) = match read_ipv4(meta, &hdr, offset, frame_len) {
        Ok(lengths) => lengths,
        Err(ParseError::Fragment) => {
            let header_len = ((hdr[0] & 0x0f) as usize) * 4;
            let word = be16([hdr[6], hdr[7]]);
            let frag = Fragment {
                id: be16([hdr[4], hdr[5]]) as u32,
                next: hdr[9],
                offset: (word & IPV4_OFFSET) << 3,
                more: word & IPV4_MF != 0,
            };
            return parse_fragment(
                pkt,
                meta,
                frag,
                offset + header_len,
                meta.ip_len as usize - header_len,
            );
        }
        Err(error) => return Err(error),
    };
    let l4_len = total_len - header_len;
    parse_l4(pkt, meta, offset + header_len, l4_len, l4_len)
}

/// Checks the IPv4 header `hdr` found at `offset` and fills `meta` from it; returns its
/// header and total lengths.
#[inline(always)]
fn read_ipv4(
    meta: &mut PacketMeta,
    hdr: &[u8; 20],
    offset: usize,
    frame_len: usize,
) -> Result<(usize, usize), ParseError> {
    if hdr[0] >> 4 != 4 {
        return Err(ParseError::Malformed);
    }
    let header_len = ((hdr[0] & 0x0f) as usize) * 4;
    let total_len = be16([hdr[2], hdr[3]]) as usize;
    if header_len < 20 || total_len < header_len || offset + total_len > frame_len {
        return Err(ParseError::Malformed);
    }
    meta.family = FAMILY_IPV4;
    meta.proto = hdr[9];
    meta.src = ipv4_mapped([hdr[12], hdr[13], hdr[14], hdr[15]]);
    meta.dst = ipv4_mapped([hdr[16], hdr[17], hdr[18], hdr[19]]);
    meta.ip_len = total_len as u32;
    // MF or an offset: a fragment, which the common case leaves to the general path
    // ([`parse_ipv4`]) with this one test, the one it made before fragments were followed.
    if be16([hdr[6], hdr[7]]) & (IPV4_MF | IPV4_OFFSET) != 0 {
        return Err(ParseError::Fragment);
    }
    Ok((header_len, total_len))
}

/// IPv4 "more fragments" flag in the flags/offset word.
const IPV4_MF: u16 = 0x2000;
/// IPv4 fragment offset (8-byte units) in the flags/offset word.
const IPV4_OFFSET: u16 = 0x1fff;

/// Transport header bytes a first fragment must hold (RFC 1858): the whole TCP header
/// (with options: its data offset is read), UDP's 8 bytes, an ICMP header's 8; nothing
/// for other protocols. Checked before the transport parser runs, so that a short first
/// fragment is named for what it is.
#[inline(always)]
fn holds_transport_header<P: PacketBytes + ?Sized>(
    pkt: &P,
    protocol: u8,
    offset: usize,
    l4_len: usize,
) -> bool {
    match protocol {
        proto::TCP => {
            l4_len >= 20
                && pkt
                    .load::<1>(offset + 12)
                    .is_some_and(|doff| ((doff[0] >> 4) as usize) * 4 <= l4_len)
        }
        proto::UDP | proto::ICMP | proto::ICMPV6 => l4_len >= 8,
        _ => true,
    }
}

/// Fills the fragment fields of `meta` and, for a later fragment, its data length; for a
/// first fragment, checks it holds its transport header and parses that with
/// [`parse_l4`], its UDP length bounded by the largest datagram. Returns
/// [`ParseError::Fragment`] or [`ParseError::FirstFragment`].
#[inline(always)]
fn parse_fragment<P: PacketBytes + ?Sized>(
    pkt: &P,
    meta: &mut PacketMeta,
    frag: Fragment,
    l4_offset: usize,
    l4_len: usize,
) -> Result<(), ParseError> {
    meta.frag_id = frag.id;
    meta.frag_offset = frag.offset;
    meta.frag_proto = frag.next;
    let more = if frag.more { fragment_flags::MORE } else { 0 };
    if frag.offset != 0 {
        meta.fragment = fragment_flags::LATER | more;
        meta.payload_len = l4_len as u32;
        return Err(ParseError::Fragment);
    }
    meta.fragment = fragment_flags::FIRST | more;
    if !holds_transport_header(pkt, meta.proto, l4_offset, l4_len) {
        return Err(ParseError::TinyFragment);
    }
    parse_l4(pkt, meta, l4_offset, l4_len, u16::MAX as usize)?;
    Err(ParseError::FirstFragment)
}

#[inline(always)]
fn parse_ipv6<P: PacketBytes + ?Sized>(
    pkt: &P,
    meta: &mut PacketMeta,
    offset: usize,
    frame_len: usize,
) -> Result<(), ParseError> {
    // The header in a block of its own, so that its 40 bytes of stack are free again for
    // what comes after (Linux 6.1 sums the stacks of the program and this function).
    let (payload_len, next) = {
        let hdr = pkt.load::<40>(offset).ok_or(ParseError::Malformed)?;
        (read_ipv6(meta, &hdr, offset, frame_len)?, hdr[6])
    };
    let chain = skip_ipv6_extensions(pkt, offset + 40, next, payload_len)?;
    meta.family = FAMILY_IPV6;
    meta.proto = chain.next;
    meta.ip_len = (40 + payload_len) as u32;
    let (l4_offset, l4_len) = (offset + 40 + chain.skipped, payload_len - chain.skipped);
    match chain.fragment {
        // An atomic fragment (offset 0, no more: RFC 6946) is a whole packet.
        Some(frag) if frag.offset != 0 || frag.more => {
            parse_fragment(pkt, meta, frag, l4_offset, l4_len)
        }
        _ => parse_l4(pkt, meta, l4_offset, l4_len, l4_len),
    }
}

/// Checks the fixed IPv6 header `hdr` found at `offset` and takes the addresses from it;
/// returns its payload length.
#[inline(always)]
fn read_ipv6(
    meta: &mut PacketMeta,
    hdr: &[u8; 40],
    offset: usize,
    frame_len: usize,
) -> Result<usize, ParseError> {
    if hdr[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    let payload_len = be16([hdr[4], hdr[5]]) as usize;
    if offset + 40 + payload_len > frame_len {
        return Err(ParseError::Malformed);
    }
    meta.src.copy_from_slice(&hdr[8..24]);
    meta.dst.copy_from_slice(&hdr[24..40]);
    Ok(payload_len)
}

/// What an IPv4 header's fragment fields or an IPv6 fragment header say.
#[derive(Clone, Copy)]
struct Fragment {
    /// Identification of the datagram.
    id: u32,
    /// The protocol every fragment names ([`PacketMeta::frag_proto`]).
    next: u8,
    /// Offset in bytes.
    offset: u16,
    /// More fragments follow.
    more: bool,
}

/// Where an IPv6 extension header chain ends.
struct Ipv6Chain {
    /// The protocol after the chain: the transport, or, at a later fragment, the protocol
    /// its fragment header names.
    next: u8,
    /// Bytes of extension headers.
    skipped: usize,
    /// The fragment header, when there is one.
    fragment: Option<Fragment>,
}

/// Walks IPv6 extension headers up to the transport header, or up to and including the
/// fragment header of a later fragment, whose data has no headers to walk.
#[inline(always)]
fn skip_ipv6_extensions<P: PacketBytes + ?Sized>(
    pkt: &P,
    start: usize,
    first: u8,
    payload_len: usize,
) -> Result<Ipv6Chain, ParseError> {
    let mut next = first;
    let mut skipped = 0usize;
    let mut fragment = None;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        let len = match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_MOBILITY => {
                let ext = pkt
                    .load::<2>(start + skipped)
                    .ok_or(ParseError::Malformed)?;
                next = ext[0];
                (ext[1] as usize + 1) * 8
            }
            IPV6_AH => {
                let ext = pkt
                    .load::<2>(start + skipped)
                    .ok_or(ParseError::Malformed)?;
                next = ext[0];
                (ext[1] as usize + 2) * 4
            }
            IPV6_FRAGMENT => {
                let ext = pkt
                    .load::<8>(start + skipped)
                    .ok_or(ParseError::Malformed)?;
                if fragment.is_some() {
                    return Err(ParseError::Malformed);
                }
                next = ext[0];
                let word = be16([ext[2], ext[3]]);
                let frag = Fragment {
                    id: be32([ext[4], ext[5], ext[6], ext[7]]),
                    next,
                    offset: word & 0xfff8,
                    more: word & 1 != 0,
                };
                fragment = Some(frag);
                if frag.offset != 0 {
                    if skipped + 8 > payload_len {
                        return Err(ParseError::Malformed);
                    }
                    return Ok(Ipv6Chain {
                        next,
                        skipped: skipped + 8,
                        fragment,
                    });
                }
                8
            }
            _ => {
                return Ok(Ipv6Chain {
                    next,
                    skipped,
                    fragment,
                });
            }
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
        _ => Ok(Ipv6Chain {
            next,
            skipped,
            fragment,
        }),
    }
}

/// Parses the transport header at `offset` of an `l4_len`-byte transport payload.
/// `udp_len_max` bounds the UDP header's length field: `l4_len` for a whole packet; for a
/// first fragment, whose UDP length is the whole datagram's, longer than this fragment,
/// the most an IP datagram can carry, and that length gives the payload length. The rest
/// holds only this fragment's part of the datagram, which is all the tracker sees of a
/// fragmented TCP segment's data. Inlined with a constant or `l4_len` at each call, so
/// the bound costs no work of its own.
#[inline(always)]
fn parse_l4<P: PacketBytes + ?Sized>(
    pkt: &P,
    meta: &mut PacketMeta,
    offset: usize,
    l4_len: usize,
    udp_len_max: usize,
) -> Result<(), ParseError> {
    match meta.proto {
        proto::TCP => parse_tcp(pkt, meta, offset, l4_len),
        proto::UDP => {
            let hdr = pkt.load::<8>(offset).ok_or(ParseError::Malformed)?;
            read_udp(meta, &hdr, offset, udp_len_max)
        }
        proto::ICMP | proto::ICMPV6 => parse_icmp(pkt, meta, offset, l4_len),
        _ => {
            meta.payload_len = l4_len as u32;
            Ok(())
        }
    }
}

/// Checks the UDP header `hdr`, found at frame offset `offset`, of a transport payload of
/// `l4_len` bytes and fills `meta`.
#[inline(always)]
fn read_udp(
    meta: &mut PacketMeta,
    hdr: &[u8; 8],
    offset: usize,
    l4_len: usize,
) -> Result<(), ParseError> {
    let udp_len = be16([hdr[4], hdr[5]]) as usize;
    if l4_len < 8 || udp_len < 8 || udp_len > l4_len {
        return Err(ParseError::Malformed);
    }
    meta.sport = be16([hdr[0], hdr[1]]);
    meta.dport = be16([hdr[2], hdr[3]]);
    meta.payload_len = (udp_len - 8) as u32;
    meta.udp_payload_at = if offset + 8 <= u8::MAX as usize {
        (offset + 8) as u8
    } else {
        0
    };
    Ok(())
}

#[inline(always)]
fn parse_tcp<P: PacketBytes + ?Sized>(
    pkt: &P,
    meta: &mut PacketMeta,
    offset: usize,
    l4_len: usize,
) -> Result<(), ParseError> {
    let hdr = pkt.load::<20>(offset).ok_or(ParseError::Malformed)?;
    read_tcp(meta, &hdr, offset, l4_len)
}

/// Checks the TCP header `hdr` found at `offset` in a transport payload of `l4_len` bytes,
/// fills `meta` from it and, on a SYN with options, notes where they are.
#[inline(always)]
fn read_tcp(
    meta: &mut PacketMeta,
    hdr: &[u8; 20],
    offset: usize,
    l4_len: usize,
) -> Result<(), ParseError> {
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
        meta.tcp_options_at = (offset + 20) as u16;
    }
    Ok(())
}

/// Room for a SYN's options while [`read_syn_options`] reads them: words, so that it can
/// live in the kernel's per-CPU scratch memory rather than on the 512-byte stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OptionBytes {
    /// The option bytes, as words.
    pub words: [u64; MAX_TCP_OPTION_BYTES / 8],
}

/// Reads the window-scale and SACK-permitted options of a SYN that [`parse`] found
/// (`meta.tcp_options_at`), as `tcp_options()` does; nothing for other packets, or a
/// second time. The parser leaves them unread: only a SYN that builds or moves a
/// session needs them, so a SYN the policy drops never reads them.
#[inline(always)]
pub fn read_syn_options<P: PacketBytes + ?Sized>(
    pkt: &P,
    meta: &mut PacketMeta,
    room: &mut OptionBytes,
) {
    let at = meta.tcp_options_at as usize;
    if at == 0 {
        return;
    }
    meta.tcp_options_at = 0;
    let len = (meta.tcp_header_len as usize).saturating_sub(20);
    let options: &mut [u8; MAX_TCP_OPTION_BYTES] = bytemuck::cast_mut(&mut room.words);
    if pkt.load_options(at, len, options) {
        scan_tcp_options(options, len, meta);
    }
}

/// Options examined at most in one header; real stacks send five or six on a SYN.
pub const MAX_TCP_OPTIONS: usize = 16;

/// The most option bytes a TCP header can carry (a 60-byte header).
pub const MAX_TCP_OPTION_BYTES: usize = 40;

#[inline(always)]
fn scan_tcp_options(options: &[u8; MAX_TCP_OPTION_BYTES], len: usize, meta: &mut PacketMeta) {
    let mut i = 0usize;
    for _ in 0..MAX_TCP_OPTIONS {
        if i + 1 >= len {
            break;
        }
        let kind = option_byte(options, i);
        if kind == 0 {
            break;
        }
        if kind == 1 {
            i += 1;
            continue;
        }
        let size = option_byte(options, i + 1) as usize;
        if size < 2 || i + size > len {
            break;
        }
        if kind == 3 && size == 3 {
            let scale = option_byte(options, i + 2);
            meta.tcp_wscale = if scale > 14 { 14 } else { scale };
        } else if kind == 4 && size == 2 {
            meta.tcp_sack_perm = true;
        }
        i += size;
    }
}

/// The option byte at `at`, which the caller has checked is below `len` and so inside the
/// buffer. The clamp never changes it; it is there, on an index the optimiser cannot see
/// through, so that the BPF verifier sees the bound on the very register it reads with.
/// The mask first: Linux 6.1's verifier can reach the clamp on a path it has bounded
/// impossibly (above the buffer, from a loose `len`), and then refuses the read; a mask
/// leaves it a sane range whatever it knew before.
#[inline(always)]
fn option_byte(options: &[u8; MAX_TCP_OPTION_BYTES], at: usize) -> u8 {
    options[(crate::opaque(at) & 63).min(MAX_TCP_OPTION_BYTES - 1)]
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
        if be16([hdr[6], hdr[7]]) & 0x1fff != 0 {
            // A quoted later fragment has no transport header: the kernel refuses it too.
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
        // A quoted later fragment has no transport header: the kernel refuses it too.
        let chain = match skip_ipv6_extensions(pkt, offset + 40, hdr[6], len - 40)? {
            Ipv6Chain {
                fragment: Some(Fragment { offset: 1.., .. }),
                ..
            } => return Err(ParseError::Malformed),
            chain => chain,
        };
        if 40 + chain.skipped + 8 > len {
            return Err(ParseError::Malformed);
        }
        inner.proto = chain.next;
        l4_offset = offset + 40 + chain.skipped;
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

#[cfg(test)]
mod tests {
    extern crate std;

    use std::{vec, vec::Vec};

    use proptest::prelude::*;

    use super::*;

    const V4_A: [u8; 4] = [198, 18, 0, 1];
    const V4_B: [u8; 4] = [198, 18, 0, 2];
    const V4_ROUTER: [u8; 4] = [198, 18, 0, 254];

    fn v6(last: u8) -> [u8; 16] {
        [
            0x20, 0x01, 0x00, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, last,
        ]
    }

    // ---- frame builders (independent of session-user's, so the crate tests itself) ----

    fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        out.extend_from_slice(&ethertype.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// An Ethernet frame with VLAN tags (outer first) in front of `ethertype`.
    fn tagged(tags: &[u16], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        for (i, tpid) in tags.iter().enumerate() {
            out.extend_from_slice(&tpid.to_be_bytes());
            out.extend_from_slice(&(100 + i as u16).to_be_bytes());
        }
        out.extend_from_slice(&ethertype.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    struct Ipv4 {
        src: [u8; 4],
        dst: [u8; 4],
        proto: u8,
        options: Vec<u8>,
        frag: u16,
    }

    impl Ipv4 {
        fn new(src: [u8; 4], dst: [u8; 4], proto: u8) -> Ipv4 {
            Ipv4 {
                src,
                dst,
                proto,
                options: Vec::new(),
                frag: 0x4000,
            }
        }

        fn packet(&self, payload: &[u8]) -> Vec<u8> {
            assert_eq!(self.options.len() % 4, 0);
            let header_len = 20 + self.options.len();
            let total = header_len + payload.len();
            let mut out = vec![0x40 | (header_len / 4) as u8, 0];
            out.extend_from_slice(&(total as u16).to_be_bytes());
            out.extend_from_slice(&[0x12, 0x34]);
            out.extend_from_slice(&self.frag.to_be_bytes());
            out.extend_from_slice(&[64, self.proto, 0, 0]);
            out.extend_from_slice(&self.src);
            out.extend_from_slice(&self.dst);
            out.extend_from_slice(&self.options);
            out.extend_from_slice(payload);
            out
        }
    }

    /// An IPv6 packet; `exts` is a list of (header type, body) already in wire form except
    /// the next-header byte, which is filled in.
    fn ipv6(
        src: [u8; 16],
        dst: [u8; 16],
        exts: &[(u8, Vec<u8>)],
        proto: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut chain = Vec::new();
        for (i, (_, body)) in exts.iter().enumerate() {
            let next = exts.get(i + 1).map_or(proto, |(kind, _)| *kind);
            let mut header = body.clone();
            header[0] = next;
            chain.extend_from_slice(&header);
        }
        chain.extend_from_slice(payload);
        let first = exts.first().map_or(proto, |(kind, _)| *kind);
        let mut out = vec![0x60, 0, 0, 0];
        out.extend_from_slice(&(chain.len() as u16).to_be_bytes());
        out.extend_from_slice(&[first, 64]);
        out.extend_from_slice(&src);
        out.extend_from_slice(&dst);
        out.extend_from_slice(&chain);
        out
    }

    /// Hop-by-hop, routing or destination options header of `units` extra 8-byte units.
    fn ext_opts(units: u8) -> Vec<u8> {
        let mut body = vec![0u8; 8 * (units as usize + 1)];
        body[1] = units;
        body[2] = 1; // PadN
        body[3] = (body.len() - 4) as u8;
        body
    }

    fn ext_fragment(offset_units: u16, more: bool) -> Vec<u8> {
        let word = (offset_units << 3) | u16::from(more);
        let mut body = vec![0u8, 0];
        body.extend_from_slice(&word.to_be_bytes());
        body.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        body
    }

    /// Authentication header with `extra_words` 4-byte words of ICV beyond the first.
    fn ext_ah(words: u8) -> Vec<u8> {
        // Length field is (total 4-byte words) - 2.
        let total = 3 + words as usize;
        let mut body = vec![0u8; total * 4];
        body[1] = (total - 2) as u8;
        body
    }

    struct Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        window: u16,
        options: Vec<u8>,
        payload: usize,
        data_offset: Option<u8>,
    }

    impl Tcp {
        fn new(sport: u16, dport: u16, flags: u8) -> Tcp {
            Tcp {
                sport,
                dport,
                seq: 0x0102_0304,
                ack: 0x0a0b_0c0d,
                flags,
                window: 0xfaf0,
                options: Vec::new(),
                payload: 0,
                data_offset: None,
            }
        }

        fn bytes(&self) -> Vec<u8> {
            let header_len = 20 + self.options.len();
            assert_eq!(header_len % 4, 0);
            let doff = self.data_offset.unwrap_or((header_len / 4) as u8);
            let mut out = Vec::new();
            out.extend_from_slice(&self.sport.to_be_bytes());
            out.extend_from_slice(&self.dport.to_be_bytes());
            out.extend_from_slice(&self.seq.to_be_bytes());
            out.extend_from_slice(&self.ack.to_be_bytes());
            out.push(doff << 4);
            out.push(self.flags);
            out.extend_from_slice(&self.window.to_be_bytes());
            out.extend_from_slice(&[0, 0, 0, 0]);
            out.extend_from_slice(&self.options);
            out.resize(header_len + self.payload, 0xab);
            out
        }
    }

    fn udp(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
        let len = 8 + payload;
        let mut out = Vec::new();
        out.extend_from_slice(&sport.to_be_bytes());
        out.extend_from_slice(&dport.to_be_bytes());
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.resize(len, 0xcd);
        out
    }

    fn icmp(icmp_type: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
        let mut out = vec![icmp_type, code, 0, 0];
        out.extend_from_slice(&rest);
        out.extend_from_slice(body);
        out
    }

    fn v4_frame(ip: &Ipv4, payload: &[u8]) -> Vec<u8> {
        ethernet(0x0800, &ip.packet(payload))
    }

    fn v6_frame(packet: &[u8]) -> Vec<u8> {
        ethernet(0x86dd, packet)
    }

    fn parsed(frame: &[u8]) -> Result<PacketMeta, ParseError> {
        let mut meta = PacketMeta::default();
        parse(frame, &mut meta).map(|()| meta)
    }

    /// The parse result and whatever `meta` holds after it.
    fn parse_any(frame: &[u8]) -> (Result<(), ParseError>, PacketMeta) {
        let mut meta = PacketMeta::default();
        let result = parse(frame, &mut meta);
        (result, meta)
    }

    /// A whole packet, or a first fragment, which parses as fully, with a SYN's options
    /// read as the engine reads them for a SYN that builds a session.
    fn ok(frame: &[u8]) -> PacketMeta {
        match parse_any(frame) {
            (Ok(()) | Err(ParseError::FirstFragment), mut meta) => {
                read_syn_options(frame, &mut meta, &mut OptionBytes::default());
                meta
            }
            (Err(error), _) => panic!("valid frame rejected with {error:?}: {frame:02x?}"),
        }
    }

    #[test]
    fn a_syns_options_are_left_unread_by_the_parser_and_read_once_when_asked() {
        let frame = v4_frame(
            &Ipv4::new(V4_A, V4_B, proto::TCP),
            &syn_with_options().bytes(),
        );
        let (result, mut meta) = parse_any(&frame);
        assert_eq!(result, Ok(()));
        assert_eq!(
            meta.tcp_wscale, 0xff,
            "the parser leaves the options unread"
        );
        assert!(!meta.tcp_sack_perm);
        assert_eq!(meta.tcp_options_at as usize, ETH_HLEN + 20 + 20);
        read_syn_options(&frame[..], &mut meta, &mut OptionBytes::default());
        assert_eq!((meta.tcp_wscale, meta.tcp_sack_perm), (7, true));
        assert_eq!(meta.tcp_options_at, 0, "read once");
        meta.tcp_wscale = 0xff;
        read_syn_options(&frame[..], &mut meta, &mut OptionBytes::default());
        assert_eq!(meta.tcp_wscale, 0xff, "not read a second time");
    }

    const SYN: u8 = tcp_flags::SYN;
    const ACK: u8 = tcp_flags::ACK;

    fn syn_with_options() -> Tcp {
        Tcp {
            // MSS 1460, SACK permitted, timestamps, NOP, window scale 7.
            options: vec![
                2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
            ],
            ..Tcp::new(40000, 8080, SYN)
        }
    }

    /// A selection of valid frames of every shape the parser knows.
    fn valid_frames() -> Vec<Vec<u8>> {
        let tcp_data = Tcp {
            payload: 100,
            ..Tcp::new(40000, 8080, ACK | tcp_flags::PSH)
        };
        let quoted_udp = Ipv4::new(V4_A, V4_B, proto::UDP).packet(&udp(40000, 53, 20));
        let quoted_v6_tcp = ipv6(
            v6(1),
            v6(2),
            &[],
            proto::TCP,
            &Tcp::new(40000, 443, ACK).bytes(),
        );
        let mut with_options = Ipv4::new(V4_A, V4_B, proto::TCP);
        with_options.options = vec![1, 1, 1, 0];
        vec![
            v4_frame(
                &Ipv4::new(V4_A, V4_B, proto::TCP),
                &syn_with_options().bytes(),
            ),
            v4_frame(&Ipv4::new(V4_A, V4_B, proto::TCP), &tcp_data.bytes()),
            v4_frame(&with_options, &Tcp::new(1, 2, ACK).bytes()),
            v4_frame(&Ipv4::new(V4_A, V4_B, proto::UDP), &udp(5353, 53, 32)),
            v4_frame(
                &Ipv4::new(V4_A, V4_B, proto::ICMP),
                &icmp(8, 0, [0, 7, 0, 1], &[0; 16]),
            ),
            v4_frame(
                &Ipv4::new(V4_ROUTER, V4_A, proto::ICMP),
                &icmp(3, 3, [0; 4], &quoted_udp),
            ),
            v4_frame(&Ipv4::new(V4_A, V4_B, 47), &[0u8; 24]),
            v6_frame(&ipv6(
                v6(1),
                v6(2),
                &[],
                proto::TCP,
                &syn_with_options().bytes(),
            )),
            v6_frame(&ipv6(v6(1), v6(2), &[], proto::UDP, &udp(1000, 2000, 10))),
            v6_frame(&ipv6(
                v6(1),
                v6(2),
                &[],
                proto::ICMPV6,
                &icmp(128, 0, [0, 9, 0, 1], &[1; 8]),
            )),
            v6_frame(&ipv6(
                v6(1),
                v6(2),
                &[
                    (IPV6_HOPOPTS, ext_opts(0)),
                    (IPV6_ROUTING, ext_opts(1)),
                    (IPV6_DSTOPTS, ext_opts(0)),
                    (IPV6_FRAGMENT, ext_fragment(0, true)),
                ],
                proto::TCP,
                &Tcp::new(1, 2, SYN).bytes(),
            )),
            v6_frame(&ipv6(
                v6(0xfe),
                v6(1),
                &[],
                proto::ICMPV6,
                &icmp(2, 0, [0, 0, 5, 0], &quoted_v6_tcp),
            )),
            tagged(
                &[ETH_P_8021Q],
                ETH_P_IP,
                &Ipv4::new(V4_A, V4_B, proto::UDP).packet(&udp(1, 2, 0)),
            ),
            tagged(
                &[ETH_P_8021AD, ETH_P_8021Q],
                ETH_P_IPV6,
                &ipv6(v6(1), v6(2), &[], proto::UDP, &udp(1, 2, 0)),
            ),
        ]
    }

    #[test]
    fn every_valid_frame_in_the_corpus_parses() {
        for frame in valid_frames() {
            ok(&frame);
        }
    }

    #[test]
    fn ipv4_tcp_syn_yields_every_field() {
        let frame = v4_frame(
            &Ipv4::new(V4_A, V4_B, proto::TCP),
            &syn_with_options().bytes(),
        );
        let meta = ok(&frame);
        assert_eq!(meta.family, crate::wire::FAMILY_IPV4);
        assert_eq!(meta.proto, proto::TCP);
        assert_eq!(meta.src, ipv4_mapped(V4_A));
        assert_eq!(meta.dst, ipv4_mapped(V4_B));
        assert_eq!((meta.sport, meta.dport), (40000, 8080));
        assert_eq!((meta.seq, meta.ack), (0x0102_0304, 0x0a0b_0c0d));
        assert_eq!(meta.tcp_flags, SYN);
        assert_eq!(meta.window, 0xfaf0);
        assert_eq!(meta.tcp_header_len, 40);
        assert_eq!(meta.tcp_wscale, 7);
        assert!(meta.tcp_sack_perm);
        assert_eq!(meta.payload_len, 0);
        assert_eq!(meta.ip_len, 60);
        assert_eq!(meta.icmp_kind, IcmpKind::None);
    }

    #[test]
    fn tcp_payload_and_ip_length_exclude_ethernet_padding() {
        // A bare ACK is 40 bytes of IP; Ethernet pads the frame to 60 bytes.
        let mut frame = v4_frame(
            &Ipv4::new(V4_A, V4_B, proto::TCP),
            &Tcp::new(1, 2, ACK).bytes(),
        );
        assert_eq!(frame.len(), 54);
        frame.resize(60, 0);
        let meta = ok(&frame);
        assert_eq!(meta.payload_len, 0);
        assert_eq!(meta.ip_len, 40);
        let data = Tcp {
            payload: 1000,
            ..Tcp::new(1, 2, ACK)
        };
        let meta = ok(&v4_frame(&Ipv4::new(V4_A, V4_B, proto::TCP), &data.bytes()));
        assert_eq!(meta.payload_len, 1000);
        assert_eq!(meta.ip_len, 1040);
    }

    #[test]
    fn tcp_options_are_read_only_on_syns() {
        let ack_with_options = Tcp {
            flags: ACK,
            ..syn_with_options()
        };
        let meta = ok(&v4_frame(
            &Ipv4::new(V4_A, V4_B, proto::TCP),
            &ack_with_options.bytes(),
        ));
        assert_eq!(meta.tcp_wscale, 0xff);
        assert!(!meta.tcp_sack_perm);
        let synack = Tcp {
            flags: SYN | ACK,
            ..syn_with_options()
        };
        let meta = ok(&v4_frame(
            &Ipv4::new(V4_A, V4_B, proto::TCP),
            &synack.bytes(),
        ));
        assert_eq!(meta.tcp_wscale, 7);
    }

    #[test]
    fn tcp_window_scale_above_14_is_clamped_like_the_kernel() {
        let syn = Tcp {
            options: vec![3, 3, 15, 0],
            ..Tcp::new(1, 2, SYN)
        };
        assert_eq!(
            ok(&v4_frame(&Ipv4::new(V4_A, V4_B, proto::TCP), &syn.bytes())).tcp_wscale,
            14
        );
        let syn = Tcp {
            options: vec![3, 3, 0xff, 0],
            ..Tcp::new(1, 2, SYN)
        };
        assert_eq!(
            ok(&v4_frame(&Ipv4::new(V4_A, V4_B, proto::TCP), &syn.bytes())).tcp_wscale,
            14
        );
    }

    #[test]
    fn tcp_syn_without_options_has_no_window_scale() {
        let meta = ok(&v4_frame(
            &Ipv4::new(V4_A, V4_B, proto::TCP),
            &Tcp::new(1, 2, SYN).bytes(),
        ));
        assert_eq!(meta.tcp_wscale, 0xff);
        assert!(!meta.tcp_sack_perm);
    }

    #[test]
    fn malformed_tcp_options_stop_the_scan_without_failing_the_packet() {
        for options in [
            vec![3, 0, 7, 0],                          // size 0
            vec![3, 1, 7, 0],                          // size 1
            vec![8, 40, 0, 0],                         // size beyond the options
            vec![1, 1, 1, 3],                          // kind without room for a size
            vec![0, 3, 3, 7],                          // end of list before the window scale
            vec![1; 40],                               // only NOPs, longer than the scan bound
            vec![4, 2, 3, 3, 7, 0, 0, 0],              // valid SACK-perm then window scale
            vec![5, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], // SACK block on a SYN
        ] {
            let syn = Tcp {
                options: options.clone(),
                ..Tcp::new(1, 2, SYN)
            };
            let meta = ok(&v4_frame(&Ipv4::new(V4_A, V4_B, proto::TCP), &syn.bytes()));
            match options.as_slice() {
                [0, ..] | [3, 0, ..] | [3, 1, ..] => {
                    assert_eq!(meta.tcp_wscale, 0xff, "{options:?}")
                }
                [4, 2, 3, 3, 7, ..] => {
                    assert_eq!(meta.tcp_wscale, 7);
                    assert!(meta.tcp_sack_perm);
                }
                _ => {}
            }
        }
    }

    #[test]
    fn ipv4_header_options_move_the_transport_header() {
        let mut ip = Ipv4::new(V4_A, V4_B, proto::UDP);
        ip.options = vec![0x94, 0x04, 0, 0, 1, 1, 1, 0]; // router alert, NOPs, EOL
        let meta = ok(&v4_frame(&ip, &udp(1111, 2222, 5)));
        assert_eq!((meta.sport, meta.dport), (1111, 2222));
        assert_eq!(meta.payload_len, 5);
        assert_eq!(meta.ip_len, 28 + 13);
        assert_eq!(meta.udp_payload_at as usize, ETH_HLEN + 28 + 8);
    }

    #[test]
    fn the_udp_payload_offset_is_where_the_payload_starts() {
        let common = v4_frame(&Ipv4::new(V4_A, V4_B, proto::UDP), &udp(68, 67, 20));
        assert_eq!(ok(&common).udp_payload_at as usize, ETH_HLEN + 20 + 8);
        let six = v6_frame(&ipv6(v6(1), v6(2), &[], proto::UDP, &udp(546, 547, 20)));
        assert_eq!(ok(&six).udp_payload_at as usize, ETH_HLEN + 40 + 8);
        let opts = ext_opts(0);
        let with_ext = v6_frame(&ipv6(v6(1), v6(2), &[(0, opts)], proto::UDP, &udp(1, 2, 4)));
        assert_eq!(ok(&with_ext).udp_payload_at as usize, ETH_HLEN + 48 + 8);
        // Too far into the frame for a byte: left unread (0).
        let long = ext_opts(30);
        let far = v6_frame(&ipv6(v6(1), v6(2), &[(0, long)], proto::UDP, &udp(1, 2, 4)));
        assert_eq!(ok(&far).udp_payload_at, 0);
        let tcp = v4_frame(
            &Ipv4::new(V4_A, V4_B, proto::TCP),
            &Tcp::new(1, 2, 2).bytes(),
        );
        assert_eq!(ok(&tcp).udp_payload_at, 0);
    }

    #[test]
    fn ipv6_udp_yields_addresses_ports_and_lengths() {
        let frame = v6_frame(&ipv6(v6(1), v6(2), &[], proto::UDP, &udp(5353, 53, 33)));
        let meta = ok(&frame);
        assert_eq!(meta.family, crate::wire::FAMILY_IPV6);
        assert_eq!(meta.proto, proto::UDP);
        assert_eq!((meta.src, meta.dst), (v6(1), v6(2)));
        assert_eq!((meta.sport, meta.dport), (5353, 53));
        assert_eq!(meta.payload_len, 33);
        assert_eq!(meta.ip_len, 40 + 8 + 33);
    }

    #[test]
    fn udp_length_field_bounds_the_payload() {
        let ip = Ipv4::new(V4_A, V4_B, proto::UDP);
        // UDP says 8 + 4 but IP carries 8 + 10 (trailing bytes after the datagram).
        let mut datagram = udp(1, 2, 10);
        datagram[4..6].copy_from_slice(&12u16.to_be_bytes());
        assert_eq!(ok(&v4_frame(&ip, &datagram)).payload_len, 4);
        for bad_len in [0u16, 7, 19, 0xffff] {
            let mut datagram = udp(1, 2, 10);
            datagram[4..6].copy_from_slice(&bad_len.to_be_bytes());
            assert_eq!(
                parsed(&v4_frame(&ip, &datagram)),
                Err(ParseError::Malformed),
                "udp length {bad_len}"
            );
        }
    }

    #[test]
    fn icmp_echo_request_and_reply_carry_the_id_as_sport() {
        let request = ok(&v4_frame(
            &Ipv4::new(V4_A, V4_B, proto::ICMP),
            &icmp(8, 0, [0x12, 0x34, 0, 1], &[0; 8]),
        ));
        assert_eq!(request.icmp_kind, IcmpKind::Request);
        assert_eq!((request.icmp_type, request.icmp_code), (8, 0));
        assert_eq!((request.sport, request.dport), (0x1234, 0));
        assert_eq!(request.payload_len, 8);
        let reply = ok(&v6_frame(&ipv6(
            v6(2),
            v6(1),
            &[],
            proto::ICMPV6,
            &icmp(129, 0, [0xbe, 0xef, 0, 1], &[]),
        )));
        assert_eq!(reply.icmp_kind, IcmpKind::Reply);
        assert_eq!((reply.sport, reply.dport), (0xbeef, 0));
    }

    #[test]
    fn icmp_shorter_than_its_header_is_malformed() {
        let frame = v4_frame(&Ipv4::new(V4_A, V4_B, proto::ICMP), &[8, 0, 0, 0, 0, 1, 0]);
        assert_eq!(parsed(&frame), Err(ParseError::Malformed));
    }

    #[test]
    fn icmpv4_error_exposes_the_embedded_udp_tuple() {
        let quoted = Ipv4::new(V4_A, V4_B, proto::UDP).packet(&udp(40000, 53, 20));
        let frame = v4_frame(
            &Ipv4::new(V4_ROUTER, V4_A, proto::ICMP),
            &icmp(3, 3, [0; 4], &quoted[..28]),
        );
        let meta = ok(&frame);
        assert_eq!(meta.icmp_kind, IcmpKind::Error);
        assert_eq!((meta.icmp_type, meta.icmp_code), (3, 3));
        assert_eq!(meta.inner.proto, proto::UDP);
        assert_eq!(meta.inner.src, ipv4_mapped(V4_A));
        assert_eq!(meta.inner.dst, ipv4_mapped(V4_B));
        assert_eq!((meta.inner.sport, meta.inner.dport), (40000, 53));
        assert_eq!(
            (meta.sport, meta.dport),
            (0, 0),
            "an error has no ports of its own"
        );
    }

    #[test]
    fn icmpv4_error_quoting_tcp_with_only_eight_bytes_is_enough() {
        let quoted = Ipv4::new(V4_A, V4_B, proto::TCP).packet(&Tcp::new(40000, 8080, ACK).bytes());
        let frame = v4_frame(
            &Ipv4::new(V4_ROUTER, V4_A, proto::ICMP),
            &icmp(3, 4, [0, 0, 5, 0xdc], &quoted[..28]),
        );
        let meta = ok(&frame);
        assert_eq!(meta.inner.proto, proto::TCP);
        assert_eq!((meta.inner.sport, meta.inner.dport), (40000, 8080));
        // Seven bytes of transport header are not enough.
        let frame = v4_frame(
            &Ipv4::new(V4_ROUTER, V4_A, proto::ICMP),
            &icmp(3, 4, [0; 4], &quoted[..27]),
        );
        assert_eq!(parsed(&frame), Err(ParseError::Malformed));
    }

    #[test]
    fn icmpv4_error_quoting_a_header_with_options_finds_the_ports() {
        let mut inner = Ipv4::new(V4_A, V4_B, proto::UDP);
        inner.options = vec![1, 1, 1, 1];
        let quoted = inner.packet(&udp(7, 9, 0));
        let meta = ok(&v4_frame(
            &Ipv4::new(V4_ROUTER, V4_A, proto::ICMP),
            &icmp(11, 0, [0; 4], &quoted),
        ));
        assert_eq!((meta.inner.sport, meta.inner.dport), (7, 9));
    }

    #[test]
    fn icmpv4_error_quoting_an_echo_request_keys_on_its_id() {
        let quoted =
            Ipv4::new(V4_A, V4_B, proto::ICMP).packet(&icmp(8, 0, [0x0a, 0x0b, 0, 1], &[]));
        let meta = ok(&v4_frame(
            &Ipv4::new(V4_ROUTER, V4_A, proto::ICMP),
            &icmp(11, 0, [0; 4], &quoted),
        ));
        assert_eq!(meta.inner.proto, proto::ICMP);
        assert_eq!(meta.inner.icmp_kind, IcmpKind::Request);
        assert_eq!((meta.inner.sport, meta.inner.dport), (0x0a0b, 0));
    }

    #[test]
    fn icmpv4_error_quoting_another_error_is_malformed() {
        let inner_error = Ipv4::new(V4_A, V4_B, proto::ICMP).packet(&icmp(3, 1, [0; 4], &[]));
        let frame = v4_frame(
            &Ipv4::new(V4_ROUTER, V4_A, proto::ICMP),
            &icmp(3, 1, [0; 4], &inner_error),
        );
        assert_eq!(parsed(&frame), Err(ParseError::Malformed));
    }

    #[test]
    fn icmpv4_error_with_a_bad_embedded_header_is_malformed() {
        let good = Ipv4::new(V4_A, V4_B, proto::UDP).packet(&udp(1, 2, 0));
        for (what, mutate) in [
            ("version 6", (0usize, 0x65u8)),
            ("ihl 4", (0, 0x44)),
            ("ihl beyond the quote", (0, 0x4f)),
        ] {
            let mut quoted = good.clone();
            quoted[mutate.0] = mutate.1;
            let frame = v4_frame(
                &Ipv4::new(V4_ROUTER, V4_A, proto::ICMP),
                &icmp(3, 3, [0; 4], &quoted),
            );
            assert_eq!(parsed(&frame), Err(ParseError::Malformed), "{what}");
        }
    }

    #[test]
    fn icmpv4_error_quoting_a_non_first_fragment_is_not_parsed() {
        let mut inner = Ipv4::new(V4_A, V4_B, proto::UDP);
        inner.frag = 0x2000 | 185; // MF, offset 1480
        let quoted = inner.packet(&[0x9c, 0x40, 0x00, 0x35, 0, 0, 0, 0]);
        let frame = v4_frame(
            &Ipv4::new(V4_ROUTER, V4_A, proto::ICMP),
            &icmp(11, 1, [0; 4], &quoted),
        );
        assert!(
            parsed(&frame).is_err(),
            "bytes after a non-first fragment's header are not ports"
        );
    }

    #[test]
    fn icmpv6_packet_too_big_exposes_the_embedded_tcp_tuple() {
        let quoted = ipv6(
            v6(1),
            v6(2),
            &[],
            proto::TCP,
            &Tcp::new(40000, 443, ACK).bytes(),
        );
        let frame = v6_frame(&ipv6(
            v6(0xfe),
            v6(1),
            &[],
            proto::ICMPV6,
            &icmp(2, 0, [0, 0, 5, 0], &quoted),
        ));
        let meta = ok(&frame);
        assert_eq!(meta.icmp_kind, IcmpKind::Error);
        assert_eq!(meta.icmp_type, 2);
        assert_eq!(meta.inner.proto, proto::TCP);
        assert_eq!((meta.inner.src, meta.inner.dst), (v6(1), v6(2)));
        assert_eq!((meta.inner.sport, meta.inner.dport), (40000, 443));
    }

    #[test]
    fn icmpv6_error_skips_extension_headers_of_the_embedded_packet() {
        let quoted = ipv6(
            v6(1),
            v6(2),
            &[
                (IPV6_DSTOPTS, ext_opts(0)),
                (IPV6_FRAGMENT, ext_fragment(0, true)),
            ],
            proto::UDP,
            &udp(5000, 6000, 4),
        );
        let frame = v6_frame(&ipv6(
            v6(0xfe),
            v6(1),
            &[],
            proto::ICMPV6,
            &icmp(3, 0, [0; 4], &quoted),
        ));
        let meta = ok(&frame);
        assert_eq!(meta.inner.proto, proto::UDP);
        assert_eq!((meta.inner.sport, meta.inner.dport), (5000, 6000));
    }

    #[test]
    fn icmpv6_error_quoting_an_echo_request_keys_on_its_id() {
        let quoted = ipv6(
            v6(1),
            v6(2),
            &[],
            proto::ICMPV6,
            &icmp(128, 0, [0, 42, 0, 1], &[]),
        );
        let meta = ok(&v6_frame(&ipv6(
            v6(0xfe),
            v6(1),
            &[],
            proto::ICMPV6,
            &icmp(1, 0, [0; 4], &quoted),
        )));
        assert_eq!(meta.inner.icmp_kind, IcmpKind::Request);
        assert_eq!(meta.inner.sport, 42);
    }

    #[test]
    fn icmpv6_error_with_a_short_or_bad_embedded_header_is_malformed() {
        let quoted = ipv6(v6(1), v6(2), &[], proto::UDP, &udp(1, 2, 0));
        let short = v6_frame(&ipv6(
            v6(0xfe),
            v6(1),
            &[],
            proto::ICMPV6,
            &icmp(1, 4, [0; 4], &quoted[..47]),
        ));
        assert_eq!(parsed(&short), Err(ParseError::Malformed));
        let mut bad_version = quoted.clone();
        bad_version[0] = 0x40;
        let frame = v6_frame(&ipv6(
            v6(0xfe),
            v6(1),
            &[],
            proto::ICMPV6,
            &icmp(1, 4, [0; 4], &bad_version),
        ));
        assert_eq!(parsed(&frame), Err(ParseError::Malformed));
    }

    #[test]
    fn icmpv4_kinds_follow_nf_conntrack() {
        for icmp_type in 0..=255u8 {
            let expected = match icmp_type {
                8 | 13 | 15 | 17 => IcmpKind::Request,
                0 | 14 | 16 | 18 => IcmpKind::Reply,
                3 | 4 | 5 | 11 | 12 => IcmpKind::Error,
                _ => IcmpKind::Other,
            };
            assert_eq!(icmpv4_kind(icmp_type), expected, "ICMP type {icmp_type}");
        }
    }

    #[test]
    fn icmpv6_queries_replies_and_common_errors_follow_nf_conntrack() {
        for (icmp_type, expected) in [
            (128, IcmpKind::Request),
            (139, IcmpKind::Request),
            (129, IcmpKind::Reply),
            (140, IcmpKind::Reply),
            (1, IcmpKind::Error),
            (2, IcmpKind::Error),
            (3, IcmpKind::Error),
            (4, IcmpKind::Error),
            (130, IcmpKind::Untracked),
            (131, IcmpKind::Untracked),
            (132, IcmpKind::Untracked),
            (133, IcmpKind::Untracked),
            (134, IcmpKind::Untracked),
            (135, IcmpKind::Untracked),
            (136, IcmpKind::Untracked),
            (143, IcmpKind::Untracked),
            (138, IcmpKind::Other),
            (144, IcmpKind::Other),
            (200, IcmpKind::Other),
            (255, IcmpKind::Other),
        ] {
            assert_eq!(icmpv6_kind(icmp_type), expected, "ICMPv6 type {icmp_type}");
        }
    }

    #[test]
    fn icmpv6_only_the_kernels_noct_types_are_untracked() {
        for icmp_type in [137u8, 141, 142, 153] {
            assert_ne!(
                icmpv6_kind(icmp_type),
                IcmpKind::Untracked,
                "ICMPv6 type {icmp_type}"
            );
        }
    }

    #[test]
    fn icmpv6_every_type_below_128_is_an_error_like_the_kernel() {
        for icmp_type in 0..128u8 {
            assert_eq!(
                icmpv6_kind(icmp_type),
                IcmpKind::Error,
                "ICMPv6 type {icmp_type}"
            );
        }
    }

    #[test]
    fn ipv6_untracked_message_has_no_ports() {
        let ns = ok(&v6_frame(&ipv6(
            v6(1),
            v6(2),
            &[],
            proto::ICMPV6,
            &icmp(135, 0, [0; 4], &v6(2)),
        )));
        assert_eq!(ns.icmp_kind, IcmpKind::Untracked);
        assert_eq!((ns.sport, ns.dport), (0, 0));
    }

    #[test]
    fn other_protocols_parse_with_their_payload_length() {
        let meta = ok(&v4_frame(&Ipv4::new(V4_A, V4_B, 47), &[0u8; 24]));
        assert_eq!(meta.proto, 47);
        assert_eq!(meta.payload_len, 24);
        assert_eq!((meta.sport, meta.dport), (0, 0));
        let meta = ok(&v6_frame(&ipv6(v6(1), v6(2), &[], 59, &[])));
        assert_eq!(meta.proto, 59, "no next header");
        assert_eq!(meta.payload_len, 0);
    }

    #[test]
    fn truncating_a_valid_frame_anywhere_is_malformed_never_a_panic() {
        for frame in valid_frames() {
            for len in 0..frame.len() {
                assert_eq!(
                    parsed(&frame[..len]),
                    Err(ParseError::Malformed),
                    "frame of {} bytes cut to {len}: {:02x?}",
                    frame.len(),
                    &frame[..len]
                );
            }
        }
    }

    #[test]
    fn non_ip_frames_are_not_ip() {
        let arp = ethernet(0x0806, &[0u8; 28]);
        assert_eq!(parsed(&arp), Err(ParseError::NotIp));
        let lldp = ethernet(0x88cc, &[0u8; 40]);
        assert_eq!(parsed(&lldp), Err(ParseError::NotIp));
        assert_eq!(
            parsed(&tagged(&[ETH_P_8021Q], 0x0806, &[0u8; 28])),
            Err(ParseError::NotIp)
        );
        assert_eq!(parsed(&[0u8; 64][..]), Err(ParseError::NotIp));
    }

    #[test]
    fn garbage_after_an_ip_ethertype_is_malformed() {
        for garbage in [[0u8; 60], [0xff; 60], [0x45; 60], [0x60; 60]] {
            for ethertype in [ETH_P_IP, ETH_P_IPV6] {
                let frame = ethernet(ethertype, &garbage);
                assert_eq!(
                    parsed(&frame),
                    Err(ParseError::Malformed),
                    "{ethertype:#x} {:02x}",
                    garbage[0]
                );
            }
        }
    }

    #[test]
    fn ip_version_must_match_the_ethertype() {
        let v4 = Ipv4::new(V4_A, V4_B, proto::UDP).packet(&udp(1, 2, 0));
        let v6_packet = ipv6(v6(1), v6(2), &[], proto::UDP, &udp(1, 2, 0));
        assert_eq!(
            parsed(&ethernet(ETH_P_IPV6, &v4)),
            Err(ParseError::Malformed)
        );
        assert_eq!(
            parsed(&ethernet(ETH_P_IP, &v6_packet)),
            Err(ParseError::Malformed)
        );
    }

    #[test]
    fn one_and_two_vlan_tags_parse_like_an_untagged_frame() {
        let ip = Ipv4::new(V4_A, V4_B, proto::TCP).packet(&syn_with_options().bytes());
        let plain = ok(&ethernet(ETH_P_IP, &ip));
        for tags in [
            &[ETH_P_8021Q][..],
            &[ETH_P_8021AD],
            &[ETH_P_8021AD, ETH_P_8021Q],
            &[ETH_P_8021Q, ETH_P_8021Q],
        ] {
            assert_eq!(ok(&tagged(tags, ETH_P_IP, &ip)), plain, "tags {tags:04x?}");
        }
        let ip6 = ipv6(v6(1), v6(2), &[], proto::UDP, &udp(1, 2, 3));
        let plain6 = ok(&ethernet(ETH_P_IPV6, &ip6));
        let tagged6 = ok(&tagged(&[ETH_P_8021AD, ETH_P_8021Q], ETH_P_IPV6, &ip6));
        // Everything but where the payload lies, which the two tags move by 8 bytes.
        assert_eq!(tagged6.udp_payload_at, plain6.udp_payload_at + 8);
        assert_eq!(
            PacketMeta {
                udp_payload_at: plain6.udp_payload_at,
                ..tagged6
            },
            plain6
        );
    }

    #[test]
    fn three_vlan_tags_are_not_inspected_as_ip() {
        let ip = Ipv4::new(V4_A, V4_B, proto::UDP).packet(&udp(1, 2, 0));
        let frame = tagged(&[ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q], ETH_P_IP, &ip);
        assert_eq!(parsed(&frame), Err(ParseError::NotIp));
    }

    #[test]
    fn ipv6_extension_headers_are_skipped_to_the_transport_header() {
        let tcp = Tcp::new(1234, 80, SYN).bytes();
        for exts in [
            vec![(IPV6_HOPOPTS, ext_opts(0))],
            vec![(IPV6_ROUTING, ext_opts(2))],
            vec![(IPV6_DSTOPTS, ext_opts(1))],
            vec![(IPV6_FRAGMENT, ext_fragment(0, false))],
            vec![(IPV6_AH, ext_ah(3))],
            vec![
                (IPV6_HOPOPTS, ext_opts(0)),
                (IPV6_DSTOPTS, ext_opts(0)),
                (IPV6_ROUTING, ext_opts(0)),
                (IPV6_FRAGMENT, ext_fragment(0, false)),
                (IPV6_AH, ext_ah(1)),
                (IPV6_DSTOPTS, ext_opts(3)),
            ],
        ] {
            let ext_len: usize = exts.iter().map(|(_, body)| body.len()).sum();
            let frame = v6_frame(&ipv6(v6(1), v6(2), &exts, proto::TCP, &tcp));
            assert_eq!(parsed(&frame).map(|_| ()), Ok(()), "{exts:?}");
            let meta = ok(&frame);
            assert_eq!(meta.proto, proto::TCP, "{exts:?}");
            assert_eq!((meta.sport, meta.dport), (1234, 80));
            assert_eq!(meta.tcp_flags, SYN);
            assert_eq!(meta.payload_len, 0);
            assert_eq!(meta.ip_len as usize, 40 + ext_len + 20);
        }
    }

    #[test]
    fn ipv6_non_first_fragment_is_a_fragment() {
        for exts in [
            vec![(IPV6_FRAGMENT, ext_fragment(185, true))],
            vec![(IPV6_FRAGMENT, ext_fragment(1, false))],
            vec![
                (IPV6_HOPOPTS, ext_opts(0)),
                (IPV6_FRAGMENT, ext_fragment(8191, false)),
            ],
        ] {
            let frame = v6_frame(&ipv6(v6(1), v6(2), &exts, proto::UDP, &[0u8; 16]));
            assert_eq!(parsed(&frame), Err(ParseError::Fragment), "{exts:?}");
        }
    }

    #[test]
    fn ipv6_more_extension_headers_than_the_bound_is_malformed() {
        let exts: Vec<(u8, Vec<u8>)> = (0..=MAX_IPV6_EXT_HEADERS)
            .map(|_| (IPV6_DSTOPTS, ext_opts(0)))
            .collect();
        let frame = v6_frame(&ipv6(v6(1), v6(2), &exts, proto::UDP, &udp(1, 2, 0)));
        assert_eq!(parsed(&frame), Err(ParseError::Malformed));
        let exts = &exts[..MAX_IPV6_EXT_HEADERS];
        assert_eq!(
            ok(&v6_frame(&ipv6(
                v6(1),
                v6(2),
                exts,
                proto::UDP,
                &udp(1, 2, 0)
            )))
            .proto,
            proto::UDP
        );
    }

    #[test]
    fn ipv6_extension_header_longer_than_the_payload_is_malformed() {
        let mut packet = ipv6(
            v6(1),
            v6(2),
            &[(IPV6_HOPOPTS, ext_opts(0))],
            proto::UDP,
            &udp(1, 2, 0),
        );
        packet[40 + 1] = 200; // claims 1608 bytes
        packet.resize(packet.len() + 2000, 0); // even with bytes after the packet in the frame
        assert_eq!(parsed(&v6_frame(&packet)), Err(ParseError::Malformed));
    }

    #[test]
    fn ipv6_payload_length_beyond_the_frame_is_malformed() {
        let mut packet = ipv6(v6(1), v6(2), &[], proto::UDP, &udp(1, 2, 0));
        packet[4..6].copy_from_slice(&9u16.to_be_bytes());
        assert_eq!(parsed(&v6_frame(&packet)), Err(ParseError::Malformed));
    }

    #[test]
    fn ipv4_non_first_fragment_is_a_fragment_and_first_fragment_parses() {
        let payload = udp(1, 2, 8);
        for (frag, expected) in [
            (0x0000u16, Ok(())),                      // not fragmented
            (0x4000, Ok(())),                         // DF
            (0x2000, Err(ParseError::FirstFragment)), // first fragment, more to come
            (0x2000 | 185, Err(ParseError::Fragment)),
            (185, Err(ParseError::Fragment)), // last fragment
            (0x1fff, Err(ParseError::Fragment)),
        ] {
            let mut ip = Ipv4::new(V4_A, V4_B, proto::UDP);
            ip.frag = frag;
            assert_eq!(
                parsed(&v4_frame(&ip, &payload)).map(|_| ()),
                expected,
                "frag field {frag:#06x}"
            );
        }
    }

    #[test]
    fn bad_ipv4_header_lengths_are_malformed() {
        let good = Ipv4::new(V4_A, V4_B, proto::UDP).packet(&udp(1, 2, 4));
        for (what, byte, value) in [
            ("ihl 0", 0usize, 0x40u8),
            ("ihl 4", 0, 0x44),
            ("ihl 15 beyond total length", 0, 0x4f),
            ("version 5", 0, 0x55),
        ] {
            let mut packet = good.clone();
            packet[byte] = value;
            assert_eq!(
                parsed(&ethernet(ETH_P_IP, &packet)),
                Err(ParseError::Malformed),
                "{what}"
            );
        }
        for (what, total) in [
            ("total below header", 19u16),
            ("total beyond frame", 33),
            ("total zero", 0),
        ] {
            let mut packet = good.clone();
            packet[2..4].copy_from_slice(&total.to_be_bytes());
            assert_eq!(
                parsed(&ethernet(ETH_P_IP, &packet)),
                Err(ParseError::Malformed),
                "{what}"
            );
        }
    }

    #[test]
    fn bad_tcp_data_offsets_are_malformed() {
        let ip = Ipv4::new(V4_A, V4_B, proto::TCP);
        for doff in [0u8, 1, 4, 6, 15] {
            let segment = Tcp {
                data_offset: Some(doff),
                ..Tcp::new(1, 2, ACK)
            };
            assert_eq!(
                parsed(&v4_frame(&ip, &segment.bytes())),
                Err(ParseError::Malformed),
                "data offset {doff}"
            );
        }
        // A data offset covering payload bytes is fine as long as they are there.
        let segment = Tcp {
            data_offset: Some(6),
            payload: 4,
            ..Tcp::new(1, 2, ACK)
        };
        let meta = ok(&v4_frame(&ip, &segment.bytes()));
        assert_eq!(meta.tcp_header_len, 24);
        assert_eq!(meta.payload_len, 0);
    }

    #[test]
    fn tcp_header_inside_ethernet_padding_but_outside_the_ip_packet_is_malformed() {
        // IP says 20 + 10 bytes, the frame has a full TCP header thanks to padding.
        let mut packet = Ipv4::new(V4_A, V4_B, proto::TCP).packet(&Tcp::new(1, 2, ACK).bytes());
        packet[2..4].copy_from_slice(&30u16.to_be_bytes());
        assert_eq!(
            parsed(&ethernet(ETH_P_IP, &packet)),
            Err(ParseError::Malformed)
        );
    }

    #[test]
    fn parse_resets_fields_left_over_from_a_previous_packet() {
        let mut meta = PacketMeta::default();
        let syn = v4_frame(
            &Ipv4::new(V4_A, V4_B, proto::TCP),
            &syn_with_options().bytes(),
        );
        parse(&syn[..], &mut meta).expect("syn parses");
        let echo = v6_frame(&ipv6(
            v6(1),
            v6(2),
            &[],
            proto::ICMPV6,
            &icmp(128, 0, [0, 1, 0, 1], &[]),
        ));
        parse(&echo[..], &mut meta).expect("echo parses");
        assert_eq!(meta.tcp_flags, 0);
        assert_eq!(meta.tcp_wscale, 0xff);
        assert!(!meta.tcp_sack_perm);
        assert_eq!((meta.seq, meta.ack, meta.window), (0, 0, 0));
        assert_eq!(meta.dport, 0);
    }

    /// A frame without a directly readable head, so that [`parse`] takes its general
    /// path for every frame.
    struct GeneralPath<'a>(&'a [u8]);

    impl PacketBytes for GeneralPath<'_> {
        fn len(&self) -> usize {
            self.0.len()
        }

        fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
            self.0.load(offset)
        }

        fn head<const N: usize>(&self) -> Option<&[u8; N]> {
            None
        }

        fn load_options(
            &self,
            offset: usize,
            len: usize,
            buf: &mut [u8; MAX_TCP_OPTION_BYTES],
        ) -> bool {
            self.0.load_options(offset, len, buf)
        }
    }

    /// Checks what holds for any frame: the common-case path agrees with the general one,
    /// and what holds for any frame the parser accepts.
    fn check_invariants(frame: &[u8]) {
        let mut meta = PacketMeta::default();
        let result = parse(frame, &mut meta);
        let mut general = PacketMeta::default();
        assert_eq!(
            result,
            parse(&GeneralPath(frame), &mut general),
            "{frame:02x?}"
        );
        if result.is_ok() {
            assert_eq!(meta, general, "{frame:02x?}");
            assert!(
                meta.family == crate::wire::FAMILY_IPV4 || meta.family == crate::wire::FAMILY_IPV6
            );
            assert!((meta.ip_len as usize) <= frame.len());
            assert!(meta.payload_len <= meta.ip_len);
            assert!(meta.tcp_wscale == 0xff || meta.tcp_wscale <= 14);
            if meta.proto == proto::TCP {
                assert!(meta.tcp_header_len >= 20 && meta.tcp_header_len <= 60);
            }
        }
    }

    fn arb_valid_frame() -> impl Strategy<Value = Vec<u8>> {
        let frames = valid_frames();
        (0..frames.len()).prop_map(move |i| frames[i].clone())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn parser_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            check_invariants(&bytes);
        }

        #[test]
        fn parser_never_panics_on_arbitrary_bytes_behind_an_ip_ethertype(
            ethertype in prop_oneof![Just(ETH_P_IP), Just(ETH_P_IPV6), Just(ETH_P_8021Q)],
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            check_invariants(&ethernet(ethertype, &bytes));
        }

        #[test]
        fn parser_never_panics_on_mutated_valid_frames(
            frame in arb_valid_frame(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
            extra in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let mut frame = frame;
            for (at, value) in &edits {
                let i = at.index(frame.len());
                frame[i] = *value;
            }
            check_invariants(&frame);
            let cut_at = cut.index(frame.len() + 1);
            check_invariants(&frame[..cut_at]);
            frame.extend_from_slice(&extra);
            check_invariants(&frame);
        }
    }

    /// One packet of a flow and its answer, built as frames: TCP, UDP or an ICMP echo.
    fn flow_pair(
        v6_flow: bool,
        kind: u8,
        a: [u8; 16],
        b: [u8; 16],
        pa: u16,
        pb: u16,
    ) -> (Vec<u8>, Vec<u8>) {
        let (forward, backward) = match kind {
            0 => (
                Tcp::new(pa, pb, SYN).bytes(),
                Tcp::new(pb, pa, SYN | ACK).bytes(),
            ),
            1 => (udp(pa, pb, 3), udp(pb, pa, 7)),
            _ => {
                let (request, reply) = if v6_flow { (128, 129) } else { (8, 0) };
                let [hi, lo] = pa.to_be_bytes();
                (
                    icmp(request, 0, [hi, lo, 0, 1], &[]),
                    icmp(reply, 0, [hi, lo, 0, 1], &[]),
                )
            }
        };
        let protocol = match (kind, v6_flow) {
            (0, _) => proto::TCP,
            (1, _) => proto::UDP,
            (_, false) => proto::ICMP,
            (_, true) => proto::ICMPV6,
        };
        if v6_flow {
            (
                v6_frame(&ipv6(a, b, &[], protocol, &forward)),
                v6_frame(&ipv6(b, a, &[], protocol, &backward)),
            )
        } else {
            let a4 = [a[12], a[13], a[14], a[15]];
            let b4 = [b[12], b[13], b[14], b[15]];
            (
                v4_frame(&Ipv4::new(a4, b4, protocol), &forward),
                v4_frame(&Ipv4::new(b4, a4, protocol), &backward),
            )
        }
    }

    proptest! {
        #[test]
        fn flow_key_of_a_parsed_answer_equals_the_key_of_the_parsed_packet(
            v6_flow in any::<bool>(),
            kind in 0u8..3,
            a in any::<[u8; 16]>(),
            b in any::<[u8; 16]>(),
            pa in any::<u16>(),
            pb in any::<u16>(),
        ) {
            let (forward, backward) = flow_pair(v6_flow, kind, a, b, pa, pb);
            let there = ok(&forward);
            let back = ok(&backward);
            let (key_there, lo_there) = crate::track::flow_key(&there);
            let (key_back, lo_back) = crate::track::flow_key(&back);
            prop_assert_eq!(key_there, key_back);
            if there.src != there.dst {
                prop_assert_ne!(lo_there, lo_back);
            }
        }
    }

    // ---- fragments ----

    /// An IPv4 fragment: `frag` is the flags/offset word, `id` the identification, and
    /// `payload` the fragment's bytes of the datagram.
    fn v4_fragment(id: u16, frag: u16, protocol: u8, payload: &[u8]) -> Vec<u8> {
        let mut packet = Ipv4 {
            frag,
            ..Ipv4::new(V4_A, V4_B, protocol)
        }
        .packet(payload);
        packet[4..6].copy_from_slice(&id.to_be_bytes());
        ethernet(ETH_P_IP, &packet)
    }

    /// A UDP datagram of `len` payload bytes, header included, as fragments cut it.
    fn udp_datagram(len: usize) -> Vec<u8> {
        udp(5353, 40000, len)
    }

    #[test]
    fn an_ipv4_first_fragment_parses_in_full_with_the_datagrams_udp_length() {
        let datagram = udp_datagram(2992);
        let (result, meta) = parse_any(&v4_fragment(0x4242, 0x2000, proto::UDP, &datagram[..1480]));
        assert_eq!(result, Err(ParseError::FirstFragment));
        assert_eq!((meta.sport, meta.dport), (5353, 40000));
        assert_eq!(
            meta.payload_len, 2992,
            "the datagram's payload, from the UDP length"
        );
        assert_eq!(meta.ip_len, 1500);
        assert_eq!(meta.fragment, fragment_flags::FIRST | fragment_flags::MORE);
        assert_eq!(
            (meta.frag_id, meta.frag_offset, meta.frag_proto),
            (0x4242, 0, proto::UDP)
        );
    }

    #[test]
    fn an_ipv4_later_fragment_gives_its_datagrams_identity_and_offset() {
        let datagram = udp_datagram(2992);
        for (word, flags) in [
            (0x2000 | 185, fragment_flags::LATER | fragment_flags::MORE),
            (185, fragment_flags::LATER),
        ] {
            let (result, meta) = parse_any(&v4_fragment(
                0x4242,
                word,
                proto::UDP,
                &datagram[1480..2960],
            ));
            assert_eq!(result, Err(ParseError::Fragment));
            assert_eq!(meta.fragment, flags);
            assert_eq!((meta.frag_id, meta.frag_offset), (0x4242, 1480));
            assert_eq!((meta.family, meta.frag_proto), (FAMILY_IPV4, proto::UDP));
            assert_eq!(meta.src, ipv4_mapped(V4_A));
            assert_eq!(meta.dst, ipv4_mapped(V4_B));
            assert_eq!(
                (meta.sport, meta.dport),
                (0, 0),
                "a later fragment has no ports"
            );
            assert_eq!(meta.payload_len, 1480);
            assert_eq!(meta.ip_len, 1500);
        }
    }

    #[test]
    fn a_first_fragment_too_short_for_its_transport_header_is_a_tiny_fragment() {
        let tcp = Tcp {
            options: vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
            ..Tcp::new(1234, 22, ACK)
        }
        .bytes();
        for (what, protocol, payload) in [
            ("8 bytes of a TCP header", proto::TCP, tcp[..8].to_vec()),
            ("16 bytes of a TCP header", proto::TCP, tcp[..16].to_vec()),
            (
                "TCP header without its options",
                proto::TCP,
                tcp[..24].to_vec(),
            ),
            (
                "4 bytes of a UDP header",
                proto::UDP,
                udp(1, 2, 0)[..4].to_vec(),
            ),
            ("4 bytes of an ICMP header", proto::ICMP, vec![8, 0, 0, 0]),
        ] {
            let (result, _) = parse_any(&v4_fragment(7, 0x2000, protocol, &payload));
            assert_eq!(result, Err(ParseError::TinyFragment), "{what}");
        }
        let (result, meta) = parse_any(&v4_fragment(7, 0x2000, proto::TCP, &tcp));
        assert_eq!(
            result,
            Err(ParseError::FirstFragment),
            "the whole TCP header"
        );
        assert_eq!(meta.tcp_header_len, 32);
        let (result, _) = parse_any(&v4_fragment(7, 0x2000, 47, &[0; 4]));
        assert_eq!(
            result,
            Err(ParseError::FirstFragment),
            "GRE needs no header here"
        );
    }

    #[test]
    fn an_ipv6_fragment_header_after_other_extension_headers_is_found() {
        let datagram = udp_datagram(3000);
        let before = [(IPV6_HOPOPTS, ext_opts(0)), (IPV6_DSTOPTS, ext_opts(1))];
        let mut first = before.to_vec();
        first.push((IPV6_FRAGMENT, ext_fragment(0, true)));
        let frame = v6_frame(&ipv6(v6(1), v6(2), &first, proto::UDP, &datagram[..1200]));
        let (result, meta) = parse_any(&frame);
        assert_eq!(result, Err(ParseError::FirstFragment));
        assert_eq!(
            (meta.sport, meta.dport, meta.payload_len),
            (5353, 40000, 3000)
        );
        assert_eq!(meta.fragment, fragment_flags::FIRST | fragment_flags::MORE);
        assert_eq!((meta.frag_id, meta.frag_proto), (0xdead_beef, proto::UDP));
        let mut later = before.to_vec();
        later.push((IPV6_FRAGMENT, ext_fragment(150, false)));
        let frame = v6_frame(&ipv6(
            v6(1),
            v6(2),
            &later,
            proto::UDP,
            &datagram[1200..2400],
        ));
        let (result, meta) = parse_any(&frame);
        assert_eq!(result, Err(ParseError::Fragment));
        assert_eq!(meta.fragment, fragment_flags::LATER);
        assert_eq!((meta.frag_id, meta.frag_offset), (0xdead_beef, 1200));
        assert_eq!((meta.family, meta.frag_proto), (FAMILY_IPV6, proto::UDP));
        assert_eq!(meta.payload_len, 1200);
        assert_eq!(meta.src, v6(1));
    }

    #[test]
    fn an_ipv6_first_fragment_names_the_protocol_of_its_fragment_header() {
        // A destination options header after the fragment header (allowed, if rare): the
        // transport is UDP, but every fragment's header names the options header.
        let exts = [
            (IPV6_FRAGMENT, ext_fragment(0, true)),
            (IPV6_DSTOPTS, ext_opts(0)),
        ];
        let frame = v6_frame(&ipv6(v6(1), v6(2), &exts, proto::UDP, &udp(1, 2, 64)));
        let (result, meta) = parse_any(&frame);
        assert_eq!(result, Err(ParseError::FirstFragment));
        assert_eq!((meta.proto, meta.frag_proto), (proto::UDP, IPV6_DSTOPTS));
    }

    #[test]
    fn truncated_fragments_are_malformed() {
        let datagram = udp_datagram(2992);
        let frame = v4_fragment(9, 185, proto::UDP, &datagram[1480..2960]);
        assert_eq!(
            parse_any(&frame[..frame.len() - 1]).0,
            Err(ParseError::Malformed)
        );
        // An IPv6 fragment header cut short, or claiming more than the payload holds.
        let frame = v6_frame(&ipv6(
            v6(1),
            v6(2),
            &[(IPV6_FRAGMENT, ext_fragment(9, false))],
            17,
            &[],
        ));
        assert_eq!(
            parse_any(&frame[..frame.len() - 2]).0,
            Err(ParseError::Malformed)
        );
        let frame = v6_frame(&ipv6(
            v6(1),
            v6(2),
            &[
                (IPV6_FRAGMENT, ext_fragment(0, true)),
                (IPV6_FRAGMENT, ext_fragment(0, true)),
            ],
            17,
            &udp(1, 2, 8),
        ));
        assert_eq!(
            parse_any(&frame).0,
            Err(ParseError::Malformed),
            "two fragment headers"
        );
    }

    #[test]
    fn an_icmpv6_error_quoting_a_later_fragment_is_malformed() {
        let quoted = ipv6(
            v6(1),
            v6(2),
            &[(IPV6_FRAGMENT, ext_fragment(10, true))],
            proto::UDP,
            &[0; 16],
        );
        let frame = v6_frame(&ipv6(
            v6(0xfe),
            v6(1),
            &[],
            proto::ICMPV6,
            &icmp(1, 0, [0; 4], &quoted),
        ));
        assert_eq!(parse_any(&frame).0, Err(ParseError::Malformed));
    }

    proptest! {
        /// Any cut of a fragmented datagram at any 8-byte boundary parses to the
        /// fragment's identity, and its first fragment to the flow; never a panic.
        #[test]
        fn fragments_of_any_cut_parse_to_their_datagram(
            len in 16usize..4000,
            cut in 1usize..500,
            id in any::<u16>(),
        ) {
            let datagram = udp_datagram(len);
            let cut = (cut * 8).min(datagram.len() - 1) / 8 * 8;
            prop_assume!(cut >= 8);
            let (result, meta) = parse_any(&v4_fragment(id, 0x2000, proto::UDP, &datagram[..cut]));
            prop_assert_eq!(result, Err(ParseError::FirstFragment));
            prop_assert_eq!((meta.sport, meta.frag_id), (5353, id as u32));
            let word = (cut / 8) as u16;
            let (result, meta) = parse_any(&v4_fragment(id, word, proto::UDP, &datagram[cut..]));
            prop_assert_eq!(result, Err(ParseError::Fragment));
            prop_assert_eq!((meta.frag_offset as usize, meta.frag_id), (cut, id as u32));
        }
    }
}
