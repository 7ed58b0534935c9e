//! Issue 22: what a host needs from its network still reaches it under the shipped
//! default policy: DHCP leases (v4 and v6) and the answers to its own multicast queries.
//!
//! fw is the host being configured: its interface starts without a global address, the
//! firewall already runs on it (as at boot), and real Debian DHCP software talks to a
//! server in the client namespace: busybox `udhcpc` against busybox `udhcpd` for DHCPv4,
//! ISC `dhclient -6` against `dnsmasq` for DHCPv6. Every exchange runs twice, once under
//! session with config/default.toml and once under nftables + conntrack with the
//! equivalent input policy (`ct state established,related accept; ct state invalid drop;
//! ct state untracked accept; policy drop`): what the client gets under nftables it must
//! get under session. Where session gets more (DHCPv6 and mDNS answers are NEW to
//! conntrack, which has no helper for them), the test asserts the difference and names it.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use session_testkit::frames;
use session_tests::{Daemon, FW_IFACE, Lab, Side, counter, delta};

/// The server's address (the lab's client side).
const SERVER_V4: &str = "198.18.0.1";
/// The pool udhcpd hands out.
const POOL_START: &str = "198.18.0.100";
const POOL_END: &str = "198.18.0.110";
/// How long a client may take to get a lease: a few DISCOVERs one second apart.
const LEASE_TIMEOUT: Duration = Duration::from_secs(20);

/// The firewall fw runs during an exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Firewall {
    /// session with config/default.toml.
    Session,
    /// nftables + conntrack with the equivalent input policy.
    Nftables,
}

/// The nftables reference: the input side of the default policy.
const NFT_POLICY: &str = "table inet dhcpref {
  chain input {
    type filter hook input priority 0; policy drop;
    ct state established,related accept
    ct state invalid drop
    ct state untracked accept
  }
}
";

/// The shipped default configuration, as a host would run it.
fn default_config() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/default.toml");
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Panics with what to install unless the DHCP software is on PATH.
fn require_tools() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in ["busybox", "dnsmasq", "dhclient"] {
        assert!(
            std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()),
            "`{tool}` is not on PATH: run `cargo xtask setup` (it installs busybox, \
             dnsmasq-base and isc-dhcp-client)"
        );
    }
}

/// A scratch directory for config, lease and log files, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("sess-dhcp-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.path(name);
        fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path.to_string_lossy().into_owned()
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.path(name)).unwrap_or_default()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Starts the firewall `which` in fw; the daemon when it is session.
fn start_firewall(lab: &Lab, which: Firewall) -> Option<Daemon<'_>> {
    match which {
        Firewall::Session => Some(lab.daemon(&default_config())),
        Firewall::Nftables => {
            let out = lab.run_with_input(Side::Fw, 10, &["nft", "-f", "-"], NFT_POLICY.as_bytes());
            assert!(
                out.status.success(),
                "cannot install the nftables reference: {}",
                session_tests::describe(&out)
            );
            None
        }
    }
}

