//! Connection tracking: canonical flow keys and the per-protocol state machines.
//!
//! TCP follows nf_conntrack (`nf_conntrack_proto_tcp.c`): the same flag classes, the same
//! transition table per direction, the same window checks, retransmission accounting and
//! timeout choice. UDP, ICMP and other protocols follow their nf_conntrack counterparts.

use crate::packet::{IcmpKind, PacketMeta, tcp_flags};
use crate::wire::{
    CtState, Dir, FlowKey, FlowState, Session, Settings, TcpPeer, TcpState, Timeout, proto,
    session_flags, settings_flags, tcp_peer_flags,
};

/// The canonical key of a packet's flow and whether the packet's source is the key's `lo`
/// endpoint.
#[inline(always)]
pub fn flow_key(meta: &PacketMeta) -> (FlowKey, bool) {
    let (sport, dport) = key_ports(meta.proto, meta.sport, meta.dport);
    endpoints_key(meta.family, meta.proto, &meta.src, sport, &meta.dst, dport)
}

/// The key of the flow an ICMP error is about (its embedded header).
#[inline(always)]
pub fn embedded_key(meta: &PacketMeta) -> FlowKey {
    let inner = &meta.inner;
    let (sport, dport) = key_ports(inner.proto, inner.sport, inner.dport);
    endpoints_key(
        meta.family,
        inner.proto,
        &inner.src,
        sport,
        &inner.dst,
        dport,
    )
    .0
}

/// ICMP queries are identified by their id alone, so both directions use it as both ports;
/// protocols without ports use zero.
#[inline(always)]
fn key_ports(protocol: u8, sport: u16, dport: u16) -> (u16, u16) {
    match protocol {
        proto::ICMP | proto::ICMPV6 => (sport, sport),
        proto::TCP | proto::UDP => (sport, dport),
        _ => (0, 0),
    }
}

/// The canonical key of the flow between two endpoints (ports as [`flow_key`] takes
/// them) and whether `src` is its `lo` endpoint; the daemon keys the events it reads
/// (addresses and ports) with it, exactly as the kernel path keyed the session.
#[inline(always)]
pub fn endpoints_key(
    family: u8,
    protocol: u8,
    src: &[u8; 16],
    sport: u16,
    dst: &[u8; 16],
    dport: u16,
) -> (FlowKey, bool) {
    let src_is_lo = match compare_addr(src, dst) {
        core::cmp::Ordering::Less => true,
        core::cmp::Ordering::Greater => false,
        core::cmp::Ordering::Equal => sport <= dport,
    };
    let key = if src_is_lo {
        FlowKey {
            addr_lo: *src,
            addr_hi: *dst,
            port_lo: sport,
            port_hi: dport,
            proto: protocol,
            family,
            _pad: [0; 2],
        }
    } else {
        FlowKey {
            addr_lo: *dst,
            addr_hi: *src,
            port_lo: dport,
            port_hi: sport,
            proto: protocol,
            family,
            _pad: [0; 2],
        }
    };
    (key, src_is_lo)
}

/// Byte-wise address order, done as two big-endian u64 compares for the kernel's sake.
#[inline(always)]
fn compare_addr(a: &[u8; 16], b: &[u8; 16]) -> core::cmp::Ordering {
    let a_hi = u64::from_be_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
    let b_hi = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    if a_hi != b_hi {
        return a_hi.cmp(&b_hi);
    }
    let a_lo = u64::from_be_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
    let b_lo = u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
    a_lo.cmp(&b_lo)
}

/// The session's endpoints as (source, source port, destination, destination port) of
/// its originator's packets: the order the key's canonical sorting forgot.
#[inline(always)]
pub fn originator_endpoints(key: &FlowKey, session: &Session) -> ([u8; 16], u16, [u8; 16], u16) {
    if session.flags & session_flags::ORIG_IS_LO != 0 {
        (key.addr_lo, key.port_lo, key.addr_hi, key.port_hi)
    } else {
        (key.addr_hi, key.port_hi, key.addr_lo, key.port_lo)
    }
}

/// Direction of a packet within an existing session.
#[inline(always)]
pub fn direction(session: &Session, src_is_lo: bool) -> Dir {
    let orig_is_lo = session.flags & session_flags::ORIG_IS_LO != 0;
    if orig_is_lo == src_is_lo {
        Dir::Original
    } else {
        Dir::Reply
    }
}

/// The `ct state` a packet gets before the tracker updates its session, as nf_conntrack
/// assigns `ctinfo` at lookup time.
#[inline(always)]
pub fn state_for(session: &Session, dir: Dir) -> CtState {
    if dir == Dir::Reply || session.flags & session_flags::SEEN_REPLY != 0 {
        CtState::Established
    } else {
        CtState::New
    }
}

/// Why the tracker refused a packet: each maps to an invalid-reason counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// Impossible TCP flag combination.
    TcpFlags,
    /// The transition table forbids this segment in this state (or no SYN for a new flow).
    TcpState,
    /// The segment is outside the tracked window.
    TcpWindow,
    /// The ICMP message cannot start a flow or matches no flow.
    Icmp,
}

/// What the tracker did with a packet on an existing session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Update {
    /// The session was updated.
    Tracked,
    /// The table says to let the packet pass without changing state (kernel `sIG`).
    Ignored,
    /// The packet ends the session at once (RST before any reply).
    Kill,
    /// A SYN reopens a closed connection: the old session is replaced by a new one.
    Reopen,
}

/// [`update`]'s answer as one integer, for a kernel that runs the tracker as a separate
/// BPF function (which can return only a scalar): the [`Update`] in order from 0, or 16
/// plus the [`Invalid`] reason.
pub fn encode_update(result: Result<Update, Invalid>) -> i32 {
    match result {
        Ok(update) => update as i32,
        Err(reason) => 16 + reason as i32,
    }
}

/// The inverse of [`encode_update`]; a code it never returns reads as a state the
/// transition table forbids.
pub fn decode_update(code: i32) -> Result<Update, Invalid> {
    match code {
        0 => Ok(Update::Tracked),
        1 => Ok(Update::Ignored),
        2 => Ok(Update::Kill),
        3 => Ok(Update::Reopen),
        16 => Err(Invalid::TcpFlags),
        18 => Err(Invalid::TcpWindow),
        19 => Err(Invalid::Icmp),
        _ => Err(Invalid::TcpState),
    }
}

/// TCP flag classes that index the transition table, as `get_conntrack_index()`.
pub mod tcp_index {
    /// SYN without ACK.
    pub const SYN: u8 = 0;
    /// SYN with ACK.
    pub const SYNACK: u8 = 1;
    /// FIN (without SYN or RST).
    pub const FIN: u8 = 2;
    /// Plain ACK.
    pub const ACK: u8 = 3;
    /// RST.
    pub const RST: u8 = 4;
    /// None of the above.
    pub const NONE: u8 = 5;
}

/// Flag class for each combination of FIN, SYN, RST, PSH and ACK (the low five bits).
/// A table rather than branches: the verifier then sees one unknown value instead of one
/// path per class.
const TCP_INDEX_BY_FLAGS: [u8; 32] = {
    let mut table = [0u8; 32];
    let mut flags = 0;
    while flags < 32 {
        let byte = flags as u8;
        table[flags] = if byte & tcp_flags::RST != 0 {
            tcp_index::RST
        } else if byte & tcp_flags::SYN != 0 {
            if byte & tcp_flags::ACK != 0 {
                tcp_index::SYNACK
            } else {
                tcp_index::SYN
            }
        } else if byte & tcp_flags::FIN != 0 {
            tcp_index::FIN
        } else if byte & tcp_flags::ACK != 0 {
            tcp_index::ACK
        } else {
            tcp_index::NONE
        };
        flags += 1;
    }
    table
};

/// The flag class of a TCP flags byte.
#[inline(always)]
pub fn tcp_index(flags: u8) -> u8 {
    TCP_INDEX_BY_FLAGS[(crate::opaque(flags) & 0x1f) as usize]
}

