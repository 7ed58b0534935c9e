//! State sync benchmark, run by `cargo xtask bench --only ha` (root, release `session`
//! binary in `SESSION_BIN`): the HA lab of tests/ha.rs (two firewalls, keepalived),
//! once with session (the shipped examples) and once with nftables + Debian's conntrackd
//! in FTFW mode over UDP on the same sync link, storing received entries in the kernel at
//! once (`DisableExternalCache`, as session does), measuring
//!
//! - sync lag: from a UDP flow's first reply on the client (the session exists on the
//!   active) to its presence on the standby (session: its pinned maps read every 0.5 ms;
//!   conntrack: `conntrack -E` on the standby); median and p99 over 500 flows 5 ms apart;
//! - sessions replicated per second: a burst of 20,000 new UDP flows (hping3, one source
//!   port each), from its start until the standby holds them all, both tables polled
//!   while hping3 runs (it lingers a second or two after its last packet, which must not
//!   count); next to it, when the active held them all (the pace of the burst itself,
//!   which bounds the figure and varies run to run);
//! - the sync daemon's CPU on the active (user + system, from /proc) while new flows
//!   arrive at about 10,000 a second for 5 s, over the same time without them,
//!   per 10,000 new sessions/s (the kernel's own conntrack work is not in it);
//! - the failover gap a TCP stream sees (longest time without data at the receiver)
//!   when the active's links are cut, next to keepalived's detection (until the standby
//!   holds the virtual addresses).
//!
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
use session_common::wire::{FAMILY_IPV4, FlowKey, proto};
use session_tests::{
    ha::{CLIENT, Echo, Fw, HaLab, SERVER},
    wait_for,
};
use session_user::bpf::pinned::PinnedMaps;

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

/// Which firewall the lab runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Session,
    Conntrackd,
}

/// Sessions on `fw` (every protocol).
fn session_count(lab: &HaLab, kind: Kind, fw: Fw) -> u64 {
    match kind {
        Kind::Session => PinnedMaps::open(&lab.pin_dir(fw))
            .and_then(|maps| maps.snapshot_sessions())
            .map_or(0, |sessions| sessions.len() as u64),
        Kind::Conntrackd => lab.conntrack_count(fw),
    }
}

/// hping3's arguments for `count` UDP datagrams from the client to the echo port, each
/// from the next source port from `base`, `gap_us` apart.
fn hping_argv(count: u32, base: u16, gap_us: u32) -> Vec<String> {
    let mut argv: Vec<String> = ["hping3", "--udp", "-q", "-p"].map(String::from).to_vec();
    argv.extend([
        ECHO_PORT.to_string(),
        "-s".into(),
        base.to_string(),
        "-i".into(),
        format!("u{gap_us}"),
        "-c".into(),
        count.to_string(),
        SERVER.into(),
    ]);
    argv
}

/// Runs hping3 from the client to its end ([`hping_argv`]).
fn hping(lab: &HaLab, count: u32, base: u16, gap_us: u32) {
    let argv = hping_argv(count, base, gap_us);
    lab.run("c", &argv.iter().map(String::as_str).collect::<Vec<_>>());
}

/// When a burst of `count` new flows crosses the active: the sessions a second the standby
/// took in (from the burst's start until it held them all), the sessions a second the
/// active took in (the burst's own pace), and the ms the standby completed after the
/// active.
fn replication_rate(lab: &HaLab, kind: Kind, count: u32) -> (f64, f64, f64) {
    let (active_before, standby_before) = (
        session_count(lab, kind, Fw::One),
        session_count(lab, kind, Fw::Two),
    );
    let wanted = u64::from(count) * 99 / 100;
    let started = Instant::now();
    let argv = hping_argv(count, 10_000, 20);
    let sender = lab.spawn(
        "c",
        &argv.iter().map(String::as_str).collect::<Vec<_>>(),
        "burst-hping3.log",
    );
    let mut active_done = None;
    let deadline = started + Duration::from_secs(60);
    let standby_done = loop {
        assert!(
            Instant::now() < deadline,
            "the standby did not take in the burst in 60 s"
        );
        if active_done.is_none() && session_count(lab, kind, Fw::One) >= active_before + wanted {
            active_done = Some(started.elapsed());
        }
        if session_count(lab, kind, Fw::Two) >= standby_before + wanted {
            break started.elapsed();
        }
        sleep(Duration::from_millis(2));
    };
    drop(sender);
    let active_done = active_done.unwrap_or(standby_done);
    (
        f64::from(count) / standby_done.as_secs_f64(),
        f64::from(count) / active_done.as_secs_f64(),
        (standby_done - active_done).as_secs_f64() * 1e3,
    )
}

