//! Harness for the network-namespace integration tests of `session`.
//!
//! Each test builds a [`Lab`]: two fresh network namespaces, `client` (198.18.0.1/24, and
//! 2001:2::1/64 in a dual-stack lab) and `fw` (198.18.0.2/24, 2001:2::2/64), joined by a
//! veth pair. The firewall is the `fw` namespace itself:
//! a [`Daemon`] runs `session run` there, attached to fw's end of the veth, with its maps
//! pinned in a bpffs directory of its own. Servers and clients run as [`Background`]
//! processes or as bounded one-shot commands inside either namespace.
//!
//! Every name (namespaces, scratch directory, pin directory) carries the test tag, the pid
//! and a per-process sequence number, so tests run in parallel without seeing each other.
//! Every guard cleans up in `Drop`, also when the test panics, and every wait is bounded.
//! Missing prerequisites make the tests fail with a hint to run `cargo xtask test`; they
//! never skip silently.
//!
//! Commands enter a namespace with `nsenter --net` rather than `ip netns exec`: the latter
//! remounts /sys in a private mount namespace, which hides /sys/fs/bpf, so the daemon and
//! the CLI would not share the pinned maps. Sockets the test itself uses are created by a
//! thread that joined the namespace ([`Lab::in_ns`]); a socket stays in the namespace it
//! was created in, so the test can then use it from any thread.
//!
//! [`raw`] builds and sends hand-made frames (for segments no socket would send) and
//! [`CtCounts`] reads per-state packet counts from both the daemon and the kernel's own
//! conntrack (through nftables counters), for the differential tests.

pub mod attacker;
pub mod bare_xdp;
pub mod bench_object;
pub mod ha;
pub mod lifecycle;
pub mod loadgen;
pub mod raw;
pub mod router;
pub mod syn_flood;
pub mod xdpgen;

use std::cell::Cell;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;

/// IPv4 address of the client namespace, the side that is protected against.
pub const CLIENT_V4: &str = "198.18.0.1";
/// IPv4 address of the fw namespace, the host the daemon protects.
pub const FW_V4: &str = "198.18.0.2";
/// IPv6 address of the client namespace in a dual-stack lab.
pub const CLIENT_V6: &str = "2001:2::1";
/// IPv6 address of the fw namespace in a dual-stack lab.
pub const FW_V6: &str = "2001:2::2";
/// Name of fw's veth end, the interface the daemon attaches to. A fixed name is safe
/// because the veth is created directly inside the lab's own namespaces.
pub const FW_IFACE: &str = "veth-fw";

/// The policy of a host serving TCP 8080: return traffic and new connections to 8080
/// accepted, everything else inbound dropped, everything outbound accepted. Tests add
/// their own rules after it.
pub const WEB_POLICY: &str = concat!(
    session_testkit::inbound_drop_policy!(),
    session_testkit::return_traffic_rule!("return-traffic"),
    session_testkit::accept_new_rule!("web", "tcp", 8080),
);

/// A rule opening UDP 5353 to new flows, to append to [`WEB_POLICY`].
pub const DNS_RULE: &str = session_testkit::accept_new_rule!("dns", "udp", 5353);

/// A rule dropping and logging UDP to 9999, to append to [`WEB_POLICY`]: a packet that
/// makes an event.
pub const BLOCKED_UDP_RULE: &str = r#"
[[rule]]
name = "blocked-udp"
proto = "udp"
dport = [9999]
action = "drop"
log = true
"#;
/// The sysctl that lets a namespace send every ICMP error: by default they are rate
/// limited per destination, and the tests count them exactly.
const ICMP_RATELIMIT_OFF: &str = "net.ipv4.icmp_ratelimit=0";

/// The IPv6 sysctls of a dual-stack namespace: IPv6 on, no DAD, no router solicitations,
/// no ICMPv6 rate limit, so that the only IPv6 control traffic is neighbour discovery and
/// MLD. `default` applies to links created afterwards.
const DUAL_STACK_SYSCTLS: [&str; 7] = [
    "net.ipv6.conf.all.disable_ipv6=0",
    "net.ipv6.conf.default.disable_ipv6=0",
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
    "net.ipv6.conf.all.router_solicitations=0",
    "net.ipv6.conf.default.router_solicitations=0",
    "net.ipv6.icmp.ratelimit=0",
];

/// How long a daemon may take to print `session: ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// [`READY_TIMEOUT`], or `SESSION_TEST_READY_SECS` when set: in a VM under software
/// emulation (`cargo xtask vm-test`) the verifier alone takes longer than that.
fn ready_timeout() -> Duration {
    match std::env::var("SESSION_TEST_READY_SECS") {
        Ok(text) => Duration::from_secs(text.trim().parse().unwrap_or_else(|e| {
            panic!("SESSION_TEST_READY_SECS must be a number of seconds, got {text:?}: {e}")
        })),
        Err(_) => READY_TIMEOUT,
    }
}

/// Name of the client's veth end, for tests that send raw frames or configure routing
/// there.
pub const CLIENT_IFACE: &str = "veth-client";
/// The wire's port towards the client in a [`Lab::wired`] lab.
pub const WIRE_CLIENT_PORT: &str = "wire-client";
/// The wire's port towards fw in a [`Lab::wired`] lab.
pub const WIRE_FW_PORT: &str = "wire-fw";
/// Timeout for the test's own socket operations, so no read or accept can hang.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
const BPFFS: &str = "/sys/fs/bpf";
const NETNS_DIR: &str = "/var/run/netns";
const POLL: Duration = Duration::from_millis(50);
/// Pause after a polled condition holds, so that exact counter assertions also see packets
/// that were still in flight (veth delivers through a NAPI queue, asynchronously).
const SETTLE: Duration = Duration::from_millis(300);
/// Upper bound on the life of any background process, in case the test process itself is
/// killed and cannot run the guards.
const BACKGROUND_LIFETIME_SECS: &str = "600";
const CLI_TIMEOUT_SECS: u64 = 10;
const TOOLS: &[&str] = &[
    "ip", "nsenter", "timeout", "kill", "sysctl", "socat", "ping", "ss", "nft", "tcpdump",
    "unshare", "setpriv",
];
const HINT: &str = "run the netns tests with `cargo xtask test` (as root, with iproute2, \
                    util-linux, socat, iputils-ping, nftables and tcpdump installed)";

