//! Sessions outlive the firewall (issue 20): connections open before the first start are
//! taken over (from conntrack when nftables was tracking them, from the sockets
//! otherwise) and keep flowing, every byte checked; a connection the policy does not
//! allow is not taken over; a saved table restored after `session down` carries a
//! forwarded stream on, with its remaining times reduced by the time the file waited;
//! damaged, foreign and oversized files are refused and change nothing.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread::sleep;
use std::time::{Duration, Instant};

use session_common::{
    record::{NO_NAME, SessionRecord},
    wire::{FAMILY_IPV4, FlowKey, proto},
};
use session_tests::{
    Family, IO_TIMEOUT, Lab, Side, accept_within, counter,
    lifecycle::{LiveStream, PROGRESS},
    router::{UPSTREAM_V4, UPSTREAM_V6, WAN_IFACE},
};
use session_user::continuity::file::TableFile;

/// The shipped default policy.
const DEFAULT_POLICY: &str = include_str!("../config/default.toml");

/// The default policy on a router: the same rules, with the WAN interface protected too.
fn router_default_policy() -> String {
    format!("interfaces = [\"{WAN_IFACE}\"]\n{DEFAULT_POLICY}")
}

/// An nftables ruleset for fw as a host: conntrack-based, SSH open, the rest dropped.
const NFT_HOST: &str = "table inet continuity {
  chain input {
    type filter hook input priority 0; policy drop;
    ct state established,related accept
    iif lo accept
    meta l4proto ipv6-icmp accept
    tcp dport 22 accept
  }
}
";

/// The same for fw as a router: forwarded SSH from the LAN, replies.
const NFT_ROUTER: &str = "table inet continuity {
  chain forward {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    meta l4proto ipv6-icmp accept
    tcp dport 22 accept
  }
}
";

