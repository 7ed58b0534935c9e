//! The packet generator delivers what it reports, keeps to its count, time and rate
//! bounds, and reports its top rate, measured between two lab namespaces; and the
//! end-to-end benchmark's wire carries a connection only through its program.

use std::io::{Read as _, Write as _};
use std::time::Duration;

use serde_json::Value;
use session_tests::bare_xdp::BareXdp;
use session_tests::loadgen::{self, Blast, Sent};
use session_tests::xdpgen;
use session_tests::{FW_IFACE, FW_V4, Family, IO_TIMEOUT, Lab, Side, accept_within};

/// Counts and drops, at fw's ingress, the frames each of `matches` (nft expressions)
/// selects, one counter per match in order, so a measured rate is the generator's and not
/// fw's IP stack's.
fn install_counters(lab: &Lab, matches: &[&str]) {
    let rules: String = matches
        .iter()
        .map(|m| format!("    {m} counter drop\n"))
        .collect();
    let script = format!(
        "table netdev gen {{\n  chain in {{\n    type filter hook ingress device \"{FW_IFACE}\" \
         priority 0; policy accept;\n{rules}  }}\n}}\n"
    );
    let out = lab.run_with_input(Side::Fw, 10, &["nft", "-f", "-"], script.as_bytes());
    assert!(
        out.status.success(),
        "cannot install the ingress counters: {}",
        session_tests::describe(&out)
    );
}

/// Counts every frame from the generator's spoofed IPv4 range.
fn install_ingress_counter(lab: &Lab) {
    install_counters(lab, &["ip saddr 198.19.0.0/16"]);
}

/// The packets each counter of [`install_counters`] has seen, in order.
fn counts(lab: &Lab) -> Vec<u64> {
    let text = lab.ok(
        Side::Fw,
        10,
        &["nft", "-j", "list", "table", "netdev", "gen"],
    );
    let json: Value = serde_json::from_str(&text).expect("nft -j prints JSON");
    json["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| {
            item["rule"]["expr"]
                .as_array()?
                .iter()
                .find_map(|e| e["counter"]["packets"].as_u64())
        })
        .collect()
}

/// Packets the counter of [`install_ingress_counter`] has seen.
fn ingress_count(lab: &Lab) -> u64 {
    counts(lab)[0]
}

fn udp_blast(lab: &Lab, max_packets: u64, max_duration: Duration, rate: Option<u64>) -> Sent {
    let dst = FW_V4.parse().expect("lab address");
    let frames = loadgen::udp_frames(
        lab.mac(Side::Client),
        lab.mac(Side::Fw),
        dst,
        &[9],
        loadgen::MAX_SOURCES,
    );
    loadgen::blast(&Blast {
        netns: lab.ns(Side::Client).to_string(),
        iface: Lab::iface(Side::Client).to_string(),
        frames,
        threads: 2,
        max_packets,
        max_duration,
        rate_pps: rate,
    })
    .unwrap_or_else(|e| panic!("blast failed: {e}"))
}

#[test]
fn paced_blast_sends_exactly_its_count_and_all_of_it_arrives() {
    let lab = Lab::new("gen-count");
    install_ingress_counter(&lab);
    let sent = udp_blast(&lab, 20_000, Duration::from_secs(10), Some(40_000));
    assert_eq!(
        sent.packets, 20_000,
        "the count bound ends the run: {sent:?}"
    );
    assert!(
        sent.elapsed >= Duration::from_millis(400) && sent.elapsed < Duration::from_secs(3),
        "20000 packets at 40 kpps take about 0.5 s, took {:?}",
        sent.elapsed
    );
    // veth delivers asynchronously; the counter catches up within moments.
    let arrived = session_tests::wait_for("all frames to arrive", Duration::from_secs(3), || {
        let n = ingress_count(&lab);
        (n == sent.packets).then_some(n)
    });
    assert_eq!(arrived, 20_000);
}

