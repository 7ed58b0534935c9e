//! A third namespace, `upstream`, behind fw, so that fw routes between two networks and
//! the daemon sees forwarded traffic.
//!
//! ```text
//! client (LAN)                  fw (router)                        upstream (WAN)
//! 198.18.0.1/24   veth-client ── veth-fw  198.18.0.2/24
//! 2001:2::1/64                             2001:2::2/64
//!                                 wan0    198.19.0.2/24  ── veth-up   198.19.0.1/24
//!                                         2001:2:0:1::2/64            2001:2:0:1::1/64
//! ```
//!
//! fw forwards IPv4 and IPv6; the client routes 198.19.0.0/24 and 2001:2:0:1::/64 through
//! fw, and upstream routes 198.18.0.0/24 and 2001:2::/64 back through it. fw's WAN end is
//! called `wan0`, the name a real router's config would use. The namespace is deleted when
//! the [`Upstream`] guard drops, before the lab's own namespaces.

use std::io;
use std::marker::PhantomData;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::{
    CLIENT_IFACE, FW_IFACE, IO_TIMEOUT, Lab, NETNS_DIR, Side, connect_from, delete_netns, describe,
    host, host_end, in_netns, wait_until_up,
};

/// Name of fw's interface towards upstream.
pub const WAN_IFACE: &str = "wan0";
/// Name of upstream's end of the WAN link.
pub const UPSTREAM_IFACE: &str = "veth-up";
/// IPv4 address of the upstream namespace.
pub const UPSTREAM_V4: &str = "198.19.0.1";
/// IPv4 address of fw on the WAN link.
pub const FW_WAN_V4: &str = "198.19.0.2";
/// IPv6 address of the upstream namespace.
pub const UPSTREAM_V6: &str = "2001:2:0:1::1";
/// IPv6 address of fw on the WAN link.
pub const FW_WAN_V6: &str = "2001:2:0:1::2";

/// The upstream namespace of a routed lab; deleting it on drop also removes the WAN link.
/// It borrows the lab so that it is dropped, and its namespace deleted, before the lab's.
pub struct Upstream<'lab> {
    _lab: PhantomData<&'lab Lab>,
    ns: String,
}

impl Lab {
    /// Turns fw into a router between the client (LAN) and a new upstream namespace (WAN),
    /// as drawn in the [module documentation](self). Needs a [`Lab::dual_stack`] lab,
    /// since the WAN link carries IPv6 too. Call it before [`Lab::daemon`], so that `wan0`
    /// exists when the daemon attaches.
    pub fn upstream(&self) -> Upstream<'_> {
        let upstream = Upstream {
            _lab: PhantomData,
            ns: format!("{}-u", self.base),
        };
        host(&["ip", "netns", "add", &upstream.ns]);
        // The same sysctls a dual-stack lab sets.
        for key in std::iter::once(crate::ICMP_RATELIMIT_OFF).chain(crate::DUAL_STACK_SYSCTLS) {
            upstream.ok(5, &["sysctl", "-qw", key]);
        }
        upstream.ok(5, &["ip", "link", "set", "lo", "up"]);
        host(&[
            "ip",
            "-n",
            &upstream.ns,
            "link",
            "add",
            UPSTREAM_IFACE,
            "type",
            "veth",
            "peer",
            "name",
            WAN_IFACE,
            "netns",
            &self.fw_ns,
        ]);
        let v4 = format!("{UPSTREAM_V4}/24");
        let v6 = format!("{UPSTREAM_V6}/64");
        upstream.ok(5, &["ip", "addr", "add", &v4, "dev", UPSTREAM_IFACE]);
        upstream.ok(
            5,
            &[
                "ip",
                "-6",
                "addr",
                "add",
                &v6,
                "dev",
                UPSTREAM_IFACE,
                "nodad",
            ],
        );
        upstream.ok(5, &["ip", "link", "set", UPSTREAM_IFACE, "up"]);
        upstream.ok(
            5,
            &["ip", "route", "add", "198.18.0.0/24", "via", FW_WAN_V4],
        );
        upstream.ok(
            5,
            &["ip", "-6", "route", "add", "2001:2::/64", "via", FW_WAN_V6],
        );

        let v4 = format!("{FW_WAN_V4}/24");
        let v6 = format!("{FW_WAN_V6}/64");
        self.ok(Side::Fw, 5, &["ip", "addr", "add", &v4, "dev", WAN_IFACE]);
        self.ok(
            Side::Fw,
            5,
            &["ip", "-6", "addr", "add", &v6, "dev", WAN_IFACE, "nodad"],
        );
        self.ok(Side::Fw, 5, &["ip", "link", "set", WAN_IFACE, "up"]);
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            self.ok(Side::Fw, 5, &["sysctl", "-qw", key]);
        }
        self.ok(
            Side::Client,
            5,
            &["ip", "route", "add", "198.19.0.0/24", "via", "198.18.0.2"],
        );
        self.ok(
            Side::Client,
            5,
            &[
                "ip",
                "-6",
                "route",
                "add",
                "2001:2:0:1::/64",
                "via",
                "2001:2::2",
            ],
        );
        wait_until_up(&upstream.ns, UPSTREAM_IFACE);
        wait_until_up(&self.fw_ns, WAN_IFACE);
        upstream
    }
}

