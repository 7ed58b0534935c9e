//! The SYN-flood defence end to end (`[syn_defence]`): on a defended port, connections
//! work both ways round (client speaks first, server speaks first) and get their session,
//! established and under the rule that admitted the SYN, once the host's stack holds them;
//! an ACK no handshake explains stays INVALID; below `above` SYNs a second a port is not
//! defended; and under a spoofed SYN flood at the load generator's top rate, real clients
//! connect while the flood costs the session table nothing. The same flood without the
//! defence is run for comparison: its figures are printed.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use session_testkit::{
    accept_new_rule, inbound_drop_policy, invalid_drop_rule, return_traffic_rule,
    untracked_accept_rule,
};
use session_tests::attacker::{ATTACKER_IFACE, Attacker};
use session_tests::loadgen::{self, Blast};
use session_tests::raw::{TcpSegment, flags};
use session_tests::{
    CLIENT_V4, CLIENT_V6, Daemon, Family, IO_TIMEOUT, Lab, Side, accept_within, delta,
};

/// The defended port.
const PORT: u16 = 8080;

/// A host policy opening [`PORT`], on both of fw's links, and `defence` (a TOML
/// `[syn_defence]` table, or nothing).
fn policy(defence: &str) -> String {
    format!(
        concat!(
            "interfaces = [\"veth-fw2\"]\n",
            "{defence}\n",
            inbound_drop_policy!(),
            return_traffic_rule!("established"),
            invalid_drop_rule!(),
            untracked_accept_rule!("nd"),
            accept_new_rule!("web", "tcp", 8080),
        ),
        defence = defence
    )
}

/// Always defends [`PORT`].
const ALWAYS: &str = "[syn_defence]\nports = [8080]\n";

/// Sessions in the table to [`PORT`], as `session list --json` shows them.
fn sessions_to_port(daemon: &Daemon<'_>) -> Vec<Value> {
    daemon
        .list_json()
        .into_iter()
        .filter(|s| s["dport"] == PORT)
        .collect()
}

/// One connection that exchanges a request and an answer; `server_first` makes the
/// server speak first, as an SSH or SMTP server does. Returns both ends, still open.
fn exchange(
    lab: &Lab,
    listener: &TcpListener,
    server_first: bool,
) -> Result<(TcpStream, TcpStream), String> {
    let to = listener
        .local_addr()
        .map_err(|e| format!("listener: {e}"))?;
    let mut client = lab
        .tcp_connect(Side::Client, to, Duration::from_secs(3))
        .map_err(|e| format!("connect: {e}"))?;
    let mut server = accept_within(listener, IO_TIMEOUT);
    let mut got = [0u8; 5];
    if server_first {
        server
            .write_all(b"hello")
            .map_err(|e| format!("banner: {e}"))?;
        client
            .read_exact(&mut got)
            .map_err(|e| format!("client reads the banner: {e}"))?;
    }
    client
        .write_all(b"query")
        .map_err(|e| format!("query: {e}"))?;
    server
        .read_exact(&mut got)
        .map_err(|e| format!("server reads the query: {e}"))?;
    server
        .write_all(b"reply")
        .map_err(|e| format!("reply: {e}"))?;
    client
        .read_exact(&mut got)
        .map_err(|e| format!("client reads the reply: {e}"))?;
    Ok((client, server))
}

