//! `cargo xtask lab`: the demo. It builds a client, a firewall and a server network
//! namespace, runs `session run` with config/default.toml on the firewall's two veths,
//! sends traffic the policy should allow and traffic it should block, prints what
//! happened to each, shows `session list` and `session stats`, and removes everything
//! again, also on errors and on Ctrl-C.
//!
//! Commands run in a namespace through `nsenter --net=/run/netns/NAME` rather than
//! `ip netns exec`: the latter remounts /sys for the namespace, which hides the bpffs on
//! /sys/fs/bpf, so the daemon could not pin its maps where `session list` finds them.

use std::{
    fs::{self, File},
    io::{BufRead, BufReader, Read, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, RecvTimeoutError},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{checks, cmd, setup};

/// Firewall interface facing the client.
const FW_CLIENT_IF: &str = "to-client";
/// Firewall interface facing the server.
const FW_SERVER_IF: &str = "to-server";
/// The only interface in the client and server namespaces.
const HOST_IF: &str = "eth0";

/// Server addresses the demo traffic goes to (benchmarking ranges only).
const SERVER_V4: &str = "198.18.2.1";
const SERVER_V6: &str = "2001:2:2::1";

/// How long `session run` may take to print `session: ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a demo listener may take to appear in `ss`.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the blocked UDP listener is watched for a datagram.
const UDP_WATCH: Duration = Duration::from_secs(2);
/// Hard stop for one probe command, above its own 2-3 s network timeouts.
const PROBE_LIMIT: Duration = Duration::from_secs(5);
/// How long the daemon gets to detach after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Whether traffic got through the firewall.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    Allowed,
    Blocked,
}

impl Outcome {
    /// Allowed when the reply (or datagram) arrived.
    fn from_arrived(arrived: bool) -> Self {
        if arrived {
            Outcome::Allowed
        } else {
            Outcome::Blocked
        }
    }

    /// The word printed in the demo's result lines.
    fn word(self) -> &'static str {
        match self {
            Outcome::Allowed => "ALLOWED",
            Outcome::Blocked => "BLOCKED",
        }
    }
}

/// Runs the whole demo; the `Lab` guard removes what it created however this returns.
pub fn run(root: &Path) -> Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&interrupted);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("cannot install the Ctrl-C handler that guarantees clean-up")?;
    setup::run().context("setup failed")?;
    checks::build_session(root)?;
    let mut lab = Lab::new(root, interrupted)?;
    lab.stop_if_interrupted()?;
    lab.build_network()?;
    lab.start_listeners()?;
    lab.start_daemon()?;
    let unexpected = lab.send_demo_traffic()?;
    lab.show_tables()?;
    ensure!(
        unexpected == 0,
        "{unexpected} demo result(s) differ from what config/default.toml should do (lines \
         marked UNEXPECTED); the daemon's log:\n{}",
        lab.log_tail()
    );
    println!("lab: every result matched the policy");
    Ok(())
}

/// Everything the demo created, so that `Drop` can remove it.
struct Lab {
    /// The `session` binary.
    bin: PathBuf,
    /// The policy the daemon runs.
    config: PathBuf,
    /// Namespace names.
    client: String,
    firewall: String,
    server: String,
    /// Namespaces created so far, deleted on clean-up.
    namespaces: Vec<String>,
    /// Where the daemon pins its maps.
    pin_dir: PathBuf,
    /// Daemon log and the UDP listener's capture.
    work_dir: PathBuf,
    /// `session run`, in its own process group so that Ctrl-C reaches only us and we stop
    /// it in order.
    daemon: Option<Child>,
    /// socat listeners, each leading its own process group (with its forked children).
    listeners: Vec<Child>,
    /// Set by the Ctrl-C/SIGTERM handler; checked between steps and while waiting.
    interrupted: Arc<AtomicBool>,
}

impl Lab {
    /// Names everything after this process's id so that concurrent runs cannot collide.
    fn new(root: &Path, interrupted: Arc<AtomicBool>) -> Result<Self> {
        let id = format!("sess-lab-{}", std::process::id());
        let work_dir = std::env::temp_dir().join(&id);
        fs::create_dir_all(&work_dir)
            .with_context(|| format!("cannot create {}", work_dir.display()))?;
        Ok(Lab {
            bin: checks::session_bin(root),
            config: root.join("config/default.toml"),
            client: format!("{id}-client"),
            firewall: format!("{id}-fw"),
            server: format!("{id}-server"),
            namespaces: Vec::new(),
            pin_dir: Path::new("/sys/fs/bpf").join(&id),
            work_dir,
            daemon: None,
            listeners: Vec::new(),
            interrupted,
        })
    }

