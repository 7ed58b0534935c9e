//! Per-source limits end to end, through the real daemon: a source over a rule's
//! concurrent cap is refused, lands in the overload set with its sessions flushed while
//! another source goes on, and is let in again when the ban expires; a source over the
//! rate cap is refused until its bucket refills; a rule's total cap counts every source
//! and frees a place when a connection closes; restored sessions count at once.

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use serde_json::Value;
use session_testkit::{inbound_drop_policy, overload_ban_rules, return_traffic_rule};
use session_tests::{Daemon, Family, Lab, Side, accept_within, counter, wait_for};

/// The server's port.
const PORT: u16 = 2222;
/// A UDP port whose datagrams a `log = true` rule drops: what shows that an events
/// client is connected.
const PROBE: u16 = 9;
/// A second address of the client namespace: another source behind the same link.
const OTHER_SOURCE: &str = "198.18.0.11";

/// A policy whose `ssh` rule admits new TCP sessions to [`PORT`] under `limit` (a TOML
/// inline table); when the limit overloads into `abusers`, after a rule that drops the
/// sources in that set.
fn policy(limit: &str) -> String {
    let ban = if limit.contains("abusers") {
        overload_ban_rules!()
    } else {
        ""
    };
    format!(
        concat!(
            inbound_drop_policy!(),
            return_traffic_rule!("return-traffic"),
            r#"{ban}
[[rule]]
name = "probe"
proto = "udp"
dport = [{probe}]
action = "drop"
log = true

[[rule]]
name = "ssh"
state = ["new"]
proto = "tcp"
dport = [{port}]
action = "accept"
limit = {limit}
"#
        ),
        ban = ban,
        probe = PROBE,
        port = PORT,
        limit = limit
    )
}

/// A lab with a listener on fw:[`PORT`] and [`OTHER_SOURCE`] on the client.
struct Setup {
    lab: Lab,
    listener: std::net::TcpListener,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let lab = Lab::new(tag);
        let other = format!("{OTHER_SOURCE}/24");
        lab.ok(
            Side::Client,
            5,
            &["ip", "addr", "add", &other, "dev", Lab::iface(Side::Client)],
        );
        let listener = lab.tcp_listen(Side::Fw, Family::V4, PORT);
        Setup { lab, listener }
    }

    /// A connection from the client's main address, or the error when the firewall
    /// refuses it within `wait`.
    fn connect(&self, wait: Duration) -> std::io::Result<TcpStream> {
        self.lab
            .tcp_connect(Side::Client, Family::V4.sock(Side::Fw, PORT), wait)
    }

    /// A connection from [`OTHER_SOURCE`].
    fn connect_other(&self, wait: Duration) -> std::io::Result<TcpStream> {
        let from = SocketAddr::new(OTHER_SOURCE.parse().expect("an address"), 0);
        self.lab
            .tcp_connect_from(Side::Client, from, Family::V4.sock(Side::Fw, PORT), wait)
    }
}

/// How long a refused connection attempt is given: SYNs are dropped, so it times out.
const REFUSED_WAIT: Duration = Duration::from_millis(700);
/// How long an admitted connection is given.
const ADMITTED_WAIT: Duration = Duration::from_secs(3);

/// The `limit` figures `session stats --json` reports for `rule`.
fn rule_limit(daemon: &Daemon<'_>, rule: &str) -> Value {
    let stats = daemon.stats_json();
    stats["rules"]
        .as_array()
        .and_then(|rules| rules.iter().find(|r| r["name"] == rule))
        .map(|r| r["limit"].clone())
        .unwrap_or_else(|| panic!("stats list no rule {rule}: {stats}"))
}

/// The entry of `session list --sources --json` for `source`, if any.
fn source_entry(daemon: &Daemon<'_>, source: &str) -> Option<Value> {
    let listed: Value = serde_json::from_str(&daemon.cli(&["list", "--sources", "--json"]))
        .expect("list --sources --json is JSON");
    listed
        .as_array()
        .expect("an array")
        .iter()
        .find(|entry| entry["source"] == source)
        .cloned()
}

