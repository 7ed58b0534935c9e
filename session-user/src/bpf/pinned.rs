//! Access to the pinned maps, shared by the daemon and every CLI command: the bpffs pin
//! directory is the one source of truth, so a restarted daemon and a separate `session
//! list` see exactly what the kernel sees.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use aya::maps::{
    Array, DevMapHash, HashMap, Map, MapData, PerCpuArray, PerCpuValues,
    lpm_trie::{Key as LpmKey, LpmTrie},
};
use session_common::{
    clock::TickClock,
    rule_bitmaps::{ADDR_KEY_BANK_BITS, AddrKey, IfaceKey, PortIntervals, RuleBits, bits_slot},
    wire::{
        Counter, DaemonCounter, FlowKey, MAX_RULES, PolicyHeader, RULE_HIT_SLOTS, Rule, RuleName,
        Session, Settings, map_names, session_flags,
    },
};

use crate::{
    bpf::{
        batch::{self, sweep_tier},
        presence::PresenceFilter,
    },
    daemon::lock::SetsLock,
    host_engine::ModelRules,
    policy::{
        compile::{CompiledPolicy, decode_name},
        rule_bitmaps::RuleBitmaps,
    },
};

/// Default bpffs directory for the pinned maps.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/session";

/// The map pinned at `path` with its kernel info (size, value size), or `None` when
/// nothing is pinned there: what the loader checks before reusing a pinned map.
pub(crate) fn pinned_map_info(path: &Path) -> Result<Option<(MapData, aya::maps::MapInfo)>> {
    if !path.exists() {
        return Ok(None);
    }
    let map = MapData::from_pin(path)
        .with_context(|| format!("opening the pinned map {}", path.display()))?;
    let info = map
        .info()
        .with_context(|| format!("reading the size of the pinned map {}", path.display()))?;
    Ok(Some((map, info)))
}

/// Whether a map operation failed only because the key was not there (aya reports a
/// missing key on delete as the syscall's ENOENT).
pub(crate) fn is_not_found(error: &aya::maps::MapError) -> bool {
    match error {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(call) => {
            call.io_error.raw_os_error() == Some(libc::ENOENT)
        }
        _ => false,
    }
}

/// Keeps the first entry of each key. Walking a hash map key by key is not a snapshot:
/// when the key the walk stands on is deleted meanwhile (an LRU eviction under a flood,
/// say), the kernel restarts the walk from the first bucket and entries come back again.
/// A key also appears in both tiers for a moment while a session is promoted; the
/// assured copy, read first, wins.
fn first_of_each_key(entries: Vec<(FlowKey, Session)>) -> Vec<(FlowKey, Session)> {
    let mut seen = std::collections::HashSet::with_capacity(entries.len());
    entries
        .into_iter()
        .filter(|(key, _)| seen.insert(*key))
        .collect()
}

/// The pinned maps of one `session` instance. Cloning is cheap (the directory only: each
/// operation opens the maps it needs), for work handed to another thread, as the reaper's.
#[derive(Clone)]
pub struct PinnedMaps {
    dir: PathBuf,
}

impl PinnedMaps {
    /// Opens the instance pinned under `dir`, with an operator-facing error when there is
    /// none (daemon never started there) or when we lack the rights.
    pub fn open(dir: &Path) -> Result<Self> {
        let sessions = dir.join(map_names::SESSIONS);
        match std::fs::metadata(&sessions) {
            Ok(_) => Ok(PinnedMaps {
                dir: dir.to_path_buf(),
            }),
            Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => bail!(
                "permission denied reading {}: session's maps are readable by root only; run this command as root",
                sessions.display()
            ),
            Err(_) => bail!(
                "no session maps under {}: start the daemon with `session run --config FILE` (or pass the --pin-dir it uses)",
                dir.display()
            ),
        }
    }

