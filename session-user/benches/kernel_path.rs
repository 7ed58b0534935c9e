//! Kernel-side benchmarks, run by `cargo xtask bench` (root, release build):
//!
//! - per-packet cost of the XDP program with BPF_PROG_TEST_RUN and 1M sessions in the
//!   table, against a do-nothing XDP program (`session_noop`, from the benchmarks' own
//!   eBPF object, which the daemon does not embed) in the same run;
//! - policy scale: new-flow cost with 10, 100 and 1,000 rule entries, and the time to
//!   apply a 1,000-entry policy;
//! - set scale: new-flow classification with a 1,000,000-prefix set against a 10-prefix
//!   one, kernel memory per prefix, the time to load and to replace 1,000,000 prefixes
//!   (next to `nft -f` loading the same prefixes into interval sets, in a namespace of
//!   the bench's own), and one live add;
//! - table scale: kernel memory per session (the kernel's own accounting of the maps,
//!   next to nf_conntrack's slab object size), the reaper's sweep of 1M sessions with 10%
//!   expired, and the daemon's CPU with 1M idle sessions.
//!
//! Prints markdown tables of medians over several rounds and writes the same figures to
//! `$SESSION_BENCH_DIR/kernel.json` and `kernel.md` (default: the workspace's
//! target/bench).

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
};
use serde_json::{Value, json};
use session_common::{
    packet::{PacketMeta, parse},
    wire::{FlowKey, FlowState, Session, Settings, map_names},
};
use session_testkit::{
    bench,
    frames::{self, Tcp, tcp_flags},
};
use session_user::{
    bpf::{clock::monotonic_ns, kernel_log::KernelLogLevel, loader, pinned::PinnedMaps},
    policy::{compile::compile, config},
};

/// The benchmarks' eBPF object, which build.rs builds beside the firewall's.
static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/session-bench"));

/// Table capacity: a power of two, as the default is. The kernel rounds a hash map's
/// buckets up to one, so a capacity just above it pays twice the buckets (256 instead of
/// 240 bytes a session, measured).
const CAPACITY: u32 = 1 << 20;
/// Sessions preloaded into the protected table, leaving room for the few the scenarios add.
const SESSIONS: u32 = CAPACITY - 1024;
/// Repetitions per BPF_PROG_TEST_RUN call for packets that can be replayed.
const REPEAT: u32 = 200_000;
/// Distinct SYNs per round for the accepted-new-flow scenario (each inserts once).
const NEW_FLOWS: usize = 40_000;
/// Rounds per scenario; the median is reported.
const ROUNDS: usize = 5;
/// Policy sizes (kernel entries) for the policy-scale table.
const POLICY_SIZES: [usize; 3] = [10, 100, 1000];
/// Share of the table the reaper finds expired.
const EXPIRED_SHARE: u32 = 10;
/// How long the daemon's idle CPU is sampled: several reaper periods (5 s, or 50 times
/// the last sweep on a large table), so the figure does not depend on where the window
/// falls.
const DAEMON_SAMPLE: Duration = Duration::from_secs(60);

/// The server every scenario talks to.
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The port the policy opens.
const OPEN_PORT: u16 = 8080;

/// Removes the benchmark's pin directory, also when a scenario panics.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The daemon under measurement, its namespace and its config file; all go away on drop,
/// also when starting the daemon fails half way.
struct DaemonRun {
    child: Option<Child>,
    netns: String,
    config: PathBuf,
}

impl Drop for DaemonRun {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            // Signals only the child this guard started.
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_child(child),
                rustix::process::Signal::TERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = std::fs::remove_file(&self.config);
    }
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn syn(client: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    frames::frame(
        client,
        IpAddr::V4(SERVER),
        frames::tcp(Tcp::new(sport, dport, tcp_flags::SYN)),
    )
}

/// An established, assured session as the kernel would hold it for `frame`'s flow.
fn established(frame: &[u8], now: u64) -> (FlowKey, Session) {
    let mut meta = PacketMeta::default();
    parse(frame, &mut meta).expect("bench frames parse");
    bench::established_session(&meta, now)
}

/// The i-th preloaded established flow: 198.19.0.0/16 clients, 16 source ports each.
fn preloaded_flow(i: u32) -> Vec<u8> {
    let client = v4(198, 19, (i >> 8) as u8, i as u8);
    let sport = 1024 + (i >> 16) as u16;
    frames::frame(
        client,
        IpAddr::V4(SERVER),
        frames::tcp(Tcp::new(sport, OPEN_PORT, tcp_flags::ACK)),
    )
}

/// Mean ns per run of `frame` over `repeat` runs, as the kernel timed them.
fn run(prog: &Xdp, frame: &[u8], repeat: u32) -> f64 {
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::new()
        })
        .unwrap_or_else(|error| panic!("BPF_PROG_TEST_RUN failed: {error}"));
    result.duration.as_nanos() as f64
}

/// Mean ns per frame when each frame runs once (frames that change the table).
fn run_each(prog: &Xdp, frames: &[Vec<u8>]) -> f64 {
    frames.iter().map(|frame| run(prog, frame, 1)).sum::<f64>() / frames.len() as f64
}

/// The middle sample (upper middle for an even count).
fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// The median of `rounds` samples; `sample` gets the round number.
fn median_of(rounds: usize, mut sample: impl FnMut(usize) -> f64) -> f64 {
    median((0..rounds).map(&mut sample).collect())
}

