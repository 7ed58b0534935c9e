//! A spoofed SYN flood against an open port of fw while a real client connects, under a
//! given `[syn_defence]`: what `tests/syn_defence.rs` checks and the `synflood` benchmark
//! measures. The flood comes from the [`crate::attacker`] namespace at the load
//! generator's top rate, from 65,536 sources in 198.19.0.0/16 (which fw has no route
//! back to, so the host's stack drops them once the firewall lets them through).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use session_testkit::{
    accept_new_rule, inbound_drop_policy, invalid_drop_rule, return_traffic_rule,
    untracked_accept_rule,
};

use crate::attacker::{ATTACKER_IFACE, Attacker};
use crate::loadgen::{self, Blast};
use crate::{Daemon, Family, IO_TIMEOUT, Lab, Side, accept_within};

/// The open port the flood and the client aim at.
pub const PORT: u16 = 8080;

/// `[syn_defence]` defending [`PORT`] always.
pub const ALWAYS: &str = "[syn_defence]\nports = [8080]\n";

/// A host policy opening [`PORT`], on both of fw's links (the lab's and the attacker's),
/// with `defence` (a TOML `[syn_defence]` table, or nothing).
pub fn policy(defence: &str) -> String {
    format!(
        concat!(
            "interfaces = [\"veth-fw2\"]\n",
            "{defence}\n",
            inbound_drop_policy!(),
            return_traffic_rule!("established"),
            invalid_drop_rule!(),
            untracked_accept_rule!("nd"),
            accept_new_rule!("web", "tcp", 8080),
        ),
        defence = defence
    )
}

/// One connection to `listener` that exchanges a request and an answer; `server_first`
/// makes the server speak first, as an SSH or SMTP server does. Returns both ends, open.
pub fn exchange(
    lab: &Lab,
    listener: &TcpListener,
    server_first: bool,
) -> Result<(TcpStream, TcpStream), String> {
    let to = listener
        .local_addr()
        .map_err(|e| format!("listener: {e}"))?;
    let mut client = lab
        .tcp_connect(Side::Client, to, Duration::from_secs(3))
        .map_err(|e| format!("connect: {e}"))?;
    let mut server = accept_within(listener, IO_TIMEOUT);
    let mut got = [0u8; 5];
    if server_first {
        server
            .write_all(b"hello")
            .map_err(|e| format!("banner: {e}"))?;
        client
            .read_exact(&mut got)
            .map_err(|e| format!("client reads the banner: {e}"))?;
    }
    client
        .write_all(b"query")
        .map_err(|e| format!("query: {e}"))?;
    server
        .read_exact(&mut got)
        .map_err(|e| format!("server reads the query: {e}"))?;
    server
        .write_all(b"reply")
        .map_err(|e| format!("reply: {e}"))?;
    client
        .read_exact(&mut got)
        .map_err(|e| format!("client reads the reply: {e}"))?;
    Ok((client, server))
}

/// What one flood run measured.
#[derive(Clone, Debug)]
pub struct FloodRun {
    /// Connection attempts that exchanged their bytes.
    pub succeeded: usize,
    /// Attempts made.
    pub attempts: usize,
    /// How long each successful attempt took, connect to the last byte, in µs.
    pub exchange_us: Vec<f64>,
    /// Flood packets sent.
    pub sent: u64,
    /// Their rate.
    pub pps: f64,
    /// Most sessions from the flood's spoofed sources seen in the table.
    pub flood_sessions: usize,
}

/// Only one flood at a time: two would share the machine's CPUs and each measure less.
static ONE_FLOOD_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Floods fw's [`PORT`] with spoofed SYNs from the attacker's link, for at most 8 s and
/// 4 million packets, while the client makes `attempts` real connections (alternately
/// client and server speaking first), under `defence`.
pub fn flood_run(tag: &str, defence: &str, attempts: usize) -> FloodRun {
    let _alone = ONE_FLOOD_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let lab = Lab::new(tag);
    let attacker = Attacker::new(&lab);
    let daemon = lab.daemon(&policy(defence));
    let listener = lab.tcp_listen(Side::Fw, Family::V4, PORT);
    let blast = Blast {
        netns: attacker.ns().to_string(),
        iface: ATTACKER_IFACE.to_string(),
        frames: loadgen::syn_frames(
            attacker.mac(),
            attacker.fw_mac(),
            Family::V4.ip(Side::Fw),
            &[PORT],
            loadgen::MAX_SOURCES,
        ),
        threads: 2,
        max_packets: 4_000_000,
        max_duration: Duration::from_secs(8),
        rate_pps: None,
    };
    thread::scope(|scope| {
        let flood = scope.spawn(|| loadgen::blast(&blast));
        // Let the flood reach its rate before the real client starts.
        thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let mut run = FloodRun {
            succeeded: 0,
            attempts: 0,
            exchange_us: Vec::new(),
            sent: 0,
            pps: 0.0,
            flood_sessions: 0,
        };
        while run.attempts < attempts && started.elapsed() < Duration::from_secs(60) {
            run.attempts += 1;
            let began = Instant::now();
            if exchange(&lab, &listener, run.attempts.is_multiple_of(2)).is_ok() {
                run.succeeded += 1;
                run.exchange_us.push(began.elapsed().as_secs_f64() * 1e6);
            }
            if run.attempts.is_multiple_of(50) {
                run.flood_sessions = run.flood_sessions.max(spoofed_sessions(&daemon));
            }
        }
        run.flood_sessions = run.flood_sessions.max(spoofed_sessions(&daemon));
        let sent = flood
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            .unwrap_or_else(|e| panic!("the flood failed: {e}"));
        run.sent = sent.packets;
        run.pps = sent.pps();
        run
    })
}

/// Sessions in the table from the flood's spoofed range (198.19.0.0/16).
fn spoofed_sessions(daemon: &Daemon<'_>) -> usize {
    daemon
        .list_json()
        .iter()
        .filter(|s: &&Value| {
            s["src"]
                .as_str()
                .is_some_and(|src| src.starts_with("198.19."))
        })
        .count()
}
