//! The rules' limits in the pinned maps (`session_common::limits`): written with each
//! policy, recounted from the session table by the reaper, read by `session list
//! --sources`, `stats` and the metrics, and consulted when an overloaded source's
//! sessions are to be flushed.

use std::collections::HashMap as StdHashMap;

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData};
use session_common::{
    limits::{LIMIT_HIT_SLOTS, LimitHit, RuleLimit, SourceKey, SourceState, limit_flags},
    wire::{Event, FlowKey, MAX_RULES, Session, map_names, session_flags},
};

use crate::bpf::pinned::{PinnedMaps, is_not_found};

/// The map update flag that only creates an entry, never replaces one.
const BPF_NOEXIST: u64 = 1;

/// Whether a map update failed because the key was there already (`BPF_NOEXIST`).
fn is_exists(error: &aya::maps::MapError) -> bool {
    matches!(error, aya::maps::MapError::SyscallError(call)
        if call.io_error.raw_os_error() == Some(libc::EEXIST))
}

/// One source a limited rule counts, as `session list --sources` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceEntry {
    /// The rule and the source's prefix.
    pub key: SourceKey,
    /// What the rule knows of it.
    pub state: SourceState,
}

/// A limited rule's figures, as `session stats` and the metrics show them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleLimitStats {
    /// Sessions the rule holds now.
    pub sessions: u32,
    /// New sessions its limits refused.
    pub refused: u64,
    /// Sources it put into its overload set.
    pub overloaded: u64,
}

/// The source that started `session` under `key`.
fn origin(key: &FlowKey, session: &Session) -> [u8; 16] {
    if session.flags & session_flags::ORIG_IS_LO != 0 {
        key.addr_lo
    } else {
        key.addr_hi
    }
}

impl PinnedMaps {
    fn sources_map(&self) -> Result<HashMap<MapData, SourceKey, SourceState>> {
        HashMap::try_from(self.map(map_names::SRC_LIMITS)?)
            .context("map SRC_LIMITS is not a hash map")
    }

    /// Writes the limits of a policy into `bank`, every other rule's slot cleared.
    pub(crate) fn write_limits(&self, bank: u32, limits: &[(u16, RuleLimit)]) -> Result<()> {
        let mut slots = self.array::<RuleLimit>(map_names::RULE_LIMITS)?;
        let by_rule: StdHashMap<u16, RuleLimit> = limits.iter().copied().collect();
        for id in 0..MAX_RULES {
            let limit = by_rule.get(&(id as u16)).copied().unwrap_or_default();
            slots
                .set(bank * MAX_RULES + id, limit, 0)
                .context("writing a rule's limits")?;
        }
        self.zero_per_cpu(map_names::LIMIT_HITS, LIMIT_HIT_SLOTS)
            .context("resetting the rules' limit counters")
    }

    /// The limits of the active policy's rules, by rule id (only rules that have any).
    pub fn active_limits(&self) -> Result<StdHashMap<u16, RuleLimit>> {
        let (bank, _) = self.active_policy()?;
        let slots = self.array::<RuleLimit>(map_names::RULE_LIMITS)?;
        let mut out = StdHashMap::new();
        for id in 0..MAX_RULES {
            let limit = slots
                .get(&(bank * MAX_RULES + id), 0)
                .context("reading a rule's limits")?;
            if limit.is_set() {
                out.insert(id as u16, limit);
            }
        }
        Ok(out)
    }

