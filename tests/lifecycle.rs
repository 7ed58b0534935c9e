//! The daemon's lifecycle under a live TCP stream: stopping (SIGTERM) or killing
//! (SIGKILL) it and starting it again, reloading (SIGHUP and `session reload`), a reload
//! of a broken file, `session down`, a restart with another `max_sessions`, which is
//! refused until `session down`, and one on counters an older version pinned. The firewall must keep enforcing while no daemon
//! runs (the links are pinned), a restarted daemon must find the same sessions and
//! counters, and not one byte of the stream may be lost.

use std::time::Duration;

use session_tests::{
    CLIENT_V4, FW_IFACE, FW_V4, Family, Lab, Side, counter, describe, find_session,
    lifecycle::{CLOSED_PORT, PROGRESS, STREAM_POLICY, STREAM_PORT},
    rule_hits,
};
use session_user::bpf::{clock::monotonic_ns, pinned::PinnedMaps};

/// The stream's session from `session list --json`, with its packet counts.
fn stream_packets(sessions: &[serde_json::Value]) -> u64 {
    let session = find_session(sessions, "tcp", CLIENT_V4, FW_V4, STREAM_PORT)
        .unwrap_or_else(|| panic!("the stream's session is not listed: {sessions:?}"));
    assert_eq!(session["state"], "ESTABLISHED", "{session}");
    session["orig_packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no orig_packets in {session}"))
}

/// Stops the daemon with `signal`, checks the firewall keeps enforcing and the stream
/// keeps flowing with no daemon, restarts it, and checks the same session and counters
/// are there and keep growing; finally every byte must have arrived.
fn restart_keeps_everything(tag: &str, signal: libc::c_int) {
    let lab = Lab::new(tag);
    let mut first = lab.daemon(STREAM_POLICY);
    let stream = lab.live_stream(Family::V4, STREAM_PORT);
    stream.assert_flowing(PROGRESS, "before the restart");
    let packets_before = stream_packets(&first.list_json());
    let stats_before = first.stats_json();

    first.signal(signal);
    let status = first.wait_exit(Duration::from_secs(10));
    if signal == libc::SIGTERM {
        assert!(status.success(), "SIGTERM must exit 0: {status}");
    }
    stream.assert_flowing(PROGRESS, "while no daemon runs");
    lab.assert_new_tcp_blocked(CLOSED_PORT, "while no daemon runs");
    let xdp = lab.ok(Side::Fw, 5, &["ip", "link", "show", "dev", FW_IFACE]);
    assert!(xdp.contains("xdp"), "XDP detached with the daemon: {xdp}");
    let filters = Lab::expected_egress_tc_filters();
    assert_eq!(
        lab.egress_tc_filters(),
        filters,
        "egress filters while no daemon runs"
    );

    let second = lab.restart_daemon();
    assert!(
        second.log().contains("adopted pinned link"),
        "the restarted daemon did not adopt the pinned links:\n{}",
        second.log()
    );
    assert_eq!(
        lab.egress_tc_filters(),
        filters,
        "the restart must replace the egress filter's program, not add a filter"
    );
    if filters > 0 {
        assert!(
            second.log().contains("netlink filter, program replaced"),
            "the restarted daemon did not replace the egress filter's program:\n{}",
            second.log()
        );
    }
    let packets_after = stream_packets(&second.list_json());
    assert!(
        packets_after > packets_before,
        "the session's packet count did not carry over and grow: {packets_before} -> {packets_after}"
    );
    let stats_after = second.stats_json();
    for name in ["packets_seen", "packets_accepted", "state_established"] {
        assert!(
            counter(&stats_after, name) > counter(&stats_before, name),
            "counter {name} was reset or did not grow across the restart"
        );
    }
    assert!(rule_hits(&stats_after, "return-traffic") > 0);
    stream.assert_flowing(PROGRESS, "after the restart");
    lab.assert_new_tcp_blocked(CLOSED_PORT, "after the restart");
    let after_restart = second.stats_json();
    stream.assert_flowing(PROGRESS, "after the restart, again");
    assert!(
        counter(&second.stats_json(), "packets_seen") > counter(&after_restart, "packets_seen"),
        "counters stopped growing after the restart"
    );
    let carried = stream.finish();
    assert!(carried > 3 * PROGRESS, "only {carried} bytes carried");
}