/// The base policy of the kernel-path scenarios, with `fillers` extra entries between
/// the established rule and the rule that opens the port. The fillers look like a real
/// rule set (sources by CIDR of several lengths, single ports and ranges, both
/// families; one kernel entry each) and match none of the benchmark's packets, so a new
/// flow walks them all.
fn policy_text(fillers: usize) -> String {
    let mut text = String::from(
        "[policy]\ninbound = \"drop\"\noutbound = \"accept\"\n\
         [[rule]]\nname = \"return-traffic\"\nstate = [\"established\", \"related\"]\naction = \"accept\"\n\
         [[rule]]\nname = \"drop-invalid\"\nstate = [\"invalid\"]\naction = \"drop\"\n",
    );
    for i in 0..fillers {
        let src = match i % 4 {
            0 => format!("198.19.{}.0/24", i % 256),
            1 => format!("198.19.{}.{}/30", i % 256, (i * 4) % 256),
            2 => format!("2001:2:0:{:x}::/64", i),
            _ => format!("198.19.{}.{}/32", (i * 7) % 256, i % 256),
        };
        let (proto, ports) = match i % 3 {
            0 => ("tcp", format!("[{}]", 20_000 + i)),
            1 => ("udp", format!("[\"{}-{}\"]", 30_000 + i, 30_010 + i)),
            _ => ("tcp", format!("[\"{}-{}\"]", 40_000 + i, 40_100 + i)),
        };
        let action = if i % 2 == 0 { "accept" } else { "drop" };
        write!(
            text,
            "[[rule]]\nname = \"filler-{i}\"\nstate = [\"new\"]\nproto = \"{proto}\"\nsrc = [\"{src}\"]\ndport = {ports}\naction = \"{action}\"\n"
        )
        .expect("writing to a String");
    }
    text.push_str(
        "[[rule]]\nname = \"web\"\nstate = [\"new\"]\nproto = \"tcp\"\ndport = [8080]\naction = \"accept\"\n",
    );
    text
}

/// New flows per round of the limits scenario: every round's sources are new, and all
/// rounds' fit in [`limited_source`]'s 65,536 addresses.
const LIMITED_FLOWS: usize = 12_000;

/// The `i`-th source of the limits scenario: the upper halves of 198.18.0.0/16 and
/// 198.19.0.0/16, which no other scenario's new flows come from.
fn limited_source(i: usize) -> IpAddr {
    let (base, offset) = if i < 32_768 {
        (Ipv4Addr::new(198, 18, 128, 0), i)
    } else {
        (Ipv4Addr::new(198, 19, 128, 0), i - 32_768)
    };
    IpAddr::V4(Ipv4Addr::from(u32::from(base) + offset as u32))
}

/// [`policy_text`] without fillers, its port opened by a rule with per-source limits
/// (concurrent, rate, total) high enough that every SYN of the benchmark passes them.
fn limited_policy_text() -> String {
    policy_text(0).replace(
        "dport = [8080]\naction = \"accept\"\n",
        "dport = [8080]\naction = \"accept\"\nlimit = { max_src_conn = 1000, max_src_conn_rate = \"1000/1s\", max_conn = 16000000 }\n",
    )
}

/// Compiles and applies `text`; returns the number of kernel entries and the parse,
/// compile and apply times in ms.
fn apply(maps: &PinnedMaps, text: &str) -> (usize, [f64; 3]) {
    let started = Instant::now();
    let config = config::parse(Path::new("bench.toml"), text).expect("bench policy parses");
    let parsed = started.elapsed();
    let compiled = compile(&config.policy, |_| None).expect("bench policy compiles");
    let compiled_at = started.elapsed();
    maps.apply_policy(&compiled)
        .expect("applying the bench policy");
    let applied = started.elapsed();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (
        compiled.entries.len(),
        [
            ms(parsed),
            ms(compiled_at - parsed),
            ms(applied - compiled_at),
        ],
    )
}

/// Prefixes of the big set in the set scenario.
const BIG_SET: usize = 1_000_000;

/// `[limits] max_set_entries` of the set scenario: room for the big set, as a config that
/// holds a million prefixes asks for.
const BIG_SET_LIMIT: u32 = 1 << 20;

/// `count` distinct set prefixes: IPv4 /32s of 198.18.0.0/15 above 198.18.16.0 (clear of
/// the addresses the scenarios send from), then IPv6 /128s of 2001:2::/48. Never the
/// source of a benchmark packet but 198.18.200.1 (a member).
fn set_prefixes(count: usize) -> Vec<String> {
    let v4_first = u32::from(Ipv4Addr::new(198, 18, 16, 0));
    let v4_count = (u32::from(Ipv4Addr::new(198, 19, 255, 255)) - v4_first) as usize;
    (0..count)
        .map(|i| {
            if i < v4_count.min(count / 2) {
                Ipv4Addr::from(v4_first + i as u32).to_string()
            } else {
                format!("2001:2::{:x}:{:x}", (i >> 16) & 0xffff, i & 0xffff)
            }
        })
        .collect()
}

