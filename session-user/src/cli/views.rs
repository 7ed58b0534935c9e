//! What `session list` and `session stats` print, in human and JSON form. The JSON form
//! is the serde serialisation of [`SessionView`] and [`Stats`], so the field names and
//! types that docs/CONTRACT.md documents are the ones the compiler checks.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
};

use serde::{
    Deserialize, Deserializer, Serialize, Serializer,
    de::{MapAccess, Visitor},
};
use session_common::{
    limits::SourceKey,
    track::originator_endpoints,
    wire::{
        FAMILY_IPV4, FlowKey, FlowState, HIT_DEFAULT_INBOUND, HIT_DEFAULT_OUTBOUND,
        RULE_ID_DEFAULT, Session, TcpState, proto, session_flags,
    },
};

use crate::bpf::limits::{RuleLimitStats, SourceEntry};

/// The address family of a session or event, as `"family"` names it in the JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `"ipv4"`.
    Ipv4,
    /// `"ipv6"`.
    Ipv6,
}

impl Family {
    /// The family of a wire `family` byte (anything but IPv4 is IPv6, as in the kernel).
    pub fn from_wire(family: u8) -> Family {
        if family == FAMILY_IPV4 {
            Family::Ipv4
        } else {
            Family::Ipv6
        }
    }
}

/// One session as the user sees it, oriented from its originator: a row of `session list`
/// and, serialised, one object of `session list --json` (docs/CONTRACT.md), field for field
/// in the documented order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionView {
    /// IPv4 or IPv6.
    pub family: Family,
    /// Protocol name (tcp, udp, icmp, icmpv6) or number as a string.
    pub proto: String,
    /// Originator address.
    pub src: IpAddr,
    /// Originator port (ICMP: echo id).
    pub sport: u16,
    /// Responder address.
    pub dst: IpAddr,
    /// Responder port (ICMP: 0).
    pub dport: u16,
    /// Protocol state name (`ESTABLISHED`, `REPLIED`…).
    pub state: String,
    /// Whether the flow is assured.
    pub assured: bool,
    /// Seconds until expiry.
    pub expires_in_secs: u64,
    /// Packets from the originator.
    pub orig_packets: u64,
    /// Bytes from the originator.
    pub orig_bytes: u64,
    /// Packets from the responder.
    pub reply_packets: u64,
    /// Bytes from the responder.
    pub reply_bytes: u64,
    /// Name of the rule that admitted it.
    pub rule: String,
}

/// An address as stored in keys and events (IPv4 mapped into IPv6) as the user writes it.
pub fn address(family: u8, bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match (family, v6.to_ipv4_mapped()) {
        (FAMILY_IPV4, Some(v4)) => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    }
}

/// Protocol name as users write it in the config.
pub fn proto_name(number: u8) -> String {
    match number {
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::ICMP => "icmp".into(),
        proto::ICMPV6 => "icmpv6".into(),
        other => other.to_string(),
    }
}

/// The protocol state name of a session (`ESTABLISHED`, `REPLIED`…), as `list` shows it.
pub fn state_name(proto_number: u8, state: u8) -> &'static str {
    if proto_number == proto::TCP {
        TcpState::from_u8(state).name()
    } else {
        FlowState::from_u8(state).name()
    }
}

/// The name of rule `rule_id` of the active policy, `(default)` for a default action.
pub fn rule_label(rule_id: u16, rule_names: &[String]) -> String {
    if rule_id == RULE_ID_DEFAULT {
        "(default)".to_string()
    } else {
        rule_names
            .get(rule_id as usize)
            .cloned()
            .unwrap_or_else(|| format!("#{rule_id}"))
    }
}

impl SessionView {
    /// Orients a stored session for display.
    pub fn new(key: &FlowKey, session: &Session, now: u64, rule_names: &[String]) -> SessionView {
        let (src, sport, dst, dport) = originator_endpoints(key, session);
        let is_icmp = key.proto == proto::ICMP || key.proto == proto::ICMPV6;
        let state = state_name(key.proto, session.state);
        let rule = rule_label(session.rule_id, rule_names);
        SessionView {
            family: Family::from_wire(key.family),
            proto: proto_name(key.proto),
            src: address(key.family, src),
            sport,
            dst: address(key.family, dst),
            dport: if is_icmp { 0 } else { dport },
            state: state.to_string(),
            assured: session.flags & session_flags::ASSURED != 0,
            expires_in_secs: session.expires_ns.saturating_sub(now) / 1_000_000_000,
            orig_packets: session.packets[0],
            orig_bytes: session.bytes[0],
            reply_packets: session.packets[1],
            reply_bytes: session.bytes[1],
            rule,
        }
    }
}