fn nft_load(lab: &Lab, ruleset: &str) {
    let out = lab.run_with_input(Side::Fw, 10, &["nft", "-f", "-"], ruleset.as_bytes());
    assert!(
        out.status.success(),
        "nft refused the ruleset: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The number of conntrack entries in fw for TCP port 22.
fn conntrack_ssh_entries(lab: &Lab) -> usize {
    let out = lab.run(
        Side::Fw,
        10,
        &["conntrack", "-L", "-p", "tcp", "--dport", "22"],
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains("ESTABLISHED"))
        .count()
}

/// A TCP connection to port 22 of fw, opened before the first start (with nftables and
/// conntrack tracking it when `nftables`), carries a live stream across the start of
/// `session run` with the shipped default policy and the removal of the nftables
/// ruleset: no byte lost, no segment retransmitted.
fn ssh_survives_the_first_start(tag: &str, family: Family, nftables: bool) {
    let lab = Lab::for_family(tag, family);
    if nftables {
        nft_load(&lab, NFT_HOST);
    }
    let stream = lab.live_stream(family, 22);
    stream.assert_flowing(PROGRESS, "before session starts");
    if nftables {
        assert_eq!(
            conntrack_ssh_entries(&lab),
            1,
            "conntrack does not track the stream"
        );
    }
    let daemon = lab.daemon(DEFAULT_POLICY);
    stream.assert_flowing(PROGRESS, "after session attached");
    if nftables {
        lab.ok(
            Side::Fw,
            10,
            &["nft", "delete", "table", "inet", "continuity"],
        );
        stream.assert_flowing(PROGRESS, "after the nftables ruleset was removed");
    }
    let stats = daemon.stats_json();
    let source = if nftables {
        "takeover_conntrack"
    } else {
        "takeover_sockets"
    };
    assert_eq!(counter(&stats, source), 1, "{stats}\n{}", daemon.stderr());
    let sessions = daemon.list_json();
    let session = session_tests::find_session(
        &sessions,
        "tcp",
        family.addr(Side::Client),
        family.addr(Side::Fw),
        22,
    )
    .unwrap_or_else(|| panic!("the stream's session is not listed: {sessions:?}"));
    assert_eq!(session["state"], "ESTABLISHED", "{session}");
    assert_eq!(session["rule"], "ssh", "{session}");
    stream.assert_flowing(PROGRESS, "at the end");
    let carried = stream.finish();
    assert!(carried > 3 * PROGRESS, "only {carried} bytes carried");
    assert_eq!(counter(&daemon.stats_json(), "invalid_tcp_state"), 0);
}

/// A test of [`ssh_survives_the_first_start`] in a lab tagged `$tag`, in `$family`, taken
/// over from conntrack or else from the sockets.
macro_rules! ssh_survives {
    ($test:ident: $tag:literal, $family:ident, $from_conntrack:literal) => {
        #[test]
        fn $test() {
            ssh_survives_the_first_start($tag, Family::$family, $from_conntrack);
        }
    };
}

ssh_survives!(ssh_opened_before_the_first_start_survives_it_v4_from_the_sockets: "ct-s4", V4, false);
ssh_survives!(ssh_opened_before_the_first_start_survives_it_v6_from_the_sockets: "ct-s6", V6, false);
ssh_survives!(ssh_opened_before_the_first_start_survives_it_v4_from_conntrack: "ct-c4", V4, true);
ssh_survives!(ssh_opened_before_the_first_start_survives_it_v6_from_conntrack: "ct-c6", V6, true);

/// A connected UDP socket of the host (fw talks to the client from port 5000) is taken
/// over from the sockets: the client's datagrams to it, which the default policy would
/// drop as new inbound UDP, are its replies and pass.
#[test]
fn a_connected_udp_socket_of_the_host_is_taken_over() {
    let lab = Lab::new("ct-udp");
    let fw = lab.udp_socket(Side::Fw, Family::V4, 5000);
    let client = lab.udp_socket(Side::Client, Family::V4, 6000);
    fw.connect(Family::V4.sock(Side::Client, 6000))
        .expect("connect fw");
    client
        .connect(Family::V4.sock(Side::Fw, 5000))
        .expect("connect client");
    let mut buf = [0u8; 16];
    fw.send(b"query").expect("fw send");
    let n = client.recv(&mut buf).expect("client recv");
    assert_eq!(&buf[..n], b"query");
    let daemon = lab.daemon(DEFAULT_POLICY);
    assert_eq!(counter(&daemon.stats_json(), "takeover_sockets"), 1);
    for i in 0..3u8 {
        client.send(&[b'r', i]).expect("client send");
        let n = fw
            .recv(&mut buf)
            .expect("the reply arrives through the firewall");
        assert_eq!(&buf[..n], &[b'r', i]);
    }
    // A datagram from another port of the client is a new inbound flow: dropped.
    let stranger = lab.udp_socket(Side::Client, Family::V4, 6001);
    let fw_other = lab.udp_socket(Side::Fw, Family::V4, 5001);
    fw_other
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("read timeout");
    stranger
        .send_to(b"new", Family::V4.sock(Side::Fw, 5001))
        .expect("stranger send");
    assert!(
        fw_other.recv(&mut buf).is_err(),
        "a new inbound UDP flow passed"
    );
}

/// A connection the default policy does not allow (port 2222) is not taken over: after
/// the start its segments are dropped as invalid, and the refusal is counted.
#[test]
fn a_connection_the_policy_does_not_allow_is_not_taken_over_and_stays_cut() {
    let lab = Lab::new("ct-no");
    let (mut client, mut server) = lab.tcp_pair(Family::V4, 2222);
    client.write_all(b"before").expect("client write");
    let mut got = [0u8; 6];
    server.read_exact(&mut got).expect("server read");
    assert_eq!(&got, b"before");
    let daemon = lab.daemon(DEFAULT_POLICY);
    let stats = daemon.stats_json();
    assert_eq!(counter(&stats, "takeover_refused"), 1, "{stats}");
    assert_eq!(counter(&stats, "takeover_sockets"), 0, "{stats}");
    client.write_all(b"after").expect("client write");
    server
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("read timeout");
    let mut buf = [0u8; 16];
    match server.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("the disallowed connection still carried data: {other:?}"),
    }
    let stats = daemon.stats_json();
    assert!(counter(&stats, "invalid_tcp_state") >= 1, "{stats}");
}

fn upstream_addr(family: Family, port: u16) -> SocketAddr {
    let ip = match family {
        Family::V4 => UPSTREAM_V4,
        Family::V6 => UPSTREAM_V6,
    };
    SocketAddr::new(ip.parse().expect("upstream address"), port)
}

/// A forwarded connection from the client to upstream:22 through fw.
fn forwarded_pair(
    lab: &Lab,
    upstream: &session_tests::router::Upstream<'_>,
    family: Family,
) -> (TcpStream, TcpStream) {
    let to = upstream_addr(family, 22);
    let listener = upstream.tcp_listen(to);
    let client = lab
        .tcp_connect(Side::Client, to, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("client cannot connect to {to}: {e}"));
    let server = accept_within(&listener, IO_TIMEOUT);
    (client, server)
}

/// On a router, a forwarded stream that nftables and conntrack carried keeps flowing
/// when session takes over and the ruleset is removed.
#[test]
fn a_forwarded_stream_nftables_carried_survives_the_switch_to_session() {
    let lab = Lab::dual_stack("ct-rt");
    let upstream = lab.upstream();
    nft_load(&lab, NFT_ROUTER);
    let (client, server) = forwarded_pair(&lab, &upstream, Family::V4);
    let stream = LiveStream::start(client, server);
    stream.assert_flowing(PROGRESS, "through nftables");
    assert_eq!(
        conntrack_ssh_entries(&lab),
        1,
        "conntrack does not track the stream"
    );
    let daemon = lab.daemon(&router_default_policy());
    stream.assert_flowing(PROGRESS, "after session attached");
    lab.ok(
        Side::Fw,
        10,
        &["nft", "delete", "table", "inet", "continuity"],
    );
    stream.assert_flowing(PROGRESS, "after the nftables ruleset was removed");
    let stats = daemon.stats_json();
    assert_eq!(
        counter(&stats, "takeover_conntrack"),
        1,
        "{stats}\n{}",
        daemon.stderr()
    );
    stream.finish();
    drop(daemon);
    drop(upstream);
}

/// `expires_in_secs` of the TCP session from the client's port `sport`.
fn expires_in(sessions: &[serde_json::Value], sport: u16) -> i64 {
    let session = sessions
        .iter()
        .find(|s| s["proto"] == "tcp" && s["sport"] == sport && s["dst"] == UPSTREAM_V4)
        .unwrap_or_else(|| panic!("no session from port {sport}: {sessions:?}"));
    session["expires_in_secs"]
        .as_i64()
        .expect("expires_in_secs")
}

/// Sends `data` from `from` and reads it exactly at `to` (within the stream's timeout).
fn carry(from: &mut TcpStream, to: &mut TcpStream, data: &[u8], when: &str) {
    from.write_all(data)
        .unwrap_or_else(|e| panic!("write failed {when}: {e}"));
    let mut got = vec![0u8; data.len()];
    to.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("{} bytes did not arrive {when}: {e}", data.len()));
    assert_eq!(got, data, "bytes changed {when}");
}

