//! The kernel's own conntrack as the reference for the daemon's `ct state` decisions.
//!
//! In the fw namespace the daemon runs with a policy that accepts everything, so every
//! packet it judges also reaches the kernel's stack, where nftables counts packets per
//! `ct state` right after conntrack (`Lab::install_ct_counters`: prerouting and output,
//! priority -150). Each test runs one scenario of real traffic (plus, where no socket
//! would send them, hand-built segments injected from the client) and compares the growth
//! of the daemon's `state_*` counters with the kernel's counts over the same time. They
//! must agree exactly; where ARCHITECTURE.md documents a deliberate difference, the test
//! asserts that difference instead and names it.
//!
//! The kernel runs with `nf_conntrack_tcp_loose = 0` (a per-namespace sysctl), matching
//! the daemon's default; that is the one documented difference the setup removes.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    time::Duration,
};

use session_testkit::frames;
use session_tests::{
    CtCounts, Daemon, Family, IO_TIMEOUT, Lab, Side, accept_within, both_families,
    raw::{TcpSegment, flags},
    read_exact_len, read_to_eof, set_fast_keepalive, set_linger_zero,
};

/// Accept everything: the daemon only classifies, the kernel sees every packet.
const ACCEPT_ALL: &str = r#"
[policy]
inbound = "accept"
outbound = "accept"
"#;

/// How long the link must be silent before a measurement starts or ends.
const QUIET: Duration = Duration::from_millis(400);
/// Bound on waiting for silence.
const QUIET_TIMEOUT: Duration = Duration::from_secs(10);
/// A port that a server listens on in the TCP scenarios.
const PORT: u16 = 8080;

both_families!(tcp_exchange: tcp_exchange_and_close_v4, tcp_exchange_and_close_v6);
both_families!(udp_both_directions: udp_query_answer_both_directions_v4, udp_query_answer_both_directions_v6);
both_families!(ping_both_ways: ping_both_ways_v4, ping_both_ways_v6);
both_families!(port_unreachable: icmp_port_unreachable_both_directions_v4, icmp_port_unreachable_both_directions_v6);
both_families!(stray_ack: stray_tcp_ack_v4, stray_tcp_ack_v6);
both_families!(out_of_window: out_of_window_segments_v4, out_of_window_segments_v6);
both_families!(tcp_resets: tcp_resets_v4, tcp_resets_v6);
both_families!(icmp_without_session: icmp_without_session_v4, icmp_without_session_v6);
both_families!(fragmented_ping: fragmented_ping_v4, fragmented_ping_v6);
both_families!(fragmented_udp: fragmented_udp_answers_v4, fragmented_udp_answers_v6);
both_families!(bulk: bulk_transfer_both_ways_v4, bulk_transfer_both_ways_v6);
both_families!(time_wait_reuse: time_wait_tuple_reused_v4, time_wait_tuple_reused_v6);
both_families!(keepalive: keepalive_probes_v4, keepalive_probes_v6);

/// What one scenario produced on each side.
struct Measured {
    /// The daemon's per-state counts over the scenario.
    ours: CtCounts,
    /// The kernel conntrack's per-state counts (prerouting + output) over the scenario.
    kernel: CtCounts,
}

impl Measured {
    /// Asserts that both sides classified every packet the same way.
    fn assert_agree(&self, scenario: &str) {
        assert_eq!(
            self.ours, self.kernel,
            "{scenario}: ct state counts differ\n  session: {}\n  kernel:  {}",
            self.ours, self.kernel
        );
    }
}

