//! `#[repr(C)]` types shared by the eBPF program and the daemon through BPF maps.
//!
//! Every type has explicit padding and a size assertion: a layout change that is not made
//! on both sides at once would corrupt the maps silently.

use bytemuck::{Pod, Zeroable};

use crate::clock::TickClock;

/// Address family tag for IPv4 flows (addresses are stored IPv4-mapped).
pub const FAMILY_IPV4: u8 = 4;
/// Address family tag for IPv6 flows.
pub const FAMILY_IPV6: u8 = 6;

/// IANA protocol numbers the engine understands natively.
pub mod proto {
    /// ICMP for IPv4.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMP for IPv6.
    pub const ICMPV6: u8 = 58;
}

/// Names of the pinned maps, shared so the loader and the CLI can never disagree.
pub mod map_names {
    /// Assured sessions: a plain hash, never evicted to make room.
    pub const SESSIONS: &str = "SESSIONS";
    /// Sessions not yet assured: an LRU hash, where floods of new flows evict each other.
    pub const UNASSURED: &str = "UNASSURED";
    /// Compiled policy rules, two banks for atomic swaps.
    pub const RULES: &str = "RULES";
    /// One policy header per bank.
    pub const POLICY: &str = "POLICY";
    /// Index of the active policy bank.
    pub const ACTIVE_BANK: &str = "ACTIVE_BANK";
    /// Timeouts and tracking switches.
    pub const SETTINGS: &str = "SETTINGS";
    /// Per-CPU global counters, indexed by [`super::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// Per-CPU hit counters per rule id (plus the two default actions).
    pub const RULE_HITS: &str = "RULE_HITS";
    /// Interfaces that run the XDP program, so TC egress can skip forwarded packets.
    pub const MANAGED_IFACES: &str = "MANAGED_IFACES";
    /// Rule names per bank, so any CLI process can label rule ids.
    pub const RULE_NAMES: &str = "RULE_NAMES";
    /// Counters kept by the daemon, indexed by [`super::DaemonCounter`].
    pub const DAEMON_COUNTERS: &str = "DAEMON_COUNTERS";
    /// Ring buffer of [`super::Event`]s from the kernel path to the daemon.
    pub const EVENTS: &str = "EVENTS";
    /// Direct-indexed rule bitmaps of both banks (see `rule_bitmaps::bits_slot`).
    pub const RULE_BITS: &str = "RULE_BITS";
    /// Each port's interval per bank and port dimension (`rule_bitmaps::PortIntervals`).
    pub const PORT_INTERVALS: &str = "PORT_INTERVALS";
    /// Rule bitmaps of the interfaces the rules name, per bank.
    pub const IFACE_BITS: &str = "IFACE_BITS";
    /// LPM trie of the rules' source networks to rule bitmaps, per bank.
    pub const SRC_NETS: &str = "SRC_NETS";
    /// LPM trie of the rules' destination networks to rule bitmaps, per bank.
    pub const DST_NETS: &str = "DST_NETS";
    /// The presence filter's two banks of bits (`presence`), mappable by the reaper.
    pub const PRESENCE: &str = "PRESENCE";
    /// Index of the presence filter's active bank.
    pub const PRESENCE_BANK: &str = "PRESENCE_BANK";
    /// The prefixes of every named set (`session_common::sets`).
    pub const SET_NETS: &str = "SET_NETS";
    /// The single addresses of every named set, hashed (`session_common::sets`).
    pub const SET_HOSTS: &str = "SET_HOSTS";
    /// Per policy bank, the storages its set references read.
    pub const SET_REFS: &str = "SET_REFS";
    /// Per storage, the set's name, state and size.
    pub const SET_INFO: &str = "SET_INFO";
    /// Records of fragmented datagrams in flight (`fragment`); not pinned.
    pub const FRAGMENTS: &str = "FRAGMENTS";
    /// Interfaces the fast path may forward out of, by index: the managed ones that can
    /// transmit frames redirected by XDP.
    pub const FAST_PATH_PORTS: &str = "FAST_PATH_PORTS";
    /// The benchmarks' load generator's frames ([`super::BenchFrame`]).
    pub const BENCH_FRAMES: &str = "BENCH_FRAMES";
    /// The load generator's per-CPU place in its frames ([`super::BenchCursor`]).
    pub const BENCH_CURSOR: &str = "BENCH_CURSOR";
    /// The benchmark wire's ports: each interface's index to the other's.
    pub const BENCH_WIRE: &str = "BENCH_WIRE";
    /// Each rule's limits (`crate::limits::RuleLimit`), per bank.
    pub const RULE_LIMITS: &str = "RULE_LIMITS";
    /// What each limited rule knows of each source, bounded by an LRU.
    pub const SRC_LIMITS: &str = "SRC_LIMITS";
    /// Sessions each limited rule holds, by rule id.
    pub const RULE_CONNS: &str = "RULE_CONNS";
    /// Per-rule limit counters (`crate::limits::LimitHit`), per CPU.
    pub const LIMIT_HITS: &str = "LIMIT_HITS";
    /// The ports `[syn_defence]` defends (`crate::syn_defence::DefendedPort`).
    pub const SYN_DEFENCE: &str = "SYN_DEFENCE";
}

