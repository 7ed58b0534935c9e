//! A rule's `limit` table: caps on the sessions the rule admits, per source and in all,
//! and what becomes of a source over them (pf's `max-src-conn`, `max-src-conn-rate`,
//! `max` and `overload <table> flush`). Validated here with `file:line:col` errors;
//! compiled into a `session_common::limits::RuleLimit` per rule.

use std::collections::BTreeMap;

use serde::Deserialize;
use session_common::{
    limits::{RuleLimit, limit_flags},
    wire::{Action, CtState, NS_PER_SEC},
};
use toml::Spanned;

use crate::policy::{
    config::{ConfigError, Locator},
    sets::SetSpec,
};

/// Most sessions a cap may name: the largest table `[limits] max_sessions` allows.
const MAX_CAP: i64 = 16_777_216;
/// Longest rate interval or overload timeout: a year, like timeouts.
const MAX_SECONDS: u64 = 31_536_000;

/// What the daemon flushes when a rule overloads a source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OverloadFlush {
    /// Nothing: the source's existing sessions go on; only new ones are refused.
    #[default]
    None,
    /// The source's sessions this rule admitted (pf's `flush`).
    Rule,
    /// Every session the source started, whatever rule admitted it (pf's `flush global`).
    Global,
}

/// A rule's validated limits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitSpec {
    /// Sessions one source may hold through the rule at once; 0 for no cap.
    pub max_src_conn: u32,
    /// New sessions one source may open per interval, and the interval in ms.
    pub rate: Option<(u32, u32)>,
    /// Sessions the rule admits at once from all sources; 0 for no cap.
    pub max_conn: u32,
    /// Prefix length that makes one IPv4 source.
    pub src_prefix_v4: u8,
    /// Prefix length that makes one IPv6 source.
    pub src_prefix_v6: u8,
    /// The set a source over its caps goes into.
    pub overload: Option<String>,
    /// How long it stays there, in seconds; 0 for ever.
    pub overload_timeout: u64,
    /// What is flushed when a source is overloaded.
    pub flush: OverloadFlush,
}

impl LimitSpec {
    /// The kernel's form, with the overload set as the bank's source set `overload_set`
    /// (index + 1, 0 for none).
    pub fn compile(&self, overload_set: u8) -> RuleLimit {
        let (rate_count, rate_interval_ms) = self.rate.unwrap_or((0, 0));
        RuleLimit {
            max_src_conn: self.max_src_conn,
            max_conn: self.max_conn,
            rate_count,
            rate_interval_ms,
            overload_timeout_ns: self.overload_timeout * NS_PER_SEC,
            src_prefix_v4: self.src_prefix_v4,
            src_prefix_v6: self.src_prefix_v6,
            overload_set,
            flags: match self.flush {
                OverloadFlush::None => 0,
                OverloadFlush::Rule => limit_flags::FLUSH,
                OverloadFlush::Global => limit_flags::FLUSH | limit_flags::FLUSH_GLOBAL,
            },
            _pad: [0; 4],
        }
    }
}

impl LimitSpec {
    /// One line for `session check`: what the rule's limits are, in words.
    pub fn describe(&self, rule: &str) -> String {
        let mut caps = Vec::new();
        let per = format!(
            "per source (/{} IPv4, /{} IPv6)",
            self.src_prefix_v4, self.src_prefix_v6
        );
        if self.max_src_conn != 0 {
            caps.push(format!("{} sessions at once {per}", self.max_src_conn));
        }
        if let Some((count, interval_ms)) = self.rate {
            caps.push(format!(
                "{count} new sessions per {} s {per}",
                interval_ms / 1000
            ));
        }
        if self.max_conn != 0 {
            caps.push(format!("{} sessions at once in all", self.max_conn));
        }
        let mut line = format!("rule `{rule}`: limit {}", caps.join(", "));
        if let Some(set) = &self.overload {
            let until = match self.overload_timeout {
                0 => "for ever".to_string(),
                seconds => format!("for {seconds} s"),
            };
            let flush = match self.flush {
                OverloadFlush::None => "",
                OverloadFlush::Rule => ", flushing its sessions of this rule",
                OverloadFlush::Global => ", flushing all its sessions",
            };
            line.push_str(&format!(
                "; over it, a source goes into set `{set}` {until}{flush}"
            ));
        }
        line
    }
}

