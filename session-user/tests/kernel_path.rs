//! Kernel-path tests: the real eBPF object, loaded through `loader::load` with its maps
//! pinned in a bpffs directory of its own, fed crafted frames with BPF_PROG_TEST_RUN
//! (`Xdp::test_run`), its maps read back through `PinnedMaps`.
//!
//! The differential test runs one long pseudo-random frame sequence through the kernel
//! program and through the host [`Model`] (the same engine over HashMaps) and requires the
//! same verdict for every frame and the same session table (every field but the two
//! timestamps) and counters after every frame, then the same rule hits. The model is
//! given CLOCK_MONOTONIC read just before each test run, so time-dependent choices (UDP
//! becomes ASSURED 2 s after its start) fall the same way on both sides.
//! `SESSION_KT_SEED=<hex>` and `SESSION_KT_FRAMES=<n>` explore other sequences.
//!
//! These tests need root and a bpffs on /sys/fs/bpf (`cargo xtask setup` mounts it); they
//! mount nothing themselves and fail, never skip, when either is missing. Each test loads
//! its own copy of the programs with its own maps under `/sys/fs/bpf/session-kt-<pid>-<n>`
//! and removes that directory when it ends, also when it panics, so they are independent
//! and may run in parallel. Run: `cargo xtask test`, or as root
//! `cargo test -p session-user --test kernel_path -- --test-threads=1`.

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{Map, MapData, RingBuf},
    programs::{ProgramError, SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use session_common::{
    engine::Outcome,
    expect::ExpectKey,
    fragment::{DatagramEntry, DatagramKey, MAX_FRAGMENT_DATAGRAMS},
    packet::ipv4_mapped,
    wire::{
        Action, Counter, CtState, Event, FAMILY_IPV4, FAMILY_IPV6, FlowKey, FlowState, Hook,
        NS_PER_SEC, RULE_HIT_SLOTS, Session, Settings, TcpState, Timeout, event_kind, map_names,
        proto, session_flags, settings_flags,
    },
};
use session_testkit::{
    accept_new_rule,
    frames::{self, Tcp, tcp_flags},
    inbound_drop_policy,
    mutate::{Mutation, Rng},
    overload_ban_rules, ping_rules, return_traffic_rule,
};
use session_user::{
    bpf::{clock::monotonic_ns, kernel_log::KernelLogLevel, loader, pinned::PinnedMaps},
    host_engine::Model,
    policy::{
        compile::{self, CompiledPolicy},
        config,
    },
};

// ---------------------------------------------------------------------------------------
// The guard: one loaded copy of the programs with its own pinned maps.
// ---------------------------------------------------------------------------------------

const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const HINT: &str = "run the kernel-path tests with `cargo xtask test` (as root; it mounts the bpffs on /sys/fs/bpf)";
/// Size of the session table in these tests: far above what any test creates, so the LRU
/// map never evicts and the model (which has no capacity) stays comparable.
const MAX_SESSIONS: u32 = 65_536;
/// The ifindex XDP test runs report: the loopback device of the current netns.
const TEST_RUN_IFINDEX: u32 = 1;

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

/// Panics with what to do unless we are root and /sys/fs/bpf is a bpffs.
fn require_root_and_bpffs() {
    let euid = rustix::process::geteuid().as_raw();
    assert!(
        euid == 0,
        "the kernel-path tests load eBPF programs and need root (euid is {euid}): {HINT}"
    );
    let stat = rustix::fs::statfs(BPFFS)
        .unwrap_or_else(|error| panic!("cannot statfs {BPFFS}: {error}; {HINT}"));
    assert!(
        stat.f_type as i64 == BPF_FS_MAGIC,
        "{BPFFS} is not a bpffs (f_type {:#x}); {HINT}",
        stat.f_type
    );
}

/// A pin directory that is removed, with everything in it, when dropped.
struct PinDir(PathBuf);

impl PinDir {
    fn unique() -> PinDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        PinDir(Path::new(BPFFS).join(format!("session-kt-{}-{n}", std::process::id())))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => eprintln!(
                "kernel_path: could not remove {}: {error}",
                self.0.display()
            ),
        }
    }
}

/// A verdict of the XDP program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Pass,
    Drop,
}

/// The program a [`Kernel`] feeds the frames of [`Kernel::run_raw`] to: the XDP program,
/// or the TC ingress program that `[attach] tc_ingress` puts in its place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ingress {
    Xdp,
    Tc,
}

/// Added to a TC return value other than `TC_ACT_OK` and `TC_ACT_SHOT`, so that
/// [`Kernel::run_raw`] reports it as no XDP action.
const TC_OTHER: u32 = 1000;

/// The programs loaded with their maps pinned under a fresh directory, the settings
/// written and the policy applied, as the daemon does before attaching.
struct Kernel {
    ebpf: Ebpf,
    maps: PinnedMaps,
    ingress: Ingress,
    /// The event ring buffer, read here as the daemon reads it.
    events: RingBuf<MapData>,
    /// Declared last so the directory goes after the program and map fds are closed.
    _pin: PinDir,
}

impl Kernel {
    fn start(settings: &Settings, policy: &CompiledPolicy) -> Kernel {
        Kernel::start_sized(settings, policy, MAX_SESSIONS, Ingress::Xdp)
    }

    /// [`Kernel::start`] with a table of `max_sessions`, for runs that create more
    /// sessions than [`MAX_SESSIONS`] can hold without evicting, and frames judged by
    /// `ingress`.
    fn start_sized(
        settings: &Settings,
        policy: &CompiledPolicy,
        max_sessions: u32,
        ingress: Ingress,
    ) -> Kernel {
        Kernel::start_with(
            settings,
            policy,
            loader::Sizes::sessions(max_sessions),
            ingress,
        )
    }

    /// [`Kernel::start_sized`] with every size the loader takes from a config.
    fn start_with(
        settings: &Settings,
        policy: &CompiledPolicy,
        sizes: loader::Sizes,
        ingress: Ingress,
    ) -> Kernel {
        require_root_and_bpffs();
        let pin = PinDir::unique();
        let started = Instant::now();
        let tc_ingress = ingress == Ingress::Tc;
        let ebpf = loader::load(&pin.0, sizes, tc_ingress, KernelLogLevel::default())
            .unwrap_or_else(|error| {
                panic!(
                    "loader::load({}) failed (verifier rejection or load error): {error:?}",
                    pin.0.display()
                )
            });
        let maps = PinnedMaps::open(&pin.0)
            .unwrap_or_else(|error| panic!("PinnedMaps::open({}): {error:?}", pin.0.display()));
        maps.write_settings(settings)
            .unwrap_or_else(|error| panic!("write_settings: {error:?}"));
        let generation = maps
            .apply_policy(policy)
            .unwrap_or_else(|error| panic!("apply_policy: {error:?}"));
        assert_eq!(
            generation, 1,
            "a fresh pin directory starts at policy generation 1"
        );
        println!(
            "kernel_path: loaded both programs into {} in {:?}",
            pin.0.display(),
            started.elapsed()
        );
        let events_path = pin.0.join(map_names::EVENTS);
        let events = MapData::from_pin(&events_path)
            .map(Map::RingBuf)
            .map_err(|error| format!("{error:?}"))
            .and_then(|map| RingBuf::try_from(map).map_err(|error| format!("{error:?}")))
            .unwrap_or_else(|error| panic!("opening {}: {error}", events_path.display()));
        Kernel {
            ebpf,
            maps,
            ingress,
            events,
            _pin: pin,
        }
    }

    /// The default kernel: test settings and the test policy.
    fn standard() -> Kernel {
        Kernel::start(&test_settings(), &test_policy())
    }

    fn xdp(&self) -> &Xdp {
        self.ebpf
            .program("session_ingress")
            .expect("session_ingress missing from the object")
            .try_into()
            .expect("session_ingress is not an XDP program")
    }

    /// Runs `frame` once through the ingress program; its raw return value and duration.
    /// The TC program's verdicts come as the XDP actions they stand for, anything else
    /// as [`TC_OTHER`] plus its value.
    fn run_raw(&self, frame: &[u8]) -> (u32, Duration) {
        self.try_run_raw(frame).unwrap_or_else(|error| {
            panic!(
                "BPF_PROG_TEST_RUN failed for this {}-byte frame: {error:?}\n{}",
                frame.len(),
                hex(frame)
            )
        })
    }

    /// [`Kernel::run_raw`], or the test run's error: the kernel refuses to build a socket
    /// buffer for the TC program out of some malformed frames.
    fn try_run_raw(&self, frame: &[u8]) -> Result<(u32, Duration), ProgramError> {
        let options = TestRunOptions {
            data_in: Some(frame),
            repeat: 1,
            ..TestRunOptions::new()
        };
        let result = match self.ingress {
            Ingress::Xdp => self.xdp().test_run(options),
            Ingress::Tc => self.tc_ingress().test_run(options),
        }?;
        let value = match (self.ingress, result.return_value) {
            (Ingress::Xdp, value) => value,
            (Ingress::Tc, TC_ACT_OK) => XDP_PASS,
            (Ingress::Tc, TC_ACT_SHOT) => XDP_DROP,
            (Ingress::Tc, other) => TC_OTHER.wrapping_add(other),
        };
        Ok((value, result.duration))
    }

    fn tc_ingress(&self) -> &SchedClassifier {
        self.ebpf
            .program("session_ingress_tc")
            .expect("session_ingress_tc missing from the object")
            .try_into()
            .expect("session_ingress_tc is not a TC classifier")
    }

    /// Runs `frame` and maps the return value to a verdict; panics on anything else
    /// (XDP_ABORTED means the program hit an error path, which must never happen).
    fn run(&self, frame: &[u8]) -> Verdict {
        match self.run_raw(frame).0 {
            XDP_PASS => Verdict::Pass,
            XDP_DROP => Verdict::Drop,
            XDP_ABORTED => panic!(
                "XDP_ABORTED for this {}-byte frame:\n{}",
                frame.len(),
                hex(frame)
            ),
            other => panic!(
                "unexpected XDP return value {other} for this {}-byte frame:\n{}",
                frame.len(),
                hex(frame)
            ),
        }
    }

    /// Runs `frame` and requires `expected`.
    fn expect(&self, what: &str, frame: &[u8], expected: Verdict) {
        let got = self.run(frame);
        assert_eq!(
            got,
            expected,
            "{what}: the XDP program returned {got:?}, expected {expected:?}; frame:\n{}",
            hex(frame)
        );
    }

    /// The kinds of the events reported since the last call, oldest first, draining the
    /// ring buffer as the daemon does (so it never fills).
    fn take_event_kinds(&mut self) -> Vec<u8> {
        let mut kinds = Vec::new();
        while let Some(record) = self.events.next() {
            let event: Event = bytemuck::pod_read_unaligned(&record[..size_of::<Event>()]);
            kinds.push(event.kind);
        }
        kinds
    }

    /// The whole session table.
    fn sessions(&self) -> HashMap<FlowKey, Session> {
        self.maps
            .all_sessions()
            .unwrap_or_else(|error| panic!("reading the session tables: {error:?}"))
            .into_iter()
            .collect()
    }

    /// The fragment records (the `FRAGMENTS` map, which is not pinned: read through the
    /// loaded object).
    fn fragment_records(&self) -> HashMap<DatagramKey, DatagramEntry> {
        let map = self
            .ebpf
            .map(map_names::FRAGMENTS)
            .expect("FRAGMENTS missing from the object");
        let records = aya::maps::HashMap::<_, DatagramKey, DatagramEntry>::try_from(map)
            .unwrap_or_else(|error| panic!("FRAGMENTS is not a hash map: {error:?}"));
        records
            .iter()
            .map(|entry| entry.unwrap_or_else(|error| panic!("reading FRAGMENTS: {error:?}")))
            .collect()
    }

    fn session(&self, key: &FlowKey) -> Option<Session> {
        self.sessions().get(key).copied()
    }

    /// Global counters, summed over CPUs, in `Counter::ALL` order.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.maps
            .counters()
            .unwrap_or_else(|error| panic!("reading COUNTERS: {error:?}"))
    }

    fn counter(&self, counter: Counter) -> u64 {
        self.counters()[counter as usize].1
    }

    fn rule_hits(&self) -> Vec<u64> {
        self.maps
            .rule_hits()
            .unwrap_or_else(|error| panic!("reading RULE_HITS: {error:?}"))
    }
}

// ---------------------------------------------------------------------------------------
// Policy, settings, frames.
// ---------------------------------------------------------------------------------------

/// The restrictive policy (established/related accept; new TCP to 8080 accept; default
/// inbound drop), plus narrow rules so UDP, ICMP echo, a generic protocol and an explicit
/// drop rule each have a passing and a dropping case.
const POLICY_TOML: &str = concat!(
    inbound_drop_policy!(),
    r#"
[[rule]]
name = "no-telnet"
proto = "tcp"
dport = [23]
action = "drop"
log = true
"#,
    return_traffic_rule!("return-traffic"),
    accept_new_rule!("web", "tcp", 8080),
    accept_new_rule!("mdns", "udp", 5353),
    "log = true\n",
    ping_rules!(),
    r#"
[[rule]]
name = "gre"
state = ["new"]
proto = 47
action = "accept"
"#
);

/// Rule ids of the test policy, in file order.
const RULE_NO_TELNET: u16 = 0;
const RULE_RETURN: u16 = 1;
const RULE_WEB: u16 = 2;

fn test_policy() -> CompiledPolicy {
    let config = config::parse(Path::new("kernel_path.toml"), POLICY_TOML)
        .unwrap_or_else(|error| panic!("the test policy does not parse: {error}"));
    compile::compile(&config.policy, |_| None)
        .unwrap_or_else(|error| panic!("the test policy does not compile: {error}"))
}

/// Rules the differential runs put before [`POLICY_TOML`] so the kernel's bitmap classifier is
/// compared with the model's linear walk on every dimension: networks of several prefix
/// lengths in both families, port ranges on both ports, ICMP types, a state other than
/// new, an egress-only rule (which ingress frames must never match) and interface rules
/// for the test-run interface and another one.
const DIFFERENTIAL_RULES_TOML: &str = r#"
[[rule]]
name = "udp-set-drop"
state = ["new"]
proto = "udp"
src = ["@diff-src"]
dst = ["@diff-dst", "2001:2:0:1::2"]
action = "drop"

[[rule]]
name = "v4-alt-web"
state = ["new"]
proto = "tcp"
src = ["198.18.0.1/32", "198.18.1.0/24"]
dst = ["198.18.0.0/23"]
sport = ["30000-44999"]
dport = ["8000-9099"]
action = "accept"

[[rule]]
name = "v6-dns"
state = ["new"]
proto = "udp"
src = ["2001:2::/64"]
dst = ["2001:2:0:1::/64", "2001:2::2/128"]
dport = [53, "5353-5360"]
action = "accept"
log = true

[[rule]]
name = "v4-udp-unprivileged-sport"
state = ["new"]
family = "ipv4"
proto = "udp"
dst = ["198.18.0.0/15"]
sport = ["1024-65535"]
action = "accept"

[[rule]]
name = "egress-only-alt-web"
direction = "out"
state = ["new"]
proto = "tcp"
dport = [9090]
action = "accept"

[[rule]]
name = "udp-elsewhere"
iface = ["elsewhere"]
state = ["new"]
proto = "udp"
action = "accept"

[[rule]]
name = "icmp-info-on-lo"
iface = ["lo"]
state = ["new", "invalid", "untracked"]
proto = "icmp"
icmp_type = [9, 10, 13, 14, 42]
action = "accept"

[[rule]]
name = "neighbour-discovery"
state = ["untracked"]
proto = "icmpv6"
icmp_type = [133, 134, 135, 136]
dst = ["2001:2::/48"]
action = "accept"

[[rule]]
name = "v6-invalid-from-lab"
state = ["invalid"]
src = ["2001:2::/63"]
action = "accept"

[sets]
diff-src = ["198.18.0.3", "198.18.1.0/24", "2001:2::3", "2001:2:0:1::/64"]
diff-dst = ["198.18.0.1", "2001:2::1/128"]
"#;

/// [`DIFFERENTIAL_RULES_TOML`] then [`POLICY_TOML`] (first, so they take new flows the
/// standard rules would otherwise decide), with `lo` as the test-run interface.
fn differential_policy() -> CompiledPolicy {
    let text = format!("{DIFFERENTIAL_RULES_TOML}{POLICY_TOML}");
    let config = config::parse(Path::new("differential.toml"), &text)
        .unwrap_or_else(|error| panic!("the differential policy does not parse: {error}"));
    compile::compile(&config.policy, |name| match name {
        "lo" => Some(TEST_RUN_IFINDEX),
        _ => Some(TEST_RUN_IFINDEX + 1000),
    })
    .unwrap_or_else(|error| panic!("the differential policy does not compile: {error}"))
}

/// Requires that the frame mix reached the rules that exercise the classifier's
/// dimensions, so the agreement covered networks, port ranges and ICMP types, and that the
/// rules no ingress frame may match (egress only, another interface) were never hit.
fn require_classifier_rules_hit(policy: &CompiledPolicy, hits: &[u64]) {
    let id = |name: &str| {
        policy
            .names
            .iter()
            .position(|stored| compile::decode_name(stored) == name)
            .unwrap_or_else(|| panic!("rule {name} missing from the differential policy"))
    };
    for name in [
        "udp-set-drop",
        "v4-alt-web",
        "v6-dns",
        "v4-udp-unprivileged-sport",
        "icmp-info-on-lo",
        "neighbour-discovery",
    ] {
        assert!(
            hits[id(name)] > 0,
            "no frame matched rule {name}: the differential mix no longer exercises it"
        );
    }
    for name in ["egress-only-alt-web", "udp-elsewhere"] {
        assert_eq!(
            hits[id(name)],
            0,
            "rule {name} cannot match an XDP test run"
        );
    }
}

/// Kernel defaults scaled up 1000 times: the same ordering between timeouts (so the same
/// timeout choices), but nothing expires while a test runs.
fn test_settings() -> Settings {
    let mut settings = Settings::default();
    for (i, (_, _, seconds)) in Timeout::DEFAULTS.iter().enumerate() {
        settings.timeouts_ns[i] = seconds * 1000 * NS_PER_SEC;
    }
    settings
}