/// Table result meaning "invalid" (kernel `sIV`).
pub const TCP_INVALID: u8 = 10;
/// Table result meaning "ignore" (kernel `sIG`).
pub const TCP_IGNORE: u8 = 11;
const IV: u8 = TCP_INVALID;
const IG: u8 = TCP_IGNORE;
const SS: u8 = TcpState::SynSent as u8;
const SR: u8 = TcpState::SynRecv as u8;
const ES: u8 = TcpState::Established as u8;
const FW: u8 = TcpState::FinWait as u8;
const CW: u8 = TcpState::CloseWait as u8;
const LA: u8 = TcpState::LastAck as u8;
const TW: u8 = TcpState::TimeWait as u8;
const CL: u8 = TcpState::Close as u8;
const S2: u8 = TcpState::SynSent2 as u8;

/// The nf_conntrack TCP transition table: `[direction][flag class][old state]`.
/// Columns: NONE, SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK,
/// TIME_WAIT, CLOSE, SYN_SENT2. Rows and columns are padded with INVALID to powers of two
/// so lookups use masked indices, which the BPF verifier can prove in bounds.
pub const TCP_TRANSITIONS: [[[u8; 16]; 8]; 2] = [
    [
        [
            SS, SS, IG, IG, IG, IG, IG, SS, SS, S2, IV, IV, IV, IV, IV, IV,
        ],
        [
            IV, IV, SR, IV, IV, IV, IV, IV, IV, SR, IV, IV, IV, IV, IV, IV,
        ],
        [
            IV, IV, FW, FW, LA, LA, LA, TW, CL, IV, IV, IV, IV, IV, IV, IV,
        ],
        [
            ES, IV, ES, ES, CW, CW, TW, TW, CL, IV, IV, IV, IV, IV, IV, IV,
        ],
        [
            IV, CL, CL, CL, CL, CL, CL, CL, CL, CL, IV, IV, IV, IV, IV, IV,
        ],
        [IV; 16],
        [IV; 16],
        [IV; 16],
    ],
    [
        [
            IV, S2, IV, IV, IV, IV, IV, SS, IV, S2, IV, IV, IV, IV, IV, IV,
        ],
        [
            IV, SR, IG, IG, IG, IG, IG, IG, IG, SR, IV, IV, IV, IV, IV, IV,
        ],
        [
            IV, IV, FW, FW, LA, LA, LA, TW, CL, IV, IV, IV, IV, IV, IV, IV,
        ],
        [
            IV, IG, SR, ES, CW, CW, TW, TW, CL, IG, IV, IV, IV, IV, IV, IV,
        ],
        [
            IV, CL, CL, CL, CL, CL, CL, CL, CL, CL, IV, IV, IV, IV, IV, IV,
        ],
        [IV; 16],
        [IV; 16],
        [IV; 16],
    ],
];

/// Looks up the transition table: a [`TcpState`] number, [`TCP_INVALID`] or
/// [`TCP_IGNORE`].
#[inline(always)]
pub fn tcp_transition(dir: Dir, index: u8, old: u8) -> u8 {
    let dir = crate::opaque(dir.index()) & 1;
    let index = (crate::opaque(index) as usize) & 7;
    let old = (crate::opaque(old) as usize) & 15;
    TCP_TRANSITIONS[dir][index][old]
}

/// Timeout slot for each TCP state number (see [`Timeout`]).
const TCP_STATE_TIMEOUT: [u8; 16] = [
    Timeout::TcpSynSent as u8,
    Timeout::TcpSynSent as u8,
    Timeout::TcpSynRecv as u8,
    Timeout::TcpEstablished as u8,
    Timeout::TcpFinWait as u8,
    Timeout::TcpCloseWait as u8,
    Timeout::TcpLastAck as u8,
    Timeout::TcpTimeWait as u8,
    Timeout::TcpClose as u8,
    Timeout::TcpSynSent2 as u8,
    Timeout::TcpClose as u8,
    Timeout::TcpClose as u8,
    Timeout::TcpClose as u8,
    Timeout::TcpClose as u8,
    Timeout::TcpClose as u8,
    Timeout::TcpClose as u8,
];

/// Which configured timeout a TCP state number uses.
#[inline(always)]
pub fn state_timeout_slot(state: u8) -> u8 {
    TCP_STATE_TIMEOUT[(crate::opaque(state) as usize) & 15]
}

/// Flag combinations the kernel accepts (PSH, ECE and CWR are always allowed).
#[inline(always)]
pub fn tcp_flags_valid(flags: u8) -> bool {
    const FIN: u8 = tcp_flags::FIN;
    const SYN: u8 = tcp_flags::SYN;
    const RST: u8 = tcp_flags::RST;
    const ACK: u8 = tcp_flags::ACK;
    const URG: u8 = tcp_flags::URG;
    let significant = flags & (FIN | SYN | RST | ACK | URG);
    matches!(
        significant,
        SYN | 0x22 | 0x12 | RST | 0x14 | 0x11 | 0x31 | ACK | 0x30
    )
}

/// Sequence number comparison modulo 2^32 (`before()` in the kernel).
#[inline(always)]
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// `after()` in the kernel: whether sequence number `a` comes after `b`, modulo 2^32.
#[inline(always)]
pub fn after(a: u32, b: u32) -> bool {
    before(b, a)
}

/// Sequence number just past a segment: SYN and FIN each count for one.
#[inline(always)]
fn segment_end(meta: &PacketMeta) -> u32 {
    let mut end = meta.seq.wrapping_add(meta.payload_len);
    if meta.tcp_flags & tcp_flags::SYN != 0 {
        end = end.wrapping_add(1);
    }
    if meta.tcp_flags & tcp_flags::FIN != 0 {
        end = end.wrapping_add(1);
    }
    end
}

/// Lower bound slack for acknowledgements (`MAXACKWINDOW`).
const MAX_ACK_WINDOW_CONST: u32 = 66000;

/// `last_flags` bit: a simultaneous open is in progress (kernel `IP_CT_TCP_SIMULTANEOUS_OPEN`).
const LAST_SIMULTANEOUS_OPEN: u8 = 0x40;
/// `last_flags` bit: an RFC 5961 challenge ACK may follow an ignored SYN in LAST_ACK.
const LAST_CHALLENGE_ACK: u8 = 0x80;

/// Creates the session for a packet that has none, or says why it cannot start a flow.
///
/// The session (written into `session`, which may hold anything before) has not seen the
/// packet yet: pass it to [`update`] with [`Dir::Original`], as the kernel runs
/// `tcp_new()` then `tcp_packet()`.
#[inline(always)]
pub fn new_session(
    session: &mut Session,
    meta: &PacketMeta,
    src_is_lo: bool,
    settings: &Settings,
    now: u64,
) -> Result<(), Invalid> {
    new_session_with(
        session,
        meta,
        src_is_lo,
        settings.has(settings_flags::TCP_LOOSE),
        now,
    )
}

/// [`new_session`] with `loose` in place of the `tcp_loose` setting: a TCP segment that
/// is not a SYN may pick a connection up when it holds. The SYN-flood defence
/// ([`crate::syn_defence`]) picks up, for one connection, one the host's stack vouches for.
#[inline(always)]
pub fn new_session_with(
    session: &mut Session,
    meta: &PacketMeta,
    src_is_lo: bool,
    loose: bool,
    now: u64,
) -> Result<(), Invalid> {
    session.reset();
    session.created_ns = now;
    session.flags = if src_is_lo {
        session_flags::ORIG_IS_LO
    } else {
        0
    };
    session.last_index = tcp_index::NONE;
    match meta.proto {
        proto::TCP => {
            if !tcp_flags_valid(meta.tcp_flags) {
                return Err(Invalid::TcpFlags);
            }
            let index = tcp_index(meta.tcp_flags);
            let first = tcp_transition(Dir::Original, index, TcpState::None as u8);
            let window = if meta.window == 0 {
                1
            } else {
                meta.window as u32
            };
            if first == SS {
                let sender = &mut session.tcp[0];
                sender.end = segment_end(meta);
                sender.maxwin = window;
                sender.maxend = sender.end;
                apply_syn_options(sender, meta);
            } else if first < TCP_INVALID && loose {
                let sender = &mut session.tcp[0];
                sender.end = segment_end(meta);
                sender.maxwin = window;
                sender.maxend = sender.end.wrapping_add(window);
                let picked_up = tcp_peer_flags::SACK_PERM | tcp_peer_flags::BE_LIBERAL;
                session.tcp[0].flags = picked_up;
                session.tcp[1].flags = picked_up;
                session.flags |= session_flags::PICKED_UP;
            } else {
                return Err(Invalid::TcpState);
            }
            session.state = TcpState::None as u8;
        }
        proto::ICMP | proto::ICMPV6 => {
            if meta.icmp_kind != IcmpKind::Request {
                return Err(Invalid::Icmp);
            }
            session.state = FlowState::Unreplied as u8;
        }
        _ => session.state = FlowState::Unreplied as u8,
    }
    Ok(())
}