/// The `limit` table of a rule as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimit {
    max_src_conn: Option<Spanned<i64>>,
    max_src_conn_rate: Option<Spanned<String>>,
    max_conn: Option<Spanned<i64>>,
    src_prefix_v4: Option<Spanned<i64>>,
    src_prefix_v6: Option<Spanned<i64>>,
    overload: Option<Spanned<String>>,
    overload_timeout: Option<Spanned<i64>>,
    overload_flush: Option<Spanned<String>>,
}

/// Validates the `limit` table of a rule that decides `action` for `states`.
pub(super) fn validate(
    loc: &Locator<'_>,
    raw: &Spanned<RawLimit>,
    action: Action,
    states: u8,
    sets: &BTreeMap<String, SetSpec>,
) -> Result<LimitSpec, ConfigError> {
    let at = raw.span();
    let limit = raw.get_ref();
    if action != Action::Accept || states & CtState::New.bit() == 0 {
        return Err(loc.error(
            at,
            "`limit` caps the new sessions a rule admits: give it to a rule with \
             action = \"accept\" whose `state` includes \"new\"",
        ));
    }
    let cap = |value: &Option<Spanned<i64>>, key: &str| -> Result<u32, ConfigError> {
        match value {
            None => Ok(0),
            Some(value) if (1..=MAX_CAP).contains(value.get_ref()) => Ok(*value.get_ref() as u32),
            Some(value) => Err(loc.error(
                value.span(),
                format!(
                    "{key} must be between 1 and {MAX_CAP} sessions, got {}",
                    value.get_ref()
                ),
            )),
        }
    };
    let prefix = |value: &Option<Spanned<i64>>, key: &str, max: u8| -> Result<u8, ConfigError> {
        match value {
            None => Ok(max),
            Some(value) if (0..=i64::from(max)).contains(value.get_ref()) => {
                Ok(*value.get_ref() as u8)
            }
            Some(value) => Err(loc.error(
                value.span(),
                format!(
                    "{key} must be a prefix length of 0 to {max}, got {}",
                    value.get_ref()
                ),
            )),
        }
    };
    let rate = match &limit.max_src_conn_rate {
        None => None,
        Some(text) => Some(parse_rate(text.get_ref()).map_err(|why| {
            loc.error(
                text.span(),
                format!("max_src_conn_rate `{}`: {why}", text.get_ref()),
            )
        })?),
    };
    let spec = LimitSpec {
        max_src_conn: cap(&limit.max_src_conn, "max_src_conn")?,
        rate,
        max_conn: cap(&limit.max_conn, "max_conn")?,
        src_prefix_v4: prefix(&limit.src_prefix_v4, "src_prefix_v4", 32)?,
        src_prefix_v6: prefix(&limit.src_prefix_v6, "src_prefix_v6", 128)?,
        overload: None,
        overload_timeout: 0,
        flush: OverloadFlush::None,
    };
    if spec.max_src_conn == 0 && spec.rate.is_none() && spec.max_conn == 0 {
        return Err(loc.error(
            at,
            "`limit` sets no cap: give max_src_conn, max_src_conn_rate or max_conn",
        ));
    }
    overload(loc, limit, spec, sets)
}

/// Adds the overload options to `spec`, which only a per-source cap can trigger.
fn overload(
    loc: &Locator<'_>,
    limit: &RawLimit,
    mut spec: LimitSpec,
    sets: &BTreeMap<String, SetSpec>,
) -> Result<LimitSpec, ConfigError> {
    let Some(name) = &limit.overload else {
        for (key, given) in [
            (
                "overload_timeout",
                limit.overload_timeout.as_ref().map(|v| v.span()),
            ),
            (
                "overload_flush",
                limit.overload_flush.as_ref().map(|v| v.span()),
            ),
        ] {
            if let Some(span) = given {
                return Err(loc.error(
                    span,
                    format!("{key} needs `overload = \"SET\"`, the set overloaded sources go into"),
                ));
            }
        }
        return Ok(spec);
    };
    let set = name.get_ref().strip_prefix('@').unwrap_or(name.get_ref());
    if !sets.contains_key(set) {
        return Err(loc.error(
            name.span(),
            format!(
                "unknown set `{set}`: define it under [sets] (it may start empty: `{set} = []`)"
            ),
        ));
    }
    if spec.max_src_conn == 0 && spec.rate.is_none() {
        return Err(loc.error(
            name.span(),
            "overload needs a per-source cap (max_src_conn or max_src_conn_rate): \
             max_conn counts all sources and overloads none",
        ));
    }
    spec.overload = Some(set.to_string());
    if let Some(timeout) = &limit.overload_timeout {
        let seconds = *timeout.get_ref();
        if !(0..=MAX_SECONDS as i64).contains(&seconds) {
            return Err(loc.error(
                timeout.span(),
                format!(
                    "overload_timeout must be 0 (for ever) to {MAX_SECONDS} seconds, got {seconds}"
                ),
            ));
        }
        spec.overload_timeout = seconds as u64;
    }
    if let Some(flush) = &limit.overload_flush {
        spec.flush = match flush.get_ref().as_str() {
            "none" => OverloadFlush::None,
            "rule" => OverloadFlush::Rule,
            "global" => OverloadFlush::Global,
            other => {
                return Err(loc.error(
                    flush.span(),
                    format!(
                        "unknown overload_flush `{other}`: use \"none\", \"rule\" or \"global\""
                    ),
                ));
            }
        };
    }
    Ok(spec)
}

