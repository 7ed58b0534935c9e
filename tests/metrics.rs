//! The Prometheus endpoint: with `[metrics] listen` the daemon serves `GET /metrics` on
//! that address, and what a scrape reports matches the traffic the test sent and what
//! `session stats` says; without it nothing listens.
//!
//! The daemon runs in fw and listens on fw's own loopback, so the test scrapes from a
//! thread inside fw's namespace with a plain TCP client.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use session_testkit::{accept_new_rule, inbound_drop_policy, new_flow_rule, return_traffic_rule};
use session_tests::{Family, IO_TIMEOUT, Lab, Side, counter, rule_hits, set_linger_zero, wait_for};

const METRICS_ADDR: &str = "127.0.0.1:9640";

const POLICY: &str = concat!(
    r#"
[metrics]
listen = "127.0.0.1:9640"

"#,
    inbound_drop_policy!(),
    return_traffic_rule!("established"),
    accept_new_rule!("web", "tcp", 8080),
    new_flow_rule!("no-telnet", "tcp", 23, "drop"),
);

/// Sends `request` to the metrics address from inside fw and returns the whole response.
fn http(lab: &Lab, request: &str) -> String {
    let addr: SocketAddr = METRICS_ADDR.parse().expect("valid address");
    let mut stream = lab
        .in_ns(Side::Fw, || TcpStream::connect_timeout(&addr, IO_TIMEOUT))
        .unwrap_or_else(|e| panic!("cannot connect to the metrics endpoint {addr} in fw: {e}"));
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("read timeout");
    stream
        .write_all(request.as_bytes())
        .expect("sending the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .unwrap_or_else(|e| panic!("reading the response failed: {e}; so far: {response}"));
    response
}

/// Scrapes `/metrics` and returns the samples by series (`name{labels}`), after checking
/// the status line and content type.
fn scrape(lab: &Lab) -> BTreeMap<String, f64> {
    let response = http(
        lab,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n\r\n",
    );
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header/body separator in: {response}"));
    assert!(
        head.starts_with("HTTP/1.1 200 OK"),
        "scrape failed: {response}"
    );
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "not the Prometheus text format: {head}"
    );
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("Content-Length: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Content-Length in: {head}"));
    assert_eq!(length, body.len(), "Content-Length does not match the body");
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("sample without value: {line:?}"));
            let value = value
                .parse()
                .unwrap_or_else(|e| panic!("value of {line:?} is not a number: {e}"));
            (series.to_string(), value)
        })
        .collect()
}

/// The value of `series`, panicking with the whole scrape when it is missing.
fn sample(metrics: &BTreeMap<String, f64>, series: &str) -> f64 {
    *metrics
        .get(series)
        .unwrap_or_else(|| panic!("no sample {series} in the scrape: {metrics:#?}"))
}

