//! The reliable, ordered stream of changes between two peers, after conntrackd's FTFW:
//! sequence numbers, cumulative acknowledgements, retransmission of what is not
//! acknowledged, a receive window that buffers out-of-order messages and drops replays,
//! and a full resync (a new stream) whenever the peer appears, restarts, comes back after
//! silence or falls too far behind. Pure: every call takes `now` (monotonic ns) and
//! returns the datagrams to send; the caller owns the socket.

use std::collections::{BTreeMap, VecDeque};

use crate::sync::wire::{
    Change, Datagram, Header, Kind, MAX_ENTRIES, SyncKey, WireError, data_flags, decode, encode,
};

/// Tuning of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// A message not acknowledged after this long is sent again.
    pub retransmit_ns: u64,
    /// A hello goes out this often.
    pub hello_ns: u64,
    /// The peer is down after this long without a datagram from it.
    pub dead_ns: u64,
    /// Messages sent and not yet acknowledged at most (the rest wait).
    pub in_flight: usize,
    /// Messages waiting at most: a peer further behind gets a full resync instead.
    pub backlog: usize,
    /// Messages ahead of the next expected one that the receiver buffers.
    pub receive_window: u64,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            retransmit_ns: 200_000_000,
            hello_ns: 500_000_000,
            dead_ns: 2_000_000_000,
            in_flight: 512,
            backlog: 16_384,
            receive_window: 4_096,
        }
    }
}

/// Where the peer is, as this side knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerState {
    /// Never heard, or silent for longer than [`Timing::dead_ns`].
    Down,
    /// Heard; a full resync to it is under way (not all acknowledged).
    Resyncing,
    /// Heard, and everything sent before the last change has been acknowledged or is in
    /// flight.
    Up,
}

impl PeerState {
    /// The state's name as `session sync status` prints it.
    pub fn name(self) -> &'static str {
        match self {
            PeerState::Down => "down",
            PeerState::Resyncing => "resyncing",
            PeerState::Up => "up",
        }
    }
}

/// Counters of a link (cumulative).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Datagrams sent (all kinds, retransmissions included).
    pub sent: u64,
    /// Data messages sent again.
    pub retransmitted: u64,
    /// Authenticated datagrams received.
    pub received: u64,
    /// Full resyncs begun towards the peer.
    pub resyncs: u64,
    /// Datagrams whose tag did not match (another key, or forged).
    pub auth_failures: u64,
    /// Authenticated datagrams refused: malformed, another version, a replay from an
    /// earlier boot, a stale stream, or beyond the receive window.
    pub refused: u64,
    /// Data messages received again (already delivered).
    pub duplicates: u64,
}

/// A data message waiting to be sent or acknowledged.
struct Outgoing {
    seq: u64,
    flags: u32,
    changes: Vec<Change>,
    queued_at: u64,
    sent_at: Option<u64>,
}

/// What this side knows of the peer's stream.
struct PeerView {
    boot: u64,
    stream: u32,
    delivered: u64,
    pending: BTreeMap<u64, Datagram>,
}

/// Changes delivered in order, with the resync markers of their message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// [`data_flags`] of the message.
    pub flags: u32,
    /// Its changes.
    pub changes: Vec<Change>,
}

/// One side of a sync link.
pub struct Link {
    key: SyncKey,
    timing: Timing,
    boot: u64,
    stream: u32,
    next_seq: u64,
    outbox: VecDeque<Outgoing>,
    peer: Option<PeerView>,
    peer_wall_ns: u64,
    last_heard: Option<u64>,
    last_hello: Option<u64>,
    ack_due: bool,
    resync_wanted: bool,
    resync_seq: Option<u64>,
    holds_peer_table: bool,
    counters: LinkCounters,
}