#[test]
fn defended_connections_work_both_ways_round_and_get_their_session_once_established() {
    let lab = Lab::new("syndef");
    let _attacker = Attacker::new(&lab);
    let daemon = lab.daemon(&policy(ALWAYS));
    let listener = lab.tcp_listen(Side::Fw, Family::V4, PORT);
    let before = daemon.stats_json();

    let _first =
        exchange(&lab, &listener, false).unwrap_or_else(|e| panic!("client speaks first: {e}"));
    let _second =
        exchange(&lab, &listener, true).unwrap_or_else(|e| panic!("server speaks first: {e}"));
    let sessions = sessions_to_port(&daemon);
    assert_eq!(
        sessions.len(),
        2,
        "each connection has its session: {sessions:?}"
    );
    for session in &sessions {
        assert_eq!(session["state"], "ESTABLISHED", "{session}");
        assert_eq!(session["rule"], "web", "{session}");
        assert_eq!(
            session["src"], CLIENT_V4,
            "the client originates it: {session}"
        );
    }
    let after = daemon.stats_json();
    assert_eq!(delta(&before, &after, "syn_defence_picked_up"), 2);
    assert!(
        delta(&before, &after, "syn_defence_handshake") >= 6,
        "SYN, SYN-ACK and ACK of both connections passed without a session: {after}"
    );

    // An ACK that no handshake explains is INVALID, defended port or not.
    let invalid_before = daemon.stats_json();
    let segment = TcpSegment {
        src: Family::V4.sock(Side::Client, 40_999),
        dst: Family::V4.sock(Side::Fw, PORT),
        seq: 1_000_000,
        ack: 2_000_000,
        flags: flags::ACK,
        window: 512,
        payload: Vec::new(),
    };
    lab.packet_socket(Side::Client)
        .send(&segment.frame(lab.mac(Side::Client), lab.mac(Side::Fw)));
    let stats = daemon.stats_when("the stray ACK counted as invalid", |stats| {
        delta(&invalid_before, stats, "state_invalid") >= 1
    });
    assert_eq!(delta(&invalid_before, &stats, "syn_defence_handshake"), 0);
}

#[test]
fn a_handshake_the_host_answers_with_a_syn_cookie_passes_on_the_cookie() {
    let lab = Lab::dual_stack("syncookie");
    let _attacker = Attacker::new(&lab);
    // Cookies for every SYN (what a listener under a flood sends once its queue is full):
    // the client's ACK then finds no request in the host's stack, only the listener,
    // and passes on the cookie check alone.
    lab.ok(
        Side::Fw,
        5,
        &["sysctl", "-q", "-w", "net.ipv4.tcp_syncookies=2"],
    );
    let daemon = lab.daemon(&policy(ALWAYS));
    let mut open = Vec::new();
    for family in [Family::V4, Family::V6] {
        let listener = lab.tcp_listen(Side::Fw, family, PORT);
        open.push(
            exchange(&lab, &listener, false)
                .unwrap_or_else(|e| panic!("a cookie handshake over {family:?}: {e}")),
        );
    }
    let sessions = sessions_to_port(&daemon);
    assert_eq!(sessions.len(), 2, "one session per family: {sessions:?}");
    for session in &sessions {
        assert_eq!(session["state"], "ESTABLISHED", "{session}");
    }
    // An ACK whose cookie is wrong finds the same listener and stays INVALID.
    let before = daemon.stats_json();
    let segment = TcpSegment {
        src: Family::V4.sock(Side::Client, 41_000),
        dst: Family::V4.sock(Side::Fw, PORT),
        seq: 7_000_000,
        ack: 9_000_001,
        flags: flags::ACK,
        window: 512,
        payload: Vec::new(),
    };
    lab.packet_socket(Side::Client)
        .send(&segment.frame(lab.mac(Side::Client), lab.mac(Side::Fw)));
    let stats = daemon.stats_when("the forged cookie counted as invalid", |stats| {
        delta(&before, stats, "state_invalid") >= 1
    });
    assert_eq!(delta(&before, &stats, "syn_defence_handshake"), 0);
}

#[test]
fn a_port_is_defended_only_above_its_rate() {
    let lab = Lab::new("synrate");
    let _attacker = Attacker::new(&lab);
    let daemon = lab.daemon(&policy("[syn_defence]\nports = [8080]\nabove = 1\n"));
    let listener = lab.tcp_listen(Side::Fw, Family::V4, PORT);
    let before = daemon.stats_json();
    // Three connections within a second: the first SYN of a second is below the rate
    // and gets its session at once; at least one of the others is above it and defended.
    let started = Instant::now();
    let open: Vec<_> = (0..3)
        .map(|i| exchange(&lab, &listener, false).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the connections took {:?}, more than the second the rate counts in",
        started.elapsed()
    );
    let after = daemon.stats_json();
    let picked_up = delta(&before, &after, "syn_defence_picked_up");
    assert!(
        (1..=2).contains(&picked_up),
        "some SYNs above the rate were defended, the first of a second was not: {picked_up}"
    );
    assert_eq!(sessions_to_port(&daemon).len(), open.len());
}

