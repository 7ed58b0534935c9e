//! The kernel programs' own log (`[logging] kernel_level`): at `debug` a packet the parser
//! refuses reaches the daemon's log as a record of the kernel program, with the interface
//! it came by; at the default level (`warn`) the same packet logs nothing, because the
//! verifier removed that log site. Both count the packet as `invalid_malformed`.

use std::time::Duration;

use session_tests::{Lab, Side, WEB_POLICY, counter, wait_for};

/// What the kernel's record of a refused packet says (session-ebpf/src/diagnostics.rs).
const RECORD: &str = "malformed packet (headers truncated or inconsistent)";

/// An IPv4 packet from the client to fw that claims 20 bytes of TCP header but carries 4
/// (a frame shorter than Ethernet's minimum, which a packet socket sends as it is).
fn truncated_tcp(lab: &Lab) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&lab.mac(Side::Fw));
    frame.extend_from_slice(&lab.mac(Side::Client));
    frame.extend_from_slice(&[0x08, 0x00]);
    let mut ip = [
        0x45, 0, 0, 24, 0, 1, 0x40, 0, 64, 6, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2,
    ];
    let sum = ip
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], pair[1]])))
        .sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !((folded & 0xffff) + (folded >> 16)) as u16;
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&[0x9c, 0x40, 0x1f, 0x90]);
    frame
}

/// Sends truncated packets until the daemon has counted `want` more malformed packets;
/// returns the daemon's log by then.
fn send_malformed(lab: &Lab, daemon: &session_tests::Daemon<'_>, want: u64) -> String {
    let socket = lab.packet_socket(Side::Client);
    let frame = truncated_tcp(lab);
    let before = counter(&daemon.stats_json(), "invalid_malformed");
    wait_for(
        "the daemon to count the malformed packets",
        Duration::from_secs(15),
        || {
            socket.send(&frame);
            std::thread::sleep(Duration::from_millis(100));
            (counter(&daemon.stats_json(), "invalid_malformed") >= before + want).then_some(())
        },
    );
    // The daemon drains the kernel's log ring when it is woken: give it a moment.
    std::thread::sleep(Duration::from_millis(500));
    daemon.stderr()
}

#[test]
fn at_debug_a_refused_packet_is_logged_by_the_kernel_program() {
    let lab = Lab::new("kld");
    let daemon = lab.daemon(&format!(
        "[logging]\nkernel_level = \"debug\"\n{WEB_POLICY}"
    ));
    let socket = lab.packet_socket(Side::Client);
    let frame = truncated_tcp(&lab);
    let log = wait_for(
        "the kernel's record of a refused packet in the daemon's log",
        Duration::from_secs(15),
        || {
            socket.send(&frame);
            std::thread::sleep(Duration::from_millis(200));
            let log = daemon.stderr();
            log.contains(RECORD).then_some(log)
        },
    );
    let line = log
        .lines()
        .find(|line| line.contains(RECORD))
        .expect("found above");
    assert!(
        line.contains("DEBUG")
            && line.contains("session_kernel")
            && line.contains("ingress ifindex"),
        "the record must be a debug record of the kernel program naming hook and interface: {line}"
    );
    assert!(
        counter(&daemon.stats_json(), "invalid_malformed") > 0,
        "the refused packets must be counted as well"
    );
}

#[test]
fn at_the_default_level_a_refused_packet_is_counted_but_not_logged() {
    let lab = Lab::new("klw");
    let daemon = lab.daemon(WEB_POLICY);
    let log = send_malformed(&lab, &daemon, 3);
    assert!(
        !log.contains(RECORD) && !log.contains("session_kernel"),
        "at kernel_level warn the programs must not log refused packets; the daemon logged:\n{log}"
    );
}
