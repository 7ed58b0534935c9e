//! Connection tracking with real traffic, over IPv4 and IPv6: how TCP connections end
//! (FIN, RST, half-close), ICMP errors about live sessions (port unreachable, packet too
//! big / fragmentation needed) as RELATED, ping and TCP to an allowed port.
//!
//! The firewall is the fw namespace itself, with a stateful policy: inbound drop, return
//! traffic and ND accepted, new TCP to port 8080 and pings accepted. The test's own
//! sockets do the talking (see `Lab::in_ns`), so every step is a bounded socket call whose
//! result the test checks, and the TCP states are read back from `session list --json`.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use session_testkit::{
    accept_new_rule, inbound_drop_policy, ping_rules, return_traffic_rule, untracked_accept_rule,
};
use session_tests::raw::{TcpSegment, flags};
use session_tests::{
    Daemon, Family, Lab, Side, both_families, counter, delta, find_session, read_exact_len,
    read_to_eof, rule_hits, set_linger_zero,
};

const POLICY: &str = concat!(
    inbound_drop_policy!(),
    return_traffic_rule!("return-traffic"),
    untracked_accept_rule!("nd"),
    accept_new_rule!("web", "tcp", 8080),
    ping_rules!(),
);

/// The port the policy opens.
const WEB: u16 = 8080;

both_families!(fin_teardown: fin_teardown_ends_in_time_wait_v4, fin_teardown_ends_in_time_wait_v6);
both_families!(rst_teardown: rst_teardown_ends_in_close_v4, rst_teardown_ends_in_close_v6);
both_families!(half_close: half_close_keeps_data_flowing_v4, half_close_keeps_data_flowing_v6);
both_families!(port_unreachable: udp_port_unreachable_is_related_v4, udp_port_unreachable_is_related_v6);
both_families!(packet_too_big: packet_too_big_is_related_v4, packet_too_big_is_related_v6);
both_families!(ping_both_ways: ping_both_ways_v4, ping_both_ways_v6);
both_families!(tcp_allowed_port: tcp_to_allowed_port_only_v4, tcp_to_allowed_port_only_v6);
both_families!(syn_after_rebuild: syn_finds_its_session_after_filter_rebuilds_v4, syn_finds_its_session_after_filter_rebuilds_v6);

fn tag(name: &str, family: Family) -> String {
    match family {
        Family::V4 => format!("{name}4"),
        Family::V6 => format!("{name}6"),
    }
}

/// A lab for `family` with the daemon running [`POLICY`].
fn setup(name: &str, family: Family) -> Lab {
    Lab::for_family(&tag(name, family), family)
}

/// One request and one answer over an open connection, so that both directions carried
/// data before the test ends it.
fn exchange(client: &mut TcpStream, server: &mut TcpStream) {
    client
        .write_all(b"ping\n")
        .unwrap_or_else(|e| panic!("client write: {e}"));
    assert_eq!(read_exact_len(server, 5), b"ping\n", "request");
    server
        .write_all(b"pong\n")
        .unwrap_or_else(|e| panic!("server write: {e}"));
    assert_eq!(read_exact_len(client, 5), b"pong\n", "answer");
}

/// Waits for the TCP session client -> fw:8080 to reach `state`.
fn web_session(daemon: &Daemon<'_>, family: Family, state: &str) -> serde_json::Value {
    let session = daemon.wait_session(
        "tcp",
        family.addr(Side::Client),
        family.addr(Side::Fw),
        WEB,
        state,
    );
    assert_eq!(session["family"], family.json_name(), "{session}");
    session
}

