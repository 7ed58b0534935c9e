//! Structural mutations of well-formed frames, for the differential run of the kernel
//! path against the host model: the parser's edge cases (headers cut short, lengths and
//! offsets that lie, IPv6 extension chains, ICMP errors quoting nonsense, every TCP flag
//! combination) are where the verifier-shaped eBPF code and the host build of the same
//! engine are most likely to part ways.
//!
//! Every mutation takes an untagged Ethernet frame as [`crate::frames`] builds it and a
//! source of random numbers, and returns the mutated frame, or `None` when the frame is
//! not of the kind the mutation needs (a TCP mutation of a UDP frame, say).

use std::net::IpAddr;

use session_common::wire::proto;

use crate::frames;

const ETHERNET_LEN: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];
const IPV6_HEADER_LEN: usize = 40;

/// One kind of structural damage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mutation {
    /// The frame cut somewhere inside its IP or transport header.
    TruncatedHeaders,
    /// An IPv4 header length (IHL) other than the real one, 0 to 15.
    BadIhl,
    /// An IPv4 total length or IPv6 payload length that disagrees with the frame.
    BadLength,
    /// A TCP data offset other than the real one, 0 to 15.
    BadDataOffset,
    /// A random TCP flags byte: over many frames, every one of the 256 combinations.
    TcpFlags,
    /// A chain of one to six IPv6 extension headers (hop-by-hop, routing, destination
    /// options, fragment, AH, no-next-header) before the transport header, sometimes
    /// with lying lengths or cut short.
    Ipv6ExtensionChain,
    /// An ICMP or ICMPv6 error quoting a damaged packet: cut short, with a bad header
    /// length, of the other family, or itself an ICMP error.
    BogusIcmpError,
    /// The packet as one fragment of a datagram of a few ids: its first (cut at a random
    /// 8-byte boundary, sometimes inside the transport header), or a later one at a
    /// random offset (sometimes inside the transport header), so that first and later
    /// fragments of the same datagrams meet.
    Fragment,
}

impl Mutation {
    /// Every mutation, for picking one at random and for reports.
    pub const ALL: [Mutation; 8] = [
        Mutation::TruncatedHeaders,
        Mutation::BadIhl,
        Mutation::BadLength,
        Mutation::BadDataOffset,
        Mutation::TcpFlags,
        Mutation::Ipv6ExtensionChain,
        Mutation::BogusIcmpError,
        Mutation::Fragment,
    ];

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Mutation::TruncatedHeaders => "truncated-headers",
            Mutation::BadIhl => "bad-ihl",
            Mutation::BadLength => "bad-length",
            Mutation::BadDataOffset => "bad-data-offset",
            Mutation::TcpFlags => "tcp-flags",
            Mutation::Ipv6ExtensionChain => "ipv6-extension-chain",
            Mutation::BogusIcmpError => "bogus-icmp-error",
            Mutation::Fragment => "fragment",
        }
    }

    /// `frame` with this damage, drawing choices from `rng`; `None` if the frame is not
    /// of the kind this mutation applies to.
    pub fn apply(self, frame: &[u8], rng: &mut dyn FnMut() -> u64) -> Option<Vec<u8>> {
        let ip = IpView::of(frame)?;
        let mut out = frame.to_vec();
        match self {
            Mutation::TruncatedHeaders => {
                let headers = ip.l4 + ip.l4_header_len(frame) - ETHERNET_LEN;
                out.truncate(ETHERNET_LEN + below(rng, headers as u64) as usize);
            }
            Mutation::BadIhl => {
                if ip.v6 {
                    return None;
                }
                let ihl = (5 + 1 + below(rng, 15)) as u8 % 16;
                out[ETHERNET_LEN] = 0x40 | ihl;
            }
            Mutation::BadLength => {
                let real = (frame.len() - ETHERNET_LEN) as u64;
                let header = (ip.l4 - ETHERNET_LEN) as u64;
                let lie = match below(rng, 5) {
                    0 => 0,
                    1 => header.saturating_sub(1 + below(rng, header)),
                    2 => real + 1 + below(rng, 64),
                    3 => 0xffff,
                    _ => below(rng, 0x1_0000),
                };
                let (at, value) = if ip.v6 {
                    (ETHERNET_LEN + 4, lie.saturating_sub(IPV6_HEADER_LEN as u64))
                } else {
                    (ETHERNET_LEN + 2, lie)
                };
                out[at..at + 2].copy_from_slice(&(value.min(0xffff) as u16).to_be_bytes());
            }
            Mutation::BadDataOffset => {
                if ip.proto != proto::TCP || frame.len() < ip.l4 + 20 {
                    return None;
                }
                let real = frame[ip.l4 + 12] >> 4;
                let offset = (u64::from(real) + 1 + below(rng, 15)) as u8 % 16;
                out[ip.l4 + 12] = (offset << 4) | (frame[ip.l4 + 12] & 0x0f);
            }
            Mutation::TcpFlags => {
                if ip.proto != proto::TCP || frame.len() < ip.l4 + 20 {
                    return None;
                }
                out[ip.l4 + 13] = rng() as u8;
            }
            Mutation::Ipv6ExtensionChain => {
                if !ip.v6 {
                    return None;
                }
                out = extension_chain(frame, ip.proto, rng);
            }
            Mutation::BogusIcmpError => out = bogus_icmp_error(frame, &ip, rng)?,
            Mutation::Fragment => out = fragment(frame, &ip, rng)?,
        }
        Some(out)
    }
}

