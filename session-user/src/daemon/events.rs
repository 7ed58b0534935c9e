//! Session events, like `conntrack -E`: the kernel path reports new and closed sessions and
//! the packets of `log = true` rules through a ring buffer; the daemon reads it, adds the
//! sessions its reaper expires, writes rate-limited log lines for logged packets, and
//! streams every event as a JSON line to the `session events` clients on a Unix socket.
//!
//! The daemon is the ring buffer's only reader (a ring buffer hands each record to one
//! consumer), so `session events` asks the daemon instead of reading the map itself.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use aya::maps::{Map, MapData, RingBuf};
use log::{info, warn};
use serde_json::{Value, json};
use session_common::wire::{
    Action, CtState, DaemonCounter, Event, FAMILY_IPV4, FlowKey, Hook, Session, event_kind,
    map_names,
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, unix::AsyncFd},
    net::{UnixListener, UnixStream},
    sync::broadcast,
};

use crate::{
    bpf::{clock::monotonic_ns, pinned::PinnedMaps},
    cli::views::{SessionView, address, endpoint, proto_name, rule_label},
    daemon::lock,
};

/// Events buffered per `session events` client before a slow one starts losing them.
const CLIENT_BACKLOG: usize = 4096;
/// Log lines for logged packets allowed in a burst.
const LOG_BURST: f64 = 20.0;
/// Log lines for logged packets allowed per second after a burst.
const LOG_PER_SEC: f64 = 10.0;
/// How often suppressed log lines are summed up in one line.
const SUPPRESSED_REPORT: Duration = Duration::from_secs(5);
/// How often the ring buffer is drained: the kernel does not wake the daemon for each
/// event, only when the ring is half full, so this is how late an event can be.
const DRAIN_EVERY: Duration = Duration::from_millis(50);

/// The Unix socket `session events` connects to for the daemon of `pin_dir`.
pub fn socket_path(pin_dir: &Path) -> PathBuf {
    lock::run_path(pin_dir, "events")
}

/// Names of the [`event_kind`] bits, in the order they are listed.
const KIND_NAMES: [(u8, &str); 4] = [
    (event_kind::NEW, "new"),
    (event_kind::CLOSED, "closed"),
    (event_kind::EXPIRED, "expired"),
    (event_kind::LOGGED, "logged"),
];

fn kinds(bits: u8) -> Vec<&'static str> {
    KIND_NAMES
        .iter()
        .filter(|(bit, _)| bits & bit != 0)
        .map(|(_, name)| *name)
        .collect()
}

/// Wall-clock time of a CLOCK_MONOTONIC timestamp, for people reading the stream.
fn wall_clock(monotonic: u64) -> String {
    let age = Duration::from_nanos(monotonic_ns().saturating_sub(monotonic));
    let at = SystemTime::now()
        .checked_sub(age)
        .unwrap_or(SystemTime::now());
    humantime::format_rfc3339_millis(at).to_string()
}