/// FIN from the client, FIN from the server, last ACK from the client: the session goes
/// through FIN_WAIT, CLOSE_WAIT and LAST_ACK to TIME_WAIT, as nf_conntrack's does.
fn fin_teardown(family: Family) {
    let lab = setup("fin", family);
    let daemon = lab.daemon(POLICY);
    let (mut client, mut server) = lab.tcp_pair(family, WEB);
    exchange(&mut client, &mut server);
    let open = web_session(&daemon, family, "ESTABLISHED");
    assert_eq!(
        open["assured"], true,
        "a completed handshake assures: {open}"
    );

    // Nothing is left unread, so closing sends a FIN (not a RST).
    drop(client);
    assert_eq!(
        read_to_eof(&mut server),
        b"",
        "server saw data instead of EOF"
    );
    drop(server);
    web_session(&daemon, family, "TIME_WAIT");
}

/// A client that aborts (SO_LINGER 0) sends a RST at the expected sequence number: the
/// session goes to CLOSE and the RST reaches the server.
fn rst_teardown(family: Family) {
    let lab = setup("rst", family);
    let daemon = lab.daemon(POLICY);
    let (mut client, mut server) = lab.tcp_pair(family, WEB);
    exchange(&mut client, &mut server);
    web_session(&daemon, family, "ESTABLISHED");

    set_linger_zero(&client);
    drop(client);
    let mut byte = [0u8; 1];
    match server.read(&mut byte) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("server did not see the client's RST: {other:?}"),
    }
    web_session(&daemon, family, "CLOSE");
}

/// The client shuts down its sending side; the server reads EOF and keeps sending, and all
/// of it arrives. The session waits in CLOSE_WAIT while the server sends, then ends in
/// TIME_WAIT when the server closes too.
fn half_close(family: Family) {
    let lab = setup("half", family);
    let daemon = lab.daemon(POLICY);
    let (mut client, mut server) = lab.tcp_pair(family, WEB);

    client
        .write_all(b"request\n")
        .unwrap_or_else(|e| panic!("client write: {e}"));
    client
        .shutdown(Shutdown::Write)
        .unwrap_or_else(|e| panic!("client shutdown(Write): {e}"));
    assert_eq!(read_to_eof(&mut server), b"request\n", "request before EOF");
    // The client's FIN, acknowledged by fw.
    web_session(&daemon, family, "CLOSE_WAIT");

    // Several windows' worth, so that the client's ACKs after its FIN matter.
    let answer: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    server
        .write_all(&answer)
        .unwrap_or_else(|e| panic!("server write after the client's FIN: {e}"));
    let got = read_exact_len(&mut client, answer.len());
    assert!(
        got == answer,
        "the data sent after the half-close arrived altered"
    );
    let session = web_session(&daemon, family, "CLOSE_WAIT");
    let reply_bytes = session["reply_bytes"].as_u64().unwrap_or(0);
    assert!(
        reply_bytes >= answer.len() as u64,
        "the session did not account the data sent after the half-close: {session}"
    );

    drop(server);
    assert_eq!(
        read_to_eof(&mut client),
        b"",
        "client saw data instead of EOF"
    );
    web_session(&daemon, family, "TIME_WAIT");
}

/// fw sends a datagram from a connected UDP socket to a closed client port; the client's
/// port unreachable quotes that datagram, is RELATED to its session, passes the policy,
/// and the socket reports ECONNREFUSED.
fn port_unreachable(family: Family) {
    const CLOSED: u16 = 5555;
    let lab = setup("unr", family);
    let daemon = lab.daemon(POLICY);
    let before = daemon.stats_json();

    let socket = lab.udp_socket(Side::Fw, family, 0);
    let to = family.sock(Side::Client, CLOSED);
    socket
        .connect(to)
        .unwrap_or_else(|e| panic!("UDP connect to {to}: {e}"));
    socket
        .send(b"anyone there?")
        .unwrap_or_else(|e| panic!("UDP send to {to}: {e}"));
    let mut buf = [0u8; 64];
    match socket.recv(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => panic!("expected ECONNREFUSED from the port unreachable, got {other:?}"),
    }

    let after = daemon.stats_when("the port unreachable to be counted", |s| {
        delta(&before, s, "state_related") >= 1
    });
    // Exact: one error, about one datagram; nothing else in this lab is an ICMP error.
    assert_eq!(delta(&before, &after, "state_related"), 1, "{after}");
    assert!(rule_hits(&after, "return-traffic") >= 1, "{after}");
    let sessions = daemon.list_json();
    let session = find_session(
        &sessions,
        "udp",
        family.addr(Side::Fw),
        family.addr(Side::Client),
        CLOSED,
    )
    .unwrap_or_else(|| panic!("no udp session fw -> client:{CLOSED} in {sessions:?}"));
    // An ICMP error is not an answer: the session stays unreplied, as in the kernel.
    assert_eq!(session["state"], "UNREPLIED", "{session}");
}

