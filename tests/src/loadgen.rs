//! A fast, bounded packet generator for floods and benchmarks inside lab namespaces.
//!
//! Off-the-shelf senders top out at a few hundred thousand packets per second here (one
//! iperf3 UDP sender with small datagrams manages about 270 kpps), far too little to fill
//! a session table or to load the XDP program. [`blast`] sends prebuilt Ethernet frames
//! instead: several threads, each in the named network namespace, each with its own
//! `AF_PACKET` socket that bypasses the qdisc layer, hand the frames to the driver in
//! batches with one `sendmmsg` call per batch.
//!
//! Every run is bounded both by a packet count and by a duration, whichever comes first,
//! so no caller can start an endless flood. The frame builders ([`syn_frames`],
//! [`udp_frames`]) spoof many sources from the benchmarking ranges only: 198.19.0.0/16
//! (the half of 198.18.0.0/15 the lab links do not use) and 2001:2:0:ff00::/64;
//! [`syn_frames_from`] sends from the sources its caller chose.

use std::{
    ffi::CString,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    thread,
    time::{Duration, Instant},
};

use crate::enter_netns;
use session_testkit::frames;

use crate::raw::{TcpSegment, flags};

/// Frames handed to the kernel per `sendmmsg` call: large enough to amortise the system
/// call, small enough that the duration bound is checked often.
const BATCH: usize = 64;
/// The most sources the builders spoof per family, so each frame set stays a few MB.
pub const MAX_SOURCES: usize = 65_536;
/// Payload length of [`udp_frames`] datagrams, so each frame is a minimal 60-byte one
/// for IPv4.
pub const UDP_PAYLOAD_LEN: usize = 18;

/// One bounded run of the generator: what to send, where from, how many threads, and the
/// bounds that always apply.
#[derive(Clone, Debug)]
pub struct Blast {
    /// Name of the network namespace (under /var/run/netns) the senders run in.
    pub netns: String,
    /// Interface in that namespace the frames leave through.
    pub iface: String,
    /// Complete Ethernet frames, sent cyclically in this order.
    pub frames: Vec<Vec<u8>>,
    /// Sender threads, each with its own socket.
    pub threads: usize,
    /// Stop after this many packets in all.
    pub max_packets: u64,
    /// Stop after this long, even if `max_packets` were not reached.
    pub max_duration: Duration,
    /// Total target rate in packets per second; `None` sends as fast as possible.
    pub rate_pps: Option<u64>,
}

/// What a [`blast`] achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    /// Frames the kernel accepted for transmission.
    pub packets: u64,
    /// Wall time from the first thread's start to the last thread's end.
    pub elapsed: Duration,
}

impl Sent {
    /// The achieved rate in packets per second.
    pub fn pps(&self) -> f64 {
        self.packets as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

/// Sends `b.frames` cyclically from `b.threads` threads until `b.max_packets` were sent
/// or `b.max_duration` passed, at `b.rate_pps` if given; returns how many were sent and
/// how long it took. Fails if the namespace or interface cannot be entered or opened, or
/// if a send fails other than for a full transmit queue (which is retried).
pub fn blast(b: &Blast) -> io::Result<Sent> {
    if b.frames.is_empty() || b.threads == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a blast needs at least one frame and one thread",
        ));
    }
    if let Some(frame) = b.frames.iter().find(|f| f.len() < 14) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a {}-byte frame is shorter than an Ethernet header",
                frame.len()
            ),
        ));
    }
    let threads = b.threads as u64;
    let start = Instant::now();
    let deadline = start + b.max_duration;
    let counts = thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|index| {
                let quota = b.max_packets / threads + u64::from(index < b.max_packets % threads);
                let rate = b.rate_pps.map(|r| (r / threads).max(1));
                // Each thread starts at a different place in the cycle, so the threads
                // together spread over the whole frame set from the first batch.
                let first = (index as usize * b.frames.len()) / b.threads;
                scope.spawn(move || send_loop(b, first, quota, rate, deadline))
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("a sender thread panicked"))
            .collect::<Vec<_>>()
    });
    let elapsed = start.elapsed();
    let mut packets = 0;
    for count in counts {
        packets += count?;
    }
    Ok(Sent { packets, elapsed })
}