/// Records the window-scale and SACK options of a SYN, as `tcp_options()`.
#[inline(always)]
fn apply_syn_options(peer: &mut TcpPeer, meta: &PacketMeta) {
    peer.scale = 0;
    peer.flags = 0;
    if meta.tcp_wscale != 0xff {
        peer.scale = meta.tcp_wscale;
        peer.flags |= tcp_peer_flags::WINDOW_SCALE;
    }
    if meta.tcp_sack_perm {
        peer.flags |= tcp_peer_flags::SACK_PERM;
    }
}

/// Runs one packet through its session's state machine and refreshes its timeout.
///
/// Counters and `SEEN_REPLY` are the caller's business (see [`account`] and
/// [`mark_seen`]), because the kernel handles them around the protocol handler.
#[inline(always)]
pub fn update(
    session: &mut Session,
    meta: &PacketMeta,
    dir: Dir,
    settings: &Settings,
    now: u64,
) -> Result<Update, Invalid> {
    match meta.proto {
        proto::TCP => update_tcp(session, meta, dir, settings, now),
        proto::UDP => {
            let mut timeout = settings.timeout(Timeout::UdpUnreplied);
            if session.flags & session_flags::SEEN_REPLY != 0
                && now > session.created_ns.saturating_add(UDP_STREAM_AFTER_NS)
            {
                session.flags |= session_flags::ASSURED;
                timeout = settings.timeout(Timeout::UdpReplied);
            }
            session.expires_ns = now.saturating_add(timeout);
            Ok(Update::Tracked)
        }
        proto::ICMP | proto::ICMPV6 => {
            let expected = match dir {
                Dir::Original => IcmpKind::Request,
                Dir::Reply => IcmpKind::Reply,
            };
            if meta.icmp_kind != expected {
                return Err(Invalid::Icmp);
            }
            session.expires_ns = now.saturating_add(settings.timeout(Timeout::Icmp));
            Ok(Update::Tracked)
        }
        _ => {
            if session.flags & session_flags::SEEN_REPLY != 0 {
                session.flags |= session_flags::ASSURED;
            }
            session.expires_ns = now.saturating_add(settings.timeout(Timeout::Generic));
            Ok(Update::Tracked)
        }
    }
}

/// A UDP flow still active this long after it started is a stream (kernel: 2 s).
const UDP_STREAM_AFTER_NS: u64 = 2_000_000_000;

/// Counts a tracked packet on the session.
#[inline(always)]
pub fn account(session: &mut Session, meta: &PacketMeta, dir: Dir) {
    let i = dir.index() & 1;
    session.packets[i] = session.packets[i].wrapping_add(1);
    session.bytes[i] = session.bytes[i].wrapping_add(meta.ip_len as u64);
}

/// Notes that the responder has spoken, after the protocol handler accepted its packet.
#[inline(always)]
pub fn mark_seen(session: &mut Session, meta: &PacketMeta, dir: Dir) {
    if dir == Dir::Reply {
        session.flags |= session_flags::SEEN_REPLY;
        if meta.proto != proto::TCP {
            session.state = FlowState::Replied as u8;
        }
    }
}

/// Both peers of a session, the sender of this packet first; references into the
/// session itself (map memory in the kernel), which the verifier does not track value by
/// value, so fewer paths to explore.
#[inline(always)]
fn peers(tcp: &mut [TcpPeer; 2], d: usize) -> (&mut TcpPeer, &mut TcpPeer) {
    let (first, second) = tcp.split_at_mut(1);
    if d == 0 {
        (&mut first[0], &mut second[0])
    } else {
        (&mut second[0], &mut first[0])
    }
}

#[inline(always)]
fn update_tcp(
    session: &mut Session,
    meta: &PacketMeta,
    dir: Dir,
    settings: &Settings,
    now: u64,
) -> Result<Update, Invalid> {
    if !tcp_flags_valid(meta.tcp_flags) {
        return Err(Invalid::TcpFlags);
    }
    let mut old = session.state;
    let index = tcp_index(meta.tcp_flags);
    let d = dir.index() & 1;
    let mut new = tcp_transition(dir, index, old);
    if new == SS && old >= TW {
        let closing =
            (session.tcp[0].flags | session.tcp[1].flags) & tcp_peer_flags::CLOSE_INIT != 0;
        let aborted = session.last_dir == d as u8 && session.last_index == tcp_index::RST;
        if closing || aborted {
            return Ok(Update::Reopen);
        }
        new = IG;
    }
    if new == IG {
        if !ignore(session, meta, dir, index, old) {
            return Ok(Update::Ignored);
        }
        old = SS;
        new = SR;
    }
    if new >= TCP_INVALID {
        return Err(Invalid::TcpState);
    }
    let mut skip_window = false;
    if new == TW
        && old == LA
        && index == tcp_index::ACK
        && session.last_dir != d as u8
        && session.last_index == tcp_index::SYN
        && session.last_flags & LAST_CHALLENGE_ACK != 0
    {
        session.last_flags &= !LAST_CHALLENGE_ACK;
        return Ok(Update::Ignored);
    }
    if new == S2 {
        session.last_flags |= LAST_SIMULTANEOUS_OPEN;
    }
    if new == SR
        && d == 1
        && index == tcp_index::ACK
        && session.last_flags & LAST_SIMULTANEOUS_OPEN != 0
    {
        new = ES;
    }
    if new == CL && index == tcp_index::RST {
        match rst_check(session, meta, d, old) {
            RstCheck::Invalid => return Err(Invalid::TcpWindow),
            RstCheck::SkipWindow => skip_window = true,
            RstCheck::KeepState => new = old,
            RstCheck::CheckWindow => {}
        }
    }
    if !skip_window {
        match in_window(session, meta, dir, index, settings) {
            Window::Accept => {}
            Window::Ignore => return Ok(Update::Ignored),
            Window::Invalid => {
                handle_invalid(session, d, index, settings, now);
                return Err(Invalid::TcpWindow);
            }
        }
    }
    session.last_index = index;
    session.last_dir = d as u8;
    session.state = new;
    if old != new && new == FW {
        session.tcp[d].flags |= tcp_peer_flags::CLOSE_INIT;
    }
    let mut timeout = tcp_timeout(session, new, index, settings);
    if session.flags & session_flags::SEEN_REPLY == 0 {
        if index == tcp_index::RST {
            return Ok(Update::Kill);
        }
        if index == tcp_index::SYN && old == SS {
            // A retransmitted SYN does not renew the timeout: port reuse must not keep
            // a half-open entry alive forever.
            return Ok(Update::Tracked);
        }
        let unack = settings.timeout(Timeout::TcpUnack);
        if new == ES && timeout > unack {
            timeout = unack;
        }
    } else if session.flags & session_flags::ASSURED == 0 && (old == SR || old == ES) && new == ES {
        session.flags |= session_flags::ASSURED;
    }
    session.expires_ns = now.saturating_add(timeout);
    Ok(Update::Tracked)
}

/// How an RST that the table maps to CLOSE is to be treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RstCheck {
    /// Below the peer's highest acknowledgement: INVALID.
    Invalid,
    /// Closes without a window check (closing states, answers to packets let through).
    SkipWindow,
    /// In ESTABLISHED but not at the exact expected sequence: keep the state, so a
    /// challenge ACK can follow (RFC 5961).
    KeepState,
    /// Close after the usual window check.
    CheckWindow,
}