/// Builds a fresh lab for `family` with the kernel's counters and the daemon in place,
/// lets ARP/ND settle, runs `scenario`, and measures both sides over it; also returns
/// what `scenario` returned.
fn measure<T>(
    name: &str,
    family: Family,
    scenario: impl FnOnce(&Lab, &Daemon<'_>) -> T,
) -> (Measured, T) {
    let tag = match family {
        Family::V4 => format!("d{name}4"),
        Family::V6 => format!("d{name}6"),
    };
    let lab = Lab::for_family(&tag, family);
    // The nft table comes first: its `ct state` rules are what enable conntrack in fw.
    lab.install_ct_counters();
    lab.ok(
        Side::Fw,
        5,
        &["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0"],
    );
    let loose = lab.ok(
        Side::Fw,
        5,
        &["sysctl", "-n", "net.netfilter.nf_conntrack_tcp_loose"],
    );
    assert_eq!(loose.trim(), "0", "tcp_loose did not stick in fw");
    let daemon = lab.daemon(ACCEPT_ALL);

    // Resolve neighbours both ways before the scenario, so that its counts do not depend
    // on when ARP/ND happens. This phase is compared too: ARP is counted by neither side,
    // ND (and any MLD report) is untracked on both.
    let (settle_ours, settle_kernel) = snapshot(&lab, &daemon);
    let (client, fw) = (family.addr(Side::Client), family.addr(Side::Fw));
    assert_eq!(
        lab.ping(Side::Fw, client, 1),
        1,
        "settling ping fw -> client"
    );
    assert_eq!(
        lab.ping(Side::Client, fw, 1),
        1,
        "settling ping client -> fw"
    );
    daemon.wait_quiet(QUIET, QUIET_TIMEOUT);

    let (ours_before, kernel_before) = snapshot(&lab, &daemon);
    let settle = Measured {
        ours: ours_before.since(&settle_ours),
        kernel: kernel_before.since(&settle_kernel),
    };
    settle.assert_agree("neighbour resolution and settling pings");
    if family == Family::V6 {
        // At least fw's neighbour solicitation for the client and the advertisement.
        assert!(settle.ours.untracked >= 2, "no ND seen: {}", settle.ours);
    }
    let result = scenario(&lab, &daemon);
    daemon.wait_quiet(QUIET, QUIET_TIMEOUT);
    let (ours_after, kernel_after) = snapshot(&lab, &daemon);
    let measured = Measured {
        ours: ours_after.since(&ours_before),
        kernel: kernel_after.since(&kernel_before),
    };
    // Shown with --nocapture, and for failing tests.
    eprintln!(
        "{tag}: session {}\n{tag}: kernel  {}",
        measured.ours, measured.kernel
    );
    (measured, result)
}

/// Both sides' counts at one moment: the kernel's read between two reads of the daemon's
/// that agree, so that no packet slipped in between (a late ND probe, say).
fn snapshot(lab: &Lab, daemon: &Daemon<'_>) -> (CtCounts, CtCounts) {
    for _ in 0..5 {
        let first = CtCounts::from_stats(&daemon.stats_json());
        let kernel = lab.ct_counters();
        let second = CtCounts::from_stats(&daemon.stats_json());
        if first == second {
            return (second, kernel);
        }
        std::thread::sleep(QUIET);
    }
    panic!("could not take a consistent snapshot: traffic kept flowing");
}

/// A normal connection: handshake, a request and an answer, FIN from the client, FIN
/// from the server, last ACK.
fn tcp_exchange(family: Family) {
    let (measured, ()) = measure("tcp", family, |lab, _| {
        let (mut client, mut server) = lab.tcp_pair(family, PORT);
        client.write_all(b"hello\n").expect("client write");
        assert_eq!(read_exact_len(&mut server, 6), b"hello\n");
        server.write_all(b"world\n").expect("server write");
        assert_eq!(read_exact_len(&mut client, 6), b"world\n");
        drop(client);
        assert_eq!(read_to_eof(&mut server), b"");
        drop(server);
    });
    measured.assert_agree("tcp exchange and close");
    // The scenario really happened: a SYN, and at least the handshake's and teardown's
    // other six segments.
    assert!(measured.ours.new >= 1, "{}", measured.ours);
    assert!(measured.ours.established >= 6, "{}", measured.ours);
}

/// A UDP query and its answer from fw to the client, then from the client to fw.
fn udp_both_directions(family: Family) {
    let (measured, ()) = measure("udp", family, |lab, _| {
        for (asker, answerer) in [(Side::Fw, Side::Client), (Side::Client, Side::Fw)] {
            let server = lab.udp_socket(answerer, family, 7000);
            let client = lab.udp_socket(asker, family, 0);
            client
                .send_to(b"query", family.sock(answerer, 7000))
                .expect("send query");
            let mut buf = [0u8; 64];
            let (len, from) = server.recv_from(&mut buf).expect("receive query");
            assert_eq!(&buf[..len], b"query");
            server.send_to(b"answer", from).expect("send answer");
            let len = client.recv(&mut buf).expect("receive answer");
            assert_eq!(&buf[..len], b"answer");
        }
    });
    measured.assert_agree("udp query and answer");
    let expected = CtCounts {
        new: 2,
        established: 2,
        ..CtCounts::default()
    };
    assert_eq!(
        CtCounts {
            untracked: 0,
            ..measured.ours
        },
        expected,
        "two queries (new) and two answers (established)"
    );
}

/// Three echo requests each way (inbound ones too: the policy accepts everything).
fn ping_both_ways(family: Family) {
    let (measured, ()) = measure("ping", family, |lab, _| {
        let (client, fw) = (family.addr(Side::Client), family.addr(Side::Fw));
        assert_eq!(lab.ping(Side::Fw, client, 3), 3, "fw -> client");
        assert_eq!(lab.ping(Side::Client, fw, 3), 3, "client -> fw");
    });
    measured.assert_agree("ping both ways");
    assert_eq!(
        measured.ours.new, 2,
        "one new request per ping: {}",
        measured.ours
    );
    assert!(measured.ours.established >= 10, "{}", measured.ours);
}

/// A datagram to a closed port each way; each draws a port unreachable that quotes it.
fn port_unreachable(family: Family) {
    let (measured, ()) = measure("unr", family, |lab, _| {
        for (sender, receiver) in [(Side::Fw, Side::Client), (Side::Client, Side::Fw)] {
            let socket = lab.udp_socket(sender, family, 0);
            socket
                .connect(family.sock(receiver, 5555))
                .expect("UDP connect");
            socket.send(b"anyone?").expect("UDP send");
            let mut buf = [0u8; 16];
            match socket.recv(&mut buf) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
                other => panic!("{sender:?}: expected ECONNREFUSED, got {other:?}"),
            }
        }
    });
    measured.assert_agree("port unreachable both directions");
    assert_eq!(measured.ours.related, 2, "{}", measured.ours);
}

