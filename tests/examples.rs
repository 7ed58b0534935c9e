//! The example policies in config/examples/ do what their comments say, proved with real
//! traffic through the real daemon.
//!
//! Each test loads the example file as shipped; the only change is the interface name
//! (`eth0`, `lan0`), replaced by the lab's veth, because a lab namespace has no `eth0`.
//! The examples' addresses are from the benchmarking ranges, so the lab gives the client
//! namespace the addresses the example's sets name (the administrators' network, the
//! internal servers, the resolvers) and fw an on-link route to them.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use session_tests::router::{FW_WAN_V4, UPSTREAM_V4, UPSTREAM_V6, WAN_IFACE};
use session_tests::{
    CLIENT_V4, CLIENT_V6, Daemon, FW_IFACE, FW_V4, Family, IO_TIMEOUT, Lab, Side, accept_within,
    counter, delta, describe, find_session, rule_hits, set_linger_zero,
};

/// How long a connection attempt the policy should block is given before it counts as
/// blocked: a veth answers in microseconds, so a second is plenty.
const BLOCKED_WAIT: Duration = Duration::from_secs(1);
/// How long an allowed connection may take.
const ALLOWED_WAIT: Duration = Duration::from_secs(3);

const EXAMPLES: [&str; 6] = [
    "web-server.toml",
    "blocklist.toml",
    "ssh-bastion.toml",
    "ssh-bruteforce.toml",
    "outbound-only.toml",
    "router.toml",
];

fn example_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../config/examples")
        .join(name)
}

/// The example file `name` with each quoted interface name `from` replaced by `to`;
/// panics if a name to replace does not occur, so the test cannot silently drift from
/// the file.
fn example_for_lab(name: &str, renames: &[(&str, &str)]) -> String {
    let path = example_path(name);
    let mut text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    for (from, to) in renames {
        let quoted = format!("\"{from}\"");
        assert!(
            text.contains(&quoted),
            "{name} no longer names interface {quoted}"
        );
        text = text.replace(&quoted, &format!("\"{to}\""));
    }
    text
}

fn session_bin() -> PathBuf {
    std::env::var_os("SESSION_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/session"))
}

fn sock(text: &str) -> SocketAddr {
    text.parse()
        .unwrap_or_else(|e| panic!("test bug: {text} is not a socket address: {e}"))
}

/// Adds `cidr` to `side`'s veth (IPv6 without duplicate address detection).
fn add_address(lab: &Lab, side: Side, cidr: &str) {
    let iface = Lab::iface(side);
    if cidr.contains(':') {
        lab.ok(
            side,
            5,
            &["ip", "-6", "addr", "add", cidr, "dev", iface, "nodad"],
        );
    } else {
        lab.ok(side, 5, &["ip", "addr", "add", cidr, "dev", iface]);
    }
}

/// Makes fw reach `cidr` directly on its veth, where the client holds those addresses.
fn route_on_link(lab: &Lab, cidr: &str) {
    let family = if cidr.contains(':') { "-6" } else { "-4" };
    lab.ok(
        Side::Fw,
        5,
        &["ip", family, "route", "add", cidr, "dev", FW_IFACE],
    );
}

fn listen(lab: &Lab, side: Side, addr: &str) -> TcpListener {
    let addr = sock(addr);
    lab.in_ns(side, || TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("cannot listen on {addr} in {}: {e}", lab.ns(side)))
}

fn udp_bind(lab: &Lab, side: Side, addr: &str) -> UdpSocket {
    let addr = sock(addr);
    let socket = lab
        .in_ns(side, || UdpSocket::bind(addr))
        .unwrap_or_else(|e| panic!("cannot bind UDP {addr} in {}: {e}", lab.ns(side)));
    socket
        .set_read_timeout(Some(BLOCKED_WAIT))
        .expect("read timeout");
    socket
}