/// The canonical identity of a flow: both directions of a connection map to one key.
///
/// The endpoint that sorts lower (address, then port) is stored first; the session value
/// records which of the two originated the flow. Aligned to 8 so that the presence filter
/// hashes it as five words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    /// Lower endpoint address (IPv4 as `::ffff:a.b.c.d`).
    pub addr_lo: [u8; 16],
    /// Higher endpoint address.
    pub addr_hi: [u8; 16],
    /// Port (or ICMP id) of the lower endpoint, host byte order.
    pub port_lo: u16,
    /// Port of the higher endpoint, host byte order (0 for ICMP queries).
    pub port_hi: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Explicit padding; always zero so keys hash identically.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Per-direction TCP sequence tracking data, as `ip_ct_tcp_state` in nf_conntrack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TcpPeer {
    /// Highest sequence number plus length seen from this side (`td_end`).
    pub end: u32,
    /// Highest acceptable right edge of data from this side (`td_maxend`).
    pub maxend: u32,
    /// Largest window advertised by this side, scaled (`td_maxwin`).
    pub maxwin: u32,
    /// Highest acknowledgement this side sent (`td_maxack`).
    pub maxack: u32,
    /// Window scale this side announced, 0 when none.
    pub scale: u8,
    /// [`tcp_peer_flags`] bits.
    pub flags: u8,
    /// Explicit padding.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<TcpPeer>() == 20);

/// Bits of [`TcpPeer::flags`].
pub mod tcp_peer_flags {
    /// The side announced window scaling on its SYN.
    pub const WINDOW_SCALE: u8 = 1;
    /// The side announced SACK permitted.
    pub const SACK_PERM: u8 = 2;
    /// The side sent data that the other side has not acknowledged yet.
    pub const DATA_UNACKNOWLEDGED: u8 = 4;
    /// The side has sent a FIN.
    pub const CLOSE_INIT: u8 = 8;
    /// The side's maxack field holds a value (after its first ACK).
    pub const MAXACK_SET: u8 = 16;
    /// Window checks cannot fail for this side (picked-up connections).
    pub const BE_LIBERAL: u8 = 32;
}

/// One tracked flow: the value stored in the session map under its [`FlowKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Session {
    /// Monotonic time (ns) the session was created.
    pub created_ns: u64,
    /// Monotonic time (ns) after which the session is treated as absent.
    pub expires_ns: u64,
    /// Packets seen, `[original, reply]`.
    pub packets: [u64; 2],
    /// Bytes seen (L3 length), `[original, reply]`.
    pub bytes: [u64; 2],
    /// TCP window tracking, `[original, reply]`.
    pub tcp: [TcpPeer; 2],
    /// Policy generation of the verdicts cached in `verdict_*` (at creation, the
    /// generation that admitted the session).
    pub verdict_generation: u32,
    /// Sequence number of the last in-window segment (retransmission detection).
    pub last_seq: u32,
    /// Acknowledgement number of the last in-window segment.
    pub last_ack: u32,
    /// Sequence end of the last segment (retransmissions, ignored-SYN resync).
    pub last_end: u32,
    /// Raw window of the last segment.
    pub last_win: u16,
    /// Id of the rule that admitted the session ([`RULE_ID_DEFAULT`] for a default action).
    pub rule_id: u16,
    /// Protocol state: a [`TcpState`] for TCP, a [`FlowState`] otherwise.
    pub state: u8,
    /// [`session_flags`] bits.
    pub flags: u8,
    /// Consecutive retransmissions seen (kernel `retrans`).
    pub retrans: u8,
    /// Direction index of the last segment.
    pub last_dir: u8,
    /// TCP flag class ([`crate::track::tcp_index`]) of the last segment.
    pub last_index: u8,
    /// Window scale of an ignored SYN, for resynchronisation.
    pub last_wscale: u8,
    /// Peer flags of an ignored SYN, for resynchronisation.
    pub last_flags: u8,
    /// ICMP type of the packet that created the session (ICMP sessions), so a reload can
    /// ask the new policy whether it still admits the session.
    pub origin_icmp_type: u8,
    /// Interface of the packet that created the session (native-endian bytes: the field
    /// is not 4-byte aligned), for the same question.
    pub origin_ifindex: [u8; 4],
    /// Interface each direction's cached verdict was decided for, `[original, reply]`.
    pub verdict_ifindex: [u32; 2],
    /// Rule id of each direction's cached verdict ([`RULE_ID_DEFAULT`] for a default).
    pub verdict_rule: [u16; 2],
    /// [`verdict_flags`] of each direction's cached verdict; 0 when none is cached.
    pub verdict_flags: [u8; 2],
    /// Explicit padding.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Session>() == 136);

/// Bits of [`Session::verdict_flags`]. Established packets skip the rule walk by reusing
/// the decision the policy made for the first packet of their direction. It is reused
/// only for a packet the policy cannot tell apart from that one: same direction (so same
/// addresses, ports and protocol), same `ct state`, hook and interface, and the same
/// policy generation; ICMP flows, whose type can change within a direction, are not
/// cached.
pub mod verdict_flags {
    /// A verdict is cached.
    pub const VALID: u8 = 1;
    /// It was decided on the egress hook.
    pub const EGRESS: u8 = 2;
    /// The packets are dropped.
    pub const DROP: u8 = 4;
    /// The deciding rule reports its packets (`log = true`).
    pub const LOG: u8 = 8;
    /// The [`super::CtState`] it was decided for, shifted left by this.
    pub const STATE_SHIFT: u8 = 4;
}

impl TcpPeer {
    /// Zeroes every field in place (see [`crate::zero_words`]).
    #[inline(always)]
    pub fn reset(&mut self) {
        crate::zero_words(self);
    }
}

impl Session {
    /// Zeroes every field in place: a whole-struct assignment into map memory would
    /// become a byte loop in BPF.
    #[inline(always)]
    pub fn reset(&mut self) {
        crate::zero_words(self);
    }
}

/// Bits of [`Session::flags`].
pub mod session_flags {
    /// The originator is the `lo` endpoint of the key.
    pub const ORIG_IS_LO: u8 = 1;
    /// A packet was seen in the reply direction.
    pub const SEEN_REPLY: u8 = 2;
    /// The flow proved itself (full handshake or stream): protected from early eviction.
    pub const ASSURED: u8 = 4;
    /// The session was picked up mid-stream rather than from a SYN.
    pub const PICKED_UP: u8 = 8;
    /// The session lives in the protected (assured) table.
    pub const PROTECTED: u8 = 16;
    /// The packet that created the session was seen at egress (the host sent it).
    pub const ORIGIN_EGRESS: u8 = 32;
    /// The session was taken over or restored without exact TCP window data: while a
    /// side's window is unknown (`maxwin` 0), its first segment sets that side's edges and
    /// may acknowledge data of the other side the table never saw (sent before the
    /// takeover). It acts once per side, on this session only: never a global loose mode.
    pub const ADOPT_WINDOW: u8 = 64;
    /// A rule's limits count the session (`crate::limits`); cleared when the session
    /// closes, so that it is uncounted once.
    pub const COUNTED: u8 = 128;
}

/// TCP connection states, numbered exactly as nf_conntrack's `enum tcp_conntrack`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TcpState {
    /// No state yet.
    None = 0,
    /// SYN seen from the originator.
    SynSent = 1,
    /// SYN-ACK seen from the responder.
    SynRecv = 2,
    /// Handshake completed.
    Established = 3,
    /// A FIN was seen.
    FinWait = 4,
    /// The FIN was acknowledged.
    CloseWait = 5,
    /// FINs seen in both directions.
    LastAck = 6,
    /// The last ACK was seen.
    TimeWait = 7,
    /// Closed by RST.
    Close = 8,
    /// Simultaneous open: SYN seen from both sides.
    SynSent2 = 9,
}

