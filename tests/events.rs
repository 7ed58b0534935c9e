//! `session events` and the log lines of `log = true` rules, with real traffic: a TCP
//! connection is reported when it opens and when its FIN handshake closes it, a UDP
//! session when the reaper expires it, and every packet a logged rule decides; the log
//! lines for a flood of logged drops are rate-limited while the event stream keeps every
//! one.

use std::io::Write;
use std::net::Shutdown;
use std::time::{Duration, Instant};

use serde_json::Value;
use session_tests::{
    BLOCKED_UDP_RULE, Background, DNS_RULE, Daemon, FW_IFACE, Family, Lab, Side, WEB_POLICY,
    counter, read_exact_len, read_to_eof, wait_for,
};

/// The web host with UDP 5353 open, UDP 9999 dropped and logged, and a 1 s timeout for
/// unanswered UDP so the reaper expires a session while the test watches.
fn policy() -> String {
    format!("{WEB_POLICY}{DNS_RULE}{BLOCKED_UDP_RULE}\n[timeouts]\nudp_unreplied = 1\n")
}

const WEB: u16 = 8080;
const DNS: u16 = 5353;
const BLOCKED: u16 = 9999;
const EVENT_WAIT: Duration = Duration::from_secs(15);

/// The JSON events a `session events --json` client printed so far.
fn events(client: &Background<'_>) -> Vec<Value> {
    client
        .stdout()
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("event line is not JSON ({e}): {line}"))
        })
        .collect()
}

fn is(event: &Value, kind: &str, proto: &str, dport: u16) -> bool {
    event["proto"] == proto
        && event["dport"] == dport
        && event["events"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == kind))
}

