//! End-to-end benchmark through the lab's veth path, run by `cargo xtask bench` (root,
//! release `session` binary in `SESSION_BIN`).
//!
//! Five firewalls on fw in the same run, each in a fresh lab, interleaved round by
//! round so that drift in the machine's load hits them alike: none, a do-nothing XDP
//! program (what XDP on veth costs by itself), nftables with the equivalent `ct state`
//! policy, session, and session judging ingress on TC instead of XDP (`[attach]
//! tc_ingress`). Scenarios:
//!
//! - (a) many established UDP flows with small packets (fw opened each flow by sending
//!   first), blasted by the XDP load generator (`session_tests::xdpgen`, frames handed to
//!   fw's veth as a NIC's driver hands them over): packets/s that reach fw's UDP layer; and
//!   many established TCP connections, blasted with pure ACKs at their next sequence
//!   numbers: packets/s that reach fw's TCP layer;
//! - (a) forwarded: the same blasts with fw as a router, to upstream behind it, under no
//!   firewall, nftables on the forward hook, session, and session with its fast path;
//!   counted once as delivered to upstream's sockets and once at upstream's port, whose
//!   ingress hook counts and drops them as a tester's receiving port would;
//! - (b) a SYN flood to a closed port, which the policy drops: CPU per packet;
//! - (c) new TCP connections per second (connect, 32 bytes each way, close), through a
//!   wire namespace between client and fw whose XDP program passes every frame on
//!   (`session_bench_wire`), so fw receives the client's segments as XDP frames like (a)
//!   and (b)'s; and, for comparison, with the two veth ends paired directly, where any XDP
//!   program on fw's end puts veth on a slower receive path for socket buffers.
//!
//! (b) also runs into an XDP program that drops everything, the floor for dropping in
//! XDP on this path.
//!
//! (b) blocklist, after the other sections: the SYN flood once more, now to the open
//! port and from the members of a blocklist of 100,000 and of 1,000,000 IPv4 and IPv6
//! prefixes, over IPv4 and over IPv6, so that only the blocklist stops it. nftables holds
//! the list in interval sets, session in a set of its policy; the drop-everything program
//! is the floor. Dropped packets/s and CPU per packet, with each firewall's own blocklist
//! counter checked, and a connection from a non-member to the same port.
//!
//! Socket buffers into veth: (a) and (b) once more, sent by the `AF_PACKET` generator
//! (`session_tests::loadgen`), so that fw's veth receives socket buffers, as the host side
//! of a container's veth does from the container's sockets. There veth copies each buffer
//! into a page before XDP may see it, which TC ingress does not pay; the section compares
//! nftables with session on XDP and on TC ingress on that path.
//!
//! CPU is the machine's: softirq time across all CPUs from /proc/stat over the blast,
//! where veth delivers packets to fw (XDP, TC, nftables hooks and the IP stack all run
//! there), divided by the packets sent; the generator's own work is system time and is
//! left out. Total busy time per packet is reported beside it.
//!
//! Writes `$SESSION_BENCH_DIR/e2e.json` and `e2e.md` (default: target/bench).

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, RawFd},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use session_testkit::{
    bench,
    frames::{self, Tcp, tcp_flags},
};
use session_tests::{
    CLIENT_V4, Daemon, FW_IFACE, FW_V4, Family, Lab, Side,
    bare_xdp::BareXdp,
    lifecycle::{STREAM_POLICY, STREAM_PORT},
    loadgen::{self, Blast, Sent},
    router::{
        FW_WAN_V4, UPSTREAM_IFACE, UPSTREAM_V4, Upstream, WAN_IFACE, routed_lab, router_policy,
        upstream_host,
    },
    set_socket_option, xdpgen,
};

/// Rounds; each runs every scenario once per firewall, and the median is reported.
const ROUNDS: usize = 5;
/// Rounds of the socket-buffer section, run after the others. Fewer than [`ROUNDS`]: the
/// section adds four firewalls' labs to a run that already takes about a quarter of an
/// hour, and the median of three still sets aside one outlying round either way.
const SKB_ROUNDS: usize = 3;
/// Established UDP flows in scenario (a).
const UDP_FLOWS: usize = 4096;
/// Established TCP connections in scenario (a).
const TCP_FLOWS: usize = 1024;
/// Spoofed sources of the SYN flood in scenario (b).
const SYN_SOURCES: usize = loadgen::MAX_SOURCES;
/// Length of each blast and of each connection-rate run.
const RUN: Duration = Duration::from_secs(3);
/// Upper bound on the packets of one blast, whatever the rate.
const MAX_PACKETS: u64 = 30_000_000;
/// The UDP port fw talks from in (a), the TCP port it serves in (c), and a closed port.
const UDP_PORT: u16 = 5353;
const TCP_PORT: u16 = STREAM_PORT;
const CLOSED_PORT: u16 = 9999;
/// Bytes each way per connection in (c).
const EXCHANGE: usize = 32;

/// The nftables equivalent of session's `STREAM_POLICY` (replies and established flows in,
/// invalid out, TCP 8080 open): conntrack decides the state, the chain the verdict.
const NFT_POLICY: &str = "table inet bench {
  chain input {
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    ct state invalid drop
    tcp dport 8080 ct state new accept
  }
}
";

#[derive(Clone, Copy, PartialEq)]
enum Firewall {
    None,
    /// session's do-nothing XDP program on fw's veth: what XDP on veth costs by itself.
    NoopXdp,
    Nftables,
    Session,
    /// session judging fw's arriving packets with its TC ingress program instead of XDP
    /// ([`tc_policy`]): what a veth fed by local sockets should run, measured on every
    /// path so that what it costs where XDP pays no copy shows as well.
    SessionTc,
}

impl Firewall {
    const ALL: [Firewall; 5] = [
        Firewall::None,
        Firewall::NoopXdp,
        Firewall::Nftables,
        Firewall::Session,
        Firewall::SessionTc,
    ];

    /// The firewalls of the socket-buffer section: the do-nothing XDP program is left out,
    /// since what XDP costs there is veth's copy, which the earlier run (at 8137d91)
    /// already measured.
    const SOCKET_BUFFERS: [Firewall; 4] = [
        Firewall::None,
        Firewall::Nftables,
        Firewall::Session,
        Firewall::SessionTc,
    ];

    fn name(self) -> &'static str {
        match self {
            Firewall::None => "no firewall",
            Firewall::NoopXdp => "do-nothing XDP (veth baseline)",
            Firewall::Nftables => "nftables (ct state)",
            Firewall::Session => "session",
            Firewall::SessionTc => "session, TC ingress",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Firewall::None => "none",
            Firewall::NoopXdp => "noop_xdp",
            Firewall::Nftables => "nftables",
            Firewall::Session => "session",
            Firewall::SessionTc => "session_tc",
        }
    }
}

/// [`STREAM_POLICY`] with fw's veth judged on TC ingress instead of XDP. The `[attach]`
/// table comes after the rules, where a new TOML table may start.
fn tc_policy() -> String {
    format!("{STREAM_POLICY}\n[attach]\ntc_ingress = [\"{FW_IFACE}\"]\n")
}

/// (a) forwarded: nftables' equivalent of [`ROUTED_POLICY`], on the forward hook.
const NFT_ROUTED_POLICY: &str = "table inet bench {
  chain forward {
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    ct state invalid drop
    iifname \"wan0\" udp sport 5353 ct state new accept
    iifname \"veth-fw\" tcp dport 8080 ct state new accept
  }
}
";

/// (a) forwarded: fw routes between the client and upstream; upstream opens the UDP
/// flows (from port 5353), the client the TCP connections (to port 8080).
fn routed_policy(fast_path: bool) -> String {
    router_policy(
        fast_path,
        &format!(
            r#"
[[rule]]
name = "upstream-udp"
state = ["new"]
iface = ["{WAN_IFACE}"]
proto = "udp"
sport = [{UDP_PORT}]
action = "accept"

[[rule]]
name = "lan-web"
state = ["new"]
iface = ["{FW_IFACE}"]
proto = "tcp"
dport = [{TCP_PORT}]
action = "accept"
"#
        ),
    )
}

/// The firewalls of (a) forwarded: fw is a router between the client and upstream.
#[derive(Clone, Copy, PartialEq)]
enum Router {
    None,
    Nftables,
    Session,
    FastPath,
}

impl Router {
    const ALL: [Router; 4] = [
        Router::None,
        Router::Nftables,
        Router::Session,
        Router::FastPath,
    ];

    fn name(self) -> &'static str {
        match self {
            Router::None => "no firewall",
            Router::Nftables => "nftables (ct state)",
            Router::Session => "session",
            Router::FastPath => "session, fast path",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Router::None => "none",
            Router::Nftables => "nftables",
            Router::Session => "session",
            Router::FastPath => "session_fast_path",
        }
    }
}

/// CPU time of the whole machine, from the first line of /proc/stat, in ns.
#[derive(Clone, Copy)]
struct Cpu {
    busy: f64,
    softirq: f64,
}

fn cpu_now() -> Cpu {
    let stat = std::fs::read_to_string("/proc/stat").expect("reading /proc/stat");
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .expect("/proc/stat has a cpu line")
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().expect("a number in /proc/stat"))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let ns_per_tick = 1e9 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // user nice system idle iowait irq softirq steal
    let busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7];
    Cpu {
        busy: busy * ns_per_tick,
        softirq: fields[6] * ns_per_tick,
    }
}

/// One blast's figures.
#[derive(Clone, Copy, Default)]
struct Blasted {
    /// Packets the generator sent, for the checks that a firewall's own counter saw them.
    packets: u64,
    sent_pps: f64,
    delivered_pps: f64,
    softirq_ns: f64,
    busy_ns: f64,
}