/// The kernel's RST rules (`case TCP_CONNTRACK_CLOSE` in `nf_conntrack_tcp_packet()`).
#[inline(always)]
fn rst_check(session: &Session, meta: &PacketMeta, d: usize, old: u8) -> RstCheck {
    let closing = old == FW || old == CW || old == LA || old == TW || old == CL;
    if closing {
        return RstCheck::SkipWindow;
    }
    let receiver = &session.tcp[d ^ 1];
    let established = old == ES && session.flags & session_flags::ASSURED != 0;
    if receiver.flags & tcp_peer_flags::MAXACK_SET != 0 && session.last_index != tcp_index::SYN {
        let seq = meta.seq;
        if seq == 0 && !established {
            return RstCheck::CheckWindow;
        }
        if before(seq, receiver.maxack) {
            return RstCheck::Invalid;
        }
        if !established || seq == receiver.maxack {
            return RstCheck::CheckWindow;
        }
        if session.last_index == tcp_index::ACK
            && session.last_dir == d as u8
            && seq == session.last_end
        {
            return RstCheck::CheckWindow;
        }
        return RstCheck::KeepState;
    }
    let seen_reply = session.flags & session_flags::SEEN_REPLY != 0;
    let assured = session.flags & session_flags::ASSURED != 0;
    if ((seen_reply && session.last_index == tcp_index::SYN)
        || (!assured && session.last_index == tcp_index::ACK))
        && meta.ack == session.last_end
    {
        return RstCheck::SkipWindow;
    }
    if old == SS
        && session.last_index == tcp_index::ACK
        && session.last_dir == 1
        && meta.seq == session.last_ack
    {
        return RstCheck::SkipWindow;
    }
    RstCheck::CheckWindow
}

/// Handles a segment the table says to ignore. Returns true when it is a SYN-ACK
/// answering a SYN we ignored earlier (the endpoints are in sync and we are not): the
/// session then resynchronises on it as SYN_SENT -> SYN_RECV. Otherwise notes the
/// segment and returns false.
#[inline(always)]
fn ignore(session: &mut Session, meta: &PacketMeta, dir: Dir, index: u8, old: u8) -> bool {
    let d = dir.index() & 1;
    if index == tcp_index::SYNACK
        && session.last_index == tcp_index::SYN
        && session.last_dir != d as u8
        && meta.ack == session.last_end
    {
        let last = (session.last_dir & 1) as usize;
        let last_end = session.last_end;
        let last_win = session.last_win;
        let last_wscale = session.last_wscale;
        let last_flags = session.last_flags;
        let peer = &mut session.tcp[last];
        peer.end = last_end;
        peer.maxend = last_end;
        peer.maxwin = if last_win == 0 { 1 } else { last_win as u32 };
        peer.scale = last_wscale;
        peer.flags = last_flags & (tcp_peer_flags::WINDOW_SCALE | tcp_peer_flags::SACK_PERM);
        session.last_flags &= !LAST_CHALLENGE_ACK;
        session.tcp[d].reset();
        return true;
    }
    session.last_index = index;
    session.last_dir = d as u8;
    session.last_seq = meta.seq;
    session.last_end = segment_end(meta);
    session.last_win = meta.window;
    if index == tcp_index::SYN && dir == Dir::Original {
        session.last_flags = 0;
        session.last_wscale = 0;
        if meta.tcp_wscale != 0xff {
            session.last_flags |= tcp_peer_flags::WINDOW_SCALE;
            session.last_wscale = meta.tcp_wscale;
        }
        if meta.tcp_sack_perm {
            session.last_flags |= tcp_peer_flags::SACK_PERM;
        }
        if old == LA {
            session.last_flags |= LAST_CHALLENGE_ACK;
        }
    }
    if old == SS && index == tcp_index::ACK && dir == Dir::Reply {
        // Possibly a challenge ACK answering the SYN: an RST from the client may follow.
        session.last_ack = meta.ack;
    }
    false
}

/// What the window check concluded, as the kernel's `enum nf_ct_tcp_action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Window {
    /// In window: update state.
    Accept,
    /// Not in window but harmless (old data, late ACK): pass, change nothing.
    Ignore,
    /// Out of window: INVALID.
    Invalid,
}

/// The result of a failed check: liberal tracking turns it into an acceptance, as the
/// kernel's `nf_tcp_log_invalid()` does (and, like it, skips the state update).
#[inline(always)]
fn unless_liberal(sender_flags: u8, settings: &Settings, verdict: Window) -> Window {
    if sender_flags & tcp_peer_flags::BE_LIBERAL != 0
        || settings.has(settings_flags::TCP_LIBERAL)
        || !settings.has(settings_flags::TCP_WINDOW_CHECK)
    {
        Window::Accept
    } else {
        verdict
    }
}

/// Sets up a sender from its SYN or SYN-ACK, as `tcp_init_sender()`.
#[inline(always)]
fn init_sender(
    sender: &mut TcpPeer,
    receiver: &mut TcpPeer,
    meta: &PacketMeta,
    end: u32,
    d: usize,
) {
    sender.end = end;
    sender.maxend = end;
    sender.maxwin = (meta.window as u32).max(1);
    apply_syn_options(sender, meta);
    if d == 1 && sender.flags & receiver.flags & tcp_peer_flags::WINDOW_SCALE == 0 {
        sender.scale = 0;
        receiver.scale = 0;
    }
}

/// The kernel's `tcp_in_window()`: checks the segment against both sides' windows and
/// updates them. SACK blocks are not read: the acknowledgement number stands in for the
/// highest SACK edge.
#[inline(always)]
fn in_window(
    session: &mut Session,
    meta: &PacketMeta,
    dir: Dir,
    index: u8,
    settings: &Settings,
) -> Window {
    let d = dir.index() & 1;
    let state = session.state;
    let flags = meta.tcp_flags;
    let has_ack = flags & tcp_flags::ACK != 0;
    let has_syn = flags & tcp_flags::SYN != 0;
    let mut seq = meta.seq;
    let mut ack = meta.ack;
    let mut sack = ack;
    let mut win = meta.window as u32;
    let mut end = segment_end(meta);
    let (sender, receiver) = peers(&mut session.tcp, d);

    if sender.maxwin == 0 {
        if has_syn {
            init_sender(sender, receiver, meta, end, d);
            if !has_ack {
                return Window::Accept;
            }
        } else {
            sender.end = end;
            sender.maxwin = (win << (sender.scale & 15)).max(1);
            sender.maxend = end.wrapping_add(sender.maxwin);
            if receiver.maxwin == 0 {
                receiver.end = sack;
                receiver.maxend = sack;
            } else if sack == receiver.end.wrapping_add(1) {
                receiver.end = receiver.end.wrapping_add(1);
            } else if session.flags & session_flags::ADOPT_WINDOW != 0 && after(sack, receiver.end)
            {
                // Taken over without window data: this side acknowledges data the other
                // sent before the table knew the connection. Adopt that edge, once (this
                // branch runs only while the sender's window is unknown).
                receiver.end = sack;
                if after(sack, receiver.maxend) {
                    receiver.maxend = sack;
                }
            }
        }
    } else if has_syn && after(end, sender.end) && (state == SS || state == SR) {
        init_sender(sender, receiver, meta, end, d);
        if d == 1 && !has_ack {
            return Window::Accept;
        }
    }

    if !has_ack || (flags & tcp_flags::RST != 0 && ack == 0) {
        ack = receiver.end;
        sack = receiver.end;
    }
    if flags & tcp_flags::RST != 0 && seq == 0 && state == SS {
        seq = sender.end;
        end = sender.end;
    }

    let max_ack_window = sender.maxwin.max(MAX_ACK_WINDOW_CONST);
    let ack_above_lower = after(
        sack,
        receiver.end.wrapping_sub(max_ack_window).wrapping_sub(1),
    );
    if !before(seq, sender.maxend.wrapping_add(1)) {
        let overshot = end.wrapping_sub(sender.maxend).wrapping_add(1);
        let in_recv_win = receiver.maxwin != 0
            && after(
                end,
                sender.end.wrapping_sub(receiver.maxwin).wrapping_sub(1),
            );
        if in_recv_win
            && ack_above_lower
            && overshot <= receiver.maxwin
            && before(sack, receiver.end.wrapping_add(1))
        {
            sender.end = end;
            sender.flags |= tcp_peer_flags::DATA_UNACKNOWLEDGED;
            return unless_liberal(sender.flags, settings, Window::Ignore);
        }
        return unless_liberal(sender.flags, settings, Window::Invalid);
    }
    if !before(sack, receiver.end.wrapping_add(1)) {
        return unless_liberal(sender.flags, settings, Window::Invalid);
    }
    let in_recv_win = receiver.maxwin == 0
        || after(
            end,
            sender.end.wrapping_sub(receiver.maxwin).wrapping_sub(1),
        );
    if !in_recv_win || !ack_above_lower {
        return unless_liberal(sender.flags, settings, Window::Ignore);
    }

    if !has_syn {
        win <<= sender.scale & 15;
    }
    let swin = win.wrapping_add(sack.wrapping_sub(ack));
    if sender.maxwin < swin {
        sender.maxwin = swin;
    }
    if after(end, sender.end) {
        sender.end = end;
        sender.flags |= tcp_peer_flags::DATA_UNACKNOWLEDGED;
    }
    if has_ack {
        if sender.flags & tcp_peer_flags::MAXACK_SET == 0 {
            sender.maxack = ack;
            sender.flags |= tcp_peer_flags::MAXACK_SET;
        } else if after(ack, sender.maxack) {
            sender.maxack = ack;
        }
    }
    if receiver.maxwin != 0 && after(end, sender.maxend) {
        receiver.maxwin = receiver
            .maxwin
            .wrapping_add(end.wrapping_sub(sender.maxend));
    }
    if after(sack.wrapping_add(win), receiver.maxend.wrapping_sub(1)) {
        receiver.maxend = sack.wrapping_add(win);
        if win == 0 {
            receiver.maxend = receiver.maxend.wrapping_add(1);
        }
    }
    if ack == receiver.end {
        receiver.flags &= !tcp_peer_flags::DATA_UNACKNOWLEDGED;
    }
    if index == tcp_index::ACK {
        if session.last_dir == d as u8
            && session.last_seq == seq
            && session.last_ack == ack
            && session.last_end == end
            && session.last_win == meta.window
        {
            session.retrans = session.retrans.saturating_add(1);
        } else {
            session.last_dir = d as u8;
            session.last_seq = seq;
            session.last_ack = ack;
            session.last_end = end;
            session.last_win = meta.window;
            session.retrans = 0;
        }
    }
    Window::Accept
}

