//! The daemon's side of state sync (`[sync]`, docs/SYNC.md): one thread that owns the
//! sync socket, sends at once the sessions the kernel reports new, changed or closed,
//! scans the table every `refresh_ms` for the rest the peer has not seen (timeouts,
//! window edges, deletions), sends and retransmits them, and installs what the peer
//! sends in the kernel table at once, so a standby promoted by keepalived already holds
//! every session. The protocol itself is
//! `crate::sync`; this file is its I/O.

use std::{
    collections::HashMap,
    io::{ErrorKind, Read as _},
    net::{SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _},
    sync::atomic::Ordering,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use log::{info, warn};
use session_common::{
    record::{NO_NAME, SessionRecord},
    wire::{DaemonCounter, FlowKey, RULE_ID_DEFAULT, Session},
};

use std::sync::mpsc::Receiver;

use crate::{
    bpf::{
        clock::monotonic_ns,
        loader, netdev,
        pinned::{PinnedMaps, SessionTiers},
    },
    continuity::import::unix_now_ns,
    daemon::{events::ring::SyncNudge, readmission::admitting_rule},
    policy::config::SyncConfig,
    sync::{
        changes::{Tracker, received_session},
        key,
        link::{Delivery, Link, PeerState, Timing},
        wire::{Change, MAX_DATAGRAM, data_flags},
    },
};

/// Keys of new and closed sessions the event reader may hand over before the sync thread
/// takes them (beyond, they wait for the next scan).
const NUDGE_BACKLOG: usize = 16_384;

/// The time between scans is at least this many times the last scan's duration.
const SCAN_SHARE: u32 = 10;

/// A sync link ready to run: key read, socket bound (done while the daemon still has its
/// privileges).
pub struct Prepared {
    nudge: SyncNudge,
    nudged: Receiver<FlowKey>,
    socket: UdpSocket,
    peer: SocketAddr,
    link: Link,
    tracker: Tracker,
    interval: Duration,
    scan_every: Duration,
    maps: PinnedMaps,
    /// When the link began (monotonic ns): a peer not heard within the link's dead time
    /// after it is not waited for before the table counts as ready.
    started: u64,
    /// Whether the log has said that the table is ready (once per run).
    announced_ready: bool,
}

/// Counts the thread keeps beside the link's own.
#[derive(Default)]
struct Tally {
    foreign: u64,
    changes_sent: u64,
    installed: u64,
    deleted: u64,
    policy_refused: u64,
}

/// Reads the key file and binds the sync socket; an unusable key or address stops the
/// start with the reason.
pub fn prepare(config: &SyncConfig, maps: &PinnedMaps) -> Result<Prepared> {
    let key = key::load(&config.key_file)?;
    let socket = UdpSocket::bind(config.local).with_context(|| {
        format!(
            "binding the sync socket to {} (`[sync] local`: an address of this host, a port nothing else uses)",
            config.local
        )
    })?;
    grow_receive_buffer(&socket);
    let timing = Timing {
        retransmit_ns: (4 * config.interval.as_nanos() as u64).max(100_000_000),
        ..Timing::default()
    };
    let (keys, nudged) = std::sync::mpsc::sync_channel(NUDGE_BACKLOG);
    // SAFETY: a plain syscall; the fd it returns is owned below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("creating the eventfd that wakes the sync thread");
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let wake = std::sync::Arc::new(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
    let nudge = SyncNudge {
        keys,
        wake,
        overflowed: Default::default(),
    };
    Ok(Prepared {
        nudge,
        nudged,
        socket,
        peer: config.peer,
        link: Link::new(key, timing, boot_id()?),
        tracker: Tracker::new(config.refresh.as_nanos() as u64),
        interval: config.interval,
        scan_every: config.refresh,
        maps: maps.clone(),
        started: monotonic_ns(),
        announced_ready: false,
    })
}

/// Bytes the sync socket may hold unread: a window of messages in flight (512 of up to
/// 1,344 bytes) with room to spare, so that a full resync is not lost to a full buffer.
const RECEIVE_BUFFER: libc::c_int = 4 << 20;

/// Raises the socket's receive buffer to [`RECEIVE_BUFFER`], beyond `net.core.rmem_max`
/// (the daemon still has CAP_NET_ADMIN here); a failure leaves the default, which only
/// costs retransmissions.
fn grow_receive_buffer(socket: &UdpSocket) {
    use std::os::fd::AsRawFd as _;
    let size = RECEIVE_BUFFER;
    // SAFETY: the fd is the open socket's; the option value is a c_int that outlives
    // the call, with its size given.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        warn!(
            "sync: could not raise the socket's receive buffer: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// A random id for this daemon's run, so the peer tells a restart from a delay.
fn boot_id() -> Result<u64> {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .context("reading /dev/urandom for the sync boot id")?;
    Ok(u64::from_le_bytes(bytes).max(1))
}

impl Prepared {
    /// Where the event reader hands over the keys of new and closed sessions, which are
    /// then sent at once rather than at the next scan.
    pub fn nudge(&self) -> SyncNudge {
        self.nudge.clone()
    }

    /// Runs the link on its own thread for the daemon's life.
    pub fn spawn(self) -> Result<JoinHandle<()>> {
        info!(
            "sync: {} <-> {}, serviced every {:?}, table scanned every {:?}",
            self.socket
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string()),
            self.peer,
            self.interval,
            self.scan_every
        );
        std::thread::Builder::new()
            .name("sync".into())
            .spawn(move || self.run())
            .context("starting the sync thread")
    }

    fn run(mut self) {
        let mut table = match self.maps.session_tiers() {
            Ok(table) => table,
            Err(error) => {
                log::error!("sync: cannot open the session table, the link is off: {error:#}");
                return;
            }
        };
        let mut rules = self.maps.active_rules().ok();
        let mut tally = Tally::default();
        let mut ifnames: HashMap<u32, String> = HashMap::new();
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        let mut next_tick = Instant::now();
        let mut next_scan = next_tick;
        // The earliest a scan may run: a tenth of a CPU at most goes to scanning.
        let mut scan_allowed = next_tick;
        // The socket is read only once poll says a datagram waits, and never blocks: a
        // burst is read until it would.
        if let Err(error) = self.socket.set_nonblocking(true) {
            warn!("sync: making the socket non-blocking: {error}");
        }
        loop {
            let now = Instant::now();
            if now >= next_tick {
                // Changes that were not sent at once (a full channel, a full window) are
                // found by a scan at this tick rather than at the next `refresh_ms`.
                let missed = self.nudge.overflowed.swap(false, Ordering::Relaxed);
                let scan = now >= next_scan || (missed && now >= scan_allowed);
                match self.tick(scan, &mut tally, &mut ifnames) {
                    // A scan costs time in proportion to the table: on a large one the
                    // time between scans stretches so that they take at most a tenth of
                    // a CPU.
                    Ok(true) => {
                        let cost = now.elapsed() * SCAN_SHARE;
                        scan_allowed = now + cost;
                        next_scan = now + self.scan_every.max(cost);
                    }
                    Ok(false) => {
                        if missed {
                            self.nudge.overflowed.store(true, Ordering::Relaxed);
                        }
                    }
                    Err(error) => {
                        warn!("sync: {error:#}");
                        next_scan = now + self.scan_every;
                    }
                }
                // The policy in force, read once a tick rather than once a datagram.
                rules = self.maps.active_rules().ok();
                next_tick = now + self.interval;
            }
            // Asleep until a datagram, the event reader's wake-up or the next scan.
            let wait = next_tick
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            if !self.wait_readable(wait) {
                if let Err(error) = self.nudged(&table, &mut ifnames, &mut tally) {
                    warn!("sync: {error:#}");
                }
                continue;
            }
            match self.socket.recv_from(&mut buf) {
                Ok((len, from)) => {
                    self.handle(&buf[..len], from, &mut table, rules.as_ref(), &mut tally);
                    // Take in the rest of a burst without waiting, then answer at once:
                    // acknowledgements and the next messages go out per burst, not per
                    // interval, so a full resync runs at the link's pace.
                    self.drain(&mut buf, &mut table, rules.as_ref(), &mut tally);
                    self.flush();
                }
                Err(error)
                    if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(error) => {
                    warn!("sync: receiving: {error}");
                    std::thread::sleep(self.interval);
                }
            }
            if let Err(error) = self.nudged(&table, &mut ifnames, &mut tally) {
                warn!("sync: {error:#}");
            }
        }
    }

    /// Waits at most `wait` for a datagram or a wake-up from the event reader; true when
    /// a datagram is waiting. A wake-up is consumed here.
    fn wait_readable(&self, wait: Duration) -> bool {
        let mut fds = [
            libc::pollfd {
                fd: self.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.nudge.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let timeout = wait.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: `fds` is an array of two initialised pollfds that outlives the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if ready <= 0 {
            return false;
        }
        if fds[1].revents & libc::POLLIN != 0 {
            let mut count = 0u64;
            // SAFETY: reads the eventfd's 8-byte counter into `count`, which resets it.
            let _ = unsafe {
                libc::read(
                    self.nudge.wake.as_raw_fd(),
                    (&raw mut count).cast(),
                    size_of::<u64>(),
                )
            };
        }
        fds[0].revents & libc::POLLIN != 0
    }

    /// Sends at once the sessions the kernel just reported new, changed or closed.
    fn nudged(
        &mut self,
        table: &SessionTiers,
        ifnames: &mut HashMap<u32, String>,
        tally: &mut Tally,
    ) -> Result<()> {
        let keys: std::collections::HashSet<FlowKey> = self.nudged.try_iter().collect();
        let now = monotonic_ns();
        if keys.is_empty() {
            return Ok(());
        }
        if !self.link.accepts_changes(now) {
            // The link's window is full: the next tick's scan finds these.
            self.nudge.overflowed.store(true, Ordering::Relaxed);
            return Ok(());
        }
        let mut sessions = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(session) = table.get(&key)?.filter(|s| s.expires_ns > now) {
                sessions.push((key, session));
            }
        }
        let outgoing = self.tracker.changes_of(&sessions, now);
        let changes = to_changes(outgoing, now, ifnames);
        if changes.is_empty() {
            return Ok(());
        }
        tally.changes_sent += changes.len() as u64;
        self.link.queue(changes, now);
        self.flush();
        Ok(())
    }

    /// Takes in a datagram from `from`: the peer's is handed to the link, anyone else's
    /// is counted and dropped.
    fn handle(
        &mut self,
        bytes: &[u8],
        from: SocketAddr,
        table: &mut SessionTiers,
        rules: Option<&crate::host_engine::ModelRules>,
        tally: &mut Tally,
    ) {
        if from != self.peer {
            tally.foreign += 1;
            return;
        }
        if let Err(error) = self.receive(bytes, table, rules, tally) {
            warn!("sync: {error:#}");
        }
    }

    /// Handles the datagrams already queued on the socket, without waiting.
    fn drain(
        &mut self,
        buf: &mut [u8],
        table: &mut SessionTiers,
        rules: Option<&crate::host_engine::ModelRules>,
        tally: &mut Tally,
    ) {
        while let Ok((len, from)) = self.socket.recv_from(buf) {
            self.handle(&buf[..len], from, table, rules, tally);
        }
    }

    /// Sends what the link has due now.
    fn flush(&mut self) {
        for datagram in self.link.poll(monotonic_ns(), unix_now_ns()) {
            if let Err(error) = self.socket.send_to(&datagram, self.peer) {
                // The link retransmits; an unreachable peer is its state, not an error.
                log::debug!("sync: sending to {}: {error}", self.peer);
            }
        }
    }

    /// Takes in one datagram from the peer's address and installs what it delivers.
    fn receive(
        &mut self,
        bytes: &[u8],
        table: &mut SessionTiers,
        rules: Option<&crate::host_engine::ModelRules>,
        tally: &mut Tally,
    ) -> Result<()> {
        let now = monotonic_ns();
        let Ok(deliveries) = self.link.receive(bytes, now) else {
            // Counted by the link; nothing changes.
            return Ok(());
        };
        if deliveries.is_empty() {
            return Ok(());
        }
        let rules = rules.context("the policy in force could not be read")?;
        for delivery in deliveries {
            self.apply(delivery, table, rules, now, tally)?;
        }
        Ok(())
    }

    fn apply(
        &mut self,
        delivery: Delivery,
        table: &mut SessionTiers,
        rules: &crate::host_engine::ModelRules,
        now: u64,
        tally: &mut Tally,
    ) -> Result<()> {
        if delivery.flags & data_flags::RESYNC_START != 0 {
            self.tracker.resync_started();
        }
        let mut stores = Vec::new();
        for change in delivery.changes {
            match change {
                Change::Upsert(record, iface) => {
                    let key = record.key;
                    let ifindex = if iface.is_empty() {
                        0
                    } else {
                        loader::ifindex(&iface).unwrap_or(0)
                    };
                    let local = table.get(&key)?;
                    let Some(mut session) =
                        received_session(&record, ifindex, RULE_ID_DEFAULT, local.as_ref(), now)
                    else {
                        continue;
                    };
                    match admitting_rule(rules, &key, &session) {
                        Some(rule) => {
                            session.rule_id = rule;
                            stores.push((key, session));
                        }
                        None => tally.policy_refused += 1,
                    }
                }
                Change::Delete(key) => {
                    // In order: an upsert of this key earlier in the message goes first.
                    self.store(table, &mut stores, now, tally)?;
                    tally.deleted += table.remove(&[key])?;
                    self.tracker.deleted_by_peer(&key);
                }
            }
        }
        self.store(table, &mut stores, now, tally)?;
        if delivery.flags & data_flags::RESYNC_END != 0 {
            let stale = self.tracker.resync_ended();
            tally.deleted += table.remove(&stale)?;
        }
        Ok(())
    }

    /// Stores the sessions gathered in `stores` and empties it.
    fn store(
        &mut self,
        table: &mut SessionTiers,
        stores: &mut Vec<(FlowKey, Session)>,
        now: u64,
        tally: &mut Tally,
    ) -> Result<()> {
        table.store(stores)?;
        for (key, session) in stores.drain(..) {
            self.tracker.installed(key, &session, now);
            tally.installed += 1;
        }
        Ok(())
    }

    /// One interval's work: begin a resync if one is due, else queue the table's changes
    /// if a scan is due (`scan`); send what is due; publish the counters. True when it
    /// scanned the table.
    fn tick(
        &mut self,
        scan: bool,
        tally: &mut Tally,
        ifnames: &mut HashMap<u32, String>,
    ) -> Result<bool> {
        let now = monotonic_ns();
        let mut scanned = false;
        if self.link.resync_wanted() {
            self.link.begin_resync();
            self.tracker.forget_sent();
            let changes = self.local_changes(now, ifnames)?;
            tally.changes_sent += changes.len() as u64;
            info!(
                "sync: full resync to {}: {} session(s)",
                self.peer,
                changes.len()
            );
            self.link.queue_resync(changes, now);
            scanned = true;
        } else if scan && self.link.accepts_changes(now) {
            let changes = self.local_changes(now, ifnames)?;
            tally.changes_sent += changes.len() as u64;
            self.link.queue(changes, now);
            scanned = true;
        }
        self.flush();
        self.publish(tally, now)?;
        Ok(scanned)
    }

    /// The changes of the table since the last scan, as sync changes.
    fn local_changes(
        &mut self,
        now: u64,
        ifnames: &mut HashMap<u32, String>,
    ) -> Result<Vec<Change>> {
        let live: Vec<(FlowKey, Session)> = self
            .maps
            .snapshot_sessions()?
            .into_iter()
            .filter(|(_, session)| session.expires_ns > now)
            .collect();
        Ok(to_changes(self.tracker.changes(&live, now), now, ifnames))
    }

    fn publish(&mut self, tally: &Tally, now: u64) -> Result<()> {
        let ready = self.link.ready(now, self.started);
        if ready && !self.announced_ready {
            self.announced_ready = true;
            info!("sync: this firewall's table is ready to take the traffic over");
        }
        let counters = self.link.counters();
        let state = match self.link.peer_state(now) {
            PeerState::Down => 0,
            PeerState::Resyncing => 1,
            PeerState::Up => 2,
        };
        for (counter, value) in [
            (DaemonCounter::SyncPeerState, state),
            (DaemonCounter::SyncLagNs, self.link.lag_ns(now)),
            (
                DaemonCounter::SyncUnacknowledged,
                self.link.unacknowledged() as u64,
            ),
            (DaemonCounter::SyncSent, counters.sent),
            (DaemonCounter::SyncReceived, counters.received),
            (DaemonCounter::SyncRetransmitted, counters.retransmitted),
            (DaemonCounter::SyncResyncs, counters.resyncs),
            (
                DaemonCounter::SyncAuthFailures,
                counters.auth_failures + tally.foreign,
            ),
            (DaemonCounter::SyncRefused, counters.refused),
            (DaemonCounter::SyncChangesSent, tally.changes_sent),
            (DaemonCounter::SyncInstalled, tally.installed),
            (DaemonCounter::SyncDeleted, tally.deleted),
            (DaemonCounter::SyncPolicyRefused, tally.policy_refused),
            (
                DaemonCounter::SyncReadyPid,
                if ready { std::process::id().into() } else { 0 },
            ),
        ] {
            self.maps.set_daemon_counter(counter, value)?;
        }
        Ok(())
    }
}

/// Sync changes of what the tracker found to send: records (times relative to `now`)
/// with their first interface's name, and deletions.
fn to_changes(
    outgoing: Vec<(FlowKey, Option<Session>)>,
    now: u64,
    ifnames: &mut HashMap<u32, String>,
) -> Vec<Change> {
    outgoing
        .into_iter()
        .filter_map(|(key, session)| match session {
            None => Some(Change::Delete(key)),
            Some(session) => {
                let record = SessionRecord::from_session(&key, &session, now, NO_NAME, NO_NAME)?;
                let ifindex = u32::from_ne_bytes(session.origin_ifindex);
                let name = ifnames
                    .entry(ifindex)
                    .or_insert_with(|| {
                        (ifindex != 0)
                            .then(|| netdev::index_to_name(ifindex))
                            .flatten()
                            .unwrap_or_default()
                    })
                    .clone();
                Some(Change::Upsert(record, name))
            }
        })
        .collect()
}