fn ip(text: &str) -> IpAddr {
    text.parse()
        .unwrap_or_else(|_| panic!("bad address literal {text}"))
}

fn mapped(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The key of a flow given with its `lo` endpoint first.
fn key(protocol: u8, lo: (IpAddr, u16), hi: (IpAddr, u16)) -> FlowKey {
    FlowKey {
        addr_lo: mapped(lo.0),
        addr_hi: mapped(hi.0),
        port_lo: lo.1,
        port_hi: hi.1,
        proto: protocol,
        family: if lo.0.is_ipv4() {
            FAMILY_IPV4
        } else {
            FAMILY_IPV6
        },
        _pad: [0; 2],
    }
}

fn tcp_frame(src: IpAddr, dst: IpAddr, segment: Tcp) -> Vec<u8> {
    frames::frame(src, dst, frames::tcp(segment))
}

/// Length of the IP packet inside an untagged Ethernet frame (what byte counters count).
fn ip_len(frame: &[u8]) -> u64 {
    (frame.len() - 14) as u64
}

/// An ARP request (non-IP).
fn arp_frame() -> Vec<u8> {
    let mut out = vec![0xff; 6];
    out.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
    out.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    out.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 198, 18, 0, 1]);
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0, 198, 18, 0, 2]);
    out.resize(60, 0);
    out
}

/// Inserts an 802.1Q tag after the MAC addresses.
fn vlan_tagged(frame: &[u8], tpid: u16, vid: u16) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    out.extend_from_slice(&tpid.to_be_bytes());
    out.extend_from_slice(&vid.to_be_bytes());
    out.extend_from_slice(&frame[12..]);
    out
}

/// Inserts an 8-byte hop-by-hop options header (PadN) into an IPv6 packet.
fn with_hop_by_hop(ip6: &[u8]) -> Vec<u8> {
    let next = ip6[6];
    let payload_len = u16::from_be_bytes([ip6[4], ip6[5]]) + 8;
    let mut out = ip6[..40].to_vec();
    out[4..6].copy_from_slice(&payload_len.to_be_bytes());
    out[6] = 0;
    out.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    out.extend_from_slice(&ip6[40..]);
    out
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, chunk) in bytes.chunks(16).enumerate() {
        let _ = write!(out, "  {:04x}:", i * 16);
        for byte in chunk {
            let _ = write!(out, " {byte:02x}");
        }
        out.push('\n');
    }
    out
}

fn key_str(key: &FlowKey) -> String {
    let addr = |bytes: &[u8; 16]| -> String {
        if key.family == FAMILY_IPV4 {
            Ipv4Addr::new(bytes[12], bytes[13], bytes[14], bytes[15]).to_string()
        } else {
            format!("[{}]", Ipv6Addr::from(*bytes))
        }
    };
    format!(
        "proto {} {}:{} <-> {}:{}",
        key.proto,
        addr(&key.addr_lo),
        key.port_lo,
        addr(&key.addr_hi),
        key.port_hi
    )
}

/// A session with the clock-dependent fields cleared, for comparing kernel and model.
fn timeless(session: &Session) -> Session {
    Session {
        created_ns: 0,
        expires_ns: 0,
        ..*session
    }
}

// ---------------------------------------------------------------------------------------
// Hand-written scenarios.
// ---------------------------------------------------------------------------------------

#[test]
fn tcp_handshake_creates_one_session_and_counts_each_direction() {
    let k = Kernel::standard();
    let client = ip("198.18.0.1");
    let server = ip("198.18.0.2");
    let flow = key(proto::TCP, (client, 40000), (server, 8080));

    let syn = tcp_frame(
        client,
        server,
        Tcp::new(40000, 8080, tcp_flags::SYN)
            .seq_ack(1000, 0)
            .wscale(7),
    );
    k.expect("SYN to 8080", &syn, Verdict::Pass);
    let sessions = k.sessions();
    assert_eq!(sessions.len(), 1, "one session after the SYN: {sessions:?}");
    let s = sessions
        .get(&flow)
        .unwrap_or_else(|| panic!("no session under {}: {sessions:?}", key_str(&flow)));
    assert_eq!(
        TcpState::from_u8(s.state),
        TcpState::SynSent,
        "after SYN: {s:?}"
    );
    assert_eq!(s.flags, session_flags::ORIG_IS_LO, "after SYN: {s:?}");
    assert_eq!(
        (s.packets, s.bytes),
        ([1, 0], [ip_len(&syn), 0]),
        "after SYN"
    );
    assert_eq!(s.rule_id, RULE_WEB, "admitted by the web rule");
    assert_eq!(s.verdict_generation, 1);
    let now = monotonic_ns();
    assert!(
        s.created_ns <= now && s.expires_ns > now,
        "created {} expires {} now {now}",
        s.created_ns,
        s.expires_ns
    );

    let syn_ack = tcp_frame(
        server,
        client,
        Tcp::new(8080, 40000, tcp_flags::SYN | tcp_flags::ACK)
            .seq_ack(5000, 1001)
            .wscale(7),
    );
    k.expect("SYN-ACK", &syn_ack, Verdict::Pass);
    let s = k.session(&flow).expect("session after SYN-ACK");
    assert_eq!(
        TcpState::from_u8(s.state),
        TcpState::SynRecv,
        "after SYN-ACK: {s:?}"
    );
    assert_eq!(
        s.flags,
        session_flags::ORIG_IS_LO | session_flags::SEEN_REPLY,
        "after SYN-ACK: {s:?}"
    );
    assert_eq!(
        (s.packets, s.bytes),
        ([1, 1], [ip_len(&syn), ip_len(&syn_ack)]),
        "after SYN-ACK"
    );

    let ack = tcp_frame(
        client,
        server,
        Tcp::new(40000, 8080, tcp_flags::ACK)
            .seq_ack(1001, 5001)
            .window(502),
    );
    k.expect("handshake ACK", &ack, Verdict::Pass);
    let s = k.session(&flow).expect("session after ACK");
    assert_eq!(
        TcpState::from_u8(s.state),
        TcpState::Established,
        "after ACK: {s:?}"
    );
    assert_eq!(
        s.flags,
        session_flags::ORIG_IS_LO
            | session_flags::SEEN_REPLY
            | session_flags::ASSURED
            | session_flags::PROTECTED,
        "after ACK: {s:?}"
    );

    let data = tcp_frame(
        client,
        server,
        Tcp::new(40000, 8080, tcp_flags::ACK | tcp_flags::PSH)
            .seq_ack(1001, 5001)
            .window(502)
            .payload(100),
    );
    k.expect("client data", &data, Verdict::Pass);
    let reply = tcp_frame(
        server,
        client,
        Tcp::new(8080, 40000, tcp_flags::ACK | tcp_flags::PSH)
            .seq_ack(5001, 1101)
            .window(502)
            .payload(300),
    );
    k.expect("server data", &reply, Verdict::Pass);
    let s = k.session(&flow).expect("session after data");
    assert_eq!(TcpState::from_u8(s.state), TcpState::Established);
    assert_eq!(
        s.packets,
        [3, 2],
        "packets [original, reply] after SYN, ACK, data / SYN-ACK, data"
    );
    assert_eq!(
        s.bytes,
        [
            ip_len(&syn) + ip_len(&ack) + ip_len(&data),
            ip_len(&syn_ack) + ip_len(&reply)
        ],
        "bytes [original, reply] (IP lengths {}, {}, {} / {}, {})",
        ip_len(&syn),
        ip_len(&ack),
        ip_len(&data),
        ip_len(&syn_ack),
        ip_len(&reply)
    );
    assert_eq!(k.sessions().len(), 1, "still exactly one session");
    let live = k
        .maps
        .live_sessions(monotonic_ns())
        .unwrap_or_else(|error| panic!("live_sessions: {error:?}"));
    assert_eq!(
        live.len(),
        1,
        "live_sessions sees the one session: {live:?}"
    );
    assert_eq!(live[0].0, flow);

    let c = |counter| k.counter(counter);
    assert_eq!(c(Counter::PacketsSeen), 5);
    assert_eq!(c(Counter::PacketsAccepted), 5);
    assert_eq!(c(Counter::PacketsDropped), 0);
    assert_eq!(c(Counter::StateNew), 1, "only the SYN is NEW");
    assert_eq!(
        c(Counter::StateEstablished),
        4,
        "SYN-ACK, handshake ACK (reply seen) and data are ESTABLISHED"
    );
    assert_eq!(c(Counter::SessionsCreated), 1);
    let hits = k.rule_hits();
    assert_eq!(hits[RULE_WEB as usize], 1, "web rule hits");
    assert_eq!(hits[RULE_RETURN as usize], 4, "return-traffic rule hits");
}

#[test]
fn tcp_verdicts_follow_the_policy_ipv4() {
    tcp_verdicts(ip("198.18.0.1"), ip("198.18.0.2"));
}

#[test]
fn tcp_verdicts_follow_the_policy_ipv6() {
    tcp_verdicts(ip("2001:2::1"), ip("2001:2::2"));
}

fn tcp_verdicts(client: IpAddr, server: IpAddr) {
    let k = Kernel::standard();
    let syn = |dport| {
        tcp_frame(
            client,
            server,
            Tcp::new(41000, dport, tcp_flags::SYN).seq_ack(7, 0),
        )
    };

    k.expect("SYN to 8080", &syn(8080), Verdict::Pass);
    let web = key(proto::TCP, (client, 41000), (server, 8080));
    let sessions = k.sessions();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert!(sessions.contains_key(&web), "session for {}", key_str(&web));

    k.expect("SYN to 9090", &syn(9090), Verdict::Drop);
    assert_eq!(k.sessions().len(), 1, "a dropped SYN creates no session");
    assert_eq!(k.counter(Counter::DropDefault), 1);

    k.expect("SYN to 23 (drop rule)", &syn(23), Verdict::Drop);
    assert_eq!(k.sessions().len(), 1);
    assert_eq!(k.counter(Counter::DropRule), 1);
    assert_eq!(k.rule_hits()[RULE_NO_TELNET as usize], 1);

    let (invalid, invalid_state) = (
        k.counter(Counter::StateInvalid),
        k.counter(Counter::InvalidTcpState),
    );
    let stray_ack = tcp_frame(
        client,
        server,
        Tcp::new(41001, 8080, tcp_flags::ACK).seq_ack(100, 200),
    );
    k.expect("stray ACK without a session", &stray_ack, Verdict::Drop);
    assert_eq!(
        k.counter(Counter::StateInvalid),
        invalid + 1,
        "state_invalid"
    );
    assert_eq!(
        k.counter(Counter::InvalidTcpState),
        invalid_state + 1,
        "invalid_tcp_state"
    );
    assert_eq!(
        k.sessions().len(),
        1,
        "an invalid packet creates no session"
    );

    let flags_before = k.counter(Counter::InvalidTcpFlags);
    let xmas = tcp_frame(
        client,
        server,
        Tcp::new(
            41002,
            8080,
            tcp_flags::SYN | tcp_flags::FIN | tcp_flags::RST,
        ),
    );
    k.expect("SYN|FIN|RST", &xmas, Verdict::Drop);
    assert_eq!(k.counter(Counter::InvalidTcpFlags), flags_before + 1);

    // The SYN-ACK for the refused 9090 SYN has no session either.
    let orphan_syn_ack = tcp_frame(
        server,
        client,
        Tcp::new(9090, 41000, tcp_flags::SYN | tcp_flags::ACK).seq_ack(50, 8),
    );
    k.expect("SYN-ACK without a session", &orphan_syn_ack, Verdict::Drop);
    assert_eq!(k.sessions().len(), 1);
}

#[test]
fn udp_icmp_and_related_verdicts_ipv4() {
    udp_icmp_related(ip("198.18.0.1"), ip("198.18.0.2"), ip("198.18.0.254"));
}

#[test]
fn udp_icmp_and_related_verdicts_ipv6() {
    udp_icmp_related(ip("2001:2::1"), ip("2001:2::2"), ip("2001:2::fe"));
}

fn udp_icmp_related(client: IpAddr, server: IpAddr, router: IpAddr) {
    let v6 = client.is_ipv6();
    let k = Kernel::standard();
    let icmp_proto = if v6 { proto::ICMPV6 } else { proto::ICMP };

    // UDP: new to 5353 passes and creates an UNREPLIED session; the reply passes and
    // makes it REPLIED; new to 5354 drops and creates nothing.
    let query = frames::frame(client, server, frames::udp(33000, 5353, 40));
    k.expect("UDP to 5353", &query, Verdict::Pass);
    let udp_key = key(proto::UDP, (client, 33000), (server, 5353));
    let s = k.session(&udp_key).expect("UDP session");
    assert_eq!(FlowState::from_u8(s.state), FlowState::Unreplied);
    assert_eq!((s.packets, s.bytes), ([1, 0], [ip_len(&query), 0]));
    let answer = frames::frame(server, client, frames::udp(5353, 33000, 120));
    k.expect("UDP reply", &answer, Verdict::Pass);
    let s = k.session(&udp_key).expect("UDP session");
    assert_eq!(FlowState::from_u8(s.state), FlowState::Replied);
    assert_eq!(
        (s.packets, s.bytes),
        ([1, 1], [ip_len(&query), ip_len(&answer)])
    );
    k.expect(
        "UDP to 5354",
        &frames::frame(client, server, frames::udp(33001, 5354, 8)),
        Verdict::Drop,
    );
    assert_eq!(k.sessions().len(), 1, "only the 5353 flow");

    // ICMP echo: request passes (NEW) and creates a session keyed on the id; the reply
    // passes as ESTABLISHED; a reply nobody asked for is INVALID.
    let request = frames::frame(client, server, frames::echo(v6, false, 0x4242, 1));
    k.expect("echo request", &request, Verdict::Pass);
    let echo_key = key(icmp_proto, (client, 0x4242), (server, 0x4242));
    let s = k.session(&echo_key).unwrap_or_else(|| {
        panic!(
            "no echo session under {}: {:?}",
            key_str(&echo_key),
            k.sessions()
        )
    });
    assert_eq!(FlowState::from_u8(s.state), FlowState::Unreplied);
    let established = k.counter(Counter::StateEstablished);
    let reply = frames::frame(server, client, frames::echo(v6, true, 0x4242, 1));
    k.expect("echo reply", &reply, Verdict::Pass);
    assert_eq!(k.counter(Counter::StateEstablished), established + 1);
    let s = k.session(&echo_key).expect("echo session");
    assert_eq!(FlowState::from_u8(s.state), FlowState::Replied);
    assert_eq!(
        (s.packets, s.bytes),
        ([1, 1], [ip_len(&request), ip_len(&reply)])
    );
    let invalid_icmp = k.counter(Counter::InvalidIcmp);
    k.expect(
        "unsolicited echo reply",
        &frames::frame(server, client, frames::echo(v6, true, 0x5555, 1)),
        Verdict::Drop,
    );
    assert_eq!(k.counter(Counter::InvalidIcmp), invalid_icmp + 1);

    // ICMP errors: quoting the tracked TCP flow they are RELATED and pass; quoting an
    // unknown flow they are INVALID and drop.
    let syn_ip = frames::ip_packet(
        client,
        server,
        proto::TCP,
        &frames::tcp(Tcp::new(42000, 8080, tcp_flags::SYN).seq_ack(1, 0)).1,
    );
    k.expect("SYN to 8080", &frames::ethernet(&syn_ip), Verdict::Pass);
    let unreachable = if v6 { (1, 4) } else { (3, 3) };
    let related = k.counter(Counter::StateRelated);
    let error = frames::icmp_error(router, client, unreachable.0, unreachable.1, &syn_ip);
    k.expect("ICMP error quoting the TCP flow", &error, Verdict::Pass);
    assert_eq!(
        k.counter(Counter::StateRelated),
        related + 1,
        "state_related"
    );
    let udp_ip = frames::ip_packet(client, server, proto::UDP, &frames::udp(33000, 5353, 40).1);
    k.expect(
        "ICMP error quoting the UDP flow",
        &frames::icmp_error(server, client, unreachable.0, unreachable.1, &udp_ip),
        Verdict::Pass,
    );
    assert_eq!(k.counter(Counter::StateRelated), related + 2);
    let unknown_ip = frames::ip_packet(
        client,
        server,
        proto::TCP,
        &frames::tcp(Tcp::new(42001, 8080, tcp_flags::SYN)).1,
    );
    let invalid_icmp = k.counter(Counter::InvalidIcmp);
    k.expect(
        "ICMP error quoting an unknown flow",
        &frames::icmp_error(router, client, unreachable.0, unreachable.1, &unknown_ip),
        Verdict::Drop,
    );
    assert_eq!(k.counter(Counter::InvalidIcmp), invalid_icmp + 1);
    let sessions = k.sessions();
    assert_eq!(
        sessions.len(),
        3,
        "UDP, echo and TCP sessions: {sessions:?}"
    );
    let s = sessions[&udp_key];
    assert_eq!(
        s.packets,
        [1, 1],
        "an ICMP error does not count on the flow it quotes"
    );

    if v6 {
        // Neighbour discovery is UNTRACKED; this policy accepts no untracked traffic.
        let untracked = k.counter(Counter::StateUntracked);
        let solicit = frames::frame(client, server, frames::icmp(true, 135, 0, [0; 4], &[0; 16]));
        k.expect("neighbour solicitation", &solicit, Verdict::Drop);
        assert_eq!(k.counter(Counter::StateUntracked), untracked + 1);
        // An extension header in front of the transport header changes nothing.
        let udp6 = frames::ip_packet(client, server, proto::UDP, &frames::udp(33000, 5353, 4).1);
        k.expect(
            "UDP behind a hop-by-hop header",
            &frames::ethernet(&with_hop_by_hop(&udp6)),
            Verdict::Pass,
        );
        assert_eq!(k.session(&udp_key).expect("UDP session").packets, [2, 1]);
    }
}

