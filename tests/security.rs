//! Security properties: pins only root can reach, a clear refusal for non-root users,
//! out-of-window RST injection and INVALID packets dropped (proved by the counters and by
//! a capture on fw, the far side of the firewall), and a daemon that gives up every
//! capability once attached.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use session_tests::lifecycle::{STREAM_POLICY, STREAM_PORT};
use session_tests::raw::{PacketSocket, TcpSegment, flags};
use session_tests::{
    CLIENT_V4, FW_V4, Family, Lab, Side, delta, describe, find_session, read_exact_len, rule_hits,
    wait_for,
};

/// The project's default policy, as shipped.
const DEFAULT_POLICY: &str = include_str!("../config/default.toml");

fn assert_root_only(path: &Path, max_mode: u32) {
    let meta =
        std::fs::metadata(path).unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()));
    let mode = meta.permissions().mode() & 0o777;
    assert!(
        mode & !max_mode == 0,
        "{} has mode {mode:o}, more than {max_mode:o}",
        path.display()
    );
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        0,
        "{} is not owned by root",
        path.display()
    );
}

/// Every pin (maps and links) is mode 0600 or tighter and every directory 0700, all owned
/// by root, and so is the daemon's lock file.
#[test]
fn pins_and_lock_are_root_only() {
    let lab = Lab::new("modes");
    let _daemon = lab.daemon(STREAM_POLICY);
    let pin_dir = lab.pin_dir();
    assert_root_only(&pin_dir, 0o700);
    let mut pins = 0;
    for dir in [pin_dir.clone(), pin_dir.join("links")] {
        assert_root_only(&dir, 0o700);
        for entry in std::fs::read_dir(&dir).expect("read the pin directory") {
            let path = entry.expect("read a pin").path();
            if path.is_file() {
                assert_root_only(&path, 0o600);
                pins += 1;
            }
        }
    }
    assert!(
        pins >= 10,
        "only {pins} pins found under {}",
        pin_dir.display()
    );
    let lock_name = pin_dir
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect::<String>();
    let run_dir = Path::new("/run/session");
    assert_root_only(&run_dir.join(format!("{lock_name}.lock")), 0o600);
    assert_root_only(&run_dir.join(format!("{lock_name}.events")), 0o600);
}

/// A non-root user gets a clear "needs root" error from every command that touches the
/// firewall, and cannot change anything.
#[test]
fn non_root_cli_gets_a_clear_permission_error() {
    let lab = Lab::new("nonroot");
    let daemon = lab.daemon(STREAM_POLICY);
    let pin = lab.pin_dir();
    let pin = pin.to_string_lossy();
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ];
    for command in [
        vec!["stats"],
        vec!["list"],
        vec!["flush"],
        vec!["reload"],
        vec!["events"],
        vec!["down"],
    ] {
        let mut args = command.clone();
        args.extend_from_slice(&["--pin-dir", &pin]);
        let out = lab.session_as(&nobody, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command:?} as nobody succeeded");
        eprintln!("session {} as nobody: {stderr}", command[0]);
        assert!(
            stderr.contains("as root"),
            "`session {}` as nobody does not say it needs root: {}",
            command[0],
            describe(&out)
        );
    }
    let config = lab.config_path();
    let out = lab.session_as(
        &nobody,
        &[
            "run",
            "--config",
            &config.to_string_lossy(),
            "--iface",
            session_tests::FW_IFACE,
            "--pin-dir",
            &pin,
        ],
    );
    assert!(!out.status.success(), "run as nobody succeeded");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("as root"),
        "`session run` as nobody does not say it needs root: {}",
        describe(&out)
    );
    // Still running, untouched.
    assert!(pin_exists(&lab.pin_dir()));
    daemon.cli(&["stats"]);
}

fn pin_exists(pin_dir: &Path) -> bool {
    pin_dir.join("links").is_dir()
}