/// One end of the lab, so that callers say where a command runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The untrusted peer, 198.18.0.1.
    Client,
    /// The protected host running the daemon, 198.18.0.2.
    Fw,
}

/// A socket a server is expected to open, so that [`Lab::server`] can wait until it is
/// ready before the test sends traffic.
#[derive(Clone, Copy, Debug)]
pub enum Listen {
    /// A listening TCP socket on this port.
    Tcp(u16),
    /// A bound UDP socket on this port.
    Udp(u16),
}

/// Returns the `session` binary after checking that everything the tests need is present,
/// so that a misconfigured run fails loudly instead of skipping.
fn prerequisites() -> PathBuf {
    let bin = std::env::var_os("SESSION_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/session"));
    assert!(
        bin.is_file(),
        "session binary {} not found (set SESSION_BIN); {HINT}",
        bin.display()
    );
    let id = Command::new("id")
        .arg("-u")
        .output()
        .unwrap_or_else(|e| panic!("cannot run `id -u`: {e}; {HINT}"));
    let uid = String::from_utf8_lossy(&id.stdout);
    assert!(
        uid.trim() == "0",
        "the netns tests must run as root (uid is {}); {HINT}",
        uid.trim()
    );
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in TOOLS {
        assert!(
            std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()),
            "`{tool}` is not on PATH; {HINT}"
        );
    }
    bin
}

/// Creates a veth pair with end `a` in namespace `ns_a` and end `b` in `ns_b`.
fn veth(ns_a: &str, a: &str, ns_b: &str, b: &str) {
    host(&[
        "ip", "-n", ns_a, "link", "add", a, "type", "veth", "peer", "name", b, "netns", ns_b,
    ]);
}

/// Waits until `iface` in `ns` is operationally up with its addresses usable: the kernel
/// reports a veth's carrier through linkwatch, up to a second late, and until then IPv6
/// keeps the link's addresses tentative, so a neighbour solicitation sent in that second
/// goes unanswered and the first packet of a test waits for its retry.
pub(crate) fn wait_until_up(ns: &str, iface: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let link = host(&["ip", "-n", ns, "-o", "link", "show", "dev", iface]);
        let addrs = host(&["ip", "-n", ns, "-6", "-o", "addr", "show", "dev", iface]);
        let ipv6_ready = !addrs.contains("tentative")
            && (!addrs.contains("inet6") || addrs.contains("scope link"));
        if link.contains("state UP") && ipv6_ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{iface} in {ns} is not up with usable addresses after 5 s:\n{link}{addrs}"
        );
        sleep(Duration::from_millis(20));
    }
}

/// Runs a command in the host namespace and panics with its output if it fails, for the
/// setup steps that must not go wrong silently.
fn host(argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
    assert!(out.status.success(), "{argv:?} failed: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Moves the calling thread into the network namespace `name`.
pub fn enter_netns(name: &str) -> io::Result<()> {
    let path = format!("{NETNS_DIR}/{name}");
    let ns = File::open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {path}: {e}")))?;
    // SAFETY: setns only changes this thread's network namespace; the fd is valid.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(
            err.kind(),
            format!("cannot enter {path} (needs root): {err}"),
        ));
    }
    Ok(())
}

/// Runs `f` on a thread that has joined the network namespace `name` and returns its
/// result; a panic in `f` is re-raised here. Sockets `f` creates belong to that namespace
/// for good, so the caller can keep using them on its own thread.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            enter_netns(name).unwrap_or_else(|e| panic!("{e}"));
            f()
        });
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The MAC address of `iface` in the network namespace `ns`, for hand-built frames.
pub fn mac_of(ns: &str, iface: &str) -> [u8; 6] {
    let text = host(&["ip", "-n", ns, "-j", "link", "show", "dev", iface]);
    let links: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("`ip -j link show` is not JSON ({e}): {text}"));
    let addr = links[0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address for {iface} in {text}"));
    let bytes: Vec<u8> = addr
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|e| panic!("MAC {addr}: {e}")))
        .collect();
    bytes
        .try_into()
        .unwrap_or_else(|_| panic!("MAC {addr} is not 6 bytes"))
}

/// Deletes the network namespace `ns` (and the veth ends in it), for Drop guards: a
/// failure is reported, not raised, so that cleanup goes on.
pub fn delete_netns(ns: &str) {
    let deleted = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
    if !deleted.is_ok_and(|status| status.success()) {
        eprintln!("warning: could not delete namespace {ns}");
    }
}

/// Formats a finished command's status and output for failure messages.
pub fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls `probe` until it yields a value, at most `timeout`, and panics naming `what`
/// otherwise, so that no wait in a test can hang.
pub fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        sleep(POLL);
    }
}

/// Two tests, one per [`Family`], for a test body written once as `fn body(Family)`:
/// `both_families!(body: name_v4, name_v6);`.
#[macro_export]
macro_rules! both_families {
    ($body:ident: $v4:ident, $v6:ident) => {
        #[test]
        fn $v4() {
            $body($crate::Family::V4);
        }

        #[test]
        fn $v6() {
            $body($crate::Family::V6);
        }
    };
}