/// A counter from the text of a namespace's /proc/net/snmp: `group` is the line's prefix
/// (`Udp:`, `Tcp:`), `name` the column.
fn snmp_counter(snmp: &str, group: &str, name: &str) -> u64 {
    let mut lines = snmp.lines().filter(|line| line.starts_with(group));
    let (header, values) = (
        lines.next().unwrap_or_else(|| panic!("no {group} header")),
        lines.next().unwrap_or_else(|| panic!("no {group} values")),
    );
    let index = header
        .split_whitespace()
        .position(|field| field == name)
        .unwrap_or_else(|| panic!("no {name} in {header}"));
    values
        .split_whitespace()
        .nth(index)
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no value for {name} in {values}"))
}

/// Where (a)'s flows end: at fw itself, or at upstream, to which fw routes them.
#[derive(Clone, Copy)]
enum Sink<'a> {
    Fw,
    /// Delivered = what reached upstream's UDP or TCP layer.
    Upstream(&'a Upstream<'a>),
    /// Upstream as a tester's port: its netdev ingress hook counts and drops the blast
    /// before its IP stack, as a traffic generator's receiving port counts what a router
    /// forwards. Upstream shares the machine's CPUs with fw, so the receive of its stack
    /// would otherwise be paid out of every firewall's figure alike.
    UpstreamPort(&'a Upstream<'a>),
}

/// The layer whose counter says that a blast's packet was delivered.
#[derive(Clone, Copy)]
enum Layer {
    Udp,
    Tcp,
}

/// Makes upstream a tester's port for one blast: every IPv4 packet that arrives on its
/// veth end is counted and dropped. ARP passes, so fw's neighbour entry stays valid.
fn port_counter_ruleset() -> String {
    format!(
        "add table netdev port; add counter netdev port arrived; \
         add chain netdev port ingress {{ type filter hook ingress device \"{UPSTREAM_IFACE}\" \
         priority filter; policy accept; }}; \
         add rule netdev port ingress meta protocol ip counter name \"arrived\" drop"
    )
}

/// The packet count in nftables' listing of a counter, or of a rule with one
/// (`counter packets N bytes M`).
fn nft_packets(listed: &str) -> u64 {
    listed
        .split_whitespace()
        .skip_while(|word| *word != "packets")
        .nth(1)
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {listed}"))
}

impl Sink<'_> {
    fn ip(self) -> IpAddr {
        match self {
            Sink::Fw => FW_V4,
            Sink::Upstream(_) | Sink::UpstreamPort(_) => UPSTREAM_V4,
        }
        .parse()
        .expect("lab address")
    }

    fn delivered(self, lab: &Lab, layer: Layer) -> u64 {
        let snmp_argv = ["cat", "/proc/net/snmp"];
        let snmp = match self {
            Sink::Fw => lab.ok(Side::Fw, 5, &snmp_argv),
            Sink::Upstream(upstream) => upstream.ok(5, &snmp_argv),
            Sink::UpstreamPort(upstream) => {
                return nft_packets(
                    &upstream.ok(5, &["nft", "list", "counter", "netdev", "port", "arrived"]),
                );
            }
        };
        match layer {
            Layer::Udp => {
                snmp_counter(&snmp, "Udp:", "InDatagrams")
                    + snmp_counter(&snmp, "Udp:", "RcvbufErrors")
            }
            Layer::Tcp => snmp_counter(&snmp, "Tcp:", "InSegs"),
        }
    }

    /// Blasts `frames` at the sink's flows with `generator` and counts what `layer`
    /// received, or, at a tester's port, what arrived there.
    fn blast(self, lab: &Lab, generator: Generator, frames: Vec<Vec<u8>>, layer: Layer) -> Blasted {
        let Sink::UpstreamPort(upstream) = self else {
            return blast(lab, generator, frames, || self.delivered(lab, layer));
        };
        upstream.ok(5, &["nft", &port_counter_ruleset()]);
        let result = blast(lab, generator, frames, || self.delivered(lab, layer));
        upstream.ok(5, &["nft", "delete", "table", "netdev", "port"]);
        assert!(
            result.delivered_pps > 0.0,
            "(a) forwarded: upstream's port counted nothing of the blast; check that fw \
             forwards to {UPSTREAM_V4} and that nftables' netdev ingress hook works in {}",
            upstream.ns()
        );
        result
    }

    fn udp_socket(self, lab: &Lab) -> UdpSocket {
        match self {
            Sink::Fw => lab.udp_socket(Side::Fw, Family::V4, UDP_PORT),
            Sink::Upstream(upstream) | Sink::UpstreamPort(upstream) => {
                let addr = SocketAddr::new(self.ip(), UDP_PORT);
                upstream
                    .in_ns(|| UdpSocket::bind(addr))
                    .expect("binding upstream's UDP socket")
            }
        }
    }

    fn tcp_listen(self, lab: &Lab) -> TcpListener {
        match self {
            Sink::Fw => lab.tcp_listen(Side::Fw, Family::V4, TCP_PORT),
            Sink::Upstream(upstream) | Sink::UpstreamPort(upstream) => {
                upstream.tcp_listen(SocketAddr::new(self.ip(), TCP_PORT))
            }
        }
    }
}

/// A load generator, which decides how fw's veth receives the client's frames:
/// [`xdpgen::xdp_blast`] hands them over as XDP frames, as a NIC's driver does;
/// [`loadgen::blast`] (`AF_PACKET`) as socket buffers, as a container's sockets do.
type Generator = fn(&Blast) -> std::io::Result<Sent>;

/// Sends `frames` from the client with `generator` for one bounded blast, and measures
/// the rate, what `delivered` counted and the machine's CPU time per packet.
fn blast(
    lab: &Lab,
    generator: Generator,
    frames: Vec<Vec<u8>>,
    delivered: impl Fn() -> u64,
) -> Blasted {
    let delivered_before = delivered();
    let before = cpu_now();
    let sent = generator(&Blast {
        netns: lab.ns(Side::Client).to_string(),
        iface: Lab::iface(Side::Client).to_string(),
        frames,
        threads: 1,
        max_packets: MAX_PACKETS,
        max_duration: RUN,
        rate_pps: None,
    })
    .expect("the load generator failed");
    // Let veth's queues drain into fw before the counters are read.
    std::thread::sleep(Duration::from_millis(200));
    let after = cpu_now();
    let packets = sent.packets.max(1) as f64;
    Blasted {
        packets: sent.packets,
        sent_pps: sent.pps(),
        delivered_pps: (delivered() - delivered_before) as f64 / sent.elapsed.as_secs_f64(),
        softirq_ns: (after.softirq - before.softirq) / packets,
        busy_ns: (after.busy - before.busy) / packets,
    }
}

/// (a): the sink sends one datagram to each spoofed source first, so the client's blast
/// is the reply direction of flows every firewall already tracks. Sources in
/// 198.19.0.0/24 are left out: behind a router, that is the upstream link.
fn established_udp(lab: &Lab, sink: Sink<'_>, generator: Generator) -> Blasted {
    let frames: Vec<Vec<u8>> = loadgen::udp_frames(
        lab.mac(Side::Client),
        lab.mac(Side::Fw),
        sink.ip(),
        &[UDP_PORT],
        UDP_FLOWS + 256,
    )
    .into_iter()
    // Ethernet (14) + IPv4 (20): source address at 26, its third byte at 28.
    .filter(|frame| frame[28] != 0)
    .take(UDP_FLOWS)
    .collect();
    let socket = sink.udp_socket(lab);
    for frame in &frames {
        // Source port at 34.
        let src = IpAddr::from(<[u8; 4]>::try_from(&frame[26..30]).expect("4 bytes"));
        let port = u16::from_be_bytes([frame[34], frame[35]]);
        socket
            .send_to(b"open", SocketAddr::new(src, port))
            .expect("opening a UDP flow");
    }
    std::thread::sleep(Duration::from_millis(300));
    let result = sink.blast(lab, generator, frames, Layer::Udp);
    drop(socket);
    result
}

/// `TCP_REPAIR_QUEUE` values (linux/tcp.h): which queue `TCP_QUEUE_SEQ` reads.
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;

fn queue_sequence(fd: RawFd, queue: libc::c_int) -> u32 {
    set_socket_option(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_QUEUE, &queue);
    let mut value: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the u32 we own.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_QUEUE_SEQ,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_QUEUE_SEQ: {}", std::io::Error::last_os_error());
    value
}

/// Freezes the client's end of a connection (TCP_REPAIR: its stack sends nothing more,
/// and closing it later is silent) and returns its next sequence number and the next
/// one it expects.
fn freeze(stream: &TcpStream) -> (u32, u32) {
    let fd = stream.as_raw_fd();
    set_socket_option(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, &(1 as libc::c_int));
    (
        queue_sequence(fd, TCP_SEND_QUEUE),
        queue_sequence(fd, TCP_RECV_QUEUE),
    )
}

/// (a), TCP: real connections from the client to the sink, frozen, then a blast of pure
/// ACKs at each one's next sequence numbers, in window for every firewall. Delivered =
/// the sink's `Tcp: InSegs`.
fn established_tcp(lab: &Lab, sink: Sink<'_>, generator: Generator) -> Blasted {
    let listener = sink.tcp_listen(lab);
    set_accept_timeout(&listener, Duration::from_secs(2));
    let to = SocketAddr::new(sink.ip(), TCP_PORT);
    let (clients, servers) = std::thread::scope(|scope| {
        let accepting = scope.spawn(|| {
            (0..TCP_FLOWS)
                .map(|_| listener.accept().expect("accepting a connection").0)
                .collect::<Vec<_>>()
        });
        let clients: Vec<TcpStream> = (0..TCP_FLOWS)
            .map(|_| {
                lab.tcp_connect(Side::Client, to, Duration::from_secs(2))
                    .expect("client connecting to the sink")
            })
            .collect();
        (clients, accepting.join().expect("the accept thread"))
    });
    let client: IpAddr = CLIENT_V4.parse().expect("lab address");
    let frames = clients
        .iter()
        .map(|stream| {
            let port = stream.local_addr().expect("client address").port();
            let (seq, ack) = freeze(stream);
            let segment = Tcp::new(port, TCP_PORT, tcp_flags::ACK)
                .seq_ack(seq, ack)
                .window(502);
            frames::ethernet_between(
                lab.mac(Side::Client),
                lab.mac(Side::Fw),
                &frames::packet(client, sink.ip(), frames::tcp(segment)),
            )
        })
        .collect();
    let result = sink.blast(lab, generator, frames, Layer::Tcp);
    drop(clients);
    drop(servers);
    result
}

