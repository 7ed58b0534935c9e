//! Faults around the daemon: killed during a reload, a protected interface removed while
//! it runs, a pin directory that is not on bpffs or cannot be written, its config file
//! deleted, and two daemons started at once. In each case the firewall must keep
//! enforcing (or refuse to start cleanly, leaving nothing behind) and say what happened.

use std::time::Duration;

use session_tests::lifecycle::{CLOSED_PORT, PROGRESS, PinGuard, STREAM_POLICY, STREAM_PORT};
use session_tests::{FW_IFACE, Family, Lab, Side, counter, describe, wait_for};

/// A second veth pair inside fw, protected along with fw's lab interface.
const EXTRA_IFACE: &str = "sess-extra";

fn assert_nothing_attached(lab: &Lab) {
    let link = lab.ok(Side::Fw, 5, &["ip", "link", "show", "dev", FW_IFACE]);
    assert!(!link.contains("xdp"), "XDP left attached: {link}");
}

/// SIGHUP immediately followed by SIGKILL, so the daemon dies while it applies a policy;
/// the stream never stops, and a restarted daemon enforces a complete policy.
#[test]
fn sigkill_during_a_reload_then_restart_keeps_the_stream() {
    let lab = Lab::new("killrel");
    let mut first = lab.daemon(STREAM_POLICY);
    let stream = lab.live_stream(Family::V4, STREAM_PORT);
    stream.assert_flowing(PROGRESS, "before the reload");
    let applies = counter(&first.stats_json(), "policy_applies");
    first.signal(libc::SIGHUP);
    first.signal(libc::SIGKILL);
    first.wait_exit(Duration::from_secs(10));
    stream.assert_flowing(PROGRESS, "after the daemon died mid-reload");
    lab.assert_new_tcp_blocked(CLOSED_PORT, "after the daemon died mid-reload");

    let second = lab.restart_daemon();
    assert!(
        counter(&second.stats_json(), "policy_applies") > applies,
        "the restart applied no policy"
    );
    stream.assert_flowing(PROGRESS, "after the restart");
    lab.assert_new_tcp_blocked(CLOSED_PORT, "after the restart");
    stream.finish();
}

/// One of two protected interfaces is deleted: the daemon logs it, removes its pins and
/// goes on enforcing on the other.
#[test]
fn interface_removed_while_running_is_logged_and_the_others_stay_protected() {
    let lab = Lab::new("ifgone");
    add_extra_iface(&lab);
    let policy = format!("interfaces = [\"{EXTRA_IFACE}\"]\n{STREAM_POLICY}");
    let mut daemon = lab.daemon(&policy);
    let links = lab.pin_dir().join("links");
    assert!(links.join(format!("{EXTRA_IFACE}-xdp")).exists());
    let stream = lab.live_stream(Family::V4, STREAM_PORT);
    stream.assert_flowing(PROGRESS, "before the removal");

    lab.ok(Side::Fw, 5, &["ip", "link", "del", EXTRA_IFACE]);
    daemon.wait_log(
        &format!("{EXTRA_IFACE}: interface removed; still enforcing on [{FW_IFACE}]"),
        Duration::from_secs(15),
    );
    daemon.assert_running();
    for hook in ["xdp", "tc"] {
        let pin = links.join(format!("{EXTRA_IFACE}-{hook}"));
        assert!(!pin.exists(), "{} is still pinned", pin.display());
    }
    assert!(links.join(format!("{FW_IFACE}-xdp")).exists());
    stream.assert_flowing(PROGRESS, "after the removal");
    lab.assert_new_tcp_blocked(CLOSED_PORT, "after the removal");
    stream.finish();
}

/// Creates [`EXTRA_IFACE`] (a veth pair inside fw) and brings it up.
fn add_extra_iface(lab: &Lab) {
    let peer = format!("{EXTRA_IFACE}-p");
    let argv = [
        "ip",
        "link",
        "add",
        EXTRA_IFACE,
        "type",
        "veth",
        "peer",
        "name",
        &peer,
    ];
    lab.ok(Side::Fw, 5, &argv);
    lab.ok(Side::Fw, 5, &["ip", "link", "set", EXTRA_IFACE, "up"]);
}

