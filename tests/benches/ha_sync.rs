//! State sync benchmark, run by `cargo xtask bench --only ha` (root, release `session`
//! binary in `SESSION_BIN`): the HA lab of tests/ha.rs (two firewalls, keepalived, the
//! shipped examples), measuring
//!
//! - sync lag: from a UDP flow's first reply on the client (the session exists on the
//!   active) to its presence in the standby's kernel table, read from the standby's
//!   pinned maps every 0.5 ms; median and p99 over 500 flows opened 5 ms apart;
//! - sessions replicated per second: 20,000 sessions stored in the active's table at once,
//!   until the standby holds them all;
//! - the active daemon's CPU (user + system, from /proc) while 10,000 new sessions a
//!   second arrive for 5 s, against the same 5 s without new sessions;
//! - the failover gap the TCP stream sees (longest time without data at the receiver)
//!   when the active's links are cut, next to keepalived's detection (until the standby
//!   holds the virtual addresses).
//!
//! The comparison with nftables + conntrackd (FTFW) in the same lab is not written yet.
//! Writes `$SESSION_BENCH_DIR/ha.json` and `ha.md` (default: target/bench).

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::Ipv4Addr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, sleep},
    time::{Duration, Instant},
};

use serde_json::json;
use session_common::wire::{FAMILY_IPV4, FlowKey, Session, proto, session_flags};
use session_tests::{
    ha::{CLIENT, Fw, HaLab, SERVER},
    wait_for,
};
use session_user::bpf::{clock::monotonic_ns, pinned::PinnedMaps};

const ECHO_PORT: u16 = 6001;

fn mapped(addr: Ipv4Addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[10] = 0xff;
    out[11] = 0xff;
    out[12..].copy_from_slice(&addr.octets());
    out
}

/// The key of a UDP flow from `client`:`port` to the server's echo port.
fn udp_key(client: Ipv4Addr, port: u16) -> FlowKey {
    FlowKey {
        addr_lo: mapped(client),
        addr_hi: mapped(SERVER.parse().expect("server address")),
        port_lo: port,
        port_hi: ECHO_PORT,
        proto: proto::UDP,
        family: FAMILY_IPV4,
        _pad: [0; 2],
    }
}

/// A replied UDP session opened on lan0 (`ifindex`) now.
fn synthetic(ifindex: u32) -> Session {
    let now = monotonic_ns();
    Session {
        created_ns: now,
        expires_ns: now + 120_000_000_000,
        state: 1,
        flags: session_flags::ORIG_IS_LO
            | session_flags::SEEN_REPLY
            | session_flags::ASSURED
            | session_flags::PROTECTED,
        origin_ifindex: ifindex.to_ne_bytes(),
        ..Session::default()
    }
}