    /// Turns a pending Ctrl-C into an error, which unwinds to the clean-up.
    fn stop_if_interrupted(&self) -> Result<()> {
        ensure!(
            !self.interrupted.load(Ordering::SeqCst),
            "interrupted: cleaning up"
        );
        Ok(())
    }

    /// A command that runs `program` inside namespace `ns`.
    fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(program);
        c
    }

    /// client (eth0) <-> (to-client) firewall (to-server) <-> (eth0) server, IPv4 and IPv6.
    fn build_network(&mut self) -> Result<()> {
        let (c, f, s) = (
            self.client.clone(),
            self.firewall.clone(),
            self.server.clone(),
        );
        for ns in [&c, &f, &s] {
            ip(&["netns", "add", ns])
                .with_context(|| format!("cannot create network namespace {ns}"))?;
            self.namespaces.push(ns.clone());
        }
        let steps = [
            format!("-n {f} link add {FW_CLIENT_IF} type veth peer name {HOST_IF} netns {c}"),
            format!("-n {f} link add {FW_SERVER_IF} type veth peer name {HOST_IF} netns {s}"),
            format!("-n {c} link set lo up"),
            format!("-n {c} link set {HOST_IF} up"),
            format!("-n {f} link set lo up"),
            format!("-n {f} link set {FW_CLIENT_IF} up"),
            format!("-n {f} link set {FW_SERVER_IF} up"),
            format!("-n {s} link set lo up"),
            format!("-n {s} link set {HOST_IF} up"),
            format!("-n {c} addr add 198.18.1.1/24 dev {HOST_IF}"),
            format!("-n {c} addr add 2001:2:1::1/64 dev {HOST_IF} nodad"),
            format!("-n {f} addr add 198.18.1.254/24 dev {FW_CLIENT_IF}"),
            format!("-n {f} addr add 2001:2:1::fe/64 dev {FW_CLIENT_IF} nodad"),
            format!("-n {f} addr add 198.18.2.254/24 dev {FW_SERVER_IF}"),
            format!("-n {f} addr add 2001:2:2::fe/64 dev {FW_SERVER_IF} nodad"),
            format!("-n {s} addr add {SERVER_V4}/24 dev {HOST_IF}"),
            format!("-n {s} addr add {SERVER_V6}/64 dev {HOST_IF} nodad"),
            format!("-n {c} route add default via 198.18.1.254"),
            format!("-n {c} -6 route add default via 2001:2:1::fe"),
            format!("-n {s} route add default via 198.18.2.254"),
            format!("-n {s} -6 route add default via 2001:2:2::fe"),
        ];
        for step in &steps {
            let args: Vec<&str> = step.split_whitespace().collect();
            ip(&args).context("cannot build the lab network")?;
        }
        cmd::stdout(Self::in_ns(&f, "sysctl").args([
            "-w",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ]))
        .context("cannot enable forwarding in the firewall namespace")?;
        println!(
            "lab: {c} (198.18.1.1, 2001:2:1::1) <-> {f} (forwarding) <-> {s} ({SERVER_V4}, {SERVER_V6})"
        );
        Ok(())
    }

    /// Starts the server's socat listeners and waits until they are bound.
    fn start_listeners(&mut self) -> Result<()> {
        let capture = self.udp_capture();
        let listeners: [(&[&str], Stdio); 4] = [
            (&["TCP-LISTEN:22,reuseaddr,fork", "PIPE"], Stdio::null()),
            (&["TCP-LISTEN:8080,reuseaddr,fork", "PIPE"], Stdio::null()),
            (
                &["-u", "UDP-RECV:5353", "-"],
                File::create(&capture)
                    .with_context(|| format!("cannot create {}", capture.display()))?
                    .into(),
            ),
            (&["UDP-RECVFROM:7,fork", "PIPE"], Stdio::null()),
        ];
        for (args, stdout) in listeners {
            let mut c = Self::in_ns(&self.server, "socat");
            c.args(args)
                .stdin(Stdio::null())
                .stdout(stdout)
                .process_group(0);
            let child = c
                .spawn()
                .with_context(|| format!("cannot start `{}`", cmd::describe(&c)))?;
            self.listeners.push(child);
        }
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        let wanted = [("tcp", 22), ("tcp", 8080), ("udp", 5353), ("udp", 7)];
        loop {
            let sockets = cmd::stdout(Self::in_ns(&self.server, "ss").arg("-Hltun"))
                .context("cannot list the server's sockets")?;
            let missing: Vec<_> = wanted
                .iter()
                .filter(|(proto, port)| !listening(&sockets, proto, *port))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("socat listeners did not bind within {LISTEN_TIMEOUT:?}: {missing:?}");
            }
            self.stop_if_interrupted()?;
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// File the port-5353 listener writes every datagram it receives to.
    fn udp_capture(&self) -> PathBuf {
        self.work_dir.join("udp-5353.out")
    }

    /// The daemon's stderr.
    fn daemon_log(&self) -> PathBuf {
        self.work_dir.join("session.log")
    }

    /// Starts `session run` in the firewall namespace and waits for `session: ready`.
    fn start_daemon(&mut self) -> Result<()> {
        let log_path = self.daemon_log();
        let log = File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let mut c = Self::in_ns(&self.firewall, &self.bin);
        c.arg("run")
            .arg("--config")
            .arg(&self.config)
            .args(["--iface", FW_CLIENT_IF, "--iface", FW_SERVER_IF])
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0);
        println!("lab: {}", cmd::describe(&c));
        let start = Instant::now();
        let mut daemon = c.spawn().with_context(|| {
            format!(
                "cannot start {}: build it with `cargo build -p session-user`",
                self.bin.display()
            )
        })?;
        let stdout = daemon.stdout.take().context("daemon stdout is piped")?;
        self.daemon = Some(daemon);

        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            // Keep reading after `ready` so the daemon never blocks on a full pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.trim() == "session: ready" => break,
                Ok(line) => println!("session: {line}"),
                Err(RecvTimeoutError::Timeout) => {
                    if start.elapsed() >= READY_TIMEOUT {
                        bail!(
                            "session run printed no `session: ready` within {READY_TIMEOUT:?}; its log:\n{}",
                            self.log_tail()
                        );
                    }
                    self.stop_if_interrupted()?;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.wait_daemon_exit();
                    bail!(
                        "session run exited before it was ready ({status}); its log:\n{}",
                        self.log_tail()
                    );
                }
            }
        }
        println!(
            "lab: session ready after {:.1} s, attached to {FW_CLIENT_IF} and {FW_SERVER_IF}",
            start.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// The daemon's exit status once its stdout closed (bounded: it is exiting).
    fn wait_daemon_exit(&mut self) -> String {
        let Some(daemon) = self.daemon.as_mut() else {
            return "not started".into();
        };
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = daemon.try_wait() {
                return status.to_string();
            }
            thread::sleep(Duration::from_millis(50));
        }
        "still running after closing stdout".into()
    }

    /// The last lines of the daemon's log, for error messages.
    fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.daemon_log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        if tail.is_empty() {
            "(empty)".into()
        } else {
            tail
        }
    }

    /// Sends the demo traffic, prints one line per probe, returns how many surprised us.
    fn send_demo_traffic(&mut self) -> Result<usize> {
        println!("lab: demo traffic through the firewall (policy config/default.toml):");
        let (c, f) = (self.client.clone(), self.firewall.clone());
        let mut unexpected = 0;
        let mut report = |what: &str, expected: Outcome, got: Outcome| {
            let verdict = if got == expected {
                "as expected"
            } else {
                unexpected += 1;
                "UNEXPECTED"
            };
            println!(
                "  {:<7}  {what:<58} expected {:<7}  {verdict}",
                got.word(),
                expected.word()
            );
        };

        let got = self.ping(&c, "-4", SERVER_V4)?;
        report(
            "client -> server ping (new ICMP echo-request)",
            Outcome::Allowed,
            got,
        );

        let got = self.tcp_echo(&c, 22)?;
        report(
            "client -> server TCP 22 (new tcp dport 22)",
            Outcome::Allowed,
            got,
        );

        let got = self.tcp_echo(&c, 8080)?;
        report(
            "client -> server TCP 8080 (no rule: inbound drop)",
            Outcome::Blocked,
            got,
        );

        let got = self.udp_to_5353(&c)?;
        report(
            "client -> server UDP 5353 (no rule: inbound drop)",
            Outcome::Blocked,
            got,
        );

        let got = self.udp_echo_from(&f, 7)?;
        report(
            "firewall -> server UDP 7, reply is established",
            Outcome::Allowed,
            got,
        );

        let got = self.ping(&c, "-6", SERVER_V6)?;
        report(
            "client -> server ping6 (new ICMPv6 echo-request)",
            Outcome::Allowed,
            got,
        );

        if let Some(daemon) = self.daemon.as_mut()
            && let Some(status) = daemon.try_wait().context("cannot check on session run")?
        {
            bail!(
                "session run exited during the demo ({status}); its log:\n{}",
                self.log_tail()
            );
        }
        Ok(unexpected)
    }

    /// One echo request from `ns` to `dst`, waiting at most 3 s for the reply.
    fn ping(&self, ns: &str, family: &str, dst: &str) -> Result<Outcome> {
        let mut c = Self::in_ns(ns, "ping");
        c.args([family, "-c", "1", "-w", "3", dst]);
        Ok(Outcome::from_arrived(self.probe(c, None)?.success))
    }

    /// A TCP connection from `ns` to the server's echo listener on `port`: allowed when
    /// the line we send comes back.
    fn tcp_echo(&self, ns: &str, port: u16) -> Result<Outcome> {
        let token = format!("session-lab tcp/{port}\n");
        let mut c = Self::in_ns(ns, "socat");
        c.args(["-t", "2", "-T", "3", "-"])
            .arg(format!("TCP:{SERVER_V4}:{port},connect-timeout=2"));
        let done = self.probe(c, Some(&token))?;
        Ok(Outcome::from_arrived(done.stdout.contains(token.trim())))
    }

    /// A UDP datagram from `ns` to the server's port 5353: allowed when the listener's
    /// capture shows it within 2 s.
    fn udp_to_5353(&self, ns: &str) -> Result<Outcome> {
        let mut c = Self::in_ns(ns, "socat");
        c.args(["-u", "-"])
            .arg(format!("UDP-SENDTO:{SERVER_V4}:5353"));
        let done = self.probe(c, Some("session-lab udp/5353\n"))?;
        ensure!(
            done.success,
            "socat could not send the UDP datagram to port 5353"
        );
        let capture = self.udp_capture();
        let deadline = Instant::now() + UDP_WATCH;
        while Instant::now() < deadline {
            let received = fs::metadata(&capture)
                .with_context(|| format!("cannot read {}", capture.display()))?
                .len();
            if received > 0 {
                return Ok(Outcome::Allowed);
            }
            self.stop_if_interrupted()?;
            thread::sleep(Duration::from_millis(50));
        }
        Ok(Outcome::Blocked)
    }

    /// A UDP query from `ns` to the server's echo service: allowed when the reply arrives.
    fn udp_echo_from(&self, ns: &str, port: u16) -> Result<Outcome> {
        let token = format!("session-lab udp/{port}\n");
        let mut c = Self::in_ns(ns, "socat");
        c.args(["-t", "2", "-T", "3", "-"])
            .arg(format!("UDP:{SERVER_V4}:{port}"));
        let done = self.probe(c, Some(&token))?;
        Ok(Outcome::from_arrived(done.stdout.contains(token.trim())))
    }

    /// Runs one probe command with `input` on stdin and returns its exit and stdout,
    /// killing it after `PROBE_LIMIT` whatever its own timeouts do.
    fn probe(&self, mut c: Command, input: Option<&str>) -> Result<Probe> {
        let line = cmd::describe(&c);
        c.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        let mut child = c
            .spawn()
            .with_context(|| format!("cannot start `{line}`"))?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin
                .write_all(input.as_bytes())
                .with_context(|| format!("cannot write to `{line}`"))?;
        }
        let mut stdout = child.stdout.take().context("probe stdout is piped")?;
        let reader = thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        let deadline = Instant::now() + PROBE_LIMIT;
        let success = loop {
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("cannot wait for `{line}`"))?
            {
                break status.success();
            }
            if Instant::now() >= deadline || self.interrupted.load(Ordering::SeqCst) {
                let _ = child.kill();
                let _ = child.wait();
                break false;
            }
            thread::sleep(Duration::from_millis(20));
        };
        let stdout = reader.join().unwrap_or_default();
        self.stop_if_interrupted()?;
        Ok(Probe { success, stdout })
    }

    /// Prints the session table and the counters as an operator would read them.
    fn show_tables(&self) -> Result<()> {
        for sub in ["list", "stats"] {
            let mut c = Self::in_ns(&self.firewall, &self.bin);
            c.arg(sub).arg("--pin-dir").arg(&self.pin_dir);
            println!("\nlab: session {sub} --pin-dir {}", self.pin_dir.display());
            cmd::run(&mut c).with_context(|| format!("`session {sub}` failed"))?;
        }
        Ok(())
    }

    /// Stops the daemon and listeners and deletes namespaces, pins and files. Every step
    /// is attempted even if an earlier one failed; failures are reported, not fatal.
    fn cleanup(&mut self) {
        if let Some(daemon) = self.daemon.take() {
            stop_daemon(daemon);
        }
        for mut listener in self.listeners.drain(..) {
            signal(-pid_of(&listener), libc::SIGKILL);
            let _ = listener.wait();
        }
        for ns in self.namespaces.drain(..).rev() {
            if let Err(err) = ip(&["netns", "del", &ns]) {
                eprintln!("lab: warning: {err:#}; delete it with `ip netns del {ns}`");
            }
        }
        for dir in [&self.pin_dir, &self.work_dir] {
            if dir.exists()
                && let Err(err) = fs::remove_dir_all(dir)
            {
                eprintln!(
                    "lab: warning: cannot remove {}: {err}; remove it with `rm -rf`",
                    dir.display()
                );
            }
        }
        println!("lab: cleaned up (daemon stopped, namespaces and pins removed)");
    }
}

