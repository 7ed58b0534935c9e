//! A high-availability lab for state sync (tests/ha.rs): two firewalls, fw1 and fw2,
//! share VRRP virtual addresses (keepalived) on a LAN and a WAN bridge, and sync their
//! sessions over a link of their own.
//!
//! ```text
//! client 198.18.1.10 ─┐                       ┌─ server 198.18.2.10
//!     (gw .1, VRRP)   lan bridge          wan bridge   (gw .1, VRRP)
//!                  ┌──┴─────────┐   ┌─────────┴──┐
//!        fw1 lan0 198.18.1.2   fw1 wan0 198.18.2.2
//!        fw2 lan0 198.18.1.3   fw2 wan0 198.18.2.3
//!        fw1 sync0 198.19.0.1/30 ───── fw2 sync0 198.19.0.2/30
//! ```
//!
//! Each firewall runs `session run` on lan0 and wan0 with `tcp_loose` off, and keepalived
//! with the two instances in one sync group (fw1 priority 200, fw2 100). Everything the
//! lab creates (namespaces, processes, pin directories, files) goes when it drops.

use std::{
    fs::{self, File},
    net::{TcpListener, TcpStream, UdpSocket},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    NETNS_DIR, delete_netns, describe, host, in_netns, prerequisites, veth, wait_for, wait_until_up,
};

/// The UDP port of the sync link.
pub const SYNC_PORT: u16 = 7946;
/// The LAN's virtual address, the client's gateway.
pub const LAN_VIP: &str = "198.18.1.1";
/// The WAN's virtual address, the server's gateway.
pub const WAN_VIP: &str = "198.18.2.1";
/// The client's address.
pub const CLIENT: &str = "198.18.1.10";
/// The server's address.
pub const SERVER: &str = "198.18.2.10";

/// One of the two firewalls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fw {
    /// The first, with the higher VRRP priority: the active one at start.
    One,
    /// The second: the standby at start.
    Two,
}

impl Fw {
    fn index(self) -> usize {
        match self {
            Fw::One => 0,
            Fw::Two => 1,
        }
    }
    fn host_octet(self) -> u8 {
        2 + self.index() as u8
    }
    /// This firewall's address on the sync link.
    pub fn sync_addr(self) -> String {
        format!("198.19.0.{}", 1 + self.index())
    }
    /// The other firewall.
    pub fn other(self) -> Fw {
        match self {
            Fw::One => Fw::Two,
            Fw::Two => Fw::One,
        }
    }
}

/// A long-lived process in a namespace, killed (its process group) when dropped.
pub struct Proc {
    label: String,
    child: Child,
    stderr: PathBuf,
}

impl Proc {
    fn start(ns: &str, argv: &[&str], log: &Path) -> Proc {
        let out =
            File::create(log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log file");
        let child = Command::new("nsenter")
            .arg(format!("--net={NETNS_DIR}/{ns}"))
            .args(["timeout", "-k", "1", "600"])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {argv:?} in {ns}: {e}"));
        Proc {
            label: format!("{argv:?} in {ns}"),
            child,
            stderr: log.to_path_buf(),
        }
    }

    /// The process id of the program itself (the child of its `timeout` wrapper).
    pub fn pid(&self) -> u32 {
        let wrapper = self.child.id().to_string();
        fs::read_dir("/proc")
            .expect("read /proc")
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| {
                fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                    stat.rsplit(") ")
                        .next()
                        .and_then(|rest| rest.split_whitespace().nth(1))
                        .is_some_and(|ppid| ppid == wrapper)
                })
            })
            .unwrap_or_else(|| panic!("no process under {}", self.label))
    }

    /// What the process logged.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
    }

    /// Stops the process: `signal` (e.g. "-TERM", "-KILL"), then SIGKILL after 5 s.
    pub fn stop(&mut self, signal: &str) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        self.signal(signal);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: {} outlived {signal}, killing it", self.label);
        self.signal("-KILL");
        let _ = self.child.wait();
    }

    fn wait_log(&self, needle: &str, timeout: Duration) {
        wait_for(&format!("`{needle}` from {}", self.label), timeout, || {
            self.log().contains(needle).then_some(())
        });
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop("-TERM");
    }
}

