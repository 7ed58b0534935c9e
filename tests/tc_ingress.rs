//! `[attach] tc_ingress`: an interface judged on ingress by the TC program instead of
//! XDP. It must enforce the same policy, carry no XDP program while it does, and move
//! between XDP and TC across a restart without a moment unjudged or judged twice.

use std::time::Duration;

use aya::programs::{SchedClassifier, TcAttachType};

use session_tests::lifecycle::{CLOSED_PORT, PROGRESS, PinGuard, STREAM_POLICY, STREAM_PORT};
use session_tests::{CLIENT_V4, FW_IFACE, FW_V4, Family, Lab, Side, counter, delta};

/// [`STREAM_POLICY`] with fw's lab interface judged on TC ingress.
fn tc_policy() -> String {
    format!("{STREAM_POLICY}\n[attach]\ntc_ingress = [\"{FW_IFACE}\"]\n")
}

/// Which ingress programs fw's lab interface carries, as `(xdp, tc_ingress)`: whether
/// `ip link` shows XDP, and how many programs the kernel lists on its TCX ingress, or
/// before TCX (Linux 6.6) how many of session's cls_bpf filters `tc` shows there.
fn ingress_programs(lab: &Lab) -> (bool, usize) {
    let link = lab.ok(Side::Fw, 5, &["ip", "link", "show", "dev", FW_IFACE]);
    let tc = if Lab::expected_egress_tc_filters() > 0 {
        let filters = lab.ok(
            Side::Fw,
            5,
            &["tc", "filter", "show", "dev", FW_IFACE, "ingress"],
        );
        filters
            .lines()
            .filter(|l| l.contains("session_ingress_tc"))
            .count()
    } else {
        let (_, tcx) = lab
            .in_ns(Side::Fw, || {
                SchedClassifier::query_tcx(FW_IFACE, TcAttachType::Ingress)
            })
            .unwrap_or_else(|e| panic!("cannot query the TCX ingress programs of {FW_IFACE}: {e}"));
        tcx.len()
    };
    (link.contains("xdp"), tc)
}

/// Which ingress pins the lab's pin directory holds, as `(xdp, tc_ingress)`: a TC
/// ingress pin is a TCX link, or before TCX the marker of a netlink filter.
fn ingress_pins(lab: &Lab) -> (bool, bool) {
    let links = lab.pin_dir().join("links");
    (
        links.join(format!("{FW_IFACE}-xdp")).exists(),
        links.join(format!("{FW_IFACE}-tc-ingress")).exists()
            || links.join(format!("{FW_IFACE}-tc-ingress-nl")).exists(),
    )
}

/// Asserts that a new TCP connection from the client to fw:`port`, where a listener
/// waits, is refused by the firewall and counted as a default drop. Unlike
/// `Lab::assert_new_tcp_blocked`, no capture: taps see a packet before TC ingress drops
/// it. The listener proves it: a SYN that reached fw's stack would be answered.
fn assert_syn_dropped_on_tc(lab: &Lab, port: u16, when: &str) {
    let _listener = lab.tcp_listen(Side::Fw, Family::V4, port);
    let before = lab.pinned_stats();
    let to = Family::V4.sock(Side::Fw, port);
    let attempt = lab.tcp_connect(Side::Client, to, Duration::from_millis(800));
    assert!(
        attempt.is_err(),
        "a connection to the forbidden port {port} succeeded {when}"
    );
    let dropped = delta(&before, &lab.pinned_stats(), "drop_default");
    assert!(
        dropped >= 1,
        "the default drop did not count the SYN {when}"
    );
}

#[test]
fn tc_ingress_enforces_the_policy_in_place_of_xdp() {
    let lab = Lab::new("tcin");
    let daemon = lab.daemon(&tc_policy());
    assert_eq!(
        ingress_programs(&lab),
        (false, 1),
        "fw's interface should carry the TC ingress program and no XDP"
    );
    assert_eq!(ingress_pins(&lab), (false, true), "ingress pins");
    let before = counter(&daemon.stats_json(), "state_established");
    let stream = lab.live_stream(Family::V4, STREAM_PORT);
    stream.assert_flowing(PROGRESS, "through TC ingress");
    daemon.wait_session("tcp", CLIENT_V4, FW_V4, STREAM_PORT, "ESTABLISHED");
    let stats = daemon.stats_json();
    assert!(
        counter(&stats, "state_established") > before,
        "the stream's packets were not judged as established: {stats}"
    );
    assert_syn_dropped_on_tc(&lab, CLOSED_PORT, "with TC ingress");
    stream.finish();
}

#[test]
fn an_interface_moves_between_xdp_and_tc_ingress_across_restarts() {
    let lab = Lab::new("tcmove");
    let mut first = lab.daemon(STREAM_POLICY);
    assert_eq!(ingress_programs(&lab), (true, 0), "started on XDP");
    let stream = lab.live_stream(Family::V4, STREAM_PORT);
    stream.assert_flowing(PROGRESS, "on XDP");
    first.signal(libc::SIGTERM);
    first.wait_exit(Duration::from_secs(10));

    let mut second = lab.daemon(&tc_policy());
    second.wait_log(
        &format!("{FW_IFACE}: removed the ingress link pinned at"),
        Duration::from_secs(5),
    );
    assert_eq!(
        ingress_programs(&lab),
        (false, 1),
        "after the restart with tc_ingress, only TC should judge ingress"
    );
    assert_eq!(ingress_pins(&lab), (false, true), "ingress pins on TC");
    stream.assert_flowing(PROGRESS, "after moving to TC ingress");
    assert_syn_dropped_on_tc(&lab, CLOSED_PORT, "after moving to TC ingress");
    second.signal(libc::SIGTERM);
    second.wait_exit(Duration::from_secs(10));

    let _third = lab.daemon(STREAM_POLICY);
    assert_eq!(
        ingress_programs(&lab),
        (true, 0),
        "after the restart without tc_ingress, only XDP should judge ingress"
    );
    assert_eq!(ingress_pins(&lab), (true, false), "ingress pins on XDP");
    stream.assert_flowing(PROGRESS, "after moving back to XDP");
    lab.assert_new_tcp_blocked(CLOSED_PORT, "after moving back to XDP");
    stream.finish();
}

#[test]
fn tc_ingress_naming_an_interface_not_protected_is_refused() {
    let lab = Lab::new("tcstray");
    let pin_dir = lab.pin_dir();
    let _guard = PinGuard::new(pin_dir.clone());
    std::fs::write(
        lab.config_path(),
        format!("{STREAM_POLICY}\n[attach]\ntc_ingress = [\"sess-stray\"]\n"),
    )
    .unwrap_or_else(|e| panic!("cannot write the config: {e}"));
    let mut daemon = lab.daemon_process(&[FW_IFACE], &pin_dir);
    let status = daemon.wait_exit(Duration::from_secs(20));
    let stderr = daemon.stderr();
    assert!(
        !status.success(),
        "the daemon started with a stray tc_ingress name: {stderr}"
    );
    assert!(
        stderr.contains(
            "`[attach] tc_ingress` names `sess-stray`, which is not an interface to protect"
        ),
        "the refusal does not say what is wrong: {stderr}"
    );
    assert_eq!(
        ingress_programs(&lab),
        (false, 0),
        "a refused start attached something"
    );
    assert!(
        !pin_dir.exists(),
        "a refused start left {} behind",
        pin_dir.display()
    );
}
