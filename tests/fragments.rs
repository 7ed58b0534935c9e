//! IP fragments follow their datagram's session, with real sockets: UDP answers of 3,000
//! and 9,000 bytes (three and seven fragments on a 1,500-byte link) to a 1-byte query,
//! through the firewall host under the shipped default policy and through a router, IPv4
//! and IPv6, both ways; fragments sent out of order from a packet socket; the classic
//! fragment attacks dropped and counted.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use serde_json::Value;
use session_common::wire::proto;
use session_testkit::accept_new_rule;
use session_testkit::frames;
use session_tests::router::{
    UPSTREAM_V4, UPSTREAM_V6, Upstream, WAN_IFACE, lan_out_rule, router_policy,
};
use session_tests::{
    Daemon, Family, IO_TIMEOUT, Lab, Side, both_families, counter, delta, rule_hits,
};

/// The policy a new user runs.
const DEFAULT_POLICY: &str = include_str!("../config/default.toml");

/// The answer sizes of the issue: three and seven fragments on a 1,500-byte MTU.
const SIZES: [usize; 2] = [3000, 9000];
/// Later fragments of one answer of each of [`SIZES`], in both families: 2 + 6.
const LATER_FRAGMENTS: u64 = 8;

both_families!(host_answers: udp_answers_reach_the_firewall_host_both_ways_v4, udp_answers_reach_the_firewall_host_both_ways_v6);
both_families!(reordered: fragments_out_of_order_are_delivered_v4, fragments_out_of_order_are_delivered_v6);
both_families!(attacks: fragment_attacks_are_dropped_and_counted_v4, fragment_attacks_are_dropped_and_counted_v6);

fn tag(name: &str, family: Family) -> String {
    match family {
        Family::V4 => format!("{name}4"),
        Family::V6 => format!("{name}6"),
    }
}

/// `len` bytes that say where they are, so a misassembled datagram shows.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Sends a 1-byte query from `client` to `server`'s address `to`, answers it from
/// `server` with `len` bytes, and requires the client to receive all of them intact.
fn query_and_answer(
    client: &UdpSocket,
    server: &UdpSocket,
    to: SocketAddr,
    len: usize,
    what: &str,
) {
    client
        .send_to(b"?", to)
        .unwrap_or_else(|e| panic!("{what}: query to {to}: {e}"));
    let mut buf = vec![0u8; 65536];
    let (n, from) = server
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("{what}: the query never reached {to}: {e}"));
    assert_eq!(n, 1, "{what}: the query is one byte");
    let answer = payload(len);
    server
        .send_to(&answer, from)
        .unwrap_or_else(|e| panic!("{what}: answer of {len} bytes: {e}"));
    let (n, _) = client.recv_from(&mut buf).unwrap_or_else(|e| {
        panic!("{what}: the {len}-byte answer (fragmented) never arrived: {e}")
    });
    assert_eq!(n, len, "{what}: answer length");
    assert!(buf[..n] == answer[..], "{what}: the answer arrived damaged");
}

/// The default policy, plus one rule that lets the client ask fw on UDP `port`, so that
/// fw answers too (its fragments leave through TC egress).
fn default_policy_with_udp(port: u16) -> String {
    format!(
        "{DEFAULT_POLICY}\n[[rule]]\nname = \"udp-service\"\nstate = [\"new\"]\nproto = \"udp\"\ndport = [{port}]\naction = \"accept\"\n"
    )
}

/// Stats once the fragment counters have settled (the kernel path counts before the
/// socket sees the datagram, so this is only a guard against a slow CLI).
fn stats_after(daemon: &Daemon<'_>, before: &Value, followed: u64) -> Value {
    daemon.stats_when("fragments followed", |stats| {
        delta(before, stats, "fragments_followed") >= followed
    })
}

fn host_answers(family: Family) {
    let lab = Lab::for_family(&tag("fraghost", family), family);
    let daemon = lab.daemon(&default_policy_with_udp(5301));
    let before = daemon.stats_json();

    // fw asks, the client answers: the answer's fragments come in through XDP.
    let fw = lab.udp_socket(Side::Fw, family, 0);
    let client_server = lab.udp_socket(Side::Client, family, 5300);
    for len in SIZES {
        query_and_answer(
            &fw,
            &client_server,
            family.sock(Side::Client, 5300),
            len,
            &format!("{len} bytes to the firewall host ({family:?})"),
        );
    }
    let inbound = stats_after(&daemon, &before, LATER_FRAGMENTS);
    assert_eq!(
        delta(&before, &inbound, "fragments_followed"),
        LATER_FRAGMENTS,
        "each later fragment followed its first: {inbound}"
    );

    // The client asks, fw answers: the answer's fragments leave through TC egress.
    let fw_server = lab.udp_socket(Side::Fw, family, 5301);
    let client = lab.udp_socket(Side::Client, family, 0);
    for len in SIZES {
        query_and_answer(
            &client,
            &fw_server,
            family.sock(Side::Fw, 5301),
            len,
            &format!("{len} bytes from the firewall host ({family:?})"),
        );
    }
    let after = stats_after(&daemon, &before, 2 * LATER_FRAGMENTS);
    assert_eq!(
        delta(&before, &after, "fragments_followed"),
        2 * LATER_FRAGMENTS,
        "{after}"
    );
    for name in [
        "state_invalid",
        "invalid_fragment",
        "fragments_unknown",
        "drop_rule",
    ] {
        assert_eq!(delta(&before, &after, name), 0, "{name}: {after}");
    }
}