/// The random numbers of the randomised tests (splitmix64): small, fast, and the same
/// sequence on every machine, so a failure names a seed that reproduces it.
pub struct Rng(u64);

impl Rng {
    /// The sequence of `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// One of `items`, uniformly.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Uniform in `0..n`; 0 when `n` is 0.
fn below(rng: &mut dyn FnMut() -> u64, n: u64) -> u64 {
    if n == 0 { 0 } else { rng() % n }
}

/// Where the IP and transport headers of an untagged frame are.
struct IpView {
    v6: bool,
    /// Offset of the transport header in the frame.
    l4: usize,
    /// Transport protocol (IPv4 protocol, or IPv6 next header).
    proto: u8,
}

impl IpView {
    fn of(frame: &[u8]) -> Option<IpView> {
        let ip = frame.get(ETHERNET_LEN..)?;
        match frame.get(12..14)? {
            t if t == ETHERTYPE_IPV4 && ip.len() >= 20 && ip[0] >> 4 == 4 => {
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                (ihl >= 20 && ip.len() >= ihl).then_some(IpView {
                    v6: false,
                    l4: ETHERNET_LEN + ihl,
                    proto: ip[9],
                })
            }
            t if t == ETHERTYPE_IPV6 && ip.len() >= IPV6_HEADER_LEN && ip[0] >> 4 == 6 => {
                Some(IpView {
                    v6: true,
                    l4: ETHERNET_LEN + IPV6_HEADER_LEN,
                    proto: ip[6],
                })
            }
            _ => None,
        }
    }

    /// Length of the transport header present in `frame` (what a parser must read).
    fn l4_header_len(&self, frame: &[u8]) -> usize {
        let wanted = match self.proto {
            proto::TCP => 20,
            proto::UDP | proto::ICMP | proto::ICMPV6 => 8,
            _ => 4,
        };
        wanted.min(frame.len() - self.l4)
    }