/// (b): a SYN flood to a port no rule opens.
fn dropped_flood(lab: &Lab, generator: Generator) -> Blasted {
    let fw: IpAddr = FW_V4.parse().expect("lab address");
    let frames = loadgen::syn_frames(
        lab.mac(Side::Client),
        lab.mac(Side::Fw),
        fw,
        &[CLOSED_PORT],
        SYN_SOURCES,
    );
    blast(lab, generator, frames, || 0)
}

/// (c): connections per second, each connect, 32 bytes each way, close by fw first (so
/// fw, not the client, holds TIME_WAIT and the client's ports free up at once).
fn connection_rate(lab: &Lab) -> (f64, u64) {
    let listener = lab.tcp_listen(Side::Fw, Family::V4, TCP_PORT);
    set_accept_timeout(&listener, Duration::from_secs(1));
    let to = Family::V4.sock(Side::Fw, TCP_PORT);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                // Blocking accept, bounded by the listener's receive timeout.
                let Ok((mut stream, _)) = listener.accept() else {
                    continue;
                };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                let mut buf = [0u8; EXCHANGE];
                if stream.read_exact(&mut buf).is_ok() {
                    let _ = stream.write_all(&buf);
                }
            }
        });
        let (done, failed, elapsed) = lab.in_ns(Side::Client, || {
            let started = Instant::now();
            let (mut done, mut failed) = (0u64, 0u64);
            while started.elapsed() < RUN {
                match exchange(to) {
                    Ok(()) => done += 1,
                    Err(_) => failed += 1,
                }
            }
            (done, failed, started.elapsed())
        });
        stop.store(true, Ordering::Relaxed);
        // Wakes the server's last accept so it sees the stop flag.
        let _ = lab.tcp_connect(Side::Client, to, Duration::from_secs(2));
        assert!(
            done > 0,
            "(c): no connection completed in {RUN:?} ({failed} failed); in a wired lab, \
             check the wire's program and the veth settings `Lab::wired` makes"
        );
        (done as f64 / elapsed.as_secs_f64(), failed)
    })
}

/// Makes `accept` on `listener` give up after `timeout` (SO_RCVTIMEO), so the server
/// loop sees the stop flag even if no last connection arrives.
fn set_accept_timeout(listener: &TcpListener, timeout: Duration) {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    set_socket_option(
        listener.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVTIMEO,
        &tv,
    );
}

fn exchange(to: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.set_nodelay(true)?;
    stream.write_all(&[0x5a; EXCHANGE])?;
    let mut buf = [0u8; EXCHANGE];
    stream.read_exact(&mut buf)?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    Ok(())
}

/// Every figure of one firewall in one round.
#[derive(Clone, Copy, Default)]
struct Round {
    udp: Blasted,
    tcp: Blasted,
    flood: Blasted,
    /// (c) through the wire: connections/s and failures.
    connections: (f64, u64),
    /// (c) with the client's veth paired to fw's directly.
    direct_connections: (f64, u64),
}

/// A fresh lab, routed back to the spoofed sources, with room for many client ports, and
/// ready for the XDP generator's frames.
fn bench_lab(wired: bool) -> Lab {
    let lab = routed_back(if wired {
        Lab::wired("bench")
    } else {
        Lab::new("bench")
    });
    // veth takes the generator's XDP frames only with an XDP program or GRO on fw's end;
    // GRO for every firewall, so all receive the same way.
    lab.ok(Side::Fw, 5, &["ethtool", "-K", FW_IFACE, "gro", "on"]);
    lab
}

/// A fresh lab for the socket-buffer section: [`bench_lab`] without GRO on fw's end. With
/// GRO off (veth's default) and no XDP program, fw's veth hands the `AF_PACKET`
/// generator's socket buffers to the stack as they come, as the host side of a
/// container's veth does; GRO would put them through veth's NAPI ring instead.
fn socket_buffer_lab() -> Lab {
    routed_back(Lab::new("bench"))
}

/// Routes fw's replies to the spoofed sources back to the client and gives the client
/// room for many ports, quickly reused.
fn routed_back(lab: Lab) -> Lab {
    lab.ok(
        Side::Fw,
        5,
        &["ip", "route", "add", "198.19.0.0/16", "via", "198.18.0.1"],
    );
    for key in [
        "net.ipv4.ip_local_port_range=1024 65000",
        "net.ipv4.tcp_tw_reuse=1",
    ] {
        lab.ok(Side::Client, 5, &["sysctl", "-qw", key]);
    }
    lab
}

/// (b)'s floor: the same flood into an XDP program that drops everything.
fn drop_floor() -> Blasted {
    let lab = bench_lab(false);
    let drop_all = BareXdp::attach(&lab, "session_drop_all");
    let flood = dropped_flood(&lab, xdpgen::xdp_blast);
    drop(lab);
    drop(drop_all);
    flood
}

/// Puts `firewall` on fw: what it returns must stay alive while it is measured, and the
/// program (if any) must be dropped after the lab.
fn install(firewall: Firewall, lab: &Lab) -> (Option<Daemon<'_>>, Option<BareXdp>) {
    match firewall {
        Firewall::None => (None, None),
        Firewall::NoopXdp => (None, Some(BareXdp::attach(lab, "session_noop"))),
        Firewall::Nftables => {
            install_nft(lab, NFT_POLICY);
            (None, None)
        }
        Firewall::Session => (Some(lab.daemon(STREAM_POLICY)), None),
        Firewall::SessionTc => (Some(lab.daemon(&tc_policy())), None),
    }
}

/// Under [`Firewall::SessionTc`], stops the bench unless session's TC ingress program is
/// what judged fw's arriving packets, so that its rows cannot come from XDP or from no
/// program at all: fw's veth must carry no XDP program, and counters that only arriving
/// packets move must have moved. The policy's rule for TCP 8080 (`stream`) matches
/// arriving packets only, and every lab opens connections to fw's port 8080; where the
/// lab was `flooded`, the default inbound drop, which only arriving packets reach, must
/// have counted the flood's SYNs too.
fn assert_judged_on_tc(firewall: Firewall, lab: &Lab, daemon: Option<&Daemon<'_>>, flooded: bool) {
    if firewall != Firewall::SessionTc {
        return;
    }
    let link = lab.ok(Side::Fw, 5, &["ip", "-d", "link", "show", "dev", FW_IFACE]);
    assert!(
        !link.contains("xdp"),
        "session on TC ingress: {FW_IFACE} in {} carries an XDP program, so these figures \
         would not be TC ingress's; `[attach] tc_ingress` must replace XDP on it:\n{link}",
        lab.ns(Side::Fw)
    );
    let stats = daemon.expect("session runs").stats_json();
    let stream_hits = session_tests::rule_hits(&stats, "stream");
    let default_drops = stats["default_inbound_hits"]
        .as_u64()
        .unwrap_or_else(|| panic!("stats have no default_inbound_hits: {stats}"));
    assert!(
        stream_hits > 0 && (!flooded || default_drops > 0),
        "session on TC ingress judged no arriving packet: the rule for TCP {TCP_PORT} has \
         {stream_hits} hits and the default inbound drop {default_drops}{}, with no XDP \
         program on {FW_IFACE}; is the TC ingress program attached and running? {stats}",
        if flooded { " after a SYN flood" } else { "" }
    );
}

/// Loads the nftables ruleset `policy` in fw.
fn install_nft(lab: &Lab, policy: &str) {
    let out = lab.run_with_input(Side::Fw, 10, &["nft", "-f", "-"], policy.as_bytes());
    assert!(
        out.status.success(),
        "cannot install the nftables policy: {}",
        session_tests::describe(&out)
    );
}

fn one_round(firewall: Firewall) -> Round {
    let lab = bench_lab(false);
    let (daemon, program) = install(firewall, &lab);
    let round = Round {
        udp: established_udp(&lab, Sink::Fw, xdpgen::xdp_blast),
        tcp: established_tcp(&lab, Sink::Fw, xdpgen::xdp_blast),
        flood: dropped_flood(&lab, xdpgen::xdp_blast),
        ..Round::default()
    };
    let direct_connections = connection_rate(&lab);
    assert_judged_on_tc(firewall, &lab, daemon.as_ref(), true);
    drop(daemon);
    drop(lab);
    drop(program);

    let lab = bench_lab(true);
    let wire = BareXdp::wire(&lab);
    let (daemon, program) = install(firewall, &lab);
    let connections = connection_rate(&lab);
    assert_judged_on_tc(firewall, &lab, daemon.as_ref(), false);
    drop(daemon);
    drop(lab);
    drop(program);
    drop(wire);
    Round {
        connections,
        direct_connections,
        ..round
    }
}

/// Every figure of one firewall in one round of the socket-buffer section.
#[derive(Clone, Copy)]
struct SkbRound {
    udp: Blasted,
    tcp: Blasted,
    flood: Blasted,
}

/// Which of a socket-buffer round's blasts a figure comes from.
type PickSkb = fn(&SkbRound) -> Blasted;

/// One round of the socket-buffer section under one firewall: (a) and (b) sent by the
/// `AF_PACKET` generator, so that fw's veth receives socket buffers.
fn one_skb_round(firewall: Firewall) -> SkbRound {
    let lab = socket_buffer_lab();
    let (daemon, program) = install(firewall, &lab);
    let round = SkbRound {
        udp: established_udp(&lab, Sink::Fw, loadgen::blast),
        tcp: established_tcp(&lab, Sink::Fw, loadgen::blast),
        flood: dropped_flood(&lab, loadgen::blast),
    };
    assert_judged_on_tc(firewall, &lab, daemon.as_ref(), true);
    drop(daemon);
    drop(lab);
    drop(program);
    round
}

