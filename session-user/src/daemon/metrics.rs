//! The opt-in Prometheus endpoint: with `[metrics] listen = "ADDR:PORT"` in the config the
//! daemon answers `GET /metrics` there with the Prometheus text exposition format (0.0.4).
//!
//! Every scrape reads the pinned maps afresh, exactly as `session stats` does, so the
//! metrics and the CLI never disagree and the server keeps no state of its own. The HTTP
//! side is deliberately tiny (one path, one request per connection, `Connection: close`):
//! that is all a Prometheus scraper needs, and it keeps the daemon free of a web stack.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use log::{info, warn};
use session_common::wire::{HIT_DEFAULT_INBOUND, HIT_DEFAULT_OUTBOUND};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinHandle,
};

use crate::{
    bpf::{clock::monotonic_ns, pinned::PinnedMaps},
    cli::views::{proto_name, state_name},
};

/// Longest request head read; a scraper's GET is a few hundred bytes.
const MAX_REQUEST: usize = 8192;
/// How long a client may take to send its request, so an idle connection cannot pin a slot.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at once, so a misbehaving client cannot
/// make the daemon read the maps in a tight loop.
const MAX_CONNECTIONS: usize = 8;
/// The content type Prometheus expects for the text format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The running endpoint; dropping it stops the server, so it lives as long as the daemon.
pub struct MetricsServer {
    task: JoinHandle<()>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves the metrics of the instance pinned under `pin_dir` in a
/// background task. Binding happens here so that a taken port stops the daemon before it
/// attaches to anything.
pub async fn start(addr: SocketAddr, pin_dir: &Path) -> Result<MetricsServer> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen for metrics on {addr} (`[metrics] listen` in the config): \
             is the address local to this host and the port free?"
        )
    })?;
    info!("metrics: serving http://{addr}/metrics");
    let task = tokio::spawn(accept_loop(listener, pin_dir.to_path_buf()));
    Ok(MetricsServer { task })
}

async fn accept_loop(listener: TcpListener, pin_dir: PathBuf) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // Without a free slot the stream is dropped, which closes it.
                if let Ok(permit) = slots.clone().try_acquire_owned() {
                    let pin_dir = pin_dir.clone();
                    tokio::spawn(async move {
                        if let Err(error) = serve_one(stream, pin_dir).await {
                            log::debug!("metrics: {error:#}");
                        }
                        drop(permit);
                    });
                }
            }
            Err(error) => {
                // Typically out of file descriptors: back off instead of spinning.
                warn!("metrics: accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// `GET /metrics` (or `HEAD`, which gets the headers only).
    Metrics { head: bool },
    /// `GET /`: a pointer to `/metrics` for someone trying the address in a browser.
    Index { head: bool },
    /// Another path.
    NotFound,
    /// A method other than GET and HEAD.
    MethodNotAllowed,
    /// Not an HTTP request line.
    BadRequest,
}

/// Routes a request by its first line; headers do not matter for one read-only path.
fn route(head: &str) -> Route {
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let (Some(method), Some(target), Some(version)) = (words.next(), words.next(), words.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Route::MethodNotAllowed,
    };
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/metrics" => Route::Metrics { head },
        "/" => Route::Index { head },
        _ => Route::NotFound,
    }
}