/// The client routes a far network over a link with a small MTU. fw sends a datagram too
/// large for that link (DF set: Linux does path MTU discovery on UDP sockets by default);
/// the client answers with fragmentation needed (IPv4) or packet too big (IPv6), which is
/// RELATED to fw's UDP session, passes the policy, and lowers fw's path MTU: the socket
/// reports EMSGSIZE and the route shows the new MTU.
fn packet_too_big(family: Family) {
    // The small link is a veth pair with both ends in the client namespace: forwarding
    // checks the MTU before it resolves any neighbour, so nothing needs to answer there.
    let (far_net, far_addr, mtu, size, forwarding) = match family {
        Family::V4 => (
            "198.18.1.0/24",
            "198.18.1.2",
            1000,
            1200,
            "net.ipv4.ip_forward=1",
        ),
        Family::V6 => (
            "2001:2:0:1::/64",
            "2001:2:0:1::2",
            1280,
            1400,
            "net.ipv6.conf.all.forwarding=1",
        ),
    };
    let lab = setup("ptb", family);
    let mtu_text = mtu.to_string();
    lab.ok(Side::Client, 5, &["sysctl", "-qw", forwarding]);
    lab.ok(
        Side::Client,
        5,
        &[
            "ip", "link", "add", "name", "far0", "mtu", &mtu_text, "type", "veth", "peer", "name",
            "far1",
        ],
    );
    for iface in ["far0", "far1"] {
        lab.ok(Side::Client, 5, &["ip", "link", "set", iface, "up"]);
    }
    lab.ok(
        Side::Client,
        5,
        &["ip", "route", "add", far_net, "dev", "far0"],
    );
    lab.ok(
        Side::Fw,
        5,
        &[
            "ip",
            "route",
            "add",
            far_net,
            "via",
            family.addr(Side::Client),
        ],
    );
    let daemon = lab.daemon(POLICY);
    let before = daemon.stats_json();

    let socket = lab.udp_socket(Side::Fw, family, 0);
    let to = std::net::SocketAddr::new(far_addr.parse().expect("valid address"), 9);
    socket
        .connect(to)
        .unwrap_or_else(|e| panic!("UDP connect to {to}: {e}"));
    socket
        .send(&vec![0x55; size])
        .unwrap_or_else(|e| panic!("UDP send of {size} bytes to {to}: {e}"));
    let mut buf = [0u8; 64];
    match socket.recv(&mut buf) {
        Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {}
        other => panic!("expected EMSGSIZE after the ICMP error, got {other:?}"),
    }

    let after = daemon.stats_when("the ICMP error to be counted", |s| {
        delta(&before, s, "state_related") >= 1
    });
    assert_eq!(delta(&before, &after, "state_related"), 1, "{after}");
    let route = lab.ok(Side::Fw, 5, &["ip", "route", "get", far_addr]);
    assert!(
        route.contains(&format!("mtu {mtu}")),
        "fw did not learn the path MTU {mtu}: {route}"
    );
}