#[test]
fn interface_rules_see_the_test_run_ifindex() {
    // BPF_PROG_TEST_RUN delivers XDP frames as if received on the netns loopback (ifindex
    // 1): a rule bound to it matches, a rule bound to another interface does not.
    let toml = r#"
[[rule]]
name = "on-lo"
iface = ["lo"]
proto = "udp"
dport = [7]
action = "accept"

[[rule]]
name = "elsewhere"
iface = ["elsewhere"]
proto = "udp"
dport = [8]
action = "accept"
"#;
    let config = config::parse(Path::new("iface.toml"), toml)
        .unwrap_or_else(|error| panic!("iface policy does not parse: {error}"));
    let policy = compile::compile(&config.policy, |name| match name {
        "lo" => Some(TEST_RUN_IFINDEX),
        _ => Some(TEST_RUN_IFINDEX + 1000),
    })
    .unwrap_or_else(|error| panic!("iface policy does not compile: {error}"));
    let k = Kernel::start(&test_settings(), &policy);
    let (client, server) = (ip("198.18.0.1"), ip("198.18.0.2"));
    k.expect(
        "UDP matching the rule on lo",
        &frames::frame(client, server, frames::udp(1000, 7, 8)),
        Verdict::Pass,
    );
    k.expect(
        "UDP matching only the rule on another interface",
        &frames::frame(client, server, frames::udp(1000, 8, 8)),
        Verdict::Drop,
    );
    assert_eq!(k.rule_hits()[0], 1, "the lo rule was hit once");
    assert_eq!(k.sessions().len(), 1);
}

#[test]
fn direction_rules_apply_to_their_own_program_only() {
    // The hook is a classifier dimension: the TC egress program must match the
    // `direction = "out"` rule and never the `"in"` one, and the XDP program the reverse.
    let toml = r#"
[policy]
inbound = "drop"
outbound = "drop"

[[rule]]
name = "in-8080"
direction = "in"
state = ["new"]
proto = "tcp"
dport = [8080]
action = "accept"

[[rule]]
name = "out-9090"
direction = "out"
state = ["new"]
proto = "tcp"
dport = [9090]
action = "accept"
"#;
    let config = config::parse(Path::new("direction.toml"), toml)
        .unwrap_or_else(|error| panic!("direction policy does not parse: {error}"));
    let policy = compile::compile(&config.policy, |_| None)
        .unwrap_or_else(|error| panic!("direction policy does not compile: {error}"));
    let k = Kernel::start(&test_settings(), &policy);
    let tc: &SchedClassifier = k
        .ebpf
        .program("session_egress")
        .expect("session_egress missing from the object")
        .try_into()
        .expect("session_egress is not a TC classifier");
    let (client, server) = (ip("198.18.0.1"), ip("198.18.0.2"));
    for (cport, dport, xdp_verdict, tc_verdict) in [
        (40001, 8080, Verdict::Pass, TC_ACT_SHOT),
        (40002, 9090, Verdict::Drop, TC_ACT_OK),
    ] {
        let syn = tcp_frame(client, server, Tcp::new(cport, dport, tcp_flags::SYN));
        k.expect(&format!("XDP: SYN to {dport}"), &syn, xdp_verdict);
        // Another client port, so the egress SYN is a new flow too.
        let syn = tcp_frame(client, server, Tcp::new(cport + 100, dport, tcp_flags::SYN));
        let returned = tc
            .test_run(TestRunOptions {
                data_in: Some(&syn),
                repeat: 1,
                ..TestRunOptions::new()
            })
            .unwrap_or_else(|error| panic!("TC test run of a SYN to {dport}: {error:?}"))
            .return_value;
        assert_eq!(
            returned, tc_verdict,
            "TC egress: SYN to {dport} returned {returned} (TC_ACT_OK is 0, TC_ACT_SHOT 2)"
        );
    }
    assert_eq!(
        &k.rule_hits()[..2],
        &[1, 1],
        "each rule hit once, by its own hook"
    );
}

/// Compiles a policy for the reload test, with `lo` as the test-run interface.
fn reload_policy(toml: &str) -> CompiledPolicy {
    let config = config::parse(Path::new("reload.toml"), toml)
        .unwrap_or_else(|error| panic!("reload policy does not parse: {error}\n{toml}"));
    compile::compile(&config.policy, |name| match name {
        "lo" => Some(TEST_RUN_IFINDEX),
        _ => Some(TEST_RUN_IFINDEX + 1000),
    })
    .unwrap_or_else(|error| panic!("reload policy does not compile: {error}"))
}

#[test]
fn a_smaller_policy_reloaded_into_a_used_bank_sees_no_stale_classifier_entries() {
    // The first policy fills bank 1 with a /32 source network and two interface entries;
    // the second goes to bank 0; the third, smaller, back into bank 1. Had bank 1 kept the
    // first policy's /32 (bits {0}), 198.18.0.1 would match the third policy's entry 0;
    // had it kept the first policy's `lo` bitmap ({1}), entry 0 would not match on lo.
    let first = reload_policy(
        r#"
[[rule]]
name = "one-host-elsewhere"
iface = ["elsewhere"]
proto = "udp"
src = ["198.18.0.1/32"]
dport = [7]
action = "accept"

[[rule]]
name = "tcp-on-lo"
iface = ["lo"]
proto = "tcp"
action = "accept"

[[rule]]
name = "spare"
proto = "udp"
src = ["198.18.0.0/24", "2001:2::/64"]
dport = ["1-6"]
action = "accept"
"#,
    );
    let second = reload_policy(
        r#"
[[rule]]
name = "anything-udp"
proto = "udp"
action = "accept"
"#,
    );
    let third = reload_policy(
        r#"
[[rule]]
name = "other-net-echo"
proto = "udp"
src = ["198.19.0.0/16"]
dport = [7]
action = "accept"
"#,
    );
    let k = Kernel::start(&test_settings(), &first);
    for (policy, bank) in [(&second, 0), (&third, 1)] {
        k.maps
            .apply_policy(policy)
            .unwrap_or_else(|error| panic!("apply_policy: {error:?}"));
        let (active, header) = k
            .maps
            .active_policy()
            .unwrap_or_else(|error| panic!("reading the active bank: {error:?}"));
        assert_eq!(active, bank, "each apply switches banks");
        assert_eq!(header.rule_count, policy.entries.len() as u32);
    }
    let echo = |src: &str| frames::frame(ip(src), ip("198.18.0.2"), frames::udp(1000, 7, 8));
    k.expect(
        "UDP echo from a host only the first policy named",
        &echo("198.18.0.1"),
        Verdict::Drop,
    );
    k.expect(
        "UDP echo from the third policy's network, on lo",
        &echo("198.19.4.4"),
        Verdict::Pass,
    );
    k.expect(
        "UDP to a port only the first policy's third rule named",
        &frames::frame(ip("198.18.0.9"), ip("198.18.0.2"), frames::udp(1000, 3, 8)),
        Verdict::Drop,
    );
    assert_eq!(
        k.rule_hits()[0],
        1,
        "only the echo from 198.19/16 hit entry 0"
    );
}

#[test]
fn non_ip_frames_pass_and_count_only_as_non_ip() {
    let k = Kernel::standard();
    k.expect("ARP request", &arp_frame(), Verdict::Pass);
    let mut lldp = vec![
        0x01, 0x80, 0xc2, 0, 0, 0x0e, 0x02, 0, 0, 0, 0, 1, 0x88, 0xcc,
    ];
    lldp.resize(60, 0);
    k.expect("LLDP", &lldp, Verdict::Pass);
    k.expect(
        "ARP in a VLAN",
        &vlan_tagged(&arp_frame(), 0x8100, 100),
        Verdict::Pass,
    );
    let counters = k.counters();
    for (name, value) in &counters {
        let expected = if *name == "packets_non_ip" { 3 } else { 0 };
        assert_eq!(*value, expected, "counter {name}: {counters:?}");
    }
    assert!(k.sessions().is_empty(), "non-IP frames create no session");
}

#[test]
fn malformed_frames_drop_as_invalid_and_never_abort() {
    let k = Kernel::standard();
    let c4 = ip("198.18.0.1");
    let s4 = ip("198.18.0.2");
    let c6 = ip("2001:2::1");
    let s6 = ip("2001:2::2");
    let syn4 = frames::ip_packet(
        c4,
        s4,
        proto::TCP,
        &frames::tcp(Tcp::new(1, 8080, tcp_flags::SYN)).1,
    );
    let udp4 = frames::ip_packet(c4, s4, proto::UDP, &frames::udp(1, 5353, 8).1);
    let udp6 = frames::ip_packet(c6, s6, proto::UDP, &frames::udp(1, 5353, 8).1);
    let eth = frames::ethernet;
    let edit = |packet: &[u8], f: &dyn Fn(&mut Vec<u8>)| {
        let mut p = packet.to_vec();
        f(&mut p);
        eth(&p)
    };

    let mut malformed: Vec<(&str, Vec<u8>)> = vec![
        ("IPv4 ethertype, no IP header", eth(&[])),
        ("IPv4 header cut at 10 bytes", eth(&syn4[..10])),
        (
            "IPv4 version 6 under the IPv4 ethertype",
            edit(&syn4, &|p| p[0] = 0x65),
        ),
        ("IPv4 IHL 4", edit(&syn4, &|p| p[0] = 0x44)),
        (
            "IPv4 total length beyond the frame",
            edit(&syn4, &|p| p[2..4].copy_from_slice(&200u16.to_be_bytes())),
        ),
        (
            "IPv4 total length below IHL",
            edit(&syn4, &|p| p[2..4].copy_from_slice(&12u16.to_be_bytes())),
        ),
        ("TCP header truncated", {
            let mut p = syn4[..30].to_vec();
            p[2..4].copy_from_slice(&30u16.to_be_bytes());
            eth(&p)
        }),
        ("TCP data offset 4", edit(&syn4, &|p| p[32] = 0x40)),
        (
            "TCP data offset beyond the packet",
            edit(&syn4, &|p| p[32] = 0xf0),
        ),
        (
            "UDP length 4",
            edit(&udp4, &|p| p[24..26].copy_from_slice(&4u16.to_be_bytes())),
        ),
        (
            "UDP length beyond the packet",
            edit(&udp4, &|p| p[24..26].copy_from_slice(&400u16.to_be_bytes())),
        ),
        ("ICMP header of 4 bytes", {
            let mut p = frames::ip_packet(c4, s4, proto::ICMP, &[8, 0, 0, 0]);
            p[2..4].copy_from_slice(&24u16.to_be_bytes());
            eth(&p)
        }),
        (
            "ICMP error quoting 10 bytes",
            eth(&frames::ip_packet(
                c4,
                s4,
                proto::ICMP,
                &[3, 1, 0, 0, 0, 0, 0, 0, 0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6],
            )),
        ),
        ("ICMP error quoting an ICMP error", {
            let inner = frames::ip_packet(s4, c4, proto::ICMP, &[3, 1, 0, 0, 0, 0, 0, 0]);
            frames::icmp_error(s4, c4, 3, 1, &inner)
        }),
        ("IPv6 header cut at 30 bytes", eth(&udp6[..30])),
        (
            "IPv6 payload length beyond the frame",
            edit(&udp6, &|p| p[4..6].copy_from_slice(&500u16.to_be_bytes())),
        ),
        (
            "IPv6 version 4 under the IPv6 ethertype",
            edit(&udp6, &|p| p[0] = 0x40),
        ),
        ("IPv6 extension header longer than the payload", {
            let mut p = with_hop_by_hop(&udp6);
            p[41] = 20;
            eth(&p)
        }),
        ("IPv6 seven hop-by-hop headers", {
            let mut p = udp6.clone();
            for _ in 0..7 {
                p = with_hop_by_hop(&p);
            }
            eth(&p)
        }),
        (
            "ICMPv6 error quoting 20 bytes",
            eth(&frames::ip_packet(
                c6,
                s6,
                proto::ICMPV6,
                &[
                    1, 4, 0, 0, 0, 0, 0, 0, 0x60, 0, 0, 0, 0, 8, 17, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    0, 0, 0,
                ],
            )),
        ),
        ("VLAN tag cut short", {
            let mut f = vlan_tagged(&eth(&udp4), 0x8100, 7);
            f.truncate(16);
            f
        }),
        ("QinQ around a truncated IPv4 header", {
            let f = vlan_tagged(&vlan_tagged(&eth(&udp4), 0x8100, 7), 0x88a8, 9);
            f[..30].to_vec()
        }),
    ];
    // Every prefix of a valid frame that keeps the Ethernet header but cuts the packet.
    let icmp_err6 = frames::icmp_error(s6, c6, 1, 4, &udp6);
    for full in [eth(&syn4), eth(&udp6), icmp_err6] {
        for len in 14..full.len() {
            malformed.push(("truncated valid frame", full[..len].to_vec()));
        }
    }
    let fragments: Vec<(&str, Vec<u8>)> = vec![
        (
            "IPv4 fragment at offset 8 of a TCP datagram (RFC 1858)",
            edit(&syn4, &|p| {
                p[6..8].copy_from_slice(&0x2001u16.to_be_bytes())
            }),
        ),
        (
            "IPv4 first fragment holding 8 bytes of TCP header",
            edit(&syn4[..28], &|p| {
                p[2..4].copy_from_slice(&28u16.to_be_bytes());
                p[6..8].copy_from_slice(&0x2000u16.to_be_bytes());
            }),
        ),
        ("IPv6 fragment at offset 16 of a TCP datagram", {
            let mut p = udp6[..40].to_vec();
            p[4..6].copy_from_slice(&(8 + udp6.len() as u16 - 40).to_be_bytes());
            p[6] = 44;
            p.extend_from_slice(&[6, 0, 0, 0x10, 0, 0, 0, 1]);
            p.extend_from_slice(&udp6[40..]);
            eth(&p)
        }),
    ];

    let mut malformed_count = 0;
    for (what, frame) in &malformed {
        let before = k.counter(Counter::InvalidMalformed);
        k.expect(what, frame, Verdict::Drop);
        assert_eq!(
            k.counter(Counter::InvalidMalformed),
            before + 1,
            "{what}: invalid_malformed did not count it; frame:\n{}",
            hex(frame)
        );
        malformed_count += 1;
    }
    for (what, frame) in &fragments {
        let before = k.counter(Counter::InvalidFragment);
        k.expect(what, frame, Verdict::Drop);
        assert_eq!(k.counter(Counter::InvalidFragment), before + 1, "{what}");
    }
    let total = malformed_count + fragments.len() as u64;
    assert_eq!(k.counter(Counter::PacketsSeen), total);
    assert_eq!(k.counter(Counter::StateInvalid), total);
    assert_eq!(k.counter(Counter::PacketsDropped), total);
    assert!(k.sessions().is_empty(), "no session from a malformed frame");

    // Random corruption of valid frames: whatever the bytes, PASS or DROP, never ABORTED.
    let mut rng = Rng::new(0x5e55_10f0);
    let seeds = [
        eth(&syn4),
        eth(&udp4),
        eth(&udp6),
        frames::icmp_error(s6, c6, 1, 4, &udp6),
    ];
    let mut verdicts = [0u64; 3];
    for _ in 0..2000 {
        let mut frame = seeds[rng.below(seeds.len() as u64) as usize].clone();
        for _ in 0..=rng.below(4) {
            let at = 12 + rng.below(frame.len() as u64 - 12) as usize;
            frame[at] = rng.next_u64() as u8;
        }
        if rng.chance(30) {
            frame.truncate(14 + rng.below(frame.len() as u64 - 13) as usize);
        }
        let (value, _) = k.run_raw(&frame);
        assert!(
            value == XDP_PASS || value == XDP_DROP,
            "XDP returned {value} for a corrupted frame:\n{}",
            hex(&frame)
        );
        verdicts[value as usize] += 1;
    }
    println!(
        "kernel_path: 2000 corrupted frames: {} passed, {} dropped",
        verdicts[XDP_PASS as usize], verdicts[XDP_DROP as usize]
    );
}

// ---------------------------------------------------------------------------------------
// Differential: the kernel program against the host model.
// ---------------------------------------------------------------------------------------

const DIFF_SEED: u64 = 0x5e55_1011_d1ff_0001;
const DIFF_FRAMES: usize = 600;

const V4_HOSTS: [&str; 5] = [
    "198.18.0.1",
    "198.18.0.2",
    "198.18.0.3",
    "198.18.1.1",
    "198.18.1.2",
];
const V6_HOSTS: [&str; 5] = [
    "2001:2::1",
    "2001:2::2",
    "2001:2::3",
    "2001:2:0:1::1",
    "2001:2:0:1::2",
];
const V4_ROUTER: &str = "198.18.3.1";
const V6_ROUTER: &str = "2001:2:0:3::1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TcpPhase {
    /// Nothing sent yet, or closed and about to be reopened with the same ports.
    Idle,
    SynSent,
    SynRecv,
    Open,
}

#[derive(Clone, Debug)]
struct TcpFlow {
    client: IpAddr,
    server: IpAddr,
    cport: u16,
    sport: u16,
    /// Next sequence number of each side, `[client, server]`.
    seq: [u32; 2],
    fin: [bool; 2],
    wscale: Option<u8>,
    phase: TcpPhase,
    /// Last IP packet the client sent, for ICMP errors to quote.
    last_ip: Vec<u8>,
}

#[derive(Clone, Debug)]
struct Pair {
    client: IpAddr,
    server: IpAddr,
    cport: u16,
    sport: u16,
    last_ip: Vec<u8>,
}

fn flag_str(flags: u8) -> String {
    let names = [
        (tcp_flags::SYN, 'S'),
        (tcp_flags::ACK, '.'),
        (tcp_flags::FIN, 'F'),
        (tcp_flags::RST, 'R'),
        (tcp_flags::PSH, 'P'),
        (tcp_flags::URG, 'U'),
        (0x40, 'E'),
        (0x80, 'W'),
    ];
    names
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, c)| *c)
        .collect()
}