#[test]
fn unpaced_blast_stops_at_its_time_bound_and_reports_its_rate() {
    let lab = Lab::new("gen-rate");
    install_ingress_counter(&lab);
    let limit = Duration::from_secs(2);
    let sent = udp_blast(&lab, 50_000_000, limit, None);
    assert!(
        sent.packets < 50_000_000 && sent.elapsed >= limit,
        "the time bound ends the run: {sent:?}"
    );
    assert!(
        sent.elapsed < limit + Duration::from_millis(500),
        "the run overran its time bound: {sent:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let arrived = ingress_count(&lab);
    eprintln!(
        "loadgen: {} packets in {:.2?} = {:.0} pps sent, {arrived} arrived at fw ingress \
         ({:.0} pps)",
        sent.packets,
        sent.elapsed,
        sent.pps(),
        arrived as f64 / sent.elapsed.as_secs_f64()
    );
    assert!(
        arrived <= sent.packets,
        "more arrived ({arrived}) than were sent ({})",
        sent.packets
    );
    assert!(
        sent.pps() > 100_000.0,
        "the generator should send at least 100 kpps even on a busy 2-CPU machine: {:.0} pps",
        sent.pps()
    );
    assert!(
        arrived * 2 >= sent.packets,
        "most frames should arrive: {arrived} of {}",
        sent.packets
    );
}

#[test]
fn the_binary_sends_a_bounded_flood_and_reports_it_as_json() {
    let lab = Lab::new("gen-bin");
    install_ingress_counter(&lab);
    let mac = |side| {
        lab.mac(side)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_session-loadgen"))
        .args(["--netns", lab.ns(Side::Client), "--iface"])
        .arg(Lab::iface(Side::Client))
        .args(["--src-mac", &mac(Side::Client), "--dst-mac", &mac(Side::Fw)])
        .args(["--dst", FW_V4, "--ports", "9,10", "--kind", "udp"])
        .args([
            "--max-packets",
            "5000",
            "--rate",
            "50000",
            "--duration",
            "5",
        ])
        .output()
        .expect("session-loadgen runs");
    assert!(
        out.status.success(),
        "session-loadgen failed: {}",
        session_tests::describe(&out)
    );
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", session_tests::describe(&out)));
    assert_eq!(report["packets"], 5000, "{report}");
    assert!(
        report["pps"].as_f64().is_some_and(|pps| pps > 0.0),
        "{report}"
    );
    let arrived = session_tests::wait_for("the frames to arrive", Duration::from_secs(3), || {
        let n = ingress_count(&lab);
        (n == 5000).then_some(n)
    });
    assert_eq!(arrived, 5000);
}

#[test]
fn the_binary_refuses_a_destination_outside_the_benchmark_ranges() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_session-loadgen"))
        .args(["--netns", "none", "--iface", "none"])
        .args([
            "--src-mac",
            "02:00:00:00:00:01",
            "--dst-mac",
            "02:00:00:00:00:02",
        ])
        .args(["--dst", "192.0.2.1"])
        .output()
        .expect("session-loadgen runs");
    assert!(
        !out.status.success(),
        "a flood to 192.0.2.1 must be refused"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("outside 198.18.0.0/15"), "{stderr}");
}

#[test]
fn xdp_generator_delivers_its_count_cycling_through_its_frames() {
    let lab = Lab::new("gen-xdp");
    // veth takes XDP frames only with an XDP program or GRO on the receiving end.
    lab.ok(Side::Fw, 5, &["ethtool", "-K", FW_IFACE, "gro", "on"]);
    install_counters(
        &lab,
        &[
            "ip saddr 198.19.0.0/16 udp dport 9",
            "ip saddr 198.19.0.0/16 udp dport 10",
        ],
    );
    let dst = FW_V4.parse().expect("lab address");
    let frames = loadgen::udp_frames(lab.mac(Side::Client), lab.mac(Side::Fw), dst, &[9, 10], 2);
    let sent = xdpgen::xdp_blast(&Blast {
        netns: lab.ns(Side::Client).to_string(),
        iface: Lab::iface(Side::Client).to_string(),
        frames,
        threads: 1,
        max_packets: 20_001,
        max_duration: Duration::from_secs(10),
        rate_pps: None,
    })
    .unwrap_or_else(|e| panic!("XDP blast failed: {e}"));
    assert_eq!(
        sent.packets, 20_001,
        "the count bound ends the run: {sent:?}"
    );
    let counts = session_tests::wait_for("all frames to arrive", Duration::from_secs(3), || {
        let seen = counts(&lab);
        (seen.iter().sum::<u64>() == sent.packets).then_some(seen)
    });
    assert_eq!(
        counts,
        [10_001, 10_000],
        "the generator alternates between its two frames, starting with the first"
    );
}

#[test]
fn xdp_generator_refuses_frames_that_differ_beyond_what_it_writes() {
    let dst = FW_V4.parse().expect("lab address");
    let mut frames = loadgen::udp_frames([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], dst, &[9], 2);
    *frames[1].last_mut().expect("a frame") ^= 1;
    let error = xdpgen::xdp_blast(&Blast {
        netns: "none".into(),
        iface: "none".into(),
        frames,
        threads: 1,
        max_packets: 1,
        max_duration: Duration::from_secs(1),
        rate_pps: None,
    })
    .expect_err("frames that differ in their payload cannot share one template");
    assert!(
        error.to_string().contains("differs from the first"),
        "{error}"
    );
}

/// (c) of the end-to-end benchmark runs through a wired lab, so its connections/s are only
/// meaningful if the wire carries every segment: nothing may cross before
/// `session_bench_wire` is attached, and afterwards a connection must complete and carry
/// data both ways.
#[test]
fn the_bench_wire_carries_a_connection_only_through_its_program() {
    const PORT: u16 = 8080;
    let lab = Lab::wired("wire");
    let listener = lab.tcp_listen(Side::Fw, Family::V4, PORT);
    let to = Family::V4.sock(Side::Fw, PORT);
    assert!(
        lab.tcp_connect(Side::Client, to, Duration::from_secs(1))
            .is_err(),
        "a connection crossed the wire before its program was attached"
    );

    let wire = BareXdp::wire(&lab);
    let mut client = lab
        .tcp_connect(Side::Client, to, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connecting through the wire: {e}"));
    let mut server = accept_within(&listener, IO_TIMEOUT);
    let mut buf = [0u8; 5];
    client.write_all(b"hello").expect("client writing");
    server.read_exact(&mut buf).expect("server reading");
    assert_eq!(&buf, b"hello", "the client's data arrived changed");
    server.write_all(b"world").expect("server writing");
    client.read_exact(&mut buf).expect("client reading");
    assert_eq!(&buf, b"world", "fw's data arrived changed");
    drop((client, server));
    drop(lab);
    drop(wire);
}
