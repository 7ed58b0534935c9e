//! Floods against a full session table: an IPv4 SYN flood, an IPv4 UDP flood and a mixed
//! IPv6 one, each from tens of thousands of spoofed sources at the load generator's top
//! rate, against an open and a closed port, while a few established IPv4 TCP connections
//! keep transferring data.
//!
//! The flood comes from a third namespace over a link of its own (see
//! [`session_tests::attacker`]), as from another host, so that the client's segments are
//! not lost to the flood in a shared veth ring. The daemon protects both of fw's links,
//! with a realistic policy (return traffic accepted, IPv6 neighbour
//! discovery accepted, new flows only to the open ports, default drop) and a small table (`max_sessions = 4096`, so 1024
//! unassured slots), so the flood fills it within milliseconds. What must hold, sampled
//! throughout the flood and checked after it: the established connections keep their
//! sessions (present, assured, ESTABLISHED, counters growing), their data arrives intact
//! without a long stall, neither tier of the table outgrows its capacity, `session list`
//! and `session stats` keep answering promptly, and the daemon's memory stays bounded.
//! Each test prints the flood rate it reached.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use session_testkit::{
    accept_new_rule, inbound_drop_policy, invalid_drop_rule, return_traffic_rule,
    untracked_accept_rule,
};
use session_tests::attacker::{ATTACKER_IFACE, Attacker};
use session_tests::loadgen::{self, Blast};
use session_tests::{CLIENT_V4, Daemon, FW_V4, Family, IO_TIMEOUT, Lab, Side, accept_within};
use session_tests::{counter, delta};

const POLICY: &str = concat!(
    r#"
interfaces = ["veth-fw2"]

[limits]
max_sessions = 4096

"#,
    inbound_drop_policy!(),
    return_traffic_rule!("established"),
    invalid_drop_rule!(),
    untracked_accept_rule!("nd"),
    accept_new_rule!("web", "tcp", 8080),
    accept_new_rule!("dns", "udp", 5353),
);

/// Capacity of the assured tier, as configured above.
const MAX_SESSIONS: u64 = 4096;
/// Capacity of the unassured tier: a quarter of `max_sessions`, at least 1024.
const UNASSURED_CAPACITY: u64 = 1024;
/// The TCP port the policy opens, where the established connections live.
const OPEN_TCP: u16 = 8080;
/// A TCP port the policy does not open.
const CLOSED_TCP: u16 = 8081;
/// The UDP port the policy opens.
const OPEN_UDP: u16 = 5353;
/// A UDP port the policy does not open.
const CLOSED_UDP: u16 = 5354;
/// Established connections transferring data during the flood.
const STREAMS: usize = 3;
/// Bytes per write of a transferring connection.
const CHUNK: usize = 4096;
/// Pause between writes, so the connections transfer steadily (about 800 kB/s each)
/// without competing with the flood for the two CPUs.
const PACE: Duration = Duration::from_millis(5);
/// The flood's bounds: whichever comes first ends it.
const FLOOD_DURATION: Duration = Duration::from_secs(6);
const FLOOD_MAX_PACKETS: u64 = 4_000_000;
/// Longest acceptable pause in a connection's data during the flood. The flood has a link
/// of its own, but both links' receive processing shares the two CPUs, so a segment may
/// still be late or lost and retransmitted (200 ms minimum RTO); a session the firewall
/// dropped would stall the connection for good.
const MAX_STALL: Duration = Duration::from_secs(2);
/// Longest acceptable run time of one `session list` or `session stats` during the flood.
const MAX_CLI_LATENCY: Duration = Duration::from_secs(5);
/// Largest acceptable growth of the daemon's resident memory over the flood.
const MAX_RSS_GROWTH_KB: u64 = 32 * 1024;