#[test]
fn metrics_report_the_traffic_sent() {
    let lab = Lab::new("metrics");
    let daemon = lab.daemon(POLICY);
    let before = scrape(&lab);
    assert_eq!(
        sample(&before, r#"session_rule_hits_total{rule="web"}"#),
        0.0
    );

    // Two connections to the allowed port, kept open; one to a port a rule drops; one to
    // a port no rule mentions (the default drops it).
    let (client_a, _server_a) = lab.tcp_pair(Family::V4, 8080);
    let (client_b, _server_b) = lab.tcp_pair(Family::V4, 8080);
    let blocked = Family::V4.sock(Side::Fw, 23);
    let _telnet = lab.tcp_listen(Side::Fw, Family::V4, 23);
    assert!(
        lab.tcp_connect(Side::Client, blocked, Duration::from_secs(1))
            .is_err(),
        "the no-telnet rule must drop the connection"
    );
    let other = Family::V4.sock(Side::Fw, 9999);
    let _other_listener = lab.tcp_listen(Side::Fw, Family::V4, 9999);
    assert!(
        lab.tcp_connect(Side::Client, other, Duration::from_secs(1))
            .is_err(),
        "the default action must drop the connection"
    );
    let stats = daemon.stats_when("the blocked SYNs to be counted", |stats| {
        counter(stats, "drop_rule") >= 1 && counter(stats, "drop_default") >= 1
    });
    let metrics = scrape(&lab);

    assert_eq!(
        sample(
            &metrics,
            r#"session_sessions{proto="tcp",state="ESTABLISHED"}"#
        ),
        2.0,
        "both open connections are established sessions"
    );
    assert_eq!(
        sample(&metrics, r#"session_rule_hits_total{rule="web"}"#),
        2.0,
        "one hit per allowed SYN"
    );
    assert_eq!(
        sample(&metrics, r#"session_rule_hits_total{rule="web"}"#) as u64,
        rule_hits(&stats, "web")
    );
    assert_eq!(
        sample(&metrics, r#"session_rule_hits_total{rule="no-telnet"}"#) as u64,
        rule_hits(&stats, "no-telnet")
    );
    assert!(sample(&metrics, r#"session_rule_hits_total{rule="no-telnet"}"#) >= 1.0);
    for (series, name) in [
        (r#"session_drops_total{reason="rule"}"#, "drop_rule"),
        (r#"session_drops_total{reason="default"}"#, "drop_default"),
        (
            r#"session_drops_total{reason="table_full"}"#,
            "drop_table_full",
        ),
        (
            r#"session_packets_by_state_total{state="new"}"#,
            "state_new",
        ),
        (
            r#"session_packets_by_state_total{state="established"}"#,
            "state_established",
        ),
        ("session_packets_seen_total", "packets_seen"),
        ("session_packets_dropped_total", "packets_dropped"),
        ("session_sessions_created_total", "sessions_created"),
        ("session_protected_table_full_total", "protected_table_full"),
    ] {
        assert_eq!(
            sample(&metrics, series) as u64,
            counter(&stats, name),
            "{series} must equal stats' {name}"
        );
    }
    assert_eq!(
        sample(&metrics, r#"session_drops_total{reason="table_full"}"#),
        0.0
    );
    assert_eq!(
        sample(
            &metrics,
            r#"session_default_action_hits_total{direction="inbound"}"#
        ) as u64,
        stats["default_inbound_hits"].as_u64().expect("hits")
    );
    let max = stats["max_sessions"].as_u64().expect("max_sessions") as f64;
    assert_eq!(sample(&metrics, "session_table_max_sessions"), max);
    let live = stats["sessions"].as_u64().expect("sessions") as f64;
    assert!(live >= 2.0, "the two connections are live: {stats}");
    assert!(
        (sample(&metrics, "session_table_fill_ratio") - live / max).abs() < 1e-12,
        "fill ratio is live sessions over capacity"
    );
    assert_eq!(sample(&metrics, "session_policy_generation"), 1.0);
    assert_eq!(sample(&metrics, "session_policy_applies_total"), 1.0);

    // Closing one connection with a RST ends its session at once.
    set_linger_zero(&client_a);
    drop(client_a);
    wait_for("the reset session to leave the gauge", IO_TIMEOUT, || {
        let open = scrape(&lab)
            .get(r#"session_sessions{proto="tcp",state="ESTABLISHED"}"#)
            .copied();
        (open == Some(1.0)).then_some(())
    });
    drop(client_b);
}

#[test]
fn reaper_runs_and_duration_grow() {
    let lab = Lab::new("metreap");
    let _daemon = lab.daemon(POLICY);
    let first = scrape(&lab);
    let runs = sample(&first, "session_reaper_runs_total");
    assert!(runs >= 1.0, "the reaper runs once at start: {runs}");
    // The reaper sweeps every 5 s.
    let later = wait_for("another reaper run", Duration::from_secs(8), || {
        let now = scrape(&lab);
        (sample(&now, "session_reaper_runs_total") > runs).then_some(now)
    });
    let total_before = sample(&first, "session_reaper_duration_seconds_total");
    let total_after = sample(&later, "session_reaper_duration_seconds_total");
    let last = sample(&later, "session_reaper_last_duration_seconds");
    assert!(
        total_after > total_before,
        "each sweep adds its duration: {total_before} -> {total_after}"
    );
    assert!(
        last > 0.0 && last <= total_after,
        "the last sweep took {last} s of {total_after} s in total"
    );
}

#[test]
fn other_paths_and_methods_are_refused() {
    let lab = Lab::new("methttp");
    let _daemon = lab.daemon(POLICY);
    let response = http(&lab, "GET /secret HTTP/1.1\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 404 "), "{response}");
    let response = http(&lab, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 405 "), "{response}");
    let response = http(&lab, "HEAD /metrics HTTP/1.1\r\n\r\n");
    let (head, body) = response.split_once("\r\n\r\n").expect("a header");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(body.is_empty(), "HEAD has no body: {body:?}");
}

#[test]
fn nothing_listens_without_a_metrics_section() {
    let lab = Lab::new("metoff");
    let without = POLICY.replace("[metrics]\nlisten = \"127.0.0.1:9640\"\n", "");
    assert!(
        !without.contains("[metrics]"),
        "test bug: section not removed"
    );
    let _daemon = lab.daemon(&without);
    let addr: SocketAddr = METRICS_ADDR.parse().expect("valid address");
    let refused = lab.in_ns(Side::Fw, || TcpStream::connect_timeout(&addr, IO_TIMEOUT));
    let error = refused.expect_err("no metrics endpoint may listen when it is not configured");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
}