/// An address family, so that one test body can run over IPv4 and IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4: 198.18.0.0/24 on the lab link.
    V4,
    /// IPv6: 2001:2::/64 on the lab link (needs [`Lab::dual_stack`]).
    V6,
}

impl Family {
    /// The lab address of `side` in this family, as the CLI prints it.
    pub fn addr(self, side: Side) -> &'static str {
        match (self, side) {
            (Family::V4, Side::Client) => CLIENT_V4,
            (Family::V4, Side::Fw) => FW_V4,
            (Family::V6, Side::Client) => CLIENT_V6,
            (Family::V6, Side::Fw) => FW_V6,
        }
    }

    /// The lab address of `side` in this family, parsed.
    pub fn ip(self, side: Side) -> IpAddr {
        self.addr(side).parse().expect("lab addresses are valid")
    }

    /// The socket address `side`:`port` in this family.
    pub fn sock(self, side: Side, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(side), port)
    }

    /// The value of `family` in `session list --json`.
    pub fn json_name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// The value of `proto` in `session list --json` for this family's ICMP.
    pub fn icmp_name(self) -> &'static str {
        match self {
            Family::V4 => "icmp",
            Family::V6 => "icmpv6",
        }
    }
}

/// Two namespaces joined by a veth pair; deleted on drop, so a failing test leaves nothing
/// behind.
pub struct Lab {
    base: String,
    client_ns: String,
    fw_ns: String,
    /// The namespace between the two sides in a [`Lab::wired`] lab.
    wire_ns: Option<String>,
    dir: PathBuf,
    bin: PathBuf,
    files: Cell<u32>,
}

impl Lab {
    /// Builds an IPv4 lab named after `tag` (keep it short and unique per test). IPv6 is
    /// disabled in both namespaces so that no ND/MLD traffic perturbs the counters.
    pub fn new(tag: &str) -> Lab {
        Lab::build(tag, false, false)
    }

    /// Builds an IPv4 lab whose sides are joined through a third namespace, the wire:
    /// the client's veth pairs with [`WIRE_CLIENT_PORT`] and fw's with [`WIRE_FW_PORT`],
    /// both in the wire. Nothing crosses until the caller attaches a program that
    /// forwards between the two ports ([`bare_xdp::BareXdp::wire`]), so that each side
    /// receives what the other's sockets send as XDP frames, as from a NIC.
    pub fn wired(tag: &str) -> Lab {
        Lab::build(tag, false, true)
    }

    /// Builds a lab with IPv6 enabled as well: 2001:2::1/64 on the client and 2001:2::2/64
    /// on fw, added with `nodad` so that they are usable at once. Duplicate address
    /// detection (also of link-local addresses) and router solicitations are off, so that
    /// the only IPv6 control traffic is neighbour discovery and MLD, which are `untracked`:
    /// a policy for such a lab must accept untracked packets or ND breaks.
    pub fn dual_stack(tag: &str) -> Lab {
        Lab::build(tag, true, false)
    }

    /// [`Lab::new`] for IPv4, [`Lab::dual_stack`] for IPv6, for tests written once for
    /// both families.
    pub fn for_family(tag: &str, family: Family) -> Lab {
        Lab::build(tag, family == Family::V6, false)
    }

    fn build(tag: &str, ipv6: bool, wired: bool) -> Lab {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let bin = prerequisites();
        let base = format!(
            "sess-t-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&base);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let lab = Lab {
            client_ns: format!("{base}-c"),
            fw_ns: format!("{base}-f"),
            wire_ns: wired.then(|| format!("{base}-w")),
            base,
            dir,
            bin,
            files: Cell::new(0),
        };
        // ICMP errors are rate limited per destination by default; the tests count them
        // exactly, so every error must be sent.
        let mut keys = vec![ICMP_RATELIMIT_OFF];
        if ipv6 {
            // `default` applies to the veth created below.
            keys.extend(DUAL_STACK_SYSCTLS);
        } else {
            keys.extend([
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ]);
        }
        for side in [Side::Client, Side::Fw] {
            host(&["ip", "netns", "add", lab.ns(side)]);
            for key in &keys {
                lab.ok(side, 5, &["sysctl", "-qw", key]);
            }
            lab.ok(side, 5, &["ip", "link", "set", "lo", "up"]);
        }
        match &lab.wire_ns {
            None => veth(&lab.client_ns, CLIENT_IFACE, &lab.fw_ns, FW_IFACE),
            Some(wire) => {
                host(&["ip", "netns", "add", wire]);
                // The ports carry no addresses; without IPv6 they send nothing of their own.
                let enter = format!("--net={NETNS_DIR}/{wire}");
                for key in [
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                ] {
                    host(&["nsenter", &enter, "sysctl", "-qw", key]);
                }
                veth(&lab.client_ns, CLIENT_IFACE, wire, WIRE_CLIENT_PORT);
                veth(&lab.fw_ns, FW_IFACE, wire, WIRE_FW_PORT);
                for port in [WIRE_CLIENT_PORT, WIRE_FW_PORT] {
                    host(&["ip", "-n", wire, "link", "set", port, "up"]);
                }
            }
        }
        for side in [Side::Client, Side::Fw] {
            let iface = Lab::iface(side);
            let v4 = format!("{}/24", Family::V4.addr(side));
            lab.ok(side, 5, &["ip", "addr", "add", &v4, "dev", iface]);
            if ipv6 {
                let v6 = format!("{}/64", Family::V6.addr(side));
                lab.ok(
                    side,
                    5,
                    &["ip", "-6", "addr", "add", &v6, "dev", iface, "nodad"],
                );
            }
            lab.ok(side, 5, &["ip", "link", "set", iface, "up"]);
        }
        if wired {
            for side in [Side::Client, Side::Fw] {
                lab.ok(side, 5, &host_end(Lab::iface(side)));
            }
        }
        for side in [Side::Client, Side::Fw] {
            wait_until_up(lab.ns(side), Lab::iface(side));
        }
        lab
    }