impl Drop for Lab {
    /// The guarantee that the host is left as it was, whichever way the demo ends.
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// What a probe command did.
struct Probe {
    /// It exited 0 within its limit.
    success: bool,
    /// Everything it printed on stdout.
    stdout: String,
}

/// Runs `ip` with `args`.
fn ip(args: &[&str]) -> Result<()> {
    cmd::stdout(Command::new("ip").args(args)).map(drop)
}

/// Whether `ss -Hltun` output shows a `proto` socket bound to `port`.
fn listening(sockets: &str, proto: &str, port: u16) -> bool {
    let suffix = format!(":{port}");
    sockets.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.first() == Some(&proto)
            && fields.get(4).is_some_and(|local| local.ends_with(&suffix))
    })
}

/// SIGTERM (the daemon detaches from the interfaces), then SIGKILL after `STOP_GRACE`.
fn stop_daemon(mut daemon: Child) {
    if let Ok(Some(_)) = daemon.try_wait() {
        return;
    }
    signal(pid_of(&daemon), libc::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = daemon.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!("lab: warning: session run ignored SIGTERM for {STOP_GRACE:?}; killing it");
    let _ = daemon.kill();
    let _ = daemon.wait();
}

/// A child's pid as the kernel's signed type (Linux pids always fit).
fn pid_of(child: &Child) -> libc::pid_t {
    libc::pid_t::try_from(child.id()).expect("Linux pids fit in pid_t")
}

/// Sends `sig` to `pid` (a negative pid names a process group); a process that is already
/// gone is fine.
fn signal(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child (group).
    unsafe {
        libc::kill(pid, sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_matches_protocol_and_port() {
        let ss = "tcp   LISTEN 0      5            0.0.0.0:22        0.0.0.0:*\n\
                  udp   UNCONN 0      0            0.0.0.0:5353      0.0.0.0:*\n";
        assert!(listening(ss, "tcp", 22), "tcp 22 is listed");
        assert!(listening(ss, "udp", 5353), "udp 5353 is listed");
        assert!(!listening(ss, "udp", 22), "22 is tcp only");
        assert!(
            !listening(ss, "tcp", 2),
            "port 2 is not a suffix match of 22"
        );
    }

    #[test]
    fn outcome_follows_arrival() {
        assert_eq!(
            Outcome::from_arrived(true),
            Outcome::Allowed,
            "reply came back"
        );
        assert_eq!(
            Outcome::from_arrived(false),
            Outcome::Blocked,
            "nothing came back"
        );
    }
}