/// Which sessions `list` and `flush` act on; every given criterion must hold.
#[derive(Clone, Debug, Default, PartialEq, clap::Args)]
pub struct SessionFilter {
    /// Only sessions in this state (e.g. ESTABLISHED, TIME_WAIT, REPLIED; any case).
    #[arg(long)]
    pub state: Option<String>,
    /// Only this protocol (tcp, udp, icmp, icmpv6 or a number).
    #[arg(long)]
    pub proto: Option<String>,
    /// Only sessions with this address at either end.
    #[arg(long)]
    pub addr: Option<IpAddr>,
    /// Only sessions with this port at either end.
    #[arg(long)]
    pub port: Option<u16>,
}

impl SessionFilter {
    /// Whether `view` passes every criterion.
    pub fn matches(&self, view: &SessionView) -> bool {
        self.state
            .as_ref()
            .is_none_or(|state| state.eq_ignore_ascii_case(&view.state))
            && self
                .proto
                .as_ref()
                .is_none_or(|proto| proto.eq_ignore_ascii_case(&view.proto))
            && self
                .addr
                .is_none_or(|addr| addr == view.src || addr == view.dst)
            && self
                .port
                .is_none_or(|port| port == view.sport || port == view.dport)
    }
}

/// `addr:port` (`[v6]:port` for IPv6), or the bare address without a port.
pub fn endpoint(addr: IpAddr, port: u16, show_port: bool) -> String {
    match (addr, show_port) {
        (IpAddr::V6(v6), true) => format!("[{v6}]:{port}"),
        (addr, true) => format!("{addr}:{port}"),
        (addr, false) => addr.to_string(),
    }
}

/// A human table of sessions, like `conntrack -L` but aligned.
pub fn sessions_table(views: &[SessionView]) -> String {
    let mut rows = vec![[
        "PROTO".to_string(),
        "STATE".to_string(),
        "SOURCE".to_string(),
        "DESTINATION".to_string(),
        "EXPIRES".to_string(),
        "PACKETS".to_string(),
        "BYTES".to_string(),
        "RULE".to_string(),
    ]];
    for view in views {
        let is_icmp = view.proto.starts_with("icmp");
        let has_ports = view.proto == "tcp" || view.proto == "udp";
        let src = if is_icmp {
            format!("{} id={}", view.src, view.sport)
        } else {
            endpoint(view.src, view.sport, has_ports)
        };
        let mut state = view.state.clone();
        if view.assured {
            state.push_str(" [ASSURED]");
        }
        rows.push([
            view.proto.clone(),
            state,
            src,
            endpoint(view.dst, view.dport, has_ports),
            format!("{}s", view.expires_in_secs),
            format!("{}/{}", view.orig_packets, view.reply_packets),
            format!("{}/{}", view.orig_bytes, view.reply_bytes),
            view.rule.clone(),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|col| rows.iter().map(|row| row[col].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&format!("{} session(s)\n", views.len()));
    out
}

/// Counters by name, in the order `session stats` lists them (kernel counters, then the
/// daemon's); a JSON object in that order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters(pub Vec<(String, u64)>);

impl Serialize for Counters {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(name, value)| (name, value)))
    }
}