    /// The wire's namespace in a [`Lab::wired`] lab.
    pub fn wire_ns(&self) -> Option<&str> {
        self.wire_ns.as_deref()
    }

    /// The name of `side`'s veth end.
    pub fn iface(side: Side) -> &'static str {
        match side {
            Side::Client => CLIENT_IFACE,
            Side::Fw => FW_IFACE,
        }
    }

    /// The MAC address of `side`'s veth end, for hand-built frames.
    pub fn mac(&self, side: Side) -> [u8; 6] {
        mac_of(self.ns(side), Lab::iface(side))
    }

    /// Runs `f` on a thread that has joined `side`'s network namespace and returns its
    /// result; a panic in `f` is re-raised here. Sockets `f` creates belong to that
    /// namespace for good, so the test can keep using them on its own thread.
    pub fn in_ns<T: Send>(&self, side: Side, f: impl FnOnce() -> T + Send) -> T {
        in_netns(self.ns(side), f)
    }

    /// A TCP listener on `side`'s address in `family` at `port`.
    pub fn tcp_listen(&self, side: Side, family: Family, port: u16) -> TcpListener {
        let addr = family.sock(side, port);
        self.in_ns(side, || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("cannot listen on {addr} in {}: {e}", self.ns(side)))
    }

    /// Connects from `side` to `to`, giving up after `timeout`; the error is returned for
    /// tests that expect the firewall to block the connection. The stream gets
    /// [`IO_TIMEOUT`] read and write timeouts.
    pub fn tcp_connect(
        &self,
        side: Side,
        to: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        let stream = self.in_ns(side, || TcpStream::connect_timeout(&to, timeout))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(stream)
    }

    /// Connects from `side` to `to` from the fixed local address `from` (SO_REUSEADDR
    /// set, so the port can be reused while a peer holds the old connection in
    /// TIME_WAIT), giving up after `timeout`.
    pub fn tcp_connect_from(
        &self,
        side: Side,
        from: SocketAddr,
        to: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        let stream = self.in_ns(side, || connect_from(from, to, timeout))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(stream)
    }

    /// A TCP connection from the client to fw:`port` in `family` through the firewall,
    /// returned as (client end, fw end). Both ends have [`IO_TIMEOUT`] read and write
    /// timeouts, so a dropped segment makes the test fail instead of hang.
    pub fn tcp_pair(&self, family: Family, port: u16) -> (TcpStream, TcpStream) {
        let listener = self.tcp_listen(Side::Fw, family, port);
        let to = family.sock(Side::Fw, port);
        let client = self
            .tcp_connect(Side::Client, to, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("client cannot connect to {to}: {e}"));
        let server = accept_within(&listener, IO_TIMEOUT);
        (client, server)
    }

    /// A UDP socket bound to `side`'s address in `family` (port 0: any), with
    /// [`IO_TIMEOUT`] read and write timeouts.
    pub fn udp_socket(&self, side: Side, family: Family, port: u16) -> std::net::UdpSocket {
        let addr = family.sock(side, port);
        let socket = self
            .in_ns(side, || std::net::UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("cannot bind UDP {addr} in {}: {e}", self.ns(side)));
        socket
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| socket.set_write_timeout(Some(IO_TIMEOUT)))
            .unwrap_or_else(|e| panic!("cannot set timeouts on UDP {addr}: {e}"));
        socket
    }

    /// The namespace name of `side`, for messages and for `ip -n`.
    pub fn ns(&self, side: Side) -> &str {
        match side {
            Side::Client => &self.client_ns,
            Side::Fw => &self.fw_ns,
        }
    }

    /// A command running `argv` in `side`'s namespace, killed after `secs` seconds, so
    /// that a client stuck on a dropped packet cannot hang the test.
    fn command(&self, side: Side, secs: u64, argv: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={NETNS_DIR}/{}", self.ns(side)))
            .args(["timeout", "-k", "1", &secs.to_string()])
            .args(argv);
        cmd
    }

    /// Runs `argv` in `side` with no input, bounded by `secs`, and returns its output
    /// whatever the exit status, for tests that expect failure as well as success.
    pub fn run(&self, side: Side, secs: u64, argv: &[&str]) -> Output {
        self.run_with_input(side, secs, argv, b"")
    }

    /// Like [`Lab::run`], with `input` on stdin (then end of file), for clients that send
    /// what they read.
    pub fn run_with_input(&self, side: Side, secs: u64, argv: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .command(side, secs, argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {argv:?} in {}: {e}", self.ns(side)));
        let mut stdin = child.stdin.take().expect("stdin is piped");
        // A client that exits early closes the pipe; its exit status tells the story.
        let _ = stdin.write_all(input);
        drop(stdin);
        child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("cannot wait for {argv:?}: {e}"))
    }

    /// Runs `argv` in `side` bounded by `secs`, panics unless it succeeds, and returns its
    /// stdout, for setup steps.
    pub fn ok(&self, side: Side, secs: u64, argv: &[&str]) -> String {
        let out = self.run(side, secs, argv);
        assert!(
            out.status.success(),
            "{argv:?} in {} failed: {}",
            self.ns(side),
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `argv` in `side` as a long-lived process that is killed when the returned
    /// guard drops (and after ten minutes at the latest).
    pub fn spawn(&self, side: Side, argv: &[&str]) -> Background<'_> {
        let mut full = vec!["timeout", "-k", "1", BACKGROUND_LIFETIME_SECS];
        full.extend_from_slice(argv);
        Background::start(self, side, &full)
    }

    /// Starts a server with [`Lab::spawn`] and waits until its socket `listen` is open, so
    /// that the test's first packet cannot race the server's bind.
    pub fn server(&self, side: Side, listen: Listen, argv: &[&str]) -> Background<'_> {
        let mut server = self.spawn(side, argv);
        let (flags, port) = match listen {
            Listen::Tcp(port) => ("-Hltn", port),
            Listen::Udp(port) => ("-Hlun", port),
        };
        let filter = format!("sport = :{port}");
        wait_for(
            &format!("{argv:?} to listen on {listen:?} in {}", self.ns(side)),
            Duration::from_secs(5),
            || {
                server.assert_running();
                let sockets = self.ok(side, 3, &["ss", flags, &filter]);
                (!sockets.trim().is_empty()).then_some(())
            },
        );
        server
    }

    /// Starts the daemon in fw with `policy` as its config and waits until it is ready.
    pub fn daemon(&self, policy: &str) -> Daemon<'_> {
        self.daemon_with(policy, &[])
    }

    /// [`Lab::daemon`] with `extra` arguments for `session run` (e.g. `--restore FILE`).
    pub fn daemon_with(&self, policy: &str, extra: &[&str]) -> Daemon<'_> {
        let config = self.dir.join("session.toml");
        fs::write(&config, policy)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let pin_dir = Path::new(BPFFS).join(&self.base);
        let bin = self.bin.to_string_lossy();
        let config = config.to_string_lossy();
        let pin = pin_dir.to_string_lossy();
        let argv = [
            &*bin,
            "run",
            "--config",
            &*config,
            "--iface",
            FW_IFACE,
            "--pin-dir",
            &*pin,
        ];
        let argv: Vec<&str> = argv.iter().copied().chain(extra.iter().copied()).collect();
        let mut daemon = Daemon {
            proc: Background::start(self, Side::Fw, &argv),
            pin_dir,
            ready: false,
        };
        daemon
            .proc
            .wait_stdout("session: ready", ready_timeout())
            .unwrap_or_else(|why| panic!("daemon not ready: {why}"));
        daemon.ready = true;
        daemon
    }

    /// Pings `dst` from `side` `count` times, quickly (0.2 s apart, 1 s deadline per
    /// reply), and returns how many replies came back.
    pub fn ping(&self, side: Side, dst: &str, count: u32) -> u64 {
        self.ping_with(side, dst, count, &[])
    }

    /// [`Lab::ping`] with `extra` options for ping (`-s SIZE`, say).
    pub fn ping_with(&self, side: Side, dst: &str, count: u32, extra: &[&str]) -> u64 {
        let count = count.to_string();
        let mut argv = vec!["ping", "-n", "-c", &count, "-i", "0.2", "-W", "1"];
        argv.extend_from_slice(extra);
        argv.push(dst);
        let out = self.run(side, 10, &argv);
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|line| {
                let (_, rest) = line.split_once(" packets transmitted, ")?;
                rest.split_once(" received")?.0.parse().ok()
            })
            .unwrap_or_else(|| panic!("no ping summary in: {}", describe(&out)))
    }

    /// A fresh path in the lab's scratch directory, for a process's output files.
    fn scratch(&self, name: &str) -> PathBuf {
        let n = self.files.get();
        self.files.set(n + 1);
        self.dir.join(format!("{n}-{name}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [
            Some(&self.client_ns),
            Some(&self.fw_ns),
            self.wire_ns.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            delete_netns(ns);
        }
        // The scratch directory only holds logs; a leftover is harmless.
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A process running in a lab namespace, in a process group of its own so that forked
/// children (socat's `fork`) die with it. Stdout and stderr go to files that the test can
/// read at any time; stdin stays open until [`Background::close_stdin`] or drop.
pub struct Background<'lab> {
    label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: PathBuf,
    stderr: PathBuf,
    lab: &'lab Lab,
}

impl<'lab> Background<'lab> {
    fn start(lab: &'lab Lab, side: Side, argv: &[&str]) -> Background<'lab> {
        let label = format!("{argv:?} in {}", lab.ns(side));
        let name = Path::new(argv[0])
            .file_name()
            .map_or_else(|| "proc".into(), |n| n.to_string_lossy().into_owned());
        let stdout = lab.scratch(&format!("{name}.out"));
        let stderr = lab.scratch(&format!("{name}.err"));
        let create = |path: &Path| {
            File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()))
        };
        let mut child = Command::new("nsenter")
            .arg(format!("--net={NETNS_DIR}/{}", lab.ns(side)))
            .args(argv)
            .stdin(Stdio::piped())
            .stdout(create(&stdout))
            .stderr(create(&stderr))
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {label}: {e}"));
        Background {
            label,
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            lab,
        }
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Everything the process wrote to stderr so far, for failure messages.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Writes `data` to the process's stdin, for interactive clients.
    pub fn send(&mut self, data: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        stdin
            .write_all(data)
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("cannot write to {}: {e}", self.label));
    }

    /// Closes stdin, so that a client like socat ends its connection cleanly.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .try_wait()
            .unwrap_or_else(|e| panic!("cannot poll {}: {e}", self.label))
    }

    /// Panics with the process's stderr if it has ended, for servers and daemons that must
    /// stay up.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.exited() {
            panic!(
                "{} exited early ({status}); stderr:\n{}",
                self.label,
                self.stderr()
            );
        }
    }

    /// Waits at most `timeout` for `needle` on stdout; on timeout or early exit returns the
    /// reason with the process's stderr, so the caller can say what it was waiting for.
    pub fn wait_stdout(&mut self, needle: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.exited() {
                // The output may have landed between the read and the exit.
                if self.stdout().contains(needle) {
                    return Ok(());
                }
                return Err(format!(
                    "{} exited ({status}) without printing {needle:?}; stdout:\n{}stderr:\n{}",
                    self.label,
                    self.stdout(),
                    self.stderr()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not print {needle:?} within {timeout:?}; stdout:\n{}stderr:\n{}",
                    self.label,
                    self.stdout(),
                    self.stderr()
                ));
            }
            sleep(POLL);
        }
    }

    /// Waits at most `timeout` for the process to end and returns its status, panicking if
    /// it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_for(&format!("{} to exit", self.label), timeout, || {
            self.exited()
        })
    }

    /// Sends SIGTERM to the process group, waits up to `grace`, then sends SIGKILL.
    fn stop(&mut self, grace: Duration) {
        self.stdin = None;
        if self.exited().is_some() {
            return;
        }
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-TERM", "--", &group])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            sleep(POLL);
        }
        eprintln!(
            "warning: {} ignored SIGTERM for {grace:?}, killing it",
            self.label
        );
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Background<'_> {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(1));
    }
}