impl Link {
    /// A link of a daemon started with the random `boot` id.
    pub fn new(key: SyncKey, timing: Timing, boot: u64) -> Link {
        Link {
            key,
            timing,
            boot,
            stream: 0,
            next_seq: 1,
            outbox: VecDeque::new(),
            peer: None,
            peer_wall_ns: 0,
            last_heard: None,
            last_hello: None,
            ack_due: false,
            resync_wanted: false,
            resync_seq: None,
            holds_peer_table: false,
            counters: LinkCounters::default(),
        }
    }

    /// Whether this side may take the traffic over (keepalived asks through `session
    /// sync check`): a full resync from the peer has been delivered whole, or, at least
    /// [`Timing::dead_ns`] after `started`, the peer is down: there is nobody to wait for.
    /// Once true it stays true: a firewall serving traffic must not give it up because
    /// its peer came back and is resyncing.
    pub fn ready(&mut self, now: u64, started: u64) -> bool {
        if !self.holds_peer_table
            && self.peer_state(now) == PeerState::Down
            && now.saturating_sub(started) >= self.timing.dead_ns
        {
            self.holds_peer_table = true;
        }
        self.holds_peer_table
    }

    /// The peer's state at `now`.
    pub fn peer_state(&self, now: u64) -> PeerState {
        match self.last_heard {
            Some(heard) if now.saturating_sub(heard) < self.timing.dead_ns => {
                if self.resync_wanted || self.resync_seq.is_some() {
                    PeerState::Resyncing
                } else {
                    PeerState::Up
                }
            }
            _ => PeerState::Down,
        }
    }

    /// The counters so far.
    pub fn counters(&self) -> LinkCounters {
        self.counters
    }

    /// How long the oldest change not yet acknowledged has waited at `now` (0 when all
    /// are acknowledged): the standby is at most this far behind.
    pub fn lag_ns(&self, now: u64) -> u64 {
        self.outbox
            .front()
            .map_or(0, |oldest| now.saturating_sub(oldest.queued_at))
    }

    /// Messages waiting to be sent or acknowledged.
    pub fn unacknowledged(&self) -> usize {
        self.outbox.len()
    }

    /// Whether the caller must begin a full resync ([`Self::begin_resync`]): the peer
    /// appeared, restarted, came back after silence, or fell too far behind.
    pub fn resync_wanted(&self) -> bool {
        self.resync_wanted
    }

    /// Whether changes should be queued at all: nobody listens to a peer that is down,
    /// and it gets a full resync when it comes back.
    pub fn accepts_changes(&self, now: u64) -> bool {
        self.peer_state(now) != PeerState::Down && !self.resync_wanted
    }

    /// Begins a full resync: a new stream, everything queued before forgotten; the
    /// caller then queues its whole table with [`Self::queue_resync`].
    pub fn begin_resync(&mut self) {
        self.stream = self.stream.wrapping_add(1);
        self.next_seq = 1;
        self.outbox.clear();
        self.resync_wanted = false;
        self.counters.resyncs += 1;
    }

    /// Queues the whole table as the messages of the resync just begun, at `now`.
    pub fn queue_resync(&mut self, changes: Vec<Change>, now: u64) {
        let first = self.next_seq;
        self.queue(changes, now);
        if self.next_seq == first {
            self.push(Vec::new(), now);
        }
        if let Some(message) = self.outbox.iter_mut().find(|m| m.seq == first) {
            message.flags |= data_flags::RESYNC_START;
        }
        if let Some(message) = self.outbox.back_mut() {
            message.flags |= data_flags::RESYNC_END;
            self.resync_seq = Some(message.seq);
        }
    }

