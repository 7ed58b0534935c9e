//! The TOML configuration: parsing and validation with `file:line:col` errors.
//!
//! Nothing here touches the kernel, so `session check` and the daemon share one
//! validation path and a bad file changes nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::{IpNet, Ipv6Net};
use serde::Deserialize;
use session_common::{
    limits::DEFAULT_MAX_TRACKED_SOURCES,
    wire::{
        Action, CtState, FAMILY_IPV4, FAMILY_IPV6, Hook, MAX_RULES, NS_PER_SEC, RULE_NAME_LEN,
        Settings, Timeout, proto, settings_flags,
    },
};
use toml::Spanned;

use crate::{
    bpf::kernel_log::KernelLogLevel,
    policy::{
        compile,
        limits::{self, LimitSpec, RawLimit},
        sets::{self as named_sets, SetSpec},
    },
};

/// A configuration error (or warning) located in its file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file the error is in.
    pub path: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.path.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Errors loading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid configuration.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// A validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Things that are legal but almost certainly not what the author meant (rules that
    /// can never match because an earlier rule matches all they would), located like
    /// errors.
    pub warnings: Vec<ConfigError>,
    /// Interfaces to attach to.
    pub interfaces: Vec<String>,
    /// Interfaces judged on ingress by the TC program instead of XDP (`[attach]
    /// tc_ingress`): veths fed by local sockets, where XDP pays a copy of each packet.
    pub tc_ingress: Vec<String>,
    /// Size of the session table.
    pub max_sessions: u32,
    /// Sources the rules' limits track at once (`[limits] max_tracked_sources`): the
    /// bound of their LRU map.
    pub max_tracked_sources: u32,
    /// Timeouts and tracking switches, as the kernel reads them.
    pub settings: Settings,
    /// The policy.
    pub policy: Policy,
    /// Where the daemon serves Prometheus metrics (`[metrics] listen`); off when `None`.
    pub metrics: Option<SocketAddr>,
    /// The most detailed records the kernel programs log (`[logging] kernel_level`),
    /// fixed when they are loaded.
    pub kernel_log_level: KernelLogLevel,
    /// The host's ports the SYN-flood defence holds (`[syn_defence]`).
    pub syn_defence: SynDefence,
    /// State sync to a standby peer (`[sync]`); off when `None`.
    pub sync: Option<SyncConfig>,
}

/// `[syn_defence]`: the host's own TCP ports whose new connections get a session only
/// once the host's stack holds them established (`session_common::syn_defence`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SynDefence {
    /// The defended ports, sorted, without duplicates; empty when off.
    pub ports: Vec<u16>,
    /// SYNs a second to a port above which the defence engages for it; 0 for always.
    pub above: u32,
}

impl SynDefence {
    /// One line for `session check`: the defended ports and when; `None` when off.
    pub fn describe(&self) -> Option<String> {
        if self.ports.is_empty() {
            return None;
        }
        let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
        let when = match self.above {
            0 => "always".to_string(),
            above => format!("above {above} SYNs a second to a port"),
        };
        Some(format!(
            "syn_defence: TCP ports {} of this host get sessions only for handshakes its stack completed, {when}",
            ports.join(", ")
        ))
    }
}

/// State sync to a peer firewall (`[sync]`, docs/SYNC.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncConfig {
    /// The address and UDP port this firewall sends from and listens on, on the sync link.
    pub local: SocketAddr,
    /// The peer's address and port; datagrams from anywhere else are dropped and counted.
    pub peer: SocketAddr,
    /// The shared key (at least 32 bytes, not world-readable), the same file on both.
    pub key_file: PathBuf,
    /// How often the link is serviced: retransmissions, a due resync, the status.
    pub interval: Duration,
    /// How often the table is scanned for what the kernel does not report: a session's
    /// refreshed timeout and advanced window edges (sent at most this often), deletions
    /// and expiries. Creations, state changes and closings go at once, as events.
    pub refresh: Duration,
}

/// The policy part of a configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Default action for packets arriving on an interface.
    pub inbound: Action,
    /// Default action for packets the host sends.
    pub outbound: Action,
    /// Rules in order.
    pub rules: Vec<RuleSpec>,
    /// Named sets by name (`[sets]`), inline or read from their files.
    pub sets: BTreeMap<String, SetSpec>,
    /// Prefixes all sets may hold together (`[limits] max_set_entries`).
    pub max_set_entries: u32,
}