impl<'de> Deserialize<'de> for Counters {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Counters, D::Error> {
        /// Reads the object's entries in their order.
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Counters;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("an object of counter names and values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Counters, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Counters(entries))
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

/// One source a limited rule counts, an element of `session list --sources --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceView {
    /// The rule that counts it.
    pub rule: String,
    /// The source: an address, or the prefix the rule counts as one source.
    pub source: String,
    /// Sessions it holds through the rule.
    pub sessions: u32,
    /// New sessions the rule's limits refused it.
    pub refused: u32,
}

impl SourceView {
    /// The view of one counted source.
    pub fn new(entry: &SourceEntry, rule_names: &[String]) -> SourceView {
        let SourceKey {
            addr,
            rule_id,
            family,
            prefix,
        } = entry.key;
        let addr = address(family, addr);
        let full = if family == FAMILY_IPV4 { 32 } else { 128 };
        SourceView {
            rule: rule_label(rule_id, rule_names),
            source: if prefix >= full {
                addr.to_string()
            } else {
                format!("{addr}/{prefix}")
            },
            sessions: entry.state.conns,
            refused: entry.state.refused,
        }
    }
}

/// The human table of `session list --sources`.
pub fn sources_table(views: &[SourceView]) -> String {
    let width = views
        .iter()
        .map(|view| view.source.len())
        .max()
        .unwrap_or(0)
        .max("SOURCE".len());
    let mut out = format!(
        "{:<width$}  {:>8}  {:>8}  RULE\n",
        "SOURCE", "SESSIONS", "REFUSED"
    );
    for view in views {
        out.push_str(&format!(
            "{:<width$}  {:>8}  {:>8}  {}\n",
            view.source, view.sessions, view.refused, view.rule
        ));
    }
    out
}

/// The hits of one rule of the active policy, an element of `"rules"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleHits {
    /// The rule's name.
    pub name: String,
    /// Packets it decided since the policy was applied.
    pub hits: u64,
    /// The rule's limits at work, for a rule with a `limit` table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<RuleLimitView>,
}

/// What a rule's limits did, in `"rules"` of `session stats --json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleLimitView {
    /// Sessions the rule holds now (as of the reaper's last recount, plus admissions).
    pub sessions: u32,
    /// New sessions its limits refused since the policy was applied.
    pub refused: u64,
    /// Sources it put into its overload set since the policy was applied.
    pub overloaded: u64,
}

/// Everything `session stats` reports; serialised, the object of `session stats --json`
/// (docs/CONTRACT.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    /// Kernel counters then daemon counters, by name.
    pub counters: Counters,
    /// Live sessions.
    pub sessions: u64,
    /// Table capacity.
    pub max_sessions: u64,
    /// Rule names with hits, in policy order.
    pub rules: Vec<RuleHits>,
    /// Hits of the inbound default.
    pub default_inbound_hits: u64,
    /// Hits of the outbound default.
    pub default_outbound_hits: u64,
}