/// The `session` daemon running in a lab's fw namespace, with the CLI pointed at its pin
/// directory. Dropping it stops the daemon (SIGTERM, then SIGKILL after 5 s) and removes
/// the pinned maps.
pub struct Daemon<'lab> {
    proc: Background<'lab>,
    pin_dir: PathBuf,
    /// Whether `session: ready` was seen; before that, the panic already shows stderr.
    ready: bool,
}

impl Daemon<'_> {
    /// Runs `session ARGS --pin-dir DIR` in fw, bounded in time, and returns its stdout;
    /// panics with the CLI's and the daemon's stderr if it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let argv = self.cli_argv(args);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = self.proc.lab.run(Side::Fw, CLI_TIMEOUT_SECS, &argv);
        assert!(
            out.status.success(),
            "{argv:?} failed: {}\n--- daemon stderr ---\n{}",
            describe(&out),
            self.proc.stderr()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What the daemon has logged so far.
    pub fn stderr(&self) -> String {
        self.proc.stderr()
    }

    /// The daemon's pin directory, for tests that read the maps themselves.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The sessions from `session list --json`, one JSON object each.
    pub fn list_json(&self) -> Vec<Value> {
        let text = self.cli(&["list", "--json"]);
        match serde_json::from_str(&text) {
            Ok(Value::Array(sessions)) => sessions,
            Ok(other) => panic!("`session list --json` is not an array: {other}"),
            Err(e) => panic!("`session list --json` is not JSON ({e}):\n{text}"),
        }
    }

    /// The parsed output of `session stats --json`.
    pub fn stats_json(&self) -> Value {
        let text = self.cli(&["stats", "--json"]);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("`session stats --json` is not JSON ({e}):\n{text}"))
    }

    /// Polls the stats until `holds` is true (at most 5 s), then pauses briefly and returns
    /// fresh stats, so that exact assertions also count packets still in flight.
    pub fn stats_when(&self, what: &str, holds: impl Fn(&Value) -> bool) -> Value {
        let timeout = Duration::from_secs(5);
        let deadline = Instant::now() + timeout;
        loop {
            let stats = self.stats_json();
            if holds(&stats) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; last stats: {stats}"
            );
            sleep(POLL);
        }
        sleep(SETTLE);
        self.stats_json()
    }

    /// Polls `session list --json` (at most 5 s) until the session of `proto` originated
    /// by `src` towards `dst`:`dport` is in `state`, and returns it; panics with the
    /// session as last seen otherwise. Polling, because the segment that moves a TCP
    /// session on (a delayed ACK, say) may still be on its way.
    pub fn wait_session(
        &self,
        proto: &str,
        src: &str,
        dst: &str,
        dport: u16,
        state: &str,
    ) -> Value {
        let timeout = Duration::from_secs(5);
        let deadline = Instant::now() + timeout;
        loop {
            let sessions = self.list_json();
            let found = find_session(&sessions, proto, src, dst, dport).cloned();
            if let Some(session) = &found
                && session["state"] == state
            {
                return session.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{proto} session {src} -> {dst}:{dport} not in {state} within {timeout:?}; \
                 last seen: {}; all sessions: {sessions:?}",
                found.map_or_else(|| "absent".to_string(), |s| s.to_string())
            );
            sleep(POLL);
        }
    }

    /// Waits (at most `timeout`) until the daemon has seen no IP packet for `quiet`, so
    /// that a measurement starts after neighbour discovery, MLD and retransmissions have
    /// died down.
    pub fn wait_quiet(&self, quiet: Duration, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = counter(&self.stats_json(), "packets_seen");
        let mut since = Instant::now();
        loop {
            sleep(POLL);
            let seen = counter(&self.stats_json(), "packets_seen");
            if seen != last {
                last = seen;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "traffic did not stop for {quiet:?} within {timeout:?} (packets_seen {seen})"
            );
        }
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        self.proc.stop(Duration::from_secs(5));
        if self.ready && std::thread::panicking() {
            eprintln!("--- {} stderr ---\n{}", self.proc.label, self.proc.stderr());
        }
        if self.pin_dir.exists()
            && let Err(e) = fs::remove_dir_all(&self.pin_dir)
        {
            eprintln!("warning: cannot remove {}: {e}", self.pin_dir.display());
        }
    }
}

