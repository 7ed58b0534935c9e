//! Which local changes the peer has not seen: per flow key, what the peer is known to
//! hold (sent by this side, or installed from the peer). A periodic scan of the table
//! diffed against it yields the changes to send, so many updates of one session between
//! two scans collapse into one (pfsync's `maxupd`), and a session installed from the
//! peer is never sent back unless this side changed it. Pure: the caller reads the table
//! and passes `now`.

use std::collections::{HashMap, HashSet};

use session_common::{
    record::{RECORD_SESSION_FLAGS, SessionRecord},
    track::after,
    wire::{FlowKey, Session, session_flags},
};

/// What of a session matters to a standby.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Digest {
    state: u8,
    flags: u8,
    expires_ns: u64,
    edges: [[u32; 4]; 2],
}

impl Digest {
    fn of(session: &Session) -> Digest {
        Digest {
            state: session.state,
            flags: session.flags & RECORD_SESSION_FLAGS,
            expires_ns: session.expires_ns,
            edges: session
                .tcp
                .map(|peer| [peer.end, peer.maxend, peer.maxwin, peer.maxack]),
        }
    }

    /// Whether the change from `self` to `now` must reach the peer at the next scan
    /// (state or flags), rather than at the next refresh (timeout, window edges).
    fn major(&self, now: &Digest) -> bool {
        self.state != now.state || self.flags != now.flags
    }
}

struct Known {
    digest: Digest,
    from_peer: bool,
    sent_at: u64,
}

/// A change to send: the session under a key, or `None` when it is gone.
pub type Outgoing = (FlowKey, Option<Session>);

/// What the peer holds of this side's table, as far as this side knows.
pub struct Tracker {
    known: HashMap<FlowKey, Known>,
    refresh_ns: u64,
    stale: Option<HashSet<FlowKey>>,
}

impl Tracker {
    /// A tracker that sends a session's refreshed timeout and advanced window edges at
    /// most once per `refresh_ns`; state and flag changes go at the next scan.
    pub fn new(refresh_ns: u64) -> Tracker {
        Tracker {
            known: HashMap::new(),
            refresh_ns,
            stale: None,
        }
    }

    /// Sessions the peer is known to hold.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// Whether the peer is known to hold nothing.
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// The changes of `live` (the table's sessions that have not expired at `now`) that
    /// the peer has not seen; records them as sent.
    pub fn changes(&mut self, live: &[(FlowKey, Session)], now: u64) -> Vec<Outgoing> {
        let mut out = self.changes_of(live, now);
        let present: HashSet<FlowKey> = live.iter().map(|(key, _)| *key).collect();
        self.known.retain(|key, known| {
            let keep = present.contains(key);
            if !keep && !known.from_peer {
                out.push((*key, None));
            }
            keep
        });
        out
    }

    /// The changes of just these sessions (live at `now`) that the peer has not seen,
    /// recorded as sent: what the kernel reported new, changed or closed, sent before the next
    /// scan. Sessions not given are left as they are.
    pub fn changes_of(&mut self, sessions: &[(FlowKey, Session)], now: u64) -> Vec<Outgoing> {
        let mut out = Vec::new();
        for (key, session) in sessions {
            let digest = Digest::of(session);
            let send = match self.known.get(key) {
                None => true,
                Some(known) if known.digest == digest => false,
                Some(known) => {
                    known.digest.major(&digest)
                        || now.saturating_sub(known.sent_at) >= self.refresh_ns
                }
            };
            if send {
                self.known.insert(
                    *key,
                    Known {
                        digest,
                        from_peer: false,
                        sent_at: now,
                    },
                );
                out.push((*key, Some(*session)));
            }
        }
        out
    }

    /// Before a full resync: forgets what was sent, so the next scan sends every local
    /// session again; what was installed from the peer stays unsent.
    pub fn forget_sent(&mut self) {
        self.known.retain(|_, known| known.from_peer);
    }

    /// `session` was installed under `key` from the peer at `now`. A session this side has
    /// sent (its own traffic made or changed it) stays this side's as well: when both
    /// firewalls carried a connection (a failover and back, a partition) and resync at
    /// once, each installs the other's copy, and were it then the peer's on both sides,
    /// neither would send it again and a later resync from either would delete it on the
    /// other.
    pub fn installed(&mut self, key: FlowKey, session: &Session, now: u64) {
        if let Some(stale) = &mut self.stale {
            stale.remove(&key);
        }
        let from_peer = self.known.get(&key).is_none_or(|known| known.from_peer);
        self.known.insert(
            key,
            Known {
                digest: Digest::of(session),
                from_peer,
                sent_at: now,
            },
        );
    }

    /// The peer deleted the session under `key` (and so did this side).
    pub fn deleted_by_peer(&mut self, key: &FlowKey) {
        if let Some(stale) = &mut self.stale {
            stale.remove(key);
        }
        self.known.remove(key);
    }

    /// The peer began a full resync: what it sent before and does not send again is gone.
    pub fn resync_started(&mut self) {
        self.stale = Some(
            self.known
                .iter()
                .filter(|(_, known)| known.from_peer)
                .map(|(key, _)| *key)
                .collect(),
        );
    }