/// The base policy with a set `block` read from `file`, whose members' new flows drop.
fn set_policy_text(file: &Path) -> String {
    let mut text = policy_text(0);
    let web = text
        .rfind("[[rule]]\nname = \"web\"")
        .expect("the base policy ends with the web rule");
    text.insert_str(
        web,
        "[[rule]]\nname = \"blocklist\"\nstate = [\"new\"]\nsrc = [\"@block\"]\naction = \"drop\"\n",
    );
    format!(
        "[limits]\nmax_set_entries = {BIG_SET_LIMIT}\n[sets]\nblock = {{ file = \"{}\" }}\n{text}",
        file.display()
    )
}

/// Seconds `nft -f` takes to load `prefixes` into two interval sets (IPv4, IPv6) of a
/// table in a network namespace the bench creates and deletes; `None` without nft.
fn nft_load_seconds(prefixes: &[String]) -> Option<f64> {
    let netns = format!("session-bench-nft-{}", std::process::id());
    let file = std::env::temp_dir().join(format!("{netns}.nft"));
    let (v6, v4): (Vec<&String>, Vec<&String>) = prefixes.iter().partition(|p| p.contains(':'));
    let join = |list: &[&String]| {
        list.iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join(",\n")
    };
    let text = format!(
        "table inet bench {{\n set v4 {{ type ipv4_addr; flags interval; elements = {{ {} }} }}\n set v6 {{ type ipv6_addr; flags interval; elements = {{ {} }} }}\n}}\n",
        join(&v4),
        join(&v6)
    );
    std::fs::write(&file, text).ok()?;
    let created = Command::new("ip")
        .args(["netns", "add", &netns])
        .status()
        .is_ok_and(|status| status.success());
    let seconds = created.then(|| {
        let started = Instant::now();
        let ok = Command::new("ip")
            .args(["netns", "exec", &netns, "nft", "-f"])
            .arg(&file)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        ok.then(|| started.elapsed().as_secs_f64())
    });
    if created {
        let _ = Command::new("ip").args(["netns", "del", &netns]).status();
    }
    let _ = std::fs::remove_file(&file);
    seconds.flatten()
}

/// Bytes the kernel charges for a pinned map (`memlock` in its fdinfo).
fn map_memlock(pin: &Path, name: &str) -> u64 {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let data = MapData::from_pin(pin.join(name)).expect("opening a pinned map");
    let fd = data.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).expect("map fdinfo");
    info.lines()
        .find_map(|line| line.strip_prefix("memlock:"))
        .and_then(|value| value.trim().parse().ok())
        .expect("memlock in the map's fdinfo")
}

/// nf_conntrack's slab object size, when the kernel has conntrack loaded.
fn conntrack_object_size() -> Option<u64> {
    let slabinfo = std::fs::read_to_string("/proc/slabinfo").ok()?;
    slabinfo.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next()? == "nf_conntrack").then_some(())?;
        fields.nth(2)?.parse().ok()
    })
}

/// Process CPU time (user + system) of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("daemon stat");
    let after_comm = &stat[stat.rfind(')').expect("stat has a comm") + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / rustix::param::clock_ticks_per_second() as f64
}

/// Starts the daemon on the benchmark's pinned maps in a namespace of its own with one
/// veth pair, so it finds the 1M sessions already there.
fn start_daemon(pin: &Path) -> Option<DaemonRun> {
    let binary = std::env::var_os("SESSION_BIN")?;
    let mut run = DaemonRun {
        child: None,
        netns: format!("sbench-{}", std::process::id()),
        config: std::env::temp_dir().join(format!("session-bench-{}.toml", std::process::id())),
    };
    for argv in [
        vec!["ip", "netns", "add", &run.netns],
        vec![
            "ip", "-n", &run.netns, "link", "add", "sb0", "type", "veth", "peer", "name", "sb1",
        ],
    ] {
        let status = Command::new(argv[0])
            .args(&argv[1..])
            .status()
            .unwrap_or_else(|error| panic!("running {argv:?}: {error}"));
        assert!(status.success(), "{argv:?} failed ({status})");
    }
    let mut text = format!("interfaces = [\"sb0\"]\n[limits]\nmax_sessions = {CAPACITY}\n");
    text.push_str(&policy_text(0));
    std::fs::write(&run.config, text).expect("writing the daemon config");
    // `timeout` bounds the daemon's life even if this process dies without its guards.
    let child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", run.netns))
        .args(["--", "timeout", "-k", "1", "300"])
        .arg(&binary)
        .args(["run", "--config"])
        .arg(&run.config)
        .arg("--pin-dir")
        .arg(pin)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the daemon");
    let child = run.child.insert(child);
    let mut line = String::new();
    use std::io::BufRead as _;
    std::io::BufReader::new(child.stdout.as_mut().expect("daemon stdout"))
        .read_line(&mut line)
        .expect("reading the daemon's ready line");
    assert!(
        line.contains("ready"),
        "the daemon did not report ready (its log is above): {line:?}"
    );
    Some(run)
}

/// Formats a figure against its target, and whether it meets it.
fn verdict(value: f64, target: Option<f64>) -> (String, Value) {
    match target {
        Some(target) => (
            format!("{target}"),
            json!({"target": target, "meets_target": value <= target}),
        ),
        None => ("-".into(), json!({"target": null, "meets_target": null})),
    }
}

fn yes_no(value: f64, target: Option<f64>) -> &'static str {
    match target {
        Some(target) if value <= target => "yes",
        Some(_) => "**no**",
        None => "-",
    }
}