impl TcpState {
    /// All states in numeric order, for tables and name lookups.
    pub const ALL: [TcpState; 10] = [
        TcpState::None,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::Established,
        TcpState::FinWait,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::SynSent2,
    ];

    /// Decodes a stored state byte; unknown values become `None`.
    #[inline(always)]
    pub fn from_u8(value: u8) -> TcpState {
        match value {
            1 => TcpState::SynSent,
            2 => TcpState::SynRecv,
            3 => TcpState::Established,
            4 => TcpState::FinWait,
            5 => TcpState::CloseWait,
            6 => TcpState::LastAck,
            7 => TcpState::TimeWait,
            8 => TcpState::Close,
            9 => TcpState::SynSent2,
            _ => TcpState::None,
        }
    }

    /// The name conntrack-tools print, so our listings read the same.
    pub fn name(self) -> &'static str {
        match self {
            TcpState::None => "NONE",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait => "FIN_WAIT",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::SynSent2 => "SYN_SENT2",
        }
    }
}

/// State of a non-TCP flow.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowState {
    /// Only the originator has sent.
    Unreplied = 0,
    /// Both sides have sent.
    Replied = 1,
}

impl FlowState {
    /// Decodes a stored state byte.
    pub fn from_u8(value: u8) -> FlowState {
        if value == FlowState::Replied as u8 {
            FlowState::Replied
        } else {
            FlowState::Unreplied
        }
    }

    /// Name shown in listings.
    pub fn name(self) -> &'static str {
        match self {
            FlowState::Unreplied => "UNREPLIED",
            FlowState::Replied => "REPLIED",
        }
    }
}

/// The connection-tracking state of one packet, as nftables' `ct state` sees it.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtState {
    /// The packet starts a new flow, or belongs to one not yet answered.
    New = 0,
    /// The packet belongs to a flow that has seen traffic both ways.
    Established = 1,
    /// An ICMP error about a tracked flow.
    Related = 2,
    /// The packet cannot belong to any valid flow.
    Invalid = 3,
    /// The kernel does not track it (IPv6 neighbour discovery, MLD, router messages).
    Untracked = 4,
}

impl CtState {
    /// Every state, in value order.
    pub const ALL: [CtState; 5] = [
        CtState::New,
        CtState::Established,
        CtState::Related,
        CtState::Invalid,
        CtState::Untracked,
    ];

