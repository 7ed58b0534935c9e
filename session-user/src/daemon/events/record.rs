//! The typed event: what the daemon sends each `session events` client as one JSON line
//! (docs/CONTRACT.md, "`session events --json`") and what the client reads back to print
//! the human line. Daemon and client share these types, so a field cannot go missing on
//! one side only.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use session_common::wire::{self, CtState, Event, FlowKey, Hook, Session, event_kind};

use crate::{
    bpf::clock::monotonic_ns,
    cli::views::{Family, SessionView, address, endpoint, proto_name, rule_label},
};

/// What happened, one of the names in `"events"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// The packet stored a session.
    New,
    /// The packet finished the FIN handshake or reset the session.
    Closed,
    /// The reaper freed the session after its timeout.
    Expired,
    /// A `log = true` rule decided the packet.
    Logged,
    /// The rule's limits refused the packet's source and put it into the rule's
    /// overload set.
    Overloaded,
}

impl EventKind {
    /// The kinds in the order they are listed, with their [`event_kind`] bits.
    const ALL: [(u8, EventKind); 5] = [
        (event_kind::NEW, EventKind::New),
        (event_kind::CLOSED, EventKind::Closed),
        (event_kind::EXPIRED, EventKind::Expired),
        (event_kind::LOGGED, EventKind::Logged),
        (event_kind::OVERLOADED, EventKind::Overloaded),
    ];

    /// The kinds set in a kernel event's `kind` bits.
    pub fn from_bits(bits: u8) -> Vec<EventKind> {
        EventKind::ALL
            .iter()
            .filter(|(bit, _)| bits & bit != 0)
            .map(|(_, kind)| *kind)
            .collect()
    }

    /// The tag of the human line, e.g. `[NEW]`.
    fn tag(self) -> &'static str {
        match self {
            EventKind::New => "[NEW]",
            EventKind::Closed => "[CLOSED]",
            EventKind::Expired => "[EXPIRED]",
            EventKind::Logged => "[LOGGED]",
            EventKind::Overloaded => "[OVERLOADED]",
        }
    }
}

/// What the kernel path did with the packet of an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventAction {
    /// Passed.
    Accept,
    /// Dropped.
    Drop,
}

/// Whether the packet of an event arrived (XDP or TC ingress) or was sent (TC egress).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Arriving on the interface.
    In,
    /// Leaving through the interface.
    Out,
}

/// One event, as docs/CONTRACT.md documents it, field for field in the documented order.
/// Kernel events describe a packet (`action`, `direction`, `iface` present, the packet's
/// ct state); expired events describe a session from its originator (its protocol state,
/// `orig_packets` and `reply_packets` present).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventRecord {
    /// Wall-clock time, RFC 3339 with milliseconds, UTC.
    pub time: String,
    /// What happened, one or more.
    pub events: Vec<EventKind>,
    /// IPv4 or IPv6.
    pub family: Family,
    /// Protocol name or number, as in `list`.
    pub proto: String,
    /// Source address (kernel events: the packet's; expired: the originator's).
    pub src: IpAddr,
    /// Source port (ICMP: the echo id).
    pub sport: u16,
    /// Destination address.
    pub dst: IpAddr,
    /// Destination port.
    pub dport: u16,
    /// Kernel events: the packet's ct state (`new`…); expired: the protocol state (`ESTABLISHED`…).
    pub state: String,
    /// What the kernel path did with the packet (kernel events only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<EventAction>,
    /// The packet's direction (kernel events only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    /// The interface the packet crossed (kernel events only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iface: Option<String>,
    /// The rule that decided the packet or admitted the session, `(default)` for a default action.
    pub rule: String,
    /// Packets the originator sent (expired events only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orig_packets: Option<u64>,
    /// Packets the responder sent (expired events only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_packets: Option<u64>,
}