/// `count` synthetic sessions from client addresses 198.18.1.100 on, numbered from `first`.
fn synthetic_batch(first: u32, count: u32, ifindex: u32) -> Vec<(FlowKey, Session)> {
    (first..first + count)
        .map(|i| {
            let client = Ipv4Addr::new(198, 18, 1, 100 + (i / 60_000) as u8);
            (
                udp_key(client, 1024 + (i % 60_000) as u16),
                synthetic(ifindex),
            )
        })
        .collect()
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let fields: Vec<&str> = stat
        .rsplit(") ")
        .next()
        .expect("stat")
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a constant of the system.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn active_standby() -> HaLab {
    let mut lab = HaLab::new("bench");
    lab.start_session(Fw::One);
    lab.start_session(Fw::Two);
    lab.start_keepalived(Fw::One);
    lab.wait_master(Fw::One, Duration::from_secs(10));
    lab.start_keepalived(Fw::Two);
    for fw in [Fw::One, Fw::Two] {
        wait_for("the sync peer to be up", Duration::from_secs(10), || {
            (lab.sync_status(fw)["peer"] == "up").then_some(())
        });
    }
    lab
}

/// Lag from a flow's first echo to its presence on the standby, in ms, per flow.
fn sync_lag(lab: &HaLab, flows: u16) -> Vec<f64> {
    let echo = lab.udp("s", SERVER, ECHO_PORT);
    echo.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let echoer = thread::spawn(move || {
        let mut buf = [0u8; 16];
        let deadline = Instant::now() + Duration::from_secs(60);
        while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
            if let Ok((len, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..len], from);
            }
        }
    });
    let standby = PinnedMaps::open(&lab.pin_dir(Fw::Two)).expect("standby maps");
    let (tx, rx) = std::sync::mpsc::channel::<(FlowKey, Instant)>();
    let flag = Arc::clone(&stop);
    let poller = thread::spawn(move || {
        let mut pending: HashMap<FlowKey, Instant> = HashMap::new();
        let mut lags = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && !(flag.load(Ordering::Relaxed) && pending.is_empty()) {
            while let Ok((key, at)) = rx.try_recv() {
                pending.insert(key, at);
            }
            pending.retain(|key, at| match standby.session(key) {
                Ok(Some(_)) => {
                    lags.push(at.elapsed().as_secs_f64() * 1e3);
                    false
                }
                _ => true,
            });
            sleep(Duration::from_micros(500));
        }
        lags
    });
    let client: Ipv4Addr = CLIENT.parse().expect("client");
    for port in 30_000..30_000 + flows {
        let socket = lab.udp("c", CLIENT, port);
        socket.connect((SERVER, ECHO_PORT)).expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let mut buf = [0u8; 2];
        if socket.send(&port.to_le_bytes()).is_ok() && socket.recv(&mut buf).is_ok() {
            tx.send((udp_key(client, port), Instant::now()))
                .expect("poller");
        }
        sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    let mut lags = poller.join().expect("poller");
    echoer.join().expect("echo");
    lags.sort_by(f64::total_cmp);
    lags
}

/// Sessions a second the standby installs when `count` appear on the active at once.
fn replication_rate(lab: &HaLab, count: u32, ifindex: u32) -> f64 {
    let active = PinnedMaps::open(&lab.pin_dir(Fw::One)).expect("active maps");
    let standby = PinnedMaps::open(&lab.pin_dir(Fw::Two)).expect("standby maps");
    let batch = synthetic_batch(0, count, ifindex);
    let started = Instant::now();
    active.insert_sessions(&batch).expect("insert");
    let (last, _) = batch.last().expect("a batch");
    let (first, _) = batch.first().expect("a batch");
    wait_for(
        "the standby to hold the batch",
        Duration::from_secs(60),
        || {
            (standby.session(first).ok().flatten().is_some()
                && standby.session(last).ok().flatten().is_some()
                && standby.snapshot_sessions().ok()?.len() >= count as usize)
                .then_some(())
        },
    );
    count as f64 / started.elapsed().as_secs_f64()
}

/// The active daemon's CPU share (1.0 = one CPU) over `secs` with `rate` new sessions a
/// second stored in batches every 100 ms, from session number `first`.
fn active_cpu(lab: &HaLab, rate: u32, secs: u32, first: u32, ifindex: u32) -> f64 {
    let active = PinnedMaps::open(&lab.pin_dir(Fw::One)).expect("active maps");
    let pid = lab.session_pid(Fw::One);
    let before = cpu_ticks(pid);
    let started = Instant::now();
    let per_batch = rate / 10;
    for step in 0..secs * 10 {
        if per_batch > 0 {
            active
                .insert_sessions(&synthetic_batch(
                    first + step * per_batch,
                    per_batch,
                    ifindex,
                ))
                .expect("insert");
        }
        let next = Duration::from_millis(100 * (u64::from(step) + 1));
        sleep(next.saturating_sub(started.elapsed()));
    }
    (cpu_ticks(pid) - before) as f64 / ticks_per_second() / started.elapsed().as_secs_f64()
}