/// A router's table saved, the firewall taken down and started again with
/// `run --restore`: a forwarded stream goes on (no byte lost, no retransmission), and an
/// idle session's remaining time is the saved one minus the time the file waited; the
/// idle connection works again both ways.
#[test]
fn save_down_and_run_restore_carry_a_forwarded_stream_on() {
    let lab = Lab::dual_stack("ct-sr");
    let upstream = lab.upstream();
    let policy = router_default_policy();
    let file = lab
        .scratch_path("sessions.table")
        .to_string_lossy()
        .into_owned();
    let daemon = lab.daemon(&policy);
    let (client, server) = forwarded_pair(&lab, &upstream, Family::V4);
    let stream = LiveStream::start(client, server);
    let (mut idle_client, mut idle_server) = forwarded_pair(&lab, &upstream, Family::V4);
    let idle_port = idle_client.local_addr().expect("local address").port();
    carry(
        &mut idle_client,
        &mut idle_server,
        b"hello",
        "before the save",
    );
    stream.assert_flowing(PROGRESS, "before the save");
    // The idle session ages, so its time left differs from a fresh one's.
    sleep(Duration::from_secs(2));
    let out = daemon.cli(&["save", &file]);
    assert!(out.contains("saved 2 session(s)"), "{out}");
    let saved = expires_in(&daemon.list_json(), idle_port);
    let saved_at = Instant::now();
    daemon.cli(&["down"]);
    drop(daemon);
    // The file waits.
    sleep(Duration::from_secs(3));
    let restored = lab.daemon_with(&policy, &["--restore", &file]);
    let now = expires_in(&restored.list_json(), idle_port);
    let waited = saved_at.elapsed().as_secs_f64();
    assert!(
        now <= saved - 3 && (now as f64 - (saved as f64 - waited)).abs() <= 2.0,
        "restored time left {now} s, saved {saved} s, {waited:.1} s later"
    );
    stream.assert_flowing(PROGRESS, "after the restore");
    let stats = restored.stats_json();
    assert_eq!(
        counter(&stats, "sessions_restored"),
        2,
        "{stats}\n{}",
        restored.stderr()
    );
    assert!(
        restored.stderr().contains("restored 2 session(s)"),
        "the daemon did not report the restore: {}",
        restored.stderr()
    );
    carry(
        &mut idle_server,
        &mut idle_client,
        b"answer",
        "after the restore",
    );
    carry(
        &mut idle_client,
        &mut idle_server,
        b"again",
        "after the restore",
    );
    stream.finish();
    drop(restored);
    drop(upstream);
}

