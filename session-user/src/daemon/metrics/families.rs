//! The metric families of a scrape: which name, type, labels and help each counter and
//! gauge gets (README, "Metrics", documents them), and their encoding in the Prometheus
//! text format (0.0.4) by `prometheus-client`.
//!
//! The values are read afresh at every scrape, so the families are built from a
//! [`Snapshot`] as a `prometheus-client` [`Collector`] of constant counters and gauges,
//! rather than kept as live metrics that the daemon would have to update.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, prometheus_text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::{bpf::limits::RuleLimitStats, daemon::metrics::snapshot::Snapshot};

/// The content type of the exposition: the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The value of a sample: counts are integers, durations and ratios decimals.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Value {
    /// A count.
    Count(u64),
    /// Seconds or a ratio.
    Real(f64),
}

/// The labels of one sample, name and value.
type Labels = Vec<(&'static str, String)>;

/// One metric family: its name (a counter's without the `_total` that the encoder appends),
/// type, help and samples.
#[derive(Debug)]
struct Family {
    name: String,
    kind: MetricType,
    help: &'static str,
    samples: Vec<(Labels, Value)>,
}

impl Family {
    /// A family without samples yet, so that it is listed with its help even when empty.
    fn new(name: impl Into<String>, kind: MetricType, help: &'static str) -> Family {
        Family {
            name: name.into(),
            kind,
            help,
            samples: Vec::new(),
        }
    }

    /// The family with one unlabelled sample.
    fn single(
        name: impl Into<String>,
        kind: MetricType,
        help: &'static str,
        value: Value,
    ) -> Family {
        let mut family = Family::new(name, kind, help);
        family.samples.push((Vec::new(), value));
        family
    }
}

/// The families being built, in the order they were first named; samples of a family
/// named again join it, as the text format requires.
#[derive(Default)]
struct Families(Vec<Family>);

impl Families {
    /// The family `name`, declared with `kind` and `help` if it is new.
    fn family(&mut self, name: &str, kind: MetricType, help: &'static str) -> &mut Family {
        let index = match self.0.iter().position(|family| family.name == name) {
            Some(index) => index,
            None => {
                self.0.push(Family::new(name, kind, help));
                self.0.len() - 1
            }
        };
        &mut self.0[index]
    }
}

/// The families of a snapshot, in the order they are exposed.
fn families(snapshot: &Snapshot) -> Vec<Family> {
    let mut out = Families::default();
    let sessions = out.family(
        "session_sessions",
        MetricType::Gauge,
        "Live sessions in the table, by protocol and state (as `session list` shows them).",
    );
    for ((protocol, state), count) in &snapshot.sessions {
        sessions.samples.push((
            vec![("proto", protocol.clone()), ("state", state.to_string())],
            Value::Count(*count),
        ));
    }
    let live: u64 = snapshot.sessions.values().sum();
    out.0.push(Family::single(
        "session_table_max_sessions",
        MetricType::Gauge,
        "Capacity of the session table (`[limits] max_sessions`).",
        Value::Count(snapshot.max_sessions),
    ));
    out.0.push(Family::single(
        "session_table_fill_ratio",
        MetricType::Gauge,
        "Live sessions divided by the table's capacity (0 to 1).",
        Value::Real(ratio(live, snapshot.max_sessions)),
    ));
    for (name, value) in &snapshot.counters {
        let (family, label, help) = kernel_metric(name);
        let labels = label
            .map(|(key, value)| vec![(key, value.to_string())])
            .unwrap_or_default();
        out.family(&family, MetricType::Counter, help)
            .samples
            .push((labels, Value::Count(*value)));
    }
    for (name, value) in &snapshot.daemon {
        let (family, kind, help, sample) = daemon_metric(name, *value);
        out.0.push(Family::single(family, kind, help, sample));
    }
    let rules = out.family(
        "session_rule_hits",
        MetricType::Counter,
        "Packets each rule of the active policy decided; starts from 0 when a policy is applied.",
    );
    for (name, hits) in &snapshot.rules {
        rules
            .samples
            .push((vec![("rule", name.clone())], Value::Count(*hits)));
    }
    for (family, kind, help, value) in [
        (
            "session_rule_limit_sessions",
            MetricType::Gauge,
            "Sessions each rule with a `limit` holds.",
            (|stats: &RuleLimitStats| u64::from(stats.sessions)) as fn(&RuleLimitStats) -> u64,
        ),
        (
            "session_rule_limit_refused",
            MetricType::Counter,
            "New sessions each rule's `limit` refused; starts from 0 when a policy is applied.",
            |stats| stats.refused,
        ),
        (
            "session_rule_limit_overloaded",
            MetricType::Counter,
            "Sources each rule's `limit` put into its overload set; starts from 0 when a policy is applied.",
            |stats| stats.overloaded,
        ),
    ] {
        let samples = &mut out.family(family, kind, help).samples;
        for (name, stats) in &snapshot.limits {
            samples.push((vec![("rule", name.clone())], Value::Count(value(stats))));
        }
    }
    let defaults = out.family(
        "session_default_action_hits",
        MetricType::Counter,
        "Packets no rule matched, decided by the default action of `[policy]`.",
    );
    for (direction, hits) in [
        ("inbound", snapshot.default_inbound_hits),
        ("outbound", snapshot.default_outbound_hits),
    ] {
        defaults.samples.push((
            vec![("direction", direction.to_string())],
            Value::Count(hits),
        ));
    }
    out.0.push(Family::single(
        "session_policy_generation",
        MetricType::Gauge,
        "Generation of the active policy; it grows by one at every start and reload.",
        Value::Count(snapshot.generation.into()),
    ));
    out.0
}

/// `part / whole`, 0 when the whole is 0.
fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// The metric family (without `_total`), label and help of a kernel counter. Counters
/// that are one quantity split by a reason share a family with a label, so a query can
/// sum or compare them.
fn kernel_metric(
    name: &'static str,
) -> (String, Option<(&'static str, &'static str)>, &'static str) {
    if let Some(state) = name.strip_prefix("state_") {
        return (
            "session_packets_by_state".into(),
            Some(("state", state)),
            "IP packets by the session state they were classified in (nftables' ct state).",
        );
    }
    if let Some(reason) = name.strip_prefix("drop_") {
        return (
            "session_drops".into(),
            Some(("reason", reason)),
            "Packets dropped, by reason: rule (a drop rule), default (the default action), \
             table_full (a new session could not be inserted: an insert failure), \
             unjudged (the program could not read its own maps and failed closed).",
        );
    }
    if let Some(reason) = name.strip_prefix("invalid_") {
        return (
            "session_invalid".into(),
            Some(("reason", reason)),
            "Packets classified invalid, by what was wrong with them.",
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
        "expectations_created" => {
            "Expectations set up by UDP requests the host sent to a broadcast or multicast address."
        }
        "expectation_hits" => "Packets classified related because they answered such a request.",
        "fragments_followed" => {
            "Later IP fragments that followed their datagram's first fragment: its state, verdict and session."
        }
        "fragments_unknown" => {
            "Later IP fragments whose first fragment was not seen, passed to the kernel unjudged."
        }
        "limit_refused" => "New sessions a rule's `limit` refused.",
        "sources_overloaded" => "Sources a rule's `limit` put into its overload set.",
        "overload_set_full" => {
            "Sources to overload that found the overload set's maps full (refused, not banned)."
        }
        "syn_defence_handshake" => {
            "Packets of a handshake on a `[syn_defence]` port judged without a session."
        }
        "syn_defence_picked_up" => {
            "Sessions made on a `[syn_defence]` port once the host's stack completed the handshake."
        }
        "fast_path_forwarded" => {
            "Packets of established sessions the fast path handed to their egress interface."
        }
        _ => "A counter of `session stats` (see docs/CONTRACT.md).",
    };
    (format!("session_{name}"), None, help)
}

/// The metric family (a counter's without `_total`), type, help and sample of a daemon
/// counter.
fn daemon_metric(name: &'static str, value: u64) -> (String, MetricType, &'static str, Value) {
    let count = Value::Count(value);
    let seconds = Value::Real(value as f64 / 1e9);
    let (family, kind, help, sample) = match name {
        "sessions_expired" => (
            "session_sessions_expired",
            MetricType::Counter,
            "Expired sessions the reaper removed.",
            count,
        ),
        "reaper_runs" => (
            "session_reaper_runs",
            MetricType::Counter,
            "Reaper sweeps completed (every 5 seconds, less often when sweeps are slow).",
            count,
        ),
        "policy_applies" => (
            "session_policy_applies",
            MetricType::Counter,
            "Policies applied, at start and at each reload.",
            count,
        ),
        "log_lines_suppressed" => (
            "session_log_lines_suppressed",
            MetricType::Counter,
            "Log lines of logged packets left out by the rate limit.",
            count,
        ),
        "set_changes" => (
            "session_set_changes",
            MetricType::Counter,
            "Live changes to named sets (session set add, delete, flush, replace).",
            count,
        ),
        "sessions_readmission_refused" => (
            "session_sessions_readmission_refused",
            MetricType::Counter,
            "Sessions removed after a policy apply because the new policy would not admit them.",
            count,
        ),
        "takeover_conntrack" => (
            "session_takeover_conntrack",
            MetricType::Counter,
            "Connections taken over at first start from the kernel's conntrack table.",
            count,
        ),
        "takeover_sockets" => (
            "session_takeover_sockets",
            MetricType::Counter,
            "Connections taken over at first start from the host's own sockets.",
            count,
        ),
        "takeover_refused" => (
            "session_takeover_refused",
            MetricType::Counter,
            "Connections not taken over: the policy in force would not admit them, or they use NAT.",
            count,
        ),
        "sessions_restored" => (
            "session_sessions_restored",
            MetricType::Counter,
            "Sessions restored from a saved table.",
            count,
        ),
        "restore_refused" => (
            "session_restore_refused",
            MetricType::Counter,
            "Saved sessions not restored: refused by the policy, expired, or already in the table.",
            count,
        ),
        "reaper_ns_total" => (
            "session_reaper_duration_seconds",
            MetricType::Counter,
            "Time spent in reaper sweeps, in total.",
            seconds,
        ),
        "sync_peer_state" => (
            "session_sync_peer_state",
            MetricType::Gauge,
            "The sync peer's state: 0 down, 1 resyncing, 2 up.",
            count,
        ),
        "sync_lag_ns" => (
            "session_sync_lag_seconds",
            MetricType::Gauge,
            "How long the oldest change the sync peer has not acknowledged has waited.",
            seconds,
        ),
        "sync_ready_pid" => (
            "session_sync_ready",
            MetricType::Gauge,
            "1 when this firewall's table may take the traffic over (session sync check), else 0.",
            // The metrics are served by the daemon itself: ready is its own pid.
            Value::Count(u64::from(value == u64::from(std::process::id()))),
        ),
        "sync_unacknowledged" => (
            "session_sync_unacknowledged",
            MetricType::Gauge,
            "Sync messages waiting for the peer's acknowledgement.",
            count,
        ),
        "reaper_last_ns" => (
            "session_reaper_last_duration_seconds",
            MetricType::Gauge,
            "How long the latest reaper sweep took.",
            seconds,
        ),
        _ => {
            return (
                format!("session_{name}"),
                MetricType::Counter,
                "A daemon counter of `session stats` (see docs/CONTRACT.md).",
                count,
            );
        }
    };
    (family.into(), kind, help, sample)
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in families(self) {
            let mut metric =
                encoder.encode_descriptor(&family.name, family.help, None, family.kind)?;
            for (labels, value) in &family.samples {
                let sample = metric.encode_family(labels)?;
                match (family.kind, *value) {
                    (MetricType::Counter, Value::Count(value)) => {
                        ConstCounter::new(value).encode(sample)?;
                    }
                    (MetricType::Counter, Value::Real(value)) => {
                        ConstCounter::new(value).encode(sample)?;
                    }
                    (_, Value::Count(value)) => ConstGauge::new(value).encode(sample)?,
                    (_, Value::Real(value)) => ConstGauge::new(value).encode(sample)?,
                }
            }
        }
        Ok(())
    }
}

impl Snapshot {
    /// The Prometheus text exposition (0.0.4) of this snapshot.
    pub fn render(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        prometheus_text::encode(&mut out, &registry)
            .expect("writing into a String cannot fail, and the families are well formed");
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use session_common::wire::{Counter, DaemonCounter};

    use super::*;

    /// README.md, whose "Metrics" table documents every family for users.
    const README: &str = include_str!("../../../../README.md");

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
            limits: vec![(
                "ssh".into(),
                RuleLimitStats {
                    sessions: 6,
                    refused: 9,
                    overloaded: 2,
                },
            )],
        }
    }

    /// A snapshot with every kernel and daemon counter the wire format defines.
    fn every_counter() -> Snapshot {
        Snapshot {
            counters: Counter::ALL.iter().map(|(_, name)| (*name, 1)).collect(),
            daemon: DaemonCounter::ALL
                .iter()
                .map(|(_, name)| (*name, 1))
                .collect(),
            ..sample()
        }
    }

    /// The value of the sample line that starts with `series` followed by a space.
    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
            .parse()
            .unwrap_or_else(|e| panic!("{series}: not a number: {e}"))
    }

    #[test]
    fn samples_carry_the_snapshot_values() {
        let text = sample().render();
        for (series, expected) in [
            (r#"session_sessions{proto="tcp",state="ESTABLISHED"}"#, 3.0),
            (r#"session_sessions{proto="udp",state="UNREPLIED"}"#, 1.0),
            ("session_table_fill_ratio", 0.00390625),
            ("session_table_max_sessions", 1024.0),
            ("session_packets_seen_total", 100.0),
            (r#"session_packets_by_state_total{state="new"}"#, 7.0),
            (r#"session_drops_total{reason="table_full"}"#, 1.0),
            (r#"session_invalid_total{reason="tcp_flags"}"#, 4.0),
            (r#"session_rule_hits_total{rule="web"}"#, 3.0),
            (r#"session_rule_limit_sessions{rule="ssh"}"#, 6.0),
            (r#"session_rule_limit_refused_total{rule="ssh"}"#, 9.0),
            (r#"session_rule_limit_overloaded_total{rule="ssh"}"#, 2.0),
            (
                r#"session_default_action_hits_total{direction="inbound"}"#,
                5.0,
            ),
            ("session_reaper_runs_total", 12.0),
            ("session_reaper_duration_seconds_total", 0.0035),
            ("session_reaper_last_duration_seconds", 0.00025),
            ("session_policy_generation", 4.0),
        ] {
            assert_eq!(value(&text, series), expected, "{series}");
        }
        assert!(
            text.contains("\nsession_packets_seen_total 100\n"),
            "counts are integers:\n{text}"
        );
    }

    #[test]
    fn an_empty_table_of_no_capacity_has_a_fill_ratio_of_zero() {
        let text = Snapshot::default().render();
        assert_eq!(value(&text, "session_table_fill_ratio"), 0.0);
        assert!(
            text.contains("# TYPE session_sessions gauge\n# HELP session_table_max_sessions"),
            "a family without samples is still declared:\n{text}"
        );
    }

    #[test]
    fn every_family_has_one_header_and_contiguous_samples() {
        let text = every_counter().render();
        let mut seen = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE has a name and a kind");
                assert!(matches!(kind, "counter" | "gauge"), "kind {kind}");
                assert!(!seen.contains(&name.to_string()), "{name} declared twice");
                seen.push(name.to_string());
                current = name.to_string();
            } else if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP has a name and text");
                assert!(help.ends_with('.'), "{name}: help {help:?}");
                assert!(!help.ends_with(".."), "{name}: help {help:?}");
            } else {
                let series = line.split(['{', ' ']).next().unwrap_or("");
                assert_eq!(series, current, "sample {line:?} outside its family");
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
        let snapshot = Snapshot {
            rules: vec![("a\"b\\c".into(), 1)],
            ..Snapshot::default()
        };
        let text = snapshot.render();
        assert!(
            text.contains(r#"session_rule_hits_total{rule="a\"b\\c"} 1"#),
            "{text}"
        );
    }

    /// Every family and label the README's "Metrics" table documents is exposed with the
    /// documented type, labels and (where the table lists them) label values, and nothing
    /// undocumented is.
    #[test]
    fn the_exposition_is_the_documented_one() {
        let text = every_counter().render();
        let section = README
            .split_once("## Metrics")
            .expect("README has a Metrics section")
            .1;
        let mut documented = BTreeSet::new();
        for row in section
            .lines()
            .filter(|line| line.starts_with("| `session_"))
        {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let (names, kind, labels) = (cells[1], cells[2], cells[3]);
            // Label names are the backquoted words before a colon; the values, where the
            // table lists them, a comma list after it.
            let (label_names, label_values) = match labels.split_once(':') {
                Some((names, values)) if names.starts_with('`') => {
                    let names: Vec<&str> = names
                        .split(',')
                        .map(|name| name.trim().trim_matches('`'))
                        .collect();
                    let values: Vec<&str> = values
                        .split('(')
                        .next()
                        .unwrap_or("")
                        .split(',')
                        .map(str::trim)
                        .collect();
                    let listed = values
                        .iter()
                        .all(|value| !value.is_empty() && !value.contains(' '));
                    (names, listed.then_some(values))
                }
                _ => (Vec::new(), None),
            };
            for name in names.split(',').map(|name| name.trim().trim_matches('`')) {
                documented.insert(name.to_string());
                assert!(
                    text.contains(&format!("\n# TYPE {name} {kind}\n")),
                    "README documents {name} as a {kind}:\n{text}"
                );
                let mut values = BTreeSet::new();
                for line in text.lines().filter(|line| {
                    line.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with(['{', ' ']))
                }) {
                    let keys: Vec<&str> = line
                        .split_once('{')
                        .map(|(_, rest)| rest.split_once('}').expect("closing brace").0)
                        .into_iter()
                        .flat_map(|pairs| pairs.split(','))
                        .map(|pair| {
                            let (key, value) = pair.split_once('=').expect("key=value");
                            values.insert(value.trim_matches('"').to_string());
                            key
                        })
                        .collect();
                    assert_eq!(keys, label_names, "labels of {line}");
                }
                if let Some(expected) = &label_values {
                    let expected: BTreeSet<String> =
                        expected.iter().map(|value| value.to_string()).collect();
                    assert_eq!(values, expected, "label values of {name}");
                }
            }
        }
        let exposed: BTreeSet<String> = text
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .map(|rest| rest.split(' ').next().unwrap_or("").to_string())
            .collect();
        assert_eq!(
            exposed, documented,
            "exposed families against README's table"
        );
    }
}