/// The client's and fw's MAC addresses, for frames injected on the client's veth.
fn macs(lab: &Lab) -> ([u8; 6], [u8; 6]) {
    (lab.mac(Side::Client), lab.mac(Side::Fw))
}

/// A bare ACK with no connection behind it, to a listening port and to a closed one. fw
/// answers each with a RST. With tcp_loose off, all four are invalid on both sides.
fn stray_ack(family: Family) {
    let (measured, ()) = measure("ack", family, |lab, _| {
        let _listener = lab.tcp_listen(Side::Fw, family, PORT);
        let link = lab.packet_socket(Side::Client);
        let (client_mac, fw_mac) = macs(lab);
        for (sport, dport) in [(40001, PORT), (40002, 9999)] {
            let ack = TcpSegment {
                src: family.sock(Side::Client, sport),
                dst: family.sock(Side::Fw, dport),
                seq: 0x1234_5678,
                ack: 0x0bad_cafe,
                flags: flags::ACK,
                window: 512,
                payload: Vec::new(),
            };
            link.send(&ack.frame(client_mac, fw_mac));
        }
        // Both RSTs come back (the client's stack ignores them).
        let resets = link
            .tcp_segments(Duration::from_millis(300), Duration::from_secs(5))
            .into_iter()
            .filter(|s| s.src.ip() == family.ip(Side::Fw) && s.flags & flags::RST != 0)
            .count();
        assert_eq!(resets, 2, "fw did not answer both stray ACKs with a RST");
    });
    measured.assert_agree("stray ACK");
    assert_eq!(measured.ours.invalid, 4, "{}", measured.ours);
}

