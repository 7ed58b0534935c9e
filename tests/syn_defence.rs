//! The SYN-flood defence end to end (`[syn_defence]`): on a defended port, connections
//! work both ways round (client speaks first, server speaks first) and get their session,
//! established and under the rule that admitted the SYN, once the host's stack holds them;
//! an ACK no handshake explains stays INVALID; below `above` SYNs a second a port is not
//! defended; and under a spoofed SYN flood at the load generator's top rate, real clients
//! connect while the flood costs the session table nothing. The same flood without the
//! defence is run for comparison: its figures are printed.

use std::time::{Duration, Instant};

use serde_json::Value;
use session_tests::attacker::Attacker;
use session_tests::syn_flood::{ALWAYS, PORT, exchange, flood_run, policy};
use session_tests::{CLIENT_V4, CLIENT_V6, Daemon, Family, Lab, Side, delta};

/// Sessions in the table to [`PORT`], as `session list --json` shows them.
fn sessions_to_port(daemon: &Daemon<'_>) -> Vec<Value> {
    daemon
        .list_json()
        .into_iter()
        .filter(|s| s["dport"] == PORT)
        .collect()
}

#[test]
fn defended_connections_work_both_ways_round_and_get_their_session_once_established() {
    let lab = Lab::dual_stack("syndef");
    let _attacker = Attacker::new(&lab);
    let daemon = lab.daemon(&policy(ALWAYS));
    let before = daemon.stats_json();
    let mut open = Vec::new();
    for family in [Family::V4, Family::V6] {
        let listener = lab.tcp_listen(Side::Fw, family, PORT);
        for server_first in [false, true] {
            open.push(exchange(&lab, &listener, server_first).unwrap_or_else(|e| {
                panic!("{family:?}, server speaks first: {server_first}: {e}")
            }));
        }
    }
    let sessions = sessions_to_port(&daemon);
    assert_eq!(
        sessions.len(),
        open.len(),
        "each connection has its session: {sessions:?}"
    );
    for session in &sessions {
        assert_eq!(session["state"], "ESTABLISHED", "{session}");
        assert_eq!(session["rule"], "web", "{session}");
        let src = session["src"].as_str().unwrap_or_default();
        assert!(
            src == CLIENT_V4 || src == CLIENT_V6,
            "the client originates it: {session}"
        );
    }
    let after = daemon.stats_json();
    assert_eq!(delta(&before, &after, "syn_defence_picked_up"), 4);
    assert!(
        delta(&before, &after, "syn_defence_handshake") >= 12,
        "SYN, SYN-ACK and ACK of every connection passed without a session: {after}"
    );

    // An ACK that no handshake explains is INVALID, defended port or not.
    let invalid_before = daemon.stats_json();
    lab.send_stray_ack(PORT, 1_000_000, 2_000_000);
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
    lab.send_stray_ack(PORT, 7_000_000, 9_000_001);
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

/// Real connection attempts made during the flood.
const ATTEMPTS: usize = 200;

#[test]
fn under_a_spoofed_syn_flood_real_clients_connect_and_the_flood_gets_no_session() {
    let with = flood_run("synflood", ALWAYS, ATTEMPTS);
    let without = flood_run("synflood0", "", ATTEMPTS);
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