/// The floods run one at a time: each needs both CPUs to reach a meaningful rate.
static ONE_FLOOD_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Raises its flag when dropped, also while unwinding from a failed assertion.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The byte at `offset` of connection `stream`'s data, so the receiver can check every
/// byte without keeping a copy (251 is prime, so chunks do not line up with the cycle).
fn pattern(stream: usize, offset: u64) -> u8 {
    (offset % 251) as u8 ^ (stream as u8).wrapping_mul(0x5b)
}

/// Writes the pattern of `stream` in paced chunks until `stop`, then half-closes;
/// returns the bytes written.
fn write_until(mut conn: TcpStream, stream: usize, stop: &AtomicBool) -> u64 {
    let mut offset = 0u64;
    let mut chunk = vec![0u8; CHUNK];
    while !stop.load(Ordering::Relaxed) {
        for (i, byte) in chunk.iter_mut().enumerate() {
            *byte = pattern(stream, offset + i as u64);
        }
        conn.write_all(&chunk).unwrap_or_else(|e| {
            panic!("stream {stream}: write at offset {offset} failed (stalled for good?): {e}")
        });
        offset += CHUNK as u64;
        thread::sleep(PACE);
    }
    conn.shutdown(Shutdown::Write)
        .unwrap_or_else(|e| panic!("stream {stream}: cannot half-close: {e}"));
    offset
}

/// What the receiving end of one connection saw.
struct Received {
    bytes: u64,
    longest_gap: Duration,
}

/// Reads `stream`'s data to the end, checking every byte against the pattern and timing
/// the longest pause between reads.
fn read_and_verify(mut conn: TcpStream, stream: usize) -> Received {
    let mut buf = vec![0u8; 65536];
    let mut bytes = 0u64;
    let mut last = Instant::now();
    let mut longest_gap = Duration::ZERO;
    loop {
        let n = conn.read(&mut buf).unwrap_or_else(|e| {
            panic!("stream {stream}: read after {bytes} bytes failed (no data for {IO_TIMEOUT:?}?): {e}")
        });
        longest_gap = longest_gap.max(last.elapsed());
        last = Instant::now();
        if n == 0 {
            return Received { bytes, longest_gap };
        }
        for (i, &byte) in buf[..n].iter().enumerate() {
            let offset = bytes + i as u64;
            assert_eq!(
                byte,
                pattern(stream, offset),
                "stream {stream}: byte {offset} corrupted"
            );
        }
        bytes += n as u64;
    }
}

/// The daemon's resident set size in kB, from /proc/PID/status.
fn vm_rss_kb(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {path}:\n{status}"))
}

/// Runs `probe` and returns its result with how long it took.
fn timed<T>(probe: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let value = probe();
    (value, start.elapsed())
}

/// The session of the established connection from client port `sport`; panics (naming
/// `when`) unless it is present, assured and ESTABLISHED.
fn established<'s>(sessions: &'s [Value], sport: u16, when: &str) -> &'s Value {
    let session = sessions
        .iter()
        .find(|s| {
            s["proto"] == "tcp"
                && s["src"] == CLIENT_V4
                && s["sport"] == sport
                && s["dst"] == FW_V4
                && s["dport"] == OPEN_TCP
        })
        .unwrap_or_else(|| {
            panic!(
                "{when}: the session of the established connection from port {sport} is gone \
                 ({} sessions listed)",
                sessions.len()
            )
        });
    assert!(
        session["state"] == "ESTABLISHED" && session["assured"] == true,
        "{when}: the established connection from port {sport} changed: {session}"
    );
    session
}

/// Packets of `session` in both directions.
fn session_packets(session: &Value) -> u64 {
    let get = |name: &str| {
        session[name]
            .as_u64()
            .unwrap_or_else(|| panic!("session without {name}: {session}"))
    };
    get("orig_packets") + get("reply_packets")
}