/// Builds the deterministic frame mix: TCP conversations (handshakes, data, FIN, RST,
/// reopen, simultaneous open) with occasional random flags and sequence numbers, UDP and
/// GRE both ways, ICMP echo and errors (about tracked and unknown flows), untracked and
/// untrackable ICMP, VLAN tags, IPv6 extension headers, padding, fragments, replays, and
/// truncated, corrupted and random frames, over IPv4 and IPv6.
struct Generator {
    rng: Rng,
    tcp: Vec<TcpFlow>,
    udp: Vec<Pair>,
    echo: Vec<Pair>,
    gre: Vec<Pair>,
    history: Vec<Vec<u8>>,
    /// Fragments of datagrams already begun, sent interleaved with other frames.
    pending: Vec<(Vec<u8>, String)>,
    /// Fragmented datagrams made so far: their shapes take turns, so that a short run
    /// has every one.
    datagrams: u64,
}

impl Generator {
    fn new(seed: u64) -> Generator {
        Generator {
            rng: Rng::new(seed),
            tcp: Vec::new(),
            udp: Vec::new(),
            echo: Vec::new(),
            gre: Vec::new(),
            history: Vec::new(),
            pending: Vec::new(),
            datagrams: 0,
        }
    }

    fn endpoints(&mut self) -> (IpAddr, IpAddr) {
        let hosts: &[&str] = if self.rng.chance(50) {
            &V4_HOSTS
        } else {
            &V6_HOSTS
        };
        let a = self.rng.below(hosts.len() as u64) as usize;
        let b = (a + 1 + self.rng.below(hosts.len() as u64 - 1) as usize) % hosts.len();
        (ip(hosts[a]), ip(hosts[b]))
    }

    fn router(v6: bool) -> IpAddr {
        ip(if v6 { V6_ROUTER } else { V4_ROUTER })
    }

    fn isn(&mut self) -> u32 {
        if self.rng.chance(15) {
            // Close to the wrap-around.
            u32::MAX - self.rng.below(3000) as u32
        } else {
            self.rng.next_u64() as u32
        }
    }

    /// One frame and its description.
    fn frame(&mut self) -> (Vec<u8>, String) {
        let (frame, what) = match self.pending.pop() {
            Some(next) if self.rng.chance(60) => next,
            Some(next) => {
                self.pending.push(next);
                self.choose()
            }
            None => self.choose(),
        };
        let (frame, what) = self.decorate(frame, what);
        self.history.push(frame.clone());
        (frame, what)
    }

    fn choose(&mut self) -> (Vec<u8>, String) {
        let roll = self.rng.below(100);
        match roll {
            0..=4 => self.new_tcp(),
            5..=49 => {
                if self.tcp.is_empty() {
                    self.new_tcp()
                } else {
                    let i = self.rng.below(self.tcp.len() as u64) as usize;
                    self.tcp_step(i)
                }
            }
            50..=59 => self.udp(),
            60..=67 => self.echo(),
            68..=71 => self.gre(),
            72..=77 => self.icmp_error(),
            78..=80 => self.icmp_other(),
            81..=85 if !self.history.is_empty() => self.replay(),
            86..=90 if !self.history.is_empty() => self.truncated(),
            91..=95 if !self.history.is_empty() => self.corrupted(),
            96 => self.garbage(),
            97 => self.fragmented(),
            98 => (arp_frame(), "ARP request".to_string()),
            _ if !self.history.is_empty() && self.rng.chance(40) => self.fragment(),
            _ => self.fragmented(),
        }
    }

    /// Sometimes wraps a frame in a VLAN tag or pads it to the Ethernet minimum.
    fn decorate(&mut self, frame: Vec<u8>, what: String) -> (Vec<u8>, String) {
        let ethertype = frame.get(12..14).map(|b| u16::from_be_bytes([b[0], b[1]]));
        if frame.len() >= 14 && self.rng.chance(5) {
            let tpid = self.rng.pick(&[0x8100u16, 0x88a8]);
            return (
                vlan_tagged(&frame, tpid, 42),
                format!("{what} (VLAN {tpid:#06x})"),
            );
        }
        if frame.len() < 60 && matches!(ethertype, Some(0x0800 | 0x86dd)) && self.rng.chance(10) {
            let mut padded = frame;
            padded.resize(60, 0);
            return (padded, format!("{what} (padded to 60)"));
        }
        (frame, what)
    }

    fn new_tcp(&mut self) -> (Vec<u8>, String) {
        let (client, server) = self.endpoints();
        let flow = TcpFlow {
            client,
            server,
            cport: 30000 + self.rng.below(30000) as u16,
            sport: self.rng.pick(&[8080, 8080, 8080, 8080, 8080, 9090, 23]),
            seq: [0, 0],
            fin: [false; 2],
            wscale: if self.rng.chance(60) {
                Some(self.rng.below(15) as u8)
            } else {
                None
            },
            phase: TcpPhase::Idle,
            last_ip: Vec::new(),
        };
        if self.tcp.len() >= 16 {
            let victim = self.rng.below(self.tcp.len() as u64) as usize;
            self.tcp.swap_remove(victim);
        }
        self.tcp.push(flow);
        let i = self.tcp.len() - 1;
        self.tcp_step(i)
    }

    /// A segment from side `from` (0 client, 1 server) of flow `i`, with occasional chaos.
    fn segment(
        &mut self,
        i: usize,
        from: usize,
        flags: u8,
        seq: u32,
        ack: u32,
        payload: usize,
    ) -> (Vec<u8>, String) {
        let flow = self.tcp[i].clone();
        let (mut flags, mut seq, mut ack) = (flags, seq, ack);
        let mut chaos = String::new();
        if self.rng.chance(10) {
            match self.rng.below(4) {
                0 => flags = self.rng.next_u64() as u8,
                1 => flags = self.rng.next_u64() as u8 & 0x3f,
                2 => {
                    let delta = self.rng.pick(&[1u32, 0xffff_ffff, 70_000, 0x8000_0000]);
                    seq = seq.wrapping_add(delta);
                }
                _ => ack = self.rng.next_u64() as u32,
            }
            chaos = " (chaos)".to_string();
        }
        let (src, dst, sport, dport) = if from == 0 {
            (flow.client, flow.server, flow.cport, flow.sport)
        } else {
            (flow.server, flow.client, flow.sport, flow.cport)
        };
        let mut segment = Tcp::new(sport, dport, flags)
            .seq_ack(seq, ack)
            .payload(payload);
        if flags & tcp_flags::SYN != 0 {
            if let Some(scale) = flow.wscale {
                segment = segment.wscale(scale);
            }
        } else {
            let window = if self.rng.chance(3) {
                0
            } else if flow.wscale.is_some() {
                502
            } else {
                64240
            };
            segment = segment.window(window);
        }
        let packet = frames::ip_packet(src, dst, proto::TCP, &frames::tcp(segment).1);
        if from == 0 {
            self.tcp[i].last_ip = packet.clone();
        }
        let what = format!(
            "tcp {src}:{sport} > {dst}:{dport} [{}] seq={seq} ack={ack} len={payload}{chaos}",
            flag_str(flags)
        );
        (frames::ethernet(&packet), what)
    }

    fn tcp_step(&mut self, i: usize) -> (Vec<u8>, String) {
        use tcp_flags::{ACK, FIN, PSH, RST, SYN};
        let flow = self.tcp[i].clone();
        let [cseq, sseq] = flow.seq;
        match flow.phase {
            TcpPhase::Idle => {
                let isn = self.isn();
                let flow = &mut self.tcp[i];
                flow.seq[0] = isn.wrapping_add(1);
                flow.fin = [false; 2];
                flow.phase = TcpPhase::SynSent;
                self.segment(i, 0, SYN, isn, 0, 0)
            }
            TcpPhase::SynSent => match self.rng.below(20) {
                0..=14 => {
                    let isn = self.isn();
                    self.tcp[i].seq[1] = isn.wrapping_add(1);
                    self.tcp[i].phase = TcpPhase::SynRecv;
                    self.segment(i, 1, SYN | ACK, isn, cseq, 0)
                }
                15..=16 => self.segment(i, 0, SYN, cseq.wrapping_sub(1), 0, 0),
                17 => {
                    self.tcp[i].phase = TcpPhase::Idle;
                    self.segment(i, 1, RST | ACK, 0, cseq, 0)
                }
                _ => {
                    // Simultaneous open: the server sends its own SYN.
                    let isn = self.isn();
                    self.tcp[i].seq[1] = isn.wrapping_add(1);
                    self.tcp[i].phase = TcpPhase::SynRecv;
                    self.segment(i, 1, SYN, isn, 0, 0)
                }
            },
            TcpPhase::SynRecv => {
                if self.rng.chance(85) {
                    self.tcp[i].phase = TcpPhase::Open;
                    self.segment(i, 0, ACK, cseq, sseq, 0)
                } else {
                    self.segment(i, 1, SYN | ACK, sseq.wrapping_sub(1), cseq, 0)
                }
            }
            TcpPhase::Open => {
                let from = self.rng.below(2) as usize;
                let to = 1 - from;
                let (own, other) = (flow.seq[from], flow.seq[to]);
                if flow.fin[0] && flow.fin[1] {
                    // Last ACK; the flow then reopens with the same ports some time later.
                    self.tcp[i].phase = TcpPhase::Idle;
                    return self.segment(i, from, ACK, own, other, 0);
                }
                match self.rng.below(100) {
                    0..=39 if !flow.fin[from] => {
                        let len = self.rng.pick(&[1usize, 10, 100, 536, 1200, 1400]);
                        self.tcp[i].seq[from] = own.wrapping_add(len as u32);
                        self.segment(i, from, ACK | PSH, own, other, len)
                    }
                    40..=69 => self.segment(i, from, ACK, own, other, 0),
                    70..=84 if !flow.fin[from] => {
                        self.tcp[i].seq[from] = own.wrapping_add(1);
                        self.tcp[i].fin[from] = true;
                        self.segment(i, from, FIN | ACK, own, other, 0)
                    }
                    85..=89 => {
                        self.tcp[i].phase = TcpPhase::Idle;
                        self.segment(i, from, RST | ACK, own, other, 0)
                    }
                    90..=94 => {
                        // A retransmission of old data.
                        let back = self.rng.pick(&[1u32, 100, 1000]);
                        self.segment(
                            i,
                            from,
                            ACK | PSH,
                            own.wrapping_sub(back),
                            other,
                            back as usize,
                        )
                    }
                    _ => self.segment(i, from, ACK, own, other.wrapping_sub(1), 0),
                }
            }
        }
    }

    fn pair(&mut self, which: fn(&mut Generator) -> &mut Vec<Pair>, ports: &[u16]) -> usize {
        let fresh = which(self).is_empty() || self.rng.chance(30);
        if fresh {
            let (client, server) = self.endpoints();
            let pair = Pair {
                client,
                server,
                cport: 1024 + self.rng.below(60000) as u16,
                sport: self.rng.pick(ports),
                last_ip: Vec::new(),
            };
            let list = which(self);
            if list.len() >= 12 {
                list.remove(0);
            }
            list.push(pair);
            list.len() - 1
        } else {
            let len = which(self).len() as u64;
            self.rng.below(len) as usize
        }
    }

    fn udp(&mut self) -> (Vec<u8>, String) {
        let i = self.pair(|g| &mut g.udp, &[5353, 5353, 5353, 5354, 53]);
        let p = self.udp[i].clone();
        let len = self.rng.pick(&[0usize, 8, 64, 512]);
        let (src, dst, sport, dport, dir) = if self.rng.chance(60) {
            (p.client, p.server, p.cport, p.sport, ">")
        } else {
            (p.server, p.client, p.sport, p.cport, "<")
        };
        let packet = frames::ip_packet(src, dst, proto::UDP, &frames::udp(sport, dport, len).1);
        if dir == ">" {
            self.udp[i].last_ip = packet.clone();
        }
        (
            frames::ethernet(&packet),
            format!("udp {src}:{sport} > {dst}:{dport} len={len}"),
        )
    }

    fn echo(&mut self) -> (Vec<u8>, String) {
        let i = self.pair(|g| &mut g.echo, &[0]);
        let p = self.echo[i].clone();
        let v6 = p.client.is_ipv6();
        let id = if self.rng.chance(5) {
            self.rng.next_u64() as u16
        } else {
            p.cport
        };
        let request = self.rng.chance(55);
        let (src, dst) = if request {
            (p.client, p.server)
        } else {
            (p.server, p.client)
        };
        let (protocol, body) = frames::echo(v6, !request, id, self.rng.next_u64() as u16);
        let packet = frames::ip_packet(src, dst, protocol, &body);
        if request {
            self.echo[i].last_ip = packet.clone();
        }
        let kind = if request { "request" } else { "reply" };
        (
            frames::ethernet(&packet),
            format!("echo {kind} {src} > {dst} id={id}"),
        )
    }

    fn gre(&mut self) -> (Vec<u8>, String) {
        let i = self.pair(|g| &mut g.gre, &[0]);
        let p = self.gre[i].clone();
        let (src, dst) = if self.rng.chance(60) {
            (p.client, p.server)
        } else {
            (p.server, p.client)
        };
        let packet = frames::ip_packet(src, dst, 47, &[0, 0, 0x08, 0x00, 1, 2, 3, 4]);
        (frames::ethernet(&packet), format!("gre {src} > {dst}"))
    }

    /// An ICMP error about a flow's last client packet (or about nothing we know).
    fn icmp_error(&mut self) -> (Vec<u8>, String) {
        let mut quotable: Vec<Vec<u8>> = Vec::new();
        quotable.extend(self.tcp.iter().map(|f| f.last_ip.clone()));
        quotable.extend(self.udp.iter().map(|p| p.last_ip.clone()));
        quotable.extend(self.echo.iter().map(|p| p.last_ip.clone()));
        quotable.retain(|q| !q.is_empty());
        let (original, about) = if quotable.is_empty() || self.rng.chance(20) {
            let (client, server) = self.endpoints();
            let port = self.rng.next_u64() as u16;
            let packet =
                frames::ip_packet(client, server, proto::UDP, &frames::udp(port, 5353, 4).1);
            (packet, "an unknown flow")
        } else {
            let n = quotable.len() as u64;
            (
                quotable.swap_remove(self.rng.below(n) as usize),
                "a known flow",
            )
        };
        let v6 = original[0] >> 4 == 6;
        let (src, dst) = if v6 {
            let mut s = [0u8; 16];
            s.copy_from_slice(&original[8..24]);
            let mut d = [0u8; 16];
            d.copy_from_slice(&original[24..40]);
            (IpAddr::from(s), IpAddr::from(d))
        } else {
            (
                IpAddr::from([original[12], original[13], original[14], original[15]]),
                IpAddr::from([original[16], original[17], original[18], original[19]]),
            )
        };
        // From a router or from the destination itself, to the quoted packet's sender.
        let from = if self.rng.chance(50) {
            Generator::router(v6)
        } else {
            dst
        };
        let (icmp_type, code) = if v6 {
            self.rng.pick(&[(1u8, 4u8), (1, 1), (2, 0), (3, 0), (4, 1)])
        } else {
            self.rng
                .pick(&[(3u8, 3u8), (3, 1), (3, 4), (11, 0), (12, 0), (4, 0)])
        };
        let frame = frames::icmp_error(from, src, icmp_type, code, &original);
        (
            frame,
            format!("icmp error type {icmp_type} code {code} {from} > {src} about {about}"),
        )
    }

    /// ICMP messages that are untracked (IPv6 ND) or cannot start a flow, and timestamps.
    fn icmp_other(&mut self) -> (Vec<u8>, String) {
        let (src, dst) = self.endpoints();
        let v6 = src.is_ipv6();
        let icmp_type = if v6 {
            self.rng.pick(&[133u8, 134, 135, 136, 143, 200])
        } else {
            self.rng.pick(&[9u8, 10, 13, 14, 42])
        };
        let id = self.rng.next_u64() as u16;
        let [a, b] = id.to_be_bytes();
        let body = frames::icmp(v6, icmp_type, 0, [a, b, 0, 1], &[0; 12]);
        (
            frames::frame(src, dst, body),
            format!("icmp type {icmp_type} {src} > {dst}"),
        )
    }

    fn recent(&mut self) -> Vec<u8> {
        let n = self.history.len().min(50) as u64;
        let back = self.rng.below(n) as usize;
        self.history[self.history.len() - 1 - back].clone()
    }

    fn replay(&mut self) -> (Vec<u8>, String) {
        (self.recent(), "replay of a recent frame".to_string())
    }

    fn truncated(&mut self) -> (Vec<u8>, String) {
        let mut frame = self.recent();
        if frame.len() > 14 {
            let len = 14 + self.rng.below(frame.len() as u64 - 14) as usize;
            frame.truncate(len);
        }
        let len = frame.len();
        (frame, format!("recent frame truncated to {len} bytes"))
    }

    fn corrupted(&mut self) -> (Vec<u8>, String) {
        let mut frame = self.recent();
        let mut spots = Vec::new();
        for _ in 0..=self.rng.below(3) {
            let at = 12 + self.rng.below(frame.len() as u64 - 12) as usize;
            frame[at] = self.rng.next_u64() as u8;
            spots.push(at);
        }
        (
            frame,
            format!("recent frame with bytes {spots:?} randomised"),
        )
    }

    fn garbage(&mut self) -> (Vec<u8>, String) {
        let len = 14 + self.rng.below(100) as usize;
        let mut frame: Vec<u8> = (0..len).map(|_| self.rng.next_u64() as u8).collect();
        let any = self.rng.next_u64() as u16;
        let ethertype = self.rng.pick(&[0x0800u16, 0x86dd, 0x8100, 0x0806, any]);
        frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
        if ethertype == 0x0800 && len > 14 && self.rng.chance(50) {
            frame[14] = 0x45;
        }
        if ethertype == 0x86dd && len > 14 && self.rng.chance(50) {
            frame[14] = 0x60;
        }
        (
            frame,
            format!("{len} random bytes, ethertype {ethertype:#06x}"),
        )
    }