/// Cuts the active's links under a TCP stream: (longest gap the receiver saw, time until
/// the standby held the addresses), in ms, and whether every byte arrived.
fn failover_gap(lab: &HaLab) -> (f64, f64, bool) {
    let listener = lab.server_listen(5009);
    let mut client = lab.client_connect(5009);
    let (mut server, _) = listener.accept().expect("accept");
    server
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let sender = thread::spawn(move || {
        let chunk = [7u8; 1024];
        let mut sent = 0u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
            if client.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len() as u64;
            sleep(Duration::from_millis(1));
        }
        let _ = client.shutdown(std::net::Shutdown::Write);
        sent
    });
    let receiver = thread::spawn(move || {
        let mut buf = [0u8; 65536];
        let mut got = 0u64;
        let mut last = Instant::now();
        let mut gap = Duration::ZERO;
        while let Ok(len) = server.read(&mut buf) {
            if len == 0 {
                break;
            }
            gap = gap.max(last.elapsed());
            last = Instant::now();
            got += len as u64;
        }
        (got, gap)
    });
    sleep(Duration::from_secs(2));
    let cut = Instant::now();
    lab.cut_links(Fw::One);
    lab.wait_master(Fw::Two, Duration::from_secs(10));
    let detection = cut.elapsed();
    sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("sender");
    let (got, gap) = receiver.join().expect("receiver");
    (
        gap.as_secs_f64() * 1e3,
        detection.as_secs_f64() * 1e3,
        got == sent,
    )
}

fn main() {
    let out_dir = std::env::var_os("SESSION_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench")));
    std::fs::create_dir_all(&out_dir).expect("bench dir");
    let lab = active_standby();
    let ifindex = lab.ifindex(Fw::One, "lan0");
    let lags = sync_lag(&lab, 500);
    let rate = replication_rate(&lab, 20_000, ifindex);
    sleep(Duration::from_secs(2));
    let idle = active_cpu(&lab, 0, 5, 0, ifindex);
    let busy = active_cpu(&lab, 10_000, 5, 100_000, ifindex);
    let (gap, detection, intact) = failover_gap(&lab);
    let result = json!({
        "sync_lag_ms": { "median": percentile(&lags, 0.5), "p99": percentile(&lags, 0.99), "flows": lags.len() },
        "replicated_per_second": rate,
        "active_cpu_share": { "idle": idle, "at_10000_new_per_second": busy, "extra": busy - idle },
        "failover": { "tcp_gap_ms": gap, "keepalived_detection_ms": detection, "every_byte": intact },
    });
    let mut md = String::new();
    writeln!(
        md,
        "### State sync (session; conntrackd comparison not yet measured)\n"
    )
    .expect("fmt");
    writeln!(md, "| measure | session |\n| --- | --- |").expect("fmt");
    writeln!(md, "| sync lag, creation to presence on the standby, median / p99 | {:.1} / {:.1} ms ({} flows) |", percentile(&lags, 0.5), percentile(&lags, 0.99), lags.len()).expect("fmt");
    writeln!(
        md,
        "| sessions replicated per second (20,000 at once) | {rate:.0} |"
    )
    .expect("fmt");
    writeln!(md, "| active daemon CPU at 10,000 new sessions/s, extra over idle | {:.1} % of a CPU (idle {:.1} %) |", (busy - idle) * 100.0, idle * 100.0).expect("fmt");
    writeln!(md, "| failover (links cut): longest gap in the TCP stream / keepalived's detection | {gap:.0} / {detection:.0} ms, every byte arrived: {intact} |").expect("fmt");
    print!("{md}");
    std::fs::write(out_dir.join("ha.md"), &md).expect("write ha.md");
    std::fs::write(
        out_dir.join("ha.json"),
        serde_json::to_string_pretty(&result).expect("json"),
    )
    .expect("write ha.json");
}