    /// The peer's full resync ended: the keys installed from it that the resync did not
    /// carry, to be deleted.
    pub fn resync_ended(&mut self) -> Vec<FlowKey> {
        let stale: Vec<FlowKey> = self.stale.take().unwrap_or_default().into_iter().collect();
        for key in &stale {
            self.known.remove(key);
        }
        stale
    }
}

/// The session to store for a record received from the peer at `now`, admitted by
/// `rule`, first seen on `ifindex`, given the session the table holds under its key
/// (`local`). The received window edges are forgotten (`ADOPT_WINDOW`): they are as old
/// as the sync interval, and a standby that takes over would find a busy connection's
/// segments beyond them; the first segment each way after a takeover sets them, as after
/// a restore. A live local session that has learnt its own edges keeps them, unless the
/// peer saw later segments than it did: then the peer carried the connection meanwhile
/// (this firewall was the standby), and the local edges are too old to judge the
/// segments that follow a failback.
pub fn received_session(
    record: &SessionRecord,
    ifindex: u32,
    rule: u16,
    local: Option<&Session>,
    now: u64,
) -> Option<Session> {
    let received = *record;
    let mut record = *record;
    record.forget_edges();
    let mut session = record.to_session(now, 0, ifindex, rule)?;
    if let Some(local) = local.filter(|local| {
        local.expires_ns > now
            && local.flags & session_flags::ADOPT_WINDOW == 0
            && local.state != 0
            && !peer_saw_later_segments(&received, local)
    }) && record.key.proto == session_common::wire::proto::TCP
    {
        session.tcp = local.tcp;
        session.last_seq = local.last_seq;
        session.last_ack = local.last_ack;
        session.last_end = local.last_end;
        session.last_win = local.last_win;
        session.last_dir = local.last_dir;
        session.last_index = local.last_index;
        session.flags &= !session_flags::ADOPT_WINDOW;
    }
    Some(session)
}

/// Whether the peer's record carries a window edge it learnt itself (from the connection's
/// segments: its largest window is known) beyond the local session's, in either direction.
/// `ADOPT_WINDOW` says nothing here: it stays set on a session that was taken over and has
/// learnt its edges since.
fn peer_saw_later_segments(record: &SessionRecord, local: &Session) -> bool {
    record
        .tcp
        .iter()
        .zip(&local.tcp)
        .any(|(peer, here)| peer.maxwin != 0 && after(peer.end, here.end))
}

#[cfg(test)]
mod tests {
    use session_common::{
        record::NO_NAME,
        wire::{TcpPeer, TcpState},
    };

    use super::*;
    use crate::sync::wire::tests_support::key_v4;

    const S: u64 = 1_000_000_000;

    fn session(expires: u64, end: u32) -> Session {
        Session {
            created_ns: 1,
            expires_ns: expires,
            state: TcpState::Established as u8,
            flags: session_flags::SEEN_REPLY | session_flags::ASSURED | session_flags::PROTECTED,
            tcp: [TcpPeer {
                end,
                maxend: end + 1000,
                maxwin: 1000,
                maxack: end,
                ..TcpPeer::default()
            }; 2],
            ..Session::default()
        }
    }

    #[test]
    fn new_changed_and_gone_sessions_are_sent_once() {
        let mut tracker = Tracker::new(S);
        let (a, b) = (key_v4(2, 1), key_v4(3, 1));
        let sent = tracker.changes(&[(a, session(100 * S, 1)), (b, session(100 * S, 1))], S);
        assert_eq!(sent.len(), 2);
        assert!(
            tracker
                .changes(&[(a, session(100 * S, 1)), (b, session(100 * S, 1))], S)
                .is_empty(),
            "nothing changed"
        );
        let mut closing = session(100 * S, 1);
        closing.state = TcpState::FinWait as u8;
        let sent = tracker.changes(&[(a, closing)], S + 1);
        assert_eq!(sent, vec![(a, Some(closing)), (b, None)]);
        assert!(tracker.changes(&[(a, closing)], S + 2).is_empty());
    }

    #[test]
    fn sessions_reported_by_the_kernel_go_at_once_and_not_again_at_the_scan() {
        let mut tracker = Tracker::new(S);
        let (a, b) = (key_v4(2, 1), key_v4(3, 1));
        let live = [(a, session(100 * S, 1)), (b, session(100 * S, 1))];
        assert_eq!(
            tracker.changes_of(&live[..1], 1),
            vec![(a, Some(live[0].1))]
        );
        assert_eq!(tracker.changes(&live, 2), vec![(b, Some(live[1].1))]);
    }

    #[test]
    fn refreshed_timeouts_and_edges_collapse_into_one_update_per_refresh() {
        let mut tracker = Tracker::new(S);
        let a = key_v4(2, 1);
        tracker.changes(&[(a, session(100 * S, 1))], 0);
        let mut sent = 0;
        for step in 1..=20u64 {
            let now = step * S / 10;
            sent += tracker
                .changes(&[(a, session(100 * S + now, step as u32))], now)
                .len();
        }
        assert_eq!(
            sent, 2,
            "20 scans over 2 s of a busy flow: one update a second"
        );
    }