#[test]
fn sigterm_and_restart_keep_sessions_counters_and_the_stream() {
    restart_keeps_everything("term", libc::SIGTERM);
}

#[test]
fn sigkill_and_restart_keep_sessions_counters_and_the_stream() {
    restart_keeps_everything("kill", libc::SIGKILL);
}

/// Reloads by SIGHUP and by `session reload` while the stream runs: each applies a new
/// policy generation and not one byte is lost.
#[test]
fn reload_under_a_live_stream_loses_nothing() {
    let lab = Lab::new("reload");
    let daemon = lab.daemon(STREAM_POLICY);
    let stream = lab.live_stream(Family::V4, STREAM_PORT);
    stream.assert_flowing(PROGRESS, "before reloading");
    let applies = counter(&daemon.stats_json(), "policy_applies");
    daemon.signal(libc::SIGHUP);
    daemon.stats_when("the SIGHUP reload", |stats| {
        counter(stats, "policy_applies") == applies + 1
    });
    stream.assert_flowing(PROGRESS, "after SIGHUP");
    let out = daemon.cli(&["reload"]);
    assert!(out.contains("reloaded, policy generation"), "{out}");
    assert_eq!(counter(&daemon.stats_json(), "policy_applies"), applies + 2);
    stream.assert_flowing(PROGRESS, "after `session reload`");
    lab.assert_new_tcp_blocked(CLOSED_PORT, "after the reloads");
    stream.finish();
}