    /// A UDP, ICMP echo or TCP datagram of a known flow (or another flow claiming its
    /// id) cut into fragments: in order, shuffled, without its first fragment, or with a
    /// tiny first fragment or a fragment overlapping the TCP header. The first is returned,
    /// the rest queued in `pending`.
    fn fragmented(&mut self) -> (Vec<u8>, String) {
        let kind = self.rng.below(3);
        let (src, dst, transport, label) = match kind {
            0 => {
                let i = self.pair(|g| &mut g.udp, &[5353, 5353, 53]);
                let p = self.udp[i].clone();
                let len = self.rng.pick(&[300usize, 1000]);
                let (src, dst, sport, dport) = if self.rng.chance(50) {
                    (p.client, p.server, p.cport, p.sport)
                } else {
                    (p.server, p.client, p.sport, p.cport)
                };
                // Now and then another flow between the same hosts: its id may collide.
                let sport = if self.rng.chance(15) {
                    sport ^ 1
                } else {
                    sport
                };
                (src, dst, frames::udp(sport, dport, len), "udp")
            }
            1 => {
                let i = self.pair(|g| &mut g.echo, &[0]);
                let p = self.echo[i].clone();
                let v6 = p.client.is_ipv6();
                let request = self.rng.chance(60);
                let (src, dst) = if request {
                    (p.client, p.server)
                } else {
                    (p.server, p.client)
                };
                let ty = match (v6, request) {
                    (false, true) => 8,
                    (false, false) => 0,
                    (true, true) => 128,
                    (true, false) => 129,
                };
                let [a, b] = p.cport.to_be_bytes();
                (
                    src,
                    dst,
                    frames::icmp(v6, ty, 0, [a, b, 0, 1], &[0x33; 700]),
                    "echo",
                )
            }
            _ => {
                let (client, server) = self.endpoints();
                let segment =
                    Tcp::new(30000 + self.rng.below(100) as u16, 8080, tcp_flags::SYN).payload(400);
                (client, server, frames::tcp(segment), "tcp")
            }
        };
        let id = self.rng.below(4) as u32;
        // At most half the smallest datagram (300 bytes), so there are always two pieces.
        let chunk = self.rng.pick(&[64usize, 96, 144]);
        let mut pieces: Vec<(Vec<u8>, String)> = frames::fragments(src, dst, transport, chunk, id)
            .into_iter()
            .enumerate()
            .map(|(i, frame)| (frame, format!("{label} {src} > {dst} id {id} fragment {i}")))
            .collect();
        let shape = self.datagrams % 6;
        self.datagrams += 1;
        match shape {
            0 => {}
            1 => {
                // Shuffled: reordering ahead of and behind the first fragment.
                for i in (1..pieces.len()).rev() {
                    let j = self.rng.below(i as u64 + 1) as usize;
                    pieces.swap(i, j);
                }
            }
            2 => {
                pieces.remove(0);
            }
            3 => {
                // A tiny first fragment: 8 bytes of a TCP header, 4 of another.
                let l4 = if src.is_ipv6() { 14 + 48 } else { 14 + 20 };
                let protocol = pieces[0].0[if src.is_ipv6() { 14 + 40 } else { 14 + 9 }];
                let tiny = if protocol == proto::TCP { 8 } else { 4 };
                let data = pieces[0].0[l4..l4 + tiny].to_vec();
                pieces[0] = (
                    frames::fragment(src, dst, protocol, id, 0, true, &data),
                    format!("{label} {src} > {dst} id {id} tiny first fragment"),
                );
            }
            4 => {
                // A first fragment of another flow claiming the id, ahead of the real one.
                let (protocol, data) = frames::udp(4, 4, 64);
                pieces.insert(
                    0,
                    (
                        frames::fragments(src, dst, (protocol, data), 32, id).remove(0),
                        format!("udp {src} > {dst} id {id} first fragment of another flow"),
                    ),
                );
                pieces.swap(0, 1);
            }
            _ => {
                // A fragment at offset 8 or 16, inside a TCP header.
                let protocol = pieces[0].0[if src.is_ipv6() { 14 + 40 } else { 14 + 9 }];
                let offset = self.rng.pick(&[8usize, 16]);
                pieces.push((
                    frames::fragment(src, dst, protocol, id, offset, true, &[0x5a; 16]),
                    format!("{label} {src} > {dst} id {id} fragment at offset {offset}"),
                ));
            }
        }
        pieces.reverse();
        let first = pieces.pop().expect("a datagram has fragments");
        self.pending.extend(pieces);
        first
    }

    /// A recent IPv4 frame turned into a fragment (non-first or first-with-MF).
    fn fragment(&mut self) -> (Vec<u8>, String) {
        let mut frame = self.recent();
        if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
            return self.garbage();
        }
        let first = self.rng.chance(30);
        let field: u16 = if first { 0x2000 } else { 0x2000 | 185 };
        frame[20..22].copy_from_slice(&field.to_be_bytes());
        let kind = if first { "first" } else { "non-first" };
        (frame, format!("recent IPv4 frame as a {kind} fragment"))
    }
}

/// What differs between the kernel's state and the model's, if anything.
fn state_diff(k: &Kernel, model: &Model, now: u64) -> Option<String> {
    let mut out = String::new();
    let kernel_sessions = k.sessions();
    let model_sessions = &model.sessions.map;
    let mut keys: Vec<&FlowKey> = kernel_sessions
        .keys()
        .chain(model_sessions.keys())
        .collect();
    keys.sort_by_key(|key| sort_key(key));
    keys.dedup();
    for key in keys {
        match (kernel_sessions.get(key), model_sessions.get(key)) {
            (Some(ks), Some(ms)) if timeless(ks) == timeless(ms) => {
                if ks.expires_ns <= now {
                    let _ = writeln!(
                        out,
                        "kernel session {} expired (expires {} <= now {now}): timeouts interfere",
                        key_str(key),
                        ks.expires_ns
                    );
                }
            }
            (Some(ks), Some(ms)) => {
                let _ = writeln!(
                    out,
                    "session {} differs:\n  kernel {:?}\n  model  {:?}",
                    key_str(key),
                    timeless(ks),
                    timeless(ms)
                );
            }
            (Some(ks), None) => {
                let _ = writeln!(out, "session {} only in the kernel: {ks:?}", key_str(key));
            }
            (None, Some(ms)) => {
                let _ = writeln!(out, "session {} only in the model: {ms:?}", key_str(key));
            }
            (None, None) => unreachable!(),
        }
    }
    // Expiry times are compared like sessions' timestamps: not at all (the kernel's clock
    // is coarser than the one the model is given).
    let timeless_records = |records: &HashMap<DatagramKey, DatagramEntry>| {
        records
            .iter()
            .map(|(key, entry)| {
                (
                    *key,
                    DatagramEntry {
                        expires_ns: 0,
                        ..*entry
                    },
                )
            })
            .collect::<HashMap<_, _>>()
    };
    let kernel_records = k.fragment_records();
    if timeless_records(&kernel_records) != timeless_records(&model.fragments.map) {
        let _ = writeln!(
            out,
            "fragment records differ:\n  kernel {kernel_records:?}\n  model  {:?}",
            model.fragments.map
        );
    }
    let kernel_counters = k.counters();
    for (counter, name) in Counter::ALL {
        let kernel = kernel_counters[counter as usize].1;
        let modelled = model.counters.get(counter);
        if kernel != modelled {
            let _ = writeln!(out, "counter {name}: kernel {kernel}, model {modelled}");
        }
    }
    (!out.is_empty()).then_some(out)
}

fn sort_key(key: &FlowKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(40);
    out.extend_from_slice(&key.addr_lo);
    out.extend_from_slice(&key.addr_hi);
    out.extend_from_slice(&key.port_lo.to_be_bytes());
    out.extend_from_slice(&key.port_hi.to_be_bytes());
    out.push(key.proto);
    out.push(key.family);
    out
}

fn model_verdict(outcome: Option<Outcome>) -> Verdict {
    match outcome {
        None => Verdict::Pass,
        Some(outcome) => match outcome.decision.action {
            Action::Accept => Verdict::Pass,
            Action::Drop => Verdict::Drop,
        },
    }
}

/// The events the kernel must report for a frame the model judged as `outcome`.
fn model_event_kinds(outcome: Option<Outcome>, model: &Model) -> Vec<u8> {
    outcome
        .map(|outcome| outcome.event_kind(&model.last_meta))
        .filter(|&kind| kind != 0)
        .into_iter()
        .collect()
}

#[test]
fn kernel_and_model_agree_frame_by_frame() {
    agree_frame_by_frame(Ingress::Xdp);
}

/// `[attach] tc_ingress` swaps the XDP program for the TC one on an interface: it must
/// judge and track every frame exactly as XDP does, which the model stands for here.
#[test]
fn tc_ingress_and_model_agree_frame_by_frame() {
    agree_frame_by_frame(Ingress::Tc);
}

/// The differential run: the same seeded frames through the `ingress` program and the
/// model, compared frame by frame.
fn agree_frame_by_frame(ingress: Ingress) {
    let seed = std::env::var("SESSION_KT_SEED")
        .ok()
        .map(|text| {
            let text = text.trim_start_matches("0x");
            u64::from_str_radix(text, 16)
                .unwrap_or_else(|_| panic!("SESSION_KT_SEED must be hex, got {text}"))
        })
        .unwrap_or(DIFF_SEED);
    let frames: usize = std::env::var("SESSION_KT_FRAMES")
        .ok()
        .map(|text| {
            text.parse()
                .unwrap_or_else(|_| panic!("SESSION_KT_FRAMES must be a number, got {text}"))
        })
        .unwrap_or(DIFF_FRAMES);
    let settings = test_settings();
    let policy = differential_policy();
    let mut k = Kernel::start_sized(&settings, &policy, MAX_SESSIONS, ingress);
    let mut model = Model::new(settings, &policy);
    let mut generator = Generator::new(seed);
    let mut log: Vec<String> = Vec::new();
    let started = Instant::now();
    let mut in_kernel = Duration::ZERO;
    let mut verdicts = [0usize; 2];
    let mut states: HashMap<&'static str, usize> = HashMap::new();
    // Frames the kernel would not build a socket buffer of for the TC program's test run
    // (an IPv6 ethertype with a truncated header, say); the model is not shown them.
    let mut refused = 0usize;

    for index in 0..frames {
        let (frame, what) = generator.frame();
        let now = monotonic_ns();
        let (value, took) = match k.try_run_raw(&frame) {
            Ok(run) => run,
            Err(_) if ingress == Ingress::Tc => {
                refused += 1;
                continue;
            }
            Err(error) => panic!(
                "seed {seed:#x} frame #{index} ({what}): BPF_PROG_TEST_RUN failed: {error:?}\n{}",
                hex(&frame)
            ),
        };
        in_kernel += took;
        let outcome = model.packet(&frame, Hook::Ingress, TEST_RUN_IFINDEX, now);
        let recent = |log: &[String]| log[log.len().saturating_sub(8)..].join("\n  ");
        log.push(format!("#{index}: {what} ({} bytes)", frame.len()));
        let kernel = match value {
            XDP_PASS => Verdict::Pass,
            XDP_DROP => Verdict::Drop,
            other => panic!(
                "seed {seed:#x} frame #{index} ({what}): {ingress:?} returned {other} (0 = \
                 XDP_ABORTED, {TC_OTHER} + n = TC action n); model says {outcome:?}\nframe:\n{}\
                 last frames:\n  {}",
                hex(&frame),
                recent(&log)
            ),
        };
        let expected = model_verdict(outcome);
        let (reported, expected_events) =
            (k.take_event_kinds(), model_event_kinds(outcome, &model));
        if reported != expected_events {
            panic!(
                "seed {seed:#x} frame #{index} ({what}): kernel reported events {reported:?}, \
                 model expects {expected_events:?} ({outcome:?})\nlast frames:\n  {}",
                recent(&log)
            );
        }
        if kernel != expected {
            panic!(
                "seed {seed:#x} frame #{index} ({what}): kernel {kernel:?}, model {expected:?} \
                 ({outcome:?})\nframe:\n{}state differences after it:\n{}\nlast frames:\n  {}",
                hex(&frame),
                state_diff(&k, &model, now).unwrap_or_else(|| "none\n".to_string()),
                recent(&log)
            );
        }
        if let Some(diff) = state_diff(&k, &model, now) {
            panic!(
                "seed {seed:#x} frame #{index} ({what}): same verdict ({kernel:?}, model {outcome:?}) \
                 but the state differs after it:\n{diff}frame:\n{}last frames:\n  {}",
                hex(&frame),
                recent(&log)
            );
        }
        verdicts[(kernel == Verdict::Drop) as usize] += 1;
        let state = match outcome {
            None => "non-ip",
            Some(outcome) => match outcome.state {
                CtState::New => "new",
                CtState::Established => "established",
                CtState::Related => "related",
                CtState::Invalid => "invalid",
                CtState::Untracked => "untracked",
            },
        };
        *states.entry(state).or_default() += 1;
    }

    let hits = k.rule_hits();
    assert_eq!(hits.len(), RULE_HIT_SLOTS as usize);
    assert_eq!(
        hits, model.counters.hits,
        "rule hit counters differ (kernel first, model second)"
    );
    require_classifier_rules_hit(&policy, &hits);
    let sessions = k.sessions();
    let mut tcp_states: HashMap<&'static str, usize> = HashMap::new();
    for (key, session) in &sessions {
        if key.proto == proto::TCP {
            *tcp_states
                .entry(TcpState::from_u8(session.state).name())
                .or_default() += 1;
        }
    }
    let counters = k.counters();
    let mut states: Vec<_> = states.into_iter().collect();
    states.sort();
    let mut tcp_states: Vec<_> = tcp_states.into_iter().collect();
    tcp_states.sort();
    assert!(
        refused * 20 <= frames,
        "seed {seed:#x}: the kernel refused {refused} of {frames} frames for the {ingress:?} \
         program's test run; too few were compared"
    );
    println!(
        "kernel_path: seed {seed:#x}: {} frames agree, {refused} refused by the test run \
         ({} passed, {} dropped) in {:?} \
         ({:?} inside the {ingress:?} program, {} ns/frame); {} sessions at the end, TCP states {tcp_states:?}; \
         packet states {states:?}; counters {counters:?}",
        frames - refused,
        verdicts[0],
        verdicts[1],
        started.elapsed(),
        in_kernel,
        in_kernel.as_nanos() / (frames - refused).max(1) as u128,
        sessions.len()
    );
    // The mix must really exercise the tracker, not just agree on trivia.
    let count = |counter: Counter| counters[counter as usize].1;
    for (counter, name) in [
        (Counter::StateNew, "state_new"),
        (Counter::StateEstablished, "state_established"),
        (Counter::StateRelated, "state_related"),
        (Counter::StateInvalid, "state_invalid"),
        (Counter::StateUntracked, "state_untracked"),
        (Counter::SessionsCreated, "sessions_created"),
        (Counter::InvalidMalformed, "invalid_malformed"),
        (Counter::InvalidTcpState, "invalid_tcp_state"),
        (Counter::InvalidTcpWindow, "invalid_tcp_window"),
        (Counter::InvalidIcmp, "invalid_icmp"),
        (Counter::InvalidFragment, "invalid_fragment"),
        (Counter::FragmentsFollowed, "fragments_followed"),
        (Counter::FragmentsUnknown, "fragments_unknown"),
        (Counter::PacketsNonIp, "packets_non_ip"),
        (Counter::DropRule, "drop_rule"),
        (Counter::DropDefault, "drop_default"),
    ] {
        assert!(
            count(counter) > 0,
            "seed {seed:#x}: the frame mix never produced {name}; the generator lost coverage"
        );
    }
}

#[test]
fn a_syn_flood_cannot_evict_an_established_connection() {
    let k = Kernel::standard();
    let client = ip("198.18.0.1");
    let server = ip("198.18.0.2");
    let flow = key(proto::TCP, (client, 40000), (server, 8080));
    let handshake = [
        (
            client,
            server,
            Tcp::new(40000, 8080, tcp_flags::SYN).seq_ack(1000, 0),
        ),
        (
            server,
            client,
            Tcp::new(8080, 40000, tcp_flags::SYN | tcp_flags::ACK).seq_ack(5000, 1001),
        ),
        (
            client,
            server,
            Tcp::new(40000, 8080, tcp_flags::ACK).seq_ack(1001, 5001),
        ),
    ];
    for (src, dst, segment) in handshake {
        k.expect("handshake", &tcp_frame(src, dst, segment), Verdict::Pass);
    }
    let s = k.session(&flow).expect("session after the handshake");
    assert_ne!(
        s.flags & session_flags::PROTECTED,
        0,
        "assured and protected: {s:?}"
    );

    // Far more half-open connections than the unassured tier holds (its minimum is 1024),
    // from spoofed sources in 198.18.0.0/15.
    let flood = 3 * loader::unassured_capacity(MAX_SESSIONS) as usize;
    for i in 0..flood {
        let source = IpAddr::V4(std::net::Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8));
        let port = 1024 + (i % 50_000) as u16;
        let syn = tcp_frame(
            source,
            server,
            Tcp::new(port, 8080, tcp_flags::SYN).seq_ack(7, 0),
        );
        k.expect("flood SYN", &syn, Verdict::Pass);
    }
    let sessions = k.sessions();
    assert!(
        sessions.len() <= (MAX_SESSIONS + loader::unassured_capacity(MAX_SESSIONS)) as usize,
        "the table never exceeds its size: {} sessions",
        sessions.len()
    );
    assert!(
        sessions.contains_key(&flow),
        "the established connection survived the flood"
    );
    let data = tcp_frame(
        client,
        server,
        Tcp::new(40000, 8080, tcp_flags::ACK | tcp_flags::PSH)
            .seq_ack(1001, 5001)
            .payload(100),
    );
    k.expect("data after the flood", &data, Verdict::Pass);
    assert_eq!(
        k.counter(Counter::DropTableFull),
        0,
        "nothing refused for lack of room"
    );
    assert_eq!(
        k.counter(Counter::SessionsCreated),
        1 + flood as u64,
        "every flood SYN was admitted into the unassured tier"
    );
}

// ---------------------------------------------------------------------------------------
// The differential run at scale, with structurally mutated frames.
// ---------------------------------------------------------------------------------------