    /// Bit of this state in a rule's state mask.
    pub const fn bit(self) -> u8 {
        1 << (self as u8)
    }

    /// The name the config, `session events` and nftables use for the state.
    pub fn name(self) -> &'static str {
        match self {
            CtState::New => "new",
            CtState::Established => "established",
            CtState::Related => "related",
            CtState::Invalid => "invalid",
            CtState::Untracked => "untracked",
        }
    }
}

/// Which side of the host a packet is crossing.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// Arriving on an interface (XDP).
    Ingress = 0,
    /// Leaving the host from its own stack (TC egress).
    Egress = 1,
}

impl Hook {
    /// Bit of this hook in a rule's direction mask.
    pub const fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Direction of a packet relative to the flow's originator.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Sent by the originator.
    Original = 0,
    /// Sent by the responder.
    Reply = 1,
}

impl Dir {
    /// Index into per-direction arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The other direction.
    pub const fn flip(self) -> Dir {
        match self {
            Dir::Original => Dir::Reply,
            Dir::Reply => Dir::Original,
        }
    }
}

/// What a rule or default does with a packet.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Let the packet through.
    Accept = 0,
    /// Discard the packet.
    Drop = 1,
}

/// Global counters, each an index into the per-CPU counter array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// IP packets examined.
    PacketsSeen = 0,
    /// Packets passed.
    PacketsAccepted,
    /// Packets dropped for any reason.
    PacketsDropped,
    /// Non-IP frames (ARP, LLDP…), always passed.
    PacketsNonIp,
    /// Packets classified NEW.
    StateNew,
    /// Packets classified ESTABLISHED.
    StateEstablished,
    /// Packets classified RELATED.
    StateRelated,
    /// Packets classified INVALID.
    StateInvalid,
    /// Packets classified UNTRACKED.
    StateUntracked,
    /// Dropped by an explicit drop rule.
    DropRule,
    /// Dropped by the default action.
    DropDefault,
    /// Dropped because a new session could not be inserted.
    DropTableFull,
    /// Sessions created.
    SessionsCreated,
    /// Assured sessions moved into the protected table.
    SessionsProtected,
    /// Assured sessions left in the unassured table because the protected one was full.
    ProtectedTableFull,
    /// Sessions found expired by the kernel path and replaced.
    SessionsExpiredInline,
    /// Invalid: headers truncated or inconsistent.
    InvalidMalformed,
    /// Invalid: a TCP segment that cannot start or continue a connection.
    InvalidTcpFlags,
    /// Invalid: TCP transition the state table forbids.
    InvalidTcpState,
    /// Invalid: TCP segment outside the tracked window.
    InvalidTcpWindow,
    /// Invalid: ICMP error that matches no session, or bad ICMP type for a new flow.
    InvalidIcmp,
    /// Invalid: a fragment attack the kernel's reassembly refuses too: a first fragment
    /// too short for its transport header, a later fragment inside the TCP header
    /// (RFC 1858), or a first fragment whose datagram id another flow holds.
    InvalidFragment,
    /// TCP segments ignored by the state table (kernel `sIG`).
    TcpIgnored,
    /// Events not reported because the event ring buffer was full.
    EventsLost,
    /// Packets the fast path (`[forwarding] fast_path`) handed to their egress interface.
    FastPathForwarded,
    /// Expectations set up (or renewed) by UDP requests the host sent to a broadcast or
    /// multicast address (see `expect`).
    ExpectationsCreated,
    /// Packets classified RELATED because they answer such a request.
    ExpectationHits,
    /// Packets dropped without a judgement because the program could not read its settings
    /// or scratch space (fail closed); never expected once the loader filled the maps, so
    /// any count says the kernel side is broken. Not in `PacketsSeen` or `PacketsDropped`,
    /// which the engine counts for packets it judged.
    DropUnjudged,
    /// Later fragments that found their datagram's first fragment and followed its verdict.
    FragmentsFollowed,
    /// Later fragments whose first fragment was not seen (reordered, or its entry gone):
    /// handed to the kernel, which reassembles them only with a first fragment session
    /// accepted.
    FragmentsUnknown,
    /// New sessions a rule's limits refused (`[rule.limit]`; per rule in `LIMIT_HITS`).
    LimitRefused,
    /// Sources a rule's limits put into its overload set.
    SourcesOverloaded,
    /// Sources to overload that found their set's maps full: refused all the same, but
    /// not banned beyond the refusal.
    OverloadSetFull,
    /// Packets of a handshake on a defended port judged without a session
    /// (`[syn_defence]`): the client's SYN, the host's SYN-ACK, the client's ACK. The
    /// policy still passes or drops them.
    SynDefenceHandshake,
    /// Connections on a defended port given their session once the host's stack held
    /// them established.
    SynDefencePickedUp,
}

impl Counter {
    /// Number of counters; the size of the counter map.
    pub const COUNT: u32 = Counter::SynDefencePickedUp as u32 + 1;