/// The next sequence numbers of the client and of fw, from the segments captured on the
/// client's link.
fn next_sequence_numbers(captured: &[TcpSegment], client: SocketAddr) -> (u32, u32) {
    let client_next = captured
        .iter()
        .rev()
        .find(|s| s.src == client)
        .map(TcpSegment::seq_end)
        .unwrap_or_else(|| panic!("no segment from {client} captured: {captured:?}"));
    let fw_next = captured
        .iter()
        .rev()
        .find(|s| s.dst == client)
        .map(TcpSegment::seq_end)
        .unwrap_or_else(|| panic!("no segment to {client} captured: {captured:?}"));
    (client_next, fw_next)
}

/// Segments from `from` with any of `bits` set, captured on fw's side of the link.
fn arrived(capture: &PacketSocket, from: SocketAddr, bits: u8) -> Vec<TcpSegment> {
    capture
        .tcp_segments(Duration::from_millis(300), Duration::from_secs(10))
        .into_iter()
        .filter(|s| s.src == from && s.flags & bits != 0)
        .collect()
}

/// Sends `data` both ways over the pair and checks it arrives.
fn round_trip(client: &mut std::net::TcpStream, server: &mut std::net::TcpStream) {
    use std::io::Write as _;
    client.write_all(b"ping").expect("client write");
    assert_eq!(read_exact_len(server, 4), b"ping");
    server.write_all(b"pong").expect("server write");
    assert_eq!(read_exact_len(client, 4), b"pong");
}

/// A RST with the client's addresses but a sequence number far outside the window,
/// injected into a live connection: dropped as INVALID before fw's stack sees it (the
/// capture on fw shows no RST), and the connection goes on.
#[test]
fn out_of_window_rst_injection_is_dropped_and_the_connection_survives() {
    let lab = Lab::new("rstinj");
    let daemon = lab.daemon(STREAM_POLICY);
    let client_link = lab.packet_socket(Side::Client);
    let (mut client, mut server) = lab.tcp_pair(Family::V4, STREAM_PORT);
    round_trip(&mut client, &mut server);
    let captured = client_link.tcp_segments(Duration::from_millis(300), Duration::from_secs(5));
    let client_addr = client.local_addr().expect("client address");
    let (client_next, fw_next) = next_sequence_numbers(&captured, client_addr);
    let fw_link = lab.packet_socket(Side::Fw);
    let before = daemon.stats_json();

    for offset in [0x4000_0000u32, 0xc000_0000] {
        let rst = TcpSegment {
            src: client_addr,
            dst: Family::V4.sock(Side::Fw, STREAM_PORT),
            seq: client_next.wrapping_add(offset),
            ack: fw_next,
            flags: flags::RST | flags::ACK,
            window: 0,
            payload: Vec::new(),
        };
        client_link.send(&rst.frame(lab.mac(Side::Client), lab.mac(Side::Fw)));
    }
    let after = daemon.stats_when("both RSTs counted invalid", |stats| {
        delta(&before, stats, "state_invalid") >= 2
    });
    assert_eq!(delta(&before, &after, "state_invalid"), 2);
    assert!(delta(&before, &after, "packets_dropped") >= 2);
    assert_eq!(
        rule_hits(&after, "invalid") - rule_hits(&before, "invalid"),
        2
    );
    let resets = arrived(&fw_link, client_addr, flags::RST);
    assert!(resets.is_empty(), "injected RSTs reached fw: {resets:?}");

    round_trip(&mut client, &mut server);
    let sessions = daemon.list_json();
    let session = find_session(&sessions, "tcp", CLIENT_V4, FW_V4, STREAM_PORT)
        .unwrap_or_else(|| panic!("the session is gone: {sessions:?}"));
    assert_eq!(session["state"], "ESTABLISHED", "{session}");
}