impl EventRecord {
    /// The event of a kernel ring buffer record.
    pub fn from_kernel(event: &Event, rule_names: &[String]) -> EventRecord {
        let state = CtState::ALL
            .get(event.state as usize)
            .map_or("untracked", |state| state.name());
        EventRecord {
            time: wall_clock(event.time_ns),
            events: EventKind::from_bits(event.kind),
            family: Family::from_wire(event.family),
            proto: proto_name(event.proto),
            src: address(event.family, event.src),
            sport: event.sport,
            dst: address(event.family, event.dst),
            dport: event.dport,
            state: state.to_string(),
            action: Some(if event.action == wire::Action::Drop as u8 {
                EventAction::Drop
            } else {
                EventAction::Accept
            }),
            direction: Some(if event.hook == Hook::Egress as u8 {
                Direction::Out
            } else {
                Direction::In
            }),
            iface: Some(iface_name(event.ifindex)),
            rule: rule_label(event.rule_id, rule_names),
            orig_packets: None,
            reply_packets: None,
        }
    }

    /// The event of a session the reaper removed.
    pub fn expired(key: &FlowKey, session: &Session, rule_names: &[String]) -> EventRecord {
        let view = SessionView::new(key, session, session.expires_ns, rule_names);
        EventRecord {
            time: wall_clock(session.expires_ns),
            events: vec![EventKind::Expired],
            family: view.family,
            proto: view.proto,
            src: view.src,
            sport: view.sport,
            dst: view.dst,
            dport: view.dport,
            state: view.state,
            action: None,
            direction: None,
            iface: None,
            rule: view.rule,
            orig_packets: Some(view.orig_packets),
            reply_packets: Some(view.reply_packets),
        }
    }

    /// The event as the socket carries it: one JSON object (without the newline).
    pub fn to_json(&self) -> String {
        json_line(self)
    }

    /// The event as a line of text, like `conntrack -E`:
    /// `2026-11-23T17:06:11.020Z [NEW] tcp 198.18.0.1:46134 -> 198.18.0.2:8080 in eth0 new accept rule=web`.
    pub fn human_line(&self) -> String {
        let tags: String = self.events.iter().map(|kind| kind.tag()).collect();
        let mut line = format!(
            "{} {tags} {} {} -> {}",
            self.time,
            self.proto,
            endpoint(self.src, self.sport, true),
            endpoint(self.dst, self.dport, true),
        );
        let direction = self.direction.map(|direction| match direction {
            Direction::In => "in",
            Direction::Out => "out",
        });
        let action = self.action.map(|action| match action {
            EventAction::Accept => "accept",
            EventAction::Drop => "drop",
        });
        for word in [
            direction,
            self.iface.as_deref(),
            Some(self.state.as_str()),
            action,
        ]
        .into_iter()
        .flatten()
        .filter(|word| !word.is_empty())
        {
            line.push(' ');
            line.push_str(word);
        }
        line.push_str(" rule=");
        line.push_str(&self.rule);
        line
    }
}

/// What a client that read too slowly gets in place of the events it missed: `{"lost": N}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lost {
    /// How many events this client missed.
    pub lost: u64,
}

/// The kind of a set change line, the one name in its `"events"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetEventKind {
    /// A named set was changed live (`session set ...`).
    Set,
}

/// A live change to a named set, as the daemon reports it once it notices:
/// `{"time":..,"events":["set"],"set":"block","entries":N,"changes":N}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetChange {
    /// Wall-clock time the daemon noticed the change (RFC 3339, milliseconds).
    pub time: String,
    /// Always `["set"]`, so that clients filtering on `events` see what it is.
    pub events: Vec<SetEventKind>,
    /// The set's name.
    pub set: String,
    /// Prefixes in the set after the change.
    pub entries: u64,
    /// Live changes made to the set so far.
    pub changes: u64,
}

impl SetChange {
    /// The change of `set`, noticed now.
    pub fn now(set: String, entries: u64, changes: u64) -> SetChange {
        SetChange {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            events: vec![SetEventKind::Set],
            set,
            entries,
            changes,
        }
    }

    /// The line as the socket carries it (without the newline).
    pub fn to_json(&self) -> String {
        json_line(self)
    }

    /// The line `session events` prints, e.g.
    /// `2026-12-04T17:00:00.000Z [SET] block entries=3 changes=1`.
    pub fn human_line(&self) -> String {
        format!(
            "{} [SET] {} entries={} changes={}",
            self.time, self.set, self.entries, self.changes
        )
    }
}

/// One line of the event stream: an event, a set change, or the count of events a slow
/// client missed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StreamLine {
    /// Events this client missed.
    Lost(Lost),
    /// A live change to a named set.
    SetChange(SetChange),
    /// An event.
    Event(Box<EventRecord>),
}