/// After an out-of-window FIN or RST answering one from the other side on an assured
/// connection, shortens its timeout so a dead connection does not linger for days, as
/// `nf_tcp_handle_invalid()`.
#[inline(always)]
fn handle_invalid(session: &mut Session, d: usize, index: u8, settings: &Settings, now: u64) {
    if session.flags & session_flags::ASSURED == 0 {
        return;
    }
    if index != tcp_index::RST && index != tcp_index::FIN {
        return;
    }
    if session.last_dir != d as u8
        && (session.last_index == tcp_index::FIN || session.last_index == tcp_index::RST)
    {
        let remaining = session.expires_ns.saturating_sub(now);
        let unack = settings.timeout(Timeout::TcpUnack);
        if remaining >= 120 * crate::wire::NS_PER_SEC && remaining > unack {
            session.expires_ns = now.saturating_add(unack);
        }
    } else {
        session.last_index = index;
        session.last_dir = d as u8;
    }
}

/// The timeout for a TCP state, as `nf_conntrack_tcp_packet()` chooses it.
#[inline(always)]
fn tcp_timeout(session: &Session, state: u8, index: u8, settings: &Settings) -> u64 {
    let base = settings.timeout_slot(state_timeout_slot(state));
    let retrans = settings.timeout(Timeout::TcpRetrans);
    let unack = settings.timeout(Timeout::TcpUnack);
    if session.retrans as u32 >= settings.max_retrans && base > retrans {
        retrans
    } else if index == tcp_index::RST {
        settings.timeout(Timeout::TcpClose)
    } else if (session.tcp[0].flags | session.tcp[1].flags) & tcp_peer_flags::DATA_UNACKNOWLEDGED
        != 0
        && base > unack
    {
        unack
    } else if session.last_win == 0 && base > retrans {
        retrans
    } else {
        base
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::{format, string::String, vec::Vec};

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn every_tracker_answer_survives_its_integer_encoding() {
        let answers = [
            Ok(Update::Tracked),
            Ok(Update::Ignored),
            Ok(Update::Kill),
            Ok(Update::Reopen),
            Err(Invalid::TcpFlags),
            Err(Invalid::TcpState),
            Err(Invalid::TcpWindow),
            Err(Invalid::Icmp),
        ];
        for answer in answers {
            assert_eq!(decode_update(encode_update(answer)), answer);
        }
        assert_eq!(decode_update(-1), Err(Invalid::TcpState));
    }
    use crate::packet::{InnerTuple, ipv4_mapped};
    use crate::wire::{FAMILY_IPV4, FAMILY_IPV6};

    const FIN: u8 = 0x01;
    const SYN: u8 = 0x02;
    const RST: u8 = 0x04;
    const PSH: u8 = 0x08;
    const ACK: u8 = 0x10;
    const URG: u8 = 0x20;
    const ECE: u8 = 0x40;
    const CWR: u8 = 0x80;

    /// The kernel's `enum tcp_conntrack` columns, in table order.
    const STATES: [TcpState; 10] = TcpState::ALL;

    /// What the kernel table says, written out independently of `TCP_TRANSITIONS`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Expect {
        To(TcpState),
        Invalid,
        Ignore,
    }

    fn decode(raw: u8) -> Expect {
        match raw {
            TCP_INVALID => Expect::Invalid,
            TCP_IGNORE => Expect::Ignore,
            n if n < 10 => Expect::To(TcpState::from_u8(n)),
            other => {
                panic!("transition table produced {other}, which is neither a state, sIV nor sIG")
            }
        }
    }

    /// `tcp_conntracks[dir][index][old]` from nf_conntrack_proto_tcp.c, row by row.
    fn kernel_transition(dir: Dir, index: u8, old: TcpState) -> Expect {
        use Expect::{Ignore as IG_, Invalid as IV_, To};
        use TcpState::*;
        match (dir, index) {
            (Dir::Original, tcp_index::SYN) => match old {
                None | SynSent | TimeWait | Close => To(SynSent),
                SynRecv | Established | FinWait | CloseWait | LastAck => IG_,
                SynSent2 => To(SynSent2),
            },
            (Dir::Original, tcp_index::SYNACK) => match old {
                SynRecv | SynSent2 => To(SynRecv),
                _ => IV_,
            },
            (_, tcp_index::FIN) => match old {
                SynRecv | Established => To(FinWait),
                FinWait | CloseWait | LastAck => To(LastAck),
                TimeWait => To(TimeWait),
                Close => To(Close),
                None | SynSent | SynSent2 => IV_,
            },
            (Dir::Original, tcp_index::ACK) => match old {
                None | SynRecv | Established => To(Established),
                SynSent | SynSent2 => IV_,
                FinWait | CloseWait => To(CloseWait),
                LastAck | TimeWait => To(TimeWait),
                Close => To(Close),
            },
            (_, tcp_index::RST) => match old {
                None => IV_,
                _ => To(Close),
            },
            (Dir::Reply, tcp_index::SYN) => match old {
                SynSent | SynSent2 => To(SynSent2),
                TimeWait => To(SynSent),
                _ => IV_,
            },
            (Dir::Reply, tcp_index::SYNACK) => match old {
                SynSent | SynSent2 => To(SynRecv),
                None => IV_,
                _ => IG_,
            },
            (Dir::Reply, tcp_index::ACK) => match old {
                None => IV_,
                SynSent | SynSent2 => IG_,
                SynRecv => To(SynRecv),
                Established => To(Established),
                FinWait | CloseWait => To(CloseWait),
                LastAck | TimeWait => To(TimeWait),
                Close => To(Close),
            },
            (_, tcp_index::NONE) => IV_,
            (_, other) => panic!("no such flag class {other}"),
        }
    }

    fn index_name(index: u8) -> &'static str {
        ["syn", "synack", "fin", "ack", "rst", "none"][index as usize]
    }

    #[test]
    fn tcp_transition_matches_the_nf_conntrack_table_in_both_directions() {
        let mut mismatches: Vec<String> = Vec::new();
        for dir in [Dir::Original, Dir::Reply] {
            for index in 0..=tcp_index::NONE {
                for old in STATES {
                    let expected = kernel_transition(dir, index, old);
                    let actual = decode(tcp_transition(dir, index, old as u8));
                    if expected != actual {
                        mismatches.push(format!(
                            "{dir:?} {} in {}: kernel {expected:?}, engine {actual:?}",
                            index_name(index),
                            old.name()
                        ));
                    }
                }
            }
        }
        assert!(
            mismatches.is_empty(),
            "transition table differs from nf_conntrack:\n{}",
            mismatches.join("\n")
        );
    }

    #[test]
    fn tcp_transition_padding_rows_and_columns_are_invalid() {
        for dir in [Dir::Original, Dir::Reply] {
            for index in 0..8u8 {
                for old in 0..16u8 {
                    if index <= tcp_index::NONE && old < 10 {
                        continue;
                    }
                    assert_eq!(
                        tcp_transition(dir, index, old),
                        TCP_INVALID,
                        "padding entry {dir:?} index {index} old {old} must be invalid"
                    );
                }
            }
        }
    }

    #[test]
    fn tcp_transition_never_indexes_out_of_bounds_for_any_byte() {
        for dir in [Dir::Original, Dir::Reply] {
            for index in 0..=255u8 {
                for old in 0..=255u8 {
                    let next = tcp_transition(dir, index, old);
                    assert!(next < 10 || next == TCP_INVALID || next == TCP_IGNORE);
                }
            }
        }
    }

    /// `get_conntrack_index()`: RST beats SYN beats FIN beats ACK.
    fn kernel_index(flags: u8) -> u8 {
        if flags & RST != 0 {
            tcp_index::RST
        } else if flags & SYN != 0 {
            if flags & ACK != 0 {
                tcp_index::SYNACK
            } else {
                tcp_index::SYN
            }
        } else if flags & FIN != 0 {
            tcp_index::FIN
        } else if flags & ACK != 0 {
            tcp_index::ACK
        } else {
            tcp_index::NONE
        }
    }

    #[test]
    fn tcp_index_classifies_every_flag_byte_like_get_conntrack_index() {
        for flags in 0..=255u8 {
            assert_eq!(tcp_index(flags), kernel_index(flags), "flags {flags:#04x}");
        }
    }

    #[test]
    fn tcp_index_examples() {
        assert_eq!(tcp_index(SYN), tcp_index::SYN);
        assert_eq!(tcp_index(SYN | ACK), tcp_index::SYNACK);
        assert_eq!(tcp_index(SYN | ACK | ECE | CWR), tcp_index::SYNACK);
        assert_eq!(tcp_index(FIN | ACK | PSH), tcp_index::FIN);
        assert_eq!(tcp_index(ACK | PSH | URG), tcp_index::ACK);
        assert_eq!(tcp_index(RST | ACK), tcp_index::RST);
        assert_eq!(tcp_index(RST | SYN | FIN), tcp_index::RST);
        assert_eq!(tcp_index(0), tcp_index::NONE);
        assert_eq!(tcp_index(PSH | URG), tcp_index::NONE);
    }

    /// `tcp_valid_flags[]` in `tcp_error()`, after masking ECE, CWR and PSH.
    fn kernel_flags_valid(flags: u8) -> bool {
        let significant = flags & !(ECE | CWR | PSH);
        [
            SYN,
            SYN | URG,
            SYN | ACK,
            RST,
            RST | ACK,
            FIN | ACK,
            FIN | ACK | URG,
            ACK,
            ACK | URG,
        ]
        .contains(&significant)
    }

    #[test]
    fn tcp_flags_valid_accepts_exactly_the_kernel_combinations_for_all_256_bytes() {
        let mut valid = 0;
        for flags in 0..=255u8 {
            assert_eq!(
                tcp_flags_valid(flags),
                kernel_flags_valid(flags),
                "flags {flags:#04x}"
            );
            if kernel_flags_valid(flags) {
                valid += 1;
            }
        }
        // Nine combinations, each with any of PSH, ECE and CWR.
        assert_eq!(valid, 9 * 8);
    }

    #[test]
    fn tcp_flags_valid_rejects_classic_scan_patterns() {
        for (name, flags) in [
            ("null", 0),
            ("xmas", FIN | PSH | URG),
            ("syn-fin", SYN | FIN),
            ("syn-rst", SYN | RST),
            ("fin alone", FIN),
            ("fin-rst", FIN | RST | ACK),
            ("all", 0xff),
            ("urg alone", URG),
            ("psh alone", PSH),
        ] {
            assert!(
                !tcp_flags_valid(flags),
                "{name} ({flags:#04x}) must be invalid"
            );
        }
        for flags in [
            SYN | ECE | CWR,
            SYN | ACK | ECE,
            ACK | PSH,
            FIN | ACK | PSH,
            RST | ACK | PSH,
        ] {
            assert!(tcp_flags_valid(flags), "{flags:#04x} must be valid");
        }
    }

    fn v4(a: [u8; 4]) -> [u8; 16] {
        ipv4_mapped(a)
    }

    fn v6(last: u8) -> [u8; 16] {
        let mut addr = [0u8; 16];
        addr[0] = 0x20;
        addr[1] = 0x01;
        addr[2] = 0x00;
        addr[3] = 0x02;
        addr[15] = last;
        addr
    }

    fn meta(
        family: u8,
        protocol: u8,
        src: [u8; 16],
        sport: u16,
        dst: [u8; 16],
        dport: u16,
    ) -> PacketMeta {
        PacketMeta {
            family,
            proto: protocol,
            src,
            dst,
            sport,
            dport,
            ..PacketMeta::default()
        }
    }

    fn reversed(m: &PacketMeta) -> PacketMeta {
        PacketMeta {
            src: m.dst,
            dst: m.src,
            sport: m.dport,
            dport: m.sport,
            ..*m
        }
    }

    #[test]
    fn flow_key_is_the_same_for_both_directions_of_a_tcp_flow() {
        let out = meta(
            FAMILY_IPV4,
            proto::TCP,
            v4([198, 18, 0, 1]),
            40000,
            v4([198, 18, 0, 2]),
            8080,
        );
        let back = reversed(&out);
        let (key_out, lo_out) = flow_key(&out);
        let (key_back, lo_back) = flow_key(&back);
        assert_eq!(key_out, key_back);
        assert_ne!(lo_out, lo_back, "src_is_lo must flip with the direction");
        assert!(lo_out, "198.18.0.1 sorts below 198.18.0.2");
        assert_eq!(key_out.addr_lo, v4([198, 18, 0, 1]));
        assert_eq!(key_out.addr_hi, v4([198, 18, 0, 2]));
        assert_eq!(key_out.port_lo, 40000);
        assert_eq!(key_out.port_hi, 8080);
        assert_eq!(key_out.proto, proto::TCP);
        assert_eq!(key_out.family, FAMILY_IPV4);
        assert_eq!(key_out._pad, [0; 2]);
    }

    #[test]
    fn flow_key_orders_by_address_before_port() {
        // The higher address has the lower port: the address decides.
        let m = meta(FAMILY_IPV6, proto::UDP, v6(9), 1, v6(3), 65535);
        let (key, src_is_lo) = flow_key(&m);
        assert!(!src_is_lo);
        assert_eq!((key.addr_lo, key.port_lo), (v6(3), 65535));
        assert_eq!((key.addr_hi, key.port_hi), (v6(9), 1));
    }

    #[test]
    fn flow_key_compares_addresses_bytewise_across_both_halves() {
        // Differ only in the first byte (high u64) and only in the last byte (low u64).
        let mut a = v6(1);
        let mut b = v6(1);
        a[0] = 0x10;
        b[0] = 0xfe;
        assert!(flow_key(&meta(FAMILY_IPV6, proto::TCP, a, 9, b, 1)).1);
        assert!(!flow_key(&meta(FAMILY_IPV6, proto::TCP, b, 1, a, 9)).1);
        let (c, d) = (v6(0x7f), v6(0x80));
        assert!(flow_key(&meta(FAMILY_IPV6, proto::TCP, c, 9, d, 1)).1);
        assert!(!flow_key(&meta(FAMILY_IPV6, proto::TCP, d, 1, c, 9)).1);
    }

    #[test]
    fn flow_key_between_ports_of_one_address_is_symmetric() {
        let host = v4([127, 0, 0, 1]);
        let m = meta(FAMILY_IPV4, proto::TCP, host, 50000, host, 22);
        let (key, src_is_lo) = flow_key(&m);
        let (key_back, back_is_lo) = flow_key(&reversed(&m));
        assert_eq!(key, key_back);
        assert!(!src_is_lo);
        assert!(back_is_lo);
        assert_eq!((key.port_lo, key.port_hi), (22, 50000));
    }

    #[test]
    fn flow_key_of_icmp_echo_request_and_reply_is_one_key() {
        for (family, protocol, a, b) in [
            (
                FAMILY_IPV4,
                proto::ICMP,
                v4([198, 18, 0, 1]),
                v4([198, 18, 0, 2]),
            ),
            (FAMILY_IPV6, proto::ICMPV6, v6(1), v6(2)),
        ] {
            // The request carries the id as sport and 0 as dport; so does the reply.
            let request = meta(family, protocol, a, 0x1234, b, 0);
            let reply = meta(family, protocol, b, 0x1234, a, 0);
            let (key_request, request_lo) = flow_key(&request);
            let (key_reply, reply_lo) = flow_key(&reply);
            assert_eq!(key_request, key_reply, "family {family}");
            assert_ne!(request_lo, reply_lo);
            assert_eq!((key_request.port_lo, key_request.port_hi), (0x1234, 0x1234));
            // A different id is a different flow.
            let other = meta(family, protocol, a, 0x1235, b, 0);
            assert_ne!(flow_key(&other).0, key_request);
        }
    }

    #[test]
    fn flow_key_ignores_ports_for_protocols_without_them() {
        let gre = meta(
            FAMILY_IPV4,
            47,
            v4([10, 0, 0, 2]),
            1234,
            v4([10, 0, 0, 1]),
            80,
        );
        let (key, src_is_lo) = flow_key(&gre);
        assert_eq!((key.port_lo, key.port_hi), (0, 0));
        assert!(!src_is_lo);
        assert_eq!(flow_key(&reversed(&gre)).0, key);
    }

    #[test]
    fn flow_key_separates_protocols_and_families() {
        let tcp = meta(
            FAMILY_IPV4,
            proto::TCP,
            v4([1, 1, 1, 1]),
            53,
            v4([2, 2, 2, 2]),
            53,
        );
        let udp = PacketMeta {
            proto: proto::UDP,
            ..tcp
        };
        assert_ne!(flow_key(&tcp).0, flow_key(&udp).0);
        let mapped = PacketMeta {
            family: FAMILY_IPV6,
            ..tcp
        };
        assert_ne!(flow_key(&tcp).0, flow_key(&mapped).0);
    }

    #[test]
    fn embedded_key_of_an_icmp_error_is_the_key_of_the_quoted_flow() {
        let client = v4([198, 18, 0, 1]);
        let server = v4([198, 18, 0, 2]);
        let flow = meta(FAMILY_IPV4, proto::UDP, client, 40000, server, 53);
        // The error comes from a router and quotes the client's datagram.
        let mut error = meta(
            FAMILY_IPV4,
            proto::ICMP,
            v4([198, 18, 0, 254]),
            0,
            client,
            0,
        );
        error.icmp_kind = IcmpKind::Error;
        error.icmp_type = 3;
        error.inner = InnerTuple {
            src: client,
            dst: server,
            sport: 40000,
            dport: 53,
            proto: proto::UDP,
            icmp_kind: IcmpKind::None,
        };
        assert_eq!(embedded_key(&error), flow_key(&flow).0);
        // Quoting the reply direction finds the same flow.
        error.inner = InnerTuple {
            src: server,
            dst: client,
            sport: 53,
            dport: 40000,
            ..error.inner
        };
        assert_eq!(embedded_key(&error), flow_key(&flow).0);
    }

    #[test]
    fn embedded_key_of_a_quoted_echo_request_is_the_echo_flow_key() {
        let a = v6(1);
        let b = v6(2);
        let echo = meta(FAMILY_IPV6, proto::ICMPV6, a, 77, b, 0);
        let mut error = meta(FAMILY_IPV6, proto::ICMPV6, v6(0xfe), 0, a, 0);
        error.icmp_kind = IcmpKind::Error;
        error.inner = InnerTuple {
            src: a,
            dst: b,
            sport: 77,
            dport: 0,
            proto: proto::ICMPV6,
            icmp_kind: IcmpKind::Request,
        };
        assert_eq!(embedded_key(&error), flow_key(&echo).0);
    }

    #[test]
    fn direction_follows_the_originator_recorded_in_the_session() {
        let m = meta(
            FAMILY_IPV4,
            proto::TCP,
            v4([9, 9, 9, 9]),
            1000,
            v4([1, 1, 1, 1]),
            80,
        );
        let (_, src_is_lo) = flow_key(&m);
        let mut session = Session::default();
        new_session(
            &mut session,
            &PacketMeta {
                tcp_flags: SYN,
                ..m
            },
            src_is_lo,
            &Settings::default(),
            5,
        )
        .expect("a SYN starts a session");
        assert_eq!(direction(&session, src_is_lo), Dir::Original);
        assert_eq!(direction(&session, !src_is_lo), Dir::Reply);
        assert_eq!(session.created_ns, 5);
    }

    #[test]
    fn state_for_is_new_until_a_reply_is_seen_and_established_for_replies() {
        let mut session = Session::default();
        assert_eq!(state_for(&session, Dir::Original), CtState::New);
        assert_eq!(state_for(&session, Dir::Reply), CtState::Established);
        session.flags |= session_flags::SEEN_REPLY;
        assert_eq!(state_for(&session, Dir::Original), CtState::Established);
    }

    #[test]
    fn new_session_refuses_what_cannot_start_a_flow() {
        let settings = Settings::default();
        let base = meta(
            FAMILY_IPV4,
            proto::TCP,
            v4([1, 0, 0, 1]),
            1,
            v4([1, 0, 0, 2]),
            2,
        );
        let mut session = Session::default();
        for (flags, why) in [
            (ACK, Invalid::TcpState),
            (SYN | ACK, Invalid::TcpState),
            (FIN | ACK, Invalid::TcpState),
            (RST, Invalid::TcpState),
            (RST | ACK, Invalid::TcpState),
            (SYN | FIN, Invalid::TcpFlags),
            (0, Invalid::TcpFlags),
        ] {
            let m = PacketMeta {
                tcp_flags: flags,
                ..base
            };
            assert_eq!(
                new_session(&mut session, &m, true, &settings, 0),
                Err(why),
                "flags {flags:#04x}"
            );
        }
        let syn = PacketMeta {
            tcp_flags: SYN,
            ..base
        };
        assert_eq!(new_session(&mut session, &syn, true, &settings, 0), Ok(()));
        for kind in [IcmpKind::Reply, IcmpKind::Other, IcmpKind::Error] {
            let m = PacketMeta {
                proto: proto::ICMP,
                icmp_kind: kind,
                ..base
            };
            assert_eq!(
                new_session(&mut session, &m, true, &settings, 0),
                Err(Invalid::Icmp),
                "{kind:?}"
            );
        }
    }

    /// A session as takeover builds it without window data: established, both windows
    /// unknown, scales known.
    fn taken_over(adopt: bool) -> Session {
        let mut session = Session {
            state: TcpState::Established as u8,
            flags: session_flags::ORIG_IS_LO | session_flags::SEEN_REPLY | session_flags::ASSURED,
            expires_ns: u64::MAX,
            ..Session::default()
        };
        for peer in &mut session.tcp {
            peer.scale = 7;
            peer.flags = tcp_peer_flags::WINDOW_SCALE | tcp_peer_flags::SACK_PERM;
        }
        if adopt {
            session.flags |= session_flags::ADOPT_WINDOW;
        }
        session
    }

    #[test]
    fn adopt_window_accepts_acks_of_data_sent_before_takeover_once_per_side() {
        let settings = Settings {
            flags: settings_flags::TCP_WINDOW_CHECK,
            ..Settings::default()
        };
        let a_to_b = PacketMeta {
            tcp_flags: ACK | PSH,
            seq: 1000,
            ack: 5000,
            window: 100,
            payload_len: 100,
            ..meta(
                FAMILY_IPV4,
                proto::TCP,
                v4([1, 0, 0, 1]),
                40000,
                v4([1, 0, 0, 2]),
                22,
            )
        };
        // B acknowledges 1300: A had sent 200 bytes more before the table knew the flow.
        let b_to_a = PacketMeta {
            seq: 5000,
            ack: 1300,
            payload_len: 0,
            tcp_flags: ACK,
            ..reversed(&a_to_b)
        };
        for adopt in [false, true] {
            let mut session = taken_over(adopt);
            assert_eq!(
                update(&mut session, &a_to_b, Dir::Original, &settings, 1),
                Ok(Update::Tracked)
            );
            assert_eq!(session.tcp[0].end, 1100);
            assert_eq!(session.tcp[0].maxwin, 100 << 7, "the known scale applies");
            let answer = update(&mut session, &b_to_a, Dir::Reply, &settings, 2);
            if !adopt {
                assert_eq!(answer, Err(Invalid::TcpWindow), "without the flag: strict");
                continue;
            }
            assert_eq!(answer, Ok(Update::Tracked));
            assert_eq!(session.tcp[0].end, 1300, "A's edge adopted from B's ACK");
            assert_eq!(session.tcp[1].end, 5000);
            // Both sides are known now: an ACK of data A never sent is out of window.
            let beyond = PacketMeta {
                ack: 9000,
                ..b_to_a
            };
            assert_eq!(
                update(&mut session, &beyond, Dir::Reply, &settings, 3),
                Err(Invalid::TcpWindow),
                "the flag acts once per side"
            );
            // The stream itself goes on.
            let next = PacketMeta {
                seq: 1300,
                ack: 5000,
                ..a_to_b
            };
            assert_eq!(
                update(&mut session, &next, Dir::Original, &settings, 4),
                Ok(Update::Tracked)
            );
        }
    }

    #[test]
    fn new_session_picks_up_a_mid_stream_ack_only_with_tcp_loose() {
        let mut settings = Settings::default();
        let ack = PacketMeta {
            tcp_flags: ACK,
            seq: 1000,
            ack: 2000,
            window: 500,
            ..meta(
                FAMILY_IPV4,
                proto::TCP,
                v4([1, 0, 0, 1]),
                1,
                v4([1, 0, 0, 2]),
                2,
            )
        };
        let mut session = Session::default();
        assert_eq!(
            new_session(&mut session, &ack, true, &settings, 0),
            Err(Invalid::TcpState)
        );
        settings.flags |= settings_flags::TCP_LOOSE;
        assert_eq!(new_session(&mut session, &ack, true, &settings, 0), Ok(()));
        assert_ne!(session.flags & session_flags::PICKED_UP, 0);
        assert_eq!(session.tcp[0].end, 1000);
        assert_eq!(session.tcp[0].maxwin, 500);
        assert_eq!(session.tcp[0].maxend, 1500);
        assert_ne!(session.tcp[0].flags & tcp_peer_flags::BE_LIBERAL, 0);
        assert_ne!(session.tcp[1].flags & tcp_peer_flags::BE_LIBERAL, 0);
        // A FIN or RST still cannot be picked up.
        for flags in [FIN | ACK, RST, RST | ACK] {
            let m = PacketMeta {
                tcp_flags: flags,
                ..ack
            };
            assert_eq!(
                new_session(&mut session, &m, true, &settings, 0),
                Err(Invalid::TcpState)
            );
        }
    }

    #[test]
    fn state_timeout_slot_maps_each_tcp_state_to_its_timeout() {
        use TcpState::*;
        for (state, slot) in [
            (SynSent, Timeout::TcpSynSent),
            (SynRecv, Timeout::TcpSynRecv),
            (Established, Timeout::TcpEstablished),
            (FinWait, Timeout::TcpFinWait),
            (CloseWait, Timeout::TcpCloseWait),
            (LastAck, Timeout::TcpLastAck),
            (TimeWait, Timeout::TcpTimeWait),
            (Close, Timeout::TcpClose),
            (SynSent2, Timeout::TcpSynSent2),
        ] {
            assert_eq!(
                state_timeout_slot(state as u8),
                slot as u8,
                "{}",
                state.name()
            );
        }
        for garbage in 10..=255u8 {
            assert!((state_timeout_slot(garbage) as usize) < Timeout::COUNT);
        }
    }

    fn arb_addr(family: u8) -> BoxedStrategy<[u8; 16]> {
        if family == FAMILY_IPV4 {
            any::<[u8; 4]>().prop_map(ipv4_mapped).boxed()
        } else {
            any::<[u8; 16]>().boxed()
        }
    }

    fn arb_meta() -> impl Strategy<Value = PacketMeta> {
        (
            prop_oneof![Just(FAMILY_IPV4), Just(FAMILY_IPV6)],
            prop_oneof![
                Just(proto::TCP),
                Just(proto::UDP),
                Just(proto::ICMP),
                Just(proto::ICMPV6),
                any::<u8>()
            ],
            any::<u16>(),
            any::<u16>(),
            any::<bool>(),
        )
            .prop_flat_map(|(family, protocol, sport, dport, same_addr)| {
                (arb_addr(family), arb_addr(family)).prop_map(move |(src, dst)| {
                    let dst = if same_addr { src } else { dst };
                    meta(family, protocol, src, sport, dst, dport)
                })
            })
    }

    /// TCP segments with SYN and any other flags, options, lengths and numbers.
    fn arb_syn() -> impl Strategy<Value = PacketMeta> {
        (
            arb_meta(),
            any::<u8>(),
            (any::<u32>(), any::<u32>(), any::<u16>()),
            (any::<u8>(), any::<bool>(), 0u32..65_536, 20u8..61),
        )
            .prop_map(
                |(m, flags, (seq, ack, window), (wscale, sack, payload, header))| PacketMeta {
                    proto: proto::TCP,
                    tcp_flags: flags | SYN,
                    seq,
                    ack,
                    window,
                    tcp_wscale: wscale,
                    tcp_sack_perm: sack,
                    payload_len: payload,
                    tcp_header_len: header,
                    ..m
                },
            )
    }

    proptest! {
        #[test]
        fn a_connection_attempt_always_builds_its_session(m in arb_syn(), flags in 0u32..8, now in any::<u64>()) {
            let settings = Settings { flags, ..Settings::default() };
            let mut session = Session::default();
            let built = new_session(&mut session, &m, true, &settings, now)
                .and_then(|()| update(&mut session, &m, Dir::Original, &settings, now));
            if crate::presence::is_connection_attempt(&m) {
                prop_assert!(built.is_ok(), "{:?} for flags {:#x}", built, m.tcp_flags);
            }
        }

        #[test]
        fn flow_key_of_the_reversed_packet_is_the_same_key(m in arb_meta()) {
            let is_icmp = m.proto == proto::ICMP || m.proto == proto::ICMPV6;
            // ICMP queries: both directions carry the id in sport.
            let back = if is_icmp { PacketMeta { src: m.dst, dst: m.src, ..m } } else { reversed(&m) };
            let (key, lo) = flow_key(&m);
            let (key_back, lo_back) = flow_key(&back);
            prop_assert_eq!(key, key_back);
            let degenerate = m.src == m.dst && (is_icmp || m.sport == m.dport || !matches!(m.proto, proto::TCP | proto::UDP));
            if !degenerate {
                prop_assert_ne!(lo, lo_back);
            }
            prop_assert_eq!(key._pad, [0u8; 2]);
            // The key holds the packet's endpoints, lower one first.
            let (lo_addr, hi_addr) = if lo { (m.src, m.dst) } else { (m.dst, m.src) };
            prop_assert_eq!(key.addr_lo, lo_addr);
            prop_assert_eq!(key.addr_hi, hi_addr);
            prop_assert!(key.addr_lo <= key.addr_hi);
        }
    }
}