struct Bench {
    ebpf: Ebpf,
    /// The benchmarks' object, for its do-nothing baseline `session_noop`.
    bench_ebpf: Ebpf,
    maps: PinnedMaps,
    pin: PinDir,
    md: String,
    json: serde_json::Map<String, Value>,
}

impl Bench {
    fn xdp(&self, name: &str) -> &Xdp {
        self.ebpf
            .program(name)
            .unwrap_or_else(|| panic!("program {name} in the object"))
            .try_into()
            .expect("an XDP program")
    }

    fn table(&self) -> HashMap<MapData, FlowKey, Session> {
        HashMap::try_from(
            aya::maps::Map::from_map_data(
                MapData::from_pin(self.pin.0.join(map_names::SESSIONS)).expect("SESSIONS pin"),
            )
            .expect("SESSIONS map"),
        )
        .expect("SESSIONS is a hash map")
    }

    fn kernel_path(&mut self, fill: Duration) {
        let now = monotonic_ns();
        let est_tcp = frames::frame(
            v4(198, 19, 0, 7),
            IpAddr::V4(SERVER),
            frames::tcp(Tcp::new(1024, OPEN_PORT, tcp_flags::ACK | tcp_flags::PSH).payload(18)),
        );
        let est_udp = frames::frame(
            v4(198, 18, 9, 9),
            IpAddr::V4(SERVER),
            frames::udp(5000, 53, 18),
        );
        {
            let (key, mut session) = established(&est_udp, now);
            session.state = FlowState::Replied as u8;
            self.table()
                .insert(key, session, 0)
                .expect("inserting the UDP session");
        }
        // The presence filter decides whether a SYN without a session looks the tables up:
        // one SYN whose slot is clear, one whose slot another key set.
        let presence_fill = self
            .maps
            .presence_fill()
            .expect("reading the presence filter");
        let dropped_syn = |slot_set: bool| {
            (4444..u16::MAX)
                .map(|sport| syn(v4(198, 18, 7, 7), sport, 9090))
                .find(|frame| {
                    let (key, _) = established(frame, now);
                    self.maps
                        .presence_holds(&key)
                        .expect("reading the presence filter")
                        == slot_set
                })
                .expect("a source port whose presence slot is as wanted")
        };
        let (dropped, dropped_set) = (dropped_syn(false), dropped_syn(true));
        let invalid = frames::frame(
            v4(198, 18, 7, 8),
            IpAddr::V4(SERVER),
            frames::tcp(Tcp::new(4444, OPEN_PORT, tcp_flags::ACK)),
        );
        let xdp = self.xdp("session_ingress");
        let noop: &Xdp = self
            .bench_ebpf
            .program("session_noop")
            .expect("session_noop in the benchmarks' object")
            .try_into()
            .expect("session_noop is XDP");
        let noop_repeat = median_of(ROUNDS, |_| run(noop, &est_tcp, REPEAT));
        let mut rows: Vec<(&str, f64, f64, Option<f64>)> = Vec::new();
        for (name, frame, target) in [
            ("established TCP", &est_tcp, Some(100.0)),
            ("established UDP", &est_udp, Some(100.0)),
            (
                "new flow the policy drops (SYN to a closed port), presence slot clear",
                &dropped,
                None,
            ),
            (
                "same, presence slot set by another key (both tiers looked up)",
                &dropped_set,
                None,
            ),
            ("INVALID (ACK without a session)", &invalid, None),
        ] {
            rows.push((
                name,
                median_of(ROUNDS, |_| run(xdp, frame, REPEAT)),
                noop_repeat,
                target,
            ));
        }
        // What a SYN from a random source costs on average with the table this full.
        let drop_expected = (1.0 - presence_fill) * rows[2].1 + presence_fill * rows[3].1;
        rows.insert(
            4,
            (
                "new flow the policy drops, expected over random sources (weighted by the filter's fill)",
                drop_expected,
                noop_repeat,
                Some(150.0),
            ),
        );
        // A later fragment of the established UDP flow's datagram: the first fragment
        // (run again each round, so its record is live) leaves the record the middle
        // fragment, replayed, follows; a middle fragment keeps the record.
        let pieces = frames::fragments(
            v4(198, 18, 9, 9),
            IpAddr::V4(SERVER),
            frames::udp(5000, 53, 3000),
            1400,
            77,
        );
        let followed = median_of(ROUNDS, |_| {
            run(xdp, &pieces[0], 1);
            run(xdp, &pieces[1], REPEAT)
        });
        rows.push((
            "fragment followed (a later fragment of an established UDP datagram)",
            followed,
            noop_repeat,
            None,
        ));
        let mut noop_once = Vec::new();
        let new_flow = median_of(ROUNDS, |round| {
            let frames: Vec<Vec<u8>> = (0..NEW_FLOWS)
                .map(|i| {
                    syn(
                        v4(198, 18, 100 + round as u8, (i % 250) as u8 + 1),
                        10_000 + (i / 250) as u16,
                        OPEN_PORT,
                    )
                })
                .collect();
            noop_once.push(run_each(noop, &frames));
            run_each(xdp, &frames)
        });
        rows.push((
            "new TCP SYN the policy accepts (insert)",
            new_flow,
            median(noop_once),
            Some(400.0),
        ));
        // The same, admitted by a rule with per-source limits that every SYN passes: each
        // comes from a source not seen before, so it pays for the source's LRU entry too.
        apply(&self.maps, &limited_policy_text());
        let mut noop_limited = Vec::new();
        let limited_flow = median_of(ROUNDS, |round| {
            let frames: Vec<Vec<u8>> = (0..LIMITED_FLOWS)
                .map(|i| syn(limited_source(round * LIMITED_FLOWS + i), 20_000, OPEN_PORT))
                .collect();
            noop_limited.push(run_each(noop, &frames));
            run_each(xdp, &frames)
        });
        apply(&self.maps, &policy_text(0));
        rows.push((
            "new TCP SYN accepted under per-source limits (insert, new source)",
            limited_flow,
            median(noop_limited),
            None,
        ));
        let limits_cost = limited_flow / new_flow.max(1.0);

        let _ = writeln!(
            self.md,
            "### Kernel path (BPF_PROG_TEST_RUN, {SESSIONS} sessions in the table)\n\n\
             Median of {ROUNDS} rounds; replayable packets run {REPEAT} times per round, new flows \
             run once each ({NEW_FLOWS} per round). Baseline: a do-nothing XDP program from the \
             same object, same run. Targets apply to the measured ns/packet. The presence \
             filter's active bank has {:.0}% of its slots set.\n\n\
             | scenario | ns/packet | baseline ns | minus baseline | ratio | target ns | met |\n\
             |---|---:|---:|---:|---:|---:|:-:|",
            presence_fill * 100.0
        );
        let mut out = Vec::new();
        for (name, ns, base, target) in rows {
            let (target_text, target_json) = verdict(ns, target);
            let _ = writeln!(
                self.md,
                "| {name} | {ns:.0} | {base:.0} | {:.0} | {:.1} | {target_text} | {} |",
                ns - base,
                ns / base.max(1.0),
                yes_no(ns, target)
            );
            let mut row = json!({"scenario": name, "ns_per_packet": ns, "baseline_ns_per_packet": base,
                "ratio": ns / base.max(1.0)});
            merge(&mut row, target_json);
            out.push(row);
        }
        let _ = writeln!(
            self.md,
            "\nNew-flow cost with per-source limits over without: {limits_cost:.2}× ({limited_flow:.0} against {new_flow:.0} ns)."
        );
        let info = self
            .xdp("session_ingress")
            .info()
            .expect("reading session_ingress's program info");
        let xlated = info.size_translated().unwrap_or(0) / 8;
        let jited = info.size_jitted();
        let verified = info.verified_instruction_count().unwrap_or(0);
        let _ = writeln!(
            self.md,
            "\nsession_ingress after verification: {xlated} BPF instructions, {jited} bytes of \
             machine code; the verifier walked {verified} instructions (its limit is 1,000,000)."
        );
        self.json.insert(
            "kernel_path".into(),
            json!({"sessions": SESSIONS, "fill_seconds": fill.as_secs_f64(), "rounds": ROUNDS,
                "repeat": REPEAT, "results": out, "presence_fill": presence_fill,
                "limits_new_flow_ratio": limits_cost,
                "xlated_instructions": xlated,
                "verified_instructions": verified,
                "jited_bytes": jited}),
        );
    }