/// Connects from `side` (from the local address `from` when given) to `to` and returns
/// the stream if the connection was established within `wait`.
fn try_connect(
    lab: &Lab,
    side: Side,
    from: Option<&str>,
    to: &str,
    wait: Duration,
) -> io::Result<TcpStream> {
    match from {
        Some(from) => lab.tcp_connect_from(side, sock(from), sock(to), wait),
        None => lab.tcp_connect(side, sock(to), wait),
    }
}

/// Asserts that the connection succeeds, the listener accepts it, and a request and its
/// answer cross it.
fn assert_connects(
    lab: &Lab,
    side: Side,
    from: Option<&str>,
    to: &str,
    listener: &TcpListener,
    why: &str,
) {
    let mut client = try_connect(lab, side, from, to, ALLOWED_WAIT)
        .unwrap_or_else(|e| panic!("{why}: connecting {from:?} -> {to} failed: {e}"));
    let mut server = accept_within(listener, IO_TIMEOUT);
    client.write_all(b"ping").expect("request");
    let mut got = [0u8; 4];
    server.read_exact(&mut got).expect("server reads request");
    server.write_all(b"pong").expect("answer");
    client.read_exact(&mut got).expect("client reads answer");
    assert_eq!(&got, b"pong", "{why}");
}

/// Asserts that the connection is not established and the listener saw nothing.
fn assert_blocked(
    lab: &Lab,
    side: Side,
    from: Option<&str>,
    to: &str,
    listener: &TcpListener,
    why: &str,
) {
    let result = try_connect(lab, side, from, to, BLOCKED_WAIT);
    assert!(
        result.is_err(),
        "{why}: connecting {from:?} -> {to} must be blocked, but it succeeded"
    );
    listener.set_nonblocking(true).expect("non-blocking");
    match listener.accept() {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        other => panic!("{why}: the listener on {to} must see nothing, got {other:?}"),
    }
}

/// Sends a datagram from `client` to `server` and, if it arrives, an answer back; returns
/// whether the answer came back (`None`: the request never arrived).
fn udp_exchange(client: &UdpSocket, server: &UdpSocket) -> Option<bool> {
    let to = server.local_addr().expect("server address");
    client.send_to(b"query", to).expect("send query");
    let mut buf = [0u8; 16];
    let (_, from) = server.recv_from(&mut buf).ok()?;
    server.send_to(b"answer", from).expect("send answer");
    Some(client.recv_from(&mut buf).is_ok())
}

/// Fresh stats once the rule hits include at least `expected` for `rule`.
fn stats_with_hits(daemon: &Daemon<'_>, rule: &str, expected: u64) -> Value {
    daemon.stats_when(&format!("{expected} hits of rule {rule}"), |stats| {
        rule_hits(stats, rule) >= expected
    })
}