/// Frames of the scale run by default: enough for the suite to exercise every mutation;
/// `cargo xtask differential` sets `SESSION_DIFF_PACKETS` to a million.
const SCALE_DEFAULT_PACKETS: u64 = 3_000;
/// Seed of the scale run unless `SESSION_DIFF_SEED` (hex) says otherwise.
const SCALE_DEFAULT_SEED: u64 = 0x5e55_1011_d1ff_0062;
/// Table size of the scale run: a million frames create about 70 000 sessions, and
/// the kernel's LRU tier must never evict (the model has no capacity), so both tiers are
/// far larger than that (the unassured one is a quarter of this).
const SCALE_MAX_SESSIONS: u32 = 1 << 20;
/// Share of frames, in percent, replaced by a structurally mutated copy.
const SCALE_MUTATED_PERCENT: u64 = 30;
/// Counters are compared every this many frames, the whole table every
/// [`SCALE_TABLE_EVERY`] frames and at the end: reading the whole table after every frame
/// would take hours at this size.
const SCALE_COUNTERS_EVERY: u64 = 500;
const SCALE_TABLE_EVERY: u64 = 50_000;
/// Verdict mismatches described in full in the failure message.
const SCALE_REPORTED: usize = 5;

fn env_number(name: &str, hex: bool) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let parsed = if hex {
        u64::from_str_radix(text.trim_start_matches("0x"), 16)
    } else {
        text.parse()
    };
    Some(parsed.unwrap_or_else(|_| {
        panic!(
            "{name} must be a {} number, got {text:?}",
            if hex { "hex" } else { "decimal" }
        )
    }))
}