/// Waits until the client has printed an event of `kind` for `proto` to `dport`.
fn wait_event(
    client: &Background<'_>,
    daemon: &Daemon<'_>,
    kind: &str,
    proto: &str,
    dport: u16,
) -> Value {
    let started = Instant::now();
    loop {
        if let Some(event) = events(client)
            .into_iter()
            .find(|e| is(e, kind, proto, dport))
        {
            return event;
        }
        assert!(
            started.elapsed() < EVENT_WAIT,
            "no {kind} event for {proto} port {dport} within {EVENT_WAIT:?}; events so far:\n{}\n--- daemon log ---\n{}",
            client.stdout(),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends one datagram from the client to fw's `port`.
fn send_udp(lab: &Lab, socket: &std::net::UdpSocket, port: u16) {
    let to = Family::V4.sock(Side::Fw, port);
    lab.in_ns(Side::Client, || socket.send_to(b"probe", to))
        .unwrap_or_else(|e| panic!("sending to {to}: {e}"));
}

/// Waits until every client is connected: logged probes are sent until each client's
/// stream shows one. Returns the client's socket that sent them.
fn connect_clients(lab: &Lab, clients: &[&Background<'_>]) -> std::net::UdpSocket {
    let socket = lab.udp_socket(Side::Client, Family::V4, 0);
    wait_for(
        "the events clients to receive a logged probe",
        EVENT_WAIT,
        || {
            send_udp(lab, &socket, BLOCKED);
            std::thread::sleep(Duration::from_millis(200));
            clients
                .iter()
                .all(|client| client.stdout().contains(&BLOCKED.to_string()))
                .then_some(())
        },
    );
    socket
}

#[test]
fn events_report_new_closed_expired_and_logged() {
    let lab = Lab::new("ev");
    let daemon = lab.daemon(&policy());
    let client = daemon.cli_background(&["events", "--json"]);
    let text_client = daemon.cli_background(&["events"]);
    let socket = connect_clients(&lab, &[&client, &text_client]);

    let logged = wait_event(&client, &daemon, "logged", "udp", BLOCKED);
    assert_eq!(logged["action"], "drop", "{logged}");
    assert_eq!(logged["rule"], "blocked-udp", "{logged}");
    assert_eq!(logged["direction"], "in", "{logged}");
    assert_eq!(logged["src"], Family::V4.addr(Side::Client), "{logged}");

    // A TCP connection that opens, carries a request and an answer, and closes with FINs.
    let (mut tcp_client, mut server) = lab.tcp_pair(Family::V4, WEB);
    let opened = wait_event(&client, &daemon, "new", "tcp", WEB);
    assert_eq!(opened["rule"], "web", "{opened}");
    assert_eq!(opened["state"], "new", "{opened}");
    assert_eq!(opened["action"], "accept", "{opened}");
    tcp_client.write_all(b"hello\n").expect("client write");
    assert_eq!(read_exact_len(&mut server, 6), b"hello\n");
    tcp_client.shutdown(Shutdown::Write).expect("client FIN");
    assert!(read_to_eof(&mut server).is_empty(), "server reads the FIN");
    server.shutdown(Shutdown::Write).expect("server FIN");
    assert!(
        read_to_eof(&mut tcp_client).is_empty(),
        "client reads the FIN"
    );
    // The last ACK closes it; the rule named is the one that decided that packet.
    let closed = wait_event(&client, &daemon, "closed", "tcp", WEB);
    assert_eq!(closed["rule"], "return-traffic", "{closed}");
    assert_eq!(closed["state"], "established", "{closed}");

    // A UDP session with a 1 s timeout, freed by the reaper (every 5 s).
    send_udp(&lab, &socket, DNS);
    wait_event(&client, &daemon, "new", "udp", DNS);
    let expired = wait_event(&client, &daemon, "expired", "udp", DNS);
    assert_eq!(expired["src"], Family::V4.addr(Side::Client), "{expired}");
    assert_eq!(expired["rule"], "dns", "{expired}");

    // The text client saw the same stream, one conntrack-like line per event.
    wait_for("the text client to show the expiry", EVENT_WAIT, || {
        text_client.stdout().contains("[EXPIRED] udp").then_some(())
    });
    let text = text_client.stdout();
    let opened_line = text
        .lines()
        .find(|line| line.contains("[NEW] tcp"))
        .unwrap_or_else(|| panic!("no [NEW] tcp line:\n{text}"));
    assert!(
        opened_line.contains(&format!(
            "-> 198.18.0.2:{WEB} in {FW_IFACE} new accept rule=web"
        )),
        "{opened_line}"
    );
    assert!(text.contains("[CLOSED] tcp"), "{text}");
}

#[test]
fn a_flood_of_logged_drops_is_streamed_whole_but_logged_at_a_bounded_rate() {
    const FLOOD: u64 = 2000;
    let lab = Lab::new("evlog");
    let daemon = lab.daemon(&policy());
    let client = daemon.cli_background(&["events", "--json"]);
    let socket = connect_clients(&lab, &[&client]);
    let before = daemon.stats_json();
    let probes_before = events(&client).len() as u64;
    let started = Instant::now();
    for _ in 0..FLOOD {
        send_udp(&lab, &socket, BLOCKED);
    }
    let stats = daemon.stats_when("every flood packet judged", |stats| {
        counter(stats, "drop_rule") - counter(&before, "drop_rule") >= FLOOD
    });
    assert_eq!(
        counter(&stats, "events_lost"),
        0,
        "ring buffer overflowed: {stats}"
    );
    wait_for("every logged drop in the event stream", EVENT_WAIT, || {
        (events(&client).len() as u64 >= probes_before + FLOOD).then_some(())
    });
    let streamed = events(&client)
        .iter()
        .filter(|e| is(e, "logged", "udp", BLOCKED))
        .count() as u64;
    assert_eq!(
        streamed,
        probes_before + FLOOD,
        "each logged drop is one event"
    );

    // Lines admitted: a burst of 20, then 10 per second; the rest are summed up.
    let stats = wait_for("the suppressed lines to be counted", EVENT_WAIT, || {
        let stats = daemon.stats_json();
        (counter(&stats, "log_lines_suppressed") > 0).then_some(stats)
    });
    let elapsed = started.elapsed().as_secs_f64();
    let log = daemon.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("rule=blocked-udp"))
        .count() as f64;
    assert!(
        lines <= 20.0 + 10.0 * elapsed + 10.0,
        "{lines} log lines in {elapsed:.1} s is more than the limit allows"
    );
    assert!(
        log.contains("log lines of logged packets suppressed"),
        "{log}"
    );
    let suppressed = counter(&stats, "log_lines_suppressed");
    assert!(
        suppressed >= FLOOD - lines as u64 - 20,
        "only {suppressed} suppressed of {FLOOD} with {lines} written"
    );
}