    /// Every counter in index order, with its stable name for `stats` and metrics.
    pub const ALL: [(Counter, &'static str); Counter::COUNT as usize] = [
        (Counter::PacketsSeen, "packets_seen"),
        (Counter::PacketsAccepted, "packets_accepted"),
        (Counter::PacketsDropped, "packets_dropped"),
        (Counter::PacketsNonIp, "packets_non_ip"),
        (Counter::StateNew, "state_new"),
        (Counter::StateEstablished, "state_established"),
        (Counter::StateRelated, "state_related"),
        (Counter::StateInvalid, "state_invalid"),
        (Counter::StateUntracked, "state_untracked"),
        (Counter::DropRule, "drop_rule"),
        (Counter::DropDefault, "drop_default"),
        (Counter::DropTableFull, "drop_table_full"),
        (Counter::SessionsCreated, "sessions_created"),
        (Counter::SessionsProtected, "sessions_protected"),
        (Counter::ProtectedTableFull, "protected_table_full"),
        (Counter::SessionsExpiredInline, "sessions_expired_inline"),
        (Counter::InvalidMalformed, "invalid_malformed"),
        (Counter::InvalidTcpFlags, "invalid_tcp_flags"),
        (Counter::InvalidTcpState, "invalid_tcp_state"),
        (Counter::InvalidTcpWindow, "invalid_tcp_window"),
        (Counter::InvalidIcmp, "invalid_icmp"),
        (Counter::InvalidFragment, "invalid_fragment"),
        (Counter::TcpIgnored, "tcp_ignored"),
        (Counter::EventsLost, "events_lost"),
        (Counter::FastPathForwarded, "fast_path_forwarded"),
        (Counter::ExpectationsCreated, "expectations_created"),
        (Counter::ExpectationHits, "expectation_hits"),
        (Counter::DropUnjudged, "drop_unjudged"),
        (Counter::FragmentsFollowed, "fragments_followed"),
        (Counter::FragmentsUnknown, "fragments_unknown"),
        (Counter::LimitRefused, "limit_refused"),
        (Counter::SourcesOverloaded, "sources_overloaded"),
        (Counter::OverloadSetFull, "overload_set_full"),
        (Counter::SynDefenceHandshake, "syn_defence_handshake"),
        (Counter::SynDefencePickedUp, "syn_defence_picked_up"),
    ];
}

/// Counters the daemon keeps (the kernel never writes them), in a pinned array so they
/// survive restarts like the kernel's.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaemonCounter {
    /// Expired sessions the reaper removed.
    SessionsExpired = 0,
    /// Reaper sweeps completed.
    ReaperRuns,
    /// Policies applied (start and reloads).
    PolicyApplies,
    /// Log lines of logged packets left out by the rate limit.
    LogLinesSuppressed,
    /// Sessions removed after a reload because the new policy would not admit them.
    SessionsReadmissionRefused,
    /// Nanoseconds spent in reaper sweeps, in total.
    ReaperNsTotal,
    /// Nanoseconds the latest reaper sweep took (a gauge, overwritten by each sweep).
    ReaperLastNs,
    /// Connections taken over from the kernel's conntrack table at first start.
    TakeoverConntrack,
    /// Connections taken over from the host's sockets at first start.
    TakeoverSockets,
    /// Connections found at takeover that the policy in force would not admit.
    TakeoverRefused,
    /// Sessions restored from a saved file.
    SessionsRestored,
    /// Saved sessions not restored: the policy in force would not admit them, they
    /// expired while the file waited, or the table already had their key.
    RestoreRefused,
    /// Live changes to named sets (`session set add`, `delete`, `flush`, `replace`).
    SetChanges,
    /// The sync peer's state, a gauge: 0 down, 1 resyncing, 2 up (`[sync]`).
    SyncPeerState,
    /// How long the oldest change not yet acknowledged by the peer has waited (ns), a
    /// gauge: how far the standby is behind.
    SyncLagNs,
    /// Sync messages waiting for the peer's acknowledgement, a gauge.
    SyncUnacknowledged,
    /// Sync datagrams sent (retransmissions included).
    SyncSent,
    /// Authenticated sync datagrams received.
    SyncReceived,
    /// Sync data messages sent again for want of an acknowledgement.
    SyncRetransmitted,
    /// Full resyncs begun towards the peer.
    SyncResyncs,
    /// Datagrams on the sync port that failed authentication or came from elsewhere
    /// than the peer; dropped.
    SyncAuthFailures,
    /// Authenticated sync datagrams refused (malformed, replayed, stale, out of window).
    SyncRefused,
    /// Session changes (creations, updates, deletions) sent to the peer.
    SyncChangesSent,
    /// Sessions installed or updated from the peer.
    SyncInstalled,
    /// Sessions deleted on the peer's word.
    SyncDeleted,
    /// Sessions from the peer that the policy in force would not admit; not installed.
    SyncPolicyRefused,
    /// The process id of the daemon once its table may take the traffic over: at once
    /// without `[sync]`, with it once the peer's full resync is in or no peer answered
    /// (`session sync check`, keepalived's health check). A pid rather than a flag, so
    /// that a value left by a daemon that died is not taken for its successor's.
    SyncReadyPid,
}

impl DaemonCounter {
    /// Size of the daemon counter map.
    pub const COUNT: u32 = 32;

