//! The reaper: frees the memory of expired sessions, reports them as events and keeps the
//! presence filter fresh. Correctness never depends on it: the kernel path treats expired
//! sessions as absent at once.

use std::time::Duration;

use log::warn;
use session_common::wire::DaemonCounter;

use crate::{
    bpf::{clock::monotonic_ns, pinned::PinnedMaps},
    daemon::events::EventHub,
};

/// How often expired sessions are freed, at most, and how often interfaces are checked.
/// Correctness never depends on reaping: the kernel path treats expired sessions as absent
/// at once; the reaper only frees their memory.
pub const REAP_INTERVAL: Duration = Duration::from_secs(5);
/// The reaper waits at least this many times as long as its last sweep took before the
/// next one, so that sweeping a huge table costs at most 1/100 (1%) of a core, leaving
/// room under the 2% budget for the rest of an idle daemon.
const REAPER_DUTY_FACTOR: u32 = 100;

/// When to sweep again after a sweep that took `took`.
pub fn next_reap_delay(took: Duration) -> Duration {
    REAP_INTERVAL.max(took.saturating_mul(REAPER_DUTY_FACTOR))
}

/// Frees expired sessions and reports them; returns how long the sweep took. Blocks for
/// the whole sweep (most of a second for a million sessions): the daemon runs it as a
/// blocking task, off its event loop.
pub fn reap(maps: &PinnedMaps, events: &EventHub) -> Duration {
    let started = std::time::Instant::now();
    let names = maps.rule_names().unwrap_or_default();
    match maps.reap(monotonic_ns(), |key, session| {
        events.expired(key, session, &names)
    }) {
        Ok(removed) => {
            let took = started.elapsed().as_nanos() as u64;
            let bumped = maps
                .bump(DaemonCounter::SessionsExpired, removed)
                .and_then(|()| maps.bump(DaemonCounter::ReaperRuns, 1))
                .and_then(|()| maps.bump(DaemonCounter::ReaperNsTotal, took))
                .and_then(|()| maps.set_daemon_counter(DaemonCounter::ReaperLastNs, took));
            if let Err(error) = bumped {
                warn!("reaper: {error:#}");
            }
            if removed > 0 {
                log::debug!(
                    "reaper: removed {removed} expired sessions in {:?}",
                    started.elapsed()
                );
            }
        }
        Err(error) => warn!("reaper: {error:#}"),
    }
    if let Err(error) = maps.recount_limits(monotonic_ns()) {
        warn!("reaper: recounting the rules' limits: {error:#}");
    }
    match maps.expire_set_members(monotonic_ns()) {
        Ok(0) => {}
        Ok(freed) => log::debug!("reaper: freed {freed} expired set entries"),
        Err(error) => warn!("reaper: expiring set entries: {error:#}"),
    }
    match maps.free_retired_sets() {
        Ok(0) => {}
        Ok(freed) => log::debug!("reaper: freed {freed} prefixes of replaced sets"),
        Err(error) => warn!("reaper: freeing replaced sets: {error:#}"),
    }
    started.elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reaper_backs_off_so_a_huge_table_costs_at_most_one_percent_of_a_core() {
        assert_eq!(next_reap_delay(Duration::from_millis(3)), REAP_INTERVAL);
        let slow = Duration::from_millis(700);
        let delay = next_reap_delay(slow);
        assert_eq!(delay, Duration::from_secs(70));
        assert!(slow.as_secs_f64() / (delay.as_secs_f64()) <= 0.01);
    }
}