/// One validated rule.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleSpec {
    /// Unique name.
    pub name: String,
    /// What to do on a match.
    pub action: Action,
    /// Report every packet the rule decides as an event and a (rate-limited) log line.
    pub log: bool,
    /// Bit mask of [`CtState::bit`].
    pub states: u8,
    /// Bit mask of [`Hook::bit`].
    pub hooks: u8,
    /// Interface names (any when empty).
    pub ifaces: Vec<String>,
    /// Family (0 for any).
    pub family: u8,
    /// Protocol number (0 for any).
    pub proto: u8,
    /// Source networks (any when empty).
    pub src: Vec<Network>,
    /// Destination networks (any when empty).
    pub dst: Vec<Network>,
    /// Named sets the source may be in, besides `src` (each is one kernel entry).
    pub src_sets: Vec<String>,
    /// Named sets the destination may be in, besides `dst`.
    pub dst_sets: Vec<String>,
    /// Source port ranges (any when empty).
    pub sport: Vec<(u16, u16)>,
    /// Destination port ranges (any when empty).
    pub dport: Vec<(u16, u16)>,
    /// ICMP types (any when empty).
    pub icmp_types: Vec<u8>,
    /// Caps on the sessions the rule admits (`limit`).
    pub limit: Option<LimitSpec>,
    /// Line of the rule's `name`, for messages about the rule as a whole.
    pub line: usize,
    /// Column of the rule's `name`.
    pub column: usize,
}

/// An address prefix, IPv4 ones mapped into IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    /// The network address (host bits zero).
    pub addr: [u8; 16],
    /// Prefix length in the 128-bit space (at most 128).
    pub prefix: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
}

impl Network {
    /// The prefix as a 16-byte mask.
    pub fn mask(&self) -> [u8; 16] {
        self.ipnet().netmask().octets()
    }

    /// The network in ipnet's terms, IPv4 ones mapped into IPv6 as here.
    fn ipnet(&self) -> Ipv6Net {
        Ipv6Net::new(Ipv6Addr::from(self.addr), self.prefix).expect("prefixes are at most 128")
    }
}