/// The lab: namespaces and, per firewall, a session daemon and keepalived.
pub struct HaLab {
    base: String,
    dir: PathBuf,
    bin: PathBuf,
    /// The session daemons, by [`Fw::index`]; `None` while stopped.
    daemons: [Option<Proc>; 2],
    /// keepalived, by [`Fw::index`].
    keepalived: [Option<Proc>; 2],
    /// conntrackd (the comparison), by [`Fw::index`].
    conntrackd: [Option<Proc>; 2],
}

impl HaLab {
    /// Builds the namespaces and links (nothing runs yet). `tag` names them.
    pub fn new(tag: &str) -> HaLab {
        let bin = prerequisites();
        let base = format!("ha{}-{tag}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(&base);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let lab = HaLab {
            base,
            dir,
            bin,
            daemons: [None, None],
            keepalived: [None, None],
            conntrackd: [None, None],
        };
        for ns in ["c", "s", "lan", "wan", "fw1", "fw2"] {
            host(&["ip", "netns", "add", &lab.ns(ns)]);
            lab.ip(ns, &["link", "set", "lo", "up"]);
        }
        for (bridge_ns, bridge) in [("lan", "brl"), ("wan", "brw")] {
            lab.ip(bridge_ns, &["link", "add", bridge, "type", "bridge"]);
            lab.ip(bridge_ns, &["link", "set", bridge, "up"]);
        }
        let attach =
            |ns: &str, iface: &str, bridge_ns: &str, bridge: &str, port: &str, addr: &str| {
                veth(&lab.ns(ns), iface, &lab.ns(bridge_ns), port);
                lab.ip(bridge_ns, &["link", "set", port, "master", bridge, "up"]);
                lab.ip(ns, &["addr", "add", addr, "dev", iface]);
                lab.ip(ns, &["link", "set", iface, "up"]);
            };
        attach("c", "eth0", "lan", "brl", "p-c", &format!("{CLIENT}/24"));
        attach("s", "eth0", "wan", "brw", "p-s", &format!("{SERVER}/24"));
        for fw in [Fw::One, Fw::Two] {
            let ns = lab.fw_ns_short(fw);
            let octet = fw.host_octet();
            attach(
                ns,
                "lan0",
                "lan",
                "brl",
                &format!("p-{ns}l"),
                &format!("198.18.1.{octet}/24"),
            );
            attach(
                ns,
                "wan0",
                "wan",
                "brw",
                &format!("p-{ns}w"),
                &format!("198.18.2.{octet}/24"),
            );
            lab.sysctl(ns, "net.ipv4.ip_forward=1");
        }
        veth(&lab.ns("fw1"), "sync0", &lab.ns("fw2"), "sync0");
        for fw in [Fw::One, Fw::Two] {
            let ns = lab.fw_ns_short(fw);
            lab.ip(
                ns,
                &[
                    "addr",
                    "add",
                    &format!("{}/30", fw.sync_addr()),
                    "dev",
                    "sync0",
                ],
            );
            lab.ip(ns, &["link", "set", "sync0", "up"]);
        }
        for (ns, iface) in [
            ("c", "eth0"),
            ("s", "eth0"),
            ("fw1", "lan0"),
            ("fw1", "wan0"),
            ("fw1", "sync0"),
            ("fw2", "lan0"),
            ("fw2", "wan0"),
            ("fw2", "sync0"),
        ] {
            wait_until_up(&lab.ns(ns), iface);
        }
        lab.ip("c", &["route", "add", "default", "via", LAN_VIP]);
        lab.ip("s", &["route", "add", "default", "via", WAN_VIP]);
        lab.write_key("sync.key", &[0x5a; 32]);
        lab
    }

