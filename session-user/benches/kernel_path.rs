//! Kernel-path cost of the XDP program, measured with BPF_PROG_TEST_RUN against a
//! do-nothing XDP program from the same object in the same run, with a large session
//! table. Run through `cargo xtask bench` (root; release build).
//!
//! Prints a table of medians over several rounds and writes the same figures as JSON to
//! the path in `SESSION_BENCH_JSON` (default target/bench/kernel_path.json).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    maps::{HashMap, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
};
use serde_json::json;
use session_common::{
    track::flow_key,
    wire::{FlowKey, Session, Settings, TcpState, map_names, session_flags},
};
use session_user::{
    compile::compile,
    config,
    frames::{self, Tcp, tcp_flags},
    loader,
    maps::{PinnedMaps, monotonic_ns},
};

/// Sessions preloaded into the protected table.
const SESSIONS: u32 = 1 << 20;
/// Repetitions per BPF_PROG_TEST_RUN call for repeatable packets.
const REPEAT: u32 = 200_000;
/// Distinct frames for the new-flow scenario (each inserts once).
const NEW_FLOWS: usize = 50_000;
/// Rounds per scenario; the median is reported.
const ROUNDS: usize = 5;

const POLICY: &str = r#"
[policy]
inbound = "drop"
outbound = "accept"
[[rule]]
name = "return-traffic"
state = ["established", "related"]
action = "accept"
[[rule]]
name = "drop-invalid"
state = ["invalid"]
action = "drop"
[[rule]]
name = "web"
state = ["new"]
proto = "tcp"
dport = [8080]
action = "accept"
"#;

struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn tcp_frame(src: IpAddr, dst: IpAddr, segment: Tcp) -> Vec<u8> {
    frames::frame(src, dst, frames::tcp(segment))
}

/// An established, assured session as the kernel would hold it for `frame`'s flow.
fn established(frame: &[u8], now: u64) -> (FlowKey, Session) {
    let mut meta = session_common::packet::PacketMeta::default();
    session_common::packet::parse(frame, &mut meta).expect("bench frame parses");
    let (key, src_is_lo) = flow_key(&meta);
    let mut session = Session {
        created_ns: now,
        expires_ns: now + 3_600_000_000_000,
        state: TcpState::Established as u8,
        flags: session_flags::SEEN_REPLY | session_flags::ASSURED | session_flags::PROTECTED,
        ..Session::default()
    };
    if src_is_lo {
        session.flags |= session_flags::ORIG_IS_LO;
    }
    (key, session)
}