/// A broken config file: `session reload` reports FILE:LINE:COL and exits 1, SIGHUP is
/// logged and refused, no policy is applied, and the stream goes on.
#[test]
fn bad_reload_changes_nothing_and_reports_the_error() {
    let lab = Lab::new("badrel");
    let mut daemon = lab.daemon(STREAM_POLICY);
    let stream = lab.live_stream(Family::V4, STREAM_PORT);
    stream.assert_flowing(PROGRESS, "before the bad reload");
    let applies = counter(&daemon.stats_json(), "policy_applies");
    let broken = STREAM_POLICY.replace("action = \"accept\"", "action = \"acept\"");
    std::fs::write(lab.config_path(), broken).expect("write the broken config");

    let out = daemon.cli_output(&["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let config = lab.config_path();
    assert!(
        !out.status.success(),
        "a bad reload succeeded: {}",
        describe(&out)
    );
    assert!(
        stderr.contains(&format!("{}:", config.display())) && stderr.contains("acept"),
        "the error does not name FILE:LINE:COL and the bad value: {stderr}"
    );
    let location = stderr
        .split(&format!("{}:", config.display()))
        .nth(1)
        .unwrap_or_default();
    let mut parts = location.splitn(3, ':');
    let (line, column) = (parts.next(), parts.next());
    assert!(
        line.is_some_and(|l| l.parse::<u32>().is_ok())
            && column.is_some_and(|c| c.parse::<u32>().is_ok()),
        "no LINE:COL after the file name: {stderr}"
    );

    daemon.signal(libc::SIGHUP);
    daemon.wait_log("reload refused", Duration::from_secs(5));
    daemon.assert_running();
    stream.assert_flowing(PROGRESS, "after the bad reloads");
    assert_eq!(
        counter(&daemon.stats_json(), "policy_applies"),
        applies,
        "a bad reload applied a policy"
    );
    lab.assert_new_tcp_blocked(CLOSED_PORT, "after the bad reloads");
    stream.finish();
}

/// `session down` stops the daemon, detaches the programs and removes every pin; a
/// second `session down` finds nothing and succeeds.
#[test]
fn down_removes_everything_and_is_idempotent() {
    let lab = Lab::new("down");
    let mut daemon = lab.daemon(STREAM_POLICY);
    assert!(lab.pin_dir().join("links").is_dir());
    assert_eq!(
        lab.egress_tc_filters(),
        Lab::expected_egress_tc_filters(),
        "egress filters before down"
    );
    let out = lab.session(&["down"]);
    assert!(
        out.status.success(),
        "session down failed: {}",
        describe(&out)
    );
    let report = String::from_utf8_lossy(&out.stdout);
    for expected in [
        format!("stopped the daemon (pid {})", daemon.pid()),
        format!("detached {FW_IFACE}"),
        "removed map".to_string(),
        format!("removed {}", lab.pin_dir().display()),
    ] {
        assert!(
            report.contains(&expected),
            "{expected:?} missing from:\n{report}"
        );
    }
    assert!(daemon.wait_exit(Duration::from_secs(5)).success());
    assert!(!lab.pin_dir().exists(), "the pin directory is still there");
    let link = lab.ok(Side::Fw, 5, &["ip", "link", "show", "dev", FW_IFACE]);
    assert!(!link.contains("xdp"), "XDP still attached: {link}");
    assert_eq!(lab.egress_tc_filters(), 0, "egress filter left after down");
    // Without the firewall the closed port is reachable.
    let _listener = lab.tcp_listen(Side::Fw, Family::V4, CLOSED_PORT);
    lab.tcp_connect(
        Side::Client,
        Family::V4.sock(Side::Fw, CLOSED_PORT),
        Duration::from_secs(2),
    )
    .unwrap_or_else(|e| panic!("the firewall is still enforcing after down: {e}"));

    let again = lab.session(&["down"]);
    assert!(
        again.status.success(),
        "second down failed: {}",
        describe(&again)
    );
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("nothing to remove"),
        "{}",
        describe(&again)
    );
}

/// A config whose `max_sessions` differs from the size the maps were pinned with is
/// refused, with the way out (`session down`), instead of running on the old table and a
/// presence filter that no longer matches the program. After `session down` it starts.
#[test]
fn a_changed_max_sessions_is_refused_until_down() {
    let lab = Lab::new("resize");
    let mut first = lab.daemon(STREAM_POLICY);
    first.signal(libc::SIGTERM);
    assert!(first.wait_exit(Duration::from_secs(10)).success());
    let resized = format!("[limits]\nmax_sessions = 4096\n{STREAM_POLICY}");
    std::fs::write(lab.config_path(), &resized).expect("writing the resized config");

    let mut refused = lab.daemon_process(&[FW_IFACE], &lab.pin_dir());
    let status = refused.wait_exit(Duration::from_secs(30));
    assert!(
        !status.success(),
        "the daemon started on maps pinned for another size"
    );
    let stderr = refused.stderr();
    assert!(
        stderr.contains("max_sessions changed") && stderr.contains("session down"),
        "unclear refusal: {stderr}"
    );

    let down = lab.session(&["down"]);
    assert!(
        down.status.success(),
        "session down failed: {}",
        describe(&down)
    );
    let second = lab.daemon(&resized);
    let stats = second.stats_json();
    assert_eq!(
        stats["max_sessions"].as_u64(),
        Some(4096),
        "the restarted daemon does not use the new size: {stats}"
    );
}

/// The `bpf()` system call with `attr` as its `union bpf_attr`, which the caller fills
/// for `cmd` (every pointer in it alive for the call).
fn bpf<T>(cmd: libc::c_long, attr: &mut [T]) -> libc::c_long {
    // SAFETY: `attr` is a live buffer of its own size; what it points to is the caller's.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    }
}

/// Replaces the pinned map at `path` with a new per-CPU array of `entries` u64 counters:
/// what an older version of session, with fewer counters, would have pinned.
fn pin_older_counter_array(path: &std::path::Path, entries: u32) {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    let mut create = [0u32; 16];
    create[..4].copy_from_slice(&[BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, entries]);
    let fd = bpf(BPF_MAP_CREATE, &mut create);
    assert!(
        fd >= 0,
        "creating a counter array: {}",
        std::io::Error::last_os_error()
    );
    std::fs::remove_file(path).unwrap_or_else(|e| panic!("unpinning {}: {e}", path.display()));
    let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("a pin path");
    let mut pin = [0u64; 2];
    pin[0] = name.as_ptr() as u64;
    pin[1] = fd as u64;
    let rc = bpf(BPF_OBJ_PIN, &mut pin);
    assert!(
        rc == 0,
        "pinning {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is the map's descriptor, which this function owns; the pin keeps the map.
    drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) });
}