/// Interfaces change while no daemon runs: one is deleted and created again (its pinned
/// links are dead), then it leaves the config. The restarted daemon replaces the dead
/// links with new ones, and later detaches the interface it no longer protects, while
/// the lab interface keeps its adopted links throughout.
#[test]
fn restart_replaces_dead_links_and_detaches_unconfigured_interfaces() {
    let lab = Lab::new("ifchg");
    add_extra_iface(&lab);
    let with_extra = format!("interfaces = [\"{EXTRA_IFACE}\"]\n{STREAM_POLICY}");
    let mut first = lab.daemon(&with_extra);
    first.signal(libc::SIGTERM);
    first.wait_exit(Duration::from_secs(10));

    lab.ok(Side::Fw, 5, &["ip", "link", "del", EXTRA_IFACE]);
    add_extra_iface(&lab);
    let mut second = lab.restart_daemon();
    let log = second.log();
    assert!(
        log.contains(&format!("{EXTRA_IFACE}: the pinned link"))
            && log.contains("attaching afresh"),
        "the dead links were not replaced:\n{log}"
    );
    assert!(
        log.contains(&format!(
            "{FW_IFACE}: attached (XDP ingress: adopted pinned link"
        )),
        "the lab interface's links were not adopted:\n{log}"
    );
    let extra = lab.ok(Side::Fw, 5, &["ip", "link", "show", "dev", EXTRA_IFACE]);
    assert!(
        extra.contains("xdp"),
        "the re-created interface is unprotected: {extra}"
    );
    second.signal(libc::SIGTERM);
    second.wait_exit(Duration::from_secs(10));

    std::fs::write(lab.config_path(), STREAM_POLICY).expect("write the config");
    let third = lab.restart_daemon();
    assert!(
        third
            .log()
            .contains(&format!("{EXTRA_IFACE}: no longer configured, detached")),
        "{}",
        third.log()
    );
    let links = lab.pin_dir().join("links");
    assert!(!links.join(format!("{EXTRA_IFACE}-xdp")).exists());
    let extra = lab.ok(Side::Fw, 5, &["ip", "link", "show", "dev", EXTRA_IFACE]);
    assert!(
        !extra.contains("xdp"),
        "XDP left on the dropped interface: {extra}"
    );
    lab.assert_new_tcp_blocked(CLOSED_PORT, "after the interface changes");
}

/// The second of two interfaces cannot be attached (something that is not a link sits
/// where its pin goes): the daemon refuses, names the path, and detaches the first
/// interface it had just attached, so no half-configured firewall is left.
#[test]
fn a_failed_start_detaches_what_it_attached() {
    let lab = Lab::new("halfway");
    add_extra_iface(&lab);
    let policy = format!("interfaces = [\"{FW_IFACE}\", \"{EXTRA_IFACE}\"]\n{STREAM_POLICY}");
    std::fs::write(lab.config_path(), policy).expect("write the config");
    let _pins = PinGuard::new(lab.pin_dir());
    let blocker = lab
        .pin_dir()
        .join("links")
        .join(format!("{EXTRA_IFACE}-xdp"));
    std::fs::create_dir_all(&blocker).expect("create the blocking directory");

    let mut daemon = lab.daemon_process(&[], &lab.pin_dir());
    let status = daemon.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "the daemon started");
    let stderr = daemon.stderr();
    assert!(
        stderr.contains(&blocker.display().to_string()),
        "the error does not name {}: {stderr}",
        blocker.display()
    );
    assert!(
        !lab.pin_dir()
            .join("links")
            .join(format!("{FW_IFACE}-xdp"))
            .exists(),
        "the first interface's link is still pinned"
    );
    assert_nothing_attached(&lab);
}

/// A pin directory outside bpffs is refused before anything is attached.
#[test]
fn pin_dir_not_on_bpffs_is_refused_clearly() {
    let lab = Lab::new("nobpffs");
    std::fs::write(lab.config_path(), STREAM_POLICY).expect("write the config");
    let pin_dir = lab.scratch_path("pins");
    let mut daemon = lab.daemon_process(&[FW_IFACE], &pin_dir);
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert!(
        !status.success(),
        "the daemon started on a non-bpf pin directory"
    );
    let stderr = daemon.stderr();
    assert!(
        stderr.contains("is not on a BPF filesystem") && stderr.contains("mount -t bpf"),
        "unclear refusal: {stderr}"
    );
    assert!(!pin_dir.exists(), "{} was created", pin_dir.display());
    assert_nothing_attached(&lab);
}

