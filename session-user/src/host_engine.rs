//! The engine on the host: the same `session_common::engine::process` the kernel runs,
//! over plain collections. Tests use it as the reference the kernel path must equal, and
//! to run whole packet sequences without a kernel.

use std::collections::{HashMap, HashSet};

use session_common::{
    engine::{Counters, Limits, Outcome, RuleSource, Scratch, SessionTable, Sockets, process},
    expect::{ExpectKey, Expectations},
    fragment::{DatagramEntry, DatagramKey, FragmentTable, MAX_FRAGMENT_DATAGRAMS},
    limits::{
        Admission, LimitHit, LimitStore, RuleLimit, SourceKey, SourceState, admit_new,
        overload_source, release_session,
    },
    packet::PacketMeta,
    policy::rule_matches,
    sets::sets_match,
    syn_defence::{DefendedPort, Socket},
    track::flow_key,
    wire::{
        Counter, CtState, FlowKey, Hook, PolicyHeader, RULE_HIT_SLOTS, Rule, Session, Settings,
        session_flags,
    },
};

use crate::policy::{compile::CompiledPolicy, config::Network, rule_bitmaps::HostSets};

/// Both session tiers in one hash map (the protected ones listed in `protected`), with
/// optional capacities. The unassured tier evicts its least recently used entry when
/// full, as the kernel's LRU map does (the kernel's LRU is approximate, so tests that
/// compare the two must not fill it).
#[derive(Clone, Debug, Default)]
pub struct ModelSessions {
    /// Every session, whichever tier.
    pub map: HashMap<FlowKey, Session>,
    /// Keys in the protected tier.
    pub protected: HashSet<FlowKey>,
    /// Capacity of the protected tier, when limited.
    pub protected_capacity: Option<usize>,
    /// Capacity of the unassured tier, when limited.
    pub unassured_capacity: Option<usize>,
    last_use: HashMap<FlowKey, u64>,
    clock: u64,
}

impl ModelSessions {
    fn touch(&mut self, key: &FlowKey) {
        self.clock += 1;
        self.last_use.insert(*key, self.clock);
    }

    fn unassured_len(&self) -> usize {
        self.map.len() - self.protected.len()
    }
}

impl SessionTable for ModelSessions {
    fn get_mut(&mut self, key: &FlowKey) -> Option<&mut Session> {
        if self.map.contains_key(key) && !self.protected.contains(key) {
            self.touch(key);
        }
        self.map.get_mut(key)
    }

    fn insert(&mut self, key: &FlowKey, session: &Session) -> bool {
        let full = self.unassured_capacity.is_some_and(|capacity| {
            self.unassured_len() >= capacity && !self.map.contains_key(key)
        });
        if full {
            let victim = self
                .last_use
                .iter()
                .filter(|(k, _)| !self.protected.contains(*k))
                .min_by_key(|(_, used)| **used)
                .map(|(k, _)| *k);
            if let Some(victim) = victim {
                self.remove(&victim);
            }
        }
        self.map.insert(*key, *session);
        self.touch(key);
        true
    }

    fn remove(&mut self, key: &FlowKey) {
        self.map.remove(key);
        self.protected.remove(key);
        self.last_use.remove(key);
    }

    fn protect(&mut self, key: &FlowKey) -> bool {
        let full = self
            .protected_capacity
            .is_some_and(|capacity| self.protected.len() >= capacity);
        match self.map.get_mut(key) {
            Some(session) if !full && !self.protected.contains(key) => {
                session.flags |= session_flags::PROTECTED;
                self.protected.insert(*key);
                self.last_use.remove(key);
                true
            }
            _ => false,
        }
    }
}

/// The fragment records, with the kernel map's capacity: a full table evicts its least
/// recently used record, as the kernel's LRU map does (approximately there, so tests that
/// compare the two must not fill it).
#[derive(Clone, Debug)]
pub struct ModelFragments {
    /// Every record.
    pub map: HashMap<DatagramKey, DatagramEntry>,
    /// Records held at most.
    pub capacity: usize,
    last_use: HashMap<DatagramKey, u64>,
    clock: u64,
}