/// A dual-stack lab for routing through fw whose client end acts as a host behind a wire
/// ([`host_end`]), so that fw's XDP program can redirect frames to it.
pub fn routed_lab(tag: &str) -> Lab {
    let lab = Lab::dual_stack(tag);
    lab.ok(Side::Client, 5, &host_end(CLIENT_IFACE));
    lab
}

/// The upstream namespace of a [`routed_lab`], its end set up like the client's.
pub fn upstream_host(lab: &Lab) -> Upstream<'_> {
    let upstream = lab.upstream();
    upstream.ok(5, &host_end(UPSTREAM_IFACE));
    upstream
}

/// A router's policy for fw: replies and established flows accepted, invalid packets
/// dropped, neighbour discovery (untracked) accepted, then `new_flows`, the rules that say
/// which new flows may cross; everything else inbound dropped. `fast_path` is the
/// `[forwarding]` switch. fw's veth comes from the lab's `--iface`, `wan0` from
/// `interfaces`.
pub fn router_policy(fast_path: bool, new_flows: &str) -> String {
    format!(
        concat!(
            r#"
interfaces = ["{WAN_IFACE}"]

[forwarding]
fast_path = {fast_path}
"#,
            session_testkit::inbound_drop_policy!(),
            session_testkit::return_traffic_rule!("established"),
            session_testkit::invalid_drop_rule!(),
            session_testkit::untracked_accept_rule!("untracked"),
            "{new_flows}",
        ),
        WAN_IFACE = WAN_IFACE,
        fast_path = fast_path,
        new_flows = new_flows,
    )
}

/// A rule named "lan-out" letting the LAN (fw's [`FW_IFACE`] side) open
/// new flows of `proto` ("udp", "tcp"...), or of any protocol when `None`: the
/// `new_flows` of a router whose LAN may reach out.
pub fn lan_out_rule(proto: Option<&str>) -> String {
    let proto = proto.map_or(String::new(), |proto| format!("proto = \"{proto}\"\n"));
    format!(
        r#"
[[rule]]
name = "lan-out"
state = ["new"]
iface = ["{FW_IFACE}"]
{proto}action = "accept"
"#
    )
}

impl Upstream<'_> {
    /// The namespace's name, for messages.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Runs `argv` in upstream with no input, bounded by `secs`, and returns its output
    /// whatever the exit status.
    pub fn run(&self, secs: u64, argv: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net={NETNS_DIR}/{}", self.ns))
            .args(["timeout", "-k", "1", &secs.to_string()])
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {argv:?} in {}: {e}", self.ns))
    }

    /// Runs `argv` in upstream, panics unless it succeeds, and returns its stdout.
    pub fn ok(&self, secs: u64, argv: &[&str]) -> String {
        let out = self.run(secs, argv);
        assert!(
            out.status.success(),
            "{argv:?} in {} failed: {}",
            self.ns,
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread inside upstream's namespace, as [`Lab::in_ns`] does for the
    /// lab's own sides.
    pub fn in_ns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.ns, f)
    }

    /// A TCP listener in upstream on `addr`.
    pub fn tcp_listen(&self, addr: SocketAddr) -> TcpListener {
        self.in_ns(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("cannot listen on {addr} in {}: {e}", self.ns))
    }

    /// Connects from upstream to `to` (from the local address `from` when given), giving
    /// up after `timeout`; the stream gets [`IO_TIMEOUT`] read and write timeouts.
    pub fn tcp_connect(
        &self,
        from: Option<SocketAddr>,
        to: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        let stream = self.in_ns(|| match from {
            Some(from) => connect_from(from, to, timeout),
            None => TcpStream::connect_timeout(&to, timeout),
        })?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(stream)
    }

    /// Pings `dst` from upstream `count` times (0.2 s apart, 1 s deadline per reply) and
    /// returns how many replies came back.
    pub fn ping(&self, dst: &str, count: u32) -> u64 {
        let count = count.to_string();
        let out = self.run(
            10,
            &["ping", "-n", "-c", &count, "-i", "0.2", "-W", "1", dst],
        );
        ping_replies(&out)
    }
}

impl Drop for Upstream<'_> {
    fn drop(&mut self) {
        delete_netns(&self.ns);
    }
}

/// The number of replies in ping's summary line ("3 packets transmitted, 3 received").
pub fn ping_replies(out: &Output) -> u64 {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|line| {
            let (_, rest) = line.split_once(" packets transmitted, ")?;
            rest.split_once(" received")?.0.parse().ok()
        })
        .unwrap_or_else(|| panic!("no ping summary in: {}", describe(out)))
}