/// A UDP socket in upstream bound to `addr`.
fn upstream_udp(upstream: &Upstream<'_>, addr: SocketAddr) -> UdpSocket {
    let socket = upstream
        .in_ns(|| UdpSocket::bind(addr))
        .unwrap_or_else(|e| panic!("cannot bind UDP {addr} in {}: {e}", upstream.ns()));
    socket
        .set_read_timeout(Some(IO_TIMEOUT))
        .unwrap_or_else(|e| panic!("timeout on {addr}: {e}"));
    socket
}

#[test]
fn udp_answers_cross_a_router_both_ways() {
    let lab = Lab::dual_stack("fragrt");
    let upstream = lab.upstream();
    let new_flows = lan_out_rule(Some("udp")) + accept_new_rule!("published", "udp", 5302);
    let policy = router_policy(false, &new_flows);
    let daemon = lab.daemon(&policy);
    assert!(policy.contains(WAN_IFACE));
    let before = daemon.stats_json();
    for (family, upstream_addr) in [(Family::V4, UPSTREAM_V4), (Family::V6, UPSTREAM_V6)] {
        let upstream_ip: IpAddr = upstream_addr.parse().expect("a lab address");
        // The LAN asks upstream; the answer's fragments come in on wan0 and are forwarded.
        let server = upstream_udp(&upstream, SocketAddr::new(upstream_ip, 5300));
        let client = lab.udp_socket(Side::Client, family, 0);
        for len in SIZES {
            query_and_answer(
                &client,
                &server,
                SocketAddr::new(upstream_ip, 5300),
                len,
                &format!("{len} bytes from upstream to the LAN ({family:?})"),
            );
        }
        // Upstream asks the published LAN service; its answer crosses the other way.
        let asker = upstream_udp(&upstream, SocketAddr::new(upstream_ip, 0));
        let published = lab.udp_socket(Side::Client, family, 5302);
        for len in SIZES {
            query_and_answer(
                &asker,
                &published,
                family.sock(Side::Client, 5302),
                len,
                &format!("{len} bytes from the LAN to upstream ({family:?})"),
            );
        }
    }
    let after = stats_after(&daemon, &before, 4 * LATER_FRAGMENTS);
    assert_eq!(
        delta(&before, &after, "fragments_followed"),
        4 * LATER_FRAGMENTS,
        "{after}"
    );
    for name in ["state_invalid", "invalid_fragment", "fragments_unknown"] {
        assert_eq!(delta(&before, &after, name), 0, "{name}: {after}");
    }
}

/// `frame` with the lab's MAC addresses, from the client to fw.
fn from_client(lab: &Lab, mut frame: Vec<u8>) -> Vec<u8> {
    frame[..6].copy_from_slice(&lab.mac(Side::Fw));
    frame[6..12].copy_from_slice(&lab.mac(Side::Client));
    frame
}

/// The crafted answer's fragments, client:`sport` to fw:`dport`, id `id`.
fn crafted_answer(family: Family, sport: u16, dport: u16, len: usize, id: u32) -> Vec<Vec<u8>> {
    let (_, udp) = frames::udp_carrying(sport, dport, &payload(len));
    frames::fragments(
        family.ip(Side::Client),
        family.ip(Side::Fw),
        (proto::UDP, udp),
        1400,
        id,
    )
}

