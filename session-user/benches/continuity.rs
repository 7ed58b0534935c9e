//! Sessions that outlive the firewall, measured (issue 20), run by `cargo xtask bench`
//! (root, release build):
//!
//! - `session save` of 1,000,000 sessions and `session restore` of the file into an
//!   empty table (each judged by the policy, stored in batches), and the file's bytes
//!   per session;
//! - the takeover of 100,000 conntrack entries at first start (ctnetlink dump, parse,
//!   route lookups, policy, store).
//!
//! The process moves into a network namespace of its own first, so the conntrack entries
//! it creates never touch the host's table. Prints a markdown table and writes the same
//! figures to `$SESSION_BENCH_DIR/continuity.json` and `continuity.md`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use serde_json::json;
use session_common::{
    packet::PacketMeta,
    wire::{FAMILY_IPV4, FlowKey, Session, Settings, TcpState, proto},
};
use session_testkit::bench;
use session_user::{
    bpf::{clock::monotonic_ns, kernel_log::KernelLogLevel, loader, pinned::PinnedMaps},
    continuity::{
        import::{self, unix_now_ns},
        netlink::{self, Socket},
        takeover,
    },
    policy::{compile::compile, config},
};

/// Table capacity: room for the million saved sessions.
const CAPACITY: u32 = 1 << 20;
/// Sessions saved and restored.
const SAVED: u32 = 1_000_000;
/// Conntrack entries taken over.
const CONNTRACK: u32 = 100_000;
/// The benchmark's own interface in its namespace, towards the "clients".
const IFACE: &str = "bench0";

const POLICY: &str = "[policy]\ninbound = \"drop\"\noutbound = \"accept\"\n\
    [[rule]]\nname = \"established\"\nstate = [\"established\", \"related\"]\naction = \"accept\"\n\
    [[rule]]\nname = \"ssh\"\nstate = [\"new\"]\nproto = \"tcp\"\ndport = [22]\naction = \"accept\"\n";

/// Removes a pin directory, also when the benchmark panics.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(argv: &[&str]) {
    let status = Command::new(argv[0])
        .args(&argv[1..])
        .status()
        .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
    assert!(status.success(), "{argv:?} failed: {status}");
}

/// The i-th client: 198.19.0.0/16 addresses, 16 source ports each, to 198.18.0.1:22.
fn client(i: u32) -> ([u8; 4], u16) {
    ([198, 19, (i >> 8) as u8, i as u8], 1024 + (i >> 16) as u16)
}

fn mapped(v4: [u8; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12..].copy_from_slice(&v4);
    addr
}

/// An established session from client `i` to 198.18.0.1:22, admitted on `ifindex`.
fn session(i: u32, now: u64, ifindex: u32) -> (FlowKey, Session) {
    let (src, sport) = client(i);
    let meta = PacketMeta {
        family: FAMILY_IPV4,
        proto: proto::TCP,
        src: mapped(src),
        dst: mapped([198, 18, 0, 1]),
        sport,
        dport: 22,
        ..PacketMeta::default()
    };
    let (key, mut session) = bench::established_session(&meta, now);
    session.origin_ifindex = ifindex.to_ne_bytes();
    (key, session)
}

/// A fresh table with the policy applied.
fn table(pin: &Path) -> PinnedMaps {
    let _ = std::fs::remove_dir_all(pin);
    let ebpf = loader::load(
        pin,
        loader::Sizes::sessions(CAPACITY),
        false,
        KernelLogLevel::default(),
    )
    .unwrap_or_else(|error| {
        panic!("loading the program (run via `cargo xtask bench` as root): {error:#}")
    });
    drop(ebpf);
    let maps = PinnedMaps::open(pin).expect("pinned maps");
    maps.write_settings(&Settings::default()).expect("settings");
    let config = config::parse(Path::new("bench.toml"), POLICY).expect("bench policy");
    let policy = compile(&config.policy, loader::ifindex).expect("bench policy compiles");
    maps.apply_policy(&policy).expect("applying the policy");
    maps
}