/// Accepts one connection on `listener` within `timeout` (polling, so a connection the
/// firewall dropped fails the test instead of hanging it); the stream gets [`IO_TIMEOUT`]
/// read and write timeouts.
pub fn accept_within(listener: &TcpListener, timeout: Duration) -> TcpStream {
    listener
        .set_nonblocking(true)
        .unwrap_or_else(|e| panic!("cannot make the listener non-blocking: {e}"));
    let stream = wait_for("a connection to accept", timeout, || {
        match listener.accept() {
            Ok((stream, _)) => Some(stream),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("accept failed: {e}"),
        }
    });
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .unwrap_or_else(|e| panic!("cannot configure the accepted stream: {e}"));
    stream
}

/// The `sockaddr` of `addr` and its length, for libc calls.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid; the casts stay within its size.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let len = match addr {
            SocketAddr::V4(v4) => {
                let sin = &mut *(&raw mut storage).cast::<libc::sockaddr_in>();
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = v4.port().to_be();
                sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(v6) => {
                let sin6 = &mut *(&raw mut storage).cast::<libc::sockaddr_in6>();
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = v6.port().to_be();
                sin6.sin6_addr.s6_addr = v6.ip().octets();
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (storage, len as libc::socklen_t)
    }
}

/// socket, SO_REUSEADDR, bind to `from`, connect to `to` (bounded by SO_SNDTIMEO), in the
/// calling thread's namespace. std has no way to bind before connecting.
fn connect_from(from: SocketAddr, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    let family = if from.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket calls on an fd owned right away, with correctly sized
    // option values and addresses.
    unsafe {
        let fd = OwnedFd::from_raw_fd(check(libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ))?);
        let one: libc::c_int = 1;
        try_set_socket_option(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, &one)?;
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        try_set_socket_option(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDTIMEO, &tv)?;
        let (local, local_len) = sockaddr(from);
        check(libc::bind(
            fd.as_raw_fd(),
            (&raw const local).cast(),
            local_len,
        ))?;
        let (remote, remote_len) = sockaddr(to);
        check(libc::connect(
            fd.as_raw_fd(),
            (&raw const remote).cast(),
            remote_len,
        ))?;
        Ok(TcpStream::from(fd))
    }
}