    /// Sets each limited rule's and each source's session count to what the table holds
    /// at `now`: corrects the counts for sessions the unassured tier evicted (which no
    /// packet uncounted) and for sources the LRU map forgot. The counts are read before
    /// the table and written back only where the kernel left them as read meanwhile: a
    /// packet that admits, closes or refuses a session of that source during the walk
    /// (its count, refusals and rate bucket) wins, and the next recount corrects what is
    /// still wrong. Before, the values read were written back whole, which could undo a
    /// refusal and refill a rate bucket. Returns the sessions counted.
    pub fn recount_limits(&self, now: u64) -> Result<u64> {
        let limits = self.active_limits()?;
        if limits.is_empty() {
            return Ok(0);
        }
        let mut map = self.sources_map()?;
        let stored: Vec<(SourceKey, SourceState)> = map.iter().filter_map(Result::ok).collect();
        let mut rule_totals = self.array::<u32>(map_names::RULE_CONNS)?;
        let mut totals_before = [0u32; MAX_RULES as usize];
        for (id, before) in totals_before.iter_mut().enumerate() {
            *before = rule_totals
                .get(&(id as u32), 0)
                .context("reading a rule's sessions")?;
        }
        let mut sources: StdHashMap<SourceKey, u32> = StdHashMap::new();
        let mut totals = [0u32; MAX_RULES as usize];
        for (key, session) in self.live_sessions(now)? {
            if session.flags & session_flags::COUNTED == 0 {
                continue;
            }
            let Some(limit) = limits.get(&session.rule_id) else {
                continue;
            };
            let source = SourceKey::of(limit, session.rule_id, key.family, &origin(&key, &session));
            *sources.entry(source).or_default() += 1;
            totals[session.rule_id as usize % MAX_RULES as usize] += 1;
        }
        let counted = totals.iter().map(|n| u64::from(*n)).sum();
        for (key, state) in stored {
            let want = sources.remove(&key).unwrap_or(0);
            if state.conns != want && map.get(&key, 0).ok() == Some(state) {
                map.insert(
                    key,
                    SourceState {
                        conns: want,
                        ..state
                    },
                    0,
                )
                .context("correcting a source's session count")?;
            }
        }
        for (key, conns) in sources {
            let state = SourceState {
                conns,
                ..SourceState::default()
            };
            // BPF_NOEXIST: a source the kernel counted again meanwhile keeps its entry.
            match map.insert(key, state, BPF_NOEXIST) {
                Ok(()) => {}
                Err(error) if is_exists(&error) => {}
                Err(error) => {
                    return Err(error).context("restoring a source's session count");
                }
            }
        }
        for (id, (total, before)) in totals.iter().zip(totals_before).enumerate() {
            let id = id as u32;
            if *total != before
                && rule_totals
                    .get(&id, 0)
                    .context("reading a rule's sessions")?
                    == before
            {
                rule_totals
                    .set(id, *total, 0)
                    .context("correcting a rule's session count")?;
            }
        }
        Ok(counted)
    }

    /// Every source the limited rules count.
    pub fn limit_sources(&self) -> Result<Vec<SourceEntry>> {
        let mut out = Vec::new();
        for entry in self.sources_map()?.iter() {
            match entry {
                Ok((key, state)) => out.push(SourceEntry { key, state }),
                Err(error) if is_not_found(&error) => {}
                Err(error) => return Err(error).context("reading SRC_LIMITS"),
            }
        }
        out.sort_by_key(|entry| (entry.key.rule_id, entry.key.addr));
        Ok(out)
    }

    /// The figures of each rule with limits in the active policy, by rule id.
    pub fn limit_stats(&self) -> Result<Vec<(u16, RuleLimitStats)>> {
        let limits = self.active_limits()?;
        let hits = self.per_cpu::<u64>(map_names::LIMIT_HITS)?;
        let totals = self.array::<u32>(map_names::RULE_CONNS)?;
        let mut ids: Vec<u16> = limits.keys().copied().collect();
        ids.sort_unstable();
        ids.into_iter()
            .map(|id| {
                let sum = |kind: LimitHit| -> Result<u64> {
                    Ok(hits
                        .get(&kind.slot(id), 0)
                        .context("reading a rule's limit counters")?
                        .iter()
                        .sum())
                };
                Ok((
                    id,
                    RuleLimitStats {
                        sessions: totals
                            .get(&u32::from(id), 0)
                            .context("reading a rule's sessions")?,
                        refused: sum(LimitHit::Refused)?,
                        overloaded: sum(LimitHit::Overloaded)?,
                    },
                ))
            })
            .collect()
    }

    /// Flushes the sessions of a source the kernel overloaded (`event`), as its rule's
    /// `overload_flush` asks: those the rule admitted, or all the source started. Returns
    /// how many were removed; 0 when the rule flushes nothing.
    pub fn flush_overloaded(&self, event: &Event, now: u64) -> Result<u64> {
        let limits = self.active_limits()?;
        let Some(limit) = limits.get(&event.rule_id) else {
            return Ok(0);
        };
        if limit.flags & limit_flags::FLUSH == 0 {
            return Ok(0);
        }
        let global = limit.flags & limit_flags::FLUSH_GLOBAL != 0;
        let banned = SourceKey::of(limit, event.rule_id, event.family, &event.src);
        let keys: Vec<FlowKey> = self
            .live_sessions(now)?
            .into_iter()
            .filter(|(key, session)| {
                key.family == event.family
                    && (global || session.rule_id == event.rule_id)
                    && SourceKey::of(limit, event.rule_id, key.family, &origin(key, session))
                        == banned
            })
            .map(|(key, _)| key)
            .collect();
        self.remove_sessions(&keys)
    }
}