/// Checks a listing against the tiers' capacities and returns how many unassured
/// sessions it showed. Walking a map under churn is not a snapshot: every session listed
/// was live at some moment of the walk, so a listing can show at most what the table held
/// when the walk began plus what was created while it ran (`created_meanwhile`, from
/// `sessions_created` before and after). Overfilling would exceed that.
fn check_table_bounds(
    daemon_stats: &Value,
    sessions: &[Value],
    created_meanwhile: u64,
    when: &str,
) -> u64 {
    assert_eq!(
        daemon_stats["max_sessions"].as_u64(),
        Some(MAX_SESSIONS),
        "{when}: stats report the wrong capacity: {daemon_stats}"
    );
    let distinct: HashSet<String> = sessions
        .iter()
        .map(|s| {
            format!(
                "{} {}:{} {}:{}",
                s["proto"], s["src"], s["sport"], s["dst"], s["dport"]
            )
        })
        .collect();
    assert_eq!(
        distinct.len(),
        sessions.len(),
        "{when}: `session list` showed {} sessions more than once",
        sessions.len() - distinct.len()
    );
    let assured = sessions.iter().filter(|s| s["assured"] == true).count() as u64;
    let unassured = sessions.len() as u64 - assured;
    assert!(
        assured <= MAX_SESSIONS && unassured <= UNASSURED_CAPACITY + created_meanwhile,
        "{when}: {assured} assured (capacity {MAX_SESSIONS}) and {unassured} unassured \
         (capacity {UNASSURED_CAPACITY}, {created_meanwhile} created during the listing) \
         sessions listed"
    );
    unassured
}

/// Which flood a test sends; every one goes alternately to an open and a closed port.
#[derive(Clone, Copy, Debug)]
enum Flood {
    /// TCP SYNs over IPv4.
    SynV4,
    /// UDP datagrams over IPv4.
    UdpV4,
    /// TCP SYNs and UDP datagrams interleaved, over IPv6 (needs a dual-stack lab).
    MixedV6,
}

impl Flood {
    fn name(self) -> &'static str {
        match self {
            Flood::SynV4 => "IPv4 SYN",
            Flood::UdpV4 => "IPv4 UDP",
            Flood::MixedV6 => "IPv6 SYN+UDP",
        }
    }

    /// The flood's frames, one per spoofed source (two in the mixed flood), from the
    /// attacker's end of its link to fw's.
    fn frames(self, attacker: &Attacker) -> Vec<Vec<u8>> {
        let (src_mac, dst_mac) = (attacker.mac(), attacker.fw_mac());
        let tcp_ports = [OPEN_TCP, CLOSED_TCP];
        let udp_ports = [OPEN_UDP, CLOSED_UDP];
        let sources = loadgen::MAX_SOURCES;
        let v4 = Family::V4.ip(Side::Fw);
        match self {
            Flood::SynV4 => loadgen::syn_frames(src_mac, dst_mac, v4, &tcp_ports, sources),
            Flood::UdpV4 => loadgen::udp_frames(src_mac, dst_mac, v4, &udp_ports, sources),
            Flood::MixedV6 => {
                let v6 = Family::V6.ip(Side::Fw);
                let syns = loadgen::syn_frames(src_mac, dst_mac, v6, &tcp_ports, sources);
                let datagrams = loadgen::udp_frames(src_mac, dst_mac, v6, &udp_ports, sources);
                syns.into_iter()
                    .zip(datagrams)
                    .flat_map(|(syn, datagram)| [syn, datagram])
                    .collect()
            }
        }
    }
}