fn iface_name(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes into the buffer we own.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return format!("if{ifindex}");
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// The JSON object of one kernel event (the format is in docs/CONTRACT.md).
pub fn kernel_event_json(event: &Event, rule_names: &[String]) -> Value {
    let state = CtState::ALL
        .get(event.state as usize)
        .map_or("untracked", |state| state.name());
    json!({
        "time": wall_clock(event.time_ns),
        "events": kinds(event.kind),
        "family": if event.family == FAMILY_IPV4 { "ipv4" } else { "ipv6" },
        "proto": proto_name(event.proto),
        "src": address(event.family, event.src).to_string(),
        "sport": event.sport,
        "dst": address(event.family, event.dst).to_string(),
        "dport": event.dport,
        "state": state,
        "action": if event.action == Action::Drop as u8 { "drop" } else { "accept" },
        "direction": if event.hook == Hook::Egress as u8 { "out" } else { "in" },
        "iface": iface_name(event.ifindex),
        "rule": rule_label(event.rule_id, rule_names),
    })
}

/// The JSON object of a session the reaper removed.
pub fn expired_event_json(key: &FlowKey, session: &Session, rule_names: &[String]) -> Value {
    let view = SessionView::new(key, session, session.expires_ns, rule_names);
    json!({
        "time": wall_clock(session.expires_ns),
        "events": kinds(event_kind::EXPIRED),
        "family": view.family,
        "proto": view.proto,
        "src": view.src.to_string(),
        "sport": view.sport,
        "dst": view.dst.to_string(),
        "dport": view.dport,
        "state": view.state,
        "rule": view.rule,
        "orig_packets": view.packets[0],
        "reply_packets": view.packets[1],
    })
}

/// One event as a line of text, like `conntrack -E`:
/// `[NEW] tcp 198.18.0.1:40000 -> 198.18.0.2:22 in eth0 new accept rule=ssh`.
pub fn human_line(event: &Value) -> String {
    let text = |key: &str| event.get(key).and_then(Value::as_str).unwrap_or("");
    if let Some(set) = event.get("set").and_then(Value::as_str) {
        let number = |key: &str| event.get(key).and_then(Value::as_u64).unwrap_or(0);
        return format!(
            "{} [SET] {set} entries={} changes={}",
            text("time"),
            number("entries"),
            number("changes")
        );
    }
    let tags: String = event
        .get("events")
        .and_then(Value::as_array)
        .map(|kinds| {
            kinds
                .iter()
                .filter_map(Value::as_str)
                .map(|kind| format!("[{}]", kind.to_uppercase()))
                .collect::<Vec<_>>()
                .join("")
        })
        .unwrap_or_default();
    let side = |addr: &str, port: &str| {
        let port = event.get(port).and_then(Value::as_u64).unwrap_or(0) as u16;
        addr.parse()
            .map_or_else(|_| addr.to_string(), |addr| endpoint(addr, port, true))
    };
    let mut line = format!(
        "{} {tags} {} {} -> {}",
        text("time"),
        text("proto"),
        side(text("src"), "sport"),
        side(text("dst"), "dport"),
    );
    for key in ["direction", "iface", "state", "action"] {
        if !text(key).is_empty() {
            line.push(' ');
            line.push_str(text(key));
        }
    }
    line.push_str(&format!(" rule={}", text("rule")));
    line
}

/// Token bucket for the log lines of logged packets, so a flood cannot fill the disk.
struct LogLimiter {
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
    reported: Instant,
}

impl LogLimiter {
    fn new() -> LogLimiter {
        LogLimiter {
            tokens: LOG_BURST,
            refilled: Instant::now(),
            suppressed: 0,
            reported: Instant::now(),
        }
    }

    /// Whether one more line may be written now.
    fn admit(&mut self) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * LOG_PER_SEC;
        self.tokens = (self.tokens + earned).min(LOG_BURST);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Lines suppressed since the last report, when it is time to report them.
    fn take_report(&mut self) -> Option<u64> {
        if self.suppressed == 0 || self.reported.elapsed() < SUPPRESSED_REPORT {
            return None;
        }
        self.reported = Instant::now();
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The daemon's end of the event stream.
pub struct EventHub {
    sender: broadcast::Sender<String>,
    socket: PathBuf,
}

impl EventHub {
    /// Opens the pinned ring buffer, binds the clients' socket and starts the tasks that
    /// read the one and serve the other. Must be called inside the tokio runtime.
    pub fn start(maps: &PinnedMaps) -> Result<EventHub> {
        let path = maps.dir().join(map_names::EVENTS);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening the event ring buffer {}", path.display()))?;
        let ring = RingBuf::try_from(Map::RingBuf(data))
            .with_context(|| format!("{} is not a ring buffer", path.display()))?;
        // SAFETY: the ring buffer owns its map fd, which stays open and the same until the
        // AsyncFd that owns the ring buffer is dropped.
        let ring = unsafe { AsyncFd::register(ring) }
            .map_err(|error| error.into_parts().1)
            .context("watching the event ring buffer")?;

        let socket = socket_path(maps.dir());
        // We hold the instance lock, so a socket left here belongs to a dead daemon.
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(error).with_context(|| format!("removing stale {}", socket.display()));
            }
        }
        let listener = UnixListener::bind(&socket)
            .with_context(|| format!("creating the events socket {}", socket.display()))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {} to root", socket.display()))?;

        let (sender, _) = broadcast::channel(CLIENT_BACKLOG);
        tokio::spawn(read_ring(
            ring,
            PinnedMaps::open(maps.dir())?,
            sender.clone(),
        ));
        tokio::spawn(serve_clients(listener, sender.clone()));
        Ok(EventHub { sender, socket })
    }

    /// Sends one event, already as JSON text, to the clients (e.g. a set change).
    pub fn publish(&self, json: String) {
        if self.sender.receiver_count() > 0 {
            let _ = self.sender.send(json);
        }
    }

    /// Reports a session the reaper removed.
    pub fn expired(&self, key: &FlowKey, session: &Session, rule_names: &[String]) {
        if self.sender.receiver_count() > 0 {
            let _ = self
                .sender
                .send(expired_event_json(key, session, rule_names).to_string());
        }
    }
}

impl Drop for EventHub {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Reads the ring buffer until the daemon exits: logs logged packets (rate-limited) and
/// forwards every event to the clients.
async fn read_ring(
    mut ring: AsyncFd<RingBuf<MapData>>,
    maps: PinnedMaps,
    sender: broadcast::Sender<String>,
) {
    let mut reader = RingReader {
        limiter: LogLimiter::new(),
        names: (u32::MAX, Vec::new()),
        maps,
        sender,
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
}

impl RingReader {
    /// Handles every event in the ring.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        let mut refreshed = false;
        while let Some(record) = ring.next() {
            if record.len() < size_of::<Event>() {
                continue;
            }
            let event: Event = bytemuck::pod_read_unaligned(&record[..size_of::<Event>()]);
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
            let json = kernel_event_json(&event, &self.names.1);
            if log {
                info!("{}", human_line(&json));
            }
            if stream {
                let _ = self.sender.send(json.to_string());
            }
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

async fn serve_clients(listener: UnixListener, sender: broadcast::Sender<String>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(feed_client(stream, sender.subscribe()));
            }
            Err(error) => {
                warn!("events: accepting a client failed: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Streams events to one client until it goes away; a client too slow to keep up is told
/// how many events it missed.
async fn feed_client(mut stream: UnixStream, mut events: broadcast::Receiver<String>) {
    loop {
        let line = match events.recv().await {
            Ok(line) => line,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                json!({ "lost": missed }).to_string()
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if stream.write_all(line.as_bytes()).await.is_err()
            || stream.write_all(b"\n").await.is_err()
        {
            return;
        }
    }
}

/// `session events`: prints the daemon's event stream until interrupted.
pub async fn follow(pin_dir: &Path, json: bool) -> Result<()> {
    let socket = socket_path(pin_dir);
    let stream = UnixStream::connect(&socket).await.map_err(|error| {
        let hint = match error.kind() {
            std::io::ErrorKind::PermissionDenied => "the events socket is root's: run this command as root".to_string(),
            _ => format!(
                "no session daemon serves events for pin directory {}: start one with `session run --config FILE` (or pass the --pin-dir it uses)",
                pin_dir.display()
            ),
        };
        anyhow::anyhow!("{hint} ({}: {error})", socket.display())
    })?;
    let mut lines = BufReader::new(stream).lines();
    let mut stdout = tokio::io::stdout();
    while let Some(line) = lines
        .next_line()
        .await
        .context("reading the event stream")?
    {
        let out = if json {
            line
        } else {
            let value: Value = serde_json::from_str(&line).context("decoding an event")?;
            match value.get("lost").and_then(Value::as_u64) {
                Some(missed) => format!("-- {missed} events lost: this client read too slowly"),
                None => human_line(&value),
            }
        };
        stdout.write_all(out.as_bytes()).await?;
        stdout.write_all(b"\n").await?;
        stdout.flush().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_line_reads_like_conntrack_events() {
        let event = Event {
            time_ns: monotonic_ns(),
            src: std::net::Ipv4Addr::new(198, 18, 0, 1)
                .to_ipv6_mapped()
                .octets(),
            dst: std::net::Ipv4Addr::new(198, 18, 0, 2)
                .to_ipv6_mapped()
                .octets(),
            sport: 40000,
            dport: 22,
            rule_id: 1,
            kind: event_kind::NEW | event_kind::LOGGED,
            proto: 6,
            family: FAMILY_IPV4,
            state: CtState::New as u8,
            action: Action::Accept as u8,
            hook: Hook::Ingress as u8,
            ifindex: 1,
        };
        let json = kernel_event_json(&event, &["web".into(), "ssh".into()]);
        assert_eq!(json["events"], json!(["new", "logged"]));
        let line = human_line(&json);
        assert!(
            line.ends_with(
                "[NEW][LOGGED] tcp 198.18.0.1:40000 -> 198.18.0.2:22 in lo new accept rule=ssh"
            ),
            "{line}"
        );
    }

    #[test]
    fn ipv6_endpoints_are_bracketed() {
        let value = json!({"events": ["closed"], "proto": "udp", "src": "2001:2::1", "sport": 53,
            "dst": "2001:2::2", "dport": 5353, "rule": "(default)"});
        assert!(human_line(&value).contains("[CLOSED] udp [2001:2::1]:53 -> [2001:2::2]:5353"));
    }

    #[test]
    fn the_log_limiter_admits_a_burst_then_counts_what_it_suppresses() {
        let mut limiter = LogLimiter::new();
        let admitted = (0..1000).filter(|_| limiter.admit()).count();
        assert!(
            (LOG_BURST as usize..=LOG_BURST as usize + 2).contains(&admitted),
            "admitted {admitted}"
        );
        assert_eq!(limiter.suppressed as usize, 1000 - admitted);
        limiter.reported -= SUPPRESSED_REPORT;
        assert_eq!(limiter.take_report(), Some(1000 - admitted as u64));
        assert_eq!(limiter.take_report(), None);
    }
}
