//! Hand-built frames and a packet socket to send and capture them.
//!
//! Some packets the tests need (a stray ACK, a segment far outside the window, an ICMP
//! reply or error about nothing) are ones no socket API will send, so the test builds the Ethernet frame itself and writes it to
//! an `AF_PACKET` socket bound to a lab veth. The same socket also captures what the real
//! stacks send on that link, which is how a test learns the sequence numbers of a live
//! connection before injecting into it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::{Lab, Side};

/// TCP flag bits, for [`TcpSegment::flags`].
pub mod flags {
    /// No more data from the sender.
    pub const FIN: u8 = 0x01;
    /// Synchronise sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push.
    pub const PSH: u8 = 0x08;
    /// The acknowledgement number is valid.
    pub const ACK: u8 = 0x10;
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;
const TCP_HEADER_LEN: usize = 20;

/// One TCP segment without options: what a test injects, or what it captured (options of
/// captured segments are skipped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSegment {
    /// Sender address and port.
    pub src: SocketAddr,
    /// Receiver address and port.
    pub dst: SocketAddr,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// Flag bits ([`flags`]).
    pub flags: u8,
    /// Advertised window (unscaled, as on the wire).
    pub window: u16,
    /// Payload.
    pub payload: Vec<u8>,
}

impl TcpSegment {
    /// Sequence space the segment occupies: its payload, plus one each for SYN and FIN.
    pub fn seq_len(&self) -> u32 {
        let mut len = self.payload.len() as u32;
        if self.flags & flags::SYN != 0 {
            len += 1;
        }
        if self.flags & flags::FIN != 0 {
            len += 1;
        }
        len
    }

    /// The sequence number after this segment.
    pub fn seq_end(&self) -> u32 {
        self.seq.wrapping_add(self.seq_len())
    }

    /// The segment as an Ethernet frame from `src_mac` to `dst_mac`, with correct IP and
    /// TCP checksums (the kernel would drop it before conntrack otherwise) and, for IPv4,
    /// DF set.
    pub fn frame(&self, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
        ethernet(src_mac, dst_mac, &self.packet())
    }

    /// The segment as an IP packet (no Ethernet header), checksums filled in.
    pub fn packet(&self) -> Vec<u8> {
        let mut tcp = Vec::with_capacity(TCP_HEADER_LEN + self.payload.len());
        tcp.extend_from_slice(&self.src.port().to_be_bytes());
        tcp.extend_from_slice(&self.dst.port().to_be_bytes());
        tcp.extend_from_slice(&self.seq.to_be_bytes());
        tcp.extend_from_slice(&self.ack.to_be_bytes());
        tcp.push((TCP_HEADER_LEN as u8 / 4) << 4);
        tcp.push(self.flags);
        tcp.extend_from_slice(&self.window.to_be_bytes());
        tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        tcp.extend_from_slice(&self.payload);
        ip_packet(self.src.ip(), self.dst.ip(), PROTO_TCP, tcp)
    }

    /// The TCP segment in an untagged Ethernet frame, if it is one (IPv4 without
    /// fragmentation, or IPv6 with TCP as the first next header).
    pub fn parse(frame: &[u8]) -> Option<TcpSegment> {
        let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
        let ip = frame.get(14..)?;
        let (src, dst, tcp) = match ethertype {
            ETHERTYPE_IPV4 => {
                let ihl = usize::from(ip.first()? & 0x0f) * 4;
                let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
                let fragment = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x3fff;
                if *ip.get(9)? != PROTO_TCP || fragment != 0 || ihl < 20 {
                    return None;
                }
                let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
                let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
                // A GSO packet captured on the way out may carry 0 as its total length.
                let end = if total >= ihl {
                    total.min(ip.len())
                } else {
                    ip.len()
                };
                (IpAddr::from(src), IpAddr::from(dst), ip.get(ihl..end)?)
            }
            ETHERTYPE_IPV6 => {
                if *ip.get(6)? != PROTO_TCP {
                    return None;
                }
                let payload = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
                let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
                let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
                let end = if payload == 0 {
                    ip.len()
                } else {
                    (40 + payload).min(ip.len())
                };
                (IpAddr::from(src), IpAddr::from(dst), ip.get(40..end)?)
            }
            _ => return None,
        };
        let word = |at: usize| -> Option<u32> {
            Some(u32::from_be_bytes(tcp.get(at..at + 4)?.try_into().ok()?))
        };
        let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
        Some(TcpSegment {
            src: SocketAddr::new(src, u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?])),
            dst: SocketAddr::new(dst, u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?])),
            seq: word(4)?,
            ack: word(8)?,
            flags: *tcp.get(13)?,
            window: u16::from_be_bytes([*tcp.get(14)?, *tcp.get(15)?]),
            payload: tcp.get(data_offset..)?.to_vec(),
        })
    }
}

/// A UDP datagram from `src` to `dst` as an IP packet, checksums filled in, for the
/// quoted packet of a forged ICMP error.
pub fn udp_packet(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut udp = Vec::with_capacity(8 + payload.len());
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    ip_packet(src.ip(), dst.ip(), PROTO_UDP, udp)
}