#[test]
fn every_example_passes_session_check() {
    let bin = session_bin();
    for name in EXAMPLES {
        let path = example_path(name);
        let out = Command::new(&bin)
            .arg("check")
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        assert!(
            out.status.success(),
            "`session check {name}` failed: {}",
            describe(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout.lines().next().unwrap_or(""),
            format!("{}: ok", path.display())
        );
        assert!(
            stdout.lines().skip(1).all(|line| line.starts_with("set")
                || line.starts_with("rule `")
                || line.starts_with("syn_defence: ")),
            "after `ok`, check reports only the sets, the rules' limits and the SYN defence: {stdout}"
        );
        assert!(
            out.stderr.is_empty(),
            "{name} has warnings: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn blocklist_example_does_what_its_comments_say() {
    let lab = Lab::dual_stack("exblk");
    // Client-side addresses inside the shipped blocklist.txt.
    let (listed_v4, listed_v6) = ("198.18.66.9", "2001:2:0:66::9");
    add_address(&lab, Side::Client, &format!("{listed_v4}/24"));
    add_address(&lab, Side::Client, &format!("{listed_v6}/64"));
    route_on_link(&lab, "198.18.66.0/24");
    route_on_link(&lab, "2001:2:0:66::/64");
    let list = example_path("blocklist.txt");
    let daemon = lab.daemon(&example_for_lab(
        "blocklist.toml",
        &[
            ("eth0", FW_IFACE),
            ("blocklist.txt", list.to_string_lossy().as_ref()),
        ],
    ));
    for family in [Family::V4, Family::V6] {
        let at = |port: u16| family.sock(Side::Fw, port).to_string();
        let web = lab.tcp_listen(Side::Fw, family, 80);
        assert_connects(&lab, Side::Client, None, &at(80), &web, "web");
        let listed = match family {
            Family::V4 => format!("{listed_v4}:0"),
            Family::V6 => format!("[{listed_v6}]:0"),
        };
        assert_blocked(
            &lab,
            Side::Client,
            Some(&listed),
            &at(80),
            &web,
            "a listed source",
        );
    }
    // A ban at run time drops the next connection and the connection that exists.
    let web = lab.tcp_listen(Side::Fw, Family::V4, 443);
    let at = Family::V4.sock(Side::Fw, 443).to_string();
    let mut open = try_connect(&lab, Side::Client, None, &at, ALLOWED_WAIT)
        .unwrap_or_else(|e| panic!("connecting before the ban: {e}"));
    let mut server = accept_within(&web, IO_TIMEOUT);
    open.write_all(b"ping").expect("request before the ban");
    let mut got = [0u8; 4];
    server
        .read_exact(&mut got)
        .expect("the server reads the request");
    daemon.cli(&["set", "add", "bans", CLIENT_V4, "--timeout", "3600"]);
    assert_blocked(&lab, Side::Client, None, &at, &web, "a banned source");
    open.write_all(b"more").expect("the write itself succeeds");
    server
        .set_read_timeout(Some(BLOCKED_WAIT))
        .expect("read timeout");
    assert!(
        server.read_exact(&mut got).is_err(),
        "the banned source's existing connection must be cut"
    );
    daemon.cli(&["set", "delete", "bans", CLIENT_V4]);
    assert_connects(&lab, Side::Client, None, &at, &web, "pardoned");
}

#[test]
fn ssh_bruteforce_example_does_what_its_comments_say() {
    let lab = Lab::dual_stack("exbrute");
    let daemon = lab.daemon(&example_for_lab(
        "ssh-bruteforce.toml",
        &[("eth0", FW_IFACE)],
    ));
    let ssh = lab.tcp_listen(Side::Fw, Family::V4, 22);
    let ssh6 = lab.tcp_listen(Side::Fw, Family::V6, 22);
    let at = Family::V4.sock(Side::Fw, 22).to_string();
    let at6 = Family::V6.sock(Side::Fw, 22).to_string();
    // One connection held open, then nine more opened and closed: ten in the minute.
    let mut held = try_connect(&lab, Side::Client, None, &at, ALLOWED_WAIT)
        .unwrap_or_else(|e| panic!("the first connection: {e}"));
    let mut held_server = accept_within(&ssh, IO_TIMEOUT);
    for i in 1..10 {
        assert_connects(
            &lab,
            Side::Client,
            None,
            &at,
            &ssh,
            &format!("connection {i}"),
        );
    }
    // The eleventh within the minute is over `max_src_conn_rate`: refused, and the
    // source is banned, its held connection cut.
    assert_blocked(&lab, Side::Client, None, &at, &ssh, "over the rate");
    daemon.wait_log("overloaded by rule ssh", Duration::from_secs(5));
    let banned = daemon.cli(&["set", "show", "abusers"]);
    assert!(
        banned.contains(&format!("{CLIENT_V4}/32 # expires in ")),
        "the client is banned for an hour: {banned}"
    );
    held.write_all(b"more").expect("the write itself succeeds");
    held_server
        .set_read_timeout(Some(BLOCKED_WAIT))
        .expect("read timeout");
    let mut got = [0u8; 4];
    assert!(
        held_server.read_exact(&mut got).is_err(),
        "the banned source's open connection is cut"
    );
    let stats = daemon.stats_json();
    let ssh_rule = stats["rules"]
        .as_array()
        .and_then(|rules| rules.iter().find(|rule| rule["name"] == "ssh"))
        .unwrap_or_else(|| panic!("no ssh rule in {stats}"));
    assert_eq!(ssh_rule["limit"]["overloaded"], 1, "{stats}");
    // Another source (the client's IPv6 address) is not affected.
    assert_connects(&lab, Side::Client, None, &at6, &ssh6, "another source");
    // A pardon lets the client in again, once its rate bucket has refilled by one
    // connection (10 a minute: one every 6 s); an attempt before that would ban it anew.
    daemon.cli(&["set", "delete", "abusers", CLIENT_V4]);
    std::thread::sleep(Duration::from_millis(6500));
    assert_connects(&lab, Side::Client, None, &at, &ssh, "pardoned");
}

#[test]
fn web_server_example_does_what_its_comments_say() {
    let lab = Lab::dual_stack("exweb");
    // Client-side addresses inside the example's `admins` set.
    let (admin_v4, admin_v6) = ("198.18.100.1", "2001:2:0:100::1");
    add_address(&lab, Side::Client, &format!("{admin_v4}/24"));
    add_address(&lab, Side::Client, &format!("{admin_v6}/64"));
    route_on_link(&lab, "198.18.100.0/24");
    route_on_link(&lab, "2001:2:0:100::/64");
    let daemon = lab.daemon(&example_for_lab("web-server.toml", &[("eth0", FW_IFACE)]));

    for family in [Family::V4, Family::V6] {
        let fw = family.addr(Side::Fw);
        let at = |port: u16| family.sock(Side::Fw, port).to_string();
        // HTTP and HTTPS are open to everyone.
        for port in [80, 443] {
            let listener = lab.tcp_listen(Side::Fw, family, port);
            assert_connects(&lab, Side::Client, None, &at(port), &listener, "web");
        }
        // SSH only from the administrators' networks.
        let ssh = lab.tcp_listen(Side::Fw, family, 22);
        assert_blocked(&lab, Side::Client, None, &at(22), &ssh, "ssh from outside");
        let admin = match family {
            Family::V4 => format!("{admin_v4}:0"),
            Family::V6 => format!("[{admin_v6}]:0"),
        };
        assert_connects(
            &lab,
            Side::Client,
            Some(&admin),
            &at(22),
            &ssh,
            "ssh from admins",
        );
        // Anything else that arrives is dropped: another TCP port, UDP.
        let other = lab.tcp_listen(Side::Fw, family, 8080);
        assert_blocked(&lab, Side::Client, None, &at(8080), &other, "port 8080");
        let sink = udp_bind(&lab, Side::Fw, &at(5353));
        let sender = lab.udp_socket(Side::Client, family, 0);
        assert_eq!(
            udp_exchange(&sender, &sink),
            None,
            "a UDP datagram to {fw} must be dropped"
        );
        // Ping is answered.
        assert_eq!(lab.ping(Side::Client, fw, 2), 2, "ping {fw}");
        // The server's own connections go out and their replies come back.
        let api = lab.tcp_listen(Side::Client, family, 5432);
        let api_at = family.sock(Side::Client, 5432).to_string();
        assert_connects(&lab, Side::Fw, None, &api_at, &api, "outbound connection");
        let resolver = lab.udp_socket(Side::Client, family, 53);
        let query = udp_bind(&lab, Side::Fw, &at(0));
        assert_eq!(
            udp_exchange(&query, &resolver),
            Some(true),
            "the server's DNS-like query must get its answer"
        );
    }
    // Invalid: an ACK for a connection that never was.
    lab.send_stray_ack(80, 1_000_000, 2_000_000);

    let stats = stats_with_hits(&daemon, "invalid", 1);
    assert_eq!(
        rule_hits(&stats, "web"),
        4,
        "one per HTTP(S) connection: {stats}"
    );
    assert_eq!(rule_hits(&stats, "ssh-admins"), 2, "{stats}");
    assert_eq!(rule_hits(&stats, "ping"), 1, "one echo session: {stats}");
    assert_eq!(rule_hits(&stats, "ping6"), 1, "one echo session: {stats}");
    assert_eq!(rule_hits(&stats, "invalid"), 1, "the stray ACK: {stats}");
    assert!(
        stats["default_inbound_hits"].as_u64().unwrap_or(0) >= 6,
        "ssh from outside, port 8080 and UDP, in both families, fell to the default: {stats}"
    );
    assert!(rule_hits(&stats, "established") > 0, "{stats}");
}

#[test]
fn ssh_bastion_example_does_what_its_comments_say() {
    let lab = Lab::dual_stack("exbastion");
    // The client namespace also plays the internal servers and the resolvers.
    for cidr in [
        "198.18.50.1/24",
        "2001:2:0:50::1/64",
        "198.18.53.53/24",
        "2001:2:0:53::53/64",
    ] {
        add_address(&lab, Side::Client, cidr);
    }
    for cidr in [
        "198.18.50.0/24",
        "2001:2:0:50::/64",
        "198.18.53.0/24",
        "2001:2:0:53::/64",
    ] {
        route_on_link(&lab, cidr);
    }
    let daemon = lab.daemon(&example_for_lab("ssh-bastion.toml", &[("eth0", FW_IFACE)]));

    for family in [Family::V4, Family::V6] {
        let fw = family.addr(Side::Fw);
        let at = |port: u16| family.sock(Side::Fw, port).to_string();
        let (internal, resolver, outside) = match family {
            Family::V4 => ("198.18.50.1", "198.18.53.53", CLIENT_V4),
            Family::V6 => ("2001:2:0:50::1", "2001:2:0:53::53", CLIENT_V6),
        };
        let remote = |addr: &str, port: u16| SocketAddr::new(sock_ip(addr), port).to_string();
        // In: SSH from anywhere and ping; nothing else.
        let ssh = lab.tcp_listen(Side::Fw, family, 22);
        assert_connects(
            &lab,
            Side::Client,
            None,
            &at(22),
            &ssh,
            "ssh to the bastion",
        );
        assert_eq!(lab.ping(Side::Client, fw, 2), 2, "ping {fw}");
        let other = lab.tcp_listen(Side::Fw, family, 8080);
        assert_blocked(&lab, Side::Client, None, &at(8080), &other, "port 8080");
        // Out: SSH to the internal servers only.
        for (addr, port, open, why) in [
            (internal, 22, true, "ssh to an internal server"),
            (outside, 22, false, "ssh to the outside world"),
            (internal, 80, false, "web from the bastion"),
        ] {
            let to = remote(addr, port);
            let listener = listen(&lab, Side::Client, &to);
            if open {
                assert_connects(&lab, Side::Fw, None, &to, &listener, why);
            } else {
                assert_blocked(&lab, Side::Fw, None, &to, &listener, why);
            }
        }
        // DNS only at the resolvers.
        let query = udp_bind(&lab, Side::Fw, &at(0));
        let good = udp_bind(&lab, Side::Client, &remote(resolver, 53));
        assert_eq!(udp_exchange(&query, &good), Some(true), "DNS at {resolver}");
        let bad = udp_bind(&lab, Side::Client, &remote(outside, 53));
        assert_eq!(udp_exchange(&query, &bad), None, "DNS at {outside}");
        // Ping only the internal network.
        assert_eq!(lab.ping(Side::Fw, internal, 2), 2, "ping {internal}");
        assert_eq!(lab.ping(Side::Fw, outside, 1), 0, "ping {outside}");
    }

    let stats = stats_with_hits(&daemon, "ssh-out", 2);
    assert_eq!(rule_hits(&stats, "ssh-in"), 2, "{stats}");
    assert_eq!(rule_hits(&stats, "ping-in"), 1, "{stats}");
    assert_eq!(rule_hits(&stats, "ping6-in"), 1, "{stats}");
    assert_eq!(rule_hits(&stats, "ssh-out"), 2, "{stats}");
    assert_eq!(rule_hits(&stats, "dns-out"), 2, "{stats}");
    assert_eq!(rule_hits(&stats, "ping-out"), 1, "{stats}");
    assert_eq!(rule_hits(&stats, "ping6-out"), 1, "{stats}");
    assert!(
        stats["default_outbound_hits"].as_u64().unwrap_or(0) >= 8,
        "ssh and web to forbidden places, DNS elsewhere and ping outside, in both \
         families, fell to the outbound default: {stats}"
    );
}

fn sock_ip(text: &str) -> std::net::IpAddr {
    text.parse()
        .unwrap_or_else(|e| panic!("test bug: {text} is not an address: {e}"))
}

#[test]
fn outbound_only_example_does_what_its_comments_say() {
    let lab = Lab::dual_stack("exout");
    let daemon = lab.daemon(&example_for_lab(
        "outbound-only.toml",
        &[("eth0", FW_IFACE)],
    ));
    let before = daemon.stats_json();

    for family in [Family::V4, Family::V6] {
        let client = family.addr(Side::Client);
        let fw = family.addr(Side::Fw);
        // Everything the host sends goes out, and the replies come back.
        let server = lab.tcp_listen(Side::Client, family, 443);
        let server_at = family.sock(Side::Client, 443).to_string();
        assert_connects(&lab, Side::Fw, None, &server_at, &server, "outbound TCP");
        let echo = lab.udp_socket(Side::Client, family, 123);
        let query = lab.udp_socket(Side::Fw, family, 0);
        assert_eq!(udp_exchange(&query, &echo), Some(true), "outbound UDP");
        assert_eq!(lab.ping(Side::Fw, client, 2), 2, "ping {client}");
        // Errors about its own connections come back, so failures are fast: a TCP reset
        // and an ICMP port unreachable (related).
        let closed = family.sock(Side::Client, 9).to_string();
        let refused = try_connect(&lab, Side::Fw, None, &closed, ALLOWED_WAIT)
            .expect_err("nothing listens on port 9");
        assert_eq!(
            refused.kind(),
            io::ErrorKind::ConnectionRefused,
            "TCP to {closed}"
        );
        let udp = lab.udp_socket(Side::Fw, family, 0);
        udp.connect(family.sock(Side::Client, 9))
            .expect("connect UDP");
        udp.send(b"anyone?").expect("send");
        let error = udp
            .recv(&mut [0u8; 16])
            .expect_err("the port unreachable must surface as an error");
        assert_eq!(
            error.kind(),
            io::ErrorKind::ConnectionRefused,
            "UDP to {closed}"
        );
        // Nothing from outside can open anything.
        let at = |port: u16| family.sock(Side::Fw, port).to_string();
        let ssh = lab.tcp_listen(Side::Fw, family, 22);
        assert_blocked(&lab, Side::Client, None, &at(22), &ssh, "inbound SSH");
        let sink = lab.udp_socket(Side::Fw, family, 5000);
        sink.set_read_timeout(Some(BLOCKED_WAIT)).expect("timeout");
        let sender = lab.udp_socket(Side::Client, family, 0);
        assert_eq!(udp_exchange(&sender, &sink), None, "inbound UDP");
        assert_eq!(lab.ping(Side::Client, fw, 1), 0, "ping {fw}");
    }
    // A segment for a connection the host never opened.
    lab.send_stray_ack(22, 1_000_000, 2_000_000);

    let after = stats_with_hits(&daemon, "invalid", 1);
    assert_eq!(rule_hits(&after, "invalid"), 1, "the stray ACK: {after}");
    assert_eq!(
        delta(&before, &after, "state_related"),
        2,
        "one port unreachable per family, related to the UDP session: {after}"
    );
    assert!(rule_hits(&after, "replies") > 0, "{after}");
    assert!(
        after["default_inbound_hits"].as_u64().unwrap_or(0) >= 6,
        "SSH, UDP and ping from outside, in both families, fell to the default: {after}"
    );
}

#[test]
fn router_example_does_what_its_comments_say() {
    let lab = Lab::dual_stack("exrouter");
    let upstream = lab.upstream();
    let daemon = lab.daemon(&example_for_lab("router.toml", &[("lan0", FW_IFACE)]));
    let text = example_for_lab("router.toml", &[]);
    assert!(
        text.contains(&format!("\"{WAN_IFACE}\"")),
        "the router example names {WAN_IFACE}, the lab's WAN interface"
    );

    // The local network opens connections upstream, over IPv4 and IPv6.
    let v4_web = upstream.tcp_listen(sock(&format!("{UPSTREAM_V4}:443")));
    assert_connects(
        &lab,
        Side::Client,
        None,
        &format!("{UPSTREAM_V4}:443"),
        &v4_web,
        "LAN to upstream (IPv4)",
    );
    let v6_web = upstream.tcp_listen(sock(&format!("[{UPSTREAM_V6}]:443")));
    assert_connects(
        &lab,
        Side::Client,
        None,
        &format!("[{UPSTREAM_V6}]:443"),
        &v6_web,
        "LAN to upstream (IPv6)",
    );
    assert_eq!(
        lab.ping(Side::Client, UPSTREAM_V4, 2),
        2,
        "LAN pings upstream"
    );
    // ... and to the router itself.
    let router_ssh = lab.tcp_listen(Side::Fw, Family::V4, 22);
    assert_connects(
        &lab,
        Side::Client,
        None,
        &format!("{FW_V4}:22"),
        &router_ssh,
        "LAN to the router",
    );

    // Upstream reaches the published web server, and nothing else.
    for (family, port) in [(Family::V4, 80), (Family::V6, 443)] {
        let web = lab.tcp_listen(Side::Client, family, port);
        let mut stream = upstream
            .tcp_connect(None, family.sock(Side::Client, port), ALLOWED_WAIT)
            .unwrap_or_else(|e| panic!("upstream to the LAN web server ({family:?}): {e}"));
        let mut server = accept_within(&web, IO_TIMEOUT);
        stream.write_all(b"GET").expect("request");
        let mut got = [0u8; 3];
        server.read_exact(&mut got).expect("server reads");
        assert_eq!(&got, b"GET");
    }
    let lan_ssh = lab.tcp_listen(Side::Client, Family::V4, 22);
    assert!(
        upstream
            .tcp_connect(None, Family::V4.sock(Side::Client, 22), BLOCKED_WAIT)
            .is_err(),
        "SSH from upstream to a LAN host must be blocked"
    );
    let router_wan_ssh = lab.in_ns(Side::Fw, || {
        TcpListener::bind(sock(&format!("{FW_WAN_V4}:22")))
    });
    let router_wan_ssh = router_wan_ssh.expect("listen on the router's WAN address");
    assert!(
        upstream
            .tcp_connect(None, sock(&format!("{FW_WAN_V4}:22")), BLOCKED_WAIT)
            .is_err(),
        "SSH from upstream to the router must be blocked"
    );
    for listener in [&lan_ssh, &router_wan_ssh] {
        listener.set_nonblocking(true).expect("non-blocking");
        assert!(
            listener.accept().is_err(),
            "a blocked connection reached a listener"
        );
    }
    let lan_udp = udp_bind(&lab, Side::Client, &format!("{CLIENT_V4}:5353"));
    let upstream_udp = upstream
        .in_ns(|| UdpSocket::bind(sock(&format!("{UPSTREAM_V4}:0"))))
        .expect("UDP socket in upstream");
    upstream_udp
        .set_read_timeout(Some(BLOCKED_WAIT))
        .expect("read timeout");
    assert_eq!(
        udp_exchange(&upstream_udp, &lan_udp),
        None,
        "UDP from upstream to a LAN host must be blocked"
    );
    assert_eq!(upstream.ping(CLIENT_V4, 2), 2, "upstream pings a LAN host");
    assert_eq!(upstream.ping(FW_WAN_V4, 2), 2, "upstream pings the router");
    assert_eq!(
        upstream.ping(CLIENT_V6, 2),
        2,
        "upstream pings a LAN host (IPv6)"
    );

    // A packet from upstream with a local source address is dropped, even to the
    // published web server.
    upstream.ok(5, &["ip", "addr", "add", "198.18.0.99/32", "dev", "lo"]);
    let spoof_web = lab.tcp_listen(Side::Client, Family::V4, 8443);
    let before_spoof = daemon.stats_json();
    assert!(
        upstream
            .tcp_connect(
                Some(sock("198.18.0.99:0")),
                Family::V4.sock(Side::Client, 8443),
                BLOCKED_WAIT,
            )
            .is_err(),
        "a spoofed LAN source from upstream must be blocked"
    );
    spoof_web.set_nonblocking(true).expect("non-blocking");
    assert!(
        spoof_web.accept().is_err(),
        "the spoofed connection reached the web server"
    );
    let after_spoof = stats_with_hits(&daemon, "spoofed", 1);
    assert!(
        rule_hits(&after_spoof, "spoofed") > rule_hits(&before_spoof, "spoofed"),
        "{after_spoof}"
    );

    // The router's own traffic goes out and its replies come back.
    let update = upstream.tcp_listen(sock(&format!("{UPSTREAM_V4}:8080")));
    let stream = lab
        .tcp_connect(Side::Fw, sock(&format!("{UPSTREAM_V4}:8080")), ALLOWED_WAIT)
        .expect("the router's own connection upstream");
    drop(accept_within(&update, IO_TIMEOUT));
    drop(stream);

    // A forwarded packet is checked once, at the XDP hook of the interface it arrives on,
    // and skipped by the egress program of the interface it leaves by: a connection from
    // the LAN that is opened and reset counts exactly SYN, ACK and RST one way and the
    // SYN-ACK the other (twice as many if egress tracked them too).
    let before = daemon.stats_json();
    let once = upstream.tcp_listen(sock(&format!("{UPSTREAM_V4}:9000")));
    let client = lab
        .tcp_connect(
            Side::Client,
            sock(&format!("{UPSTREAM_V4}:9000")),
            ALLOWED_WAIT,
        )
        .expect("LAN to upstream");
    let server = accept_within(&once, IO_TIMEOUT);
    set_linger_zero(&client);
    drop(client);
    let reset = daemon.wait_session("tcp", CLIENT_V4, UPSTREAM_V4, 9000, "CLOSE");
    drop(server);
    assert_eq!(
        (&reset["orig_packets"], &reset["reply_packets"]),
        (&Value::from(3), &Value::from(1)),
        "each forwarded packet is counted once: {reset}"
    );
    assert_eq!(reset["rule"], "lan-out", "{reset}");
    let after = daemon.stats_json();
    assert_eq!(
        rule_hits(&after, "lan-out") - rule_hits(&before, "lan-out"),
        1,
        "the SYN was checked once: {after}"
    );

    let sessions = daemon.list_json();
    let forwarded = find_session(&sessions, "tcp", CLIENT_V4, UPSTREAM_V4, 443)
        .unwrap_or_else(|| panic!("no session for the LAN's connection upstream: {sessions:?}"));
    assert_eq!(forwarded["rule"], "lan-out", "{forwarded}");
    let published = find_session(&sessions, "tcp", UPSTREAM_V4, CLIENT_V4, 80)
        .unwrap_or_else(|| panic!("no session for upstream's web request: {sessions:?}"));
    assert_eq!(published["rule"], "web-in", "{published}");
    let stats = daemon.stats_json();
    assert_eq!(rule_hits(&stats, "web-in"), 2, "{stats}");
    assert!(
        counter(&stats, "drop_rule") >= 1,
        "the spoofed SYN: {stats}"
    );
    assert_eq!(
        rule_hits(&stats, "ping-in"),
        2,
        "one echo session per target: {stats}"
    );
    assert_eq!(rule_hits(&stats, "ping6-in"), 1, "{stats}");
}
