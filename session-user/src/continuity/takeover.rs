//! Takeover at first start: seeding a new session table, before the programs attach,
//! with the connections the host already has, so that switching to session (from
//! nothing, nftables or iptables) cuts none the policy would admit.
//!
//! Conntrack comes first: it knows forwarded connections too, and their protocol state.
//! Then the host's own sockets, for what conntrack did not give (it is not loaded, or was
//! not tracking); a key both give keeps conntrack's entry. Each connection is placed as
//! its first packet would have been seen: the routes tell whether the host opened it
//! (egress, out of the interface towards the peer) or received or forwards it (ingress,
//! on the interface towards the originator). Connections on interfaces the firewall does
//! not protect (loopback, others) are not its business and are left out; each of the
//! others is judged by the policy in force as a reload judges the sessions it finds.

use std::{cell::RefCell, collections::HashMap};

use anyhow::Result;
use log::{info, warn};
use session_common::{
    record::SessionRecord,
    wire::{DaemonCounter, FAMILY_IPV4, Settings, Timeout, proto, session_flags},
};

use crate::{
    bpf::{clock::monotonic_ns, pinned::PinnedMaps},
    continuity::{
        conntrack,
        import::{ImportReport, import},
        netlink::{self, NLM_F_REQUEST, Socket, attr},
        sock_diag,
    },
};

/// `RTM_GETROUTE` / `RTM_NEWROUTE` (`rtnetlink.h`).
const RTM_GETROUTE: u16 = 26;
const RTM_NEWROUTE: u16 = 24;
/// `RTA_DST` and `RTA_OIF` (`rtnetlink.h`).
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
/// `RTN_LOCAL`: the address is the host's own.
const RTN_LOCAL: u8 = 2;

/// An address and its family, as routes are looked up.
type RouteKey = (u8, [u8; 16]);

/// Where the kernel would send a packet to an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The address is one of the host's own.
    pub local: bool,
    /// The interface the packet would leave through.
    pub oif: u32,
}

/// Asks the kernel's routing table where `addr` (IPv4-mapped for IPv4) is.
/// Answers are cached per address: many connections share a peer.
pub struct Router {
    socket: Socket,
    cache: RefCell<HashMap<RouteKey, Option<Route>>>,
}

impl Router {
    /// A route-lookup socket.
    pub fn open() -> Result<Router> {
        Ok(Router {
            socket: Socket::open(None)?,
            cache: RefCell::new(HashMap::new()),
        })
    }

    /// The route to `addr`; `None` when there is none.
    pub fn route(&self, family: u8, addr: &[u8; 16]) -> Option<Route> {
        if let Some(known) = self.cache.borrow().get(&(family, *addr)) {
            return *known;
        }
        let route = self.lookup(family, addr);
        self.cache.borrow_mut().insert((family, *addr), route);
        route
    }

    fn lookup(&self, family: u8, addr: &[u8; 16]) -> Option<Route> {
        let (af, bytes, bits): (u8, &[u8], u8) = if family == FAMILY_IPV4 {
            (libc::AF_INET as u8, &addr[12..], 32)
        } else {
            (libc::AF_INET6 as u8, &addr[..], 128)
        };
        let mut payload = vec![af, bits, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        netlink::put_attr(&mut payload, RTA_DST, bytes);
        let request = netlink::request(RTM_GETROUTE, NLM_F_REQUEST, 1, &payload);
        let (kind, reply) = self.socket.ask(&request).ok()?;
        if kind != RTM_NEWROUTE || reply.len() < 12 {
            return None;
        }
        let oif = attr(&reply[12..], RTA_OIF)
            .and_then(|v| v.get(..4))
            .map(|v| u32::from_ne_bytes(v.try_into().expect("4 bytes")))
            .unwrap_or(0);
        Some(Route {
            local: reply[7] == RTN_LOCAL,
            oif,
        })
    }
}

/// How a connection's first packet crossed the firewall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The host sent it (TC egress).
    pub egress: bool,
    /// The protected interface it crossed.
    pub ifindex: u32,
}

/// Places a connection from `src` (its originator) to `dst` by the routes: `None` when
/// it crosses no protected interface.
pub fn place(
    router: &Router,
    family: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
    protected: &[u32],
) -> Option<Placement> {
    let from = router.route(family, src)?;
    let placement = if from.local {
        let to = router.route(family, dst)?;
        if to.local {
            return None;
        }
        Placement {
            egress: true,
            ifindex: to.oif,
        }
    } else {
        Placement {
            egress: false,
            ifindex: from.oif,
        }
    };
    protected.contains(&placement.ifindex).then_some(placement)
}