/// One sender thread: joins the namespace, opens its socket and sends `quota` frames
/// from index `first` on, at `rate` packets per second if given, stopping at `deadline`.
fn send_loop(
    b: &Blast,
    first: usize,
    quota: u64,
    rate: Option<u64>,
    deadline: Instant,
) -> io::Result<u64> {
    enter_netns(&b.netns)?;
    let socket = open_sender(&b.iface)?;
    let frames = &b.frames;
    let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(BATCH);
    // SAFETY: an all-zero mmsghdr is valid (no name, no control, no iovecs).
    let mut headers: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let start = Instant::now();
    let mut next = first;
    let mut sent = 0u64;
    while sent < quota {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if let Some(rate) = rate {
            let due = start + Duration::from_secs_f64(sent as f64 / rate as f64);
            if due > now {
                thread::sleep((due - now).min(deadline - now));
                continue;
            }
        }
        let batch = (quota - sent).min(BATCH as u64) as usize;
        iovecs.clear();
        for i in 0..batch {
            let frame = &frames[(next + i) % frames.len()];
            iovecs.push(libc::iovec {
                // The kernel only reads from the buffer on send.
                iov_base: frame.as_ptr().cast_mut().cast(),
                iov_len: frame.len(),
            });
        }
        for (header, iovec) in headers.iter_mut().zip(iovecs.iter_mut()) {
            header.msg_hdr.msg_iov = iovec;
            header.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `batch` headers, each pointing at one live iovec over a live frame.
        let rc = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                headers.as_mut_ptr(),
                batch as libc::c_uint,
                0,
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                // The device queue is full: let the receiver catch up and retry.
                Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => thread::yield_now(),
                _ => {
                    return Err(io::Error::new(
                        err.kind(),
                        format!("sendmmsg on {} in {} failed: {err}", b.iface, b.netns),
                    ));
                }
            }
            continue;
        }
        let done = rc as usize;
        sent += done as u64;
        next = (next + done) % frames.len();
    }
    Ok(sent)
}

/// An `AF_PACKET` socket that only sends (protocol 0: it receives nothing), bound to
/// `iface`, with `PACKET_QDISC_BYPASS` so frames go straight to the driver.
fn open_sender(iface: &str) -> io::Result<OwnedFd> {
    let name = CString::new(iface)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name has a NUL"))?;
    let context = |what: &str| {
        let err = io::Error::last_os_error();
        io::Error::new(err.kind(), format!("{what} for {iface}: {err}"))
    };
    // SAFETY: plain libc calls with valid, correctly sized arguments; the fd is owned at once.
    unsafe {
        let index = libc::if_nametoindex(name.as_ptr());
        if index == 0 {
            return Err(context("no such interface"));
        }
        let raw = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
        if raw < 0 {
            return Err(context("cannot open a packet socket (needs CAP_NET_RAW)"));
        }
        let fd = OwnedFd::from_raw_fd(raw);
        let one: libc::c_int = 1;
        if libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) != 0
        {
            return Err(context("cannot set PACKET_QDISC_BYPASS"));
        }
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        if libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        ) != 0
        {
            return Err(context("cannot bind the packet socket"));
        }
        Ok(fd)
    }
}

/// The `index`th spoofed source address in the family of `dst`: 198.19.0.0/16 for IPv4,
/// 2001:2:0:ff00::/64 for IPv6, wrapping after [`MAX_SOURCES`]. Neither range overlaps
/// the lab links (198.18.0.0/24, 2001:2::/64), so replies to them go nowhere.
pub fn spoofed_source(dst: IpAddr, index: usize) -> IpAddr {
    let host = (index % MAX_SOURCES) as u16;
    match dst {
        IpAddr::V4(_) => {
            let [hi, lo] = host.to_be_bytes();
            IpAddr::V4(Ipv4Addr::new(198, 19, hi, lo))
        }
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 0xff00, 0, 0, 0, host)),
    }
}