/// Sessions in the table from `src` to the server's port.
fn sessions_from(daemon: &Daemon<'_>, src: &str) -> usize {
    daemon
        .list_json()
        .iter()
        .filter(|s| s["src"] == src && s["dport"] == PORT)
        .count()
}

/// Retries `connect` until it succeeds, for at most `within`.
fn admitted_within(
    within: Duration,
    mut connect: impl FnMut() -> std::io::Result<TcpStream>,
) -> Option<TcpStream> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(stream) = connect() {
            return Some(stream);
        }
    }
    None
}

#[test]
fn a_source_over_its_concurrent_cap_is_overloaded_flushed_and_let_in_when_the_ban_expires() {
    let setup = Setup::new("limits-conn");
    let client = Family::V4.addr(Side::Client);
    let daemon = setup.lab.daemon(&policy(
        r#"{ max_src_conn = 3, overload = "abusers", overload_timeout = 4, overload_flush = "global" }"#,
    ));
    let events = daemon.cli_background(&["events", "--json"]);
    let probe = setup.lab.udp_socket(Side::Client, Family::V4, 0);
    wait_for(
        "the events client to see a logged probe",
        Duration::from_secs(15),
        || {
            let to = Family::V4.sock(Side::Fw, PROBE);
            setup
                .lab
                .in_ns(Side::Client, || probe.send_to(b"probe", to))
                .unwrap_or_else(|e| panic!("sending the probe: {e}"));
            std::thread::sleep(Duration::from_millis(200));
            events.stdout().contains("\"logged\"").then_some(())
        },
    );

    let held: Vec<TcpStream> = (0..3)
        .map(|i| {
            setup
                .connect(ADMITTED_WAIT)
                .unwrap_or_else(|e| panic!("connection {i} is within the cap: {e}"))
        })
        .collect();
    let entry = source_entry(&daemon, client).expect("the client is a counted source");
    assert_eq!(entry["sessions"], 3, "{entry}");
    assert_eq!(entry["rule"], "ssh", "{entry}");

    assert!(
        setup.connect(REFUSED_WAIT).is_err(),
        "a fourth concurrent connection is over max_src_conn"
    );
    daemon.wait_log("overloaded by rule ssh", Duration::from_secs(5));
    let line = wait_for("an overloaded event", Duration::from_secs(5), || {
        events
            .stdout()
            .lines()
            .find(|line| line.contains("\"overloaded\""))
            .map(str::to_string)
    });
    let event: Value = serde_json::from_str(&line).expect("an event is JSON");
    assert_eq!(
        (&event["src"], &event["rule"], &event["action"]),
        (
            &Value::from(client),
            &Value::from("ssh"),
            &Value::from("drop")
        ),
        "{event}"
    );
    let members = daemon.cli(&["set", "show", "abusers"]);
    assert!(
        members
            .lines()
            .any(|line| line.starts_with(&format!("{client}/32 # expires in "))),
        "the client is in the overload set, with its expiry: {members}"
    );
    let limit = rule_limit(&daemon, "ssh");
    assert!(limit["refused"].as_u64() >= Some(1), "{limit}");
    assert_eq!(limit["overloaded"], 1, "{limit}");
    let stats = daemon.stats_json();
    assert_eq!(counter(&stats, "sources_overloaded"), 1, "{stats}");
    assert!(counter(&stats, "limit_refused") >= 1, "{stats}");
    assert_eq!(
        sessions_from(&daemon, client),
        0,
        "overload_flush = \"global\" flushes the source's sessions"
    );

    let other = setup
        .connect_other(ADMITTED_WAIT)
        .expect("another source is not limited by the client's count");
    let entry = source_entry(&daemon, OTHER_SOURCE).expect("the other source is counted");
    assert_eq!(entry["sessions"], 1, "{entry}");
    assert!(
        setup.connect(REFUSED_WAIT).is_err(),
        "the banned client stays refused while the ban lasts"
    );

    // The ban expires after 4 s; the reaper's recount (every 5 s) frees the flushed
    // sessions' places, so the client is admitted again within a few sweeps.
    drop(held);
    let again = admitted_within(Duration::from_secs(20), || setup.connect(REFUSED_WAIT));
    assert!(
        again.is_some(),
        "the client is admitted once its ban expired"
    );
    drop(other);
}

