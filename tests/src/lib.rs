//! Harness for the network-namespace integration tests of `session`.
//!
//! Each test builds a [`Lab`]: two fresh network namespaces, `client` (198.18.0.1/24) and
//! `fw` (198.18.0.2/24), joined by a veth pair. The firewall is the `fw` namespace itself:
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
//! the CLI would not share the pinned maps.

use std::cell::Cell;
use std::fs::{self, File};
use std::io::Write;
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
/// Name of fw's veth end, the interface the daemon attaches to. A fixed name is safe
/// because the veth is created directly inside the lab's own namespaces.
pub const FW_IFACE: &str = "veth-fw";
/// How long a daemon may take to print `session: ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

const CLIENT_IFACE: &str = "veth-client";
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
    "ip", "nsenter", "timeout", "kill", "sysctl", "socat", "ping", "ss",
];
const HINT: &str = "run the netns tests with `cargo xtask test` (as root, with iproute2, \
                    util-linux, socat and iputils-ping installed)";

/// One end of the lab, so that callers say where a command runs.
#[derive(Clone, Copy, Debug)]
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

/// Runs a command in the host namespace and panics with its output if it fails, for the
/// setup steps that must not go wrong silently.
fn host(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
    assert!(out.status.success(), "{argv:?} failed: {}", describe(&out));
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

/// Two namespaces joined by a veth pair; deleted on drop, so a failing test leaves nothing
/// behind.
pub struct Lab {
    base: String,
    client_ns: String,
    fw_ns: String,
    dir: PathBuf,
    bin: PathBuf,
    files: Cell<u32>,
}

impl Lab {
    /// Builds an IPv4 lab named after `tag` (keep it short and unique per test). IPv6 is
    /// disabled in both namespaces so that no ND/MLD traffic perturbs the counters.
    pub fn new(tag: &str) -> Lab {
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
            base,
            dir,
            bin,
            files: Cell::new(0),
        };
        for side in [Side::Client, Side::Fw] {
            host(&["ip", "netns", "add", lab.ns(side)]);
            for scope in ["all", "default"] {
                let key = format!("net.ipv6.conf.{scope}.disable_ipv6=1");
                lab.ok(side, 5, &["sysctl", "-qw", &key]);
            }
            lab.ok(side, 5, &["ip", "link", "set", "lo", "up"]);
        }
        host(&[
            "ip",
            "-n",
            &lab.client_ns,
            "link",
            "add",
            CLIENT_IFACE,
            "type",
            "veth",
            "peer",
            "name",
            FW_IFACE,
            "netns",
            &lab.fw_ns,
        ]);
        for (side, iface, addr) in [
            (Side::Client, CLIENT_IFACE, "198.18.0.1/24"),
            (Side::Fw, FW_IFACE, "198.18.0.2/24"),
        ] {
            lab.ok(side, 5, &["ip", "addr", "add", addr, "dev", iface]);
            lab.ok(side, 5, &["ip", "link", "set", iface, "up"]);
        }
        lab
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
        let mut daemon = Daemon {
            proc: Background::start(self, Side::Fw, &argv),
            pin_dir,
            ready: false,
        };
        daemon
            .proc
            .wait_stdout("session: ready", READY_TIMEOUT)
            .unwrap_or_else(|why| panic!("daemon not ready: {why}"));
        daemon.ready = true;
        daemon
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
        for ns in [&self.client_ns, &self.fw_ns] {
            let deleted = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            if !deleted.is_ok_and(|status| status.success()) {
                eprintln!("warning: could not delete namespace {ns}");
            }
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
        let lab = self.proc.lab;
        let bin = lab.bin.to_string_lossy();
        let pin = self.pin_dir.to_string_lossy();
        let mut argv = vec![&*bin];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["--pin-dir", &*pin]);
        let out = lab.run(Side::Fw, CLI_TIMEOUT_SECS, &argv);
        assert!(
            out.status.success(),
            "{argv:?} failed: {}\n--- daemon stderr ---\n{}",
            describe(&out),
            self.proc.stderr()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
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