/// A source port for the `index`th frame, spread over 1024..65535 so that frames from
/// the same source still differ.
fn spoofed_port(index: usize) -> u16 {
    1024 + ((index as u64 * 7919) % (65_535 - 1024)) as u16
}

/// `sources` TCP SYNs from distinct spoofed sources (see [`spoofed_source`]) to `dst`,
/// cycling over `ports`, as Ethernet frames from `src_mac` to `dst_mac` with valid
/// checksums: a SYN flood that creates a new session per frame.
pub fn syn_frames(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    dst: IpAddr,
    ports: &[u16],
    sources: usize,
) -> Vec<Vec<u8>> {
    assert!(!ports.is_empty(), "a SYN flood needs at least one port");
    (0..sources)
        .map(|i| {
            syn_frame(
                (src_mac, dst_mac),
                SocketAddr::new(spoofed_source(dst, i), spoofed_port(i)),
                SocketAddr::new(dst, ports[i % ports.len()]),
                (i as u32).wrapping_mul(2_654_435_761),
            )
        })
        .collect()
}

/// One TCP SYN from each of `sources` to `dst`, as Ethernet frames from `src_mac` to
/// `dst_mac` with valid checksums: a SYN flood from chosen addresses (the members of a
/// blocklist, say) rather than from [`spoofed_source`]'s range. Every SYN has the same
/// source port and sequence number, so that the frames of one family differ only in their
/// IP header and TCP checksum, as the XDP generator ([`crate::xdpgen::xdp_blast`]) needs:
/// it writes the first 54 bytes of each frame, all of an IPv4 SYN but only up to the end
/// of an IPv6 header, so IPv6 sources must leave the checksum alike, as those of
/// [`crate::xdpgen::v6_source`] do.
pub fn syn_frames_from(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    dst: SocketAddr,
    sources: &[IpAddr],
) -> Vec<Vec<u8>> {
    sources
        .iter()
        .map(|&src| {
            syn_frame(
                (src_mac, dst_mac),
                SocketAddr::new(src, spoofed_port(0)),
                dst,
                1,
            )
        })
        .collect()
}

/// A TCP SYN from `src` to `dst` with sequence number `seq`, as an Ethernet frame between
/// `macs` (source, destination): the one packet both SYN flood builders repeat.
fn syn_frame(macs: ([u8; 6], [u8; 6]), src: SocketAddr, dst: SocketAddr, seq: u32) -> Vec<u8> {
    TcpSegment {
        src,
        dst,
        seq,
        ack: 0,
        flags: flags::SYN,
        window: 64_240,
        payload: Vec::new(),
    }
    .frame(macs.0, macs.1)
}