impl Default for ModelFragments {
    fn default() -> Self {
        ModelFragments {
            map: HashMap::new(),
            capacity: MAX_FRAGMENT_DATAGRAMS as usize,
            last_use: HashMap::new(),
            clock: 0,
        }
    }
}

impl FragmentTable for ModelFragments {
    fn get(&self, key: &DatagramKey) -> Option<&DatagramEntry> {
        self.map.get(key)
    }

    fn insert(&mut self, key: &DatagramKey, entry: &DatagramEntry) {
        if self.map.len() >= self.capacity && !self.map.contains_key(key) {
            let victim = self
                .last_use
                .iter()
                .min_by_key(|(_, used)| **used)
                .map(|(k, _)| *k);
            if let Some(victim) = victim {
                self.remove(&victim);
            }
        }
        self.clock += 1;
        self.map.insert(*key, *entry);
        self.last_use.insert(*key, self.clock);
    }

    fn remove(&mut self, key: &DatagramKey) {
        self.map.remove(key);
        self.last_use.remove(key);
    }
}

/// One policy bank.
#[derive(Clone, Debug, Default)]
pub struct ModelRules {
    /// Header of the bank.
    pub header: PolicyHeader,
    /// Entries.
    pub entries: Vec<Rule>,
    /// The sets the entries reference, by storage (source set `i` in storage `i`,
    /// destination set `j` after the source sets); tests change them as `session set` does.
    pub sets: HostSets,
}

impl ModelRules {
    /// `policy` as the active bank, at generation 1 (a bank the daemon applied).
    pub fn new(policy: &CompiledPolicy) -> ModelRules {
        ModelRules {
            header: PolicyHeader {
                generation: 1,
                ..policy.header
            },
            entries: policy.entries.clone(),
            sets: HostSets::new(&policy.sets),
        }
    }
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
        let (src_sets, dst_sets) = self.sets.masks(&meta.src, &meta.dst);
        self.entries.iter().take(count as usize).find(|rule| {
            rule_matches(rule, meta, state, hook, ifindex) && sets_match(rule, src_sets, dst_sets)
        })
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

/// Expectations in a hash map, without a capacity: tests that compare it with the
/// kernel's LRU map must not fill that.
#[derive(Clone, Debug, Default)]
pub struct ModelExpectations {
    /// Expiry (ns) of each expectation.
    pub map: HashMap<ExpectKey, u64>,
}

impl Expectations for ModelExpectations {
    fn expect(&mut self, key: &ExpectKey, expires_ns: u64) {
        self.map.insert(*key, expires_ns);
    }

    fn expiry(&mut self, key: &ExpectKey) -> Option<u64> {
        self.map.get(key).copied()
    }
}

/// Limits in hash maps, without the kernel's LRU bound: tests that compare the two must
/// not fill that. Overloaded sources wait in `overloads` until [`Model::packet`] puts them
/// into the model's sets, which the pipeline only reads.
#[derive(Clone, Debug, Default)]
pub struct ModelLimits {
    /// Each rule's limits, by rule id (the model has one bank).
    pub rules: HashMap<u16, RuleLimit>,
    /// What each rule knows of each source.
    pub sources: HashMap<SourceKey, SourceState>,
    /// Sessions each rule holds.
    pub totals: HashMap<u16, u32>,
    /// Per-rule counters by kind and rule id.
    pub hits: HashMap<(u32, u16), u64>,
    /// Sources overloaded by the last packet: the source set index and the prefix.
    pub overloads: Vec<(u8, Network)>,
}

impl LimitStore for ModelLimits {
    fn rule_limit(&self, _bank: u32, rule_id: u16) -> Option<RuleLimit> {
        self.rules.get(&rule_id).copied().filter(RuleLimit::is_set)
    }

    fn source(&mut self, key: &SourceKey) -> Option<&mut SourceState> {
        Some(self.sources.entry(*key).or_default())
    }

    fn total(&mut self, rule_id: u16) -> Option<&mut u32> {
        Some(self.totals.entry(rule_id).or_default())
    }