/// The counters that differ between kernel and model, if any.
fn counter_diff(k: &Kernel, model: &Model) -> Option<String> {
    let kernel_counters = k.counters();
    let mut out = String::new();
    for (counter, name) in Counter::ALL {
        let (kernel, modelled) = (
            kernel_counters[counter as usize].1,
            model.counters.get(counter),
        );
        if kernel != modelled {
            let _ = writeln!(out, "counter {name}: kernel {kernel}, model {modelled}");
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Issue 6.2: the kernel path equals the host model at scale. The seeded generator's mix
/// (see [`Generator`]) with 30% of the frames replaced by structurally mutated copies
/// ([`Mutation`]), through BPF_PROG_TEST_RUN and the [`Model`]: every verdict must agree,
/// no frame may make the program abort, and counters, session table and rule hits must
/// agree at every checkpoint and at the end. `SESSION_DIFF_PACKETS` and
/// `SESSION_DIFF_SEED` (hex) size and seed it; `cargo xtask differential` runs a million.
#[test]
fn kernel_and_model_agree_at_scale_with_mutated_frames() {
    let packets = env_number("SESSION_DIFF_PACKETS", false).unwrap_or(SCALE_DEFAULT_PACKETS);
    let seed = env_number("SESSION_DIFF_SEED", true).unwrap_or(SCALE_DEFAULT_SEED);
    // As with `[sync]`: the kernel also reports each change of a session's state or
    // flags, and must report exactly the model's.
    let mut settings = test_settings();
    settings.flags |= settings_flags::SYNC_EVENTS;
    let policy = differential_policy();
    let mut k = Kernel::start_sized(&settings, &policy, SCALE_MAX_SESSIONS, Ingress::Xdp);
    let mut model = Model::new(settings, &policy);
    let mut generator = Generator::new(seed);
    let mut mutator = Rng::new(seed ^ 0xa5a5_a5a5_a5a5_a5a5);
    let mut mutated: HashMap<&'static str, u64> = HashMap::new();
    let mut flag_combinations = [false; 256];
    let mut mismatches: Vec<String> = Vec::new();
    let mut mismatch_count = 0u64;
    let mut changes_reported = 0usize;
    let mut aborted = 0u64;
    let mut state_failure: Option<String> = None;
    let mut compared = 0u64;
    let mut in_kernel = Duration::ZERO;
    let started = Instant::now();

    for index in 0..packets {
        let (mut frame, mut what) = generator.frame();
        if mutator.chance(SCALE_MUTATED_PERCENT) {
            let mutation = mutator.pick(&Mutation::ALL);
            let mut draw = || mutator.next_u64();
            if let Some(damaged) = mutation.apply(&frame, &mut draw) {
                *mutated.entry(mutation.name()).or_default() += 1;
                if mutation == Mutation::TcpFlags {
                    // Untagged TCP frames only: IHL tells where the flags byte is.
                    let at = if damaged[12..14] == [0x86, 0xdd] {
                        14 + 40 + 13
                    } else {
                        14 + usize::from(damaged[14] & 0x0f) * 4 + 13
                    };
                    flag_combinations[usize::from(damaged[at])] = true;
                }
                frame = damaged;
                what = format!("{what}, then {}", mutation.name());
            }
        }
        let now = monotonic_ns();
        let (value, took) = k.run_raw(&frame);
        in_kernel += took;
        let outcome = model.packet(&frame, Hook::Ingress, TEST_RUN_IFINDEX, now);
        compared += 1;
        let expected = model_verdict(outcome);
        let kernel = match value {
            XDP_PASS => Some(Verdict::Pass),
            XDP_DROP => Some(Verdict::Drop),
            _ => None,
        };
        if value == XDP_ABORTED {
            aborted += 1;
        }
        let (reported, expected_events) =
            (k.take_event_kinds(), model_event_kinds(outcome, &model));
        changes_reported += reported
            .iter()
            .filter(|&&kind| kind & event_kind::CHANGED != 0)
            .count();
        if kernel != Some(expected) || reported != expected_events {
            mismatch_count += 1;
            if mismatches.len() < SCALE_REPORTED {
                mismatches.push(format!(
                    "frame #{index} ({what}): kernel returned {value} with events \
                     {reported:?}, model {expected:?} with {expected_events:?} \
                     ({outcome:?})\n{}",
                    hex(&frame)
                ));
            }
        }
        let checkpoint = index + 1 == packets || (index + 1) % SCALE_TABLE_EVERY == 0;
        let diff = if checkpoint {
            state_diff(&k, &model, now)
        } else if (index + 1) % SCALE_COUNTERS_EVERY == 0 {
            counter_diff(&k, &model)
        } else {
            None
        };
        if let Some(diff) = diff {
            state_failure = Some(format!("after frame #{index} ({what}):\n{diff}"));
            break;
        }
    }
    let elapsed = started.elapsed();
    let hits_agree = k.rule_hits() == model.counters.hits;
    let sessions = k.sessions().len();
    let mut mutated: Vec<_> = mutated.into_iter().collect();
    mutated.sort();
    let combinations = flag_combinations.iter().filter(|&&seen| seen).count();
    println!(
        "differential: seed {seed:#x}: {compared} packets compared, {mismatch_count} \
         mismatches, {aborted} XDP_ABORTED, rule hits {}, {sessions} sessions at the end, \
         in {elapsed:.1?} ({:?} inside the XDP program, {} ns/packet in it); mutated \
         {mutated:?}, {combinations} of 256 TCP flag combinations",
        if hits_agree { "agree" } else { "DIFFER" },
        in_kernel,
        in_kernel.as_nanos() / u128::from(compared.max(1)),
    );
    assert!(
        mismatch_count == 0 && aborted == 0,
        "seed {seed:#x}: {mismatch_count} verdict mismatches, {aborted} XDP_ABORTED in \
         {compared} packets; first ones:\n{}",
        mismatches.join("\n")
    );
    if let Some(failure) = state_failure {
        panic!("seed {seed:#x}: kernel and model state differ {failure}");
    }
    assert!(hits_agree, "seed {seed:#x}: rule hit counters differ");
    require_classifier_rules_hit(&policy, &k.rule_hits());
    assert_eq!(compared, packets, "every packet was compared");
    assert!(
        changes_reported > 0,
        "seed {seed:#x}: no packet changed a session's state: the change events went untested"
    );
    assert_eq!(
        mutated.len(),
        Mutation::ALL.len(),
        "seed {seed:#x}: some mutation never applied: {mutated:?}"
    );
    if packets >= 100_000 {
        assert_eq!(
            combinations, 256,
            "a run this long must try every TCP flag combination"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Expectations: replies to the host's broadcast and multicast requests.
// ---------------------------------------------------------------------------------------

/// A BOOTP message of `op` (1 request, 2 reply) and transaction id `xid`: the 236-byte
/// fixed part, the DHCP magic cookie and an end option.
fn bootp(op: u8, xid: u32) -> Vec<u8> {
    let mut message = vec![0u8; 300];
    message[..4].copy_from_slice(&[op, 1, 6, 0]);
    message[4..8].copy_from_slice(&xid.to_be_bytes());
    message[236..240].copy_from_slice(&[99, 130, 83, 99]);
    message[240] = 255;
    message
}

/// A DHCPv6 message of `kind` and 24-bit transaction id `xid`, with an empty option.
fn dhcp6(kind: u8, xid: u32) -> Vec<u8> {
    let x = xid.to_be_bytes();
    vec![kind, x[1], x[2], x[3], 0, 8, 0, 2, 0, 0]
}

/// An Ethernet frame to the broadcast MAC (a group address) around an IP packet.
fn to_group_mac(src: IpAddr, dst: IpAddr, transport: (u8, Vec<u8>)) -> Vec<u8> {
    frames::ethernet_between(
        [0x02, 0, 0, 0, 0, 1],
        [0xff; 6],
        &frames::packet(src, dst, transport),
    )
}

#[test]
fn replies_to_broadcast_and_multicast_requests_pass_as_related_and_others_drop() {
    replies_to_group_requests(Ingress::Xdp);
}

#[test]
fn replies_to_broadcast_and_multicast_requests_on_tc_ingress() {
    replies_to_group_requests(Ingress::Tc);
}

/// The DHCP, DHCPv6, NetBIOS and SSDP exchanges, and a flood of spoofed OFFERs, through
/// the egress program and `ingress`, against the model.
fn replies_to_group_requests(ingress: Ingress) {
    let k = Kernel::start_sized(&test_settings(), &test_policy(), MAX_SESSIONS, ingress);
    let mut model = Model::new(test_settings(), &test_policy());
    let tc: &SchedClassifier = k
        .ebpf
        .program("session_egress")
        .expect("session_egress missing from the object")
        .try_into()
        .expect("session_egress is not a TC classifier");
    // Each step: what, egress (sent by the host) or ingress, the frame, the verdict.
    let (zero, bcast) = (ip("0.0.0.0"), ip("255.255.255.255"));
    let (client, server, other) = (ip("198.18.0.2"), ip("198.18.0.1"), ip("198.18.0.9"));
    let (client6, server6) = (ip("fe80::2"), ip("fe80::1"));
    let all_dhcp6 = ip("ff02::1:2");
    let xid = 0x1234_5678;
    let steps: Vec<(&str, Hook, Vec<u8>, Verdict)> = vec![
        (
            "unsolicited OFFER (no DISCOVER yet)",
            Hook::Ingress,
            to_group_mac(server, bcast, frames::udp_carrying(67, 68, &bootp(2, xid))),
            Verdict::Drop,
        ),
        (
            "DISCOVER",
            Hook::Egress,
            to_group_mac(zero, bcast, frames::udp_carrying(68, 67, &bootp(1, xid))),
            Verdict::Pass,
        ),
        (
            "OFFER to the broadcast address",
            Hook::Ingress,
            to_group_mac(server, bcast, frames::udp_carrying(67, 68, &bootp(2, xid))),
            Verdict::Pass,
        ),
        (
            "OFFER to the offered address",
            Hook::Ingress,
            frames::frame(server, client, frames::udp_carrying(67, 68, &bootp(2, xid))),
            Verdict::Pass,
        ),
        (
            "OFFER of another transaction",
            Hook::Ingress,
            to_group_mac(
                server,
                bcast,
                frames::udp_carrying(67, 68, &bootp(2, xid + 1)),
            ),
            Verdict::Drop,
        ),
        (
            "a BOOTREQUEST from the server port",
            Hook::Ingress,
            to_group_mac(other, bcast, frames::udp_carrying(67, 68, &bootp(1, xid))),
            Verdict::Drop,
        ),
        (
            "a truncated OFFER",
            Hook::Ingress,
            to_group_mac(
                server,
                bcast,
                frames::udp_carrying(67, 68, &bootp(2, xid)[..8]),
            ),
            Verdict::Drop,
        ),
        (
            "NetBIOS name query to a subnet broadcast (group MAC)",
            Hook::Egress,
            to_group_mac(client, ip("198.18.0.255"), frames::udp(137, 137, 50)),
            Verdict::Pass,
        ),
        (
            "NetBIOS answer",
            Hook::Ingress,
            frames::frame(other, client, frames::udp(137, 137, 62)),
            Verdict::Pass,
        ),
        (
            "unicast to the NetBIOS port from elsewhere",
            Hook::Ingress,
            frames::frame(other, client, frames::udp(1137, 137, 62)),
            Verdict::Drop,
        ),
        (
            "unicast NetBIOS query, not to a group",
            Hook::Egress,
            frames::frame(client, other, frames::udp(138, 138, 50)),
            Verdict::Pass,
        ),
        (
            "a reply from another host to that unicast query",
            Hook::Ingress,
            frames::frame(server, client, frames::udp(138, 138, 50)),
            Verdict::Drop,
        ),
        (
            "SSDP M-SEARCH",
            Hook::Egress,
            frames::frame(client, ip("239.255.255.250"), frames::udp(40000, 1900, 90)),
            Verdict::Pass,
        ),
        (
            "SSDP answer to the ephemeral port",
            Hook::Ingress,
            frames::frame(other, client, frames::udp(1900, 40000, 200)),
            Verdict::Pass,
        ),
        (
            "SSDP answer to a port nobody asked from",
            Hook::Ingress,
            frames::frame(other, client, frames::udp(1900, 40001, 200)),
            Verdict::Drop,
        ),
        (
            "unsolicited DHCPv6 ADVERTISE",
            Hook::Ingress,
            frames::frame(
                server6,
                client6,
                frames::udp_carrying(547, 546, &dhcp6(2, 0xabcdef)),
            ),
            Verdict::Drop,
        ),
        (
            "DHCPv6 SOLICIT",
            Hook::Egress,
            frames::frame(
                client6,
                all_dhcp6,
                frames::udp_carrying(546, 547, &dhcp6(1, 0xabcdef)),
            ),
            Verdict::Pass,
        ),
        (
            "DHCPv6 ADVERTISE",
            Hook::Ingress,
            frames::frame(
                server6,
                client6,
                frames::udp_carrying(547, 546, &dhcp6(2, 0xabcdef)),
            ),
            Verdict::Pass,
        ),
        (
            "DHCPv6 ADVERTISE of another transaction",
            Hook::Ingress,
            frames::frame(
                server6,
                client6,
                frames::udp_carrying(547, 546, &dhcp6(2, 0xabcdee)),
            ),
            Verdict::Drop,
        ),
        (
            "DHCPv6 RECONFIGURE with the same id",
            Hook::Ingress,
            frames::frame(
                server6,
                client6,
                frames::udp_carrying(547, 546, &dhcp6(10, 0xabcdef)),
            ),
            Verdict::Drop,
        ),
    ];
    // A new transaction, then a flood of spoofed OFFERs guessing its xid: none gets in,
    // the map gains nothing from them, and the genuine OFFER still does.
    let xid2 = 0x0bad_cafe;
    let mut steps = steps;
    steps.push((
        "second DISCOVER",
        Hook::Egress,
        to_group_mac(zero, bcast, frames::udp_carrying(68, 67, &bootp(1, xid2))),
        Verdict::Pass,
    ));
    for guess in 0..256u32 {
        steps.push((
            "spoofed OFFER",
            Hook::Ingress,
            to_group_mac(
                other,
                bcast,
                frames::udp_carrying(
                    67,
                    68,
                    &bootp(2, xid2 ^ (guess + 1).wrapping_mul(0x9e37_79b9)),
                ),
            ),
            Verdict::Drop,
        ));
    }
    steps.push((
        "genuine OFFER after the flood",
        Hook::Ingress,
        to_group_mac(server, bcast, frames::udp_carrying(67, 68, &bootp(2, xid2))),
        Verdict::Pass,
    ));
    for (what, hook, frame, expected) in &steps {
        let now = monotonic_ns();
        let got = match hook {
            Hook::Ingress => k.run(frame),
            Hook::Egress => {
                let returned = tc
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        repeat: 1,
                        ..TestRunOptions::new()
                    })
                    .unwrap_or_else(|error| panic!("TC test run of the {what}: {error:?}"))
                    .return_value;
                match returned {
                    TC_ACT_OK => Verdict::Pass,
                    TC_ACT_SHOT => Verdict::Drop,
                    other => panic!("TC egress returned {other} for the {what}"),
                }
            }
        };
        assert_eq!(got, *expected, "{what}: kernel verdict\n{}", hex(frame));
        let modelled = model_verdict(model.packet(frame, *hook, TEST_RUN_IFINDEX, now));
        assert_eq!(modelled, *expected, "{what}: model verdict");
    }
    // DISCOVER, NetBIOS, SSDP, SOLICIT, second DISCOVER; 2 OFFERs, NetBIOS, SSDP,
    // ADVERTISE, the genuine OFFER after the flood.
    for (counter, count) in [
        (Counter::ExpectationsCreated, 5),
        (Counter::ExpectationHits, 6),
        (Counter::StateRelated, 6),
    ] {
        assert_eq!(k.counter(counter), count, "kernel {counter:?}");
        assert_eq!(model.counters.get(counter), count, "model {counter:?}");
    }
    // Replies never add expectations: only the five requests' are stored.
    let stored = aya::maps::HashMap::<_, ExpectKey, u64>::try_from(
        k.ebpf
            .map("EXPECTATIONS")
            .expect("EXPECTATIONS missing from the object"),
    )
    .unwrap_or_else(|error| panic!("EXPECTATIONS is not a hash map: {error:?}"))
    .keys()
    .count();
    assert_eq!(stored, 5, "expectations stored in the kernel");
    assert_eq!(model.expectations.map.len(), 5, "expectations in the model");
    // The replies created no sessions: each must answer a live expectation of its own.
    let offer_key = key(proto::UDP, (server, 67), (bcast, 68));
    assert!(
        k.session(&offer_key).is_none(),
        "an OFFER let in by an expectation creates no session"
    );
    assert_eq!(
        counter_diff(&k, &model),
        None,
        "kernel and model counters differ"
    );
}
// Named sets: a blocklist of 100,000 prefixes, live changes, atomic replace.
// ---------------------------------------------------------------------------------------

/// A set file under the temporary directory, removed when dropped (also on panic).
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str, text: &str) -> TempFile {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "session-kt-{}-{}-{tag}.txt",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text)
            .unwrap_or_else(|error| panic!("writing {}: {error}", path.display()));
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A mixed blocklist inside 198.18.0.0/15 and 2001:2::/48: whole /24s, single IPv4
/// addresses in other /24s, and IPv6 /64s. Returns the file's lines and a membership
/// test computed from the generator's own choices (not from the set code under test).
struct Blocklist {
    lines: Vec<String>,
    v4_24s: std::collections::HashSet<u32>,
    v4_32s: std::collections::HashSet<u32>,
    v6_64s: std::collections::HashSet<u16>,
}

impl Blocklist {
    fn new(rng: &mut Rng, v4_nets: usize, v4_hosts: usize, v6_nets: usize) -> Blocklist {
        let mut list = Blocklist {
            lines: Vec::new(),
            v4_24s: Default::default(),
            v4_32s: Default::default(),
            v6_64s: Default::default(),
        };
        // /24 number k (0..512) is 198.18.0.0 + k * 256; the even ones may be blocked
        // whole, the odd ones hold the single addresses.
        while list.v4_24s.len() < v4_nets {
            let k = rng.below(256) as u32 * 2;
            if list.v4_24s.insert(k) {
                let base = 0xc612_0000u32 + k * 256;
                list.lines.push(format!("{}/24", Ipv4Addr::from(base)));
            }
        }
        while list.v4_32s.len() < v4_hosts {
            let addr =
                0xc612_0000u32 + (rng.below(256) as u32 * 2 + 1) * 256 + rng.below(256) as u32;
            if list.v4_32s.insert(addr) {
                list.lines.push(Ipv4Addr::from(addr).to_string());
            }
        }
        while list.v6_64s.len() < v6_nets {
            let n = rng.below(65536) as u16;
            if list.v6_64s.insert(n) {
                list.lines.push(format!("2001:2:0:{n:x}::/64"));
            }
        }
        list
    }

    fn len(&self) -> usize {
        self.lines.len()
    }

    fn text(&self) -> String {
        let mut text = String::from("# generated blocklist\n");
        for line in &self.lines {
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    fn contains(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(v4) => {
                let a = u32::from(v4);
                self.v4_32s.contains(&a) || self.v4_24s.contains(&((a - 0xc612_0000) >> 8))
            }
            IpAddr::V6(v6) => self.v6_64s.contains(&v6.segments()[3]),
        }
    }

    /// A random address of the blocklist's space: a member or not, as `member` asks.
    fn address(&self, rng: &mut Rng, member: bool) -> IpAddr {
        loop {
            let addr = if rng.chance(50) {
                IpAddr::V4(Ipv4Addr::from(0xc612_0000u32 + rng.below(1 << 17) as u32))
            } else {
                IpAddr::V6(Ipv6Addr::new(
                    0x2001,
                    2,
                    0,
                    rng.below(65536) as u16,
                    0,
                    0,
                    0,
                    1 + rng.below(1000) as u16,
                ))
            };
            if self.contains(addr) == member {
                return addr;
            }
        }
    }
}

/// The policy of the set tests: sources in `@block` are dropped, every other new flow is
/// accepted; established packets are accepted (so a set change leaves sessions alone
/// unless a rule for them names the set).
fn blocklist_policy(set: &str) -> CompiledPolicy {
    reload_policy(&format!(
        r#"
[policy]
inbound = "drop"

[sets]
block = {set}

[[rule]]
name = "blocklist"
state = ["new"]
src = ["@block"]
action = "drop"

[[rule]]
name = "return-traffic"
state = ["established", "related"]
action = "accept"

[[rule]]
name = "anything-new"
state = ["new"]
action = "accept"
"#
    ))
}

/// A SYN from `src` to the test server of its family, from `sport`.
fn syn_from(src: IpAddr, sport: u16) -> Vec<u8> {
    let dst = if src.is_ipv4() {
        ip("198.18.0.1")
    } else {
        ip("2001:2::1")
    };
    tcp_frame(src, dst, Tcp::new(sport, 443, tcp_flags::SYN))
}

#[test]
fn a_100000_prefix_blocklist_drops_exactly_its_members_as_the_host_model_says() {
    let mut rng = Rng::new(0x5e75);
    let list = Blocklist::new(&mut rng, 100, 39_900, 60_000);
    assert_eq!(list.len(), 100_000);
    let file = TempFile::new("block", &list.text());
    let policy = blocklist_policy(&format!("{{ file = \"{}\" }}", file.0.display()));
    assert_eq!(
        policy.entries.len(),
        3,
        "a set of 100,000 prefixes costs its rule one entry"
    );
    let k = Kernel::start_sized(&test_settings(), &policy, 1 << 16, Ingress::Xdp);
    let model = session_user::host_engine::ModelRules::new(&policy);
    let started = Instant::now();
    let mut counts = [0usize; 4];
    for i in 0..20_000usize {
        let member = i.is_multiple_of(2);
        let src = list.address(&mut rng, member);
        let sport = 1024 + (i % 60_000) as u16;
        let meta = session_common::packet::PacketMeta {
            family: if src.is_ipv4() {
                FAMILY_IPV4
            } else {
                FAMILY_IPV6
            },
            proto: proto::TCP,
            src: mapped(src),
            dst: mapped(if src.is_ipv4() {
                ip("198.18.0.1")
            } else {
                ip("2001:2::1")
            }),
            sport,
            dport: 443,
            ..Default::default()
        };
        let decision = session_common::engine::evaluate(
            &model,
            &meta,
            CtState::New,
            Hook::Ingress,
            TEST_RUN_IFINDEX,
        );
        let modelled = if decision.action == Action::Drop {
            Verdict::Drop
        } else {
            Verdict::Pass
        };
        let expected = if member { Verdict::Drop } else { Verdict::Pass };
        assert_eq!(
            modelled, expected,
            "the host model says {modelled:?} for {src} (member: {member})"
        );
        k.expect(
            &format!("SYN from {src} (member: {member})"),
            &syn_from(src, sport),
            expected,
        );
        counts[usize::from(member) * 2 + usize::from(src.is_ipv6())] += 1;
    }
    assert!(
        counts.iter().all(|n| *n > 1000),
        "members and non-members of both families were tried: {counts:?}"
    );
    println!(
        "sets: 20,000 SYNs against a 100,000-prefix set in {:?}",
        started.elapsed()
    );
    assert_eq!(
        k.rule_hits()[0],
        10_000,
        "every member hit the blocklist rule"
    );
}

#[test]
fn live_add_delete_and_expiry_change_the_verdict_of_the_next_new_flow() {
    let k = Kernel::start(
        &test_settings(),
        &blocklist_policy(r#"["198.18.9.9", "2001:2:0:9::/64"]"#),
    );
    let parse = |text: &str| {
        session_user::policy::sets::parse_prefix(text)
            .unwrap_or_else(|error| panic!("test prefix {text}: {error}"))
    };
    let host = ip("198.18.5.5");
    let host6 = ip("2001:2:0:5::5");
    let mut sport = 2000;
    let mut next = |k: &Kernel, src: IpAddr, expected: Verdict, what: &str| {
        sport += 1;
        k.expect(what, &syn_from(src, sport), expected);
    };
    next(
        &k,
        ip("198.18.9.9"),
        Verdict::Drop,
        "a member of the loaded set",
    );
    next(&k, host, Verdict::Pass, "not in the set yet");
    next(&k, host6, Verdict::Pass, "not in the set yet (IPv6)");
    let added = k
        .maps
        .set_add(
            "block",
            &[parse("198.18.5.0/24"), parse("2001:2:0:5::/64")],
            0,
        )
        .unwrap_or_else(|error| panic!("set_add: {error:?}"));
    assert_eq!(added, 2);
    next(&k, host, Verdict::Drop, "added to the set");
    next(&k, host6, Verdict::Drop, "added to the set (IPv6)");
    let removed = k
        .maps
        .set_delete("block", &[parse("198.18.5.0/24")])
        .unwrap_or_else(|error| panic!("set_delete: {error:?}"));
    assert_eq!(removed, 1);
    next(&k, host, Verdict::Pass, "deleted from the set");
    next(&k, host6, Verdict::Drop, "still in the set (IPv6)");
    let listed = k
        .maps
        .sets()
        .unwrap_or_else(|error| panic!("sets: {error:?}"));
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].name.as_str(), listed[0].entries), ("block", 3));
    assert_eq!(listed[0].changes, 2);
    // An entry with an expiry counts until then, and the reaper's sweep frees it after.
    let expiry = monotonic_ns() + 300_000_000;
    k.maps
        .set_add("block", &[parse("198.18.5.5")], expiry)
        .unwrap_or_else(|error| panic!("set_add with expiry: {error:?}"));
    next(&k, host, Verdict::Drop, "banned until the expiry");
    while monotonic_ns() < expiry + 20_000_000 {
        std::thread::sleep(Duration::from_millis(20));
    }
    next(&k, host, Verdict::Pass, "the ban expired");
    let freed = k
        .maps
        .expire_set_members(monotonic_ns())
        .unwrap_or_else(|error| panic!("expire_set_members: {error:?}"));
    assert_eq!(freed, 1);
    let members = k
        .maps
        .set_members("block")
        .unwrap_or_else(|error| panic!("set_members: {error:?}"));
    assert_eq!(members.len(), 3, "{members:?}");
    // An established session of a source added later keeps flowing: the blocklist rule
    // is for new flows only (as `ct state new ip saddr @block drop` in nftables).
    let client = ip("198.18.6.6");
    let server = ip("198.18.0.1");
    k.expect(
        "SYN",
        &tcp_frame(
            client,
            server,
            Tcp::new(3000, 443, tcp_flags::SYN).seq_ack(100, 0),
        ),
        Verdict::Pass,
    );
    k.expect(
        "SYN-ACK",
        &tcp_frame(
            server,
            client,
            Tcp::new(443, 3000, tcp_flags::SYN | tcp_flags::ACK).seq_ack(500, 101),
        ),
        Verdict::Pass,
    );
    k.expect(
        "ACK",
        &tcp_frame(
            client,
            server,
            Tcp::new(3000, 443, tcp_flags::ACK).seq_ack(101, 501),
        ),
        Verdict::Pass,
    );
    k.maps
        .set_add("block", &[parse("198.18.6.6")], 0)
        .unwrap_or_else(|error| panic!("set_add: {error:?}"));
    k.expect(
        "data of the established session of a source now in the set",
        &tcp_frame(
            client,
            server,
            Tcp::new(3000, 443, tcp_flags::ACK)
                .seq_ack(101, 501)
                .payload(10),
        ),
        Verdict::Pass,
    );
    k.expect(
        "a new flow of that source",
        &tcp_frame(client, server, Tcp::new(3001, 443, tcp_flags::SYN)),
        Verdict::Drop,
    );
    let error = k
        .maps
        .set_add("nosuch", &[parse("198.18.6.6")], 0)
        .expect_err("a set the policy does not use");
    assert!(error.to_string().contains("no set `nosuch`"), "{error}");
}

/// Entries of the pinned `SET_HOSTS` of `k` and its size.
fn set_hosts_held(k: &Kernel) -> (usize, u32) {
    let path = k.maps.dir().join(map_names::SET_HOSTS);
    let data =
        MapData::from_pin(&path).unwrap_or_else(|error| panic!("opening SET_HOSTS: {error}"));
    let capacity = data
        .info()
        .unwrap_or_else(|error| panic!("SET_HOSTS info: {error}"))
        .max_entries();
    let hosts: aya::maps::HashMap<
        MapData,
        session_common::sets::SetKey,
        session_common::sets::SetValue,
    > = aya::maps::HashMap::try_from(Map::HashMap(data))
        .unwrap_or_else(|error| panic!("SET_HOSTS: {error}"));
    (hosts.keys().count(), capacity)
}

#[test]
fn addresses_that_find_the_host_hash_full_live_in_the_trie_and_a_resize_carries_the_hash_over() {
    // `[limits] max_set_entries = 8` gives the host hash room for 16 addresses; the set
    // has 40, so 24 of them go to the trie, and every one must still drop.
    let hosts: Vec<String> = (0..40).map(|i| format!("198.18.7.{}", i + 1)).collect();
    let file = TempFile::new("spill", &format!("{}\n", hosts.join("\n")));
    let policy = blocklist_policy(&format!("{{ file = \"{}\" }}", file.0.display()));
    let sizes = |max_set_entries| loader::Sizes {
        max_set_entries,
        ..loader::Sizes::sessions(MAX_SESSIONS)
    };
    let mut k = Kernel::start_with(&test_settings(), &policy, sizes(8), Ingress::Xdp);
    assert_eq!(
        set_hosts_held(&k),
        (16, 16),
        "the hash holds what it has room for"
    );
    let verdicts = |k: &Kernel, what: &str| {
        for (i, host) in hosts.iter().enumerate() {
            k.expect(what, &syn_from(ip(host), 2000 + i as u16), Verdict::Drop);
        }
        k.expect(what, &syn_from(ip("198.18.7.200"), 1999), Verdict::Pass);
    };
    verdicts(&k, "a member, in the hash or spilled into the trie");
    // A live add while the hash is full goes to the trie too; deletes find either map.
    let parse = |text: &str| session_user::policy::sets::parse_prefix(text).expect("test prefix");
    let added = k
        .maps
        .set_add("block", &[parse("198.18.7.100")], 0)
        .unwrap_or_else(|error| panic!("set_add into a full hash: {error:?}"));
    assert_eq!(added, 1);
    k.expect(
        "added while the hash is full",
        &syn_from(ip("198.18.7.100"), 3000),
        Verdict::Drop,
    );
    let members = k
        .maps
        .set_members("block")
        .unwrap_or_else(|error| panic!("{error:?}"));
    assert_eq!(members.len(), 41, "set show lists both maps' members");
    // Restarting with room for more recreates the hash and carries its addresses over.
    k.ebpf = loader::load(k.maps.dir(), sizes(64), false, KernelLogLevel::default())
        .unwrap_or_else(|error| panic!("loading again with a larger set limit: {error:?}"));
    assert_eq!(
        set_hosts_held(&k),
        (16, 128),
        "the resized hash has the old one's addresses"
    );
    verdicts(&k, "a member after the resize");
    let removed = k
        .maps
        .set_delete(
            "block",
            &[parse(&hosts[0]), parse(&hosts[39]), parse("198.18.7.100")],
        )
        .unwrap_or_else(|error| panic!("set_delete: {error:?}"));
    assert_eq!(removed, 3, "deleted from the hash and from the trie");
    for (what, host) in [
        ("hashed", &hosts[0]),
        ("spilled", &hosts[39]),
        ("added", &"198.18.7.100".to_string()),
    ] {
        k.expect(
            &format!("a deleted {what} member"),
            &syn_from(ip(host), 4000),
            Verdict::Pass,
        );
    }
    let listed = k.maps.sets().unwrap_or_else(|error| panic!("{error:?}"));
    assert_eq!(listed[0].entries, 38, "{listed:?}");
}

#[test]
fn an_atomic_replace_under_a_syn_flood_never_passes_a_member_nor_drops_a_non_member() {
    // Three disjoint groups: `kept` is in both the old and the new set, `gone` only in the
    // old, `fresh` only in the new, `never` in neither. While the set is replaced back and
    // forth, a `kept` source must always be dropped and a `never` source always pass;
    // `gone` and `fresh` may go either way during a replace but must end right.
    let mut rng = Rng::new(0xf100d);
    let all = Blocklist::new(&mut rng, 0, 12_000, 12_000);
    let (mut kept, mut gone, mut fresh) = (Vec::new(), Vec::new(), Vec::new());
    for (i, line) in all.lines.iter().enumerate() {
        match i % 3 {
            0 => kept.push(line.clone()),
            1 => gone.push(line.clone()),
            _ => fresh.push(line.clone()),
        }
    }
    let parse_all = |lines: &[String]| -> Vec<_> {
        lines
            .iter()
            .map(|line| session_user::policy::sets::parse_prefix(line).expect("generated"))
            .collect()
    };
    let old_set: Vec<_> = parse_all(&[kept.clone(), gone.clone()].concat());
    let new_set: Vec<_> = parse_all(&[kept.clone(), fresh.clone()].concat());
    let old_file = TempFile::new(
        "old",
        &format!("{}\n", [kept.clone(), gone.clone()].concat().join("\n")),
    );
    let policy = blocklist_policy(&format!("{{ file = \"{}\" }}", old_file.0.display()));
    let k = Kernel::start_sized(&test_settings(), &policy, 1 << 18, Ingress::Xdp);
    let source = |line: &str| -> IpAddr {
        match line.split_once('/') {
            Some((net, _)) => {
                let IpAddr::V6(v6) = ip(net) else {
                    panic!("only IPv6 lines are networks here")
                };
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) | 7))
            }
            None => ip(line),
        }
    };
    let pin = k.maps.dir().to_path_buf();
    let done = std::sync::atomic::AtomicBool::new(false);
    let replaces = 4;
    let (checked, replaced_in) = std::thread::scope(|scope| {
        let replacer = scope.spawn(|| {
            let maps = PinnedMaps::open(&pin).expect("opening the pinned maps again");
            let mut times = Vec::new();
            for round in 0..replaces {
                let started = Instant::now();
                let next = if round % 2 == 0 { &new_set } else { &old_set };
                maps.set_replace("block", next)
                    .unwrap_or_else(|error| panic!("set_replace: {error:?}"));
                times.push(started.elapsed());
            }
            done.store(true, Ordering::SeqCst);
            times
        });
        let mut checked = 0usize;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut sport = 1024u16;
        while !done.load(Ordering::SeqCst) || checked < 2000 {
            assert!(
                Instant::now() < deadline,
                "the replaces did not finish in 120 s"
            );
            sport = sport.wrapping_add(1).max(1024);
            let member = checked.is_multiple_of(2);
            let src = if member {
                source(&kept[rng.below(kept.len() as u64) as usize])
            } else {
                all.address(&mut rng, false)
            };
            let expected = if member { Verdict::Drop } else { Verdict::Pass };
            let got = k.run(&syn_from(src, sport));
            assert_eq!(
                got, expected,
                "during a replace, a SYN from {src} (in both sets: {member}) got {got:?}"
            );
            checked += 1;
            if checked > 2_000_000 {
                break;
            }
        }
        (checked, replacer.join().expect("the replacer panicked"))
    });
    println!(
        "sets: {checked} SYNs checked during {replaces} replaces of 16,000 prefixes, each taking {replaced_in:?}"
    );
    // Each replace retired the storage it replaced, for the reaper to free: all four
    // storages' prefixes go at its first run, and nothing at the next.
    let retired = 2 * (old_set.len() + new_set.len());
    let freed = k
        .maps
        .free_retired_sets()
        .expect("freeing the retired storages");
    assert_eq!(
        freed as usize, retired,
        "prefixes of the replaced storages freed"
    );
    assert_eq!(k.maps.free_retired_sets().expect("freeing again"), 0);
    // After an even number of replaces the old set is back.
    for line in gone.iter().take(50) {
        k.expect(
            "in the set again",
            &syn_from(source(line), 999),
            Verdict::Drop,
        );
    }
    for line in fresh.iter().take(50) {
        k.expect("replaced away", &syn_from(source(line), 998), Verdict::Pass);
    }
}