/// Creates `count` assured TCP entries in this namespace's conntrack table through
/// ctnetlink (`IPCTNL_MSG_CT_NEW`), each acknowledged.
fn fill_conntrack(count: u32) {
    let socket = Socket::open(Some(rustix::net::netlink::NETFILTER)).expect("ctnetlink socket");
    for i in 0..count {
        let (src, sport) = client(i);
        let tuple = |a: [u8; 4], b: [u8; 4], sp: u16, dp: u16| {
            let mut ip = Vec::new();
            netlink::put_attr(&mut ip, 1, &a);
            netlink::put_attr(&mut ip, 2, &b);
            let mut l4 = Vec::new();
            netlink::put_attr(&mut l4, 1, &[proto::TCP]);
            netlink::put_attr(&mut l4, 2, &sp.to_be_bytes());
            netlink::put_attr(&mut l4, 3, &dp.to_be_bytes());
            let mut out = Vec::new();
            netlink::put_attr(&mut out, 1 | 0x8000, &ip);
            netlink::put_attr(&mut out, 2 | 0x8000, &l4);
            out
        };
        let mut payload = vec![libc::AF_INET as u8, 0, 0, 0];
        netlink::put_attr(
            &mut payload,
            1 | 0x8000,
            &tuple(src, [198, 18, 0, 1], sport, 22),
        );
        netlink::put_attr(
            &mut payload,
            2 | 0x8000,
            &tuple([198, 18, 0, 1], src, 22, sport),
        );
        // IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED (the kernel confirms entries it
        // creates and refuses a status without the bit as a change of it).
        netlink::put_attr(&mut payload, 3, &14u32.to_be_bytes());
        netlink::put_attr(&mut payload, 7, &3600u32.to_be_bytes());
        let mut tcp = Vec::new();
        netlink::put_attr(&mut tcp, 1, &[TcpState::Established as u8]);
        let mut info = Vec::new();
        netlink::put_attr(&mut info, 1 | 0x8000, &tcp);
        netlink::put_attr(&mut payload, 4 | 0x8000, &info);
        // NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        let message = netlink::request(1 << 8, 0x1 | 0x4 | 0x400 | 0x200, i + 1, &payload);
        socket
            .ask(&message)
            .unwrap_or_else(|e| panic!("creating conntrack entry {i}: {e:#}"));
    }
}

fn main() {
    if bench::only_listing() {
        return;
    }
    // SAFETY: unshare has no memory preconditions; the process is single-threaded here.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        panic!(
            "cannot enter a network namespace of its own (run via `cargo xtask bench` as root): {}",
            std::io::Error::last_os_error()
        );
    }
    run(&["ip", "link", "set", "lo", "up"]);
    run(&[
        "ip", "link", "add", IFACE, "type", "veth", "peer", "name", "bench1",
    ]);
    run(&["ip", "addr", "add", "198.18.0.1/15", "dev", IFACE]);
    run(&["ip", "link", "set", IFACE, "up"]);
    run(&["ip", "link", "set", "bench1", "up"]);
    let ifindex = loader::ifindex(IFACE).expect("the bench interface");
    let pin = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/session-bench-continuity-{}",
        std::process::id()
    )));
    let out_dir = bench::out_dir();
    std::fs::create_dir_all(&out_dir).expect("creating the bench output directory");
    let file = out_dir.join("continuity-bench.table");

    let maps = table(&pin.0);
    let now = monotonic_ns();
    let sessions: Vec<_> = (0..SAVED).map(|i| session(i, now, ifindex)).collect();
    maps.insert_sessions(&sessions).expect("filling the table");
    drop(sessions);

    let started = Instant::now();
    let saved = import::save(&maps, &file, monotonic_ns(), unix_now_ns()).expect("save");
    let save_secs = started.elapsed().as_secs_f64();
    assert_eq!(saved, u64::from(SAVED));
    let bytes = std::fs::metadata(&file).expect("the saved file").len();

    let maps = table(&pin.0);
    let started = Instant::now();
    let report = import::restore(&maps, &file, monotonic_ns(), unix_now_ns()).expect("restore");
    let restore_secs = started.elapsed().as_secs_f64();
    assert_eq!(report.imported, u64::from(SAVED), "{report:?}");
    let _ = std::fs::remove_file(&file);

    let maps = table(&pin.0);
    fill_conntrack(CONNTRACK);
    let started = Instant::now();
    let report = takeover::take_over(&maps, &Settings::default(), &[ifindex]).expect("takeover");
    let takeover_secs = started.elapsed().as_secs_f64();
    assert_eq!(
        report.conntrack.imported,
        u64::from(CONNTRACK),
        "{report:?}"
    );

    let per_session = bytes as f64 / f64::from(SAVED);
    let mut md = String::from(
        "### Sessions that outlive the firewall\n\n| what | figure |\n| --- | --- |\n",
    );
    let _ = writeln!(md, "| `save` of {SAVED} sessions | {save_secs:.2} s |");
    let _ = writeln!(
        md,
        "| `restore` of {SAVED} sessions (policy check, store) | {restore_secs:.2} s |"
    );
    let _ = writeln!(md, "| file size | {per_session:.1} bytes a session |");
    let _ = writeln!(
        md,
        "| takeover of {CONNTRACK} conntrack entries | {takeover_secs:.2} s |"
    );
    print!("{md}");
    let data = json!({
        "save_1m_secs": save_secs,
        "restore_1m_secs": restore_secs,
        "file_bytes_per_session": per_session,
        "takeover_100k_conntrack_secs": takeover_secs,
    });
    std::fs::write(out_dir.join("continuity.md"), &md).expect("writing continuity.md");
    std::fs::write(
        out_dir.join("continuity.json"),
        serde_json::to_string_pretty(&data).expect("JSON"),
    )
    .expect("writing continuity.json");
}