    fn overload(&mut self, _bank: u32, limit: &RuleLimit, key: &SourceKey, _now: u64) -> bool {
        let net = Network {
            addr: key.addr,
            prefix: key.mapped_prefix(),
            family: key.family,
        };
        self.overloads.push((limit.overload_set, net));
        true
    }

    fn hit(&mut self, kind: LimitHit, rule_id: u16) {
        *self.hits.entry((kind as u32, rule_id)).or_default() += 1;
    }
}

impl Limits for ModelLimits {
    fn admit(&mut self, bank: u32, rule_id: u16, meta: &PacketMeta, now: u64) -> Admission {
        admit_new(self, bank, rule_id, meta.family, &meta.src, now)
    }

    fn overload(&mut self, bank: u32, rule_id: u16, meta: &PacketMeta, now: u64) -> bool {
        overload_source(self, bank, rule_id, meta.family, &meta.src, now)
    }

    fn release(&mut self, bank: u32, rule_id: u16, key: &FlowKey, orig_is_lo: bool) {
        release_session(self, bank, rule_id, key, orig_is_lo);
    }
}

/// The host's TCP stack as the SYN-flood defence asks it: the defended ports, and what
/// the stack holds for each connection (by flow key; nothing when absent).
#[derive(Clone, Debug, Default)]
pub struct ModelSockets {
    /// The defended ports.
    pub defended: HashMap<u16, DefendedPort>,
    /// What the stack holds for each connection.
    pub sockets: HashMap<FlowKey, Socket>,
    /// The ports something listens on.
    pub listening: HashSet<u16>,
}

impl Sockets for ModelSockets {
    fn defended(&mut self, port: u16) -> Option<&mut DefendedPort> {
        self.defended.get_mut(&port)
    }

    fn socket(&mut self, meta: &PacketMeta, inbound: bool) -> Socket {
        if let Some(socket) = self.sockets.get(&flow_key(meta).0) {
            return *socket;
        }
        let local_port = if inbound { meta.dport } else { meta.sport };
        if self.listening.contains(&local_port) {
            Socket::Listening
        } else {
            Socket::Unknown
        }
    }
}

/// A whole firewall on the host.
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// Timeouts and switches.
    pub settings: Settings,
    /// Session table.
    pub sessions: ModelSessions,
    /// Records of fragmented datagrams in flight.
    pub fragments: ModelFragments,
    /// Active policy.
    pub rules: ModelRules,
    /// Counters.
    pub counters: ModelCounters,
    /// Replies the host's broadcast and multicast requests wait for.
    pub expectations: ModelExpectations,
    /// The rules' limits and what they count.
    pub limits: ModelLimits,
    /// The host's TCP stack, for the SYN-flood defence.
    pub sockets: ModelSockets,
    /// The metadata the last packet left in the scratch memory, as the kernel's does:
    /// what [`Outcome::event_kind`] reads besides the outcome.
    pub last_meta: PacketMeta,
}

impl Model {
    /// A model enforcing `policy` with `settings`.
    pub fn new(settings: Settings, policy: &CompiledPolicy) -> Model {
        Model {
            settings,
            rules: ModelRules::new(policy),
            limits: ModelLimits {
                rules: policy.limits.iter().copied().collect(),
                ..ModelLimits::default()
            },
            ..Model::default()
        }
    }

    /// Runs one frame through the pipeline; `None` for non-IP frames (always passed).
    pub fn packet(&mut self, frame: &[u8], hook: Hook, ifindex: u32, now: u64) -> Option<Outcome> {
        let mut scratch = Scratch::default();
        let outcome = process(
            frame,
            hook,
            ifindex,
            now,
            &self.settings,
            &mut self.sessions,
            &mut self.fragments,
            &self.rules,
            &mut self.counters,
            &mut self.expectations,
            &mut self.limits,
            &mut self.sockets,
            &mut scratch,
        );
        self.last_meta = scratch.meta;
        for (set, net) in self.limits.overloads.drain(..) {
            let storage = self.rules.sets.refs.src[usize::from(set.saturating_sub(1)) & 7];
            if let Some(members) = self.rules.sets.storages.get_mut(storage as usize) {
                members.insert(&net);
            }
        }
        outcome
    }
}