/// An ICMP (IPv4) or ICMPv6 (IPv6) message from `src` to `dst` as an IP packet:
/// `icmp_type`, `code`, the 4-byte `rest` of the header (echo id and sequence, or the
/// unused word of an error), then `body` (echo data, or the quoted packet of an error).
pub fn icmp_packet(
    src: IpAddr,
    dst: IpAddr,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    body: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![icmp_type, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(body);
    let proto = if src.is_ipv4() {
        PROTO_ICMP
    } else {
        PROTO_ICMPV6
    };
    ip_packet(src, dst, proto, icmp)
}

/// `packet` in an Ethernet frame from `src_mac` to `dst_mac`, its ethertype taken from
/// the IP version.
pub fn ethernet(src_mac: [u8; 6], dst_mac: [u8; 6], packet: &[u8]) -> Vec<u8> {
    let ethertype = match packet.first().map(|b| b >> 4) {
        Some(4) => ETHERTYPE_IPV4,
        Some(6) => ETHERTYPE_IPV6,
        other => panic!("not an IP packet (version {other:?})"),
    };
    let mut frame = Vec::with_capacity(14 + packet.len());
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(packet);
    frame
}

/// An IPv4 (DF set, TTL 64) or IPv6 (hop limit 64, no extension header) packet carrying
/// `l4` as protocol `proto`, with the IPv4 header checksum and the transport checksum of
/// TCP, UDP, ICMP or ICMPv6 computed; the checksum field in `l4` must be zero.
pub fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, mut l4: Vec<u8>) -> Vec<u8> {
    let len = l4.len();
    let (mut header, pseudo) = match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&((20 + len) as u16).to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
            ip.extend_from_slice(&src.octets());
            ip.extend_from_slice(&dst.octets());
            let sum = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            let mut pseudo = Vec::with_capacity(12);
            pseudo.extend_from_slice(&src.octets());
            pseudo.extend_from_slice(&dst.octets());
            pseudo.extend_from_slice(&[0, proto]);
            pseudo.extend_from_slice(&(len as u16).to_be_bytes());
            (ip, pseudo)
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&(len as u16).to_be_bytes());
            ip.extend_from_slice(&[proto, 64]);
            ip.extend_from_slice(&src.octets());
            ip.extend_from_slice(&dst.octets());
            let mut pseudo = Vec::with_capacity(40);
            pseudo.extend_from_slice(&src.octets());
            pseudo.extend_from_slice(&dst.octets());
            pseudo.extend_from_slice(&(len as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, proto]);
            (ip, pseudo)
        }
        (src, dst) => panic!("mixed families in one packet: {src} -> {dst}"),
    };
    let (offset, pseudo): (usize, &[u8]) = match proto {
        PROTO_TCP => (16, &pseudo),
        PROTO_UDP => (6, &pseudo),
        PROTO_ICMPV6 => (2, &pseudo),
        PROTO_ICMP => (2, &[]),
        other => panic!("no checksum rule for protocol {other}"),
    };
    let mut sum = checksum(&[pseudo, &l4]);
    if proto == PROTO_UDP && sum == 0 {
        sum = 0xffff;
    }
    l4[offset..offset + 2].copy_from_slice(&sum.to_be_bytes());
    header.extend_from_slice(&l4);
    header
}

/// The Internet checksum over the concatenation of `parts` (each of even length except
/// possibly the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for pair in part.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An `AF_PACKET` socket bound to one lab veth: sends frames as they are and captures
/// every frame crossing that interface in either direction. Closed on drop.
pub struct PacketSocket {
    fd: OwnedFd,
    label: String,
}

impl Lab {
    /// A packet socket on `side`'s veth end, for injecting hand-built frames and capturing
    /// the frames real stacks send there.
    pub fn packet_socket(&self, side: Side) -> PacketSocket {
        let iface = Lab::iface(side);
        let label = format!("packet socket on {iface} in {}", self.ns(side));
        let fd = self
            .in_ns(side, || open_packet_socket(iface))
            .unwrap_or_else(|e| panic!("cannot open {label}: {e}"));
        PacketSocket { fd, label }
    }
}

/// Opens a socket that sees nothing until it is bound to `iface` with ETH_P_ALL, so no
/// frame of another interface is queued in between.
fn open_packet_socket(iface: &str) -> io::Result<OwnedFd> {
    let name = std::ffi::CString::new(iface).expect("interface names have no NUL");
    // SAFETY: plain libc calls with valid arguments; the fd is owned right away.
    unsafe {
        let index = libc::if_nametoindex(name.as_ptr());
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(raw);
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = index as i32;
        let rc = libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        );
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

impl PacketSocket {
    /// Sends `frame` out of the interface as it is.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: the buffer is valid for its length; the socket is bound.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert!(
            sent == frame.len() as isize,
            "{}: send of {} bytes returned {sent}: {}",
            self.label,
            frame.len(),
            io::Error::last_os_error()
        );
    }

    /// The next frame captured within `timeout`, if any.
    pub fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let mut poll = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&raw mut poll, 1, millis) };
        assert!(
            ready >= 0,
            "{}: poll failed: {}",
            self.label,
            io::Error::last_os_error()
        );
        if ready == 0 {
            return None;
        }
        let mut buf = vec![0u8; 65536];
        // SAFETY: the buffer is valid for its length.
        let len = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        assert!(
            len >= 0,
            "{}: recv failed: {}",
            self.label,
            io::Error::last_os_error()
        );
        buf.truncate(len as usize);
        Some(buf)
    }

    /// Every TCP segment captured until the link has been idle for `idle` (at most
    /// `timeout` in all), in capture order.
    pub fn tcp_segments(&self, idle: Duration, timeout: Duration) -> Vec<TcpSegment> {
        let deadline = Instant::now() + timeout;
        let mut segments = Vec::new();
        while let Some(frame) = self.recv(idle) {
            segments.extend(TcpSegment::parse(&frame));
            assert!(
                Instant::now() < deadline,
                "{}: the link did not go idle within {timeout:?}",
                self.label
            );
        }
        segments
    }
}