/// Pings in both directions: fw's echo requests leave as NEW, their replies return as
/// ESTABLISHED; the client's echo requests are admitted by the ping rule. Both sessions
/// end REPLIED.
fn ping_both_ways(family: Family) {
    let lab = setup("ping", family);
    let daemon = lab.daemon(POLICY);
    let (client, fw) = (family.addr(Side::Client), family.addr(Side::Fw));

    assert_eq!(lab.ping(Side::Fw, client, 3), 3, "fw -> client ping");
    assert_eq!(lab.ping(Side::Client, fw, 3), 3, "client -> fw ping");

    let sessions = daemon.list_json();
    for (src, dst) in [(fw, client), (client, fw)] {
        let session = find_session(&sessions, family.icmp_name(), src, dst, 0)
            .unwrap_or_else(|| panic!("no echo session {src} -> {dst} in {sessions:?}"));
        assert_eq!(session["state"], "REPLIED", "{session}");
    }
    let stats = daemon.stats_json();
    let rule = match family {
        Family::V4 => "ping",
        Family::V6 => "ping6",
    };
    assert!(
        rule_hits(&stats, rule) >= 1,
        "rule {rule} never hit: {stats}"
    );
    if family == Family::V6 {
        // fw had to resolve the client: its neighbour advertisement came in untracked and
        // passed only because of the "nd" rule.
        assert!(rule_hits(&stats, "nd") >= 1, "no ND passed: {stats}");
    }
}

/// A connection to the allowed port is established and carries data both ways; one to a
/// port without a rule (a listener is there) never completes.
fn tcp_allowed_port(family: Family) {
    let lab = setup("tcp", family);
    let daemon = lab.daemon(POLICY);
    let (mut client, mut server) = lab.tcp_pair(family, WEB);
    exchange(&mut client, &mut server);
    web_session(&daemon, family, "ESTABLISHED");
    let stats = daemon.stats_json();
    assert!(rule_hits(&stats, "web") >= 1, "rule web never hit: {stats}");

    // A listener whose backlog would complete the handshake if the SYN got through.
    let _other = lab.tcp_listen(Side::Fw, family, 9090);
    let to = family.sock(Side::Fw, 9090);
    let before = daemon.stats_json();
    match lab.tcp_connect(Side::Client, to, Duration::from_secs(1)) {
        Err(e) if e.kind() == ErrorKind::TimedOut => {}
        other => panic!("connection to {to} was not silently dropped: {other:?}"),
    }
    let after = daemon.stats_when("the SYN to 9090 to be dropped", |s| {
        counter(s, "drop_default") > counter(&before, "drop_default")
    });
    assert!(delta(&before, &after, "drop_default") >= 1, "{after}");
}

/// A SYN from the client's end of a live connection belongs to its session, which
/// ignores it as nf_conntrack does, also after the reaper has rebuilt the presence filter
/// (`session_common::presence`) in both banks. Had a rebuild left out the session's key,
/// the SYN would skip the table and start a new session.
fn syn_after_rebuild(family: Family) {
    let lab = setup("synrb", family);
    let daemon = lab.daemon(POLICY);
    let (mut client, mut server) = lab.tcp_pair(family, WEB);
    exchange(&mut client, &mut server);
    web_session(&daemon, family, "ESTABLISHED");
    let start = daemon.stats_json();
    // Each sweep rebuilds the bank that is not in use and then switches to it.
    session_tests::wait_for("two reaper sweeps", Duration::from_secs(20), || {
        (delta(&start, &daemon.stats_json(), "reaper_runs") >= 2).then_some(())
    });
    let link = lab.packet_socket(Side::Client);
    let syn = TcpSegment {
        src: client.local_addr().expect("client address"),
        dst: family.sock(Side::Fw, WEB),
        seq: 0x1234_5678,
        ack: 0,
        flags: flags::SYN,
        window: 512,
        payload: Vec::new(),
    };
    let before = daemon.stats_json();
    link.send(&syn.frame(lab.mac(Side::Client), lab.mac(Side::Fw)));
    let after = daemon.stats_when("the SYN to be tracked", |s| {
        delta(&before, s, "packets_seen") >= 1
    });
    assert_eq!(delta(&before, &after, "tcp_ignored"), 1, "{after}");
    assert_eq!(delta(&before, &after, "state_new"), 0, "{after}");
    assert_eq!(delta(&before, &after, "sessions_created"), 0, "{after}");
    exchange(&mut client, &mut server);
}
