//! Bringing sessions into the table (takeover, restore) and writing them out (save): the
//! one path every import takes, so each is judged by the policy in force exactly as a
//! reload's readmission judges the sessions it finds.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use session_common::{
    record::{NO_NAME, SessionRecord},
    wire::{FlowKey, RULE_ID_DEFAULT, Session, TcpState, proto, rule_flags, session_flags},
};

use crate::{
    bpf::{loader, pinned::PinnedMaps},
    continuity::file::TableFile,
    daemon::readmission::admitting_rule,
    host_engine::ModelRules,
};

/// What an import did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Sessions stored.
    pub imported: u64,
    /// Sessions the policy in force would not admit.
    pub refused: u64,
    /// Sessions that had expired (while a saved file waited).
    pub expired: u64,
    /// Sessions whose key the table already held (the live one was kept).
    pub present: u64,
}

impl ImportReport {
    /// Everything not imported.
    pub fn not_imported(&self) -> u64 {
        self.refused + self.expired + self.present
    }
}

/// Judges `candidates` (a record and the index of its first packet's interface, 0 when
/// unknown) against `rules`, rebases them onto monotonic `now` after they waited
/// `waited_ns`, and stores those admitted whose key the table does not hold (a live
/// session is newer than any import). Nothing is stored when the admitted sessions cannot
/// fit in the protected tier.
pub fn import(
    maps: &PinnedMaps,
    rules: &ModelRules,
    candidates: impl IntoIterator<Item = (SessionRecord, u32)>,
    now: u64,
    waited_ns: u64,
) -> Result<ImportReport> {
    let snapshot = maps.snapshot_sessions()?;
    let stored = snapshot
        .iter()
        .filter(|(_, session)| session.flags & session_flags::PROTECTED != 0)
        .count() as u64;
    let existing: HashSet<FlowKey> = snapshot
        .into_iter()
        .filter(|(_, session)| session.expires_ns > now)
        .map(|(key, _)| key)
        .collect();
    let mut report = ImportReport::default();
    let mut admitted: Vec<(FlowKey, Session)> = Vec::new();
    let mut seen = HashSet::new();
    for (record, ifindex) in candidates {
        let Some(mut session) = record.to_session(now, waited_ns, ifindex, RULE_ID_DEFAULT) else {
            report.expired += 1;
            continue;
        };
        if existing.contains(&record.key) || !seen.insert(record.key) {
            report.present += 1;
            continue;
        }
        match admitting_rule(rules, &record.key, &session) {
            Some(rule) => {
                session.rule_id = rule;
                count_under_limits(rules, &record.key, &mut session);
                admitted.push((record.key, session));
            }
            None => report.refused += 1,
        }
    }
    let protected = admitted
        .iter()
        .filter(|(_, session)| session.flags & session_flags::PROTECTED != 0)
        .count() as u64;
    let capacity = maps.max_sessions()?;
    if stored + protected > capacity {
        bail!(
            "{protected} established sessions do not fit in the table: it holds {stored} of max_sessions {capacity}; nothing was imported (raise `[limits] max_sessions`, then `session down` and start again)"
        );
    }
    maps.insert_sessions(&admitted)?;
    report.imported = admitted.len() as u64;
    Ok(report)
}

/// Marks an imported session as counted by its rule's limits when the rule has any and
/// the session is not closing, as the kernel counts the sessions it admits: the daemon's
/// recount then counts it, and its close uncounts it. Whatever the saved record said.
fn count_under_limits(rules: &ModelRules, key: &FlowKey, session: &mut Session) {
    let limited = rules.entries.iter().any(|entry| {
        entry.rule_id == session.rule_id && entry.match_flags & rule_flags::LIMITED != 0
    });
    let closing = key.proto == proto::TCP
        && (session.state == TcpState::TimeWait as u8 || session.state == TcpState::Close as u8);
    if limited && !closing {
        session.flags |= session_flags::COUNTED;
    } else {
        session.flags &= !session_flags::COUNTED;
    }
}

/// Writes every live session of the table to `path`; returns how many.
pub fn save(maps: &PinnedMaps, path: &Path, now: u64, now_unix_ns: u64) -> Result<u64> {
    let sessions = maps.snapshot_sessions()?;
    let rules = maps.rule_names()?;
    let mut ifaces: Vec<String> = Vec::new();
    // Interface index to its place in `ifaces`: one name lookup per interface.
    let mut iface_slots: HashMap<u32, u16> = HashMap::new();
    let mut records = Vec::with_capacity(sessions.len());
    for (key, session) in &sessions {
        let rule = if session.rule_id != RULE_ID_DEFAULT && (session.rule_id as usize) < rules.len()
        {
            session.rule_id
        } else {
            NO_NAME
        };
        let ifindex = u32::from_ne_bytes(session.origin_ifindex);
        let iface = *iface_slots.entry(ifindex).or_insert_with(|| {
            match (ifindex != 0)
                .then(|| crate::bpf::netdev::index_to_name(ifindex))
                .flatten()
            {
                Some(name) => {
                    ifaces.push(name);
                    (ifaces.len() - 1) as u16
                }
                None => NO_NAME,
            }
        });
        if let Some(record) = SessionRecord::from_session(key, session, now, rule, iface) {
            records.push(record);
        }
    }
    let count = records.len() as u64;
    TableFile {
        saved_unix_ns: now_unix_ns,
        rules,
        ifaces,
        records,
    }
    .write(path)
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(count)
}

/// Restores the table saved in `path`: checks the whole file first (a damaged file, one
/// of another format version, or one with more sessions than the table holds changes
/// nothing), then imports its sessions, their times rebased by the wall-clock time the
/// file waited.
pub fn restore(maps: &PinnedMaps, path: &Path, now: u64, now_unix_ns: u64) -> Result<ImportReport> {
    let capacity = maps.max_sessions()?;
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > TableFile::max_len(capacity) {
        bail!(
            "{} cannot be restored, nothing changed: {len} bytes is more than a table of max_sessions {capacity} can fill: raise `[limits] max_sessions` (then `session down` and start again) to restore it",
            path.display()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let table = TableFile::decode(&bytes, capacity)
        .with_context(|| format!("{} cannot be restored, nothing changed", path.display()))?;
    let waited = now_unix_ns.saturating_sub(table.saved_unix_ns);
    let rules = maps.active_rules()?;
    let ifindexes: Vec<u32> = table
        .ifaces
        .iter()
        .map(|name| loader::ifindex(name).unwrap_or(0))
        .collect();
    let candidates = table.records.iter().map(|record| {
        let ifindex = ifindexes
            .get(record.origin_iface as usize)
            .copied()
            .unwrap_or(0);
        let mut record = *record;
        record.forget_edges();
        (record, ifindex)
    });
    import(maps, &rules, candidates, now, waited)
}

/// Nanoseconds since the Unix epoch on the wall clock (the clock that goes on across a
/// reboot, unlike the monotonic one).
pub fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