/// An established connection receives, from the client's address and port, a data
/// segment far beyond the window, one far behind it, and an ACK for data fw never sent;
/// fw's stack may answer each with a duplicate ACK (rate limited). The connection then
/// carries data and closes normally. Each injection is measured on its own as well, so
/// that a disagreement names the segment.
fn out_of_window(family: Family) {
    let (measured, steps) = measure("oow", family, |lab, daemon| {
        let link = lab.packet_socket(Side::Client);
        let (client_mac, fw_mac) = macs(lab);
        let (mut client, mut server) = lab.tcp_pair(family, PORT);
        round_trip(&mut client, &mut server);
        let captured = link.tcp_segments(Duration::from_millis(300), Duration::from_secs(5));
        let client_addr = client.local_addr().expect("client address");
        let (client_next, fw_next) = next_sequence_numbers(&captured, client_addr);

        let segment = |seq: u32, ack: u32, payload: &[u8]| TcpSegment {
            src: client_addr,
            dst: family.sock(Side::Fw, PORT),
            seq,
            ack,
            flags: flags::ACK | if payload.is_empty() { 0 } else { flags::PSH },
            window: 512,
            payload: payload.to_vec(),
        };
        let injections = [
            (
                "data beyond the window",
                segment(client_next.wrapping_add(0x4000_0000), fw_next, b"ahead"),
            ),
            (
                "data far behind the window",
                segment(client_next.wrapping_sub(0x4000_0000), fw_next, b"behind"),
            ),
            (
                "ACK of data never sent",
                segment(client_next, fw_next.wrapping_add(0x4000_0000), b""),
            ),
        ];
        let mut steps = Vec::new();
        for (what, injected) in injections {
            let (ours_before, kernel_before) = snapshot(lab, daemon);
            link.send(&injected.frame(client_mac, fw_mac));
            daemon.wait_quiet(QUIET, QUIET_TIMEOUT);
            let (ours_after, kernel_after) = snapshot(lab, daemon);
            let step = Measured {
                ours: ours_after.since(&ours_before),
                kernel: kernel_after.since(&kernel_before),
            };
            step.assert_agree(what);
            steps.push((what, step.ours));
        }
        // None of it reached the application, and the connection still works.
        round_trip(&mut client, &mut server);
        client.shutdown(Shutdown::Write).expect("client shutdown");
        assert_eq!(read_to_eof(&mut server), b"", "junk reached the server");
        drop(server);
        assert_eq!(read_to_eof(&mut client), b"");
        steps
    });
    measured.assert_agree("out-of-window segments");
    // What the kernel did, so that a change on both sides at once is noticed too.
    let [(_, ahead), (_, behind), (_, unsent)] = steps[..] else {
        panic!("three injections expected: {steps:?}");
    };
    assert_eq!(ahead.invalid, 1, "segment beyond the window: {ahead}");
    // nf_conntrack lets data below the window (an overly delayed retransmission) pass
    // without updating the state: it is established, not invalid.
    assert_eq!(behind.invalid, 0, "segment behind the window: {behind}");
    assert!(
        behind.established >= 1,
        "segment behind the window: {behind}"
    );
    assert_eq!(unsent.invalid, 1, "ACK of unsent data: {unsent}");
}

/// RSTs from real stacks: a client aborting an established connection (SO_LINGER 0),
/// and fw refusing a connection to a closed port (the RST is the only reply).
fn tcp_resets(family: Family) {
    let (measured, ()) = measure("rst", family, |lab, _| {
        let (mut client, mut server) = lab.tcp_pair(family, PORT);
        round_trip(&mut client, &mut server);
        set_linger_zero(&client);
        drop(client);
        let mut byte = [0u8; 1];
        match server.read(&mut byte) {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("server did not see the RST: {other:?}"),
        }
        let closed = family.sock(Side::Fw, 9999);
        match lab.tcp_connect(Side::Client, closed, Duration::from_secs(2)) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
            other => panic!("connection to closed {closed} not refused: {other:?}"),
        }
    });
    measured.assert_agree("tcp resets");
    assert_eq!(measured.ours.new, 2, "two SYNs: {}", measured.ours);
}