    /// Every daemon counter with its stable name.
    pub const ALL: [(DaemonCounter, &'static str); 27] = [
        (DaemonCounter::SessionsExpired, "sessions_expired"),
        (DaemonCounter::ReaperRuns, "reaper_runs"),
        (DaemonCounter::PolicyApplies, "policy_applies"),
        (DaemonCounter::LogLinesSuppressed, "log_lines_suppressed"),
        (
            DaemonCounter::SessionsReadmissionRefused,
            "sessions_readmission_refused",
        ),
        (DaemonCounter::ReaperNsTotal, "reaper_ns_total"),
        (DaemonCounter::ReaperLastNs, "reaper_last_ns"),
        (DaemonCounter::TakeoverConntrack, "takeover_conntrack"),
        (DaemonCounter::TakeoverSockets, "takeover_sockets"),
        (DaemonCounter::TakeoverRefused, "takeover_refused"),
        (DaemonCounter::SessionsRestored, "sessions_restored"),
        (DaemonCounter::RestoreRefused, "restore_refused"),
        (DaemonCounter::SetChanges, "set_changes"),
        (DaemonCounter::SyncPeerState, "sync_peer_state"),
        (DaemonCounter::SyncLagNs, "sync_lag_ns"),
        (DaemonCounter::SyncUnacknowledged, "sync_unacknowledged"),
        (DaemonCounter::SyncSent, "sync_sent"),
        (DaemonCounter::SyncReceived, "sync_received"),
        (DaemonCounter::SyncRetransmitted, "sync_retransmitted"),
        (DaemonCounter::SyncResyncs, "sync_resyncs"),
        (DaemonCounter::SyncAuthFailures, "sync_auth_failures"),
        (DaemonCounter::SyncRefused, "sync_refused"),
        (DaemonCounter::SyncChangesSent, "sync_changes_sent"),
        (DaemonCounter::SyncInstalled, "sync_installed"),
        (DaemonCounter::SyncDeleted, "sync_deleted"),
        (DaemonCounter::SyncPolicyRefused, "sync_policy_refused"),
        (DaemonCounter::SyncReadyPid, "sync_ready_pid"),
    ];
}

/// A rule name as stored in the rule-name map (NUL-padded UTF-8).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct RuleName {
    /// The bytes of the name; unused bytes are zero.
    pub bytes: [u8; RULE_NAME_LEN],
}
const _: () = assert!(core::mem::size_of::<RuleName>() == RULE_NAME_LEN);

/// One event from the kernel path, as the daemon reads it from the event ring buffer: a
/// session created or closed, or a packet a `log = true` rule decided. Addresses and ports
/// are the packet's own, so an event about a reply names the responder as its source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Event {
    /// Monotonic time (ns) of the packet.
    pub time_ns: u64,
    /// Source address (IPv4 as `::ffff:a.b.c.d`).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Source port, or ICMP id.
    pub sport: u16,
    /// Destination port, or ICMP id.
    pub dport: u16,
    /// Id of the rule that decided ([`RULE_ID_DEFAULT`] for a default action).
    pub rule_id: u16,
    /// [`event_kind`] bits: one event can report a new session and a logged packet.
    pub kind: u8,
    /// IP protocol number.
    pub proto: u8,
    /// IP version (4 or 6).
    pub family: u8,
    /// [`CtState`] of the packet.
    pub state: u8,
    /// [`Action`] taken.
    pub action: u8,
    /// [`Hook`] that saw the packet.
    pub hook: u8,
    /// Interface the packet arrived on or leaves by.
    pub ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<Event>() == 56);

/// Bits of [`Event::kind`].
pub mod event_kind {
    /// A new session was stored.
    pub const NEW: u8 = 1;
    /// A session was closed by its own packets (FIN handshake done, or RST).
    pub const CLOSED: u8 = 2;
    /// A packet decided by a rule with `log = true`.
    pub const LOGGED: u8 = 4;
    /// A session was removed after its timeout (reported by the daemon's reaper).
    pub const EXPIRED: u8 = 8;
    /// A rule's limits refused the packet's source and put it into the rule's overload
    /// set; the daemon flushes the source's sessions when the rule asks.
    pub const OVERLOADED: u8 = 16;
    /// A session's TCP state or its seen-reply or assured flag changed; reported only
    /// while state sync listens (`settings_flags::SYNC_EVENTS`), for the sync thread.
    pub const CHANGED: u8 = 32;
}

/// Size of the event ring buffer in bytes (a power of two): room for about 18,000 events,
/// so bursts survive a daemon that is briefly busy.
pub const EVENT_RING_BYTES: u32 = 1 << 20;

/// Longest rule name accepted, in bytes.
pub const RULE_NAME_LEN: usize = 64;

/// Maximum compiled rule entries per policy bank.
pub const MAX_RULES: u32 = 1024;
/// Rule-hit slots: one per rule id plus the inbound and outbound defaults.
pub const RULE_HIT_SLOTS: u32 = MAX_RULES + 2;
/// Rule-hit slot of the inbound default action.
pub const HIT_DEFAULT_INBOUND: u32 = MAX_RULES;
/// Rule-hit slot of the outbound default action.
pub const HIT_DEFAULT_OUTBOUND: u32 = MAX_RULES + 1;
/// `Session::rule_id` of a session admitted by a default action.
pub const RULE_ID_DEFAULT: u16 = u16::MAX;