/// Which of a routed round's blasts a figure comes from.
type PickBlast = fn(&Routed) -> Blasted;

/// One round of (a) forwarded under one firewall: each blast delivered to upstream's
/// sockets, and again counted at upstream's port.
#[derive(Clone, Copy)]
struct Routed {
    udp: Blasted,
    tcp: Blasted,
    udp_at_port: Blasted,
    tcp_at_port: Blasted,
}

/// (a) forwarded, one round of one firewall: a routed lab, whose outer veth ends act as
/// hosts behind a wire, and fw's veth with GRO on for the generator's frames.
fn one_routed_round(router: Router) -> Routed {
    let lab = routed_lab("bench");
    lab.ok(Side::Fw, 5, &["ethtool", "-K", FW_IFACE, "gro", "on"]);
    let upstream = upstream_host(&lab);
    lab.ok(
        Side::Fw,
        5,
        &["ip", "route", "add", "198.19.0.0/16", "via", CLIENT_V4],
    );
    upstream.ok(
        5,
        &["ip", "route", "add", "198.19.0.0/16", "via", FW_WAN_V4],
    );
    let daemon = match router {
        Router::None => None,
        Router::Nftables => {
            install_nft(&lab, NFT_ROUTED_POLICY);
            None
        }
        Router::Session => Some(lab.daemon(&routed_policy(false))),
        Router::FastPath => Some(lab.daemon(&routed_policy(true))),
    };
    let routed = Routed {
        udp: established_udp(&lab, Sink::Upstream(&upstream), xdpgen::xdp_blast),
        tcp: established_tcp(&lab, Sink::Upstream(&upstream), xdpgen::xdp_blast),
        udp_at_port: established_udp(&lab, Sink::UpstreamPort(&upstream), xdpgen::xdp_blast),
        tcp_at_port: established_tcp(&lab, Sink::UpstreamPort(&upstream), xdpgen::xdp_blast),
    };
    if router == Router::FastPath {
        let stats = daemon.as_ref().expect("session runs").stats_json();
        assert!(
            session_tests::counter(&stats, "fast_path_forwarded") > 0,
            "(a) forwarded: nothing took the fast path: {stats}"
        );
    }
    drop(daemon);
    drop(upstream);
    drop(lab);
    routed
}

/// The socket-buffer section's markdown, its figures for the JSON (by firewall, and
/// what each one's CPU per packet is above no firewall's), and its ratios (keys `skb_*`)
/// for the JSON's `ratios`.
fn socket_buffer_report(
    rounds: &[Vec<SkbRound>],
) -> (String, Value, serde_json::Map<String, Value>) {
    let at = |firewall: Firewall| {
        Firewall::SOCKET_BUFFERS
            .iter()
            .position(|&each| each == firewall)
            .expect("a firewall of the socket-buffer section")
    };
    let figure = |firewall: Firewall, get: &dyn Fn(&SkbRound) -> f64| {
        median(rounds[at(firewall)].iter().map(get).collect())
    };
    let mut md = format!(
        "\n### Socket buffers into veth (AF_PACKET generator, {} s runs, median of \
         {SKB_ROUNDS} rounds)\n\n\
         The same (a) and (b), sent by one `AF_PACKET` thread (`sendmmsg`) from the client's \
         sockets, so that fw's veth (GRO off) receives socket buffers, as the host side of a \
         container's veth does. There veth copies each buffer into a page before an XDP \
         program may see it; TC ingress sees the buffer as it is. CPU per packet as above.\n",
        RUN.as_secs()
    );
    // (JSON key, table title, whether the blast's packets are delivered, the blast)
    let scenarios: [(&str, String, bool, PickSkb); 3] = [
        (
            "established_udp",
            format!("(a) {UDP_FLOWS} established UDP flows, 60-byte frames"),
            true,
            |r| r.udp,
        ),
        (
            "established_tcp",
            format!("(a) {TCP_FLOWS} established TCP connections, pure ACKs (54-byte frames)"),
            true,
            |r| r.tcp,
        ),
        (
            "drop_flood",
            format!(
                "(b) SYN flood to a closed port ({SYN_SOURCES} spoofed sources), dropped by \
                 the policy (no firewall: answered with RST)"
            ),
            false,
            |r| r.flood,
        ),
    ];
    let mut rows = serde_json::Map::new();
    for (key, title, delivers, pick) in &scenarios {
        let _ = writeln!(
            md,
            "\n{title}\n\n| firewall | sent pps |{} softirq ns/pkt | busy ns/pkt |\n\
             |---|---:|{}---:|---:|",
            if *delivers { " delivered pps |" } else { "" },
            if *delivers { "---:|" } else { "" },
        );
        for firewall in Firewall::SOCKET_BUFFERS {
            let sent = figure(firewall, &|r| pick(r).sent_pps);
            let delivered = figure(firewall, &|r| pick(r).delivered_pps);
            let softirq = figure(firewall, &|r| pick(r).softirq_ns);
            let busy = figure(firewall, &|r| pick(r).busy_ns);
            let delivered_cell = if *delivers {
                format!(" {delivered:.0} |")
            } else {
                String::new()
            };
            let _ = writeln!(
                md,
                "| {} | {sent:.0} |{delivered_cell} {softirq:.0} | {busy:.0} |",
                firewall.name()
            );
            let mut row = json!({"sent_pps": sent, "softirq_ns_per_packet": softirq,
                "busy_ns_per_packet": busy});
            if *delivers {
                row["delivered_pps"] = json!(delivered);
            }
            let entry = rows.entry(firewall.key()).or_insert_with(|| json!({}));
            entry[*key] = row;
        }
    }
    // (JSON key, label, the blast, whether it compares CPU (nftables / session) rather
    // than delivered pps (session / nftables), session on TC ingress's target)
    let compared: [(&str, &str, PickSkb, bool, Option<f64>); 5] = [
        (
            "established_udp_pps",
            "(a) UDP delivered pps",
            |r| r.udp,
            false,
            Some(1.5),
        ),
        (
            "established_udp_cpu",
            "(a) UDP CPU per packet (nftables / session)",
            |r| r.udp,
            true,
            None,
        ),
        (
            "established_tcp_pps",
            "(a) TCP delivered pps",
            |r| r.tcp,
            false,
            Some(1.5),
        ),
        (
            "established_tcp_cpu",
            "(a) TCP CPU per packet (nftables / session)",
            |r| r.tcp,
            true,
            None,
        ),
        (
            "drop_flood_cpu_per_packet",
            "(b) CPU per dropped packet (nftables / session)",
            |r| r.flood,
            true,
            Some(5.0),
        ),
    ];
    let ratio = |session: Firewall, pick: PickSkb, cpu: bool| {
        if cpu {
            figure(Firewall::Nftables, &|r| pick(r).softirq_ns)
                / figure(session, &|r| pick(r).softirq_ns)
        } else {
            figure(session, &|r| pick(r).delivered_pps)
                / figure(Firewall::Nftables, &|r| pick(r).delivered_pps)
        }
    };
    let _ = writeln!(
        md,
        "\n| socket buffers into veth, session vs nftables | session, TC ingress | target | \
         met | session, XDP (for comparison) |\n|---|---:|---:|:-:|---:|"
    );
    let mut ratios = serde_json::Map::new();
    for (key, label, pick, cpu, target) in compared {
        let tc = ratio(Firewall::SessionTc, pick, cpu);
        let xdp = ratio(Firewall::Session, pick, cpu);
        let (target_cell, met_cell, tc_value) = match target {
            Some(target) => (
                format!("≥ {target}×"),
                if tc >= target { "yes" } else { "**no**" }.to_string(),
                json!({"value": tc, "target": target, "meets_target": tc >= target}),
            ),
            None => ("-".into(), "-".into(), json!({"value": tc})),
        };
        let _ = writeln!(
            md,
            "| {label} | {tc:.2}× | {target_cell} | {met_cell} | {xdp:.2}× |"
        );
        ratios.insert(format!("skb_{key}_{}", Firewall::SessionTc.key()), tc_value);
        ratios.insert(
            format!("skb_{key}_{}", Firewall::Session.key()),
            json!({"value": xdp}),
        );
    }
    let above_none = |firewall: Firewall| {
        figure(firewall, &|r| r.udp.softirq_ns) - figure(Firewall::None, &|r| r.udp.softirq_ns)
    };
    let (tc_ns, xdp_ns, nft_ns) = (
        above_none(Firewall::SessionTc),
        above_none(Firewall::Session),
        above_none(Firewall::Nftables),
    );
    let _ = writeln!(
        md,
        "\n(a) UDP CPU per packet above no firewall: session on TC ingress {tc_ns:.0} ns, \
         session on XDP {xdp_ns:.0} ns (veth's copy included), nftables {nft_ns:.0} ns."
    );
    let section = json!({
        "firewalls": Value::Object(rows),
        "established_udp_softirq_ns_above_none": {Firewall::SessionTc.key(): tc_ns,
            Firewall::Session.key(): xdp_ns, Firewall::Nftables.key(): nft_ns},
    });
    (md, section, ratios)
}