    fn policy_scale(&mut self) {
        let mut rows = Vec::new();
        for (size_index, &entries) in POLICY_SIZES.iter().enumerate() {
            // Each filler is one kernel entry; three rules are always there.
            let text = policy_text(entries - 3);
            let mut times = Vec::new();
            let mut count = 0;
            for _ in 0..ROUNDS {
                let (n, t) = apply(&self.maps, &text);
                count = n;
                times.push(t);
            }
            let apply_ms = [0, 1, 2].map(|i| median(times.iter().map(|t| t[i]).collect()));
            let xdp = self.xdp("session_ingress");
            let est = preloaded_flow(9);
            let established_ns = median_of(ROUNDS, |_| run(xdp, &est, REPEAT));
            let default_drop = syn(v4(198, 18, 7, 7), 4444, 9090);
            let drop_ns = median_of(ROUNDS, |_| run(xdp, &default_drop, REPEAT));
            // The port of filler 0 (TCP, source 198.19.0.0/24) from another network: the
            // direct-indexed tables pick filler 0, its source fails, so the interface and
            // network tables are read too before the default drop.
            let network_miss = syn(v4(198, 18, 7, 7), 4444, 20_000);
            let network_ns = median_of(ROUNDS, |_| run(xdp, &network_miss, REPEAT));
            let accept_ns = median_of(ROUNDS, |round| {
                let frames: Vec<Vec<u8>> = (0..NEW_FLOWS / 4)
                    .map(|i| {
                        syn(
                            v4(
                                198,
                                18,
                                110 + (size_index * ROUNDS + round) as u8,
                                (i % 250) as u8 + 1,
                            ),
                            10_000 + (i / 250) as u16,
                            OPEN_PORT,
                        )
                    })
                    .collect();
                run_each(xdp, &frames)
            });
            rows.push((
                count,
                established_ns,
                drop_ns,
                network_ns,
                accept_ns,
                apply_ms,
            ));
        }
        let (_, _, small_drop, small_network, small_accept, _) = rows[0];
        let (big_n, _, big_drop, big_network, big_accept, big_apply) = *rows.last().expect("sizes");
        let small_n = rows[0].0;
        let slope = (big_drop - small_drop) / (big_n - small_n) as f64;
        let _ = writeln!(
            self.md,
            "\n### Policy scale (same table, same run)\n\n\
             Established packets match the first rule (`state = established`); new flows match \
             the last rule (accepted, inserted) or none (dropped by default), found by the \
             rule bitmaps without walking the entries. Apply = parse + compile + write the inactive bank and switch.\n\n\
             | kernel entries | established ns | new flow, default drop ns | new flow, default drop after the network lookups ns | new flow, accepted by last rule ns | parse ms | compile ms | apply ms |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let mut out = Vec::new();
        for (n, est, drop, network, accept, [parse_ms, compile_ms, apply_ms]) in &rows {
            let _ = writeln!(
                self.md,
                "| {n} | {est:.0} | {drop:.0} | {network:.0} | {accept:.0} | {parse_ms:.1} | {compile_ms:.1} | {apply_ms:.1} |"
            );
            out.push(json!({"entries": n, "established_ns": est, "new_default_drop_ns": drop,
                "new_network_lookup_drop_ns": network, "new_accepted_ns": accept, "parse_ms": parse_ms, "compile_ms": compile_ms, "apply_ms": apply_ms}));
        }
        let classify_ratio = big_drop / small_drop;
        let network_ratio = big_network / small_network;
        let accept_ratio = big_accept / small_accept;
        let total_apply: f64 = big_apply.iter().sum();
        let _ = writeln!(
            self.md,
            "\nNew-flow cost at {big_n} vs {small_n} entries: {classify_ratio:.1}× (default drop), \
             {network_ratio:.1}× (drop after the network lookups), {accept_ratio:.1}× (accepted); \
             target ≤ 2×: {}. Slope: {slope:.1} ns per rule entry. \
             Applying {big_n} entries: {total_apply:.1} ms; target ≤ 100 ms: {}.",
            yes_no(
                classify_ratio.max(network_ratio).max(accept_ratio),
                Some(2.0)
            ),
            yes_no(total_apply, Some(100.0)),
        );
        self.json.insert(
            "policy_scale".into(),
            json!({"results": out, "new_flow_ratio_default_drop": classify_ratio,
                "new_flow_ratio_network_lookups": network_ratio,
                "new_flow_ratio_accepted": accept_ratio, "ns_per_rule_entry": slope,
                "ratio_target": 2.0,
                "ratio_meets_target": classify_ratio <= 2.0 && network_ratio <= 2.0 && accept_ratio <= 2.0,
                "apply_ms_total": total_apply, "apply_target_ms": 100.0, "apply_meets_target": total_apply <= 100.0}),
        );
        // Back to the small policy for what follows.
        apply(&self.maps, &policy_text(0));
    }

    fn set_scale(&mut self) {
        let dir = std::env::temp_dir();
        let small_file = dir.join(format!("session-bench-set10-{}.txt", std::process::id()));
        let big_file = dir.join(format!("session-bench-set1m-{}.txt", std::process::id()));
        let mut small = set_prefixes(9);
        small.push("198.18.200.1".into());
        let big = set_prefixes(BIG_SET);
        std::fs::write(&small_file, small.join("\n")).expect("writing the small set");
        std::fs::write(&big_file, big.join("\n")).expect("writing the big set");
        let member = syn(v4(198, 18, 200, 1), 4444, OPEN_PORT);
        let non_member = syn(v4(198, 18, 7, 7), 4444, 9090);
        let mut rows = Vec::new();
        let mut big_memory = 0.0;
        // The host hash's buckets, allocated when it is created, before any set.
        let host_reserve = map_memlock(&self.pin.0, map_names::SET_HOSTS);
        for file in [&small_file, &big_file] {
            let set_maps = |pin: &Path| {
                map_memlock(pin, map_names::SET_NETS) + map_memlock(pin, map_names::SET_HOSTS)
            };
            let before = set_maps(&self.pin.0);
            let (_, [parse_ms, compile_ms, apply_ms]) = apply(&self.maps, &set_policy_text(file));
            let held = set_maps(&self.pin.0).saturating_sub(before);
            let xdp = self.xdp("session_ingress");
            // A non-member's SYN to a closed port: every rule fails, the set is looked up.
            let miss_ns = median_of(ROUNDS, |_| run(xdp, &non_member, REPEAT));
            let member_ns = median_of(ROUNDS, |_| run(xdp, &member, REPEAT));
            let count = if file == &small_file {
                small.len()
            } else {
                big.len()
            };
            if file == &big_file {
                big_memory = held as f64 / count as f64;
            }
            rows.push((
                count, miss_ns, member_ns, parse_ms, compile_ms, apply_ms, held,
            ));
        }
        // Replace the 1M set with another 1M (every IPv6 prefix moved), and one live add.
        let moved: Vec<_> = big
            .iter()
            .map(|p| {
                let text = if p.contains(':') {
                    p.replacen("2001:2::", "2001:2:0:1::", 1)
                } else {
                    p.clone()
                };
                session_user::policy::sets::parse_prefix(&text).expect("bench prefix")
            })
            .collect();
        let started = Instant::now();
        self.maps
            .set_replace("block", &moved)
            .expect("replacing the big set");
        let replace_s = started.elapsed().as_secs_f64();
        let one = [session_user::policy::sets::parse_prefix("198.18.201.1").expect("prefix")];
        let add_us = median_of(ROUNDS * 4, |_| {
            let started = Instant::now();
            self.maps.set_add("block", &one, 0).expect("live add");
            let took = started.elapsed().as_secs_f64() * 1e6;
            self.maps.set_delete("block", &one).expect("live delete");
            took
        });
        let nft_s = nft_load_seconds(&big);
        let (small_n, small_miss, small_member, ..) = rows[0];
        let (big_n, big_miss, big_member, big_parse, big_compile, big_apply, _) = rows[1];
        let load_s = (big_parse + big_compile + big_apply) / 1e3;
        let ratio = (big_miss / small_miss).max(big_member / small_member);
        let _ = writeln!(
            self.md,
            "\n### Set scale (same table, same run)\n\n\
             One rule drops new flows from the set `block` (IPv4 /32s and IPv6 /128s, which the \
             host hash `SET_HOSTS` holds). A non-member's \
             SYN to a closed port fails every rule after the set lookup; a member's SYN is dropped by the set. \
             Load = parse the file + compile + write the set and the bank and switch.\n\n\
             | set prefixes | non-member SYN ns | member SYN ns | parse ms | compile ms | apply ms | set map bytes |\n\
             |---:|---:|---:|---:|---:|---:|---:|"
        );
        let mut out = Vec::new();
        for (n, miss, hit, parse_ms, compile_ms, apply_ms, held) in &rows {
            let _ = writeln!(
                self.md,
                "| {n} | {miss:.0} | {hit:.0} | {parse_ms:.1} | {compile_ms:.1} | {apply_ms:.1} | {held} |"
            );
            out.push(json!({"prefixes": n, "non_member_syn_ns": miss, "member_syn_ns": hit,
                "parse_ms": parse_ms, "compile_ms": compile_ms, "apply_ms": apply_ms, "set_bytes": held}));
        }
        let nft_text = nft_s.map_or("nft not available".to_string(), |s| format!("{s:.2} s"));
        let _ = writeln!(
            self.md,
            "\nNew-flow cost with {big_n} vs {small_n} prefixes: {ratio:.2}×; target ≤ 1.5×: {}. \
             Memory: {big_memory:.0} bytes per prefix (the kernel's accounting of SET_NETS and SET_HOSTS), \
             besides {reserve_mib:.1} MiB of SET_HOSTS buckets at max_set_entries = {BIG_SET_LIMIT}, taken at start. \
             Loading {big_n} prefixes from a file: {load_s:.2} s; replacing them live: {replace_s:.2} s; \
             target ≤ 2 s: {}; `nft -f` of the same prefixes into interval sets: {nft_text}. \
             One live add: {add_us:.0} µs; target ≤ 1 ms: {}.",
            yes_no(ratio, Some(1.5)),
            yes_no(load_s.max(replace_s), Some(2.0)),
            yes_no(add_us, Some(1000.0)),
            reserve_mib = host_reserve as f64 / (1024.0 * 1024.0),
        );
        self.json.insert(
            "set_scale".into(),
            json!({"results": out, "new_flow_ratio": ratio, "ratio_target": 1.5,
                "bytes_per_prefix": big_memory, "host_hash_reserve_bytes": host_reserve, "load_s": load_s, "replace_s": replace_s,
                "load_target_s": 2.0, "nft_load_s": nft_s, "live_add_us": add_us,
                "live_add_target_us": 1000.0}),
        );
        let _ = std::fs::remove_file(&small_file);
        let _ = std::fs::remove_file(&big_file);
        // Back to the small policy without sets for what follows.
        apply(&self.maps, &policy_text(0));
    }

    fn table_scale(&mut self) {
        let sessions_bytes = map_memlock(&self.pin.0, map_names::SESSIONS);
        let unassured_bytes = map_memlock(&self.pin.0, map_names::UNASSURED);
        let presence_bytes = map_memlock(&self.pin.0, map_names::PRESENCE);
        let per_session = (sessions_bytes + presence_bytes) as f64 / CAPACITY as f64;
        let per_session_both =
            (sessions_bytes + unassured_bytes + presence_bytes) as f64 / CAPACITY as f64;
        let conntrack = conntrack_object_size();

        let now = monotonic_ns();
        let mut table = self.table();
        let expired_count = SESSIONS / EXPIRED_SHARE;
        for i in 0..expired_count {
            let (key, mut session) = established(&preloaded_flow(i * EXPIRED_SHARE), now);
            session.expires_ns = now - 1;
            table.insert(key, session, 0).expect("expiring a session");
        }
        let started = Instant::now();
        let removed = self.maps.reap(monotonic_ns(), |_, _| {}).expect("reaping");
        let sweep = started.elapsed().as_secs_f64();
        assert!(
            removed >= expired_count as u64,
            "the reaper removed {removed} sessions, fewer than the {expired_count} expired"
        );

        let daemon = start_daemon(&self.pin.0).map(|mut run| {
            std::thread::sleep(Duration::from_secs(6));
            // The child is `timeout`; the daemon is its only child.
            let wrapper = run.child.as_ref().expect("the daemon runs").id();
            let children =
                std::fs::read_to_string(format!("/proc/{wrapper}/task/{wrapper}/children"))
                    .expect("reading the daemon wrapper's children");
            let pid: u32 = children
                .split_whitespace()
                .next()
                .and_then(|pid| pid.parse().ok())
                .unwrap_or_else(|| panic!("no daemon under `timeout` (pid {wrapper})"));
            let before = cpu_seconds(pid);
            let started = Instant::now();
            std::thread::sleep(DAEMON_SAMPLE);
            let used = cpu_seconds(pid) - before;
            assert!(
                matches!(
                    run.child.as_mut().expect("the daemon runs").try_wait(),
                    Ok(None)
                ),
                "the daemon exited while its idle CPU was measured"
            );
            100.0 * used / started.elapsed().as_secs_f64()
        });

        let live = self.maps.all_sessions().map(|s| s.len()).unwrap_or(0);
        let _ = writeln!(
            self.md,
            "\n### Table scale\n\n\
             | measure | value | target | met |\n|---|---:|---:|:-:|\n\
             | kernel memory per session, protected table and presence filter (`memlock` / capacity {CAPACITY}) | {per_session:.0} B | 200 B | {} |\n\
             | same, both tiers (protected + unassured, a quarter of its size) and the filter | {per_session_both:.0} B | - | - |\n\
             | nf_conntrack slab object, same kernel | {} | - | - |\n\
             | reaper sweep of {SESSIONS} sessions with {removed} expired | {:.0} ms | 1000 ms | {} |\n\
             | daemon CPU with {live} idle sessions, over {}s | {} | 2 % | {} |",
            yes_no(per_session, Some(200.0)),
            conntrack.map_or("not loaded".into(), |b| format!("{b} B")),
            sweep * 1e3,
            yes_no(sweep, Some(1.0)),
            DAEMON_SAMPLE.as_secs(),
            daemon.map_or("not measured (SESSION_BIN unset)".into(), |d| format!(
                "{d:.1} %"
            )),
            daemon.map_or("-", |d| yes_no(d, Some(2.0))),
        );
        self.json.insert(
            "table_scale".into(),
            json!({"capacity": CAPACITY, "sessions_memlock_bytes": sessions_bytes,
                "unassured_memlock_bytes": unassured_bytes, "presence_memlock_bytes": presence_bytes,
                "bytes_per_session": per_session,
                "bytes_per_session_both_tiers": per_session_both, "bytes_per_session_target": 200,
                "nf_conntrack_object_bytes": conntrack,
                "reaper_sessions": SESSIONS, "reaper_removed": removed, "reaper_seconds": sweep,
                "reaper_target_seconds": 1.0, "daemon_idle_sessions": live,
                "daemon_cpu_percent": daemon, "daemon_cpu_target_percent": 2.0}),
        );
    }
}

fn merge(row: &mut Value, extra: Value) {
    if let (Value::Object(row), Value::Object(extra)) = (row, extra) {
        row.extend(extra);
    }
}

fn main() {
    if bench::only_listing() {
        return;
    }
    let pin = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/session-bench-{}",
        std::process::id()
    )));
    let sizes = loader::Sizes {
        max_set_entries: BIG_SET_LIMIT,
        ..loader::Sizes::sessions(CAPACITY)
    };
    let mut ebpf =
        loader::load(&pin.0, sizes, false, KernelLogLevel::default()).unwrap_or_else(|error| {
            panic!("loading the program (run via `cargo xtask bench` as root): {error:#}")
        });
    let mut bench_ebpf = aya::EbpfLoader::new()
        .load(BENCH_OBJECT)
        .expect("loading the benchmarks' eBPF object");
    {
        let noop: &mut Xdp = bench_ebpf
            .program_mut("session_noop")
            .expect("noop program in the benchmarks' object")
            .try_into()
            .expect("noop is XDP");
        noop.load().expect("loading the noop program");
    }
    let maps = PinnedMaps::open(&pin.0).expect("pinned maps");
    let mut settings = Settings::default();
    settings.flags &= !session_common::wire::settings_flags::TCP_WINDOW_CHECK;
    maps.write_settings(&settings).expect("settings");
    let clock = session_user::bpf::clock::calibrate(&mut ebpf).expect("calibrating the clock");
    maps.write_clock(clock).expect("clock");
    apply(&maps, &policy_text(0));
    let mut bench = Bench {
        ebpf,
        bench_ebpf,
        maps,
        pin,
        md: String::new(),
        json: serde_json::Map::new(),
    };

    let fill_started = Instant::now();
    let now = monotonic_ns();
    let mut table = bench.table();
    for i in 0..SESSIONS {
        let (key, session) = established(&preloaded_flow(i), now);
        table
            .insert(key, session, 0)
            .expect("filling the session table");
    }
    bench
        .maps
        .rebuild_presence()
        .expect("rebuilding the presence filter after the fill");
    let fill = fill_started.elapsed();

    bench.kernel_path(fill);
    bench.policy_scale();
    bench.set_scale();
    bench.table_scale();

    print!("{}", bench.md);
    let dir = bench::out_dir();
    std::fs::create_dir_all(&dir).expect("creating the bench output directory");
    std::fs::write(dir.join("kernel.md"), &bench.md).expect("writing kernel.md");
    std::fs::write(
        dir.join("kernel.json"),
        serde_json::to_string_pretty(&Value::Object(bench.json)).expect("json"),
    )
    .expect("writing kernel.json");
    println!("\nwritten: {}", dir.join("kernel.json").display());
}