/// One compiled policy entry. A configured rule with several address or port lists
/// compiles into several entries that share its `rule_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Rule {
    /// Source network (IPv4-mapped for IPv4), already masked.
    pub src_net: [u8; 16],
    /// Source netmask as bytes.
    pub src_mask: [u8; 16],
    /// Destination network, already masked.
    pub dst_net: [u8; 16],
    /// Destination netmask as bytes.
    pub dst_mask: [u8; 16],
    /// Inclusive source port range.
    pub sport_lo: u16,
    /// Inclusive source port range end.
    pub sport_hi: u16,
    /// Inclusive destination port range.
    pub dport_lo: u16,
    /// Inclusive destination port range end.
    pub dport_hi: u16,
    /// Interface index to match, 0 for any.
    pub ifindex: u32,
    /// Bits of [`CtState::bit`] that match.
    pub state_mask: u8,
    /// Bits of [`Hook::bit`] that match.
    pub hook_mask: u8,
    /// Protocol to match, 0 for any.
    pub proto: u8,
    /// Family to match, 0 for any.
    pub family: u8,
    /// ICMP type to match when `match_flags` has [`rule_flags::ICMP_TYPE`].
    pub icmp_type: u8,
    /// [`rule_flags`] bits.
    pub match_flags: u8,
    /// [`Action`] as a byte.
    pub action: u8,
    /// 1 when packets this rule decides are reported as events (`log = true`).
    pub log: u8,
    /// Index of the configured rule (for names and hit counters).
    pub rule_id: u16,
    /// Source set: 0 for none, `i + 1` for the bank's source set `i` (see
    /// [`crate::sets`]); the source network is then ::/0 and membership decides.
    pub src_set: u8,
    /// Destination set, as [`Rule::src_set`].
    pub dst_set: u8,
}
const _: () = assert!(core::mem::size_of::<Rule>() == 88);

/// Bits of [`Rule::match_flags`].
pub mod rule_flags {
    /// The rule matches on the ICMP type.
    pub const ICMP_TYPE: u8 = 1;
    /// The rule matches on ports (so only TCP/UDP packets can match).
    pub const PORTS: u8 = 4;
    /// The rule has limits (`RULE_LIMITS`) that a new session it admits must pass. Not a
    /// match condition: the classifier ignores it.
    pub const LIMITED: u8 = 8;
}

/// Header of one policy bank.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PolicyHeader {
    /// Number of valid entries in the bank.
    pub rule_count: u32,
    /// Generation number, bumped on every apply.
    pub generation: u32,
    /// Default [`Action`] for ingress packets.
    pub default_inbound: u8,
    /// Default [`Action`] for egress packets.
    pub default_outbound: u8,
    /// Explicit padding.
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<PolicyHeader>() == 16);

/// Which timeout a session in a given state gets.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    /// TCP SYN_SENT.
    TcpSynSent = 0,
    /// TCP SYN_RECV.
    TcpSynRecv,
    /// TCP ESTABLISHED.
    TcpEstablished,
    /// TCP FIN_WAIT.
    TcpFinWait,
    /// TCP CLOSE_WAIT.
    TcpCloseWait,
    /// TCP LAST_ACK.
    TcpLastAck,
    /// TCP TIME_WAIT.
    TcpTimeWait,
    /// TCP CLOSE.
    TcpClose,
    /// TCP SYN_SENT2.
    TcpSynSent2,
    /// TCP after too many retransmissions.
    TcpRetrans,
    /// TCP with unacknowledged data.
    TcpUnack,
    /// UDP seen one way.
    UdpUnreplied,
    /// UDP seen both ways.
    UdpReplied,
    /// ICMP echo and other queries.
    Icmp,
    /// Other protocols.
    Generic,
}

impl Timeout {
    /// Number of timeouts in [`Settings::timeouts_ns`].
    pub const COUNT: usize = Timeout::Generic as usize + 1;

    /// Config key, kernel default in seconds, for each timeout in index order.
    pub const DEFAULTS: [(Timeout, &'static str, u64); Timeout::COUNT] = [
        (Timeout::TcpSynSent, "tcp_syn_sent", 120),
        (Timeout::TcpSynRecv, "tcp_syn_recv", 60),
        (Timeout::TcpEstablished, "tcp_established", 432_000),
        (Timeout::TcpFinWait, "tcp_fin_wait", 120),
        (Timeout::TcpCloseWait, "tcp_close_wait", 60),
        (Timeout::TcpLastAck, "tcp_last_ack", 30),
        (Timeout::TcpTimeWait, "tcp_time_wait", 120),
        (Timeout::TcpClose, "tcp_close", 10),
        (Timeout::TcpSynSent2, "tcp_syn_sent2", 120),
        (Timeout::TcpRetrans, "tcp_retrans", 300),
        (Timeout::TcpUnack, "tcp_unacknowledged", 300),
        (Timeout::UdpUnreplied, "udp_unreplied", 30),
        (Timeout::UdpReplied, "udp_replied", 120),
        (Timeout::Icmp, "icmp", 30),
        (Timeout::Generic, "generic", 600),
    ];
}

/// Timeouts and switches, written by the daemon, read by every packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Settings {
    /// Timeouts in nanoseconds, indexed by [`Timeout`]; padded to a power of two so the
    /// kernel indexes it with a mask.
    pub timeouts_ns: [u64; TIMEOUT_SLOTS],
    /// [`settings_flags`] bits.
    pub flags: u32,
    /// Retransmissions before the shorter retrans timeout applies (kernel: 3).
    pub max_retrans: u32,
    /// The programs' clock, which the daemon calibrates for this host at start; the
    /// config leaves it uncalibrated.
    pub clock: TickClock,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 152);