/// (b) blocklist: the blocklist's sizes, each measured in the same rounds.
const BLOCKLIST_SIZES: [usize; 2] = [100_000, 1_000_000];
/// Rounds of (b) blocklist, run after the socket-buffer section. Fewer than [`ROUNDS`],
/// as for [`SKB_ROUNDS`]: five labs a round, two of them loading a million prefixes.
const BLOCKLIST_ROUNDS: usize = 3;
/// `[limits] max_set_entries` of (b) blocklist's session policy: room for the largest list
/// (the default, 262,144, is pf's order, not a million).
const BLOCKLIST_SET_LIMIT: usize = 1 << 20;
const _: () = assert!(BLOCKLIST_SIZES[1] <= BLOCKLIST_SET_LIMIT);
/// (b) blocklist: the most members per family the flood comes from, one SYN each.
const BLOCKLIST_SOURCES: usize = loadgen::MAX_SOURCES;
/// session's blocklist rule, whose hits show that it dropped the flood.
const BLOCKLIST_RULE: &str = "blocklist";
/// IPv4 /24 members: 198.19.1.0/24 to 198.19.255.0/24 (198.19.0.0/24 is a routed lab's
/// upstream link).
const V4_NETWORKS: usize = 255;
/// IPv4 /32 members: 198.18.1.0 to 198.18.255.255 (198.18.0.0/24 is the lab link).
const V4_HOSTS: usize = 255 * 256;
/// IPv6 /64 members: 2001:2:0:1000::/64 to 2001:2:0:efff::/64, clear of the lab link
/// (2001:2::/64), a routed lab's upstream link (2001:2:0:1::/64) and the spoofed sources
/// of [`loadgen::spoofed_source`] (2001:2:0:ff00::/64). /128 members lie in
/// 2001:2:0:f000::/64 to 2001:2:0:feff::/64.
const V6_NETWORKS: usize = 0xe000;

/// A blocklist for (b) blocklist: its prefixes, and the addresses of the members the
/// flood comes from.
struct Blocklist {
    /// IPv4 and IPv6 prefixes, as a set file and nftables' set elements write them.
    v4: Vec<String>,
    v6: Vec<String>,
    /// How many prefixes of each kind: IPv4 /32s and /24s, IPv6 /128s and /64s.
    kinds: [usize; 4],
    /// One address in each of up to [`BLOCKLIST_SOURCES`] members per family, spread
    /// evenly over the list, so the flood's lookups touch the whole set.
    v4_sources: Vec<IpAddr>,
    v6_sources: Vec<IpAddr>,
}

impl Blocklist {
    /// `count` disjoint prefixes (nftables refuses overlapping intervals), all inside
    /// 198.18.0.0/15 and 2001:2::/48 and clear of the labs' own addresses: half of them
    /// IPv4 as far as its room goes, of which half /24s (at most [`V4_NETWORKS`]) and the
    /// rest /32s; the others IPv6, of which half /64s (at most [`V6_NETWORKS`]) and the
    /// rest /128s. The IPv6 members' flood sources come from [`xdpgen::v6_source`], so
    /// that the XDP generator can send SYNs from all of them; the /128 members are such
    /// addresses themselves.
    fn new(count: usize) -> Blocklist {
        let v4_count = (count / 2).min(V4_NETWORKS + V4_HOSTS);
        let v4_24 = (v4_count / 2).min(V4_NETWORKS);
        let v6_count = count - v4_count;
        let v6_64 = (v6_count / 2).min(V6_NETWORKS);
        let kinds = [v4_count - v4_24, v4_24, v6_count - v6_64, v6_64];
        let v4: Vec<(IpAddr, u8)> = (0..kinds[1])
            .map(|i| (Ipv4Addr::new(198, 19, 1 + i as u8, 0).into(), 24))
            .chain((0..kinds[0]).map(|i| {
                let [_, _, hi, lo] = (256 + i as u32).to_be_bytes();
                (Ipv4Addr::new(198, 18, hi, lo).into(), 32)
            }))
            .collect();
        let network = |word: usize| Ipv6Addr::new(0x2001, 2, 0, word as u16, 0, 0, 0, 0);
        let v6: Vec<(IpAddr, u8)> = (0..kinds[3])
            .map(|i| (network(0x1000 + i).into(), 64))
            .chain((0..kinds[2]).map(|i| {
                let host = xdpgen::v6_source(network(0xf000 + i % 0xf00), i as u32);
                (host.into(), 128)
            }))
            .collect();
        let text = |prefixes: &[(IpAddr, u8)]| {
            prefixes
                .iter()
                .map(|&(addr, len)| match (addr, len) {
                    (IpAddr::V4(_), 32) | (IpAddr::V6(_), 128) => addr.to_string(),
                    _ => format!("{addr}/{len}"),
                })
                .collect()
        };
        Blocklist {
            v4: text(&v4),
            v6: text(&v6),
            kinds,
            v4_sources: member_sources(&v4),
            v6_sources: member_sources(&v6),
        }
    }

    /// The list as a set file: one prefix a line.
    fn set_file(&self) -> String {
        let mut text = self.v4.join("\n");
        text.push('\n');
        text.push_str(&self.v6.join("\n"));
        text.push('\n');
        text
    }
}

/// One address in each of up to [`BLOCKLIST_SOURCES`] of `members`, spread evenly over
/// them: the member itself if it is one address, else a host inside it (for a /64, one
/// from [`xdpgen::v6_source`]).
fn member_sources(members: &[(IpAddr, u8)]) -> Vec<IpAddr> {
    let count = members.len().min(BLOCKLIST_SOURCES);
    (0..count)
        .map(|k| match members[k * members.len() / count] {
            (IpAddr::V4(network), 24) => {
                let [a, b, c, _] = network.octets();
                Ipv4Addr::new(a, b, c, 1 + (k % 254) as u8).into()
            }
            (IpAddr::V6(network), 64) => xdpgen::v6_source(network, k as u32).into(),
            (addr, _) => addr,
        })
        .collect()
}

/// (b) blocklist under session: [`STREAM_POLICY`] with the blocklist as the set `block`,
/// read from `file`, and before the rules that accept, a rule that drops its members'
/// new flows.
fn blocklist_policy(file: &Path) -> String {
    let first_rule = STREAM_POLICY
        .find("\n[[rule]]")
        .expect("the stream policy has rules");
    let (head, rules) = STREAM_POLICY.split_at(first_rule);
    format!(
        "{head}\n[limits]\nmax_set_entries = {BLOCKLIST_SET_LIMIT}\n\n[sets]\nblock = {{ file = \"{}\" }}\n\n[[rule]]\nname = \"{BLOCKLIST_RULE}\"\n\
         state = [\"new\"]\nsrc = [\"@block\"]\naction = \"drop\"\n{rules}",
        file.display()
    )
}

/// (b) blocklist under nftables: [`NFT_POLICY`] with the blocklist in two interval sets
/// (a set holds one family), and first in its chain a rule per family that counts and
/// drops the members' packets. The chain is NFT_POLICY's own, on the input hook, as in
/// (b): the same policy with a blocklist added is what this compares, judged where
/// nftables judges the rest of it, after conntrack has looked the packet up, as session
/// judges its rules after its own session lookup. First in the chain is where the flood
/// costs nftables least: no other rule runs before the set lookup. (nftables could drop
/// earlier, at the netdev ingress hook before conntrack; that is another placement than
/// the policy's, not measured here.)
fn nft_blocklist_policy(list: &Blocklist) -> String {
    let (table, chain) = NFT_POLICY
        .split_once("  chain input {\n")
        .expect("NFT_POLICY has an input chain");
    let (hook, rules) = chain
        .split_once("policy drop;\n")
        .expect("NFT_POLICY's chain has a drop policy");
    format!(
        "{table}  set block {{ type ipv4_addr; flags interval; elements = {{ {} }} }}\n  \
         set block6 {{ type ipv6_addr; flags interval; elements = {{ {} }} }}\n  \
         chain input {{\n{hook}policy drop;\n    ip saddr @block counter drop\n    \
         ip6 saddr @block6 counter drop\n{rules}",
        list.v4.join(",\n"),
        list.v6.join(",\n")
    )
}

/// A fresh dual-stack lab for (b) blocklist: fw's veth with GRO on for the XDP
/// generator's frames, as in [`bench_lab`]; a route from fw to 198.18.0.0/15 through the
/// client, so that reverse-path filtering, where the host turns it on (namespaces inherit
/// its IPv4 setting), passes the flood on to the firewall under test; and permanent
/// neighbour entries on both ends, so that the non-member's check connections need no
/// neighbour discovery, which both policies would drop.
fn blocklist_lab() -> Lab {
    let lab = Lab::dual_stack("bench");
    lab.ok(Side::Fw, 5, &["ethtool", "-K", FW_IFACE, "gro", "on"]);
    lab.ok(
        Side::Fw,
        5,
        &["ip", "route", "add", "198.18.0.0/15", "via", CLIENT_V4],
    );
    for (side, peer) in [(Side::Client, Side::Fw), (Side::Fw, Side::Client)] {
        let mac = lab.mac(peer).map(|byte| format!("{byte:02x}")).join(":");
        lab.ok(
            side,
            5,
            &[
                "ip",
                "-6",
                "neigh",
                "replace",
                Family::V6.addr(peer),
                "lladdr",
                &mac,
                "dev",
                Lab::iface(side),
                "nud",
                "permanent",
            ],
        );
    }
    lab
}

/// The firewalls of (b) blocklist.
#[derive(Clone, Copy, PartialEq)]
enum Blocker {
    /// `session_drop_all`: the floor for dropping in XDP, whatever the list.
    DropAll,
    Nftables,
    Session,
}

impl Blocker {
    /// The firewalls that hold the blocklist, measured at each of [`BLOCKLIST_SIZES`].
    const WITH_SETS: [Blocker; 2] = [Blocker::Nftables, Blocker::Session];

    fn name(self) -> &'static str {
        match self {
            Blocker::DropAll => "drop-everything XDP (the floor)",
            Blocker::Nftables => "nftables (ct state), sets on input",
            Blocker::Session => "session",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Blocker::DropAll => "drop_floor",
            Blocker::Nftables => "nftables",
            Blocker::Session => "session",
        }
    }
}

/// One firewall's figures in one round of (b) blocklist.
#[derive(Clone, Copy)]
struct Blocked {
    v4: Blasted,
    v6: Blasted,
    /// Seconds from a fresh lab to the firewall in place: `nft -f`, or the daemon's
    /// start to `ready` (loading the set included).
    ready_s: f64,
}