    #[test]
    fn what_was_installed_from_the_peer_is_never_sent_back() {
        let mut tracker = Tracker::new(S);
        let a = key_v4(2, 1);
        let installed = session(100 * S, 0);
        tracker.installed(a, &installed, 0);
        assert!(tracker.changes(&[(a, installed)], 5 * S).is_empty());
        tracker.forget_sent();
        assert!(tracker.changes(&[(a, installed)], 6 * S).is_empty());
        assert!(
            tracker.changes(&[], 7 * S).is_empty(),
            "its expiry is the peer's too"
        );
        tracker.installed(a, &installed, 8 * S);
        let mut used = installed;
        used.tcp[0].end = 77;
        assert_eq!(
            tracker.changes(&[(a, used)], 20 * S),
            vec![(a, Some(used))],
            "changed here after a takeover: sent"
        );
    }

    #[test]
    fn a_resync_deletes_what_it_did_not_carry() {
        let mut tracker = Tracker::new(S);
        let (a, b, mine) = (key_v4(2, 1), key_v4(3, 1), key_v4(4, 1));
        tracker.installed(a, &session(100 * S, 0), 0);
        tracker.installed(b, &session(100 * S, 0), 0);
        let installed = session(100 * S, 0);
        tracker.changes(&[(a, installed), (b, installed), (mine, installed)], 0);
        tracker.resync_started();
        tracker.installed(a, &session(100 * S, 0), 1);
        assert_eq!(tracker.resync_ended(), vec![b]);
        assert_eq!(tracker.len(), 2);
    }

    #[test]
    fn a_connection_both_sides_carried_survives_their_resyncs() {
        // Each side sent its own copy of `a` (both carried it), then both resync at once.
        let (mut one, mut two) = (Tracker::new(S), Tracker::new(S));
        let a = key_v4(2, 1);
        let (copy_one, copy_two) = (session(100 * S, 500), session(100 * S, 900));
        one.changes(&[(a, copy_one)], 0);
        two.changes(&[(a, copy_two)], 0);
        one.forget_sent();
        two.forget_sent();
        let to_two = one.changes(&[(a, copy_one)], S);
        let to_one = two.changes(&[(a, copy_two)], S);
        assert_eq!(
            (to_two.len(), to_one.len()),
            (1, 1),
            "each resync carries it"
        );
        one.resync_started();
        one.installed(a, &copy_two, S);
        assert!(one.resync_ended().is_empty());
        two.resync_started();
        two.installed(a, &copy_one, S);
        assert!(two.resync_ended().is_empty());
        // Later resyncs carry it again, so neither side deletes it.
        one.forget_sent();
        assert_eq!(one.changes(&[(a, copy_two)], 2 * S).len(), 1);
        two.resync_started();
        two.installed(a, &copy_two, 2 * S);
        assert!(two.resync_ended().is_empty(), "still carried, still held");
    }

    #[test]
    fn received_sessions_adopt_their_edges_unless_live_here() {
        let a = key_v4(2, 1);
        let record = SessionRecord::from_session(&a, &session(10 * S, 500), S, NO_NAME, NO_NAME)
            .expect("live");
        let fresh = received_session(&record, 3, 7, None, 100 * S).expect("live");
        assert_eq!(
            fresh.expires_ns,
            109 * S,
            "time left carried, not the instant"
        );
        assert_eq!(fresh.tcp[0].end, 0);
        assert_ne!(fresh.flags & session_flags::ADOPT_WINDOW, 0);
        assert_eq!(fresh.rule_id, 7);
        let local = session(200 * S, 9000);
        let merged = received_session(&record, 3, 7, Some(&local), 100 * S).expect("live");
        assert_eq!(merged.tcp, local.tcp);
        assert_eq!(merged.flags & session_flags::ADOPT_WINDOW, 0);
        // The peer carried the connection beyond the local edges (a failover, then a
        // failback): the local edges are stale, so the session adopts the window again.
        // The peer took the connection over itself, so its session is marked
        // ADOPT_WINDOW, and has learnt edges since.
        let mut carried = session(10 * S, 20_000);
        carried.flags |= session_flags::ADOPT_WINDOW;
        let ahead = SessionRecord::from_session(&a, &carried, S, NO_NAME, NO_NAME).expect("live");
        let adopted = received_session(&ahead, 3, 7, Some(&local), 100 * S).expect("live");
        assert_eq!(adopted.tcp[0].end, 0);
        assert_ne!(adopted.flags & session_flags::ADOPT_WINDOW, 0);
        // A record the peer only received (it never saw a segment) says nothing of them.
        let mut echoed = ahead;
        echoed.forget_edges();
        let kept = received_session(&echoed, 3, 7, Some(&local), 100 * S).expect("live");
        assert_eq!(kept.tcp, local.tcp);
        let mut expired = record;
        expired.remaining_ns = 0;
        assert!(received_session(&expired, 3, 7, None, 100 * S).is_none());
    }
}
