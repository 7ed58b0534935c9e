//! What one scrape reports, read from the pinned maps in one go.

use std::collections::BTreeMap;

use anyhow::Result;
use session_common::wire::{HIT_DEFAULT_INBOUND, HIT_DEFAULT_OUTBOUND};

use crate::{
    bpf::{clock::monotonic_ns, limits::RuleLimitStats, pinned::PinnedMaps},
    cli::views::{proto_name, rule_label, state_name},
};

/// Everything one scrape reports.
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
    /// The rules with a `limit`, by name, with what their limits did.
    pub limits: Vec<(String, RuleLimitStats)>,
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
        let names = maps.rule_names()?;
        let limits = maps
            .limit_stats()?
            .into_iter()
            .map(|(id, stats)| (rule_label(id, &names), stats))
            .collect();
        let hit = |slot: u32| hits.get(slot as usize).copied().unwrap_or(0);
        let rules = names
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
            limits,
        })
    }
}
