//! Reading the kernel's event ring buffer: each record becomes an [`EventRecord`], logged
//! (rate-limited) when a `log = true` rule decided the packet and sent to the clients.

use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use log::{info, warn};
use session_common::{
    track::endpoints_key,
    wire::{DaemonCounter, Event, FlowKey, event_kind, proto},
};
use tokio::{io::unix::AsyncFd, sync::broadcast};

use crate::{
    bpf::{clock::monotonic_ns, pinned::PinnedMaps},
    daemon::events::{
        log_limiter::{LOG_PER_SEC, LogLimiter, SUPPRESSED_REPORT},
        record::EventRecord,
    },
};

/// How often the ring buffer is drained: without state sync the kernel wakes the daemon
/// only when the ring is half full, so this is how late an event can be. With it, the
/// kernel also wakes the daemon when an event lands in a ring it had emptied
/// (`settings_flags::SYNC_EVENTS`), and new sessions reach the sync thread at once.
const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// With state sync, how long the reader rests after a drain the kernel woke it for: an
/// event on a quiet firewall is handed over at once, and under a stream of new sessions
/// they go in batches of this interval (one wake-up, one sync datagram and one
/// acknowledgement for many) rather than one by one.
const SYNC_BATCH: Duration = Duration::from_millis(1);

/// Where the keys of new, changed and closed TCP and UDP sessions go for state sync,
/// which sends them at once instead of at its next scan; a full channel drops them (the
/// scan finds them). An eventfd wakes the sync thread, which waits on it beside its
/// socket.
#[derive(Clone)]
pub struct SyncNudge {
    /// The keys, for the sync thread.
    pub keys: std::sync::mpsc::SyncSender<FlowKey>,
    /// Written once per drain that handed keys over.
    pub wake: std::sync::Arc<std::os::fd::OwnedFd>,
    /// Set when a change could not go at once (the channel or the link's window was
    /// full): the sync thread then scans the table at its next tick rather than at the
    /// next `refresh_ms`.
    pub overflowed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SyncNudge {
    /// Wakes the sync thread: adds one to the eventfd's counter.
    pub fn wake(&self) {
        use std::os::fd::AsRawFd as _;
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of `one` to the eventfd, which the Arc keeps open;
        // a full counter (never, in practice) fails the write, which loses only a wake-up.
        let _ = unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                (&raw const one).cast(),
                size_of::<u64>(),
            )
        };
    }
}

/// Reads the ring buffer until the daemon exits: logs logged packets (rate-limited) and
/// forwards every event to the clients as a JSON line.
pub async fn read_ring(
    mut ring: AsyncFd<RingBuf<MapData>>,
    maps: PinnedMaps,
    sender: broadcast::Sender<String>,
    nudge: Option<SyncNudge>,
) {
    let mut reader = RingReader {
        limiter: LogLimiter::new(),
        names: (u32::MAX, Vec::new()),
        maps,
        sender,
        nudge,
    };
    let mut drain = tokio::time::interval(DRAIN_EVERY);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut report = tokio::time::interval(SUPPRESSED_REPORT);
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = match guard {
                    Ok(guard) => guard,
                    Err(error) => {
                        warn!("events: cannot wait on the ring buffer: {error}; events stop");
                        return;
                    }
                };
                reader.drain(guard.get_inner_mut());
                guard.clear_ready();
                if reader.nudge.is_some() {
                    tokio::time::sleep(SYNC_BATCH).await;
                }
            }
            _ = drain.tick() => reader.drain(ring.get_mut()),
            _ = report.tick() => reader.report_suppressed(),
        }
    }
}

/// What reading the ring buffer keeps between drains.
struct RingReader {
    limiter: LogLimiter,
    names: (u32, Vec<String>),
    maps: PinnedMaps,
    sender: broadcast::Sender<String>,
    nudge: Option<SyncNudge>,
}

impl RingReader {
    /// Handles every event in the ring.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        let mut refreshed = false;
        let mut nudged = false;
        while let Some(record) = ring.next() {
            if record.len() < size_of::<Event>() {
                continue;
            }
            let event: Event = bytemuck::pod_read_unaligned(&record[..size_of::<Event>()]);
            if event.kind & event_kind::OVERLOADED != 0 {
                self.overloaded(&event);
            }
            if let Some(nudge) = &self.nudge
                && event.kind & (event_kind::NEW | event_kind::CLOSED | event_kind::CHANGED) != 0
                && matches!(event.proto, proto::TCP | proto::UDP)
            {
                let (key, _) = endpoints_key(
                    event.family,
                    event.proto,
                    &event.src,
                    event.sport,
                    &event.dst,
                    event.dport,
                );
                if nudge.keys.try_send(key).is_ok() {
                    nudged = true;
                } else {
                    nudge
                        .overflowed
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            // A change of state alone is for state sync, not for the operator.
            if event.kind == event_kind::CHANGED {
                continue;
            }
            // Formatting costs more than reading: only for a log line or a client.
            let log = event.kind & event_kind::LOGGED != 0 && self.limiter.admit();
            let stream = self.sender.receiver_count() > 0;
            if !log && !stream {
                continue;
            }
            if !refreshed {
                refresh_names(&self.maps, &mut self.names);
                refreshed = true;
            }
            let record = EventRecord::from_kernel(&event, &self.names.1);
            if log {
                info!("{}", record.human_line());
            }
            if stream {
                let _ = self.sender.send(record.to_json());
            }
        }
        if nudged && let Some(nudge) = &self.nudge {
            nudge.wake();
        }
    }

    /// Reports a source a rule's limits overloaded, and flushes its sessions when the
    /// rule asks: pf flushes in the same step, here it follows within a drain interval.
    fn overloaded(&mut self, event: &Event) {
        refresh_names(&self.maps, &mut self.names);
        let record = EventRecord::from_kernel(event, &self.names.1);
        match self.maps.flush_overloaded(event, monotonic_ns()) {
            Ok(flushed) => info!(
                "source {} overloaded by rule {}: {flushed} of its sessions flushed",
                record.src, record.rule
            ),
            Err(error) => warn!(
                "source {} overloaded by rule {}; flushing its sessions failed: {error:#}",
                record.src, record.rule
            ),
        }
    }

    /// Sums up the log lines the rate limit suppressed, if any.
    fn report_suppressed(&mut self) {
        if let Some(suppressed) = self.limiter.take_report() {
            warn!(
                "{suppressed} log lines of logged packets suppressed (limit {LOG_PER_SEC}/s); `session events` shows every one"
            );
            if let Err(error) = self
                .maps
                .bump(DaemonCounter::LogLinesSuppressed, suppressed)
            {
                warn!("events: {error:#}");
            }
        }
    }
}

/// Keeps the rule names of the active policy generation at hand.
fn refresh_names(maps: &PinnedMaps, names: &mut (u32, Vec<String>)) {
    let Ok((_, header)) = maps.active_policy() else {
        return;
    };
    if header.generation != names.0
        && let Ok(fresh) = maps.rule_names()
    {
        *names = (header.generation, fresh);
    }
}