// ---------------------------------------------------------------------------------------
// Fragments: later fragments follow their datagram's first fragment.
// ---------------------------------------------------------------------------------------

/// The kernel and the model fed the same frames in lockstep; every frame must get the same
/// verdict and leave the same sessions, fragment records and counters.
struct Lockstep {
    k: Kernel,
    model: Model,
}

impl Lockstep {
    fn standard() -> Lockstep {
        Lockstep {
            k: Kernel::standard(),
            model: Model::new(test_settings(), &test_policy()),
        }
    }

    /// Runs `frame` through both; requires `expected` from both and the same state after.
    fn expect(&mut self, what: &str, frame: &[u8], expected: Verdict) -> Option<Outcome> {
        let now = monotonic_ns();
        let kernel = self.k.run(frame);
        let outcome = self
            .model
            .packet(frame, Hook::Ingress, TEST_RUN_IFINDEX, now);
        let _ = self.k.take_event_kinds();
        assert_eq!(
            (kernel, model_verdict(outcome)),
            (expected, expected),
            "{what}: kernel {kernel:?}, model {outcome:?}, expected {expected:?}"
        );
        if let Some(diff) = state_diff(&self.k, &self.model, now) {
            panic!("{what}: kernel and model differ after it:\n{diff}");
        }
        outcome
    }

    fn counter(&self, counter: Counter) -> u64 {
        self.k.counter(counter)
    }
}

fn sum_ip_len(frames: &[Vec<u8>]) -> u64 {
    frames.iter().map(|frame| ip_len(frame)).sum()
}

#[test]
fn fragments_follow_their_datagram_ipv4() {
    fragments_follow_their_datagram(ip("198.18.0.1"), ip("198.18.0.2"));
}

#[test]
fn fragments_follow_their_datagram_ipv6() {
    fragments_follow_their_datagram(ip("2001:2::1"), ip("2001:2::2"));
}

/// A 1-byte query, a 3,000-byte answer in three fragments: in order, reordered, dropped,
/// and an ICMP echo of 3,000 bytes, all against the model.
fn fragments_follow_their_datagram(client: IpAddr, server: IpAddr) {
    let v6 = client.is_ipv6();
    let mut l = Lockstep::standard();
    let query = frames::frame(client, server, frames::udp(33000, 5353, 1));
    l.expect("query", &query, Verdict::Pass);
    let flow = key(proto::UDP, (client, 33000), (server, 5353));

    // In order: the first fragment is ESTABLISHED, the later ones follow it.
    let answer = frames::fragments(server, client, frames::udp(5353, 33000, 3000), 1400, 1);
    assert_eq!(answer.len(), 3, "3,008 bytes of UDP in 1,400-byte pieces");
    for (i, frame) in answer.iter().enumerate() {
        let outcome = l.expect(&format!("answer fragment {i}"), frame, Verdict::Pass);
        let outcome = outcome.expect("an IP frame has an outcome");
        assert_eq!(outcome.state, CtState::Established, "fragment {i}");
        assert!(outcome.fragment, "fragment {i} is marked a fragment");
    }
    assert_eq!(l.counter(Counter::FragmentsFollowed), 2);
    assert_eq!(l.counter(Counter::FragmentsUnknown), 0);
    assert_eq!(l.counter(Counter::StateInvalid), 0);
    let s = l.k.session(&flow).expect("the query's session");
    assert_eq!(
        s.packets,
        [1, 3],
        "the later fragments count in the session"
    );
    assert_eq!(s.bytes, [ip_len(&query), sum_ip_len(&answer)]);
    assert!(
        l.k.fragment_records().is_empty(),
        "the last fragment ends the datagram's record"
    );

    // Reordered: later fragments ahead of their first pass unjudged and touch nothing;
    // the first is judged when it comes.
    let answer = frames::fragments(server, client, frames::udp(5353, 33000, 3000), 1400, 2);
    let sessions = l.k.sessions();
    for (i, frame) in answer[1..].iter().enumerate().rev() {
        let outcome = l.expect(&format!("early fragment {i}"), frame, Verdict::Pass);
        assert_eq!(outcome.map(|o| o.state), Some(CtState::Untracked));
    }
    assert_eq!(
        l.k.sessions(),
        sessions,
        "unknown fragments touch no session"
    );
    assert_eq!(l.counter(Counter::FragmentsUnknown), 2);
    l.expect("late first fragment", &answer[0], Verdict::Pass);
    assert_eq!(l.k.session(&flow).expect("session").packets, [1, 4]);

    // A datagram the policy refuses: its first fragment is dropped by the default action
    // and creates no session; its later fragments are dropped with it.
    let unsolicited = frames::fragments(server, client, frames::udp(5353, 44444, 3000), 1400, 3);
    let drops = l.counter(Counter::DropDefault);
    for (i, frame) in unsolicited.iter().enumerate() {
        l.expect(&format!("unsolicited fragment {i}"), frame, Verdict::Drop);
    }
    assert_eq!(l.counter(Counter::DropDefault), drops + 3);
    assert_eq!(l.k.sessions().len(), 1, "no session for a refused datagram");
    assert_eq!(l.counter(Counter::FragmentsFollowed), 4);

    // ICMP echo of 3,000 bytes both ways: the request is NEW (the ping rule), its later
    // fragments follow; the reply's are ESTABLISHED.
    let (ty_request, ty_reply) = if v6 { (128, 129) } else { (8, 0) };
    let body = vec![0x5a; 3000];
    let request = frames::fragments(
        client,
        server,
        frames::icmp(v6, ty_request, 0, [0x42, 0x42, 0, 1], &body),
        1400,
        4,
    );
    for (i, frame) in request.iter().enumerate() {
        let outcome = l.expect(&format!("echo request fragment {i}"), frame, Verdict::Pass);
        assert_eq!(outcome.map(|o| o.state), Some(CtState::New));
    }
    let reply = frames::fragments(
        server,
        client,
        frames::icmp(v6, ty_reply, 0, [0x42, 0x42, 0, 1], &body),
        1400,
        5,
    );
    for (i, frame) in reply.iter().enumerate() {
        let outcome = l.expect(&format!("echo reply fragment {i}"), frame, Verdict::Pass);
        assert_eq!(outcome.map(|o| o.state), Some(CtState::Established));
    }
    let icmp = if v6 { proto::ICMPV6 } else { proto::ICMP };
    let echo =
        l.k.session(&key(icmp, (client, 0x4242), (server, 0x4242)))
            .expect("echo session");
    assert_eq!(echo.packets, [3, 3]);
    assert_eq!(echo.bytes, [sum_ip_len(&request), sum_ip_len(&reply)]);
    assert_eq!(l.counter(Counter::FragmentsFollowed), 8);
}

#[test]
fn fragment_attacks_are_invalid_ipv4() {
    fragment_attacks(ip("198.18.0.1"), ip("198.18.0.2"));
}

#[test]
fn fragment_attacks_are_invalid_ipv6() {
    fragment_attacks(ip("2001:2::1"), ip("2001:2::2"));
}

/// The classic attacks, each INVALID and counted, against the model.
fn fragment_attacks(client: IpAddr, server: IpAddr) {
    let mut l = Lockstep::standard();
    let segment = |flags| frames::tcp(Tcp::new(40000, 8080, flags).payload(64)).1;
    let syn = frames::packet(
        client,
        server,
        frames::tcp(Tcp::new(40000, 8080, tcp_flags::SYN)),
    );
    let l4 = if client.is_ipv6() { 40 } else { 20 };
    let mut invalid = 0;
    let mut check = |l: &mut Lockstep, what: &str, frame: &[u8]| {
        let outcome = l.expect(what, frame, Verdict::Drop);
        assert_eq!(outcome.map(|o| o.state), Some(CtState::Invalid), "{what}");
        invalid += 1;
        assert_eq!(l.counter(Counter::InvalidFragment), invalid, "{what}");
    };

    // A first fragment with 8 bytes of a TCP header: ports, no flags (RFC 1858).
    let tiny = frames::fragment(client, server, proto::TCP, 11, 0, true, &syn[l4..l4 + 8]);
    check(&mut l, "tiny first fragment", &tiny);
    // A later fragment at offset 8 or 16 would rewrite the TCP flags.
    let tail = segment(tcp_flags::SYN | tcp_flags::RST);
    for offset in [8, 16] {
        let overlap = frames::fragment(
            client,
            server,
            proto::TCP,
            11,
            offset,
            false,
            &tail[offset..],
        );
        check(&mut l, &format!("TCP overlap at {offset}"), &overlap);
    }
    assert!(l.k.sessions().is_empty(), "no attack made a session");

    // A datagram id that another flow's datagram in flight holds.
    l.expect(
        "query",
        &frames::frame(client, server, frames::udp(33000, 5353, 1)),
        Verdict::Pass,
    );
    let answer = frames::fragments(server, client, frames::udp(5353, 33000, 3000), 1400, 12);
    l.expect("answer's first fragment", &answer[0], Verdict::Pass);
    let intruder = frames::fragments(server, client, frames::udp(5353, 33001, 3000), 1400, 12);
    check(
        &mut l,
        "first fragment of another flow, same id",
        &intruder[0],
    );
    for (i, frame) in answer[1..].iter().enumerate() {
        l.expect(&format!("answer fragment {}", i + 1), frame, Verdict::Pass);
    }
    assert_eq!(l.counter(Counter::FragmentsFollowed), 2);
    // The same flow sending its first fragment again (a retransmission) is no conflict.
    l.expect("answer's first fragment", &answer[0], Verdict::Pass);
    l.expect("answer's first fragment again", &answer[0], Verdict::Pass);
    assert_eq!(l.counter(Counter::InvalidFragment), invalid);
}

#[test]
fn a_fragment_flood_is_bounded_and_harms_no_established_flow() {
    let mut l = Lockstep::standard();
    let client = ip("198.18.0.1");
    let server = ip("198.18.0.2");
    l.expect(
        "query",
        &frames::frame(client, server, frames::udp(33000, 5353, 1)),
        Verdict::Pass,
    );
    l.expect(
        "answer",
        &frames::frame(server, client, frames::udp(5353, 33000, 1)),
        Verdict::Pass,
    );
    let flood = MAX_FRAGMENT_DATAGRAMS as usize + 2048;
    let before = l.k.sessions();
    for i in 0..flood {
        // First fragments from many sources, each a datagram of its own, all refused.
        let src = IpAddr::V4(Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8));
        let first = frames::fragment(
            src,
            client,
            proto::UDP,
            i as u32,
            0,
            true,
            &frames::udp(7, 9, 1400).1[..1400],
        );
        assert_eq!(l.k.run(&first), Verdict::Drop, "flood frame {i}");
        let later = frames::fragment(src, client, proto::UDP, i as u32 + 1, 1400, false, &[0; 64]);
        assert_eq!(l.k.run(&later), Verdict::Pass, "unknown flood fragment {i}");
    }
    let records = l.k.fragment_records().len();
    assert!(
        records <= MAX_FRAGMENT_DATAGRAMS as usize,
        "{records} records: the map is bounded by {MAX_FRAGMENT_DATAGRAMS}"
    );
    assert_eq!(l.k.sessions(), before, "fragments never allocate sessions");
    assert_eq!(l.counter(Counter::FragmentsUnknown), flood as u64);
    // The established flow is unharmed, also its fragmented answers.
    let answer = frames::fragments(server, client, frames::udp(5353, 33000, 3000), 1400, 99);
    for frame in &answer {
        assert_eq!(
            l.k.run(frame),
            Verdict::Pass,
            "established flow after the flood"
        );
    }
    assert_eq!(l.counter(Counter::FragmentsFollowed), 2);
    println!(
        "kernel_path: {flood} first fragments flooded: {records} records held \
         (bound {MAX_FRAGMENT_DATAGRAMS}), established flow's fragments followed"
    );
}

/// A policy whose `ssh` rule (id 2) admits new TCP to port 443 under `limit`, after a rule
/// (id 0) that drops the sources in `abusers`, which the limit fills.
fn limited_policy(limit: &str) -> CompiledPolicy {
    reload_policy(&format!(
        concat!(
            "[policy]\ninbound = \"drop\"\n",
            overload_ban_rules!(),
            return_traffic_rule!("return-traffic"),
            r#"
[[rule]]
name = "ssh"
state = ["new"]
proto = "tcp"
dport = [443]
action = "accept"
limit = {limit}
"#
        ),
        limit = limit
    ))
}

#[test]
fn limits_refuse_and_overload_as_the_host_model_says_and_a_flood_of_sources_frees_no_ban() {
    let policy = limited_policy(r#"{ max_src_conn = 2, overload = "abusers" }"#);
    let k = Kernel::start_sized(&test_settings(), &policy, 1 << 16, Ingress::Xdp);
    let mut model = Model::new(test_settings(), &policy);
    // Outside the range the flood below comes from.
    let attacker = ip("198.19.200.9");
    // The same SYNs through the kernel and the host model: two admitted, the third over
    // the cap (and overloaded), the fourth dropped by the ban.
    for (sport, expected, what) in [
        (3001, Verdict::Pass, "first of two"),
        (3002, Verdict::Pass, "second of two"),
        (3003, Verdict::Drop, "over max_src_conn"),
        (3004, Verdict::Drop, "banned"),
    ] {
        let frame = syn_from(attacker, sport);
        let modelled =
            model_verdict(model.packet(&frame, Hook::Ingress, TEST_RUN_IFINDEX, monotonic_ns()));
        assert_eq!(modelled, expected, "the host model: {what}");
        k.expect(what, &frame, expected);
    }
    let hits = k.rule_hits();
    assert_eq!(hits[0], 1, "the ban decided the fourth SYN");
    assert_eq!(k.counter(Counter::LimitRefused), 1);
    assert_eq!(k.counter(Counter::SourcesOverloaded), 1);
    let sources = k
        .maps
        .limit_sources()
        .unwrap_or_else(|error| panic!("limit_sources: {error:?}"));
    assert_eq!(sources.len(), 1, "one source counted: {sources:?}");
    assert_eq!((sources[0].state.conns, sources[0].state.refused), (2, 1));

    // A flood of distinct sources, each opening one session: more than the LRU holds.
    // The LRU stays within its bound, and the ban, which lives in the set, holds.
    let flood = 70_000u32;
    for i in 0..flood {
        let src = IpAddr::V4(Ipv4Addr::from(
            u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 256 + i,
        ));
        k.run(&syn_from(src, 4000));
    }
    let tracked = k
        .maps
        .limit_sources()
        .unwrap_or_else(|error| panic!("limit_sources: {error:?}"))
        .len();
    assert!(
        tracked <= session_common::limits::DEFAULT_MAX_TRACKED_SOURCES as usize,
        "{tracked} sources tracked, more than the LRU's bound"
    );
    assert!(
        tracked > 1000,
        "the flood's sources were counted: {tracked}"
    );
    k.expect(
        "the banned source after a flood of others",
        &syn_from(attacker, 3005),
        Verdict::Drop,
    );
    assert_eq!(k.rule_hits()[0], 2, "the ban, not the cap, dropped it");
    // The reaper's recount makes every source's count what the table holds.
    let counted = k
        .maps
        .recount_limits(monotonic_ns())
        .unwrap_or_else(|error| panic!("recount_limits: {error:?}"));
    let held: u64 = k
        .sessions()
        .values()
        .filter(|s| s.flags & session_flags::COUNTED != 0)
        .count() as u64;
    assert_eq!(
        counted, held,
        "the recount counts the table's counted sessions"
    );
    let summed: u64 = k
        .maps
        .limit_sources()
        .unwrap_or_else(|error| panic!("limit_sources: {error:?}"))
        .iter()
        .map(|s| u64::from(s.state.conns))
        .sum();
    assert_eq!(
        summed, held,
        "after the recount the sources hold what the table holds"
    );
    // A restart with another `[limits] max_tracked_sources` recreates the LRU at that
    // size; the recount refills it from the table.
    let mut k = k;
    let sizes = loader::Sizes {
        max_tracked_sources: 2048,
        ..loader::Sizes::sessions(1 << 16)
    };
    k.ebpf = loader::load(k.maps.dir(), sizes, false, KernelLogLevel::default())
        .unwrap_or_else(|error| panic!("loading again with fewer tracked sources: {error:?}"));
    let path = k.maps.dir().join(map_names::SRC_LIMITS);
    let info = MapData::from_pin(&path)
        .and_then(|map| map.info())
        .unwrap_or_else(|error| panic!("{}: {error:?}", path.display()));
    assert_eq!(
        info.max_entries(),
        2048,
        "the LRU was recreated at the new size"
    );
    k.maps
        .recount_limits(monotonic_ns())
        .unwrap_or_else(|error| panic!("recount_limits: {error:?}"));
    let refilled = k
        .maps
        .limit_sources()
        .unwrap_or_else(|error| panic!("limit_sources: {error:?}"))
        .len();
    assert!(
        (1..=2048).contains(&refilled),
        "the recount refilled the new LRU within its bound: {refilled}"
    );
}