/// Reads the request head: up to the blank line, [`MAX_REQUEST`] bytes or end of stream.
async fn read_head(stream: &mut TcpStream) -> Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while buf.len() < MAX_REQUEST {
        let n = stream.read(&mut chunk).await.context("reading a request")?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

async fn serve_one(mut stream: TcpStream, pin_dir: PathBuf) -> Result<()> {
    let head = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream))
        .await
        .context("the client sent no complete request in time")??;
    let (status, content_type, body, head_only) = match route(&head) {
        Route::Metrics { head } => {
            // Reading the maps is blocking syscalls (a big table takes a while): keep it
            // off the thread that runs the daemon's signal handling and reaper.
            let scraped = tokio::task::spawn_blocking(move || {
                let maps = PinnedMaps::open(&pin_dir)?;
                Snapshot::read(&maps).map(|snapshot| snapshot.render())
            })
            .await
            .context("the metrics reader panicked")?;
            match scraped {
                Ok(text) => ("200 OK", CONTENT_TYPE, text, head),
                Err(error) => (
                    "503 Service Unavailable",
                    "text/plain; charset=utf-8",
                    format!("cannot read the firewall's maps: {error:#}\n"),
                    head,
                ),
            }
        }
        Route::Index { head } => (
            "200 OK",
            "text/plain; charset=utf-8",
            "session firewall: metrics are at /metrics\n".to_string(),
            head,
        ),
        Route::NotFound => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".to_string(),
            false,
        ),
        Route::MethodNotAllowed => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET and HEAD are supported\n".to_string(),
            false,
        ),
        Route::BadRequest => (
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "expected an HTTP/1.x request\n".to_string(),
            false,
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        response.push_str(&body);
    }
    stream
        .write_all(response.as_bytes())
        .await
        .context("writing the response")?;
    stream.shutdown().await.context("closing the connection")
}