/// Parses `COUNT/INTERVAL` as pf writes `max-src-conn-rate`: the interval in seconds, or
/// with a unit (`s`, `m`, `h`). Returns the count and the interval in ms.
fn parse_rate(text: &str) -> Result<(u32, u32), String> {
    let usage = "write COUNT/INTERVAL, e.g. \"5/30s\" (5 new sessions per 30 seconds)";
    let (count, interval) = text.split_once('/').ok_or_else(|| usage.to_string())?;
    let count: u32 = count
        .trim()
        .parse()
        .ok()
        .filter(|n| (1..=1_000_000).contains(n))
        .ok_or_else(|| format!("the count must be 1 to 1000000; {usage}"))?;
    let interval = interval.trim();
    let (digits, unit) = match interval.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => interval.split_at(at),
        None => (interval, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("unknown unit `{unit}`: use s, m or h; {usage}")),
    };
    let seconds = digits
        .parse::<u64>()
        .ok()
        .map(|n| n * scale)
        .filter(|s| (1..=86_400).contains(s))
        .ok_or_else(|| format!("the interval must be 1 second to 24 hours; {usage}"))?;
    Ok((count, (seconds * 1000) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_is_a_count_per_interval_in_seconds_minutes_or_hours() {
        assert_eq!(parse_rate("5/30"), Ok((5, 30_000)));
        assert_eq!(parse_rate("5/30s"), Ok((5, 30_000)));
        assert_eq!(parse_rate("10/2m"), Ok((10, 120_000)));
        assert_eq!(parse_rate(" 100 / 1h "), Ok((100, 3_600_000)));
        for bad in [
            "5",
            "0/30",
            "5/0",
            "5/30d",
            "x/30",
            "5/",
            "5/25h",
            "2000000/1",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn session_check_describes_a_limit_in_words() {
        let spec = LimitSpec {
            max_src_conn: 5,
            rate: Some((10, 60_000)),
            src_prefix_v4: 32,
            src_prefix_v6: 64,
            overload: Some("abusers".into()),
            overload_timeout: 3600,
            flush: OverloadFlush::Global,
            ..LimitSpec::default()
        };
        assert_eq!(
            spec.describe("ssh"),
            "rule `ssh`: limit 5 sessions at once per source (/32 IPv4, /64 IPv6), \
             10 new sessions per 60 s per source (/32 IPv4, /64 IPv6); over it, a source \
             goes into set `abusers` for 3600 s, flushing all its sessions"
        );
    }

    #[test]
    fn the_flush_choice_compiles_into_the_limit_flags() {
        let spec = LimitSpec {
            max_src_conn: 3,
            rate: Some((5, 30_000)),
            src_prefix_v4: 24,
            src_prefix_v6: 64,
            overload: Some("abusers".into()),
            overload_timeout: 600,
            flush: OverloadFlush::Global,
            ..LimitSpec::default()
        };
        let limit = spec.compile(2);
        assert_eq!(
            (limit.max_src_conn, limit.rate_count, limit.rate_interval_ms),
            (3, 5, 30_000)
        );
        assert_eq!(
            (limit.overload_set, limit.overload_timeout_ns),
            (2, 600 * NS_PER_SEC)
        );
        assert_eq!(limit.flags, limit_flags::FLUSH | limit_flags::FLUSH_GLOBAL);
        let rule_only = LimitSpec {
            flush: OverloadFlush::Rule,
            ..spec
        };
        assert_eq!(rule_only.compile(1).flags, limit_flags::FLUSH);
    }
}