/// `sources` UDP datagrams of [`UDP_PAYLOAD_LEN`] bytes from distinct spoofed sources to
/// `dst`, cycling over `ports`, as Ethernet frames from `src_mac` to `dst_mac` with valid
/// checksums: a UDP flood that creates a new session per frame.
pub fn udp_frames(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    dst: IpAddr,
    ports: &[u16],
    sources: usize,
) -> Vec<Vec<u8>> {
    assert!(!ports.is_empty(), "a UDP flood needs at least one port");
    let payload = [0x5a; UDP_PAYLOAD_LEN];
    (0..sources)
        .map(|i| {
            let udp = frames::udp_carrying(spoofed_port(i), ports[i % ports.len()], &payload);
            let packet = frames::packet(spoofed_source(dst, i), dst, udp);
            frames::ethernet_between(src_mac, dst_mac, &packet)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
    const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

    /// The one's-complement sum of `data` (odd tail padded with zero), folded: 0xffff
    /// over a region whose checksum field is right.
    fn ones_sum(parts: &[&[u8]]) -> u16 {
        let bytes: Vec<u8> = parts.concat();
        let mut sum: u64 = bytes
            .chunks(2)
            .map(|c| u64::from(c[0]) << 8 | u64::from(*c.get(1).unwrap_or(&0)))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    /// Checks the Ethernet, IP and transport headers of `frame` and returns
    /// (source, destination port, protocol).
    fn check_frame(frame: &[u8], dst: IpAddr) -> (IpAddr, u16, u8) {
        assert_eq!(&frame[0..6], &DST_MAC);
        assert_eq!(&frame[6..12], &SRC_MAC);
        let ip = &frame[14..];
        let (src, proto, l4, pseudo) = match dst {
            IpAddr::V4(d) => {
                assert_eq!(&frame[12..14], &[0x08, 0x00]);
                assert_eq!(ip[0], 0x45);
                assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), ip.len());
                assert_eq!(ones_sum(&[&ip[..20]]), 0xffff, "IPv4 header checksum");
                assert_eq!(&ip[16..20], &d.octets());
                let src: [u8; 4] = ip[12..16].try_into().unwrap();
                let l4 = &ip[20..];
                let mut pseudo = ip[12..20].to_vec();
                pseudo.extend_from_slice(&[0, ip[9]]);
                pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
                (IpAddr::from(src), ip[9], l4, pseudo)
            }
            IpAddr::V6(d) => {
                assert_eq!(&frame[12..14], &[0x86, 0xdd]);
                assert_eq!(ip[0] >> 4, 6);
                assert_eq!(
                    usize::from(u16::from_be_bytes([ip[4], ip[5]])),
                    ip.len() - 40
                );
                assert_eq!(&ip[24..40], &d.octets());
                let src: [u8; 16] = ip[8..24].try_into().unwrap();
                let l4 = &ip[40..];
                let mut pseudo = ip[8..40].to_vec();
                pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, ip[6]]);
                (IpAddr::from(src), ip[6], l4, pseudo)
            }
        };
        assert_eq!(ones_sum(&[&pseudo, l4]), 0xffff, "transport checksum");
        (src, u16::from_be_bytes([l4[2], l4[3]]), proto)
    }

    #[test]
    fn syn_frames_are_valid_syns_from_distinct_benchmark_sources() {
        let ports = [22, 80, 443];
        for dst in ["198.18.0.2".parse().unwrap(), "2001:2::2".parse().unwrap()] {
            let frames = syn_frames(SRC_MAC, DST_MAC, dst, &ports, 1000);
            assert_eq!(frames.len(), 1000);
            let mut sources = std::collections::HashSet::new();
            for (i, frame) in frames.iter().enumerate() {
                let (src, dport, proto) = check_frame(frame, dst);
                assert_eq!(proto, 6);
                assert_eq!(dport, ports[i % ports.len()]);
                let segment = TcpSegment::parse(frame).expect("a TCP segment");
                assert_eq!(segment.flags, flags::SYN);
                match src {
                    IpAddr::V4(v4) => assert_eq!(v4.octets()[..2], [198, 19]),
                    IpAddr::V6(v6) => assert_eq!(v6.segments()[..4], [0x2001, 2, 0, 0xff00]),
                }
                sources.insert(src);
            }
            assert_eq!(sources.len(), 1000, "every SYN has its own source");
        }
    }

    #[test]
    fn udp_frames_have_valid_checksums_and_minimal_size() {
        for dst in ["198.18.0.2".parse().unwrap(), "2001:2::2".parse().unwrap()] {
            let frames = udp_frames(SRC_MAC, DST_MAC, dst, &[53, 9], 500);
            for (i, frame) in frames.iter().enumerate() {
                let (_, dport, proto) = check_frame(frame, dst);
                assert_eq!(proto, 17);
                assert_eq!(dport, [53, 9][i % 2]);
            }
            if dst.is_ipv4() {
                assert_eq!(frames[0].len(), 60, "minimal Ethernet frame");
            }
        }
    }

    #[test]
    fn spoofed_sources_wrap_within_their_range() {
        let dst: IpAddr = "198.18.0.2".parse().unwrap();
        assert_eq!(spoofed_source(dst, MAX_SOURCES + 5), spoofed_source(dst, 5));
        assert_eq!(
            spoofed_source(dst, MAX_SOURCES - 1),
            "198.19.255.255".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn blast_rejects_an_empty_frame_set() {
        let b = Blast {
            netns: "unused".into(),
            iface: "unused".into(),
            frames: Vec::new(),
            threads: 1,
            max_packets: 1,
            max_duration: Duration::from_millis(1),
            rate_pps: None,
        };
        let err = blast(&b).expect_err("no frames");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