const DEFAULT_MAX_SESSIONS: u32 = 262_144;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    interfaces: Vec<Spanned<String>>,
    #[serde(default)]
    limits: Option<RawLimits>,
    #[serde(default)]
    timeouts: BTreeMap<Spanned<String>, Spanned<i64>>,
    #[serde(default)]
    tracking: Option<RawTracking>,
    #[serde(default)]
    forwarding: Option<RawForwarding>,
    #[serde(default)]
    attach: Option<RawAttach>,
    #[serde(default)]
    policy: Option<RawPolicy>,
    #[serde(default)]
    sets: BTreeMap<Spanned<String>, Spanned<RawSet>>,
    #[serde(default)]
    rule: Vec<RawRule>,
    #[serde(default)]
    metrics: Option<RawMetrics>,
    #[serde(default)]
    logging: Option<RawLogging>,
    #[serde(default)]
    syn_defence: Option<Spanned<RawSynDefence>>,
    #[serde(default)]
    sync: Option<RawSync>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSynDefence {
    ports: Spanned<Vec<Spanned<i64>>>,
    above: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSync {
    local: Spanned<String>,
    peer: Spanned<String>,
    key_file: Spanned<String>,
    interval_ms: Option<Spanned<i64>>,
    refresh_ms: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogging {
    kernel_level: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_sessions: Option<Spanned<i64>>,
    max_set_entries: Option<Spanned<i64>>,
    max_tracked_sources: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTracking {
    tcp_window_check: Option<bool>,
    tcp_liberal: Option<bool>,
    tcp_loose: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForwarding {
    fast_path: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttach {
    #[serde(default)]
    tc_ingress: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    inbound: Option<Spanned<String>>,
    outbound: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrName {
    Number(i64),
    Name(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    action: Spanned<String>,
    log: Option<bool>,
    state: Option<Spanned<Vec<Spanned<String>>>>,
    direction: Option<Spanned<String>>,
    iface: Option<Spanned<Vec<Spanned<String>>>>,
    family: Option<Spanned<String>>,
    proto: Option<Spanned<NumberOrName>>,
    src: Option<Spanned<Vec<Spanned<String>>>>,
    dst: Option<Spanned<Vec<Spanned<String>>>>,
    sport: Option<Spanned<Vec<Spanned<NumberOrName>>>>,
    dport: Option<Spanned<Vec<Spanned<NumberOrName>>>>,
    icmp_type: Option<Spanned<Vec<Spanned<NumberOrName>>>>,
    limit: Option<Spanned<RawLimit>>,
}

/// Resolves byte offsets to line and column for one file's text.
pub(super) struct Locator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    /// The error `message` at the start of `span`.
    pub(super) fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let start = span.start.min(self.text.len());
        let before = &self.text[..start];
        let line = before.matches('\n').count() + 1;
        let column = before
            .rfind('\n')
            .map_or(before.chars().count(), |newline| {
                before[newline + 1..].chars().count()
            })
            + 1;
        ConfigError {
            path: self.path.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse(path, &text)?)
}

/// Validates configuration text; `path` is only used in messages.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let locator = Locator { path, text };
    let raw: RawConfig = toml::from_str(text).map_err(|error| {
        let span = error.span().unwrap_or(0..0);
        locator.error(span, error.message().trim().to_string())
    })?;
    validate(&locator, raw)
}

fn validate(loc: &Locator<'_>, raw: RawConfig) -> Result<Config, ConfigError> {
    let mut interfaces = Vec::new();
    for iface in &raw.interfaces {
        check_iface_name(loc, iface)?;
        interfaces.push(iface.get_ref().clone());
    }
    let mut tc_ingress: Vec<String> = Vec::new();
    for iface in raw.attach.iter().flat_map(|attach| &attach.tc_ingress) {
        check_iface_name(loc, iface)?;
        if !tc_ingress.contains(iface.get_ref()) {
            tc_ingress.push(iface.get_ref().clone());
        }
    }
    let max_set_entries = max_set_entries(loc, raw.limits.as_ref())?;
    let max_tracked_sources = match raw
        .limits
        .as_ref()
        .and_then(|limits| limits.max_tracked_sources.as_ref())
    {
        None => DEFAULT_MAX_TRACKED_SOURCES,
        Some(value) => {
            let n = *value.get_ref();
            if !(1024..=16_777_216).contains(&n) {
                return Err(loc.error(
                    value.span(),
                    format!("max_tracked_sources must be between 1024 and 16777216, got {n}"),
                ));
            }
            n as u32
        }
    };
    let max_sessions = match raw.limits.and_then(|limits| limits.max_sessions) {
        None => DEFAULT_MAX_SESSIONS,
        Some(value) => {
            let n = *value.get_ref();
            if !(1024..=16_777_216).contains(&n) {
                return Err(loc.error(
                    value.span(),
                    format!("max_sessions must be between 1024 and 16777216, got {n}"),
                ));
            }
            n as u32
        }
    };
    let syn_defence = syn_defence(loc, raw.syn_defence.as_ref())?;
    let mut settings = Settings::default();
    for (key, value) in &raw.timeouts {
        let Some(index) = Timeout::DEFAULTS
            .iter()
            .position(|(_, name, _)| name == key.get_ref())
        else {
            let known: Vec<&str> = Timeout::DEFAULTS.iter().map(|(_, name, _)| *name).collect();
            return Err(loc.error(
                key.span(),
                format!(
                    "unknown timeout `{}`; known timeouts: {}",
                    key.get_ref(),
                    known.join(", ")
                ),
            ));
        };
        let seconds = *value.get_ref();
        if !(1..=31_536_000).contains(&seconds) {
            return Err(loc.error(
                value.span(),
                format!("timeout must be between 1 and 31536000 seconds, got {seconds}"),
            ));
        }
        settings.timeouts_ns[index] = seconds as u64 * NS_PER_SEC;
    }
    if let Some(tracking) = raw.tracking {
        set_flag(
            &mut settings,
            settings_flags::TCP_WINDOW_CHECK,
            tracking.tcp_window_check,
        );
        set_flag(
            &mut settings,
            settings_flags::TCP_LIBERAL,
            tracking.tcp_liberal,
        );
        set_flag(&mut settings, settings_flags::TCP_LOOSE, tracking.tcp_loose);
    }
    if !syn_defence.ports.is_empty() {
        settings.flags |= settings_flags::SYN_DEFENCE;
    }
    if let Some(forwarding) = raw.forwarding {
        set_flag(
            &mut settings,
            settings_flags::FAST_PATH,
            forwarding.fast_path,
        );
    }
    let (inbound, outbound) = match raw.policy {
        None => (Action::Drop, Action::Accept),
        Some(policy) => (
            policy
                .inbound
                .map_or(Ok(Action::Drop), |value| parse_action(loc, &value))?,
            policy
                .outbound
                .map_or(Ok(Action::Accept), |value| parse_action(loc, &value))?,
        ),
    };
    let sets = validate_sets(loc, &raw.sets, max_set_entries)?;
    let mut overload_sets = BTreeSet::new();
    let mut names = BTreeSet::new();
    let mut rules = Vec::new();
    let mut entries = 0u64;
    for rule in &raw.rule {
        let spec = validate_rule(loc, rule, &sets)?;
        if let Some(overload) = spec
            .limit
            .as_ref()
            .and_then(|limit| limit.overload.as_ref())
        {
            overload_sets.insert(overload.clone());
        }
        if !names.insert(spec.name.clone()) {
            return Err(loc.error(
                rule.name.span(),
                format!(
                    "duplicate rule name `{}`: rule names must be unique",
                    spec.name
                ),
            ));
        }
        entries = entries.saturating_add(compile::entry_count(&spec));
        if entries > MAX_RULES as u64 {
            return Err(loc.error(
                rule.name.span(),
                format!(
                    "rule `{}` brings the policy to {entries} kernel entries, more than the {MAX_RULES} a policy can hold (each combination of interface, source and destination network, port range and ICMP type is one entry): use fewer, wider networks or port ranges",
                    spec.name
                ),
            ));
        }
        rules.push(spec);
    }
    // An empty set matches nothing, most likely a mistake; a set that a rule's limit
    // overloads sources into starts empty by design.
    for (name, set) in &raw.sets {
        if matches!(set.get_ref(), RawSet::List(members) if members.is_empty())
            && !overload_sets.contains(name.get_ref())
        {
            return Err(loc.error(
                set.span(),
                format!(
                    "set `{}` is empty: give it at least one address or network (only a set that a rule's `limit` overloads sources into may start empty)",
                    name.get_ref()
                ),
            ));
        }
    }
    let warnings = shadowed_rules(loc, &rules);
    let metrics = raw
        .metrics
        .map(|metrics| parse_listen(loc, &metrics.listen))
        .transpose()?;
    let kernel_log_level = raw
        .logging
        .and_then(|logging| logging.kernel_level)
        .map_or(Ok(KernelLogLevel::default()), |value| {
            parse_kernel_level(loc, &value)
        })?;
    let sync = raw.sync.map(|sync| parse_sync(loc, &sync)).transpose()?;
    if sync.is_some() {
        settings.flags |= settings_flags::SYNC_EVENTS;
    }
    Ok(Config {
        warnings,
        interfaces,
        tc_ingress,
        max_sessions,
        max_tracked_sources,
        settings,
        policy: Policy {
            inbound,
            outbound,
            rules,
            sets,
            max_set_entries,
        },
        metrics,
        kernel_log_level,
        syn_defence,
        sync,
    })
}

/// Validates `[sync]`: two addresses of one family with ports, a key file, and
/// intervals within reason. The key file itself is read when the daemon starts.
fn parse_sync(loc: &Locator<'_>, raw: &RawSync) -> Result<SyncConfig, ConfigError> {
    let address = |value: &Spanned<String>, what: &str| -> Result<SocketAddr, ConfigError> {
        match value.get_ref().parse::<SocketAddr>() {
            Ok(addr) if addr.port() != 0 => Ok(addr),
            _ => Err(loc.error(
                value.span(),
                format!(
                    "`{}` is not a {what} address with a port: use IP:PORT, e.g. \"198.19.0.1:7946\"",
                    value.get_ref()
                ),
            )),
        }
    };
    let local = address(&raw.local, "local sync")?;
    let peer = address(&raw.peer, "peer")?;
    if local.is_ipv4() != peer.is_ipv4() {
        return Err(loc.error(
            raw.peer.span(),
            "the peer's address is not of the local address's family: use IPv4 for both or IPv6 for both",
        ));
    }
    if raw.key_file.get_ref().is_empty() {
        return Err(loc.error(
            raw.key_file.span(),
            "`key_file` is empty: name the shared key file, e.g. \"/etc/session/sync.key\"",
        ));
    }
    let millis = |value: &Option<Spanned<i64>>,
                  default: u64,
                  range: std::ops::RangeInclusive<i64>,
                  key: &str|
     -> Result<Duration, ConfigError> {
        match value {
            None => Ok(Duration::from_millis(default)),
            Some(value) if range.contains(value.get_ref()) => {
                Ok(Duration::from_millis(*value.get_ref() as u64))
            }
            Some(value) => Err(loc.error(
                value.span(),
                format!(
                    "`{key}` = {} is out of range: use {} to {} (default {default})",
                    value.get_ref(),
                    range.start(),
                    range.end()
                ),
            )),
        }
    };
    Ok(SyncConfig {
        local,
        peer,
        key_file: PathBuf::from(raw.key_file.get_ref()),
        interval: millis(&raw.interval_ms, 50, 10..=1000, "interval_ms")?,
        refresh: millis(&raw.refresh_ms, 1000, 100..=60_000, "refresh_ms")?,
    })
}

/// `[syn_defence]`, checked: ports 1 to 65535, at most
/// `session_common::syn_defence::MAX_DEFENDED_PORTS`, `above` a positive rate.
fn syn_defence(
    loc: &Locator<'_>,
    raw: Option<&Spanned<RawSynDefence>>,
) -> Result<SynDefence, ConfigError> {
    let Some(raw) = raw else {
        return Ok(SynDefence::default());
    };
    let section = raw.get_ref();
    let max = session_common::syn_defence::MAX_DEFENDED_PORTS as usize;
    if section.ports.get_ref().is_empty() || section.ports.get_ref().len() > max {
        return Err(loc.error(
            section.ports.span(),
            format!("[syn_defence] ports must list 1 to {max} TCP ports the host listens on"),
        ));
    }
    let mut ports = Vec::new();
    for port in section.ports.get_ref() {
        match u16::try_from(*port.get_ref()) {
            Ok(number) if number != 0 => ports.push(number),
            _ => {
                return Err(loc.error(
                    port.span(),
                    format!("port {} is out of range 1..65535", port.get_ref()),
                ));
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    let above = match &section.above {
        None => 0,
        Some(value) if (1..=100_000_000).contains(value.get_ref()) => *value.get_ref() as u32,
        Some(value) => {
            return Err(loc.error(
                value.span(),
                format!(
                    "above must be 1 to 100000000 SYNs a second (leave it out to defend always), got {}",
                    value.get_ref()
                ),
            ));
        }
    };
    Ok(SynDefence { ports, above })
}

/// Parses `[logging] kernel_level`, one of [`KernelLogLevel::ALL`]'s names.
fn parse_kernel_level(
    loc: &Locator<'_>,
    value: &Spanned<String>,
) -> Result<KernelLogLevel, ConfigError> {
    KernelLogLevel::from_name(value.get_ref()).ok_or_else(|| {
        let known: Vec<&str> = KernelLogLevel::ALL.iter().map(|(_, name)| *name).collect();
        loc.error(
            value.span(),
            format!(
                "unknown kernel log level `{}`: use one of {} (default warn)",
                value.get_ref(),
                known.join(", ")
            ),
        )
    })
}

/// Parses the metrics endpoint's `address:port`; port 0 is refused because Prometheus
/// could not know where to scrape.
fn parse_listen(loc: &Locator<'_>, value: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
    let text = value.get_ref();
    match text.parse::<SocketAddr>() {
        Ok(addr) if addr.port() != 0 => Ok(addr),
        Ok(_) => Err(loc.error(
            value.span(),
            format!("`{text}` has port 0: give the port Prometheus scrapes, e.g. 127.0.0.1:9640"),
        )),
        Err(_) => Err(loc.error(
            value.span(),
            format!(
                "`{text}` is not a listen address: use IP:PORT, e.g. \"127.0.0.1:9640\" or \"[::1]:9640\""
            ),
        )),
    }
}

/// Warnings for rules that an earlier rule shadows: first match wins, so they never apply.
fn shadowed_rules(loc: &Locator<'_>, rules: &[RuleSpec]) -> Vec<ConfigError> {
    let mut warnings = Vec::new();
    for (j, later) in rules.iter().enumerate() {
        if let Some(earlier) = rules[..j].iter().find(|earlier| covers(earlier, later)) {
            warnings.push(ConfigError {
                path: loc.path.to_path_buf(),
                line: later.line,
                column: later.column,
                message: format!(
                    "rule `{}` is never used: rule `{}` (line {}) comes first and matches every packet it would",
                    later.name, earlier.name, earlier.line
                ),
            });
        }
    }
    warnings
}

/// Whether every packet `later` matches is also matched by `earlier`.
fn covers(earlier: &RuleSpec, later: &RuleSpec) -> bool {
    let subset = |outer: u8, inner: u8| inner & !outer == 0;
    let same_or_any = |outer: u8, inner: u8| outer == 0 || outer == inner;
    let list_covers = |outer: &[String], inner: &[String]| {
        outer.is_empty() || (!inner.is_empty() && inner.iter().all(|item| outer.contains(item)))
    };
    let nets_cover = |outer: &[Network], inner: &[Network]| {
        outer.is_empty()
            || (!inner.is_empty()
                && inner
                    .iter()
                    .all(|net| outer.iter().any(|wide| network_contains(wide, net))))
    };
    let ports_cover = |outer: &[(u16, u16)], inner: &[(u16, u16)]| {
        outer.is_empty()
            || (!inner.is_empty()
                && inner
                    .iter()
                    .all(|(lo, hi)| outer.iter().any(|(olo, ohi)| olo <= lo && hi <= ohi)))
    };
    let types_cover = |outer: &[u8], inner: &[u8]| {
        outer.is_empty() || (!inner.is_empty() && inner.iter().all(|t| outer.contains(t)))
    };
    // A set changes live, so a rule naming one never covers another; a later rule's set
    // is covered only by an earlier rule that takes any address in that dimension.
    let sets_covered = earlier.src_sets.is_empty()
        && earlier.dst_sets.is_empty()
        && (later.src_sets.is_empty() || earlier.src.is_empty())
        && (later.dst_sets.is_empty() || earlier.dst.is_empty());
    sets_covered
        && subset(earlier.states, later.states)
        && subset(earlier.hooks, later.hooks)
        && list_covers(&earlier.ifaces, &later.ifaces)
        && same_or_any(earlier.family, later.family)
        && same_or_any(earlier.proto, later.proto)
        && nets_cover(&earlier.src, &later.src)
        && nets_cover(&earlier.dst, &later.dst)
        && ports_cover(&earlier.sport, &later.sport)
        && ports_cover(&earlier.dport, &later.dport)
        && types_cover(&earlier.icmp_types, &later.icmp_types)
}

/// Whether network `wide` contains network `narrow`.
fn network_contains(wide: &Network, narrow: &Network) -> bool {
    wide.ipnet().contains(&narrow.ipnet())
}

fn set_flag(settings: &mut Settings, flag: u32, value: Option<bool>) {
    match value {
        Some(true) => settings.flags |= flag,
        Some(false) => settings.flags &= !flag,
        None => {}
    }
}

fn check_iface_name(loc: &Locator<'_>, iface: &Spanned<String>) -> Result<(), ConfigError> {
    let name = iface.get_ref();
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
        return Err(loc.error(
            iface.span(),
            format!(
                "`{name}` is not a valid interface name (1 to 15 characters, no '/' or spaces)"
            ),
        ));
    }
    Ok(())
}

fn parse_action(loc: &Locator<'_>, value: &Spanned<String>) -> Result<Action, ConfigError> {
    match value.get_ref().as_str() {
        "accept" => Ok(Action::Accept),
        "drop" => Ok(Action::Drop),
        other => Err(loc.error(
            value.span(),
            format!("unknown action `{other}`: use \"accept\" or \"drop\""),
        )),
    }
}

fn validate_sets(
    loc: &Locator<'_>,
    raw: &BTreeMap<Spanned<String>, Spanned<RawSet>>,
    max_set_entries: u32,
) -> Result<BTreeMap<String, SetSpec>, ConfigError> {
    let mut sets = BTreeMap::new();
    let mut total = 0u64;
    for (name, set) in raw {
        if !named_sets::valid_set_name(name.get_ref()) {
            return Err(loc.error(
                name.span(),
                format!(
                    "set name `{}` must be 1 to {} characters of letters, digits, '-', '_' or '.'",
                    name.get_ref(),
                    session_common::sets::SET_NAME_LEN - 1
                ),
            ));
        }
        let spec = match set.get_ref() {
            RawSet::List(members) => {
                let mut networks = Vec::new();
                for member in members {
                    if member.get_ref().starts_with('@') {
                        return Err(loc.error(
                            member.span(),
                            "sets cannot contain other sets; list the networks directly",
                        ));
                    }
                    networks.push(parse_network(loc, member)?);
                }
                SetSpec {
                    networks: std::sync::Arc::new(named_sets::dedup(networks)),
                    file: None,
                }
            }
            RawSet::File(file) => {
                let path = loc
                    .path
                    .parent()
                    .unwrap_or(Path::new(""))
                    .join(file.get_ref());
                let networks = named_sets::read_set_file(&path).map_err(|error| {
                    loc.error(
                        file.span(),
                        format!(
                            "set `{}`: {error}; fix the file, then reload",
                            name.get_ref()
                        ),
                    )
                })?;
                SetSpec {
                    networks: std::sync::Arc::new(networks),
                    file: Some(path),
                }
            }
        };
        total += spec.networks.len() as u64;
        if total > u64::from(max_set_entries) {
            return Err(loc.error(
                set.span(),
                format!(
                    "set `{}` brings the sets to {total} prefixes, more than [limits] max_set_entries = {max_set_entries}: raise the limit (at most {}) or shorten the sets",
                    name.get_ref(),
                    session_common::sets::MAX_SET_ENTRIES_LIMIT
                ),
            ));
        }
        sets.insert(name.get_ref().clone(), spec);
    }
    Ok(sets)
}

/// `[limits] max_set_entries`, checked.
fn max_set_entries(loc: &Locator<'_>, limits: Option<&RawLimits>) -> Result<u32, ConfigError> {
    let Some(value) = limits.and_then(|limits| limits.max_set_entries.as_ref()) else {
        return Ok(named_sets::DEFAULT_MAX_SET_ENTRIES);
    };
    let n = *value.get_ref();
    let max = session_common::sets::MAX_SET_ENTRIES_LIMIT;
    if !(1..=i64::from(max)).contains(&n) {
        return Err(loc.error(
            value.span(),
            format!("max_set_entries must be between 1 and {max}, got {n}"),
        ));
    }
    Ok(n as u32)
}

/// A `[sets]` value: a list of networks, or `{ file = "path" }`.
enum RawSet {
    List(Vec<Spanned<String>>),
    File(Spanned<String>),
}

impl<'de> Deserialize<'de> for RawSet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = RawSet;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a list of addresses and networks, or { file = "/path/to/set.txt" }"#)
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawSet, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = seq.next_element::<Spanned<String>>()? {
                    members.push(member);
                }
                Ok(RawSet::List(members))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawSet, A::Error> {
                let mut file = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "file" => file = Some(map.next_value::<Spanned<String>>()?),
                        other => {
                            return Err(serde::de::Error::custom(format!(
                                "unknown set key `{other}`: a set is a list or {{ file = \"path\" }}"
                            )));
                        }
                    }
                }
                file.map(RawSet::File)
                    .ok_or_else(|| serde::de::Error::custom(r#"a set table needs file = "path""#))
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

/// Parses `addr` or `addr/prefix`.
fn parse_network(loc: &Locator<'_>, value: &Spanned<String>) -> Result<Network, ConfigError> {
    let text = value.get_ref().trim();
    let (addr_text, prefix_text) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let addr: IpAddr = addr_text.parse().map_err(|_| {
        loc.error(
            value.span(),
            format!(
                "`{text}` is not an IP address or CIDR network (e.g. 198.18.0.0/15 or 2001:2::/48)"
            ),
        )
    })?;
    let max_prefix = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix_text {
        None => max_prefix,
        Some(p) => match p.parse::<u8>() {
            Ok(p) if p <= max_prefix => p,
            _ => {
                return Err(loc.error(
                    value.span(),
                    format!("`{text}` has an invalid prefix length: it must be 0 to {max_prefix}"),
                ));
            }
        },
    };
    let net = IpNet::new(addr, prefix).expect("prefix checked above");
    if net.trunc() != net {
        return Err(loc.error(
            value.span(),
            format!("`{text}` has host bits set; did you mean the network address of that prefix?"),
        ));
    }
    Ok(match net {
        IpNet::V4(v4) => Network {
            addr: v4.addr().to_ipv6_mapped().octets(),
            prefix: v4.prefix_len() + 96,
            family: FAMILY_IPV4,
        },
        IpNet::V6(v6) => Network {
            addr: v6.addr().octets(),
            prefix: v6.prefix_len(),
            family: FAMILY_IPV6,
        },
    })
}

fn validate_rule(
    loc: &Locator<'_>,
    raw: &RawRule,
    sets: &BTreeMap<String, SetSpec>,
) -> Result<RuleSpec, ConfigError> {
    let name = raw.name.get_ref().clone();
    if name.is_empty()
        || name.len() >= RULE_NAME_LEN
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(loc.error(
            raw.name.span(),
            format!(
                "rule name `{name}` must be 1 to {} characters of letters, digits, '-', '_' or '.'",
                RULE_NAME_LEN - 1
            ),
        ));
    }
    let name_at = loc.error(raw.name.span(), "");
    let action = parse_action(loc, &raw.action)?;
    let states = match &raw.state {
        None => ALL_STATES,
        Some(list) => {
            non_empty(loc, list, "state")?;
            let mut mask = 0;
            for state in list.get_ref() {
                let name = state.get_ref().as_str();
                let Some(known) = CtState::ALL.iter().find(|known| known.name() == name) else {
                    return Err(loc.error(
                        state.span(),
                        format!(
                            "unknown state `{name}`: use new, established, related, invalid or untracked"
                        ),
                    ));
                };
                mask |= known.bit();
            }
            mask
        }
    };
    let hooks = match &raw.direction {
        None => Hook::Ingress.bit(),
        Some(direction) => match direction.get_ref().as_str() {
            "in" => Hook::Ingress.bit(),
            "out" => Hook::Egress.bit(),
            "any" => Hook::Ingress.bit() | Hook::Egress.bit(),
            other => {
                return Err(loc.error(
                    direction.span(),
                    format!("unknown direction `{other}`: use \"in\", \"out\" or \"any\""),
                ));
            }
        },
    };
    let mut ifaces = Vec::new();
    if let Some(list) = &raw.iface {
        non_empty(loc, list, "iface")?;
        for iface in list.get_ref() {
            check_iface_name(loc, iface)?;
            ifaces.push(iface.get_ref().clone());
        }
    }
    let family = match &raw.family {
        None => 0,
        Some(family) => match family.get_ref().as_str() {
            "ipv4" => FAMILY_IPV4,
            "ipv6" => FAMILY_IPV6,
            other => {
                return Err(loc.error(
                    family.span(),
                    format!("unknown family `{other}`: use \"ipv4\" or \"ipv6\""),
                ));
            }
        },
    };
    let protocol = match &raw.proto {
        None => 0,
        Some(value) => parse_proto(loc, value)?,
    };
    let (src, src_sets) = networks(loc, raw.src.as_ref(), sets, "src")?;
    let (dst, dst_sets) = networks(loc, raw.dst.as_ref(), sets, "dst")?;
    for (list, named) in [(&src, &src_sets), (&dst, &dst_sets)] {
        if family != 0
            && named.is_empty()
            && !list.is_empty()
            && list.iter().all(|net| net.family != family)
        {
            return Err(loc.error(
                raw.name.span(),
                format!(
                    "rule `{name}` can never match: its addresses are not of family {}",
                    family_name(family)
                ),
            ));
        }
    }
    let sport = ports(loc, raw.sport.as_ref(), "sport", protocol)?;
    let dport = ports(loc, raw.dport.as_ref(), "dport", protocol)?;
    let icmp_types = icmp_types(loc, raw.icmp_type.as_ref(), protocol)?;
    let limit = match &raw.limit {
        None => None,
        Some(limit) => Some(limits::validate(loc, limit, action, states, sets)?),
    };
    Ok(RuleSpec {
        name,
        action,
        log: raw.log.unwrap_or(false),
        states,
        hooks,
        ifaces,
        family,
        proto: protocol,
        src,
        dst,
        src_sets,
        dst_sets,
        sport,
        dport,
        icmp_types,
        limit,
        line: name_at.line,
        column: name_at.column,
    })
}

const ALL_STATES: u8 = 0x1f;

fn family_name(family: u8) -> &'static str {
    if family == FAMILY_IPV4 {
        "ipv4"
    } else {
        "ipv6"
    }
}

fn non_empty<T>(loc: &Locator<'_>, list: &Spanned<Vec<T>>, key: &str) -> Result<(), ConfigError> {
    if list.get_ref().is_empty() {
        return Err(loc.error(
            list.span(),
            format!(
                "`{key}` is empty: remove the key to match anything, or list at least one value"
            ),
        ));
    }
    Ok(())
}

fn parse_proto(loc: &Locator<'_>, value: &Spanned<NumberOrName>) -> Result<u8, ConfigError> {
    match value.get_ref() {
        NumberOrName::Number(n) if (1..=255).contains(n) => Ok(*n as u8),
        NumberOrName::Number(n) => Err(loc.error(
            value.span(),
            format!("protocol number {n} is out of range 1..255"),
        )),
        NumberOrName::Name(name) => match name.as_str() {
            "tcp" => Ok(proto::TCP),
            "udp" => Ok(proto::UDP),
            "icmp" => Ok(proto::ICMP),
            "icmpv6" => Ok(proto::ICMPV6),
            "any" => Ok(0),
            other => Err(loc.error(
                value.span(),
                format!("unknown protocol `{other}`: use tcp, udp, icmp, icmpv6, any or a number"),
            )),
        },
    }
}

fn networks(
    loc: &Locator<'_>,
    list: Option<&Spanned<Vec<Spanned<String>>>>,
    sets: &BTreeMap<String, SetSpec>,
    key: &str,
) -> Result<(Vec<Network>, Vec<String>), ConfigError> {
    let Some(list) = list else {
        return Ok((Vec::new(), Vec::new()));
    };
    non_empty(loc, list, key)?;
    let mut out = Vec::new();
    let mut named = Vec::new();
    for item in list.get_ref() {
        match item.get_ref().strip_prefix('@') {
            Some(set) => match sets.get(set) {
                Some(_) => {
                    if !named.iter().any(|have: &String| have == set) {
                        named.push(set.to_string());
                    }
                }
                None => {
                    return Err(loc.error(
                        item.span(),
                        format!("unknown set `@{set}`: define it under [sets]"),
                    ));
                }
            },
            None => out.push(parse_network(loc, item)?),
        }
    }
    Ok((out, named))
}

fn ports(
    loc: &Locator<'_>,
    list: Option<&Spanned<Vec<Spanned<NumberOrName>>>>,
    key: &str,
    protocol: u8,
) -> Result<Vec<(u16, u16)>, ConfigError> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    non_empty(loc, list, key)?;
    if protocol != proto::TCP && protocol != proto::UDP {
        return Err(loc.error(
            list.span(),
            format!("`{key}` needs `proto = \"tcp\"` or `proto = \"udp\"` in the same rule"),
        ));
    }
    let mut out = Vec::new();
    for item in list.get_ref() {
        let range = match item.get_ref() {
            NumberOrName::Number(n) => port_number(loc, item.span(), *n).map(|p| (p, p))?,
            NumberOrName::Name(text) => {
                let Some((lo, hi)) = text.split_once('-') else {
                    return Err(loc.error(
                        item.span(),
                        format!("`{text}` is not a port or a range like \"8000-8080\""),
                    ));
                };
                let parse = |part: &str| {
                    part.trim().parse::<i64>().map_err(|_| {
                        loc.error(
                            item.span(),
                            format!("`{text}` is not a port range like \"8000-8080\""),
                        )
                    })
                };
                let lo = port_number(loc, item.span(), parse(lo)?)?;
                let hi = port_number(loc, item.span(), parse(hi)?)?;
                if lo > hi {
                    return Err(loc.error(
                        item.span(),
                        format!("port range `{text}` is empty: its start is above its end"),
                    ));
                }
                (lo, hi)
            }
        };
        out.push(range);
    }
    Ok(out)
}

fn port_number(loc: &Locator<'_>, span: Range<usize>, n: i64) -> Result<u16, ConfigError> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| loc.error(span, format!("port {n} is out of range 1..65535")))
}

/// Names accepted for ICMP and ICMPv6 types, with their numbers per protocol.
const ICMP_NAMES: [(&str, u8, u8); 7] = [
    ("echo-reply", 0, 129),
    ("echo-request", 8, 128),
    ("destination-unreachable", 3, 1),
    ("time-exceeded", 11, 3),
    ("parameter-problem", 12, 4),
    ("packet-too-big", 255, 2),
    ("redirect", 5, 137),
];

fn icmp_types(
    loc: &Locator<'_>,
    list: Option<&Spanned<Vec<Spanned<NumberOrName>>>>,
    protocol: u8,
) -> Result<Vec<u8>, ConfigError> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    non_empty(loc, list, "icmp_type")?;
    if protocol != proto::ICMP && protocol != proto::ICMPV6 {
        return Err(loc.error(
            list.span(),
            "`icmp_type` needs `proto = \"icmp\"` or `proto = \"icmpv6\"` in the same rule",
        ));
    }
    let mut out = Vec::new();
    for item in list.get_ref() {
        let number = match item.get_ref() {
            NumberOrName::Number(n) => u8::try_from(*n).map_err(|_| {
                loc.error(item.span(), format!("ICMP type {n} is out of range 0..255"))
            })?,
            NumberOrName::Name(name) => {
                let found = ICMP_NAMES.iter().find(|(known, _, _)| known == name);
                match found {
                    Some((_, v4, v6)) if protocol == proto::ICMP && *v4 != 255 => *v4,
                    Some((_, _, v6)) if protocol == proto::ICMPV6 => *v6,
                    _ => {
                        let known: Vec<&str> = ICMP_NAMES.iter().map(|(n, _, _)| *n).collect();
                        return Err(loc.error(
                            item.span(),
                            format!(
                                "unknown ICMP type `{name}` for this protocol: use a number or one of {}",
                                known.join(", ")
                            ),
                        ));
                    }
                }
            }
        };
        out.push(number);
    }
    Ok(out)
}