/// Under the shipped default policy, INVALID packets (a bare ACK with no connection, to
/// the SSH port the policy opens) are dropped by the "invalid" rule and never reach fw,
/// which would otherwise answer with a RST.
#[test]
fn invalid_packets_are_dropped_by_the_default_policy() {
    let lab = Lab::new("invalid");
    let daemon = lab.daemon(DEFAULT_POLICY);
    let client_link = lab.packet_socket(Side::Client);
    let fw_link = lab.packet_socket(Side::Fw);
    let _listener = lab.tcp_listen(Side::Fw, Family::V4, 22);
    let before = daemon.stats_json();
    let src: SocketAddr = format!("{CLIENT_V4}:40022").parse().expect("address");
    let ack = TcpSegment {
        src,
        dst: Family::V4.sock(Side::Fw, 22),
        seq: 0x1234_5678,
        ack: 0x0bad_cafe,
        flags: flags::ACK,
        window: 512,
        payload: Vec::new(),
    };
    client_link.send(&ack.frame(lab.mac(Side::Client), lab.mac(Side::Fw)));
    let after = daemon.stats_when("the ACK counted invalid", |stats| {
        delta(&before, stats, "state_invalid") >= 1
    });
    assert_eq!(delta(&before, &after, "state_invalid"), 1);
    assert_eq!(
        rule_hits(&after, "invalid") - rule_hits(&before, "invalid"),
        1
    );
    assert!(delta(&before, &after, "packets_dropped") >= 1);
    let reached = arrived(&fw_link, src, flags::ACK);
    assert!(
        reached.is_empty(),
        "the invalid ACK reached fw: {reached:?}"
    );
    let answered = client_link
        .tcp_segments(Duration::from_millis(300), Duration::from_secs(5))
        .into_iter()
        .filter(|s| s.dst == src && s.flags & flags::RST != 0)
        .count();
    assert_eq!(answered, 0, "fw answered the invalid ACK, so it saw it");
}

/// One `Cap*:` line of a /proc status file, as a mask.
fn capability_line(status: &str, name: &str) -> u64 {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in:\n{status}"));
    u64::from_str_radix(line.trim(), 16).unwrap_or_else(|e| panic!("{name} {line:?}: {e}"))
}

/// The capability mask the daemon keeps in its effective, permitted and bounding sets:
/// none, but CAP_BPF (39) before Linux 6.5 while `kernel.unprivileged_bpf_disabled` is
/// set, where every `bpf()` command needs it.
fn kept_capabilities() -> u64 {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    let disabled = std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
        .map(|text| text.trim() != "0")
        .unwrap_or(true);
    if version < (6, 5) && disabled {
        1 << 39
    } else {
        0
    }
}

/// Once attached, no thread of the daemon holds any capability (effective, permitted,
/// inheritable, bounding and ambient sets are empty, no new privileges; before Linux 6.5
/// CAP_BPF alone, see [`kept_capabilities`]), and the daemon still does its remaining
/// work: reloading and reaping. (Interface removal with no capability is covered in
/// faults.rs.)
#[test]
fn daemon_keeps_no_capability_after_attaching() {
    let kept = kept_capabilities();
    let lab = Lab::new("caps");
    let daemon = lab.daemon(STREAM_POLICY);
    let tasks = format!("/proc/{}/task", daemon.pid());
    let mut threads = 0;
    for task in std::fs::read_dir(&tasks).unwrap_or_else(|e| panic!("{tasks}: {e}")) {
        let status_path = task.expect("task entry").path().join("status");
        let status = std::fs::read_to_string(&status_path)
            .unwrap_or_else(|e| panic!("{}: {e}", status_path.display()));
        for (name, expected) in [
            ("CapEff", kept),
            ("CapPrm", kept),
            ("CapBnd", kept),
            ("CapInh", 0),
            ("CapAmb", 0),
        ] {
            let mask = capability_line(&status, name);
            assert_eq!(
                mask,
                expected,
                "{name} of {} is {mask:016x}",
                status_path.display()
            );
        }
        assert!(
            status
                .lines()
                .any(|l| l.split_whitespace().eq(["NoNewPrivs:", "1"])),
            "no_new_privs not set:\n{status}"
        );
        threads += 1;
    }
    assert!(threads >= 1);

    let before = daemon.stats_json();
    daemon.signal(libc::SIGHUP);
    daemon.stats_when("a reload with no capability", |stats| {
        delta(&before, stats, "policy_applies") == 1
    });
    wait_for(
        "the reaper to run with no capability",
        Duration::from_secs(12),
        || (delta(&before, &daemon.stats_json(), "reaper_runs") >= 1).then_some(()),
    );
    let log = daemon.log();
    assert!(
        !log.contains("ERROR") && !log.contains("reaper:"),
        "the daemon failed at work after dropping capabilities:\n{log}"
    );
}