/// Establishes the connections, floods, samples the daemon during the flood and checks
/// everything the module documentation promises.
fn flood_with_established_traffic(tag: &str, flood_kind: Flood) {
    let _alone = ONE_FLOOD_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let name = flood_kind.name();
    let lab = match flood_kind {
        Flood::MixedV6 => Lab::dual_stack(tag),
        Flood::SynV4 | Flood::UdpV4 => Lab::new(tag),
    };
    // Before the daemon, which attaches to fw's end of the flood link at start (and is
    // dropped, detaching, before the link goes).
    let attacker = Attacker::new(&lab);
    let daemon: Daemon = lab.daemon(POLICY);
    let listener = lab.tcp_listen(Side::Fw, Family::V4, OPEN_TCP);
    // A bound socket makes the UDP port open at fw's stack too; nobody reads it.
    let _udp_server = lab.udp_socket(Side::Fw, Family::V4, OPEN_UDP);
    let to = Family::V4.sock(Side::Fw, OPEN_TCP);
    let pairs: Vec<(TcpStream, TcpStream)> = (0..STREAMS)
        .map(|_| {
            let client = lab
                .tcp_connect(Side::Client, to, Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("client cannot connect to {to}: {e}"));
            (client, accept_within(&listener, IO_TIMEOUT))
        })
        .collect();
    let ports: Vec<u16> = pairs
        .iter()
        .map(|(client, _)| client.local_addr().expect("connected").port())
        .collect();
    let blast = Blast {
        netns: attacker.ns().to_string(),
        iface: ATTACKER_IFACE.to_string(),
        frames: flood_kind.frames(&attacker),
        threads: 2,
        max_packets: FLOOD_MAX_PACKETS,
        max_duration: FLOOD_DURATION,
        rate_pps: None,
    };
    let pid = daemon.pid();
    let stop = AtomicBool::new(false);

    // The checks run inside the scope, after the writers stopped and were joined.
    thread::scope(|scope| {
        // Stops the writers however this closure ends, so that a failed check cannot
        // leave the scope waiting for them forever.
        let _stop_writers = StopOnDrop(&stop);
        let transfers: Vec<_> = pairs
            .into_iter()
            .enumerate()
            .map(|(stream, (client, server))| {
                let stop = &stop;
                (
                    scope.spawn(move || write_until(client, stream, stop)),
                    scope.spawn(move || read_and_verify(server, stream)),
                )
            })
            .collect();
        // Let the transfers get going, so every session is established and assured.
        let before = wait_for_established(&daemon, &ports);
        let rss_before = vm_rss_kb(pid);
        let stats_before = daemon.stats_json();

        let flood = scope.spawn(|| loadgen::blast(&blast));
        let mut samples = 0;
        let mut slowest_cli = Duration::ZERO;
        let mut most_sessions = 0;
        let mut most_unassured = 0;
        while !flood.is_finished() {
            let (stats, stats_time) = timed(|| daemon.stats_json());
            let (sessions, list_time) = timed(|| daemon.list_json());
            let stats_then = daemon.stats_json();
            slowest_cli = slowest_cli.max(stats_time).max(list_time);
            let when = format!("during the {name} flood (sample {samples})");
            let created = delta(&stats, &stats_then, "sessions_created");
            most_unassured =
                most_unassured.max(check_table_bounds(&stats, &sessions, created, &when));
            most_sessions = most_sessions.max(sessions.len());
            for &port in &ports {
                established(&sessions, port, &when);
            }
            samples += 1;
            thread::sleep(Duration::from_millis(200));
        }
        let sent = flood
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            .unwrap_or_else(|e| panic!("the {name} flood failed: {e}"));
        let stats_after = daemon.stats_json();
        let rss_after = vm_rss_kb(pid);
        // The connections must carry on after the flood as well.
        thread::sleep(Duration::from_millis(500));
        let sessions_after = daemon.list_json();
        stop.store(true, Ordering::Relaxed);
        let results: Vec<(u64, Received)> = transfers
            .into_iter()
            .map(|(writer, reader)| {
                let written = writer
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p));
                let read = reader
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p));
                (written, read)
            })
            .collect();

        let seen = delta(&stats_before, &stats_after, "packets_seen");
        eprintln!(
            "{name} flood: {} packets sent in {:.2?} = {:.0} pps; daemon saw {seen} packets \
         ({:.0} pps); drop_table_full +{}, sessions_created +{}; {samples} samples, \
         slowest list/stats {slowest_cli:.2?}, most sessions listed {most_sessions} \
         (unassured {most_unassured}); daemon RSS {rss_before} kB -> {rss_after} kB",
            sent.packets,
            sent.elapsed,
            sent.pps(),
            seen as f64 / sent.elapsed.as_secs_f64(),
            delta(&stats_before, &stats_after, "drop_table_full"),
            delta(&stats_before, &stats_after, "sessions_created"),
        );
        for (stream, (written, read)) in results.iter().enumerate() {
            eprintln!(
                "stream {stream}: {written} bytes sent, {} received, longest pause {:.2?}",
                read.bytes, read.longest_gap
            );
        }

        assert!(
            samples >= 3,
            "only {samples} samples were taken during the flood; the flood ended too soon or \
         the CLI was too slow"
        );
        assert!(
            slowest_cli <= MAX_CLI_LATENCY,
            "list/stats took up to {slowest_cli:?} during the flood (bound {MAX_CLI_LATENCY:?})"
        );
        // At rest the walk is a snapshot: the tiers hold at most their capacities, and the
        // flood filled the unassured one. The kernel's LRU hash evicts in batches and keeps a
        // free list per CPU (up to 128 entries each), so a full one holds visibly fewer than
        // its maximum: at least half of it is what "filled" can promise.
        let at_rest = check_table_bounds(&stats_after, &sessions_after, 0, "after the flood");
        assert!(
            at_rest >= UNASSURED_CAPACITY / 2,
            "the flood should have filled the unassured tier ({UNASSURED_CAPACITY}), but \
         {at_rest} unassured sessions are listed after it"
        );
        for (&port, session_before) in ports.iter().zip(&before) {
            let after = established(&sessions_after, port, "after the flood");
            assert!(
                session_packets(after) > session_packets(session_before),
                "the session of the connection from port {port} stopped counting: before \
             {session_before}, after {after}"
            );
        }
        for (stream, (written, read)) in results.iter().enumerate() {
            assert_eq!(
                read.bytes, *written,
                "stream {stream}: not all data arrived"
            );
            assert!(
                read.longest_gap <= MAX_STALL,
                "stream {stream}: the data stalled for {:?} (bound {MAX_STALL:?})",
                read.longest_gap
            );
        }
        assert!(
            rss_after <= rss_before + MAX_RSS_GROWTH_KB,
            "the daemon's RSS grew from {rss_before} kB to {rss_after} kB during the flood"
        );
        assert!(
            counter(&stats_after, "packets_seen") > counter(&stats_before, "packets_seen"),
            "the daemon saw none of the flood"
        );
    });
}

