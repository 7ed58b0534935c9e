//! What a reload does to the sessions that exist: those the new policy would still admit
//! keep flowing; those it would not are removed, so their next packets are judged afresh
//! (mid-stream TCP without a session is INVALID) and the connection stops.

use std::io::Write;
use std::time::Duration;

use session_testkit::{inbound_drop_policy, return_traffic_rule};
use session_tests::{Family, Lab, Side, counter, read_exact_len};

fn policy(ports: &str) -> String {
    format!(
        concat!(
            inbound_drop_policy!(),
            return_traffic_rule!("return-traffic"),
            r#"
[[rule]]
name = "services"
state = ["new"]
proto = "tcp"
dport = [{ports}]
action = "accept"
"#
        ),
        ports = ports,
    )
}

/// Sends a line from the client and says whether the server got it within `wait`.
fn delivered(
    client: &mut std::net::TcpStream,
    server: &mut std::net::TcpStream,
    wait: Duration,
) -> bool {
    client.write_all(b"line\n").expect("client write");
    server
        .set_read_timeout(Some(wait))
        .expect("setting the server's read timeout");
    let mut buf = [0u8; 5];
    std::io::Read::read_exact(server, &mut buf).is_ok()
}

#[test]
fn a_reload_removes_the_sessions_the_new_policy_would_not_admit() {
    let lab = Lab::new("rlsem");
    let daemon = lab.daemon(&policy("8080, 8081"));
    let (mut kept_client, mut kept_server) = lab.tcp_pair(Family::V4, 8080);
    let (mut cut_client, mut cut_server) = lab.tcp_pair(Family::V4, 8081);
    for (client, server) in [
        (&mut kept_client, &mut kept_server),
        (&mut cut_client, &mut cut_server),
    ] {
        client.write_all(b"hello\n").expect("client write");
        assert_eq!(read_exact_len(server, 6), b"hello\n");
    }
    let client_ip = Family::V4.addr(Side::Client);
    let fw_ip = Family::V4.addr(Side::Fw);
    daemon.wait_session("tcp", client_ip, fw_ip, 8081, "ESTABLISHED");

    daemon.write_config(&policy("8080"));
    daemon.cli(&["reload"]);

    let stats = daemon.stats_json();
    assert_eq!(
        counter(&stats, "sessions_readmission_refused"),
        1,
        "{stats}"
    );
    let ports: Vec<u64> = daemon
        .list_json()
        .iter()
        .filter(|s| s["proto"] == "tcp")
        .filter_map(|s| s["dport"].as_u64())
        .collect();
    assert_eq!(ports, [8080], "only the still-admitted session is left");

    assert!(
        delivered(&mut kept_client, &mut kept_server, Duration::from_secs(5)),
        "the connection the new policy admits keeps flowing"
    );
    let invalid_before = counter(&daemon.stats_json(), "state_invalid");
    assert!(
        !delivered(&mut cut_client, &mut cut_server, Duration::from_secs(2)),
        "the connection the new policy refuses is cut"
    );
    let stats = daemon.stats_json();
    assert!(
        counter(&stats, "state_invalid") > invalid_before,
        "its mid-stream packets are INVALID without a session: {stats}"
    );
    assert!(
        !daemon.list_json().iter().any(|s| s["dport"] == 8081),
        "no session is re-created for the refused connection"
    );
}
