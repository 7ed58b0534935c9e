//! Hand-built frames and a packet socket to send and capture them.
//!
//! Some packets the tests need (a stray ACK, a segment far outside the window, an ICMP
//! reply or error about nothing) are ones no socket API will send, so the test builds the Ethernet frame itself and writes it to
//! an `AF_PACKET` socket bound to a lab veth. The same socket also captures what the real
//! stacks send on that link, which is how a test learns the sequence numbers of a live
//! connection before injecting into it.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use session_common::wire::proto;
use session_testkit::frames;

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
        frames::ethernet_between(src_mac, dst_mac, &self.packet())
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
        frames::ip_packet(self.src.ip(), self.dst.ip(), proto::TCP, &tcp)
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
                if *ip.get(9)? != proto::TCP || fragment != 0 || ihl < 20 {
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
                if *ip.get(6)? != proto::TCP {
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

/// An `AF_PACKET` socket bound to one lab veth: sends frames as they are and captures
/// every frame crossing that interface in either direction. Closed on drop.
pub struct PacketSocket {
    fd: OwnedFd,
    label: String,
}

impl Lab {
    /// Injects a TCP ACK from the client (IPv4, port 40999) to fw:`port` that belongs to
    /// no connection, with `seq` and `ack` as given (a forged SYN cookie is one).
    pub fn send_stray_ack(&self, port: u16, seq: u32, ack: u32) {
        let segment = TcpSegment {
            src: crate::Family::V4.sock(Side::Client, 40_999),
            dst: crate::Family::V4.sock(Side::Fw, port),
            seq,
            ack,
            flags: flags::ACK,
            window: 512,
            payload: Vec::new(),
        };
        self.packet_socket(Side::Client)
            .send(&segment.frame(self.mac(Side::Client), self.mac(Side::Fw)));
    }

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