    /// Queues changes, [`MAX_ENTRIES`] to a message. A peer that has more waiting than
    /// [`Timing::backlog`] allows is given a full resync instead.
    pub fn queue(&mut self, changes: Vec<Change>, now: u64) {
        let mut changes = changes.into_iter().peekable();
        // A message not sent yet takes more changes first, so that changes arriving a
        // few at a time still travel eight to a datagram.
        if let Some(last) = self
            .outbox
            .back_mut()
            .filter(|last| last.sent_at.is_none() && last.flags == 0)
        {
            while last.changes.len() < MAX_ENTRIES {
                match changes.next() {
                    Some(change) => last.changes.push(change),
                    None => break,
                }
            }
        }
        while changes.peek().is_some() {
            let chunk: Vec<Change> = changes.by_ref().take(MAX_ENTRIES).collect();
            self.push(chunk, now);
        }
        if self.outbox.len() > self.timing.backlog {
            self.outbox.clear();
            self.resync_wanted = true;
        }
    }

    fn push(&mut self, changes: Vec<Change>, now: u64) {
        self.outbox.push_back(Outgoing {
            seq: self.next_seq,
            flags: 0,
            changes,
            queued_at: now,
            sent_at: None,
        });
        self.next_seq += 1;
    }

    fn header(&self, kind: Kind, wall_ns: u64) -> Header {
        let (ack_boot, ack_stream, ack_seq) = self
            .peer
            .as_ref()
            .map_or((0, 0, 0), |peer| (peer.boot, peer.stream, peer.delivered));
        Header {
            kind: kind as u8,
            boot: self.boot,
            stream: self.stream,
            flags: 0,
            seq: 0,
            ack_boot,
            ack_stream,
            ack_seq,
            wall_ns,
        }
    }

    /// The datagrams due at `now` (`wall_ns` on the wall clock): new messages within the
    /// in-flight limit, retransmissions, an acknowledgement, a hello.
    pub fn poll(&mut self, now: u64, wall_ns: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let down = self.peer_state(now) == PeerState::Down;
        if !down {
            let template = self.header(Kind::Data, wall_ns);
            let limit = self.timing.in_flight;
            for message in self.outbox.iter_mut().take(limit) {
                let due = match message.sent_at {
                    None => true,
                    Some(at) => now.saturating_sub(at) >= self.timing.retransmit_ns,
                };
                if !due {
                    continue;
                }
                if message.sent_at.is_some() {
                    self.counters.retransmitted += 1;
                }
                message.sent_at = Some(now);
                let header = Header {
                    flags: message.flags,
                    seq: message.seq,
                    ..template
                };
                out.push(encode(&self.key, &header, &message.changes));
                self.ack_due = false;
            }
        }
        let hello_due = self
            .last_hello
            .is_none_or(|at| now.saturating_sub(at) >= self.timing.hello_ns);
        if hello_due {
            self.last_hello = Some(now);
            out.push(encode(&self.key, &self.header(Kind::Hello, wall_ns), &[]));
            self.ack_due = false;
        }
        if self.ack_due {
            self.ack_due = false;
            out.push(encode(&self.key, &self.header(Kind::Ack, wall_ns), &[]));
        }
        self.counters.sent += out.len() as u64;
        out
    }