/// An upgrade to a version with more counters (a new daemon on maps an older one pinned)
/// keeps the sessions and the stream, and restarts the counters at zero, where refusing
/// would leave `session down`, which loses every session, as the only way on.
#[test]
fn counters_pinned_by_an_older_version_are_recreated_and_the_sessions_kept() {
    let lab = Lab::new("upgrade");
    let mut first = lab.daemon(STREAM_POLICY);
    let stream = lab.live_stream(Family::V4, STREAM_PORT);
    stream.assert_flowing(PROGRESS, "before the upgrade");
    let packets_before = stream_packets(&first.list_json());
    first.signal(libc::SIGTERM);
    assert!(first.wait_exit(Duration::from_secs(10)).success());
    pin_older_counter_array(&lab.pin_dir().join("COUNTERS"), 4);

    let second = lab.restart_daemon();
    assert!(
        second
            .log()
            .contains("recreated, its counters start again at zero"),
        "the daemon did not say it recreated the counters:\n{}",
        second.log()
    );
    stream.assert_flowing(PROGRESS, "after the upgrade");
    let packets_after = stream_packets(&second.list_json());
    assert!(
        packets_after > packets_before,
        "the session did not carry over the upgrade: {packets_before} -> {packets_after}"
    );
    assert!(
        counter(&second.stats_json(), "packets_seen") > 0,
        "the recreated counters do not count"
    );
    let carried = stream.finish();
    assert!(carried > 2 * PROGRESS, "only {carried} bytes carried");
}

/// The kernel stamps sessions with the tick clock the daemon calibrated at start
/// (`session_common::clock`): a session's creation time must agree with this process's
/// CLOCK_MONOTONIC to within a tick, or every timeout would fire early or late, and a
/// reload, which rewrites the settings from the config, must keep the calibration.
#[test]
fn sessions_are_stamped_on_the_monotonic_clock_across_a_reload() {
    let lab = Lab::new("clock");
    let daemon = lab.daemon(STREAM_POLICY);
    let maps = PinnedMaps::open(daemon.pin_dir()).expect("opening the daemon's pinned maps");
    let clock = maps.settings().expect("reading the settings").clock;
    assert_ne!(
        clock.tick_ns,
        0,
        "the daemon did not calibrate the clock:\n{}",
        daemon.log()
    );
    let stamped = || {
        let before = monotonic_ns();
        let (client, _server) = lab.tcp_pair(Family::V4, STREAM_PORT);
        let after = monotonic_ns();
        let port = client.local_addr().expect("the client's address").port();
        let created = maps
            .all_sessions()
            .expect("reading the sessions")
            .into_iter()
            .find(|(key, _)| key.port_lo == port || key.port_hi == port)
            .unwrap_or_else(|| panic!("no session from client port {port}"))
            .1
            .created_ns;
        // One tick behind at most, as the coarse clock is, plus a millisecond for the
        // calibration's own error.
        let earliest = before - clock.tick_ns - 1_000_000;
        assert!(
            (earliest..=after).contains(&created),
            "the session from client port {port} was stamped {created} ns; the connection was made between {before} and {after} ns on CLOCK_MONOTONIC (tick {} ns)",
            clock.tick_ns
        );
    };
    stamped();
    let out = daemon.cli(&["reload"]);
    assert!(out.contains("reloaded, policy generation"), "{out}");
    assert_eq!(
        maps.settings().expect("reading the settings").clock,
        clock,
        "the reload changed the clock calibration"
    );
    stamped();
}