fn reordered(family: Family) {
    let lab = Lab::for_family(&tag("fragord", family), family);
    let daemon = lab.daemon(DEFAULT_POLICY);
    let fw = lab.udp_socket(Side::Fw, family, 0);
    let fw_port = fw.local_addr().expect("bound").port();
    let client = lab.udp_socket(Side::Client, family, 5303);
    let wire = lab.packet_socket(Side::Client);
    let mut buf = vec![0u8; 65536];
    let mut expected_unknown = 0;
    let mut expected_followed = 0;
    let before = daemon.stats_json();
    // Orders of a three-fragment answer: last first, first in the middle, first last.
    for (round, order) in [[2usize, 1, 0], [1, 0, 2], [0, 2, 1]].iter().enumerate() {
        fw.send_to(b"?", family.sock(Side::Client, 5303))
            .unwrap_or_else(|e| panic!("query: {e}"));
        client
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("the query never reached the client: {e}"));
        let pieces = crafted_answer(family, 5303, fw_port, 3000, 0x700 + round as u32);
        assert_eq!(pieces.len(), 3);
        // A fragment ahead of the first is unknown; after it, one follows, until the
        // last fragment ends the datagram's record.
        let mut record = false;
        for &i in order {
            match (i, record) {
                (0, _) => record = true,
                (_, true) => {
                    expected_followed += 1;
                    record = i != 2;
                }
                (_, false) => expected_unknown += 1,
            }
        }
        for &i in order {
            wire.send(&from_client(&lab, pieces[i].clone()));
        }
        let (n, _) = fw.recv_from(&mut buf).unwrap_or_else(|e| {
            panic!("{family:?}: the answer sent in order {order:?} was not delivered: {e}")
        });
        assert_eq!(n, 3000, "order {order:?}");
        assert!(buf[..n] == payload(3000)[..], "order {order:?}: damaged");
    }
    let after = daemon.stats_when("the fragments counted", |stats| {
        delta(&before, stats, "fragments_unknown") + delta(&before, stats, "fragments_followed")
            >= expected_unknown + expected_followed
    });
    assert_eq!(
        delta(&before, &after, "fragments_unknown"),
        expected_unknown,
        "{after}"
    );
    assert_eq!(
        delta(&before, &after, "fragments_followed"),
        expected_followed,
        "{after}"
    );
    assert_eq!(delta(&before, &after, "state_invalid"), 0, "{after}");
}

fn attacks(family: Family) {
    let lab = Lab::for_family(&tag("fragatk", family), family);
    let daemon = lab.daemon(DEFAULT_POLICY);
    let fw = lab.udp_socket(Side::Fw, family, 0);
    let fw_port = fw.local_addr().expect("bound").port();
    let client = lab.udp_socket(Side::Client, family, 5304);
    let wire = lab.packet_socket(Side::Client);
    let (c, f) = (family.ip(Side::Client), family.ip(Side::Fw));
    let before = daemon.stats_json();

    // A first fragment of a TCP segment to SSH (which the policy opens) holding 8 bytes
    // of its header, and later fragments at offsets 8 and 16 that would rewrite its flags.
    let syn = frames::packet(
        c,
        f,
        frames::tcp(frames::Tcp::new(40000, 22, frames::tcp_flags::SYN)),
    );
    let l4 = if family == Family::V6 { 40 } else { 20 };
    wire.send(&from_client(
        &lab,
        frames::fragment(c, f, proto::TCP, 0x51, 0, true, &syn[l4..l4 + 8]),
    ));
    for offset in [8, 16] {
        wire.send(&from_client(
            &lab,
            frames::fragment(
                c,
                f,
                proto::TCP,
                0x51,
                offset,
                false,
                &[0x12; 24][..24 - offset],
            ),
        ));
    }

    // Another flow claims the id of an answer in flight: refused; the answer is delivered.
    fw.send_to(b"?", family.sock(Side::Client, 5304))
        .unwrap_or_else(|e| panic!("query: {e}"));
    let mut buf = vec![0u8; 65536];
    client
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("the query never reached the client: {e}"));
    let answer = crafted_answer(family, 5304, fw_port, 3000, 0x52);
    let intruder = crafted_answer(family, 5305, fw_port, 3000, 0x52);
    wire.send(&from_client(&lab, answer[0].clone()));
    wire.send(&from_client(&lab, intruder[0].clone()));
    for piece in &answer[1..] {
        wire.send(&from_client(&lab, piece.clone()));
    }
    let (n, from) = fw
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("{family:?}: the answer was lost to the intruder: {e}"));
    assert_eq!((n, from.port()), (3000, 5304), "the real answer, whole");
    assert!(buf[..n] == payload(3000)[..], "the answer arrived damaged");
    fw.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    assert!(
        fw.recv_from(&mut buf).is_err(),
        "nothing else reaches the socket"
    );

    let after = daemon.stats_when("four invalid fragments", |stats| {
        delta(&before, stats, "invalid_fragment") >= 4
    });
    assert_eq!(
        delta(&before, &after, "invalid_fragment"),
        4,
        "tiny first, two overlaps, id claimed by another flow: {after}"
    );
    assert_eq!(delta(&before, &after, "state_invalid"), 4, "{after}");
    assert_eq!(
        rule_hits(&after, "invalid") - rule_hits(&before, "invalid"),
        4,
        "{after}"
    );
    assert_eq!(delta(&before, &after, "fragments_followed"), 2, "{after}");
    assert!(counter(&after, "sessions_created") >= 1, "{after}");
}