impl Lost {
    /// The line as the socket carries it (without the newline).
    pub fn to_json(&self) -> String {
        json_line(self)
    }
}

/// One value of the stream as a JSON line (without the newline).
fn json_line<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect(
        "stream lines have only named fields of strings, numbers and lists of names, which JSON always encodes",
    )
}

/// Wall-clock time of a CLOCK_MONOTONIC timestamp, for people reading the stream.
fn wall_clock(monotonic: u64) -> String {
    let age = Duration::from_nanos(monotonic_ns().saturating_sub(monotonic));
    let at = SystemTime::now()
        .checked_sub(age)
        .unwrap_or(SystemTime::now());
    humantime::format_rfc3339_millis(at).to_string()
}

/// The name of interface `ifindex`, `if<N>` when it has none (any more).
fn iface_name(ifindex: u32) -> String {
    crate::bpf::netdev::index_to_name(ifindex).unwrap_or_else(|| format!("if{ifindex}"))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use serde_json::{Value, json};
    use session_common::wire::{Action, FAMILY_IPV4, TcpState, proto, session_flags};

    use super::*;
    use crate::cli::contract_examples::{CONTRACT, contract_example, documented_flow, keys};

    /// README.md, whose `session events` section shows the human lines.
    const README: &str = include_str!("../../../../README.md");

    fn kernel_event() -> Event {
        Event {
            time_ns: monotonic_ns(),
            src: Ipv4Addr::new(198, 18, 0, 1).to_ipv6_mapped().octets(),
            dst: Ipv4Addr::new(198, 18, 0, 2).to_ipv6_mapped().octets(),
            sport: 40000,
            dport: 22,
            rule_id: 1,
            kind: event_kind::NEW | event_kind::LOGGED,
            proto: proto::TCP,
            family: FAMILY_IPV4,
            state: CtState::New as u8,
            action: Action::Accept as u8,
            hook: Hook::Ingress as u8,
            ifindex: 1,
        }
    }

    #[test]
    fn the_documented_event_reads_into_the_record_and_back_unchanged() {
        let documented = contract_example("## `session events --json`");
        let record: EventRecord = serde_json::from_value(documented.clone())
            .unwrap_or_else(|e| panic!("the documented event does not fit EventRecord: {e}"));
        let again: Value = serde_json::from_str(&record.to_json()).expect("JSON");
        assert_eq!(again, documented);
        assert_eq!(
            record.human_line(),
            "2026-11-23T17:06:10.568Z [NEW] tcp 198.18.0.1:40000 -> 198.18.0.2:8080 in eth0 new accept rule=web"
        );
    }

    #[test]
    fn a_kernel_event_has_exactly_the_documented_fields() {
        let documented = contract_example("## `session events --json`");
        let produced: Value =
            serde_json::from_str(&EventRecord::from_kernel(&kernel_event(), &[]).to_json())
                .expect("JSON");
        assert_eq!(keys(&produced), keys(&documented));
        for key in ["family", "proto", "state", "action", "direction"] {
            assert_eq!(produced[key], documented[key], "{key}");
        }
        assert_eq!(produced["events"], json!(["new", "logged"]));
        assert_eq!(produced["rule"], "#1", "a rule id without a name");
    }

    #[test]
    fn an_expired_event_describes_the_session_without_packet_fields() {
        let key = documented_flow();
        let session = Session {
            expires_ns: monotonic_ns(),
            packets: [5, 4],
            state: TcpState::TimeWait as u8,
            flags: session_flags::ORIG_IS_LO,
            rule_id: 0,
            ..bytemuck::Zeroable::zeroed()
        };
        let record = EventRecord::expired(&key, &session, &["web".into()]);
        let produced: Value = serde_json::from_str(&record.to_json()).expect("JSON");
        let documented = contract_example("## `session events --json`");
        let mut expected = keys(&documented);
        expected.retain(|key| !["action", "direction", "iface"].contains(key));
        expected.extend(["orig_packets", "reply_packets"]);
        expected.sort_unstable();
        assert_eq!(keys(&produced), expected);
        assert_eq!(produced["events"], json!(["expired"]));
        assert_eq!(produced["state"], "TIME_WAIT");
        assert_eq!(produced["src"], "198.18.0.1");
        assert_eq!(produced["orig_packets"], 5);
        assert_eq!(produced["reply_packets"], 4);
        assert!(
            record
                .human_line()
                .ends_with("[EXPIRED] tcp 198.18.0.1:40000 -> 198.18.0.2:8080 TIME_WAIT rule=web"),
            "{}",
            record.human_line()
        );
    }

    #[test]
    fn the_lost_line_is_as_documented() {
        assert!(CONTRACT.contains(r#"`{"lost": N}`"#), "docs changed");
        let line: StreamLine = serde_json::from_str(r#"{"lost": 7}"#).expect("a lost line");
        assert_eq!(line, StreamLine::Lost(Lost { lost: 7 }));
        assert_eq!(Lost { lost: 7 }.to_json(), r#"{"lost":7}"#);
        let event = EventRecord::from_kernel(&kernel_event(), &[]).to_json();
        assert!(matches!(
            serde_json::from_str(&event).expect("an event line"),
            StreamLine::Event(_)
        ));
    }

    #[test]
    fn a_line_missing_a_field_is_refused_not_printed_empty() {
        let mut documented = contract_example("## `session events --json`");
        documented.as_object_mut().expect("object").remove("rule");
        assert!(serde_json::from_value::<StreamLine>(documented).is_err());
    }

    #[test]
    fn human_line_reads_like_conntrack_events() {
        let record = EventRecord::from_kernel(&kernel_event(), &["web".into(), "ssh".into()]);
        let line = record.human_line();
        assert!(
            line.ends_with(
                "[NEW][LOGGED] tcp 198.18.0.1:40000 -> 198.18.0.2:22 in lo new accept rule=ssh"
            ),
            "{line}"
        );
    }

    #[test]
    fn ipv6_endpoints_are_bracketed() {
        let record = EventRecord {
            time: "2026-11-23T17:06:10.568Z".into(),
            events: vec![EventKind::Closed],
            family: Family::Ipv6,
            proto: "udp".into(),
            src: "2001:2::1".parse().expect("address"),
            sport: 53,
            dst: "2001:2::2".parse().expect("address"),
            dport: 5353,
            state: "established".into(),
            action: Some(EventAction::Accept),
            direction: Some(Direction::Out),
            iface: Some("eth0".into()),
            rule: "(default)".into(),
            orig_packets: None,
            reply_packets: None,
        };
        assert!(
            record
                .human_line()
                .contains("[CLOSED] udp [2001:2::1]:53 -> [2001:2::2]:5353 out eth0"),
            "{}",
            record.human_line()
        );
    }

    /// The README's example lines of `session events`, read back into records with a
    /// test-only reading of the same layout, print exactly as documented.
    #[test]
    fn the_readme_example_lines_are_what_human_line_prints() {
        let section = README
            .split_once("### `session events`")
            .expect("README has the events section")
            .1;
        let lines: Vec<&str> = section
            .lines()
            .filter(|line| line.starts_with("2026-"))
            .collect();
        assert_eq!(lines.len(), 3, "README's example lines: {lines:?}");
        for line in lines {
            let words: Vec<&str> = line.split(' ').collect();
            let [
                time,
                tags,
                proto,
                src,
                "->",
                dst,
                direction,
                iface,
                state,
                action,
                rule,
            ] = words[..]
            else {
                panic!("unexpected README line layout: {line}");
            };
            let endpoint = |text: &str| {
                let addr: std::net::SocketAddr = text.parse().expect("addr:port");
                (addr.ip(), addr.port())
            };
            let kinds = tags
                .trim_matches(['[', ']'])
                .split("][")
                .map(|tag| {
                    serde_json::from_value(json!(tag.to_lowercase())).expect("a documented kind")
                })
                .collect();
            let record = EventRecord {
                time: time.into(),
                events: kinds,
                family: Family::Ipv4,
                proto: proto.into(),
                src: endpoint(src).0,
                sport: endpoint(src).1,
                dst: endpoint(dst).0,
                dport: endpoint(dst).1,
                state: state.into(),
                action: Some(serde_json::from_value(json!(action)).expect("an action")),
                direction: Some(serde_json::from_value(json!(direction)).expect("a direction")),
                iface: Some(iface.into()),
                rule: rule.strip_prefix("rule=").expect("rule=").into(),
                orig_packets: None,
                reply_packets: None,
            };
            assert_eq!(record.human_line(), line);
        }
    }
}