/// Without its saved table, a new firewall does not know a forwarded connection and it
/// stalls; `session restore` of the table into the running firewall brings it back.
#[test]
fn a_forwarded_connection_stalls_without_its_table_and_session_restore_revives_it() {
    let lab = Lab::dual_stack("ct-st");
    let upstream = lab.upstream();
    let policy = router_default_policy();
    let file = lab
        .scratch_path("sessions.table")
        .to_string_lossy()
        .into_owned();
    let daemon = lab.daemon(&policy);
    let (mut client, mut server) = forwarded_pair(&lab, &upstream, Family::V4);
    carry(&mut client, &mut server, b"first", "before the save");
    daemon.cli(&["save", &file]);
    daemon.cli(&["down"]);
    drop(daemon);
    let fresh = lab.daemon(&policy);
    client.write_all(b"second").expect("client write");
    server
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("read timeout");
    let mut buf = [0u8; 6];
    match server.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("the untracked connection still carried data: {other:?}"),
    }
    assert!(counter(&fresh.stats_json(), "state_invalid") >= 1);
    let out = fresh.cli(&["restore", &file]);
    assert!(out.contains("restored 1 session(s)"), "{out}");
    // The client retransmits with back-off: allow for it.
    server
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    server
        .read_exact(&mut buf)
        .expect("the stalled bytes arrive after the restore");
    assert_eq!(&buf, b"second");
    carry(&mut server, &mut client, b"reply", "after the restore");
    drop(fresh);
    drop(upstream);
}

/// Writes `table` to a file in the lab and returns its path.
fn write_table(lab: &Lab, name: &str, bytes: &[u8]) -> String {
    let path = lab.scratch_path(name);
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path.to_string_lossy().into_owned()
}

/// A damaged file, one of another format version, and one with more sessions than
/// `max_sessions` are refused by `session restore` with the reason, and change nothing.
#[test]
fn damaged_foreign_and_oversized_tables_are_refused_and_change_nothing() {
    let lab = Lab::new("ct-bad");
    let daemon = lab.daemon(DEFAULT_POLICY);
    let (mut client, mut server) = lab.tcp_pair(Family::V4, 22);
    client.write_all(b"x").expect("write");
    let mut one = [0u8; 1];
    server.read_exact(&mut one).expect("read");
    let good = write_table(&lab, "good.table", b"");
    let out = daemon.cli(&["save", &good]);
    assert!(out.contains("saved 1 session(s)"), "{out}");
    let bytes = std::fs::read(&good).expect("read the saved table");

    let mut damaged = bytes.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x10;
    let mut foreign = bytes.clone();
    foreign[8] = 99;
    let oversized = {
        let records = (0..262_145u32)
            .map(|i| {
                let mut lo = [0u8; 16];
                lo[10] = 0xff;
                lo[11] = 0xff;
                lo[12..].copy_from_slice(&[198, 18, 1, 1]);
                let mut hi = lo;
                hi[14] = 2;
                SessionRecord {
                    key: FlowKey {
                        addr_lo: lo,
                        addr_hi: hi,
                        port_lo: (i % 60_000) as u16 + 1024,
                        port_hi: (i / 60_000) as u16 + 1,
                        proto: proto::UDP,
                        family: FAMILY_IPV4,
                        _pad: [0; 2],
                    },
                    state: 1,
                    rule: NO_NAME,
                    origin_iface: NO_NAME,
                    remaining_ns: 60_000_000_000,
                    ..SessionRecord::default()
                }
            })
            .collect();
        TableFile {
            saved_unix_ns: 0,
            rules: Vec::new(),
            ifaces: Vec::new(),
            records,
        }
        .encode()
    };
    let before = daemon.list_json();
    let stats_before = daemon.stats_json();
    for (name, contents, reason) in [
        ("damaged.table", damaged, "checksum mismatch"),
        ("foreign.table", foreign, "format version 99"),
        (
            "oversized.table",
            oversized,
            "more than this table's max_sessions",
        ),
    ] {
        let path = write_table(&lab, name, &contents);
        let out = daemon.cli_output(&["restore", &path]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was restored: {stderr}");
        assert!(
            stderr.contains(reason),
            "{name}: the error does not say {reason:?}: {stderr}"
        );
        assert!(stderr.contains("nothing changed"), "{name}: {stderr}");
    }
    let after = daemon.list_json();
    let stats_after = daemon.stats_json();
    assert_eq!(
        before.len(),
        after.len(),
        "the table changed: {before:?} -> {after:?}"
    );
    for name in ["sessions_restored", "restore_refused"] {
        assert_eq!(
            counter(&stats_before, name),
            counter(&stats_after, name),
            "{name}"
        );
    }
    // The good file restores: its session is already there, so nothing is added.
    let out = daemon.cli(&["restore", &good]);
    assert!(
        out.contains("restored 0 session(s)") && out.contains("1 already in the table"),
        "{out}"
    );
}