/// Slots in [`Settings::timeouts_ns`].
pub const TIMEOUT_SLOTS: usize = 16;
const _: () = assert!(Timeout::COUNT <= TIMEOUT_SLOTS);

/// Bits of [`Settings::flags`].
pub mod settings_flags {
    /// Check TCP sequence numbers and windows (out-of-window segments are INVALID).
    pub const TCP_WINDOW_CHECK: u32 = 1;
    /// Only out-of-window RSTs are INVALID (kernel `nf_conntrack_tcp_be_liberal`).
    pub const TCP_LIBERAL: u32 = 2;
    /// Pick up TCP connections already in progress (kernel `nf_conntrack_tcp_loose`).
    pub const TCP_LOOSE: u32 = 4;
    /// Forward established TCP and UDP sessions between managed interfaces in XDP
    /// (`crate::forward`).
    pub const FAST_PATH: u32 = 8;
    /// `[syn_defence]` defends some port (`crate::syn_defence`): TCP packets without a
    /// session look their port up in `SYN_DEFENCE`.
    pub const SYN_DEFENCE: u32 = 16;
    /// State sync listens (`[sync]`): report each change of a session's TCP state or of
    /// its seen-reply and assured flags ([`event_kind::CHANGED`]), and wake the daemon
    /// when an event lands in a ring it had emptied (the kernel's adaptive wake-up), so a
    /// change reaches the peer within a wake-up rather than at the next scan of the
    /// table, and a busy ring still costs one wake-up per burst.
    pub const SYNC_EVENTS: u32 = 32;
}

/// Nanoseconds per second, for timeout conversion.
pub const NS_PER_SEC: u64 = 1_000_000_000;

impl Default for Settings {
    fn default() -> Self {
        let mut timeouts_ns = [0u64; TIMEOUT_SLOTS];
        let mut i = 0;
        while i < Timeout::COUNT {
            timeouts_ns[i] = Timeout::DEFAULTS[i].2 * NS_PER_SEC;
            i += 1;
        }
        Settings {
            timeouts_ns,
            flags: settings_flags::TCP_WINDOW_CHECK,
            max_retrans: 3,
            clock: TickClock::default(),
        }
    }
}

impl Settings {
    /// The configured timeout for `which`, in nanoseconds.
    #[inline(always)]
    pub fn timeout(&self, which: Timeout) -> u64 {
        self.timeout_slot(which as u8)
    }

    /// The timeout in slot `slot` (a [`Timeout`] number computed at run time).
    #[inline(always)]
    pub fn timeout_slot(&self, slot: u8) -> u64 {
        self.timeouts_ns[(crate::opaque(slot) as usize) & (TIMEOUT_SLOTS - 1)]
    }

    /// Whether a switch from [`settings_flags`] is on.
    #[inline(always)]
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::{BenchCursor, Event, FlowKey, PolicyHeader, Rule, RuleName, Session, Settings};

    // aya's Pod asks what bytemuck's does; the derive checks it at compile time
    // (`#[repr(C)]`, `Copy`, no implicit padding).
    // SAFETY: `FlowKey` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: `Session` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for Session {}
    // SAFETY: `Rule` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for Rule {}
    // SAFETY: `PolicyHeader` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for PolicyHeader {}
    // SAFETY: `Settings` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for Settings {}
    // SAFETY: `RuleName` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for RuleName {}
    // SAFETY: `Event` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for Event {}
    // SAFETY: `BenchCursor` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for BenchCursor {}
}

/// Bytes of each frame the benchmarks' XDP load generator writes: Ethernet, IPv4 and a
/// TCP header without options. A benchmark's frames differ only in these bytes (addresses,
/// ports, sequence numbers, checksums), so one template carries the rest.
pub const BENCH_FRAME_PREFIX: usize = 54;

/// One frame of the load generator's table: the prefix it writes over the template.
pub type BenchFrame = [u8; BENCH_FRAME_PREFIX];

/// Where the load generator is in its table, per CPU, so a run can cycle through many
/// flows without any state in the frames themselves.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BenchCursor {
    /// Index of the next frame to send.
    pub next: u32,
    /// Frames in the table: the cursor wraps here.
    pub frames: u32,
}
const _: () = assert!(core::mem::size_of::<BenchCursor>() == 8);