/// Waits until every connection from `ports` has an assured ESTABLISHED session that has
/// carried data, and returns those sessions in the order of `ports`.
fn wait_for_established(daemon: &Daemon, ports: &[u16]) -> Vec<Value> {
    session_tests::wait_for(
        "the transferring connections' sessions to be established",
        Duration::from_secs(5),
        || {
            let sessions = daemon.list_json();
            ports
                .iter()
                .map(|&port| {
                    sessions
                        .iter()
                        .find(|s| {
                            s["proto"] == "tcp"
                                && s["sport"] == port
                                && s["dport"] == OPEN_TCP
                                && s["state"] == "ESTABLISHED"
                                && s["assured"] == true
                                && s["orig_bytes"].as_u64().unwrap_or(0) > CHUNK as u64
                        })
                        .cloned()
                })
                .collect::<Option<Vec<Value>>>()
        },
    )
}

#[test]
fn syn_flood_neither_evicts_established_sessions_nor_overfills_the_table() {
    flood_with_established_traffic("syn-flood", Flood::SynV4);
}

#[test]
fn udp_flood_neither_evicts_established_sessions_nor_overfills_the_table() {
    flood_with_established_traffic("udp-flood", Flood::UdpV4);
}

#[test]
fn ipv6_flood_neither_evicts_established_sessions_nor_overfills_the_table() {
    flood_with_established_traffic("v6-flood", Flood::MixedV6);
}