/// The sync daemon's CPU share on the active (1.0 = one CPU) over 5 s, without new flows
/// and with new flows at about 10,000 a second; and the rate reached.
fn active_cpu(lab: &HaLab, kind: Kind) -> (f64, f64, f64) {
    let pid = match kind {
        Kind::Session => lab.session_pid(Fw::One),
        Kind::Conntrackd => lab.conntrackd_pid(Fw::One),
    };
    let share = |work: &dyn Fn()| {
        let before = cpu_ticks(pid);
        let started = Instant::now();
        work();
        let took = started.elapsed().as_secs_f64();
        (
            (cpu_ticks(pid) - before) as f64 / ticks_per_second() / took,
            took,
        )
    };
    let (idle, _) = share(&|| sleep(Duration::from_secs(5)));
    let flows = 50_000;
    let (busy, took) = share(&|| hping(lab, flows, 12_000, 100));
    (idle, busy, f64::from(flows) / took)
}

/// Lag from a flow's first echo to its presence on the standby, in ms, per flow.
fn sync_lag(lab: &HaLab, kind: Kind, flows: u16) -> Vec<f64> {
    let echo = Echo::start(lab, ECHO_PORT);
    let stop = Arc::new(AtomicBool::new(false));
    // conntrack: the standby's events, line-buffered into a file read as it grows.
    let events = (kind == Kind::Conntrackd).then(|| {
        lab.spawn(
            "fw2",
            &["stdbuf", "-oL", "conntrack", "-E", "-e", "NEW", "-p", "udp"],
            "fw2-conntrack-events.log",
        )
    });
    sleep(Duration::from_millis(300));
    let events_log = events
        .as_ref()
        .map(|_| lab.log_path("fw2-conntrack-events.log"));
    let standby = (kind == Kind::Session)
        .then(|| PinnedMaps::open(&lab.pin_dir(Fw::Two)).expect("standby maps"));
    let client: Ipv4Addr = CLIENT.parse().expect("client");
    let (tx, rx) = std::sync::mpsc::channel::<(u16, Instant)>();
    let flag = Arc::clone(&stop);
    let poller = thread::spawn(move || {
        let mut pending: HashMap<u16, Instant> = HashMap::new();
        let mut seen: std::collections::HashSet<u16> = std::collections::HashSet::new();
        let mut read = 0usize;
        let mut lags = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && !(flag.load(Ordering::Relaxed) && pending.is_empty()) {
            while let Ok((port, at)) = rx.try_recv() {
                pending.insert(port, at);
            }
            if let Some(path) = &events_log {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                if let Some(new) = text.get(read..) {
                    let complete = new.rfind('\n').map_or(0, |end| end + 1);
                    for line in new[..complete].lines() {
                        if let Some(port) = line
                            .split_whitespace()
                            .find_map(|field| field.strip_prefix("sport="))
                            .and_then(|port| port.parse().ok())
                        {
                            seen.insert(port);
                        }
                    }
                    read += complete;
                }
            }
            pending.retain(|port, at| {
                let present = match &standby {
                    Some(maps) => matches!(maps.session(&udp_key(client, *port)), Ok(Some(_))),
                    None => seen.contains(port),
                };
                if present {
                    lags.push(at.elapsed().as_secs_f64() * 1e3);
                }
                !present
            });
            sleep(Duration::from_micros(500));
        }
        lags
    });
    for port in 30_000..30_000 + flows {
        let socket = lab.udp("c", CLIENT, port);
        socket.connect((SERVER, ECHO_PORT)).expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let mut buf = [0u8; 2];
        if socket.send(&port.to_le_bytes()).is_ok() && socket.recv(&mut buf).is_ok() {
            tx.send((port, Instant::now())).expect("poller");
        }
        sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    let mut lags = poller.join().expect("poller");
    drop(echo);
    drop(events);
    lags.sort_by(f64::total_cmp);
    lags
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

/// The figures of one firewall.
fn measure(lab: &HaLab, kind: Kind) -> serde_json::Value {
    let lags = sync_lag(lab, kind, 500);
    sleep(Duration::from_secs(1));
    let (rate, active_per_second, after_ms) = replication_rate(lab, kind, 20_000);
    sleep(Duration::from_secs(2));
    let (idle, busy, new_per_second) = active_cpu(lab, kind);
    sleep(Duration::from_secs(2));
    let (gap, detection, intact) = failover_gap(lab);
    json!({
        "sync_lag_ms": { "median": percentile(&lags, 0.5), "p99": percentile(&lags, 0.99), "flows": lags.len() },
        "replicated_per_second": rate,
        "burst": { "active_per_second": active_per_second, "standby_after_active_ms": after_ms },
        "active_cpu": { "idle": idle, "busy": busy, "new_per_second": new_per_second,
                        "extra_per_10000_new_per_second": (busy - idle) * 10_000.0 / new_per_second },
        "failover": { "tcp_gap_ms": gap, "keepalived_detection_ms": detection, "every_byte": intact },
    })
}

fn session_lab() -> HaLab {
    active_standby()
}

fn conntrackd_lab() -> HaLab {
    let mut lab = HaLab::new("bench-ct");
    for fw in [Fw::One, Fw::Two] {
        lab.start_nftables(fw);
        lab.start_conntrackd(fw);
    }
    lab.start_keepalived(Fw::One);
    lab.wait_master(Fw::One, Duration::from_secs(10));
    lab.start_keepalived(Fw::Two);
    sleep(Duration::from_secs(2));
    lab
}

fn main() {
    let out_dir = std::env::var_os("SESSION_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench")));
    std::fs::create_dir_all(&out_dir).expect("bench dir");
    let session = measure(&session_lab(), Kind::Session);
    let conntrackd = measure(&conntrackd_lab(), Kind::Conntrackd);
    let mut md = String::new();
    let row = |md: &mut String, what: &str, cell: &dyn Fn(&serde_json::Value) -> String| {
        writeln!(
            md,
            "| {what} | {} | {} |",
            cell(&session),
            cell(&conntrackd)
        )
        .expect("fmt");
    };
    writeln!(
        md,
        "### State sync: session against nftables + conntrackd (FTFW)\n"
    )
    .expect("fmt");
    writeln!(
        md,
        "| measure | session | conntrackd |\n| --- | --- | --- |"
    )
    .expect("fmt");
    row(
        &mut md,
        "sync lag, creation to presence on the standby, median / p99 (ms)",
        &|v| {
            format!(
                "{:.1} / {:.1}",
                v["sync_lag_ms"]["median"].as_f64().unwrap_or(f64::NAN),
                v["sync_lag_ms"]["p99"].as_f64().unwrap_or(f64::NAN)
            )
        },
    );
    row(
        &mut md,
        "sessions replicated per second, a burst of 20,000 new flows (the active's pace; standby complete ms after it)",
        &|v| {
            format!(
                "{:.0} ({:.0}/s; {:.0} ms)",
                v["replicated_per_second"].as_f64().unwrap_or(f64::NAN),
                v["burst"]["active_per_second"].as_f64().unwrap_or(f64::NAN),
                v["burst"]["standby_after_active_ms"]
                    .as_f64()
                    .unwrap_or(f64::NAN)
            )
        },
    );
    row(
        &mut md,
        "sync daemon CPU on the active per 10,000 new sessions/s (% of a CPU; idle)",
        &|v| {
            let cpu = &v["active_cpu"];
            format!(
                "{:.1} ({:.0}/s reached; idle {:.1})",
                cpu["extra_per_10000_new_per_second"]
                    .as_f64()
                    .unwrap_or(f64::NAN)
                    * 100.0,
                cpu["new_per_second"].as_f64().unwrap_or(f64::NAN),
                cpu["idle"].as_f64().unwrap_or(f64::NAN) * 100.0
            )
        },
    );
    row(
        &mut md,
        "failover, links cut: TCP gap / keepalived detection (ms), every byte",
        &|v| {
            let f = &v["failover"];
            format!(
                "{:.0} / {:.0}, {}",
                f["tcp_gap_ms"].as_f64().unwrap_or(f64::NAN),
                f["keepalived_detection_ms"].as_f64().unwrap_or(f64::NAN),
                f["every_byte"]
            )
        },
    );
    print!("{md}");
    std::fs::write(out_dir.join("ha.md"), &md).expect("write ha.md");
    let result = json!({ "session": session, "conntrackd": conntrackd });
    std::fs::write(
        out_dir.join("ha.json"),
        serde_json::to_string_pretty(&result).expect("json"),
    )
    .expect("write ha.json");
}