/// Sets the socket option `level`/`name` of `fd` to `value`; the OS error when the kernel
/// refuses.
fn try_set_socket_option<T>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: setsockopt reads `size_of::<T>()` bytes of the value we borrow, on an fd the
    // caller owns.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the socket option `level`/`name` of `fd` to `value`; panics with the option's
/// numbers and the OS error when the kernel refuses.
pub fn set_socket_option<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) {
    try_set_socket_option(fd, level, name, value)
        .unwrap_or_else(|error| panic!("setsockopt({level}, {name}) failed: {error}"));
}

/// Turns on TCP keepalive with one-second idle time and interval, so that a test sees
/// keepalive probes (a segment one byte below the next sequence number) within seconds.
pub fn set_fast_keepalive(stream: &TcpStream) {
    for (level, name) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
    ] {
        set_socket_option(stream.as_raw_fd(), level, name, &(1 as libc::c_int));
    }
}

/// Reads from `stream` until end of file (bounded by the stream's read timeout) and
/// returns everything read, so a test can check that a half-closed or closing peer's data
/// all arrived.
pub fn read_to_eof(stream: &mut TcpStream) -> Vec<u8> {
    let mut data = Vec::new();
    stream
        .read_to_end(&mut data)
        .unwrap_or_else(|e| panic!("reading until EOF failed after {} bytes: {e}", data.len()));
    data
}

/// Reads exactly `len` bytes from `stream` (bounded by its read timeout).
pub fn read_exact_len(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut data = vec![0; len];
    stream
        .read_exact(&mut data)
        .unwrap_or_else(|e| panic!("reading {len} bytes failed: {e}"));
    data
}

/// Sets SO_LINGER to zero, so that dropping the stream sends a RST instead of a FIN: the
/// one portable way to make a real TCP stack abort a connection.
pub fn set_linger_zero(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_socket_option(
        stream.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_LINGER,
        &linger,
    );
}

/// Packet counts per `ct state`, the quantity the differential tests compare between the
/// daemon and the kernel's conntrack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtCounts {
    /// `ct state new`.
    pub new: u64,
    /// `ct state established`.
    pub established: u64,
    /// `ct state related`.
    pub related: u64,
    /// `ct state invalid`.
    pub invalid: u64,
    /// `ct state untracked`.
    pub untracked: u64,
}

/// The ct states in the order of [`CtCounts`], with the daemon's counter names.
const CT_STATES: [(&str, &str); 5] = [
    ("new", "state_new"),
    ("established", "state_established"),
    ("related", "state_related"),
    ("invalid", "state_invalid"),
    ("untracked", "state_untracked"),
];

/// Name of the nftables table [`Lab::install_ct_counters`] creates.
const NFT_TABLE: &str = "diff";

impl CtCounts {
    fn get(&self, state: &str) -> u64 {
        let mut copy = *self;
        *copy.slot(state)
    }

    fn slot(&mut self, state: &str) -> &mut u64 {
        match state {
            "new" => &mut self.new,
            "established" => &mut self.established,
            "related" => &mut self.related,
            "invalid" => &mut self.invalid,
            "untracked" => &mut self.untracked,
            other => panic!("unknown ct state {other:?}"),
        }
    }

    /// The daemon's per-state counters from `session stats --json`.
    pub fn from_stats(stats: &Value) -> CtCounts {
        let mut counts = CtCounts::default();
        for (state, counter_name) in CT_STATES {
            *counts.slot(state) = counter(stats, counter_name);
        }
        counts
    }