fn run(prog: &Xdp, frame: &[u8], repeat: u32) -> Duration {
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::new()
        })
        .unwrap_or_else(|error| panic!("BPF_PROG_TEST_RUN failed: {error}"));
    result.duration
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        return;
    }
    let pin = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/session-bench-{}",
        std::process::id()
    )));
    let mut ebpf = loader::load(&pin.0, SESSIONS).unwrap_or_else(|error| {
        panic!("loading the program (run via `cargo xtask bench` as root): {error:#}")
    });
    let maps = PinnedMaps::open(&pin.0).expect("pinned maps");
    let mut settings = Settings::default();
    settings.flags &= !session_common::wire::settings_flags::TCP_WINDOW_CHECK;
    maps.write_settings(&settings).expect("settings");
    let config = config::parse(Path::new("bench.toml"), POLICY).expect("bench policy");
    maps.apply_policy(&compile(&config.policy, |_| None).expect("compiles"))
        .expect("apply policy");
    {
        let noop: &mut Xdp = ebpf
            .program_mut("session_noop")
            .expect("noop program in the object")
            .try_into()
            .expect("noop is XDP");
        noop.load().expect("loading the noop program");
    }

    let server = ip(198, 18, 0, 2);
    let now = monotonic_ns();
    let fill_started = Instant::now();
    let mut table: HashMap<MapData, FlowKey, Session> = HashMap::try_from(
        aya::maps::Map::from_map_data(
            MapData::from_pin(pin.0.join(map_names::SESSIONS)).expect("SESSIONS pin"),
        )
        .expect("map"),
    )
    .expect("hash map");
    for i in 0..SESSIONS {
        let client = ip(198, 19, (i >> 8) as u8, i as u8);
        let port = 1024 + (i >> 16) as u16;
        let frame = tcp_frame(client, server, Tcp::new(port, 8080, tcp_flags::ACK));
        let (key, session) = established(&frame, now);
        table
            .insert(key, session, 0)
            .expect("filling the session table");
    }
    let fill = fill_started.elapsed();

    let xdp: &Xdp = ebpf.program("session_ingress").unwrap().try_into().unwrap();
    let noop: &Xdp = ebpf.program("session_noop").unwrap().try_into().unwrap();

    let est_client = ip(198, 19, 0, 7);
    let est_tcp = tcp_frame(
        est_client,
        server,
        Tcp::new(1024, 8080, tcp_flags::ACK | tcp_flags::PSH).payload(18),
    );
    let est_udp = frames::frame(ip(198, 18, 9, 9), server, frames::udp(5000, 53, 18));
    {
        let (key, mut session) = established(&est_udp, now);
        session.state = session_common::wire::FlowState::Replied as u8;
        table.insert(key, session, 0).expect("udp session");
    }
    let dropped = tcp_frame(
        ip(198, 18, 7, 7),
        server,
        Tcp::new(4444, 9090, tcp_flags::SYN),
    );
    let invalid = tcp_frame(
        ip(198, 18, 7, 8),
        server,
        Tcp::new(4444, 8080, tcp_flags::ACK),
    );

    let repeatable: [(&str, &[u8], f64); 4] = [
        ("established TCP", &est_tcp, 100.0),
        ("established UDP", &est_udp, 100.0),
        ("policy drop (new SYN, closed port)", &dropped, 150.0),
        ("INVALID (stray ACK)", &invalid, f64::NAN),
    ];
    let mut rows = Vec::new();
    let baseline_repeat = median(
        (0..ROUNDS)
            .map(|_| run(noop, &est_tcp, REPEAT).as_nanos() as f64)
            .collect(),
    );
    for (name, frame, target) in repeatable {
        let ns = median(
            (0..ROUNDS)
                .map(|_| run(xdp, frame, REPEAT).as_nanos() as f64)
                .collect(),
        );
        rows.push((name, ns, baseline_repeat, target));
    }
    // New flows: each frame inserts once, so each is run once; the kernel times only the
    // program, so a single run is comparable with single runs of the baseline.
    let mut new_rounds = Vec::new();
    let mut base_rounds = Vec::new();
    for round in 0..ROUNDS {
        let frames: Vec<Vec<u8>> = (0..NEW_FLOWS)
            .map(|i| {
                let client = ip(198, 18, 100 + round as u8, (i % 250) as u8 + 1);
                tcp_frame(
                    client,
                    server,
                    Tcp::new(10_000 + (i / 250) as u16, 8080, tcp_flags::SYN),
                )
            })
            .collect();
        let total: u128 = frames.iter().map(|f| run(xdp, f, 1).as_nanos()).sum();
        new_rounds.push(total as f64 / NEW_FLOWS as f64);
        let total: u128 = frames.iter().map(|f| run(noop, f, 1).as_nanos()).sum();
        base_rounds.push(total as f64 / NEW_FLOWS as f64);
    }
    rows.push((
        "accepted new flow (SYN, insert)",
        median(new_rounds),
        median(base_rounds),
        400.0,
    ));

    println!(
        "kernel path, BPF_PROG_TEST_RUN, {SESSIONS} sessions in the table ({fill:.1?} to fill)"
    );
    println!(
        "{:<36} {:>10} {:>12} {:>8} {:>10}",
        "scenario", "ns/packet", "noop ns/pkt", "ratio", "target ns"
    );
    let mut json_rows = Vec::new();
    for (name, ns, base, target) in &rows {
        let target_text = if target.is_nan() {
            "-".to_string()
        } else {
            format!("{target:.0}")
        };
        println!(
            "{:<36} {:>10.1} {:>12.1} {:>8.2} {:>10}",
            name,
            ns,
            base,
            ns / base.max(0.001),
            target_text
        );
        json_rows.push(json!({
            "scenario": name, "ns_per_packet": ns, "baseline_ns_per_packet": base,
            "ratio": ns / base.max(0.001),
            "target_ns": if target.is_nan() { serde_json::Value::Null } else { json!(target) },
            "meets_target": if target.is_nan() { serde_json::Value::Null } else { json!(ns <= target) },
        }));
    }
    let out = std::env::var("SESSION_BENCH_JSON")
        .unwrap_or_else(|_| "target/bench/kernel_path.json".into());
    if let Some(parent) = Path::new(&out).parent() {
        std::fs::create_dir_all(parent).expect("creating the JSON directory");
    }
    let doc =
        json!({"sessions": SESSIONS, "rounds": ROUNDS, "repeat": REPEAT, "results": json_rows});
    std::fs::write(&out, serde_json::to_string_pretty(&doc).expect("json")).expect("writing JSON");
    println!("written: {out}");
}