#[test]
fn a_source_over_its_rate_cap_is_refused_until_its_bucket_refills() {
    let setup = Setup::new("limits-rate");
    let daemon = setup
        .lab
        .daemon(&policy(r#"{ max_src_conn_rate = "3/3s" }"#));

    for i in 0..3 {
        let stream = setup
            .connect(ADMITTED_WAIT)
            .unwrap_or_else(|e| panic!("connection {i} is within the rate: {e}"));
        drop(stream);
    }
    assert!(
        setup.connect(REFUSED_WAIT).is_err(),
        "a fourth new connection within the interval is over the rate"
    );
    setup
        .connect_other(ADMITTED_WAIT)
        .expect("another source has its own bucket");
    let entry = source_entry(&daemon, Family::V4.addr(Side::Client)).expect("counted");
    assert!(entry["refused"].as_u64() >= Some(1), "{entry}");
    assert_eq!(
        counter(&daemon.stats_json(), "sources_overloaded"),
        0,
        "a rule without `overload` bans nobody"
    );
    // One session's worth refills every second.
    let again = admitted_within(Duration::from_secs(5), || setup.connect(REFUSED_WAIT));
    assert!(again.is_some(), "the bucket refills");
}

#[test]
fn a_rules_total_cap_counts_every_source_and_a_closed_connection_frees_its_place() {
    let setup = Setup::new("limits-total");
    let daemon = setup.lab.daemon(&policy("{ max_conn = 2 }"));

    let first = setup.connect(ADMITTED_WAIT).expect("first of two");
    let first_server = accept_within(&setup.listener, Duration::from_secs(3));
    let _second = setup.connect_other(ADMITTED_WAIT).expect("second of two");
    assert_eq!(rule_limit(&daemon, "ssh")["sessions"], 2);
    assert!(
        setup.connect(REFUSED_WAIT).is_err(),
        "a third connection is over max_conn"
    );
    assert!(
        setup.connect_other(REFUSED_WAIT).is_err(),
        "max_conn counts every source"
    );
    // Closing one connection (FIN both ways) uncounts its session in the kernel at once.
    drop(first);
    drop(first_server);
    let again = admitted_within(Duration::from_secs(5), || setup.connect(REFUSED_WAIT));
    assert!(again.is_some(), "a closed connection frees its place");
    assert!(rule_limit(&daemon, "ssh")["refused"].as_u64() >= Some(2));
}

#[test]
fn restored_sessions_count_against_their_rules_limits() {
    let setup = Setup::new("limits-restore");
    let daemon = setup.lab.daemon(&policy("{ max_src_conn = 2 }"));
    let _held: Vec<TcpStream> = (0..2)
        .map(|i| {
            setup
                .connect(ADMITTED_WAIT)
                .unwrap_or_else(|e| panic!("connection {i} is within the cap: {e}"))
        })
        .collect();
    let file = setup.lab.scratch_path("table");
    let file = file.to_string_lossy();
    daemon.cli(&["save", &file]);
    daemon.cli(&["flush"]);
    assert_eq!(
        sessions_from(&daemon, Family::V4.addr(Side::Client)),
        0,
        "the flush emptied the table"
    );
    let out = daemon.cli(&["restore", &file]);
    assert!(out.starts_with("restored 2 session(s)"), "{out}");
    let entry = source_entry(&daemon, Family::V4.addr(Side::Client)).expect("counted");
    assert_eq!(entry["sessions"], 2, "the restored sessions count: {entry}");
    assert!(
        setup.connect(REFUSED_WAIT).is_err(),
        "a third connection is over the cap the restored sessions fill"
    );
}