/// Only one flood at a time: two would share the machine's CPUs and each measure less.
static ONE_FLOOD_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Real connection attempts made during the flood.
const ATTEMPTS: usize = 200;

/// What one flood run measured.
struct FloodRun {
    /// Connection attempts that exchanged their bytes.
    succeeded: usize,
    /// Attempts made.
    attempts: usize,
    /// Flood packets sent, and their rate.
    sent: u64,
    pps: f64,
    /// Sessions from the flood's spoofed sources in the table at the end, most seen.
    flood_sessions: usize,
}

/// Floods fw's [`PORT`] with spoofed SYNs from the attacker's link while the client makes
/// [`ATTEMPTS`] real connections, under `defence`.
fn flood_run(tag: &str, defence: &str) -> FloodRun {
    let _alone = ONE_FLOOD_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let lab = Lab::new(tag);
    let attacker = Attacker::new(&lab);
    let daemon = lab.daemon(&policy(defence));
    let listener = lab.tcp_listen(Side::Fw, Family::V4, PORT);
    let blast = Blast {
        netns: attacker.ns().to_string(),
        iface: ATTACKER_IFACE.to_string(),
        frames: loadgen::syn_frames(
            attacker.mac(),
            attacker.fw_mac(),
            Family::V4.ip(Side::Fw),
            &[PORT],
            loadgen::MAX_SOURCES,
        ),
        threads: 2,
        max_packets: 4_000_000,
        max_duration: Duration::from_secs(8),
        rate_pps: None,
    };
    let mut flood_sessions = 0;
    let (sent, succeeded, attempts) = thread::scope(|scope| {
        let flood = scope.spawn(|| loadgen::blast(&blast));
        // Let the flood reach its rate before the real clients start.
        thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let mut succeeded = 0;
        let mut attempts = 0;
        while attempts < ATTEMPTS && started.elapsed() < Duration::from_secs(60) {
            attempts += 1;
            if exchange(&lab, &listener, attempts % 2 == 0).is_ok() {
                succeeded += 1;
            }
            if attempts % 50 == 0 {
                flood_sessions = flood_sessions.max(spoofed_sessions(&daemon));
            }
        }
        flood_sessions = flood_sessions.max(spoofed_sessions(&daemon));
        let sent = flood
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            .unwrap_or_else(|e| panic!("the flood failed: {e}"));
        (sent, succeeded, attempts)
    });
    FloodRun {
        succeeded,
        attempts,
        sent: sent.packets,
        pps: sent.pps(),
        flood_sessions,
    }
}

/// Sessions in the table from the flood's spoofed range (198.19.0.0/16).
fn spoofed_sessions(daemon: &Daemon<'_>) -> usize {
    daemon
        .list_json()
        .iter()
        .filter(|s| {
            s["src"]
                .as_str()
                .is_some_and(|src| src.starts_with("198.19."))
        })
        .count()
}

#[test]
fn under_a_spoofed_syn_flood_real_clients_connect_and_the_flood_gets_no_session() {
    let with = flood_run("synflood", ALWAYS);
    let without = flood_run("synflood0", "");
    eprintln!(
        "SYN flood against an open port, {} real connection attempts each:\n\
         with the defence:    {}/{} succeeded, {} flood sessions in the table; flood {} packets at {:.0} pps\n\
         without the defence: {}/{} succeeded, {} flood sessions in the table; flood {} packets at {:.0} pps",
        ATTEMPTS,
        with.succeeded,
        with.attempts,
        with.flood_sessions,
        with.sent,
        with.pps,
        without.succeeded,
        without.attempts,
        without.flood_sessions,
        without.sent,
        without.pps,
    );
    assert_eq!(
        with.attempts, ATTEMPTS,
        "every attempt was made during the flood"
    );
    assert!(
        with.succeeded * 100 >= with.attempts * 99,
        "with the defence at least 99% of real connections succeed: {}/{}",
        with.succeeded,
        with.attempts
    );
    assert_eq!(
        with.flood_sessions, 0,
        "the flood got no session with the defence"
    );
    assert!(
        without.flood_sessions > 0,
        "without the defence the flood reached the table (else the comparison shows nothing)"
    );
}
