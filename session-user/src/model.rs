//! The engine on the host: the same `session_common::engine::process` the kernel runs,
//! over plain collections. Tests use it as the reference the kernel path must equal, and
//! to run whole packet sequences without a kernel.

use std::collections::HashMap;

use session_common::{
    engine::{Counters, Outcome, RuleSource, Scratch, SessionTable, process},
    packet::PacketMeta,
    policy::rule_matches,
    wire::{
        Counter, CtState, FlowKey, Hook, PolicyHeader, RULE_HIT_SLOTS, Rule, Session, Settings,
    },
};

use crate::compile::CompiledPolicy;

/// Sessions in a hash map with an optional capacity (inserts beyond it are refused).
#[derive(Clone, Debug, Default)]
pub struct ModelSessions {
    /// The table.
    pub map: HashMap<FlowKey, Session>,
    /// Refuse inserts of new keys beyond this many entries, when set.
    pub capacity: Option<usize>,
}

impl SessionTable for ModelSessions {
    fn get_mut(&mut self, key: &FlowKey) -> Option<&mut Session> {
        self.map.get_mut(key)
    }

    fn insert(&mut self, key: &FlowKey, session: &Session) -> bool {
        let full = self
            .capacity
            .is_some_and(|capacity| self.map.len() >= capacity && !self.map.contains_key(key));
        if full {
            return false;
        }
        self.map.insert(*key, *session);
        true
    }

    fn remove(&mut self, key: &FlowKey) {
        self.map.remove(key);
    }
}

/// One policy bank.
#[derive(Clone, Debug, Default)]
pub struct ModelRules {
    /// Header of the bank.
    pub header: PolicyHeader,
    /// Entries.
    pub entries: Vec<Rule>,
}

impl RuleSource for ModelRules {
    fn header(&self) -> Option<(u32, &PolicyHeader)> {
        Some((0, &self.header))
    }

    fn first_match(
        &self,
        _bank: u32,
        count: u32,
        meta: &PacketMeta,
        state: CtState,
        hook: Hook,
        ifindex: u32,
    ) -> Option<&Rule> {
        self.entries
            .iter()
            .take(count as usize)
            .find(|rule| rule_matches(rule, meta, state, hook, ifindex))
    }
}

/// Counters as plain arrays.
#[derive(Clone, Debug)]
pub struct ModelCounters {
    /// Global counters by [`Counter`] index.
    pub global: Vec<u64>,
    /// Rule-hit slots.
    pub hits: Vec<u64>,
}

impl Default for ModelCounters {
    fn default() -> Self {
        ModelCounters {
            global: vec![0; Counter::COUNT as usize],
            hits: vec![0; RULE_HIT_SLOTS as usize],
        }
    }
}

impl ModelCounters {
    /// The value of one global counter.
    pub fn get(&self, counter: Counter) -> u64 {
        self.global[counter as usize]
    }
}

impl Counters for ModelCounters {
    fn count(&mut self, counter: Counter) {
        self.global[counter as usize] += 1;
    }

    fn hit(&mut self, slot: u32) {
        self.hits[slot as usize] += 1;
    }
}

/// A whole firewall on the host.
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// Timeouts and switches.
    pub settings: Settings,
    /// Session table.
    pub sessions: ModelSessions,
    /// Active policy.
    pub rules: ModelRules,
    /// Counters.
    pub counters: ModelCounters,
}

impl Model {
    /// A model enforcing `policy` with `settings`.
    pub fn new(settings: Settings, policy: &CompiledPolicy) -> Model {
        Model {
            settings,
            rules: ModelRules {
                header: PolicyHeader {
                    generation: 1,
                    ..policy.header
                },
                entries: policy.entries.clone(),
            },
            ..Model::default()
        }
    }

    /// Runs one frame through the pipeline; `None` for non-IP frames (always passed).
    pub fn packet(&mut self, frame: &[u8], hook: Hook, ifindex: u32, now: u64) -> Option<Outcome> {
        let mut scratch = Scratch::default();
        process(
            frame,
            hook,
            ifindex,
            now,
            &self.settings,
            &mut self.sessions,
            &self.rules,
            &mut self.counters,
            &mut scratch,
        )
    }
}
