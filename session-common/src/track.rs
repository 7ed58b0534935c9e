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
    endpoints_key(meta.family, inner.proto, &inner.src, sport, &inner.dst, dport).0
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

#[inline(always)]
fn endpoints_key(
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
        [SS, SS, IG, IG, IG, IG, IG, SS, SS, S2, IV, IV, IV, IV, IV, IV],
        [IV, IV, SR, IV, IV, IV, IV, IV, IV, SR, IV, IV, IV, IV, IV, IV],
        [IV, IV, FW, FW, LA, LA, LA, TW, CL, IV, IV, IV, IV, IV, IV, IV],
        [ES, IV, ES, ES, CW, CW, TW, TW, CL, IV, IV, IV, IV, IV, IV, IV],
        [IV, CL, CL, CL, CL, CL, CL, CL, CL, CL, IV, IV, IV, IV, IV, IV],
        [IV; 16],
        [IV; 16],
        [IV; 16],
    ],
    [
        [IV, S2, IV, IV, IV, IV, IV, SS, IV, S2, IV, IV, IV, IV, IV, IV],
        [IV, SR, IG, IG, IG, IG, IG, IG, IG, SR, IV, IV, IV, IV, IV, IV],
        [IV, IV, FW, FW, LA, LA, LA, TW, CL, IV, IV, IV, IV, IV, IV, IV],
        [IV, IG, SR, ES, CW, CW, TW, TW, CL, IG, IV, IV, IV, IV, IV, IV],
        [IV, CL, CL, CL, CL, CL, CL, CL, CL, CL, IV, IV, IV, IV, IV, IV],
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

/// `after()` in the kernel.
#[inline(always)]
fn after(a: u32, b: u32) -> bool {
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
    session.reset();
    session.created_ns = now;
    session.flags = if src_is_lo { session_flags::ORIG_IS_LO } else { 0 };
    session.last_index = tcp_index::NONE;
    match meta.proto {
        proto::TCP => {
            if !tcp_flags_valid(meta.tcp_flags) {
                return Err(Invalid::TcpFlags);
            }
            let index = tcp_index(meta.tcp_flags);
            let first = tcp_transition(Dir::Original, index, TcpState::None as u8);
            let window = if meta.window == 0 { 1 } else { meta.window as u32 };
            if first == SS {
                let sender = &mut session.tcp[0];
                sender.end = segment_end(meta);
                sender.maxwin = window;
                sender.maxend = sender.end;
                apply_syn_options(sender, meta);
            } else if first < TCP_INVALID && settings.has(settings_flags::TCP_LOOSE) {
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
        let closing = (session.tcp[0].flags | session.tcp[1].flags) & tcp_peer_flags::CLOSE_INIT != 0;
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
    if new == SR && d == 1 && index == tcp_index::ACK && session.last_flags & LAST_SIMULTANEOUS_OPEN != 0 {
        new = ES;
    }
    if new == CL && index == tcp_index::RST {
        let receiver = &session.tcp[d ^ 1];
        if receiver.flags & tcp_peer_flags::MAXACK_SET != 0 {
            if before(meta.seq, receiver.maxack) {
                return Err(Invalid::TcpWindow);
            }
            let exact = meta.seq == receiver.maxack;
            let in_train = session.last_index == tcp_index::ACK
                && session.last_dir == d as u8
                && meta.seq == session.last_end;
            if old == ES && !exact && !in_train {
                new = old;
            }
        }
        let seen_reply = session.flags & session_flags::SEEN_REPLY != 0;
        let assured = session.flags & session_flags::ASSURED != 0;
        if ((seen_reply && session.last_index == tcp_index::SYN)
            || (!assured && session.last_index == tcp_index::ACK))
            && meta.ack == session.last_end
        {
            skip_window = true;
        }
    }
    if !skip_window && !in_window(session, meta, dir, index, old, settings) {
        return Err(Invalid::TcpWindow);
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
    false
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
    old: u8,
    settings: &Settings,
) -> bool {
    let d = dir.index() & 1;
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
            sender.end = end;
            sender.maxend = end;
            sender.maxwin = win.max(1);
            apply_syn_options(sender, meta);
            if sender.flags & receiver.flags & tcp_peer_flags::WINDOW_SCALE == 0 {
                sender.scale = 0;
                receiver.scale = 0;
            }
            if !has_ack {
                return true;
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
            }
        }
    } else if ((old == SS && d == 0) || (old == SR && d == 1)) && after(end, sender.end) {
        sender.end = end;
        sender.maxend = end;
        sender.maxwin = win.max(1);
        apply_syn_options(sender, meta);
    }

    if !has_ack || (flags & tcp_flags::RST != 0 && ack == 0) {
        ack = receiver.end;
        sack = receiver.end;
    }
    if flags & tcp_flags::RST != 0 && seq == 0 && old == SS {
        seq = sender.end;
        end = sender.end;
    }

    let in_recv_win = receiver.maxwin == 0
        || after(end, sender.end.wrapping_sub(receiver.maxwin).wrapping_sub(1));
    let max_ack_window = sender.maxwin.max(MAX_ACK_WINDOW_CONST);
    let acceptable = before(seq, sender.maxend.wrapping_add(1))
        && in_recv_win
        && before(sack, receiver.end.wrapping_add(1))
        && after(sack, receiver.end.wrapping_sub(max_ack_window).wrapping_sub(1));

    if !acceptable {
        return sender.flags & tcp_peer_flags::BE_LIBERAL != 0
            || settings.has(settings_flags::TCP_LIBERAL)
            || !settings.has(settings_flags::TCP_WINDOW_CHECK);
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
        receiver.maxwin = receiver.maxwin.wrapping_add(end.wrapping_sub(sender.maxend));
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
    true
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
    } else if (session.tcp[0].flags | session.tcp[1].flags) & tcp_peer_flags::DATA_UNACKNOWLEDGED != 0
        && base > unack
    {
        unack
    } else if session.last_win == 0 && base > retrans {
        retrans
    } else {
        base
    }
}