    /// Takes in a datagram received at `now`; returns the changes it makes deliverable,
    /// in order. Anything refused is counted and changes nothing.
    pub fn receive(&mut self, bytes: &[u8], now: u64) -> Result<Vec<Delivery>, WireError> {
        let datagram = match decode(&self.key, bytes) {
            Ok(datagram) => datagram,
            Err(error) => {
                match error {
                    WireError::Authentication | WireError::Length(_) => {
                        self.counters.auth_failures += 1
                    }
                    _ => self.counters.refused += 1,
                }
                return Err(error);
            }
        };
        let header = datagram.header;
        let known_boot = self.peer.as_ref().map(|peer| peer.boot);
        if known_boot != Some(header.boot) {
            // A new boot of the peer: only if it is newer than all it sent before, so a
            // datagram of an earlier boot, replayed, cannot reset the link.
            if header.wall_ns <= self.peer_wall_ns || header.boot == 0 {
                self.counters.refused += 1;
                return Err(WireError::Malformed);
            }
            self.peer = Some(PeerView {
                boot: header.boot,
                stream: header.stream,
                delivered: 0,
                pending: BTreeMap::new(),
            });
            self.resync_wanted = true;
        }
        let was_down = self.peer_state(now) == PeerState::Down;
        self.peer_wall_ns = self.peer_wall_ns.max(header.wall_ns);
        self.last_heard = Some(now);
        self.counters.received += 1;
        if was_down {
            self.resync_wanted = true;
        }
        self.acknowledged(&header);
        let peer = self.peer.as_mut().expect("set above");
        if header.stream != peer.stream {
            if header.stream.wrapping_sub(peer.stream) > u32::MAX / 2 {
                self.counters.refused += 1;
                return Err(WireError::Malformed);
            }
            peer.stream = header.stream;
            peer.delivered = 0;
            peer.pending.clear();
        }
        if header.kind != Kind::Data as u8 {
            return Ok(Vec::new());
        }
        self.ack_due = true;
        if header.seq <= peer.delivered {
            self.counters.duplicates += 1;
            return Ok(Vec::new());
        }
        if header.seq > peer.delivered + self.timing.receive_window {
            self.counters.refused += 1;
            return Err(WireError::Malformed);
        }
        peer.pending.insert(header.seq, datagram);
        let mut delivered = Vec::new();
        while let Some(next) = peer.pending.remove(&(peer.delivered + 1)) {
            peer.delivered += 1;
            self.holds_peer_table |= next.header.flags & data_flags::RESYNC_END != 0;
            delivered.push(Delivery {
                flags: next.header.flags,
                changes: next.changes,
            });
        }
        Ok(delivered)
    }