    fn ns(&self, short: &str) -> String {
        format!("{}-{short}", self.base)
    }

    fn fw_ns_short(&self, fw: Fw) -> &'static str {
        match fw {
            Fw::One => "fw1",
            Fw::Two => "fw2",
        }
    }

    /// The namespace of a firewall.
    pub fn fw_ns(&self, fw: Fw) -> String {
        self.ns(self.fw_ns_short(fw))
    }

    /// Runs `ip ARGS` in namespace `short`.
    pub fn ip(&self, short: &str, args: &[&str]) -> String {
        let ns = self.ns(short);
        let mut argv = vec!["ip", "-n", ns.as_str()];
        argv.extend_from_slice(args);
        host(&argv)
    }

    fn sysctl(&self, short: &str, setting: &str) {
        self.run(short, &["sysctl", "-qw", setting]);
    }

    /// Runs `argv` in namespace `short` (bounded to 20 s), panicking unless it succeeds.
    pub fn run(&self, short: &str, argv: &[&str]) -> String {
        let out = self.output(short, argv);
        assert!(
            out.status.success(),
            "{argv:?} in {short} failed: {}",
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn output(&self, short: &str, argv: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net={NETNS_DIR}/{}", self.ns(short)))
            .args(["timeout", "20"])
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"))
    }

    /// Writes a key file (mode 0600) in the lab's directory and returns its path.
    pub fn write_key(&self, name: &str, bytes: &[u8]) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.dir.join(name);
        fs::write(&path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod key");
        path
    }

    /// The session config of `fw` with the key file `key`: config/examples/ha-session.toml
    /// as shipped, with fw2's addresses swapped and the lab's key file.
    pub fn session_config(&self, fw: Fw, key: &Path) -> String {
        let example = read_example("ha-session.toml");
        let text = example.replace(
            "key_file = \"/etc/session/sync.key\"",
            &format!("key_file = \"{}\"", key.display()),
        );
        assert_ne!(
            text, example,
            "ha-session.toml names its key file as expected"
        );
        match fw {
            Fw::One => text,
            Fw::Two => text
                .replace("local = \"198.19.0.1:", "local = \"198.19.0.X:")
                .replace("peer = \"198.19.0.2:", "peer = \"198.19.0.1:")
                .replace("local = \"198.19.0.X:", "local = \"198.19.0.2:"),
        }
    }

    /// The pin directory of `fw`'s daemon, for benchmarks that read its maps.
    pub fn pin_dir(&self, fw: Fw) -> PathBuf {
        Path::new("/sys/fs/bpf").join(format!("{}-{}", self.base, self.fw_ns_short(fw)))
    }

    /// Starts the session daemon of `fw` with the lab's key, and waits until it is ready.
    pub fn start_session(&mut self, fw: Fw) {
        let key = self.dir.join("sync.key");
        self.start_session_with_key(fw, &key);
    }

    /// Starts the session daemon of `fw` with the key file `key`.
    pub fn start_session_with_key(&mut self, fw: Fw, key: &Path) {
        let short = self.fw_ns_short(fw);
        let config = self.dir.join(format!("{short}.toml"));
        fs::write(&config, self.session_config(fw, key)).expect("write config");
        let pin = self.pin_dir(fw);
        let bin = self.bin.to_string_lossy().into_owned();
        let log = self.dir.join(format!("{short}-session.log"));
        let proc = Proc::start(
            &self.ns(short),
            &[
                &bin,
                "run",
                "--config",
                &config.to_string_lossy(),
                "--pin-dir",
                &pin.to_string_lossy(),
            ],
            &log,
        );
        proc.wait_log("session: ready", Duration::from_secs(30));
        self.daemons[fw.index()] = Some(proc);
    }

    /// The process id of `fw`'s session daemon.
    pub fn session_pid(&self, fw: Fw) -> u32 {
        self.daemons[fw.index()]
            .as_ref()
            .expect("the daemon runs")
            .pid()
    }

    /// The process id of `fw`'s conntrackd.
    pub fn conntrackd_pid(&self, fw: Fw) -> u32 {
        self.conntrackd[fw.index()]
            .as_ref()
            .expect("conntrackd runs")
            .pid()
    }

    /// Makes `fw` the nftables equivalent of config/examples/ha-session.toml, for the
    /// comparison with conntrackd: the same forwarding policy on conntrack's `ct state`,
    /// with `nf_conntrack_tcp_loose` off.
    pub fn start_nftables(&self, fw: Fw) {
        let short = self.fw_ns_short(fw);
        self.sysctl(short, "net.netfilter.nf_conntrack_tcp_loose=0");
        let path = self.dir.join(format!("{short}-fw.nft"));
        fs::write(
            &path,
            "table inet fw {\n chain forward { type filter hook forward priority 0; policy drop;\n  ct state established,related accept\n  ct state invalid drop\n  iifname \"lan0\" ct state new accept\n }\n}\n",
        )
        .expect("write the nftables ruleset");
        self.run(short, &["nft", "-f", &path.to_string_lossy()]);
    }

    /// Starts Debian's conntrackd in `fw` in FTFW mode over UDP on the sync link, storing
    /// what it receives in the kernel's table at once (`DisableExternalCache`), as session
    /// does.
    pub fn start_conntrackd(&mut self, fw: Fw) {
        let short = self.fw_ns_short(fw);
        let file = |what: &str| {
            self.dir
                .join(format!("{short}-conntrackd.{what}"))
                .to_string_lossy()
                .into_owned()
        };
        let conf = format!(
            "Sync {{\n Mode FTFW {{\n  DisableExternalCache yes\n }}\n UDP {{\n  IPv4_address {local}\n  IPv4_Destination_Address {peer}\n  Port 3780\n  Interface sync0\n  SndSocketBuffer 1249280\n  RcvSocketBuffer 1249280\n  Checksum on\n }}\n}}\nGeneral {{\n HashSize 32768\n HashLimit 262144\n LogFile {log}\n LockFile {lock}\n UNIX {{\n  Path {ctl}\n }}\n NetlinkBufferSize 2097152\n NetlinkBufferSizeMaxGrowth 8388608\n Filter From Userspace {{\n  Protocol Accept {{\n   TCP\n   UDP\n  }}\n  Address Ignore {{\n   IPv4_address 127.0.0.1\n   IPv4_address 198.19.0.0/30\n  }}\n }}\n}}\n",
            local = fw.sync_addr(),
            peer = fw.other().sync_addr(),
            log = file("log"),
            lock = file("lock"),
            ctl = file("ctl"),
        );
        let path = self.dir.join(format!("{short}-conntrackd.conf"));
        fs::write(&path, conf).expect("write conntrackd.conf");
        let out = self.dir.join(format!("{short}-conntrackd.out"));
        let proc = Proc::start(
            &self.ns(short),
            &["conntrackd", "-C", &path.to_string_lossy()],
            &out,
        );
        let ctl = file("ctl");
        wait_for(
            "conntrackd's control socket",
            Duration::from_secs(10),
            || Path::new(&ctl).exists().then_some(()),
        );
        self.conntrackd[fw.index()] = Some(proc);
    }

    /// Connections in `fw`'s kernel conntrack table.
    pub fn conntrack_count(&self, fw: Fw) -> u64 {
        self.run(self.fw_ns_short(fw), &["conntrack", "-C"])
            .trim()
            .parse()
            .expect("conntrack -C prints a number")
    }

    /// The path of a log file [`HaLab::spawn`] wrote.
    pub fn log_path(&self, log: &str) -> PathBuf {
        self.dir.join(log)
    }

    /// Starts `argv` in namespace `short` as a process killed when the guard drops.
    pub fn spawn(&self, short: &str, argv: &[&str], log: &str) -> Proc {
        Proc::start(&self.ns(short), argv, &self.dir.join(log))
    }

    /// The index of `iface` in `fw`'s namespace.
    pub fn ifindex(&self, fw: Fw, iface: &str) -> u32 {
        let out = self.ip(self.fw_ns_short(fw), &["-o", "link", "show", iface]);
        out.split(':')
            .next()
            .and_then(|index| index.trim().parse().ok())
            .unwrap_or_else(|| panic!("no index in {out:?}"))
    }

    /// Stops the session daemon of `fw` with `signal`; its pinned programs stay.
    pub fn stop_session(&mut self, fw: Fw, signal: &str) {
        if let Some(mut proc) = self.daemons[fw.index()].take() {
            proc.stop(signal);
        }
    }

    /// Starts keepalived in `fw`. Where session runs, keepalived tracks its health check
    /// (`session sync check` against `fw`'s pin directory), as the example does; beside
    /// conntrackd it tracks nothing.
    pub fn start_keepalived(&mut self, fw: Fw) {
        let short = self.fw_ns_short(fw);
        let priority = if fw == Fw::One { 200 } else { 100 };
        let conf = self.dir.join(format!("{short}-keepalived.conf"));
        let check = self.daemons[fw.index()].is_some().then(|| {
            format!(
                "{} sync check --pin-dir {}",
                self.bin.display(),
                self.pin_dir(fw).display()
            )
        });
        fs::write(&conf, keepalived_conf(short, priority, check.as_deref()))
            .expect("write keepalived.conf");
        let pid = |what: &str| {
            self.dir
                .join(format!("{short}-{what}.pid"))
                .to_string_lossy()
                .into_owned()
        };
        let log = self.dir.join(format!("{short}-keepalived.log"));
        let proc = Proc::start(
            &self.ns(short),
            &[
                "keepalived",
                "--dont-fork",
                "--log-console",
                "--vrrp",
                "--use-file",
                &conf.to_string_lossy(),
                "--pid",
                &pid("keepalived"),
                "--vrrp_pid",
                &pid("vrrp"),
            ],
            &log,
        );
        self.keepalived[fw.index()] = Some(proc);
    }

    /// Stops keepalived in `fw` with `signal` ("-TERM": it gives the addresses up at once).
    pub fn stop_keepalived(&mut self, fw: Fw, signal: &str) {
        if let Some(mut proc) = self.keepalived[fw.index()].take() {
            proc.stop(signal);
        }
    }

    /// Whether `fw`'s keepalived has ever entered the MASTER state, by its log.
    pub fn ever_master(&self, fw: Fw) -> bool {
        self.keepalived[fw.index()]
            .as_ref()
            .is_some_and(|proc| proc.log().contains("Entering MASTER STATE"))
    }

    /// Whether `fw` holds the LAN's virtual address.
    pub fn holds_vip(&self, fw: Fw) -> bool {
        self.ip(self.fw_ns_short(fw), &["-4", "addr", "show", "dev", "lan0"])
            .contains(&format!("{LAN_VIP}/"))
    }

    /// Waits until `fw` holds both virtual addresses.
    pub fn wait_master(&self, fw: Fw, timeout: Duration) {
        wait_for(
            &format!("{fw:?} to hold the virtual addresses"),
            timeout,
            || {
                let wan = self
                    .ip(self.fw_ns_short(fw), &["-4", "addr", "show", "dev", "wan0"])
                    .contains(&format!("{WAN_VIP}/"));
                (self.holds_vip(fw) && wan).then_some(())
            },
        );
    }

    /// Cuts `fw`'s LAN and WAN links (its bridge ports go down), as a pulled cable would.
    pub fn cut_links(&self, fw: Fw) {
        let short = self.fw_ns_short(fw);
        self.ip("lan", &["link", "set", &format!("p-{short}l"), "down"]);
        self.ip("wan", &["link", "set", &format!("p-{short}w"), "down"]);
    }

    /// Brings `fw`'s LAN and WAN links back after [`HaLab::cut_links`].
    pub fn restore_links(&self, fw: Fw) {
        let short = self.fw_ns_short(fw);
        self.ip("lan", &["link", "set", &format!("p-{short}l"), "up"]);
        self.ip("wan", &["link", "set", &format!("p-{short}w"), "up"]);
    }

    /// Runs `session ARGS --pin-dir` against `fw`'s daemon and returns stdout.
    pub fn cli(&self, fw: Fw, args: &[&str]) -> String {
        let argv = self.cli_argv(fw, args);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.run(self.fw_ns_short(fw), &argv)
    }

    /// Runs `session ARGS --pin-dir` against `fw`'s daemon and returns how it ended,
    /// success or not.
    pub fn cli_status(&self, fw: Fw, args: &[&str]) -> Output {
        let argv = self.cli_argv(fw, args);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.output(self.fw_ns_short(fw), &argv)
    }

    /// `session ARGS --pin-dir PIN` for `fw`.
    fn cli_argv(&self, fw: Fw, args: &[&str]) -> Vec<String> {
        let mut argv = vec![self.bin.to_string_lossy().into_owned()];
        argv.extend(args.iter().map(|arg| arg.to_string()));
        argv.push("--pin-dir".into());
        argv.push(self.pin_dir(fw).to_string_lossy().into_owned());
        argv
    }

    /// `session sync status --json` of `fw`.
    pub fn sync_status(&self, fw: Fw) -> Value {
        let text = self.cli(fw, &["sync", "status", "--json"]);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    /// The TCP and UDP sessions of `fw` as (protocol, src, sport, dst, dport, state),
    /// sorted (VRRP's own sessions are each firewall's).
    pub fn table(&self, fw: Fw) -> Vec<(String, String, u64, String, u64, String)> {
        let text = self.cli(fw, &["list", "--json"]);
        let sessions: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        let mut rows: Vec<_> = sessions
            .as_array()
            .expect("an array")
            .iter()
            .filter(|s| s["proto"] == "tcp" || s["proto"] == "udp")
            .map(|s| {
                (
                    s["proto"].as_str().unwrap_or_default().to_string(),
                    s["src"].as_str().unwrap_or_default().to_string(),
                    s["sport"].as_u64().unwrap_or_default(),
                    s["dst"].as_str().unwrap_or_default().to_string(),
                    s["dport"].as_u64().unwrap_or_default(),
                    s["state"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        rows.sort();
        rows
    }

    /// What the lab's processes logged, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (name, procs) in [("session", &self.daemons), ("keepalived", &self.keepalived)] {
            for (i, proc) in procs.iter().enumerate() {
                if let Some(proc) = proc {
                    out += &format!("--- fw{} {name} ---\n{}\n", i + 1, proc.log());
                }
            }
        }
        out
    }

    /// A TCP listener in the server namespace.
    pub fn server_listen(&self, port: u16) -> TcpListener {
        in_netns(&self.ns("s"), || {
            TcpListener::bind((SERVER, port)).expect("bind the server's listener")
        })
    }

    /// A TCP connection from the client to the server, through the active firewall.
    pub fn client_connect(&self, port: u16) -> TcpStream {
        in_netns(&self.ns("c"), || {
            TcpStream::connect_timeout(
                &format!("{SERVER}:{port}").parse().expect("address"),
                Duration::from_secs(5),
            )
            .expect("connect through the firewall")
        })
    }

    /// A UDP socket bound in namespace `short` ("c" or "s") at `addr:port`.
    pub fn udp(&self, short: &str, addr: &str, port: u16) -> UdpSocket {
        let addr = format!("{addr}:{port}");
        in_netns(&self.ns(short), move || {
            UdpSocket::bind(&addr).expect("bind UDP")
        })
    }

    /// Adds an nftables rule in `fw` that drops one in `one_in` of the sync link's
    /// datagrams (both ways; 1 drops them all); [`HaLab::clear_sync_loss`] removes it.
    pub fn lossy_sync(&self, fw: Fw, one_in: u32) {
        let short = self.fw_ns_short(fw);
        let script = format!(
            "table inet synclossy {{\n chain in {{ type filter hook input priority 0; udp dport {SYNC_PORT} numgen random mod {one_in} 0 counter drop; }}\n chain out {{ type filter hook output priority 0; udp dport {SYNC_PORT} numgen random mod {one_in} 0 counter drop; }}\n}}\n"
        );
        let path = self.dir.join(format!("{short}-loss.nft"));
        fs::write(&path, script).expect("write nft script");
        self.run(short, &["nft", "-f", &path.to_string_lossy()]);
    }

    /// Removes the loss rule of [`HaLab::lossy_sync`]; returns the datagrams it dropped.
    pub fn clear_sync_loss(&self, fw: Fw) -> u64 {
        let short = self.fw_ns_short(fw);
        let listing = self.run(short, &["nft", "list", "table", "inet", "synclossy"]);
        self.run(short, &["nft", "delete", "table", "inet", "synclossy"]);
        listing
            .split("packets ")
            .skip(1)
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for HaLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for proc in self
            .keepalived
            .iter_mut()
            .chain(self.daemons.iter_mut())
            .chain(self.conntrackd.iter_mut())
        {
            drop(proc.take());
        }
        for fw in [Fw::One, Fw::Two] {
            let pin = self.pin_dir(fw);
            if pin.exists() {
                let _ = Command::new(&self.bin)
                    .args(["down", "--pin-dir", &pin.to_string_lossy()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                let _ = fs::remove_dir_all(&pin);
            }
        }
        for ns in ["c", "s", "lan", "wan", "fw1", "fw2"] {
            delete_netns(&self.ns(ns));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The text of config/examples/`name`.
fn read_example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../config/examples")
        .join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// keepalived's config for one firewall: config/examples/ha-keepalived.conf as shipped
/// (fw1's), with fw2's router id and priority for fw2, and the health check run as
/// `check` (the lab's binary and pin directory), or tracked not at all without one.
pub fn keepalived_conf(router: &str, priority: u32, check: Option<&str>) -> String {
    const SHIPPED_CHECK: &str = "\"/usr/local/bin/session sync check\"";
    const TRACKED: &str = "    track_script {\n        session_ready\n    }\n";
    let example = read_example("ha-keepalived.conf");
    assert!(
        example.contains("router_id fw1")
            && example.contains("priority 200")
            && example.contains(SHIPPED_CHECK)
            && example.contains(TRACKED),
        "ha-keepalived.conf is fw1's and tracks `session sync check`"
    );
    let conf = example
        .replace("router_id fw1", &format!("router_id {router}"))
        .replace("priority 200", &format!("priority {priority}"));
    match check {
        Some(check) => conf.replace(SHIPPED_CHECK, &format!("\"{check}\"")),
        None => conf.replace(TRACKED, ""),
    }
}

/// A UDP echo server on the server's `port` until dropped: the traffic the HA tests and
/// the sync benchmark replicate.
pub struct Echo {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    /// Starts answering every datagram to `SERVER`:`port` with itself, for at most two
    /// minutes.
    pub fn start(lab: &HaLab, port: u16) -> Echo {
        let socket = lab.udp("s", SERVER, port);
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 64];
            let deadline = Instant::now() + Duration::from_secs(120);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok((len, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..len], from);
                }
            }
        });
        Echo {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
