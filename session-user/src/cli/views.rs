//! What `session list` and `session stats` print, in human and JSON form.

use std::net::{IpAddr, Ipv6Addr};

use serde_json::{Value, json};
use session_common::{
    track::originator_endpoints,
    wire::{
        FAMILY_IPV4, FlowKey, FlowState, HIT_DEFAULT_INBOUND, HIT_DEFAULT_OUTBOUND,
        RULE_ID_DEFAULT, Session, TcpState, proto, session_flags,
    },
};

/// One session as the user sees it: oriented from its originator.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionView {
    /// "ipv4" or "ipv6".
    pub family: &'static str,
    /// Protocol name or number.
    pub proto: String,
    /// Originator address.
    pub src: IpAddr,
    /// Originator port (ICMP: echo id).
    pub sport: u16,
    /// Responder address.
    pub dst: IpAddr,
    /// Responder port (ICMP: 0).
    pub dport: u16,
    /// State name.
    pub state: &'static str,
    /// Whether the flow is assured.
    pub assured: bool,
    /// Seconds until expiry.
    pub expires_in_secs: u64,
    /// Packets and bytes, original then reply.
    pub packets: [u64; 2],
    /// Bytes, original then reply.
    pub bytes: [u64; 2],
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
            family: if key.family == FAMILY_IPV4 {
                "ipv4"
            } else {
                "ipv6"
            },
            proto: proto_name(key.proto),
            src: address(key.family, src),
            sport,
            dst: address(key.family, dst),
            dport: if is_icmp { 0 } else { dport },
            state,
            assured: session.flags & session_flags::ASSURED != 0,
            expires_in_secs: session.expires_ns.saturating_sub(now) / 1_000_000_000,
            packets: session.packets,
            bytes: session.bytes,
            rule,
        }
    }

    /// The JSON object documented in docs/CONTRACT.md.
    pub fn to_json(&self) -> Value {
        json!({
            "family": self.family,
            "proto": self.proto,
            "src": self.src.to_string(),
            "sport": self.sport,
            "dst": self.dst.to_string(),
            "dport": self.dport,
            "state": self.state,
            "assured": self.assured,
            "expires_in_secs": self.expires_in_secs,
            "orig_packets": self.packets[0],
            "orig_bytes": self.bytes[0],
            "reply_packets": self.packets[1],
            "reply_bytes": self.bytes[1],
            "rule": self.rule,
        })
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
            .is_none_or(|state| state.eq_ignore_ascii_case(view.state))
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
        let mut state = view.state.to_string();
        if view.assured {
            state.push_str(" [ASSURED]");
        }
        rows.push([
            view.proto.clone(),
            state,
            src,
            endpoint(view.dst, view.dport, has_ports),
            format!("{}s", view.expires_in_secs),
            format!("{}/{}", view.packets[0], view.packets[1]),
            format!("{}/{}", view.bytes[0], view.bytes[1]),
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

/// Everything `session stats` reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    /// Kernel counters then daemon counters, by name.
    pub counters: Vec<(&'static str, u64)>,
    /// Live sessions.
    pub sessions: u64,
    /// Table capacity.
    pub max_sessions: u64,
    /// Rule names with hits.
    pub rules: Vec<(String, u64)>,
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
    ) -> Stats {
        let hit = |slot: u32| hits.get(slot as usize).copied().unwrap_or(0);
        Stats {
            counters,
            sessions,
            max_sessions,
            rules: names
                .iter()
                .enumerate()
                .map(|(id, name)| (name.clone(), hit(id as u32)))
                .collect(),
            default_inbound_hits: hit(HIT_DEFAULT_INBOUND),
            default_outbound_hits: hit(HIT_DEFAULT_OUTBOUND),
        }
    }

    /// The JSON object documented in docs/CONTRACT.md.
    pub fn to_json(&self) -> Value {
        let counters: serde_json::Map<String, Value> = self
            .counters
            .iter()
            .map(|(name, value)| (name.to_string(), json!(value)))
            .collect();
        json!({
            "counters": counters,
            "sessions": self.sessions,
            "max_sessions": self.max_sessions,
            "rules": self.rules.iter().map(|(name, hits)| json!({"name": name, "hits": hits})).collect::<Vec<_>>(),
            "default_inbound_hits": self.default_inbound_hits,
            "default_outbound_hits": self.default_outbound_hits,
        })
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
            .iter()
            .map(|(name, _)| name.len())
            .max()
            .unwrap_or(0);
        for (name, value) in &self.counters {
            out.push_str(&format!("  {name:<width$}  {value}\n"));
        }
        out.push_str("\nrule hits:\n");
        let width = self
            .rules
            .iter()
            .map(|(name, _)| name.len())
            .max()
            .unwrap_or(0)
            .max("(default outbound)".len());
        for (name, hits) in &self.rules {
            out.push_str(&format!("  {name:<width$}  {hits}\n"));
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