    /// Drops the messages the peer acknowledged.
    fn acknowledged(&mut self, header: &Header) {
        if header.ack_boot != self.boot || header.ack_stream != self.stream {
            return;
        }
        while self
            .outbox
            .front()
            .is_some_and(|message| message.seq <= header.ack_seq)
        {
            self.outbox.pop_front();
        }
        if self.resync_seq.is_some_and(|end| end <= header.ack_seq) {
            self.resync_seq = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::wire::encode;
    use crate::sync::wire::tests_support::key_v4;

    const MS: u64 = 1_000_000;

    fn pair() -> (Link, Link) {
        let key = SyncKey::new(&[5; 32]).expect("key");
        (
            Link::new(key.clone(), Timing::default(), 11),
            Link::new(key, Timing::default(), 22),
        )
    }

    fn deletes(range: std::ops::Range<u16>) -> Vec<Change> {
        range.map(|port| Change::Delete(key_v4(2, port))).collect()
    }

    /// Carries every datagram `from` sends at `now` to `to`, dropping those `lose` picks;
    /// returns the changes delivered.
    fn carry(
        from: &mut Link,
        to: &mut Link,
        now: u64,
        mut lose: impl FnMut(usize) -> bool,
    ) -> Vec<Change> {
        let mut got = Vec::new();
        for (i, datagram) in from.poll(now, now).into_iter().enumerate() {
            if lose(i) {
                continue;
            }
            for delivery in to.receive(&datagram, now).expect("authentic") {
                got.extend(delivery.changes);
            }
        }
        got
    }

    /// Brings two links up: hellos both ways, both resync (empty tables).
    fn connect(a: &mut Link, b: &mut Link, now: u64) {
        carry(a, b, now, |_| false);
        carry(b, a, now, |_| false);
        for link in [&mut *a, &mut *b] {
            assert!(link.resync_wanted(), "a new peer wants a resync");
            link.begin_resync();
            link.queue_resync(Vec::new(), now);
        }
        carry(a, b, now + MS, |_| false);
        carry(b, a, now + MS, |_| false);
        carry(a, b, now + 2 * MS, |_| false);
        assert_eq!(a.peer_state(now + 2 * MS), PeerState::Up);
        assert_eq!(b.peer_state(now + 2 * MS), PeerState::Up);
    }

    #[test]
    fn changes_arrive_in_order_despite_loss_and_are_acknowledged() {
        let (mut a, mut b) = pair();
        connect(&mut a, &mut b, 1);
        a.queue(deletes(0..100), 10 * MS);
        assert_eq!(a.unacknowledged(), 13);
        // One datagram in three lost, whatever it is.
        let mut count = 0;
        let mut lose = |_| {
            count += 1;
            count % 3 == 1
        };
        let mut got = carry(&mut a, &mut b, 10 * MS, &mut lose);
        let mut now = 10 * MS;
        for _ in 0..10 {
            now += 250 * MS;
            carry(&mut b, &mut a, now, &mut lose);
            got.extend(carry(&mut a, &mut b, now, &mut lose));
        }
        carry(&mut b, &mut a, now + MS, |_| false);
        assert_eq!(got, deletes(0..100), "every change once, in order");
        assert_eq!(a.unacknowledged(), 0);
        assert!(a.counters().retransmitted > 0);
        assert_eq!(a.lag_ns(now), 0);
    }

    #[test]
    fn changes_queued_a_few_at_a_time_fill_a_waiting_message() {
        let (mut a, mut b) = pair();
        connect(&mut a, &mut b, 1);
        for port in 0..10 {
            a.queue(deletes(port..port + 1), 10 * MS);
        }
        assert_eq!(a.unacknowledged(), 2, "eight to a message");
        let got = carry(&mut a, &mut b, 10 * MS, |_| false);
        assert_eq!(got, deletes(0..10));
    }

    #[test]
    fn replays_and_duplicates_change_nothing() {
        let (mut a, mut b) = pair();
        connect(&mut a, &mut b, 1);
        a.queue(deletes(0..3), 10 * MS);
        let sent = a.poll(10 * MS, 10 * MS);
        let data = sent.first().expect("a data message").clone();
        assert_eq!(b.receive(&data, 10 * MS).expect("fresh").len(), 1);
        assert_eq!(b.receive(&data, 11 * MS), Ok(Vec::new()));
        assert_eq!(b.counters().duplicates, 1);
        // A hello of an earlier boot, replayed after the peer restarted, is refused.
        let old_hello = {
            let mut old = Link::new(SyncKey::new(&[5; 32]).expect("key"), Timing::default(), 99);
            old.poll(0, 0).pop().expect("hello")
        };
        assert!(b.receive(&old_hello, 12 * MS).is_err());
        assert!(!b.resync_wanted());
    }

    #[test]
    fn a_wrong_key_is_counted_and_changes_nothing() {
        let (mut a, mut b) = pair();
        connect(&mut a, &mut b, 1);
        let wrong = SyncKey::new(&[6; 32]).expect("key");
        let header = Header {
            kind: Kind::Data as u8,
            boot: 33,
            stream: 1,
            flags: data_flags::RESYNC_START | data_flags::RESYNC_END,
            seq: 1,
            wall_ns: u64::MAX / 2,
            ..Header::default()
        };
        let forged = encode(&wrong, &header, &deletes(0..2));
        let mut stranger = Link::new(wrong, Timing::default(), 33);
        for datagram in stranger.poll(5 * MS, u64::MAX / 2).iter().chain([&forged]) {
            assert_eq!(b.receive(datagram, 5 * MS), Err(WireError::Authentication));
        }
        assert_eq!(b.counters().auth_failures, 2);
        assert!(!b.resync_wanted());
    }

    #[test]
    fn a_restarted_peer_gets_a_full_resync_and_stale_streams_are_ignored() {
        let (mut a, mut b) = pair();
        connect(&mut a, &mut b, 1);
        let mut b2 = Link::new(SyncKey::new(&[5; 32]).expect("key"), Timing::default(), 23);
        carry(&mut b2, &mut a, 20 * MS, |_| false);
        assert!(a.resync_wanted(), "a new boot of the peer");
        assert!(!a.accepts_changes(20 * MS));
        a.begin_resync();
        a.queue_resync(deletes(0..10), 20 * MS);
        assert_eq!(a.peer_state(20 * MS), PeerState::Resyncing);
        let got = carry(&mut a, &mut b2, 21 * MS, |_| false);
        assert_eq!(got, deletes(0..10));
        carry(&mut b2, &mut a, 22 * MS, |_| false);
        assert_eq!(a.peer_state(22 * MS), PeerState::Up);
        assert_eq!(a.counters().resyncs, 2);
    }

    #[test]
    fn a_peer_too_far_behind_or_back_from_silence_gets_a_resync() {
        let key = SyncKey::new(&[5; 32]).expect("key");
        let small = Timing {
            backlog: 4,
            ..Timing::default()
        };
        let (mut a, mut b) = (Link::new(key.clone(), small, 11), Link::new(key, small, 22));
        connect(&mut a, &mut b, 1);
        a.queue(deletes(0..40), 10 * MS);
        assert!(a.resync_wanted());
        assert_eq!(a.unacknowledged(), 0, "the backlog is dropped");
        let (mut a, mut b) = pair();
        connect(&mut a, &mut b, 1);
        assert_eq!(a.peer_state(3_000 * MS), PeerState::Down);
        carry(&mut b, &mut a, 3_000 * MS, |_| false);
        assert!(a.resync_wanted(), "back from silence");
    }

    #[test]
    fn resync_markers_frame_the_whole_table() {
        let (mut a, mut b) = pair();
        connect(&mut a, &mut b, 1);
        a.begin_resync();
        a.queue_resync(deletes(0..20), 10 * MS);
        let sent = a.poll(10 * MS, 10 * MS);
        let flags: Vec<u32> = sent
            .iter()
            .filter_map(|d| {
                b.receive(d, 10 * MS)
                    .expect("authentic")
                    .first()
                    .map(|x| x.flags)
            })
            .collect();
        assert_eq!(
            flags,
            vec![data_flags::RESYNC_START, 0, data_flags::RESYNC_END]
        );
    }

    #[test]
    fn a_side_is_ready_once_the_peers_whole_table_arrived_and_stays_so() {
        let (mut a, mut b) = pair();
        let started = 1;
        assert!(!a.ready(MS, started), "nothing heard yet, just started");
        carry(&mut a, &mut b, 1, |_| false);
        carry(&mut b, &mut a, 1, |_| false);
        b.begin_resync();
        b.queue_resync(deletes(0..20), 2 * MS);
        let sent = b.poll(2 * MS, 2 * MS);
        let (last, first) = sent.split_last().expect("a resync in several messages");
        for datagram in first {
            a.receive(datagram, 2 * MS).expect("authentic");
        }
        assert!(!a.ready(3 * MS, started), "the resync is not complete");
        assert!(
            !a.ready(1_900 * MS, started),
            "a peer heard and resyncing is waited for"
        );
        a.receive(last, 1_900 * MS).expect("authentic");
        assert!(a.ready(1_900 * MS, started), "the peer's whole table is in");
        b.begin_resync();
        b.queue_resync(deletes(0..20), 2_700 * MS);
        a.receive(&b.poll(2_700 * MS, 2_700 * MS)[0], 2_700 * MS)
            .expect("authentic");
        assert!(
            a.ready(2_800 * MS, started),
            "a later resync changes nothing"
        );
    }

    #[test]
    fn a_side_without_a_peer_is_ready_once_a_peer_would_have_been_heard() {
        let (mut a, _) = pair();
        let started = 100 * MS;
        assert!(!a.ready(started + 1_999 * MS, started));
        assert!(a.ready(started + 2_000 * MS, started), "nobody to wait for");
    }
}