    /// The growth from `before` to `self`; panics if a counter went backwards.
    pub fn since(&self, before: &CtCounts) -> CtCounts {
        let mut out = CtCounts::default();
        for (state, _) in CT_STATES {
            let (was, now) = (before.get(state), self.get(state));
            *out.slot(state) = now
                .checked_sub(was)
                .unwrap_or_else(|| panic!("ct state {state} count went backwards: {was} -> {now}"));
        }
        out
    }
}

impl fmt::Display for CtCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "new {} established {} related {} invalid {} untracked {}",
            self.new, self.established, self.related, self.invalid, self.untracked
        )
    }
}

impl Lab {
    /// Makes the kernel's conntrack in fw count packets per `ct state`, as a reference for
    /// the daemon: a table `inet diff` with a chain on prerouting and one on output, both
    /// at priority -150 (after conntrack at -200), with one counter per state. The rules
    /// match only fw's veth, because that is the only interface the daemon sees.
    pub fn install_ct_counters(&self) {
        let mut script = format!("table inet {NFT_TABLE} {{\n");
        for (chain, hook, dir) in [
            ("pre", "prerouting", "iifname"),
            ("out", "output", "oifname"),
        ] {
            script += &format!(
                "  chain {chain} {{\n    type filter hook {hook} priority -150; policy accept;\n"
            );
            for (state, _) in CT_STATES {
                script += &format!(
                    "    {dir} \"{FW_IFACE}\" ct state {state} counter comment \"{state}\"\n"
                );
            }
            script += "  }\n";
        }
        script += "}\n";
        let out = self.run_with_input(Side::Fw, 10, &["nft", "-f", "-"], script.as_bytes());
        assert!(
            out.status.success(),
            "cannot install the nft counters:\n{script}{}",
            describe(&out)
        );
    }

    /// The kernel's per-state packet counts in fw (prerouting plus output) since
    /// [`Lab::install_ct_counters`].
    pub fn ct_counters(&self) -> CtCounts {
        let text = self.ok(
            Side::Fw,
            10,
            &["nft", "-j", "list", "table", "inet", NFT_TABLE],
        );
        let json: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("`nft -j list table` is not JSON ({e}): {text}"));
        let mut counts = CtCounts::default();
        let mut rules = 0;
        for item in json["nftables"].as_array().into_iter().flatten() {
            let Some(rule) = item.get("rule") else {
                continue;
            };
            let state = rule["comment"]
                .as_str()
                .unwrap_or_else(|| panic!("nft rule without comment: {rule}"));
            let packets = rule["expr"]
                .as_array()
                .and_then(|exprs| exprs.iter().find_map(|e| e["counter"]["packets"].as_u64()))
                .unwrap_or_else(|| panic!("nft rule without counter: {rule}"));
            *counts.slot(state) += packets;
            rules += 1;
        }
        assert_eq!(rules, 2 * CT_STATES.len(), "unexpected nft table: {text}");
        counts
    }
}

/// The global counter `name` from `session stats --json`; panics if it is missing, since
/// the contract lists it.
pub fn counter(stats: &Value, name: &str) -> u64 {
    stats["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("stats have no counter {name:?}: {stats}"))
}

/// How much counter `name` grew from `before` to `after`.
pub fn delta(before: &Value, after: &Value, name: &str) -> u64 {
    let (was, now) = (counter(before, name), counter(after, name));
    now.checked_sub(was)
        .unwrap_or_else(|| panic!("counter {name} went backwards: {was} -> {now}"))
}

/// The hits of rule `name` from `session stats --json`; panics if the rule is missing.
pub fn rule_hits(stats: &Value, name: &str) -> u64 {
    stats["rules"]
        .as_array()
        .and_then(|rules| rules.iter().find(|rule| rule["name"] == name))
        .and_then(|rule| rule["hits"].as_u64())
        .unwrap_or_else(|| panic!("stats have no hits for rule {name:?}: {stats}"))
}

/// The session of protocol `proto` originated by `src` towards `dst`:`dport`, if listed.
pub fn find_session<'s>(
    sessions: &'s [Value],
    proto: &str,
    src: &str,
    dst: &str,
    dport: u16,
) -> Option<&'s Value> {
    sessions
        .iter()
        .find(|s| s["proto"] == proto && s["src"] == src && s["dst"] == dst && s["dport"] == dport)
}

impl Daemon<'_> {
    /// Replaces the daemon's config file with `policy` (applied at the next reload).
    pub fn write_config(&self, policy: &str) {
        let config = self.proc.lab.config_path();
        fs::write(&config, policy)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
    }

    /// Starts `session ARGS --pin-dir DIR` in fw in the background, for commands that run
    /// until stopped, such as `session events`.
    pub fn cli_background(&self, args: &[&str]) -> Background<'_> {
        let argv = self.cli_argv(args);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.proc.lab.spawn(Side::Fw, &argv)
    }

    /// `session ARGS --pin-dir DIR`: the command line of a CLI call on this daemon's maps.
    fn cli_argv(&self, args: &[&str]) -> Vec<String> {
        let mut argv = vec![self.proc.lab.bin.to_string_lossy().into_owned()];
        argv.extend(args.iter().map(|arg| arg.to_string()));
        argv.push("--pin-dir".to_string());
        argv.push(self.pin_dir.to_string_lossy().into_owned());
        argv
    }
}

/// The `ethtool` command that makes a veth end act as a host behind a wire, for a path on
/// which XDP redirects frames to it: GRO on, because veth takes a redirected frame only
/// when its peer has GRO on or an XDP program; and transmit checksumming off, so that its
/// sockets' packets leave with finished checksums, as they arrive from a NIC, rather than
/// with a note for offload that a redirected frame does not carry.
pub fn host_end(iface: &str) -> [&str; 7] {
    ["ethtool", "-K", iface, "gro", "on", "tx", "off"]
}
