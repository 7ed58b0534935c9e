//! `session flush`: removes the sessions matching its filters from both tiers of the table
//! (an established TCP connection lives in the protected one), and a flushed flow's next
//! packet is judged afresh.

use std::io::Write;

use session_tests::{DNS_RULE, Family, Lab, Side, WEB_POLICY, counter, read_exact_len};

/// The web host with UDP 5353 open as well.
fn policy() -> String {
    format!("{WEB_POLICY}{DNS_RULE}")
}

#[test]
fn flush_by_filter_then_all() {
    let lab = Lab::new("flush");
    let daemon = lab.daemon(&policy());
    let (mut client, mut server) = lab.tcp_pair(Family::V4, 8080);
    client.write_all(b"hello\n").expect("client write");
    assert_eq!(read_exact_len(&mut server, 6), b"hello\n");
    let (client_ip, fw_ip) = (Family::V4.addr(Side::Client), Family::V4.addr(Side::Fw));
    let tcp = daemon.wait_session("tcp", client_ip, fw_ip, 8080, "ESTABLISHED");
    assert_eq!(tcp["assured"], true, "{tcp}");
    let udp = lab.udp_socket(Side::Client, Family::V4, 0);
    let to = Family::V4.sock(Side::Fw, 5353);
    lab.in_ns(Side::Client, || udp.send_to(b"query", to))
        .expect("sending the UDP query");
    daemon.wait_session("udp", client_ip, fw_ip, 5353, "UNREPLIED");

    let out = daemon.cli(&["flush", "--proto", "tcp", "--port", "8080"]);
    assert_eq!(out.trim(), "flushed 1 session(s)");
    let left: Vec<_> = daemon.list_json();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["proto"], "udp", "{left:?}");

    // The flushed connection's next segment has no session: mid-stream TCP is INVALID.
    let invalid_before = counter(&daemon.stats_json(), "state_invalid");
    client.write_all(b"again\n").expect("client write");
    daemon.stats_when("the flushed connection's segment to be INVALID", |stats| {
        counter(stats, "state_invalid") > invalid_before
    });
    assert!(daemon.list_json().iter().all(|s| s["proto"] != "tcp"));

    assert_eq!(daemon.cli(&["flush"]).trim(), "flushed 1 session(s)");
    assert!(daemon.list_json().is_empty());
}