    /// The pin directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn map(&self, name: &str) -> Result<Map> {
        let path = self.dir.join(name);
        let data = MapData::from_pin(&path).with_context(|| {
            format!(
                "cannot open pinned map {} (is this the pin directory of a running session daemon, and are you root?)",
                path.display()
            )
        })?;
        Map::from_map_data(data)
            .with_context(|| format!("unexpected map type at {}", path.display()))
    }

    pub(crate) fn array<V: aya::Pod>(&self, name: &str) -> Result<Array<MapData, V>> {
        Array::try_from(self.map(name)?).with_context(|| format!("map {name} is not an array"))
    }

    pub(crate) fn per_cpu<V: aya::Pod>(&self, name: &str) -> Result<PerCpuArray<MapData, V>> {
        PerCpuArray::try_from(self.map(name)?)
            .with_context(|| format!("map {name} is not a per-CPU array"))
    }

    /// One tier of the session table ([`map_names::SESSIONS`] or [`map_names::UNASSURED`]).
    fn tier(&self, name: &str) -> Result<HashMap<MapData, FlowKey, Session>> {
        HashMap::try_from(self.map(name)?).with_context(|| format!("map {name} is not a hash map"))
    }

    /// Every stored session of both tiers, expired or not, each key once.
    pub fn all_sessions(&self) -> Result<Vec<(FlowKey, Session)>> {
        let mut out = Vec::new();
        for name in [map_names::SESSIONS, map_names::UNASSURED] {
            for entry in self.tier(name)?.iter() {
                match entry {
                    Ok(pair) => out.push(pair),
                    Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(error) => return Err(error).with_context(|| format!("reading {name}")),
                }
            }
        }
        Ok(first_of_each_key(out))
    }

    /// Capacity of the session table.
    pub fn max_sessions(&self) -> Result<u64> {
        let data =
            MapData::from_pin(self.dir.join(map_names::SESSIONS)).context("opening SESSIONS")?;
        let info = data.info().context("reading SESSIONS map info")?;
        Ok(info.max_entries() as u64)
    }

    /// All sessions that have not expired at `now`.
    pub fn live_sessions(&self, now: u64) -> Result<Vec<(FlowKey, Session)>> {
        let mut sessions = self.all_sessions()?;
        sessions.retain(|(_, session)| session.expires_ns > now);
        Ok(sessions)
    }

    /// Removes the sessions under `keys`; returns how many were there.
    pub fn remove_sessions(&self, keys: &[FlowKey]) -> Result<u64> {
        let mut removed = 0;
        for name in [map_names::SESSIONS, map_names::UNASSURED] {
            let mut tier = self.tier(name)?;
            for key in keys {
                match tier.remove(key) {
                    Ok(()) => removed += 1,
                    Err(error) if is_not_found(&error) => {}
                    Err(error) => {
                        return Err(error)
                            .with_context(|| format!("removing a session from {name}"));
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Removes expired sessions, handing each to `on_removed`; returns how many. The same
    /// sweep rebuilds the presence filter.
    pub fn reap(&self, now: u64, mut on_removed: impl FnMut(&FlowKey, &Session)) -> Result<u64> {
        let mut removed = 0;
        for (name, expired) in self.sweep(now)? {
            let mut tier = self.tier(name)?;
            for key in expired {
                // Re-check: the kernel may have replaced the entry since the sweep read it.
                if let Ok(current) = tier.get(&key, 0)
                    && current.expires_ns <= now
                    && tier.remove(&key).is_ok()
                {
                    on_removed(&key, &current);
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Rebuilds the presence filter from the stored sessions without removing any: done
    /// before the programs are attached, so the filter holds every key from the first
    /// packet on, whatever pinned maps the daemon found.
    pub fn rebuild_presence(&self) -> Result<()> {
        self.sweep(0).map(drop)
    }

    /// Whether the presence filter's active bank has the slot of `key` set, so that a
    /// connection attempt under `key` would look the tables up.
    pub fn presence_holds(&self, key: &FlowKey) -> Result<bool> {
        let filter = PresenceFilter::open(&self.dir)?;
        Ok(filter.get(self.presence_bank()?, key))
    }

    /// The share of the presence filter's active bank whose slots are set: the chance that
    /// a connection attempt without a session still looks the tables up.
    pub fn presence_fill(&self) -> Result<f64> {
        let filter = PresenceFilter::open(&self.dir)?;
        Ok(filter.fill(self.presence_bank()?))
    }

    fn presence_bank(&self) -> Result<u32> {
        Ok(self
            .array::<u32>(map_names::PRESENCE_BANK)?
            .get(&0, 0)
            .context("reading the presence filter's bank")?
            & 1)
    }

    /// Reads both tiers and returns, per tier, the keys of the sessions that expired at
    /// `now`. Meanwhile rebuilds the presence filter's inactive bank as
    /// `session_common::presence` lays down (clear it, set the slot of every key read,
    /// then make it active), so that it forgets the sessions removed since the last sweep.
    fn sweep(&self, now: u64) -> Result<[(&'static str, Vec<FlowKey>); 2]> {
        let filter = PresenceFilter::open(&self.dir)?;
        let rebuilt = self.presence_bank()? ^ 1;
        filter.clear(rebuilt);
        let read = |name: &'static str| -> Result<(&'static str, Vec<FlowKey>)> {
            let path = self.dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("cannot open pinned map {}", path.display()))?;
            let expired = sweep_tier(&data, now, |key, _| filter.set(rebuilt, key))
                .with_context(|| format!("reading {name} for expired sessions"))?;
            Ok((name, expired))
        };
        let tiers = [read(map_names::SESSIONS)?, read(map_names::UNASSURED)?];
        self.array::<u32>(map_names::PRESENCE_BANK)?
            .set(0, rebuilt, 0)
            .context("switching the presence filter's bank")?;
        Ok(tiers)
    }

    /// Every stored session of both tiers, expired or not, each key once, read in
    /// batches: what `session save` writes, fast enough for a million sessions.
    pub fn snapshot_sessions(&self) -> Result<Vec<(FlowKey, Session)>> {
        let mut out = Vec::new();
        for name in [map_names::SESSIONS, map_names::UNASSURED] {
            let path = self.dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("cannot open pinned map {}", path.display()))?;
            sweep_tier(&data, 0, |key, session| out.push((*key, *session)))
                .with_context(|| format!("reading {name}"))?;
        }
        Ok(first_of_each_key(out))
    }

    /// Capacity of the unassured tier.
    pub fn unassured_capacity(&self) -> Result<u64> {
        let data =
            MapData::from_pin(self.dir.join(map_names::UNASSURED)).context("opening UNASSURED")?;
        let info = data.info().context("reading UNASSURED map info")?;
        Ok(info.max_entries() as u64)
    }

    /// Stores sessions (whose keys the caller found absent): assured ones in the
    /// protected tier, the others in the unassured one, as the kernel path keeps them; and
    /// sets their slots in both banks of the presence filter, as the kernel path does
    /// after storing.
    pub fn insert_sessions(&self, sessions: &[(FlowKey, Session)]) -> Result<()> {
        let filter = PresenceFilter::open(&self.dir)?;
        let (assured, unassured): (Vec<_>, Vec<_>) = sessions
            .iter()
            .copied()
            .partition(|(_, session)| session.flags & session_flags::PROTECTED != 0);
        for (name, tier) in [
            (map_names::SESSIONS, assured),
            (map_names::UNASSURED, unassured),
        ] {
            let path = self.dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("cannot open pinned map {}", path.display()))?;
            batch::update(&data, &tier)
                .with_context(|| format!("storing sessions in {name} (is the table full?)"))?;
            for (key, _) in &tier {
                filter.set(0, key);
                filter.set(1, key);
            }
        }
        Ok(())
    }

    /// The session stored under `key` in either tier, if any.
    pub fn session(&self, key: &FlowKey) -> Result<Option<Session>> {
        for name in [map_names::SESSIONS, map_names::UNASSURED] {
            match self.tier(name)?.get(key, 0) {
                Ok(session) => return Ok(Some(session)),
                Err(error) if is_not_found(&error) => {}
                Err(error) => return Err(error).with_context(|| format!("reading {name}")),
            }
        }
        Ok(None)
    }

    /// Both session tiers and the presence filter, opened once, for a caller that looks
    /// up, stores and removes sessions one by one at a high rate (state sync).
    pub fn session_tiers(&self) -> Result<SessionTiers> {
        Ok(SessionTiers {
            protected: self.tier(map_names::SESSIONS)?,
            unassured: self.tier(map_names::UNASSURED)?,
            filter: PresenceFilter::open(&self.dir)?,
        })
    }

    /// The active policy bank as the host engine reads rules, to judge sessions against
    /// the policy in force without its config file.
    pub fn active_rules(&self) -> Result<ModelRules> {
        let (bank, header) = self.active_policy()?;
        let rules = self.array::<Rule>(map_names::RULES)?;
        let entries = (0..header.rule_count.min(MAX_RULES))
            .map(|i| {
                rules
                    .get(&(bank * MAX_RULES + i), 0)
                    .context("reading a policy entry")
            })
            .collect::<Result<Vec<_>>>()?;
        let sets = self.active_host_sets(crate::bpf::clock::monotonic_ns())?;
        Ok(ModelRules {
            header,
            entries,
            sets,
        })
    }

    /// Global kernel counters summed over CPUs, in [`Counter::ALL`] order.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>> {
        let counters = self.per_cpu::<u64>(map_names::COUNTERS)?;
        Counter::ALL
            .iter()
            .map(|(counter, name)| {
                let values = counters
                    .get(&(*counter as u32), 0)
                    .with_context(|| format!("reading counter {name}"))?;
                Ok((*name, values.iter().sum()))
            })
            .collect()
    }

    /// Daemon counters in [`DaemonCounter::ALL`] order.
    pub fn daemon_counters(&self) -> Result<Vec<(&'static str, u64)>> {
        let counters = self.array::<u64>(map_names::DAEMON_COUNTERS)?;
        DaemonCounter::ALL
            .iter()
            .map(|(counter, name)| {
                let value = counters
                    .get(&(*counter as u32), 0)
                    .with_context(|| format!("reading counter {name}"))?;
                Ok((*name, value))
            })
            .collect()
    }

    /// One daemon counter.
    pub fn daemon_counter(&self, counter: DaemonCounter) -> Result<u64> {
        self.array::<u64>(map_names::DAEMON_COUNTERS)?
            .get(&(counter as u32), 0)
            .context("reading a daemon counter")
    }

    /// Adds `by` to a daemon counter.
    pub fn bump(&self, counter: DaemonCounter, by: u64) -> Result<()> {
        let mut counters = self.array::<u64>(map_names::DAEMON_COUNTERS)?;
        let index = counter as u32;
        let value = counters
            .get(&index, 0)
            .context("reading a daemon counter")?;
        counters
            .set(index, value.wrapping_add(by), 0)
            .context("writing a daemon counter")
    }

    /// Sets a daemon counter that is a gauge (e.g. the latest reaper sweep's duration).
    pub fn set_daemon_counter(&self, counter: DaemonCounter, value: u64) -> Result<()> {
        self.array::<u64>(map_names::DAEMON_COUNTERS)?
            .set(counter as u32, value, 0)
            .context("writing a daemon counter")
    }

    /// Rule hits summed over CPUs, by slot.
    pub fn rule_hits(&self) -> Result<Vec<u64>> {
        let hits = self.per_cpu::<u64>(map_names::RULE_HITS)?;
        (0..RULE_HIT_SLOTS)
            .map(|slot| {
                let values = hits.get(&slot, 0).context("reading rule hits")?;
                Ok(values.iter().sum())
            })
            .collect()
    }

    /// The active bank and its header.
    pub fn active_policy(&self) -> Result<(u32, PolicyHeader)> {
        let bank = self.array::<u32>(map_names::ACTIVE_BANK)?.get(&0, 0)? & 1;
        let header = self
            .array::<PolicyHeader>(map_names::POLICY)?
            .get(&bank, 0)?;
        Ok((bank, header))
    }

    /// Names of the active policy's rules, indexed by rule id.
    pub fn rule_names(&self) -> Result<Vec<String>> {
        let (bank, _) = self.active_policy()?;
        let names = self.array::<RuleName>(map_names::RULE_NAMES)?;
        let mut out = Vec::new();
        for id in 0..MAX_RULES {
            let name = decode_name(&names.get(&(bank * MAX_RULES + id), 0)?);
            if name.is_empty() {
                break;
            }
            out.push(name);
        }
        Ok(out)
    }

    /// Writes the timeouts and switches every packet reads. The clock stays as the
    /// daemon calibrated it at start ([`Self::write_clock`]): it is the host's, not the
    /// config's.
    pub fn write_settings(&self, settings: &Settings) -> Result<()> {
        let clock = self.settings()?.clock;
        self.store_settings(Settings { clock, ..*settings })
    }

    /// The settings every packet reads, with the clock the daemon calibrated.
    pub fn settings(&self) -> Result<Settings> {
        self.array::<Settings>(map_names::SETTINGS)?
            .get(&0, 0)
            .context("reading settings")
    }

    /// Writes the programs' clock calibration (`clock::calibrate`).
    pub fn write_clock(&self, clock: TickClock) -> Result<()> {
        let settings = self.settings()?;
        self.store_settings(Settings { clock, ..settings })
    }

    fn store_settings(&self, settings: Settings) -> Result<()> {
        self.array::<Settings>(map_names::SETTINGS)?
            .set(0, settings, 0)
            .context("writing settings")
    }

    /// Writes `policy` into the inactive bank and then switches banks, so packets see
    /// either the whole old policy or the whole new one. Returns the new generation.
    pub fn apply_policy(&self, policy: &CompiledPolicy) -> Result<u32> {
        let _sets = SetsLock::acquire(self.dir())?;
        let (active, old) = self.active_policy()?;
        let next = active ^ 1;
        let mut rules = self.array::<Rule>(map_names::RULES)?;
        for (i, entry) in policy.entries.iter().enumerate() {
            rules
                .set(next * MAX_RULES + i as u32, entry, 0)
                .context("writing a policy entry")?;
        }
        self.write_classifier(next, &policy.bitmaps)?;
        self.load_sets(next, &policy.sets)?;
        self.write_limits(next, &policy.limits)?;
        let mut names = self.array::<RuleName>(map_names::RULE_NAMES)?;
        for id in 0..MAX_RULES {
            let name = policy.names.get(id as usize).copied().unwrap_or(RuleName {
                bytes: [0; session_common::wire::RULE_NAME_LEN],
            });
            names
                .set(next * MAX_RULES + id, name, 0)
                .context("writing a rule name")?;
        }
        self.zero_per_cpu(map_names::RULE_HITS, RULE_HIT_SLOTS)
            .context("resetting rule hits")?;
        let generation = old.generation.wrapping_add(1);
        let header = PolicyHeader {
            generation,
            ..policy.header
        };
        self.array::<PolicyHeader>(map_names::POLICY)?
            .set(next, header, 0)
            .context("writing the policy header")?;
        self.array::<u32>(map_names::ACTIVE_BANK)?
            .set(0, next, 0)
            .context("switching to the new policy")?;
        self.release_sets()?;
        Ok(generation)
    }

    /// Sets the first `slots` counters of the per-CPU array `name` to zero on every CPU:
    /// per-rule counters start afresh with each policy, whose rule ids mean other rules.
    pub(crate) fn zero_per_cpu(&self, name: &str, slots: u32) -> Result<()> {
        let mut counters = self.per_cpu::<u64>(name)?;
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, error)| error)
            .context("counting possible CPUs")?;
        for slot in 0..slots {
            let zeros =
                PerCpuValues::try_from(vec![0u64; cpus]).context("building zeroed counters")?;
            counters
                .set(slot, zeros, 0)
                .with_context(|| format!("zeroing {name}"))?;
        }
        Ok(())
    }

    /// Writes the classifier's bitmaps of the (inactive) `bank`, first removing the keyed
    /// entries an earlier policy left in it, so a smaller policy leaves no stale networks
    /// or interfaces behind.
    fn write_classifier(&self, bank: u32, tables: &RuleBitmaps) -> Result<()> {
        let mut bits = self.array::<RuleBits>(map_names::RULE_BITS)?;
        for (slot, value) in tables.used_slots() {
            bits.set(bank * bits_slot::BANK_SLOTS + slot, value, 0)
                .context("writing a classifier bitmap")?;
        }
        let mut intervals = self.array::<PortIntervals>(map_names::PORT_INTERVALS)?;
        for (dim, value) in tables.port_tables.iter().enumerate() {
            intervals
                .set(bank * 2 + dim as u32, value.as_ref(), 0)
                .context("writing port intervals")?;
        }
        let mut ifaces: HashMap<MapData, IfaceKey, RuleBits> =
            HashMap::try_from(self.map(map_names::IFACE_BITS)?).context("map IFACE_BITS")?;
        let mut stale: Vec<IfaceKey> = ifaces
            .keys()
            .collect::<Result<_, _>>()
            .context("listing interface bitmaps")?;
        stale.retain(|key| key.bank == bank);
        for key in stale {
            match ifaces.remove(&key) {
                Ok(()) => {}
                Err(error) if is_not_found(&error) => {}
                Err(error) => return Err(error).context("removing a stale interface bitmap"),
            }
        }
        for (ifindex, value) in &tables.ifaces {
            let key = IfaceKey {
                bank,
                ifindex: *ifindex,
            };
            ifaces
                .insert(key, value, 0)
                .context("writing an interface bitmap")?;
        }
        for (name, nets) in [
            (map_names::SRC_NETS, &tables.src),
            (map_names::DST_NETS, &tables.dst),
        ] {
            let mut trie: LpmTrie<MapData, AddrKey, RuleBits> = LpmTrie::try_from(self.map(name)?)
                .with_context(|| format!("map {name} is not an LPM trie"))?;
            let mut stale: Vec<LpmKey<AddrKey>> = trie
                .keys()
                .collect::<Result<_, _>>()
                .with_context(|| format!("listing {name}"))?;
            stale.retain(|key| key.data().bank == bank);
            for key in stale {
                match trie.remove(&key) {
                    Ok(()) => {}
                    Err(error) if is_not_found(&error) => {}
                    Err(error) => {
                        return Err(error)
                            .with_context(|| format!("removing a stale {name} entry"));
                    }
                }
            }
            for net in nets {
                let key = LpmKey::new(
                    ADDR_KEY_BANK_BITS + net.prefix,
                    AddrKey {
                        bank,
                        addr: net.addr,
                    },
                );
                trie.insert(&key, net.bits, 0)
                    .with_context(|| format!("writing a {name} entry"))?;
            }
        }
        Ok(())
    }

    /// Declares which interfaces run an ingress program (XDP or TC), whose packets the
    /// egress program then leaves alone. An interface no longer managed also leaves the
    /// fast path's ports.
    pub fn set_managed(&self, ifindex: u32, managed: bool) -> Result<()> {
        let mut map: HashMap<MapData, u32, u8> =
            HashMap::try_from(self.map(map_names::MANAGED_IFACES)?)
                .context("map MANAGED_IFACES")?;
        if managed {
            return map
                .insert(ifindex, 1, 0)
                .context("marking an interface managed");
        }
        match map.remove(&ifindex) {
            Ok(()) => {}
            Err(error) if is_not_found(&error) => {}
            Err(error) => return Err(error).context("unmarking an interface"),
        }
        match self.fast_path_ports()?.remove(ifindex) {
            Ok(()) => Ok(()),
            Err(error) if is_not_found(&error) => Ok(()),
            Err(error) => Err(error).context("removing an interface from the fast path"),
        }
    }

    /// Lets the fast path forward out of a managed interface, one that can transmit the
    /// frames XDP redirects to it (`crate::bpf::netdev`).
    pub fn add_fast_path_port(&self, ifindex: u32) -> Result<()> {
        self.fast_path_ports()?
            .insert(ifindex, ifindex, None, 0)
            .context("adding an interface to the fast path's ports")
    }

    fn fast_path_ports(&self) -> Result<DevMapHash<MapData>> {
        DevMapHash::try_from(self.map(map_names::FAST_PATH_PORTS)?).context("map FAST_PATH_PORTS")
    }
}

/// Both session tiers and the presence filter of one table, kept open
/// ([`PinnedMaps::session_tiers`]).
pub struct SessionTiers {
    protected: HashMap<MapData, FlowKey, Session>,
    unassured: HashMap<MapData, FlowKey, Session>,
    filter: PresenceFilter,
}

impl SessionTiers {
    /// The session stored under `key` in either tier, if any.
    pub fn get(&self, key: &FlowKey) -> Result<Option<Session>> {
        for tier in [&self.protected, &self.unassured] {
            match tier.get(key, 0) {
                Ok(session) => return Ok(Some(session)),
                Err(error) if is_not_found(&error) => {}
                Err(error) => return Err(error).context("reading a session"),
            }
        }
        Ok(None)
    }

    /// Stores each session under its key, replacing what either tier held: in the
    /// protected tier when it is, otherwise the unassured one, and removed from the
    /// other, so a key stays in one tier; sets its slots in the presence filter as the
    /// kernel path does (what sync installs from a peer).
    pub fn store(&mut self, sessions: &[(FlowKey, Session)]) -> Result<()> {
        for (key, session) in sessions {
            let (into, out_of) = if session.flags & session_flags::PROTECTED != 0 {
                (&mut self.protected, &mut self.unassured)
            } else {
                (&mut self.unassured, &mut self.protected)
            };
            into.insert(key, session, 0)
                .context("storing a synced session (is the table full?)")?;
            match out_of.remove(key) {
                Ok(()) => {}
                Err(error) if is_not_found(&error) => {}
                Err(error) => return Err(error).context("moving a synced session between tiers"),
            }
            self.filter.set(0, key);
            self.filter.set(1, key);
        }
        Ok(())
    }

    /// Removes the sessions under `keys` from both tiers; returns how many were there.
    pub fn remove(&mut self, keys: &[FlowKey]) -> Result<u64> {
        let mut removed = 0;
        for tier in [&mut self.protected, &mut self.unassured] {
            for key in keys {
                match tier.remove(key) {
                    Ok(()) => removed += 1,
                    Err(error) if is_not_found(&error) => {}
                    Err(error) => return Err(error).context("removing a session"),
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(expires_ns: u64) -> Session {
        Session {
            expires_ns,
            ..Session::default()
        }
    }

    #[test]
    fn a_key_the_map_walk_returned_twice_is_listed_once_with_its_first_value() {
        let key = |port: u16| FlowKey {
            port_lo: port,
            ..FlowKey::default()
        };
        let entries = vec![
            (key(1), session(10)),
            (key(2), session(20)),
            (key(1), session(30)),
            (key(3), session(40)),
            (key(2), session(50)),
        ];
        let kept: Vec<(u16, u64)> = first_of_each_key(entries)
            .iter()
            .map(|(k, s)| (k.port_lo, s.expires_ns))
            .collect();
        assert_eq!(kept, [(1, 10), (2, 20), (3, 40)]);
    }
}