/// (b) blocklist, one firewall in a fresh lab: a SYN flood to fw's open port 8080 from the
/// list's members, over IPv4 and then over IPv6. Stops the bench unless the blocklist,
/// and nothing else, stopped it: nothing of either flood may reach fw's TCP layer, the
/// firewall's own blocklist counters must have counted nearly all of both, and the client,
/// no member, must still connect to the same port over both families.
fn blocklist_round(blocker: Blocker, list: &Blocklist) -> Blocked {
    let lab = blocklist_lab();
    let started = Instant::now();
    let (daemon, program) = match blocker {
        Blocker::DropAll => (None, Some(BareXdp::attach(&lab, "session_drop_all"))),
        Blocker::Nftables => {
            install_nft(&lab, &nft_blocklist_policy(list));
            (None, None)
        }
        Blocker::Session => {
            let file = lab.scratch_path("block.txt");
            std::fs::write(&file, list.set_file()).expect("writing the blocklist");
            (Some(lab.daemon(&blocklist_policy(&file))), None)
        }
    };
    let ready_s = started.elapsed().as_secs_f64();
    let listeners =
        [Family::V4, Family::V6].map(|family| lab.tcp_listen(Side::Fw, family, TCP_PORT));
    let flood = |family: Family, sources: &[IpAddr]| {
        let frames = loadgen::syn_frames_from(
            lab.mac(Side::Client),
            lab.mac(Side::Fw),
            family.sock(Side::Fw, TCP_PORT),
            sources,
        );
        let flood = blast(&lab, xdpgen::xdp_blast, frames, || {
            Sink::Fw.delivered(&lab, Layer::Tcp)
        });
        assert!(
            flood.delivered_pps == 0.0,
            "(b) blocklist under {}: {:.0} packets/s of the {family:?} SYN flood from the \
             blocklist's members reached fw's TCP layer; the blocklist must drop them all",
            blocker.name(),
            flood.delivered_pps
        );
        flood
    };
    let blocked = Blocked {
        v4: flood(Family::V4, &list.v4_sources),
        v6: flood(Family::V6, &list.v6_sources),
        ready_s,
    };
    if blocker != Blocker::DropAll {
        for (family, listener) in [Family::V4, Family::V6].into_iter().zip(&listeners) {
            let to = family.sock(Side::Fw, TCP_PORT);
            let _client = lab
                .tcp_connect(Side::Client, to, Duration::from_secs(2))
                .unwrap_or_else(|error| {
                    panic!(
                        "(b) blocklist under {}: the client, no member of the blocklist, \
                         cannot connect to the open port {to}: {error}",
                        blocker.name()
                    )
                });
            session_tests::accept_within(listener, session_tests::IO_TIMEOUT);
        }
        let sent = blocked.v4.packets + blocked.v6.packets;
        let counted = match daemon.as_ref() {
            Some(daemon) => session_tests::rule_hits(&daemon.stats_json(), BLOCKLIST_RULE),
            None => {
                // nft 1.0.6 fetches every element of a table's sets to list any of it, and
                // the kernel dumps an interval set of a million prefixes in minutes (each
                // message of the dump walks the tree from its start): empty the sets first,
                // which leaves the rules' counters as they are.
                lab.ok(
                    Side::Fw,
                    10,
                    &[
                        "nft",
                        "flush set inet bench block; flush set inet bench block6",
                    ],
                );
                let chain = lab.ok(
                    Side::Fw,
                    10,
                    &["nft", "list", "chain", "inet", "bench", "input"],
                );
                chain
                    .lines()
                    .filter(|line| line.contains("saddr @block"))
                    .map(nft_packets)
                    .sum()
            }
        };
        assert!(
            counted * 10 >= sent * 9,
            "(b) blocklist under {}: its blocklist counted {counted} drops of the {sent} SYNs \
             sent from members; the figures must come from the blocklist dropping them",
            blocker.name()
        );
    }
    drop(listeners);
    drop(daemon);
    drop(lab);
    drop(program);
    blocked
}

/// Which of a (b) blocklist round's floods, IPv4 or IPv6, a figure comes from.
type PickFlood = fn(&Blocked) -> Blasted;