/// What the takeover found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TakeoverReport {
    /// Import of the conntrack entries.
    pub conntrack: ImportReport,
    /// Import of the sockets.
    pub sockets: ImportReport,
    /// Entries session cannot continue (NAT, a state it cannot resume).
    pub unusable: u64,
    /// Connections on no protected interface, left out.
    pub elsewhere: u64,
    /// Whether the kernel's conntrack answered at all.
    pub conntrack_present: bool,
}

impl TakeoverReport {
    /// Connections found that are not taken over because the policy, or session's own
    /// abilities, do not allow it.
    pub fn refused(&self) -> u64 {
        self.conntrack.refused + self.sockets.refused + self.unusable
    }
}

/// The originator and responder addresses of a record.
fn endpoints(record: &SessionRecord) -> ([u8; 16], [u8; 16]) {
    if record.flags & session_flags::ORIG_IS_LO != 0 {
        (record.key.addr_lo, record.key.addr_hi)
    } else {
        (record.key.addr_hi, record.key.addr_lo)
    }
}

/// Places `record`, marking it as seen at egress when the host opened it.
fn placed(
    router: &Router,
    mut record: SessionRecord,
    protected: &[u32],
    elsewhere: &mut u64,
) -> Option<(SessionRecord, u32)> {
    let (src, dst) = endpoints(&record);
    let Some(placement) = place(router, record.key.family, &src, &dst, protected) else {
        *elsewhere += 1;
        return None;
    };
    if placement.egress {
        record.flags |= session_flags::ORIGIN_EGRESS;
    }
    Some((record, placement.ifindex))
}

/// Seeds the (new) table from conntrack, then sockets; logs and counts what it did.
pub fn take_over(
    maps: &PinnedMaps,
    settings: &Settings,
    protected: &[u32],
) -> Result<TakeoverReport> {
    let rules = maps.active_rules()?;
    let router = Router::open()?;
    let mut report = TakeoverReport::default();

    let entries = match conntrack::dump() {
        Ok(entries) => entries,
        Err(error) => {
            warn!(
                "takeover: cannot read the kernel's conntrack table, using sockets only: {error:#}"
            );
            None
        }
    };
    report.conntrack_present = entries.is_some();
    let mut candidates = Vec::new();
    for entry in entries.unwrap_or_default() {
        match conntrack::to_record(&entry) {
            Ok(record) => {
                candidates.extend(placed(&router, record, protected, &mut report.elsewhere))
            }
            Err(_) => report.unusable += 1,
        }
    }
    report.conntrack = import(maps, &rules, candidates, monotonic_ns(), 0)?;

    let timeout = |slot: Timeout| settings.timeouts_ns[slot as usize];
    let mut candidates = Vec::new();
    let sockets = sock_diag::tcp().and_then(|tcp| Ok((tcp, sock_diag::udp()?)));
    let ((established, listening), udp) = sockets.unwrap_or_else(|error| {
        warn!(
            "takeover: cannot read the host's sockets (sock_diag), so connections the host opened before the start are not taken over: {error:#}; load the inet_diag, tcp_diag and udp_diag modules for takeover"
        );
        Default::default()
    });
    let ephemeral = sock_diag::ephemeral_ports();
    for socket in &established {
        let by_peer = sock_diag::accepted(socket, &listening, ephemeral);
        if let Some(record) = sock_diag::to_record(
            socket,
            proto::TCP,
            by_peer,
            timeout(Timeout::TcpEstablished),
        ) {
            candidates.extend(placed(&router, record, protected, &mut report.elsewhere));
        }
    }
    for socket in &udp {
        if let Some(record) =
            sock_diag::to_record(socket, proto::UDP, false, timeout(Timeout::UdpUnreplied))
        {
            candidates.extend(placed(&router, record, protected, &mut report.elsewhere));
        }
    }
    report.sockets = import(maps, &rules, candidates, monotonic_ns(), 0)?;

    maps.bump(DaemonCounter::TakeoverConntrack, report.conntrack.imported)?;
    maps.bump(DaemonCounter::TakeoverSockets, report.sockets.imported)?;
    maps.bump(DaemonCounter::TakeoverRefused, report.refused())?;
    info!(
        "takeover: {} connection(s) from conntrack{}, {} from sockets; {} refused (the policy in force would not admit {}, {} use NAT or a state session cannot resume); {} on unprotected interfaces left out",
        report.conntrack.imported,
        if report.conntrack_present {
            ""
        } else {
            " (not loaded)"
        },
        report.sockets.imported,
        report.refused(),
        report.conntrack.refused + report.sockets.refused,
        report.unusable,
        report.elsewhere,
    );
    Ok(report)
}