/// Everything one scrape reports, read from the pinned maps in one go.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Kernel counters by name, in [`session_common::wire::Counter::ALL`] order.
    pub counters: Vec<(&'static str, u64)>,
    /// Daemon counters by name, in [`session_common::wire::DaemonCounter::ALL`] order.
    pub daemon: Vec<(&'static str, u64)>,
    /// Live sessions by (protocol name, state name).
    pub sessions: BTreeMap<(String, &'static str), u64>,
    /// Capacity of the session table.
    pub max_sessions: u64,
    /// Rules of the active policy with their hits.
    pub rules: Vec<(String, u64)>,
    /// Hits of the inbound default action.
    pub default_inbound_hits: u64,
    /// Hits of the outbound default action.
    pub default_outbound_hits: u64,
    /// Generation of the active policy.
    pub generation: u32,
}

impl Snapshot {
    /// Reads the counters, sessions and rule hits of a running instance.
    pub fn read(maps: &PinnedMaps) -> Result<Snapshot> {
        let mut sessions = BTreeMap::new();
        for (key, session) in maps.live_sessions(monotonic_ns())? {
            let state = state_name(key.proto, session.state);
            *sessions.entry((proto_name(key.proto), state)).or_insert(0) += 1;
        }
        let hits = maps.rule_hits()?;
        let hit = |slot: u32| hits.get(slot as usize).copied().unwrap_or(0);
        let rules = maps
            .rule_names()?
            .into_iter()
            .enumerate()
            .map(|(id, name)| (name, hit(id as u32)))
            .collect();
        Ok(Snapshot {
            counters: maps.counters()?,
            daemon: maps.daemon_counters()?,
            sessions,
            max_sessions: maps.max_sessions()?,
            rules,
            default_inbound_hits: hit(HIT_DEFAULT_INBOUND),
            default_outbound_hits: hit(HIT_DEFAULT_OUTBOUND),
            generation: maps.active_policy()?.1.generation,
        })
    }

    /// The Prometheus text exposition of this snapshot.
    pub fn render(&self) -> String {
        let mut out = Exposition::default();
        let live: u64 = self.sessions.values().sum();
        out.add(
            "session_sessions",
            Kind::Gauge,
            "Live sessions in the table, by protocol and state (as `session list` shows them).",
            &[],
            None,
        );
        for ((protocol, state), count) in &self.sessions {
            out.add(
                "session_sessions",
                Kind::Gauge,
                "",
                &[("proto", protocol), ("state", state)],
                Some(count.to_string()),
            );
        }
        out.add(
            "session_table_max_sessions",
            Kind::Gauge,
            "Capacity of the session table (`[limits] max_sessions`).",
            &[],
            Some(self.max_sessions.to_string()),
        );
        out.add(
            "session_table_fill_ratio",
            Kind::Gauge,
            "Live sessions divided by the table's capacity (0 to 1).",
            &[],
            Some(ratio(live, self.max_sessions)),
        );
        for (name, value) in &self.counters {
            let (family, label, help) = kernel_metric(name);
            let labels: Vec<(&str, &str)> = label.iter().copied().collect();
            out.add(
                &family,
                Kind::Counter,
                &help,
                &labels,
                Some(value.to_string()),
            );
        }
        for (name, value) in &self.daemon {
            let (family, kind, help, sample) = daemon_metric(name, *value);
            out.add(&family, kind, &help, &[], Some(sample));
        }
        out.add(
            "session_rule_hits_total",
            Kind::Counter,
            "Packets each rule of the active policy decided; starts from 0 when a policy is applied.",
            &[],
            None,
        );
        for (name, hits) in &self.rules {
            out.add(
                "session_rule_hits_total",
                Kind::Counter,
                "",
                &[("rule", name)],
                Some(hits.to_string()),
            );
        }
        for (direction, hits) in [
            ("inbound", self.default_inbound_hits),
            ("outbound", self.default_outbound_hits),
        ] {
            out.add(
                "session_default_action_hits_total",
                Kind::Counter,
                "Packets no rule matched, decided by the default action of `[policy]`.",
                &[("direction", direction)],
                Some(hits.to_string()),
            );
        }
        out.add(
            "session_policy_generation",
            Kind::Gauge,
            "Generation of the active policy; it grows by one at every start and reload.",
            &[],
            Some(self.generation.to_string()),
        );
        out.finish()
    }
}

/// `part / whole` as a decimal, 0 when the whole is 0.
fn ratio(part: u64, whole: u64) -> String {
    if whole == 0 {
        "0".to_string()
    } else {
        format!("{}", part as f64 / whole as f64)
    }
}

/// Nanoseconds as seconds, for `_seconds` metrics.
fn seconds(ns: u64) -> String {
    format!("{}", ns as f64 / 1e9)
}

/// The metric family, label and help of a kernel counter. Counters that are one quantity
/// split by a reason share a family with a label, so a query can sum or compare them.
fn kernel_metric(name: &'static str) -> (String, Option<(&'static str, &'static str)>, String) {
    if let Some(state) = name.strip_prefix("state_") {
        return (
            "session_packets_by_state_total".into(),
            Some(("state", state)),
            "IP packets by the session state they were classified in (nftables' ct state).".into(),
        );
    }
    if let Some(reason) = name.strip_prefix("drop_") {
        return (
            "session_drops_total".into(),
            Some(("reason", reason)),
            "Packets dropped, by reason: rule (a drop rule), default (the default action), \
             table_full (a new session could not be inserted: an insert failure)."
                .into(),
        );
    }
    if let Some(reason) = name.strip_prefix("invalid_") {
        return (
            "session_invalid_total".into(),
            Some(("reason", reason)),
            "Packets classified invalid, by what was wrong with them.".into(),
        );
    }
    let help = match name {
        "packets_seen" => "IP packets examined at XDP ingress and TC egress.",
        "packets_accepted" => "IP packets passed.",
        "packets_dropped" => "IP packets dropped, for any reason.",
        "packets_non_ip" => "Non-IP frames (ARP and the like), always passed.",
        "sessions_created" => "Sessions created.",
        "sessions_protected" => {
            "Sessions that became assured and moved to the table that never evicts."
        }
        "protected_table_full" => {
            "Assured sessions left in the evictable table because the protected table was full."
        }
        "sessions_expired_inline" => "Expired sessions that a packet found and replaced.",
        "tcp_ignored" => "TCP segments the state table ignored without changing state.",
        "events_lost" => "Events lost because the event ring buffer was full.",
        "fast_path_forwarded" => {
            "Packets of established sessions the fast path handed to their egress interface."
        }
        "fragments_followed" => {
            "Later IP fragments that followed their datagram's first fragment: its state, verdict and session."
        }
        "fragments_unknown" => {
            "Later IP fragments whose first fragment was not seen, passed to the kernel unjudged."
        }
        _ => "A counter of `session stats` (see docs/CONTRACT.md).",
    };
    (format!("session_{name}_total"), None, help.into())
}

/// The metric family, type, help and sample of a daemon counter.
fn daemon_metric(name: &'static str, value: u64) -> (String, Kind, String, String) {
    let (family, kind, help, sample) = match name {
        "sessions_expired" => (
            "session_sessions_expired_total",
            Kind::Counter,
            "Expired sessions the reaper removed.",
            value.to_string(),
        ),
        "reaper_runs" => (
            "session_reaper_runs_total",
            Kind::Counter,
            "Reaper sweeps completed (every 5 seconds, less often when sweeps are slow).",
            value.to_string(),
        ),
        "policy_applies" => (
            "session_policy_applies_total",
            Kind::Counter,
            "Policies applied, at start and at each reload.",
            value.to_string(),
        ),
        "log_lines_suppressed" => (
            "session_log_lines_suppressed_total",
            Kind::Counter,
            "Log lines of logged packets left out by the rate limit.",
            value.to_string(),
        ),
        "sessions_readmission_refused" => (
            "session_sessions_readmission_refused_total",
            Kind::Counter,
            "Sessions removed after a policy apply because the new policy would not admit them.",
            value.to_string(),
        ),
        "reaper_ns_total" => (
            "session_reaper_duration_seconds_total",
            Kind::Counter,
            "Time spent in reaper sweeps, in total.",
            seconds(value),
        ),
        "reaper_last_ns" => (
            "session_reaper_last_duration_seconds",
            Kind::Gauge,
            "How long the latest reaper sweep took.",
            seconds(value),
        ),
        _ => {
            return (
                format!("session_{name}_total"),
                Kind::Counter,
                "A daemon counter of `session stats` (see docs/CONTRACT.md).".into(),
                value.to_string(),
            );
        }
    };
    (family.into(), kind, help.into(), sample)
}

/// A Prometheus metric type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// One metric family being built: its header and its sample lines.
struct Family {
    name: String,
    kind: Kind,
    help: String,
    samples: Vec<String>,
}

/// Collects samples by family, so that each family gets one `# HELP`/`# TYPE` header and
/// its samples stay together, as the text format requires.
#[derive(Default)]
struct Exposition {
    families: Vec<Family>,
}

impl Exposition {
    /// Adds a sample (or, with `value` `None`, only declares the family, so that it shows
    /// up with its help even when it has no samples yet). The first non-empty help wins.
    fn add(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        labels: &[(&str, &str)],
        value: Option<String>,
    ) {
        let index = match self.families.iter().position(|f| f.name == name) {
            Some(index) => index,
            None => {
                self.families.push(Family {
                    name: name.to_string(),
                    kind,
                    help: String::new(),
                    samples: Vec::new(),
                });
                self.families.len() - 1
            }
        };
        let family = &mut self.families[index];
        if family.help.is_empty() {
            family.help = help.to_string();
        }
        if let Some(value) = value {
            let mut line = name.to_string();
            if !labels.is_empty() {
                let pairs: Vec<String> = labels
                    .iter()
                    .map(|(key, val)| format!("{key}=\"{}\"", escape_label(val)))
                    .collect();
                line.push('{');
                line.push_str(&pairs.join(","));
                line.push('}');
            }
            line.push(' ');
            line.push_str(&value);
            family.samples.push(line);
        }
    }

    fn finish(self) -> String {
        let mut out = String::new();
        for family in self.families {
            let kind = match family.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            let help = family.help.replace('\\', "\\\\").replace('\n', "\\n");
            let _ = writeln!(out, "# HELP {} {help}", family.name);
            let _ = writeln!(out, "# TYPE {} {kind}", family.name);
            for sample in family.samples {
                out.push_str(&sample);
                out.push('\n');
            }
        }
        out
    }
}

/// Escapes a label value as the text format requires.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let mut sessions = BTreeMap::new();
        sessions.insert(("tcp".to_string(), "ESTABLISHED"), 3);
        sessions.insert(("udp".to_string(), "UNREPLIED"), 1);
        Snapshot {
            counters: vec![
                ("packets_seen", 100),
                ("state_new", 7),
                ("state_established", 90),
                ("drop_rule", 2),
                ("drop_default", 5),
                ("drop_table_full", 1),
                ("invalid_tcp_flags", 4),
                ("protected_table_full", 0),
            ],
            daemon: vec![
                ("reaper_runs", 12),
                ("reaper_ns_total", 3_500_000),
                ("reaper_last_ns", 250_000),
            ],
            sessions,
            max_sessions: 1024,
            rules: vec![("established".into(), 90), ("web".into(), 3)],
            default_inbound_hits: 5,
            default_outbound_hits: 2,
            generation: 4,
        }
    }

    /// The value of the sample line that starts with `series` followed by a space.
    fn value(text: &str, series: &str) -> String {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
            .to_string()
    }

    #[test]
    fn samples_carry_the_snapshot_values() {
        let text = sample().render();
        assert_eq!(
            value(
                &text,
                r#"session_sessions{proto="tcp",state="ESTABLISHED"}"#
            ),
            "3"
        );
        assert_eq!(
            value(&text, r#"session_sessions{proto="udp",state="UNREPLIED"}"#),
            "1"
        );
        assert_eq!(value(&text, "session_table_fill_ratio"), "0.00390625");
        assert_eq!(value(&text, "session_table_max_sessions"), "1024");
        assert_eq!(value(&text, "session_packets_seen_total"), "100");
        assert_eq!(
            value(&text, r#"session_packets_by_state_total{state="new"}"#),
            "7"
        );
        assert_eq!(
            value(&text, r#"session_drops_total{reason="table_full"}"#),
            "1"
        );
        assert_eq!(
            value(&text, r#"session_invalid_total{reason="tcp_flags"}"#),
            "4"
        );
        assert_eq!(value(&text, r#"session_rule_hits_total{rule="web"}"#), "3");
        assert_eq!(
            value(
                &text,
                r#"session_default_action_hits_total{direction="inbound"}"#
            ),
            "5"
        );
        assert_eq!(value(&text, "session_reaper_runs_total"), "12");
        assert_eq!(
            value(&text, "session_reaper_duration_seconds_total"),
            "0.0035"
        );
        assert_eq!(
            value(&text, "session_reaper_last_duration_seconds"),
            "0.00025"
        );
        assert_eq!(value(&text, "session_policy_generation"), "4");
    }

    #[test]
    fn every_family_has_one_header_and_contiguous_samples() {
        let text = sample().render();
        let mut seen = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE has a name and a kind");
                assert!(matches!(kind, "counter" | "gauge"), "kind {kind}");
                assert!(!seen.contains(&name.to_string()), "{name} declared twice");
                seen.push(name.to_string());
                current = name.to_string();
            } else if !line.starts_with("# HELP ") {
                let series = line.split(['{', ' ']).next().unwrap_or("");
                assert_eq!(series, current, "sample {line:?} outside its family");
                let sample_value = line.rsplit(' ').next().unwrap_or("");
                assert!(
                    sample_value.parse::<f64>().is_ok(),
                    "value of {line:?} is not a number"
                );
            }
        }
        for name in &seen {
            let counter = text.contains(&format!("# TYPE {name} counter"));
            assert_eq!(
                counter,
                name.ends_with("_total"),
                "{name}: counters and only counters end in _total"
            );
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("a\nb"), r"a\nb");
    }

    #[test]
    fn requests_are_routed_by_method_and_path() {
        assert_eq!(
            route("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            route("GET /metrics?name[]=x HTTP/1.0\r\n\r\n"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            route("HEAD /metrics HTTP/1.1\r\n\r\n"),
            Route::Metrics { head: true }
        );
        assert_eq!(
            route("GET / HTTP/1.1\r\n\r\n"),
            Route::Index { head: false }
        );
        assert_eq!(route("GET /other HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(
            route("POST /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(route("hello\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(""), Route::BadRequest);
        assert_eq!(route("GET /metrics SPDY/3\r\n\r\n"), Route::BadRequest);
    }
}