/// Pinning fails (here: the bpffs is mounted read-only, as a full one fails too): the
/// daemon names the path and the cause, and leaves nothing attached or pinned.
#[test]
fn pinning_failure_is_reported_and_leaves_nothing_behind() {
    let lab = Lab::new("ropin");
    std::fs::write(lab.config_path(), STREAM_POLICY).expect("write the config");
    let mount = lab.scratch_path("robpf");
    std::fs::create_dir(&mount).expect("create the mount point");
    let pin_dir = mount.join("session");
    // A mount namespace of its own, so the read-only bpffs disappears with the process.
    let bin = std::env::var("SESSION_BIN")
        .unwrap_or_else(|_| format!("{}/../target/debug/session", env!("CARGO_MANIFEST_DIR")));
    let script = format!(
        "mount -t bpf -o ro bpf {} && exec {bin} run --config {} --iface {FW_IFACE} --pin-dir {}",
        mount.display(),
        lab.config_path().display(),
        pin_dir.display()
    );
    let out = lab.run(Side::Fw, 20, &["unshare", "--mount", "sh", "-c", &script]);
    assert!(
        !out.status.success(),
        "the daemon started: {}",
        describe(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&pin_dir.display().to_string()) && stderr.contains("Read-only"),
        "the error does not name the pin path and the cause: {}",
        describe(&out)
    );
    assert_nothing_attached(&lab);
}

/// The config file is deleted while the daemon runs: it keeps enforcing, and a reload
/// reports the missing file and changes nothing.
#[test]
fn config_deleted_while_running_keeps_enforcing_and_reload_reports_it() {
    let lab = Lab::new("nocfg");
    let mut daemon = lab.daemon(STREAM_POLICY);
    let stream = lab.live_stream(Family::V4, STREAM_PORT);
    let applies = counter(&daemon.stats_json(), "policy_applies");
    std::fs::remove_file(lab.config_path()).expect("delete the config");

    let out = daemon.cli_output(&["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "reload succeeded: {}",
        describe(&out)
    );
    assert!(
        stderr.contains(&lab.config_path().display().to_string())
            && stderr.contains("No such file"),
        "the error does not name the missing file: {stderr}"
    );
    daemon.signal(libc::SIGHUP);
    daemon.wait_log("reload refused", Duration::from_secs(5));
    daemon.assert_running();
    assert_eq!(counter(&daemon.stats_json(), "policy_applies"), applies);
    stream.assert_flowing(PROGRESS, "after the config was deleted");
    lab.assert_new_tcp_blocked(CLOSED_PORT, "after the config was deleted");
    stream.finish();
}

/// Two daemons started at the same moment on one pin directory: one runs, the other
/// refuses and names the first's pid.
#[test]
fn two_daemons_at_once_the_second_refuses_naming_the_first() {
    let lab = Lab::new("twice");
    std::fs::write(lab.config_path(), STREAM_POLICY).expect("write the config");
    let _pins = PinGuard::new(lab.pin_dir());
    let pin_dir = lab.pin_dir();
    let mut a = lab.daemon_process(&[FW_IFACE], &pin_dir);
    let mut b = lab.daemon_process(&[FW_IFACE], &pin_dir);
    let a_refused = wait_for("one daemon to refuse", Duration::from_secs(30), || {
        if a.exited().is_some() {
            Some(true)
        } else if b.exited().is_some() {
            Some(false)
        } else {
            None
        }
    });
    let (winner, loser) = if a_refused { (b, a) } else { (a, b) };
    let mut loser = loser;
    let mut winner = winner;
    let status = loser.wait_exit(Duration::from_secs(1));
    assert!(!status.success(), "the second daemon exited 0");
    winner
        .wait_stdout("session: ready", Duration::from_secs(30))
        .unwrap_or_else(|why| panic!("the first daemon is not ready: {why}"));
    let stderr = loser.stderr();
    assert!(
        stderr.contains("another session daemon already runs")
            && stderr.contains(&format!("pid {}", winner.pid())),
        "the refusal does not name the running daemon (pid {}): {stderr}",
        winner.pid()
    );
}