/// (b) blocklist's markdown, its figures for the JSON, and its ratios (keys
/// `blocklist_*`) for the JSON's `ratios`. `rounds[size][firewall]` holds the rounds of
/// [`Blocker::WITH_SETS`] at each of [`BLOCKLIST_SIZES`].
fn blocklist_report(
    lists: &[Blocklist],
    floors: &[Blocked],
    rounds: &[Vec<Vec<Blocked>>],
) -> (String, Value, serde_json::Map<String, Value>) {
    let families: [(&str, PickFlood); 2] = [("ipv4", |b| b.v4), ("ipv6", |b| b.v6)];
    let figures = |samples: &[Blocked]| {
        let median_of = |get: &dyn Fn(&Blocked) -> f64| median(samples.iter().map(get).collect());
        let flood = families.map(|(_, pick)| {
            [
                median_of(&|b| pick(b).sent_pps),
                median_of(&|b| pick(b).softirq_ns),
                median_of(&|b| pick(b).busy_ns),
            ]
        });
        (median_of(&|b| b.ready_s), flood)
    };
    let json_row = |(ready_s, flood): (f64, [[f64; 3]; 2])| {
        let mut row = json!({"ready_seconds": ready_s});
        for ((family, _), [pps, softirq, busy]) in families.iter().zip(flood) {
            row[*family] = json!({"dropped_pps": pps, "softirq_ns_per_packet": softirq,
                "busy_ns_per_packet": busy});
        }
        row
    };
    let md_row = |name: &str, prefixes: &str, (ready_s, flood): (f64, [[f64; 3]; 2])| {
        let cells: Vec<String> = flood
            .iter()
            .flatten()
            .map(|value| format!("{value:.0}"))
            .collect();
        format!(
            "| {name} | {prefixes} | {ready_s:.1} | {} |\n",
            cells.join(" | ")
        )
    };
    let kinds = |list: &Blocklist| {
        let [v4_32, v4_24, v6_128, v6_64] = list.kinds;
        format!("{v4_32} IPv4 /32s, {v4_24} /24s, {v6_128} IPv6 /128s, {v6_64} /64s")
    };
    let mut md = format!(
        "\n### Blocklist: a SYN flood from its members (XDP generator, {} s runs, median of \
         {BLOCKLIST_ROUNDS} rounds)\n\n\
         (b) once more, with the policy's port open: fw serves TCP {TCP_PORT} under (b)'s \
         policy plus a blocklist, and the SYNs come from up to {BLOCKLIST_SOURCES} \
         of its members per family to that port, so that only the blocklist stops them. \
         session holds the list in a set of its policy, dropped by a rule for new flows \
         before the rules that accept; nftables in two interval sets, dropped first in its \
         input chain. Dropped pps = the generator's rate; the bench checks that none of it \
         reached fw's TCP layer, that the firewall's blocklist counter counted 90% of it or \
         more, and that \
         the client, no member, still connects. Ready = seconds from a fresh lab to the \
         firewall in place (`nft -f`; the daemon's start to ready, set loaded). Lists: {}.\n\n\
         | firewall | prefixes | ready s | IPv4 dropped pps | softirq ns/pkt | busy ns/pkt | \
         IPv6 dropped pps | softirq ns/pkt | busy ns/pkt |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        RUN.as_secs(),
        lists.iter().map(kinds).collect::<Vec<_>>().join("; "),
    );
    let floor = figures(floors);
    md.push_str(&md_row(Blocker::DropAll.name(), "-", floor));
    let mut sizes = Vec::new();
    let mut ratios = serde_json::Map::new();
    let mut ratio_lines = Vec::new();
    for ((list, size_rounds), size) in lists.iter().zip(rounds).zip(BLOCKLIST_SIZES) {
        let [v4_32, v4_24, v6_128, v6_64] = list.kinds;
        let mut entry = json!({"prefixes": size, "ipv4_32": v4_32, "ipv4_24": v4_24,
            "ipv6_128": v6_128, "ipv6_64": v6_64,
            "sources": {"ipv4": list.v4_sources.len(), "ipv6": list.v6_sources.len()}});
        let [nft, session] = [0, 1].map(|index| figures(&size_rounds[index]));
        for (blocker, row) in Blocker::WITH_SETS.into_iter().zip([nft, session]) {
            md.push_str(&md_row(blocker.name(), &size.to_string(), row));
            entry[blocker.key()] = json_row(row);
        }
        let pps = [0, 1].map(|family| session.1[family][0] / nft.1[family][0]);
        let cpu = [0, 1].map(|family| nft.1[family][1] / session.1[family][1]);
        let above_floor = [0, 1].map(|family| session.1[family][1] - floor.1[family][1]);
        ratio_lines.push(format!(
            "session vs nftables, {size} prefixes: dropped pps (session / nftables) IPv4 \
             {:.2}×, IPv6 {:.2}×; CPU per dropped packet (nftables / session) IPv4 {:.2}×, \
             IPv6 {:.2}×; session above the floor: IPv4 {:.0} ns, IPv6 {:.0} ns.",
            pps[0], pps[1], cpu[0], cpu[1], above_floor[0], above_floor[1]
        ));
        for (index, (family, _)) in families.iter().enumerate() {
            ratios.insert(
                format!("blocklist_{size}_{family}_dropped_pps"),
                json!({"value": pps[index]}),
            );
            ratios.insert(
                format!("blocklist_{size}_{family}_cpu_per_packet"),
                json!({"value": cpu[index]}),
            );
            entry["session_softirq_ns_above_floor"][*family] = json!(above_floor[index]);
        }
        sizes.push(entry);
    }
    let _ = writeln!(md, "\n{}", ratio_lines.join("\n\n"));
    let section = json!({
        "rounds": BLOCKLIST_ROUNDS,
        "flood": format!("TCP SYNs to fw's open port {TCP_PORT}, one per member"),
        "drop_floor": json_row(floor),
        "sets": sizes,
    });
    (md, section, ratios)
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    if bench::only_listing() {
        return;
    }
    let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); Firewall::ALL.len()];
    let mut floors = Vec::new();
    let mut routed: Vec<Vec<Routed>> = vec![Vec::new(); Router::ALL.len()];
    for round in 0..ROUNDS {
        for (index, firewall) in Firewall::ALL.into_iter().enumerate() {
            eprintln!("e2e: round {} of {ROUNDS}: {}", round + 1, firewall.name());
            rounds[index].push(one_round(firewall));
        }
        eprintln!("e2e: round {} of {ROUNDS}: drop-everything XDP", round + 1);
        floors.push(drop_floor());
        for (index, router) in Router::ALL.into_iter().enumerate() {
            eprintln!(
                "e2e: round {} of {ROUNDS}: (a) forwarded, {}",
                round + 1,
                router.name()
            );
            routed[index].push(one_routed_round(router));
        }
    }
    let mut skb_rounds: Vec<Vec<SkbRound>> = vec![Vec::new(); Firewall::SOCKET_BUFFERS.len()];
    for round in 0..SKB_ROUNDS {
        for (index, firewall) in Firewall::SOCKET_BUFFERS.into_iter().enumerate() {
            eprintln!(
                "e2e: socket buffers, round {} of {SKB_ROUNDS}: {}",
                round + 1,
                firewall.name()
            );
            skb_rounds[index].push(one_skb_round(firewall));
        }
    }
    let lists = BLOCKLIST_SIZES.map(Blocklist::new);
    let blocklist_started = Instant::now();
    let mut blocklist_floors = Vec::new();
    let mut blocklist_rounds = vec![vec![Vec::new(); Blocker::WITH_SETS.len()]; lists.len()];
    for round in 0..BLOCKLIST_ROUNDS {
        eprintln!(
            "e2e: blocklist, round {} of {BLOCKLIST_ROUNDS}: {}",
            round + 1,
            Blocker::DropAll.name()
        );
        blocklist_floors.push(blocklist_round(Blocker::DropAll, &lists[0]));
        for (list, size_rounds) in lists.iter().zip(&mut blocklist_rounds) {
            for (blocker, samples) in Blocker::WITH_SETS.into_iter().zip(size_rounds.iter_mut()) {
                eprintln!(
                    "e2e: blocklist, round {} of {BLOCKLIST_ROUNDS}: {}, {} prefixes",
                    round + 1,
                    blocker.name(),
                    list.v4.len() + list.v6.len()
                );
                samples.push(blocklist_round(blocker, list));
            }
        }
    }
    eprintln!("e2e: blocklist took {:.0?}", blocklist_started.elapsed());
    let floor = [
        median(floors.iter().map(|f| f.sent_pps).collect()),
        median(floors.iter().map(|f| f.softirq_ns).collect()),
        median(floors.iter().map(|f| f.busy_ns).collect()),
    ];
    let figure =
        |index: usize, get: &dyn Fn(&Round) -> f64| median(rounds[index].iter().map(get).collect());
    let (nft, session, session_tc) = (2, 3, 4);

    let mut md = format!(
        "### End to end (veth between two namespaces, {} s runs, median of {ROUNDS} rounds)\n\n\
         CPU per packet = softirq time of all CPUs over the blast (where fw receives: XDP, \
         nftables hooks, IP stack) / packets sent. The generator (one thread, \
         XDP frames from `BPF_PROG_TEST_RUN` live-frame mode into the client's veth end, so \
         fw receives XDP frames and copies nothing before XDP) runs on the same machine.\n\n",
        RUN.as_secs()
    );
    let _ = writeln!(
        md,
        "(a) {UDP_FLOWS} established UDP flows, 60-byte frames\n\n\
         | firewall | sent pps | delivered pps | softirq ns/pkt | busy ns/pkt |\n|---|---:|---:|---:|---:|"
    );
    let mut json_rows = serde_json::Map::new();
    for (index, firewall) in Firewall::ALL.into_iter().enumerate() {
        let udp = [
            figure(index, &|r| r.udp.sent_pps),
            figure(index, &|r| r.udp.delivered_pps),
            figure(index, &|r| r.udp.softirq_ns),
            figure(index, &|r| r.udp.busy_ns),
        ];
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            firewall.name(),
            udp[0],
            udp[1],
            udp[2],
            udp[3]
        );
        let flood = [
            figure(index, &|r| r.flood.sent_pps),
            figure(index, &|r| r.flood.softirq_ns),
            figure(index, &|r| r.flood.busy_ns),
        ];
        let tcp = [
            figure(index, &|r| r.tcp.sent_pps),
            figure(index, &|r| r.tcp.delivered_pps),
            figure(index, &|r| r.tcp.softirq_ns),
            figure(index, &|r| r.tcp.busy_ns),
        ];
        let conn = figure(index, &|r| r.connections.0);
        let failed: u64 = rounds[index].iter().map(|r| r.connections.1).sum();
        let direct = figure(index, &|r| r.direct_connections.0);
        let direct_failed: u64 = rounds[index].iter().map(|r| r.direct_connections.1).sum();
        json_rows.insert(
            firewall.key().into(),
            json!({
                "established_udp": {"sent_pps": udp[0], "delivered_pps": udp[1],
                    "softirq_ns_per_packet": udp[2], "busy_ns_per_packet": udp[3]},
                "established_tcp": {"sent_pps": tcp[0], "delivered_pps": tcp[1],
                    "softirq_ns_per_packet": tcp[2], "busy_ns_per_packet": tcp[3]},
                "drop_flood": {"sent_pps": flood[0], "softirq_ns_per_packet": flood[1],
                    "busy_ns_per_packet": flood[2]},
                "tcp_connections": {"per_second": conn, "failed": failed},
                "tcp_connections_direct_veth": {"per_second": direct, "failed": direct_failed},
            }),
        );
    }
    let _ = writeln!(
        md,
        "\n(a) {TCP_FLOWS} established TCP connections, pure ACKs (54-byte frames)\n\n\
         | firewall | sent pps | delivered pps | softirq ns/pkt | busy ns/pkt |\n|---|---:|---:|---:|---:|"
    );
    for (index, firewall) in Firewall::ALL.into_iter().enumerate() {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            firewall.name(),
            figure(index, &|r| r.tcp.sent_pps),
            figure(index, &|r| r.tcp.delivered_pps),
            figure(index, &|r| r.tcp.softirq_ns),
            figure(index, &|r| r.tcp.busy_ns),
        );
    }
    let _ = writeln!(
        md,
        "\n(b) SYN flood to a closed port ({SYN_SOURCES} spoofed sources), dropped by the policy \
         (no firewall: answered with RST)\n\n\
         | firewall | sent pps | softirq ns/pkt | busy ns/pkt |\n|---|---:|---:|---:|"
    );
    for (index, firewall) in Firewall::ALL.into_iter().enumerate() {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} |",
            firewall.name(),
            figure(index, &|r| r.flood.sent_pps),
            figure(index, &|r| r.flood.softirq_ns),
            figure(index, &|r| r.flood.busy_ns),
        );
    }
    let _ = writeln!(
        md,
        "| drop-everything XDP (the floor for dropping in XDP here) | {:.0} | {:.0} | {:.0} |",
        floor[0], floor[1], floor[2]
    );
    let _ = writeln!(
        md,
        "\n(c) new TCP connections (connect, {EXCHANGE} bytes each way, close), one client \
         thread. Through the wire, fw receives the client's segments as XDP frames, as from a \
         NIC; directly, fw's veth receives the client's socket buffers, and with any XDP \
         program attached veth switches to a slower receive path.\n\n\
         | firewall | through the wire, connections/s | failed (all rounds) | veth paired directly, connections/s | failed |\n|---|---:|---:|---:|---:|"
    );
    for (index, firewall) in Firewall::ALL.into_iter().enumerate() {
        let failed = |get: &dyn Fn(&Round) -> (f64, u64)| -> u64 {
            rounds[index].iter().map(|r| get(r).1).sum()
        };
        let _ = writeln!(
            md,
            "| {} | {:.0} | {} | {:.0} | {} |",
            firewall.name(),
            figure(index, &|r| r.connections.0),
            failed(&|r| r.connections),
            figure(index, &|r| r.direct_connections.0),
            failed(&|r| r.direct_connections),
        );
    }
    let met = |value: f64, target: f64| if value >= target { "yes" } else { "**no**" };
    let routed_figure = |index: usize, get: &dyn Fn(&Routed) -> f64| {
        median(routed[index].iter().map(get).collect())
    };
    let udp_title = format!("{UDP_FLOWS} established UDP flows, 60-byte frames");
    let tcp_title = format!("{TCP_FLOWS} established TCP connections, pure ACKs (54-byte frames)");
    let at_port = "counted at upstream's port (its netdev ingress hook counts and drops them \
                   before its IP stack, as a tester's port would)";
    // (JSON key, table title, label in the ratios, the blast)
    let forwarded: [(&str, String, &str, PickBlast); 4] = [
        (
            "established_udp",
            format!("{udp_title}, delivered to upstream's UDP layer"),
            "UDP, pps at upstream's sockets",
            |r| r.udp,
        ),
        (
            "established_tcp",
            format!("{tcp_title}, delivered to upstream's TCP layer"),
            "TCP, pps at upstream's sockets",
            |r| r.tcp,
        ),
        (
            "established_udp_at_port",
            format!("{udp_title}, {at_port}"),
            "UDP, pps at upstream's port",
            |r| r.udp_at_port,
        ),
        (
            "established_tcp_at_port",
            format!("{tcp_title}, {at_port}"),
            "TCP, pps at upstream's port",
            |r| r.tcp_at_port,
        ),
    ];
    let mut routed_rows = serde_json::Map::new();
    for (key, title, _, pick) in &forwarded {
        let _ = writeln!(
            md,
            "\n(a) forwarded, from the client through fw to upstream: {title}\n\n\
             | firewall on fw | sent pps | delivered pps | softirq ns/pkt | busy ns/pkt |\n|---|---:|---:|---:|---:|"
        );
        for (index, router) in Router::ALL.into_iter().enumerate() {
            let row = [
                routed_figure(index, &|r| pick(r).sent_pps),
                routed_figure(index, &|r| pick(r).delivered_pps),
                routed_figure(index, &|r| pick(r).softirq_ns),
                routed_figure(index, &|r| pick(r).busy_ns),
            ];
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} |",
                router.name(),
                row[0],
                row[1],
                row[2],
                row[3]
            );
            let entry = routed_rows.entry(router.key()).or_insert_with(|| json!({}));
            entry[*key] = json!({"sent_pps": row[0], "delivered_pps": row[1],
                "softirq_ns_per_packet": row[2], "busy_ns_per_packet": row[3]});
        }
    }
    let (routed_nft, routed_session, fast_path) = (1, 2, 3);
    let mut forwarded_ratio_rows = String::new();
    let mut forwarded_ratios = serde_json::Map::new();
    for (index, path, target) in [
        (fast_path, "fast_path", Some(1.5)),
        (routed_session, "kernel_path", None),
    ] {
        for (key, _, label, pick) in &forwarded {
            let ratio = routed_figure(index, &|r| pick(r).delivered_pps)
                / routed_figure(routed_nft, &|r| pick(r).delivered_pps);
            let path_name = path.replace('_', " ");
            let (target_cell, met_cell, value) = match target {
                Some(target) => (
                    format!("≥ {target}×"),
                    met(ratio, target).to_string(),
                    json!({"value": ratio, "target": target, "meets_target": ratio >= target}),
                ),
                None => ("-".into(), "-".into(), json!({"value": ratio})),
            };
            let _ = writeln!(
                forwarded_ratio_rows,
                "| (a) forwarded {label}, {path_name} | {ratio:.2}× | {target_cell} | {met_cell} |"
            );
            forwarded_ratios.insert(format!("forwarded_{key}_pps_{path}"), value);
        }
    }
    let ratio_a = figure(session, &|r| r.udp.delivered_pps) / figure(nft, &|r| r.udp.delivered_pps);
    let ratio_a_cpu = figure(nft, &|r| r.udp.softirq_ns) / figure(session, &|r| r.udp.softirq_ns);
    let ratio_a_tcp =
        figure(session, &|r| r.tcp.delivered_pps) / figure(nft, &|r| r.tcp.delivered_pps);
    let ratio_a_tcp_cpu =
        figure(nft, &|r| r.tcp.softirq_ns) / figure(session, &|r| r.tcp.softirq_ns);
    let ratio_b = figure(nft, &|r| r.flood.softirq_ns) / figure(session, &|r| r.flood.softirq_ns);
    let ratio_c = figure(session, &|r| r.connections.0) / figure(nft, &|r| r.connections.0);
    let ratio_c_direct =
        figure(session, &|r| r.direct_connections.0) / figure(nft, &|r| r.direct_connections.0);
    let ratio_c_direct_tc =
        figure(session_tc, &|r| r.direct_connections.0) / figure(nft, &|r| r.direct_connections.0);
    let (none, noop_xdp) = (0, 1);
    let session_own_ns =
        figure(session, &|r| r.udp.softirq_ns) - figure(noop_xdp, &|r| r.udp.softirq_ns);
    let nft_own_ns = figure(nft, &|r| r.udp.softirq_ns) - figure(none, &|r| r.udp.softirq_ns);
    // One client thread waits for each connection, so a firewall's cost shows as time per
    // connection: the inverse rates' difference.
    let micros_per_connection = |index: usize| 1e6 / figure(index, &|r| r.connections.0);
    let session_own_conn_us = micros_per_connection(session) - micros_per_connection(noop_xdp);
    let nft_own_conn_us = micros_per_connection(nft) - micros_per_connection(none);
    let noop_conn_us = micros_per_connection(noop_xdp) - micros_per_connection(none);
    let direct_noop_conn_us = 1e6 / figure(noop_xdp, &|r| r.direct_connections.0)
        - 1e6 / figure(none, &|r| r.direct_connections.0);
    let floor_ratio = figure(nft, &|r| r.flood.softirq_ns) / floor[1];
    let session_above_floor = figure(session, &|r| r.flood.softirq_ns) - floor[1];
    let _ = writeln!(
        md,
        "\n| session vs nftables | ratio | target | met |\n|---|---:|---:|:-:|\n\
         | (a) UDP delivered pps | {ratio_a:.2}× | ≥ 1.5× | {} |\n\
         | (a) UDP CPU per packet (nftables / session) | {ratio_a_cpu:.2}× | - | - |\n\
         | (a) TCP delivered pps | {ratio_a_tcp:.2}× | ≥ 1.5× | {} |\n\
         | (a) TCP CPU per packet (nftables / session) | {ratio_a_tcp_cpu:.2}× | - | - |\n\
         | (b) CPU per dropped packet (nftables / session) | {ratio_b:.2}× | ≥ 5× | {} |\n\
         | (c) connections/s, through the wire | {ratio_c:.2}× | ≥ 1× | {} |\n\
         | (c) connections/s, veth paired directly | {ratio_c_direct:.2}× | - | - |\n\
         | (c) connections/s, veth paired directly, session on TC ingress | \
         {ratio_c_direct_tc:.2}× | ≥ 1× | {} |\n\
         {forwarded_ratio_rows}\n\
         (a) CPU per packet above each one's own baseline: session {session_own_ns:.0} ns \
         above the do-nothing XDP program, nftables {nft_own_ns:.0} ns above no firewall. \
         (b) with XDP's own floor: nftables / drop-everything XDP = {floor_ratio:.2}×; session \
         spends {session_above_floor:.0} ns per dropped packet above that floor. \
         (c) through the wire, time per connection above each one's own baseline: session \
         {session_own_conn_us:.1} µs above the do-nothing XDP program, nftables \
         {nft_own_conn_us:.1} µs above no firewall; the do-nothing XDP program itself adds \
         {noop_conn_us:.1} µs there, and {direct_noop_conn_us:.1} µs with the veth paired \
         directly (veth's receive path with any XDP program attached).",
        met(ratio_a, 1.5),
        met(ratio_a_tcp, 1.5),
        met(ratio_b, 5.0),
        met(ratio_c, 1.0),
        met(ratio_c_direct_tc, 1.0),
    );
    let (skb_md, skb_rows, skb_ratios) = socket_buffer_report(&skb_rounds);
    md.push_str(&skb_md);
    let (blocklist_md, blocklist_section, blocklist_ratios) =
        blocklist_report(&lists, &blocklist_floors, &blocklist_rounds);
    md.push_str(&blocklist_md);
    print!("{md}");
    let mut ratios = json!({
        "established_udp_delivered_pps": {"value": ratio_a, "target": 1.5, "meets_target": ratio_a >= 1.5},
        "established_udp_cpu": {"value": ratio_a_cpu},
        "established_tcp_delivered_pps": {"value": ratio_a_tcp, "target": 1.5, "meets_target": ratio_a_tcp >= 1.5},
        "established_tcp_cpu": {"value": ratio_a_tcp_cpu},
        "drop_flood_cpu_per_packet": {"value": ratio_b, "target": 5.0, "meets_target": ratio_b >= 5.0},
        "tcp_connections_per_second": {"value": ratio_c, "target": 1.0, "meets_target": ratio_c >= 1.0},
        "tcp_connections_per_second_direct_veth": {"value": ratio_c_direct},
        "tcp_connections_per_second_direct_veth_session_tc": {"value": ratio_c_direct_tc,
            "target": 1.0, "meets_target": ratio_c_direct_tc >= 1.0},
    });
    let ratio_map = ratios.as_object_mut().expect("the ratios are an object");
    ratio_map.extend(forwarded_ratios);
    ratio_map.extend(skb_ratios);
    ratio_map.extend(blocklist_ratios);
    let doc = json!({
        "rounds": ROUNDS, "run_seconds": RUN.as_secs(), "generator": "xdp live frames, one thread",
        "udp_flows": UDP_FLOWS, "tcp_flows": TCP_FLOWS, "syn_sources": SYN_SOURCES,
        "cpu_method": "softirq time of all CPUs from /proc/stat over the blast / packets sent",
        "firewalls": Value::Object(json_rows),
        "ratios": ratios,
        "forwarded": Value::Object(routed_rows),
        "socket_buffers": skb_rows,
        "socket_buffer_rounds": SKB_ROUNDS,
        "socket_buffer_generator": "AF_PACKET sendmmsg, one thread, GRO off on fw's veth",
        "blocklist": blocklist_section,
        "drop_floor": {"sent_pps": floor[0], "softirq_ns_per_packet": floor[1],
            "busy_ns_per_packet": floor[2], "nftables_over_floor": floor_ratio,
            "session_ns_above_floor": session_above_floor},
        "established_udp_softirq_ns_above_baseline": {
            "session_minus_noop_xdp": session_own_ns, "nftables_minus_none": nft_own_ns},
        "connection_us_above_baseline": {
            "session_minus_noop_xdp": session_own_conn_us, "nftables_minus_none": nft_own_conn_us,
            "noop_xdp_minus_none": noop_conn_us, "direct_veth_noop_xdp_minus_none": direct_noop_conn_us},
    });
    let dir = bench::out_dir();
    std::fs::create_dir_all(&dir).expect("creating the bench output directory");
    std::fs::write(dir.join("e2e.md"), &md).expect("writing e2e.md");
    std::fs::write(
        dir.join("e2e.json"),
        serde_json::to_string_pretty(&doc).expect("json"),
    )
    .expect("writing e2e.json");
    println!("\nwritten: {}", dir.join("e2e.json").display());
}