/// ICMP that belongs to no session, injected from the client: an echo reply nobody asked
/// for, and a port unreachable quoting a datagram fw never sent. Both are invalid on both
/// sides (and fw's stack ignores them).
fn icmp_without_session(family: Family) {
    let (measured, ()) = measure("icmpx", family, |lab, _| {
        let link = lab.packet_socket(Side::Client);
        let (client_mac, fw_mac) = macs(lab);
        let (client, fw) = (family.ip(Side::Client), family.ip(Side::Fw));
        let (echo_reply, unreachable, port_unreachable) = match family {
            Family::V4 => (0, 3, 3),
            Family::V6 => (129, 1, 4),
        };
        let v6 = family == Family::V6;
        let reply = frames::icmp(v6, echo_reply, 0, [0x42, 0x42, 0, 1], b"pong");
        let quoted = frames::packet(fw, client, frames::udp_carrying(40000, 5555, b"never sent"));
        let error = frames::icmp(v6, unreachable, port_unreachable, [0; 4], &quoted);
        for icmp in [reply, error] {
            let packet = frames::packet(client, fw, icmp);
            link.send(&frames::ethernet_between(client_mac, fw_mac, &packet));
        }
    });
    measured.assert_agree("ICMP without session");
    assert_eq!(measured.ours.invalid, 2, "{}", measured.ours);
}

/// What the daemon counts for traffic whose messages are each cut into `fragments`
/// fragments, given the kernel's counts (docs/ARCHITECTURE.md, "IP fragments"): the
/// kernel's conntrack sees each message once (reassembled before conntrack on the way
/// in, fragmented after it on the way out); the daemon sees every fragment, judges the
/// first and counts each later one in the same state. So new and established are the
/// kernel's times `fragments`, the rest agree, when every message is fragmented.
fn per_fragment(kernel: &CtCounts, fragments: u64) -> CtCounts {
    CtCounts {
        new: kernel.new * fragments,
        established: kernel.established * fragments,
        ..*kernel
    }
}

/// Echo requests and replies too large for the link, so both stacks fragment them (3
/// fragments each at MTU 1500); every ping is answered on both sides.
fn fragmented_ping(family: Family) {
    const PINGS: u64 = 2;
    const FRAGMENTS: u64 = 3;
    let (measured, ()) = measure("frag", family, |lab, _| {
        let (client, fw) = (family.addr(Side::Client), family.addr(Side::Fw));
        let size = ["-s", "3000"];
        assert_eq!(lab.ping_with(Side::Fw, client, PINGS as u32, &size), PINGS);
        assert_eq!(lab.ping_with(Side::Client, fw, PINGS as u32, &size), PINGS);
    });
    assert_eq!(
        measured.ours,
        per_fragment(&measured.kernel, FRAGMENTS),
        "fragments: session {} vs kernel {} (each message counted once per fragment)",
        measured.ours,
        measured.kernel,
    );
    assert_eq!(measured.kernel.new, 2, "{}", measured.kernel);
    assert_eq!(measured.kernel.invalid, 0, "{}", measured.kernel);
}

/// A 1-byte UDP query and a 3,000-byte answer (3 fragments) from fw to the client, then
/// from the client to fw: delivered on both sides; the whole queries count alike, each
/// answer once per fragment on the daemon's side, as [`per_fragment`] says of each message.
fn fragmented_udp(family: Family) {
    const FRAGMENTS: u64 = 3;
    let answer: Vec<u8> = (0..3000).map(|i| (i % 251) as u8).collect();
    let (measured, ()) = measure("fudp", family, |lab, _| {
        for (asker, answerer) in [(Side::Fw, Side::Client), (Side::Client, Side::Fw)] {
            let server = lab.udp_socket(answerer, family, 7001);
            let client = lab.udp_socket(asker, family, 0);
            client
                .send_to(b"?", family.sock(answerer, 7001))
                .expect("send query");
            let mut buf = vec![0u8; 4096];
            let (len, from) = server.recv_from(&mut buf).expect("receive query");
            assert_eq!(&buf[..len], b"?");
            server.send_to(&answer, from).expect("send answer");
            let len = client
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("{asker:?}: the fragmented answer was lost: {e}"));
            assert!(
                buf[..len] == answer[..],
                "{asker:?}: the answer arrived damaged"
            );
        }
    });
    let kernel = CtCounts {
        untracked: 0,
        ..measured.kernel
    };
    assert_eq!(
        kernel,
        CtCounts {
            new: 2,
            established: 2,
            ..CtCounts::default()
        },
        "the kernel: two queries, two reassembled answers"
    );
    // The queries are whole (new, counted alike); the answers are fragmented.
    assert_eq!(
        measured.ours,
        CtCounts {
            established: measured.kernel.established * FRAGMENTS,
            ..measured.kernel
        },
        "fragmented UDP: session {} vs kernel {}",
        measured.ours,
        measured.kernel,
    );
}