/// Polls `probe` every 100 ms until it holds or `timeout` passes; whether it held.
fn within(timeout: Duration, mut probe: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if probe() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The lines the udhcpc script logged: `<event> <ip>` for each call.
fn script_events(scratch: &Scratch) -> Vec<String> {
    scratch
        .read("udhcpc.events")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Sends `signal` to the process whose pid is in `pidfile` (one this test started).
fn signal(lab: &Lab, scratch: &Scratch, pidfile: &str, signal: &str) {
    let pid = scratch.read(pidfile);
    let pid = pid.trim();
    assert!(!pid.is_empty(), "no pid in {pidfile}");
    lab.ok(Side::Fw, 5, &["kill", signal, pid]);
}

/// What a DHCPv4 client obtained in one run.
#[derive(Debug, PartialEq, Eq)]
struct V4Result {
    /// A lease, obtained with the firewall already running.
    lease: bool,
    /// A renewal (unicast REQUEST) answered.
    renewal: bool,
    /// A rebinding (broadcast REQUEST after the unicast ones went unanswered) answered.
    rebinding: bool,
}

/// udhcpd in the client namespace, udhcpc in fw behind `which`: lease, renewal,
/// rebinding.
fn dhcp4_exchange(which: Firewall) -> (V4Result, Option<serde_json::Value>) {
    require_tools();
    let tag = match which {
        Firewall::Session => "d4s",
        Firewall::Nftables => "d4n",
    };
    let lab = Lab::new(tag);
    let scratch = Scratch::new(tag);
    // fw starts unconfigured, as a DHCP host at boot.
    lab.ok(Side::Fw, 5, &["ip", "addr", "flush", "dev", FW_IFACE]);
    let conf = scratch.write(
        "udhcpd.conf",
        &format!(
            "start {POOL_START}\nend {POOL_END}\ninterface {}\nlease_file {}\npidfile {}\n\
             option subnet 255.255.255.0\noption lease 600\n",
            Lab::iface(Side::Client),
            scratch.path("udhcpd.leases").display(),
            scratch.path("udhcpd.pid").display(),
        ),
    );
    fs::write(scratch.path("udhcpd.leases"), b"").expect("lease file");
    let events = scratch.path("udhcpc.events");
    let script = scratch.write(
        "udhcpc.script",
        &format!(
            "#!/bin/sh\necho \"$1 $ip\" >> {}\ncase \"$1\" in\n\
             bound|renew) ip addr replace \"$ip/${{mask:-24}}\" dev \"$interface\" ;;\n\
             deconfig) ip addr flush dev \"$interface\" ;;\nesac\nexit 0\n",
            events.display()
        ),
    );
    lab.ok(Side::Fw, 5, &["chmod", "755", &script]);
    let daemon = start_firewall(&lab, which);
    let _server = lab.spawn(Side::Client, &["busybox", "udhcpd", "-f", &conf]);
    let pidfile = scratch.path("udhcpc.pid");
    let _client = lab.spawn(
        Side::Fw,
        &[
            "busybox",
            "udhcpc",
            "-f",
            "-i",
            FW_IFACE,
            "-s",
            &script,
            "-p",
            &pidfile.to_string_lossy(),
            "-t",
            "8",
            "-T",
            "1",
            "-A",
            "1",
        ],
    );
    let lease = within(LEASE_TIMEOUT, || {
        script_events(&scratch)
            .iter()
            .any(|line| line.starts_with("bound 198.18.0.1"))
    });
    let mut result = V4Result {
        lease,
        renewal: false,
        rebinding: false,
    };
    if lease {
        let renewals = |scratch: &Scratch| {
            script_events(scratch)
                .iter()
                .filter(|line| line.starts_with("renew 198.18.0.1"))
                .count()
        };
        // Renewal: SIGUSR1 makes udhcpc send a unicast REQUEST to the server.
        signal(&lab, &scratch, "udhcpc.pid", "-USR1");
        result.renewal = within(Duration::from_secs(10), || renewals(&scratch) >= 1);
        // Rebinding: the server no longer hears unicast, so the client's unicast
        // REQUESTs go unanswered and it falls back to broadcasting.
        let block = format!(
            "table inet noren {{\n  chain input {{\n    type filter hook input priority 0;\n    \
             ip daddr {SERVER_V4} udp dport 67 drop\n  }}\n}}\n"
        );
        let out = lab.run_with_input(Side::Client, 10, &["nft", "-f", "-"], block.as_bytes());
        assert!(out.status.success(), "{}", session_tests::describe(&out));
        signal(&lab, &scratch, "udhcpc.pid", "-USR1");
        result.rebinding = within(Duration::from_secs(30), || renewals(&scratch) >= 2);
    }
    let stats = daemon.as_ref().map(Daemon::stats_json);
    println!(
        "{which:?}: {result:?}; udhcpc events: {:?}; stats: {stats:?}",
        script_events(&scratch)
    );
    (result, stats)
}

#[test]
fn dhcp4_lease_renewal_and_rebinding_work_under_session_as_under_nftables() {
    let (reference, _) = dhcp4_exchange(Firewall::Nftables);
    let (ours, stats) = dhcp4_exchange(Firewall::Session);
    assert_eq!(
        reference,
        V4Result {
            lease: true,
            renewal: true,
            rebinding: true
        },
        "the nftables reference run itself failed: the lab, not session, is broken"
    );
    assert_eq!(ours, reference, "session differs from nftables");
    let stats = stats.expect("session ran");
    // DISCOVER, REQUEST and the rebinding's broadcast REQUEST set up expectations; the
    // OFFER, the ACK and the rebinding's ACK answered them (the renewal's ACK answers the
    // unicast REQUEST's session: ESTABLISHED).
    assert!(
        counter(&stats, "expectations_created") >= 3,
        "DISCOVER, REQUEST and the rebinding REQUEST set up expectations: {stats}"
    );
    assert!(
        counter(&stats, "expectation_hits") >= 3,
        "OFFER, ACK and the rebinding ACK answered them: {stats}"
    );
}

/// A BOOTP message of `op` (1 request, 2 reply) with transaction id `xid`.
fn bootp(op: u8, xid: u32) -> Vec<u8> {
    let mut message = vec![0u8; 300];
    message[..4].copy_from_slice(&[op, 1, 6, 0]);
    message[4..8].copy_from_slice(&xid.to_be_bytes());
    message[16..20].copy_from_slice(&[198, 18, 0, 105]);
    message[236..240].copy_from_slice(&[99, 130, 83, 99]);
    message[240..243].copy_from_slice(&[53, 1, 2]);
    message[243] = 255;
    message
}

#[test]
fn an_unsolicited_offer_and_a_reply_to_a_port_nobody_asked_from_are_dropped() {
    let lab = Lab::new("d4u");
    let daemon = lab.daemon(&default_config());
    // A listener on fw's port 68 would see an OFFER that got through.
    let listener = lab.in_ns(Side::Fw, || {
        let socket = UdpSocket::bind("0.0.0.0:68").expect("bind 68");
        socket.set_broadcast(true).expect("broadcast");
        socket
            .set_read_timeout(Some(Duration::from_millis(800)))
            .expect("timeout");
        socket
    });
    let inject = lab.packet_socket(Side::Client);
    let before = daemon.stats_json();
    let offer = frames::ethernet_between(
        lab.mac(Side::Client),
        [0xff; 6],
        &frames::packet(
            SERVER_V4.parse().expect("address"),
            "255.255.255.255".parse().expect("address"),
            frames::udp_carrying(67, 68, &bootp(2, 0x5eed_0001)),
        ),
    );
    inject.send(&offer);
    let mut buf = [0u8; 1500];
    assert!(
        listener.recv_from(&mut buf).is_err(),
        "an OFFER no DISCOVER asked for reached fw"
    );
    let after = daemon.stats_json();
    assert_eq!(delta(&before, &after, "drop_default"), 1, "{after}");
    assert_eq!(delta(&before, &after, "expectation_hits"), 0, "{after}");

    // A query fw sends to a group from port 5353 expects answers to 5353 only.
    lab.ok(
        Side::Fw,
        5,
        &["ip", "route", "add", "224.0.0.0/4", "dev", FW_IFACE],
    );
    let query = lab.in_ns(Side::Fw, || {
        UdpSocket::bind("0.0.0.0:5353").expect("bind 5353")
    });
    let other = lab.in_ns(Side::Fw, || {
        let socket = UdpSocket::bind("0.0.0.0:5354").expect("bind 5354");
        socket
            .set_read_timeout(Some(Duration::from_millis(800)))
            .expect("timeout");
        socket
    });
    query
        .send_to(&mdns_query(), "224.0.0.251:5353")
        .expect("send the query");
    let before = daemon.stats_json();
    let sender = lab.udp_socket(Side::Client, session_tests::Family::V4, 5353);
    sender
        .send_to(b"not asked for", "198.18.0.2:5354")
        .expect("send");
    assert!(
        other.recv_from(&mut buf).is_err(),
        "a datagram to a port nobody asked from reached fw"
    );
    let after = daemon.stats_json();
    assert_eq!(delta(&before, &after, "drop_default"), 1, "{after}");
}

/// A minimal mDNS query for `_session._udp.local` PTR.
fn mdns_query() -> Vec<u8> {
    let mut q = vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["_session", "_udp", "local"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 12, 0, 1]);
    q
}

/// How many answers fw's mDNS query gets (a responder in the client namespace answers
/// twice: once to the group, once unicast), behind `which`.
fn mdns_answers(which: Firewall) -> usize {
    let tag = match which {
        Firewall::Session => "dms",
        Firewall::Nftables => "dmn",
    };
    let lab = Lab::new(tag);
    let _daemon = start_firewall(&lab, which);
    for side in [Side::Client, Side::Fw] {
        lab.ok(
            side,
            5,
            &["ip", "route", "add", "224.0.0.0/4", "dev", Lab::iface(side)],
        );
    }
    let group: Ipv4Addr = "224.0.0.251".parse().expect("address");
    let fw_addr: Ipv4Addr = "198.18.0.2".parse().expect("address");
    let responder = lab.in_ns(Side::Client, || {
        let socket = UdpSocket::bind("0.0.0.0:5353").expect("bind 5353");
        socket
            .join_multicast_v4(&group, &SERVER_V4.parse().expect("address"))
            .expect("join");
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        socket
    });
    let asker = lab.in_ns(Side::Fw, || {
        let socket = UdpSocket::bind("0.0.0.0:5353").expect("bind 5353");
        socket.join_multicast_v4(&group, &fw_addr).expect("join");
        socket.set_multicast_loop_v4(false).expect("no loop");
        socket
            .set_read_timeout(Some(Duration::from_millis(800)))
            .expect("timeout");
        socket
    });
    asker
        .send_to(&mdns_query(), "224.0.0.251:5353")
        .expect("send the query");
    let mut buf = [0u8; 1500];
    let (len, from) = responder
        .recv_from(&mut buf)
        .expect("the responder never heard the query");
    assert_eq!(&buf[..len], &mdns_query()[..], "not our query");
    let mut answer = mdns_query();
    answer[2] = 0x84; // response, authoritative
    responder
        .send_to(&answer, "224.0.0.251:5353")
        .expect("multicast answer");
    responder.send_to(&answer, from).expect("unicast answer");
    let mut answers = 0;
    while let Ok((len, from)) = asker.recv_from(&mut buf) {
        if buf[..len] == answer[..] && from == SocketAddr::from(([198, 18, 0, 1], 5353)) {
            answers += 1;
        }
    }
    println!("{which:?}: {answers} mDNS answers");
    answers
}

#[test]
fn an_mdns_query_from_the_host_gets_its_answers() {
    let reference = mdns_answers(Firewall::Nftables);
    let ours = mdns_answers(Firewall::Session);
    // Conntrack has no helper for mDNS: an answer from a responder is NEW and the
    // reference policy drops it. session expects it.
    assert_eq!(reference, 0, "nftables let an mDNS answer in");
    assert_eq!(ours, 2, "session dropped an mDNS answer");
}

/// Whether `dhclient -6` in fw gets a lease from dnsmasq in the client namespace, behind
/// `which`.
fn dhcp6_lease(which: Firewall) -> bool {
    require_tools();
    let tag = match which {
        Firewall::Session => "d6s",
        Firewall::Nftables => "d6n",
    };
    let lab = Lab::dual_stack(tag);
    let scratch = Scratch::new(tag);
    let daemon = start_firewall(&lab, which);
    let leases = scratch.path("dnsmasq.leases");
    let _server = lab.spawn(
        Side::Client,
        &[
            "dnsmasq",
            "--no-daemon",
            "--conf-file=/dev/null",
            "--port=0",
            "--user=root",
            "--bind-interfaces",
            &format!("--interface={}", Lab::iface(Side::Client)),
            "--dhcp-range=2001:2::100,2001:2::1ff,64,600",
            &format!("--dhcp-leasefile={}", leases.display()),
            &format!("--pid-file={}", scratch.path("dnsmasq.pid").display()),
        ],
    );
    let lease_file = scratch.path("dhclient6.leases");
    let _client = lab.spawn(
        Side::Fw,
        &[
            "dhclient",
            "-6",
            "-d",
            "-v",
            "-sf",
            "/bin/true",
            "-lf",
            &lease_file.to_string_lossy(),
            "-pf",
            &scratch.path("dhclient6.pid").to_string_lossy(),
            FW_IFACE,
        ],
    );
    let leased = within(LEASE_TIMEOUT, || {
        scratch.read("dhclient6.leases").contains("iaaddr 2001:2::")
    });
    let stats = daemon.as_ref().map(Daemon::stats_json);
    println!(
        "{which:?}: DHCPv6 lease {leased}; lease file: {:?}; stats: {stats:?}",
        scratch.read("dhclient6.leases")
    );
    if let Some(stats) = stats.filter(|_| leased) {
        assert!(
            counter(&stats, "expectation_hits") >= 2,
            "ADVERTISE and REPLY answered SOLICIT and REQUEST: {stats}"
        );
    }
    leased
}

#[test]
fn dhcp6_lease_works_under_session() {
    let reference = dhcp6_lease(Firewall::Nftables);
    let ours = dhcp6_lease(Firewall::Session);
    // dhclient -6 receives on a UDP socket, after netfilter: the ADVERTISE (from the
    // server's link-local address to the client's) matches no conntrack entry of the
    // SOLICIT (to ff02::1:2), so the reference policy drops it and no lease comes.
    assert!(!reference, "nftables let a DHCPv6 ADVERTISE in");
    assert!(ours, "session kept the host from a DHCPv6 lease");
}