    fn addresses(&self, frame: &[u8]) -> (IpAddr, IpAddr) {
        let ip = &frame[ETHERNET_LEN..];
        if self.v6 {
            let src: [u8; 16] = ip[8..24].try_into().expect("16 bytes");
            let dst: [u8; 16] = ip[24..40].try_into().expect("16 bytes");
            (IpAddr::from(src), IpAddr::from(dst))
        } else {
            let src: [u8; 4] = ip[12..16].try_into().expect("4 bytes");
            let dst: [u8; 4] = ip[16..20].try_into().expect("4 bytes");
            (IpAddr::from(src), IpAddr::from(dst))
        }
    }
}

/// `frame`'s transport bytes as one fragment (see [`Mutation::Fragment`]).
fn fragment(frame: &[u8], ip: &IpView, rng: &mut dyn FnMut() -> u64) -> Option<Vec<u8>> {
    let data = frame.get(ip.l4..)?;
    if data.is_empty() {
        return None;
    }
    let (src, dst) = ip.addresses(frame);
    let id = below(rng, 4) as u32;
    let out = if rng().is_multiple_of(2) {
        let cut = (8 * (1 + below(rng, 8)) as usize).min(data.len());
        frames::fragment(src, dst, ip.proto, id, 0, true, &data[..cut])
    } else {
        let offset = 8 * (1 + below(rng, 8)) as usize;
        frames::fragment(
            src,
            dst,
            ip.proto,
            id,
            offset,
            rng().is_multiple_of(2),
            data,
        )
    };
    Some(out)
}

/// The IPv6 extension headers the chain draws from: hop-by-hop, routing, destination
/// options, fragment, AH and "no next header".
const EXTENSIONS: [u8; 6] = [0, 43, 60, 44, 51, 59];

/// `frame` (IPv6, transport `last`) with a random chain of extension headers inserted
/// after the fixed header; the payload length usually matches, and one chain in ten is
/// cut short.
fn extension_chain(frame: &[u8], last: u8, rng: &mut dyn FnMut() -> u64) -> Vec<u8> {
    let count = 1 + below(rng, 6) as usize;
    let kinds: Vec<u8> = (0..count)
        .map(|_| EXTENSIONS[below(rng, EXTENSIONS.len() as u64) as usize])
        .collect();
    let mut chain = Vec::new();
    for (i, &kind) in kinds.iter().enumerate() {
        let next = kinds.get(i + 1).copied().unwrap_or(last);
        match kind {
            44 => {
                let offset_flags: u16 = match below(rng, 3) {
                    0 => 0,
                    1 => 1,
                    _ => 185 << 3,
                };
                chain.extend_from_slice(&[next, 0]);
                chain.extend_from_slice(&offset_flags.to_be_bytes());
                chain.extend_from_slice(&(rng() as u32).to_be_bytes());
            }
            51 => {
                let words = 1 + below(rng, 4) as usize;
                let len = (words + 2) * 4;
                chain.extend_from_slice(&[next, words as u8]);
                chain.resize(chain.len() + len - 2, 0);
            }
            _ => {
                let units = below(rng, 4) as usize;
                chain.extend_from_slice(&[next, units as u8]);
                // PadN filling the rest of the header.
                let rest = (units + 1) * 8 - 2;
                chain.extend_from_slice(&[1, (rest - 2) as u8]);
                chain.resize(chain.len() + rest - 2, 0);
            }
        }
    }
    let ip_start = ETHERNET_LEN;
    let mut out = frame[..ip_start + IPV6_HEADER_LEN].to_vec();
    out[ip_start + 6] = kinds[0];
    out.extend_from_slice(&chain);
    out.extend_from_slice(&frame[ip_start + IPV6_HEADER_LEN..]);
    let payload = out.len() - ip_start - IPV6_HEADER_LEN;
    out[ip_start + 4..ip_start + 6].copy_from_slice(&(payload.min(0xffff) as u16).to_be_bytes());
    if below(rng, 10) == 0 {
        let keep = ip_start + IPV6_HEADER_LEN + below(rng, chain.len() as u64) as usize;
        out.truncate(keep);
    }
    out
}

/// An ICMP error from the destination of `frame`'s packet to its source, quoting a
/// damaged copy of that packet.
fn bogus_icmp_error(frame: &[u8], ip: &IpView, rng: &mut dyn FnMut() -> u64) -> Option<Vec<u8>> {
    let (src, dst) = ip.addresses(frame);
    let mut quoted = frame[ETHERNET_LEN..].to_vec();
    match below(rng, 5) {
        // Cut inside the quoted headers.
        0 => quoted.truncate(below(rng, (ip.l4 - ETHERNET_LEN + 8) as u64) as usize),
        // A quoted IPv4 header length that lies.
        1 if !ip.v6 => quoted[0] = 0x40 | below(rng, 16) as u8,
        // A quoted packet of the other family.
        2 => {
            let other: Vec<u8> = if ip.v6 {
                frames::ip_packet(
                    IpAddr::from([198, 18, 0, 1]),
                    IpAddr::from([198, 18, 0, 2]),
                    proto::UDP,
                    &frames::udp(53, 53, 8).1,
                )
            } else {
                frames::ip_packet(
                    "2001:2::1".parse().expect("literal"),
                    "2001:2::2".parse().expect("literal"),
                    proto::UDP,
                    &frames::udp(53, 53, 8).1,
                )
            };
            quoted = other;
        }
        // An error quoting an error about the packet.
        3 => {
            let inner = frames::icmp_error(dst, src, if ip.v6 { 1 } else { 3 }, 3, &quoted);
            quoted = inner[ETHERNET_LEN..].to_vec();
        }
        // A quoted transport header cut to 1..7 bytes.
        _ => quoted.truncate(ip.l4 - ETHERNET_LEN + 1 + below(rng, 7) as usize),
    }
    let (icmp_type, code) = if ip.v6 {
        [(1u8, 4u8), (1, 0), (2, 0), (3, 0), (4, 0)][below(rng, 5) as usize]
    } else {
        [(3u8, 3u8), (3, 4), (11, 0), (12, 0), (5, 1)][below(rng, 5) as usize]
    };
    Some(frames::icmp_error(dst, src, icmp_type, code, &quoted))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::{Tcp, tcp_flags};

    /// A fixed sequence, enough for deterministic unit tests.
    fn counter_rng() -> impl FnMut() -> u64 {
        let mut n = 0u64;
        move || {
            n = n
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            n >> 11
        }
    }

    fn syn(src: &str, dst: &str) -> Vec<u8> {
        frames::frame(
            src.parse().unwrap(),
            dst.parse().unwrap(),
            frames::tcp(Tcp::new(40000, 8080, tcp_flags::SYN)),
        )
    }

    #[test]
    fn every_mutation_changes_a_frame_it_applies_to_and_skips_others() {
        let mut rng = counter_rng();
        let v4 = syn("198.18.0.1", "198.18.0.2");
        let v6 = syn("2001:2::1", "2001:2::2");
        for mutation in Mutation::ALL {
            for frame in [&v4, &v6] {
                if let Some(out) = mutation.apply(frame, &mut rng) {
                    assert_ne!(&out, frame, "{} left the frame as it was", mutation.name());
                }
            }
        }
        assert_eq!(Mutation::BadIhl.apply(&v6, &mut rng), None);
        assert_eq!(Mutation::Ipv6ExtensionChain.apply(&v4, &mut rng), None);
        let udp = frames::frame(
            "198.18.0.1".parse().unwrap(),
            "198.18.0.2".parse().unwrap(),
            frames::udp(1, 2, 0),
        );
        assert_eq!(Mutation::TcpFlags.apply(&udp, &mut rng), None);
        assert_eq!(Mutation::TruncatedHeaders.apply(&[0; 10], &mut rng), None);
    }

    #[test]
    fn truncation_cuts_inside_the_headers() {
        let mut rng = counter_rng();
        let frame = syn("198.18.0.1", "198.18.0.2");
        for _ in 0..100 {
            let out = Mutation::TruncatedHeaders.apply(&frame, &mut rng).unwrap();
            assert!(out.len() >= ETHERNET_LEN && out.len() < ETHERNET_LEN + 20 + 20);
        }
    }

    #[test]
    fn an_extension_chain_that_is_not_cut_leads_to_the_original_transport_header() {
        let mut rng = counter_rng();
        let frame = syn("2001:2::1", "2001:2::2");
        let tcp = &frame[ETHERNET_LEN + IPV6_HEADER_LEN..];
        let mut whole = 0;
        for _ in 0..200 {
            let out = Mutation::Ipv6ExtensionChain
                .apply(&frame, &mut rng)
                .unwrap();
            let ip = &out[ETHERNET_LEN..];
            let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if payload != ip.len() - IPV6_HEADER_LEN {
                continue; // cut short on purpose
            }
            whole += 1;
            let (mut next, mut at) = (ip[6], IPV6_HEADER_LEN);
            while next != proto::TCP {
                assert!(EXTENSIONS.contains(&next), "unexpected header {next}");
                let len = match next {
                    44 => 8,
                    51 => (usize::from(ip[at + 1]) + 2) * 4,
                    _ => (usize::from(ip[at + 1]) + 1) * 8,
                };
                next = ip[at];
                at += len;
            }
            assert_eq!(&ip[at..], tcp);
        }
        assert!(whole > 150, "most chains are whole: {whole} of 200");
    }

    #[test]
    fn flag_mutation_covers_every_combination() {
        let mut rng = counter_rng();
        let frame = syn("198.18.0.1", "198.18.0.2");
        let mut seen = [false; 256];
        for _ in 0..5000 {
            let out = Mutation::TcpFlags.apply(&frame, &mut rng).unwrap();
            seen[usize::from(out[ETHERNET_LEN + 20 + 13])] = true;
        }
        assert!(
            seen.iter().all(|&s| s),
            "some flag combination never came up"
        );
    }

    #[test]
    fn a_bogus_icmp_error_goes_back_to_the_sender() {
        let mut rng = counter_rng();
        let frame = syn("198.18.0.1", "198.18.0.2");
        for _ in 0..50 {
            let out = Mutation::BogusIcmpError.apply(&frame, &mut rng).unwrap();
            let ip = &out[ETHERNET_LEN..];
            assert_eq!(ip[9], proto::ICMP);
            assert_eq!(&ip[12..16], &[198, 18, 0, 2]);
            assert_eq!(&ip[16..20], &[198, 18, 0, 1]);
        }
    }
}