/// Two megabytes each way: many full-sized segments, window updates and window scaling
/// put the window tracking to work.
fn bulk(family: Family) {
    let (measured, ()) = measure("bulk", family, |lab, _| {
        let (mut client, mut server) = lab.tcp_pair(family, PORT);
        let data: Vec<u8> = (0..2 << 20).map(|i| (i % 251) as u8).collect();
        std::thread::scope(|s| {
            let d = &data;
            let c = &mut client;
            s.spawn(move || c.write_all(d).expect("client write"));
            assert!(read_exact_len(&mut server, data.len()) == data);
        });
        std::thread::scope(|s| {
            let d = &data;
            let sv = &mut server;
            s.spawn(move || sv.write_all(d).expect("server write"));
            assert!(read_exact_len(&mut client, data.len()) == data);
        });
        drop(client);
        assert_eq!(read_to_eof(&mut server), b"");
    });
    measured.assert_agree("bulk");
}

/// A new connection from the same address and port as one that fw closed first and still
/// holds in TIME_WAIT: both trackers must see the SYN reopen the closed connection.
fn time_wait_reuse(family: Family) {
    let (measured, ()) = measure("reuse", family, |lab, _| {
        let listener = lab.tcp_listen(Side::Fw, family, PORT);
        let from = family.sock(Side::Client, 40100);
        let to = family.sock(Side::Fw, PORT);
        for round in 0..2 {
            let mut client = lab
                .tcp_connect_from(Side::Client, from, to, Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("connection {round} from {from}: {e}"));
            let mut server = accept_within(&listener, IO_TIMEOUT);
            round_trip(&mut client, &mut server);
            // fw closes first, so fw's end (and the session) ends in TIME_WAIT.
            drop(server);
            assert_eq!(read_to_eof(&mut client), b"");
            drop(client);
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    measured.assert_agree("TIME_WAIT tuple reused");
    assert_eq!(measured.ours.new, 2, "two SYNs: {}", measured.ours);
}

/// An idle connection with one-second keepalive: the client's probes (sequence number
/// one below the next) and fw's ACKs.
fn keepalive(family: Family) {
    let (measured, ()) = measure("keep", family, |lab, _| {
        let (mut client, mut server) = lab.tcp_pair(family, PORT);
        round_trip(&mut client, &mut server);
        set_fast_keepalive(&client);
        std::thread::sleep(Duration::from_millis(2500));
        round_trip(&mut client, &mut server);
    });
    measured.assert_agree("keepalive");
    assert!(measured.ours.established >= 10, "{}", measured.ours);
}

/// One request and one answer of 6 bytes each.
fn round_trip(client: &mut TcpStream, server: &mut TcpStream) {
    client.write_all(b"hello\n").expect("client write");
    assert_eq!(read_exact_len(server, 6), b"hello\n");
    server.write_all(b"world\n").expect("server write");
    assert_eq!(read_exact_len(client, 6), b"world\n");
}

/// The next sequence numbers of the client (`client`) and of fw, from the last captured
/// segment each sent on the connection.
fn next_sequence_numbers(captured: &[TcpSegment], client: SocketAddr) -> (u32, u32) {
    let last_from = |from_client: bool| {
        captured
            .iter()
            .rev()
            .find(|s| (s.src == client) == from_client && (s.src == client || s.dst == client))
            .map(TcpSegment::seq_end)
            .unwrap_or_else(|| panic!("no segment captured on {client}'s connection: {captured:?}"))
    };
    (last_from(true), last_from(false))
}