impl Stats {
    /// Builds the report from raw hit slots.
    pub fn new(
        counters: Vec<(&'static str, u64)>,
        sessions: u64,
        max_sessions: u64,
        names: &[String],
        hits: &[u64],
        limits: &[(u16, RuleLimitStats)],
    ) -> Stats {
        let hit = |slot: u32| hits.get(slot as usize).copied().unwrap_or(0);
        Stats {
            counters: Counters(
                counters
                    .into_iter()
                    .map(|(name, value)| (name.to_string(), value))
                    .collect(),
            ),
            sessions,
            max_sessions,
            rules: names
                .iter()
                .enumerate()
                .map(|(id, name)| RuleHits {
                    name: name.clone(),
                    hits: hit(id as u32),
                    limit: limits
                        .iter()
                        .find(|(rule, _)| usize::from(*rule) == id)
                        .map(|(_, stats)| RuleLimitView {
                            sessions: stats.sessions,
                            refused: stats.refused,
                            overloaded: stats.overloaded,
                        }),
                })
                .collect(),
            default_inbound_hits: hit(HIT_DEFAULT_INBOUND),
            default_outbound_hits: hit(HIT_DEFAULT_OUTBOUND),
        }
    }

    /// Human report.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "sessions: {} of {} ({:.1}% full)\n\ncounters:\n",
            self.sessions,
            self.max_sessions,
            100.0 * self.sessions as f64 / self.max_sessions.max(1) as f64
        );
        let width = self
            .counters
            .0
            .iter()
            .map(|(name, _)| name.len())
            .max()
            .unwrap_or(0);
        for (name, value) in &self.counters.0 {
            out.push_str(&format!("  {name:<width$}  {value}\n"));
        }
        out.push_str("\nrule hits:\n");
        let width = self
            .rules
            .iter()
            .map(|rule| rule.name.len())
            .max()
            .unwrap_or(0)
            .max("(default outbound)".len());
        for RuleHits { name, hits, limit } in &self.rules {
            out.push_str(&format!("  {name:<width$}  {hits}"));
            if let Some(limit) = limit {
                out.push_str(&format!(
                    "  (limit: {} sessions, {} refused, {} overloaded)",
                    limit.sessions, limit.refused, limit.overloaded
                ));
            }
            out.push('\n');
        }
        out.push_str(&format!(
            "  {:<width$}  {}\n  {:<width$}  {}\n",
            "(default inbound)",
            self.default_inbound_hits,
            "(default outbound)",
            self.default_outbound_hits
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::cli::contract_examples::{contract_example, contract_text, documented_flow, keys};

    #[test]
    fn the_documented_session_reads_into_the_record_and_back_unchanged() {
        let documented = contract_example("## `session list --json`");
        let view: SessionView = serde_json::from_value(documented.clone())
            .unwrap_or_else(|e| panic!("the documented session does not fit SessionView: {e}"));
        assert_eq!(serde_json::to_value(&view).expect("JSON"), documented);
        assert_eq!(view.family, Family::Ipv4);
        assert_eq!(view.orig_packets, 5);
    }

    #[test]
    fn a_listed_session_has_exactly_the_documented_fields() {
        let key = documented_flow();
        let session = Session {
            expires_ns: 431_999_500_000_000,
            packets: [5, 4],
            bytes: [400, 300],
            state: TcpState::Established as u8,
            flags: session_flags::ORIG_IS_LO | session_flags::ASSURED,
            rule_id: 0,
            ..bytemuck::Zeroable::zeroed()
        };
        let view = SessionView::new(&key, &session, 0, &["web".into()]);
        let produced = serde_json::to_value(&view).expect("JSON");
        assert_eq!(
            produced,
            contract_example("## `session list --json`"),
            "the documented example is this very session"
        );
    }

    #[test]
    fn the_documented_stats_read_into_the_record_and_back_unchanged() {
        let documented = contract_example("## `session stats --json`");
        let stats: Stats = serde_json::from_str(&contract_text("## `session stats --json`"))
            .unwrap_or_else(|e| panic!("the documented stats do not fit Stats: {e}"));
        assert_eq!(serde_json::to_value(&stats).expect("JSON"), documented);
        assert_eq!(stats.counters.0[0], ("packets_seen".to_string(), 1));
        assert_eq!(stats.rules[0].name, "web");
    }

    #[test]
    fn produced_stats_have_exactly_the_documented_fields_with_counters_in_order() {
        let documented = contract_example("## `session stats --json`");
        let stats = Stats::new(
            vec![("packets_seen", 3), ("drop_rule", 1), ("reaper_runs", 2)],
            4,
            1024,
            &["web".into()],
            &[7],
            &[],
        );
        let text = serde_json::to_string(&stats).expect("JSON");
        assert!(
            text.starts_with(r#"{"counters":{"packets_seen":3,"drop_rule":1,"reaper_runs":2},"#),
            "counters keep the order `session stats` prints them in: {text}"
        );
        let produced: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(keys(&produced), keys(&documented));
        assert_eq!(keys(&produced["rules"][0]), keys(&documented["rules"][0]));
        assert_eq!(produced["rules"][0]["hits"], 7);
        let back: Stats = serde_json::from_str(&text).expect("reads back");
        assert_eq!(back, stats);
    }

    #[test]
    fn the_documented_source_reads_into_the_record_and_back_unchanged() {
        let documented = contract_example("## `session list --sources --json`");
        let view: SourceView = serde_json::from_value(documented.clone())
            .unwrap_or_else(|e| panic!("the documented source does not fit SourceView: {e}"));
        assert_eq!(serde_json::to_value(&view).expect("JSON"), documented);
    }

    #[test]
    fn a_counted_prefix_is_shown_with_its_length_and_an_address_without() {
        use session_common::limits::{RuleLimit, SourceState};
        let mut addr = [0u8; 16];
        addr[10..12].copy_from_slice(&[0xff, 0xff]);
        addr[12..].copy_from_slice(&[198, 18, 7, 9]);
        let per_24 = RuleLimit {
            src_prefix_v4: 24,
            ..RuleLimit::default()
        };
        let entry = |limit: &RuleLimit| SourceEntry {
            key: SourceKey::of(limit, 0, FAMILY_IPV4, &addr),
            state: SourceState {
                conns: 2,
                refused: 5,
                ..SourceState::default()
            },
        };
        let names = ["ssh".to_string()];
        let view = SourceView::new(&entry(&per_24), &names);
        assert_eq!(
            (
                view.source.as_str(),
                view.rule.as_str(),
                view.sessions,
                view.refused
            ),
            ("198.18.7.0/24", "ssh", 2, 5)
        );
        let per_address = RuleLimit {
            src_prefix_v4: 32,
            ..RuleLimit::default()
        };
        assert_eq!(
            SourceView::new(&entry(&per_address), &names).source,
            "198.18.7.9"
        );
        let table = sources_table(&[view]);
        assert!(table.starts_with("SOURCE"), "{table}");
        assert!(table.contains("198.18.7.0/24"), "{table}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut documented = contract_example("## `session list --json`");
        documented["extra"] = Value::Bool(true);
        assert!(serde_json::from_value::<SessionView>(documented).is_err());
    }
}
