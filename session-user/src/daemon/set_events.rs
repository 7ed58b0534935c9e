//! Reports live set changes (`session set ...`, made by other processes straight into the
//! pinned maps) on the event stream: the daemon watches the set-change counter and, when
//! it moves, sends one event per set whose change count moved.

use std::collections::BTreeMap;

use log::{info, warn};
use session_common::wire::DaemonCounter;

use crate::{
    bpf::pinned::PinnedMaps,
    daemon::events::{EventHub, record::SetChange},
};

/// How often the daemon looks for set changes: one counter read each time.
pub const SET_WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// What the daemon last saw of the sets.
#[derive(Default)]
pub struct SetWatch {
    counter: u64,
    changes: BTreeMap<String, u64>,
}

impl SetWatch {
    /// Starts from the sets as they are now, so only later changes are reported.
    pub fn new(maps: &PinnedMaps) -> SetWatch {
        let mut watch = SetWatch {
            counter: maps.daemon_counter(DaemonCounter::SetChanges).unwrap_or(0),
            ..SetWatch::default()
        };
        for set in maps.sets().unwrap_or_default() {
            watch.changes.insert(set.name, set.changes);
        }
        watch
    }

    /// Reports the sets that changed since the last call.
    pub fn poll(&mut self, maps: &PinnedMaps, events: &EventHub) {
        let counter = match maps.daemon_counter(DaemonCounter::SetChanges) {
            Ok(counter) => counter,
            Err(error) => {
                warn!("watching set changes: {error:#}");
                return;
            }
        };
        if counter == self.counter {
            return;
        }
        self.counter = counter;
        let sets = match maps.sets() {
            Ok(sets) => sets,
            Err(error) => {
                warn!("watching set changes: {error:#}");
                return;
            }
        };
        for set in sets {
            let seen = self.changes.insert(set.name.clone(), set.changes);
            if seen != Some(set.changes) {
                info!(
                    "set {} changed: {} entries after {} live changes",
                    set.name, set.entries, set.changes
                );
                events.set_changed(&SetChange::now(set.name, set.entries.into(), set.changes));
            }
        }
    }
}
