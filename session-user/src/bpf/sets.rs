//! Writing the named sets into the kernel (`session_common::sets`): loading a policy's
//! sets next to its bank, and the live changes of `session set` (add, delete, flush,
//! replace) without a reload.
//!
//! Every set lives in a *storage* of the shared `SET_NETS` trie, its single addresses in
//! the `SET_HOSTS` hash while it has room ([`SetMaps`]); `SET_INFO` says which storage
//! holds which set, `SET_REFS` which storages each policy bank reads. An apply
//! loads every set of the new policy into fresh storages before the bank flip and frees
//! the storages nothing reads afterwards; a replace fills a fresh storage and then points
//! both banks' references at it, so packets see the whole old or the whole new set.
//! Add and delete write the set's storage directly, one trie update per prefix; whole sets
//! are written, read and deleted with the batch commands.
//!
//! Every change bumps the active policy's generation, so the verdicts that sessions cached
//! are judged afresh against the changed set, as nftables judges each packet against its
//! sets: an existing session whose packets a set rule now drops is dropped from its next
//! packet on.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};
use aya::maps::{
    Array, HashMap, MapData, MapError,
    lpm_trie::{Key as LpmKey, LpmTrie},
};
use session_common::{
    sets::{
        MAX_SET_STORAGE, MAX_SETS_PER_DIM, SET_KEY_STORAGE_BITS, SET_NAME_LEN, SetInfo, SetKey,
        SetRefs, SetValue, set_state,
    },
    wire::{FAMILY_IPV4, FAMILY_IPV6, PolicyHeader, map_names},
};

use crate::{
    bpf::{
        batch,
        pinned::{PinnedMaps, is_not_found},
    },
    daemon::lock::SetsLock,
    policy::{compile::CompiledSets, config::Network, rule_bitmaps::HostSets, sets::HostSet},
};

/// How long a freed storage's prefixes stay after nothing references them, so a packet
/// that read the old reference just before the switch finds them (a BPF program run
/// lasts microseconds).
const GRACE: std::time::Duration = std::time::Duration::from_millis(10);

/// One set as `session set list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetSummary {
    /// The set's name.
    pub name: String,
    /// Its storage.
    pub storage: u32,
    /// Prefixes stored (expired ones count until the reaper deletes them).
    pub entries: u32,
    /// Live changes since the set was last loaded from the configuration.
    pub changes: u64,
}

/// One prefix of a set, as `session set show` prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetMember {
    /// The prefix.
    pub network: Network,
    /// CLOCK_MONOTONIC expiry in ns, 0 for never.
    pub expires_ns: u64,
}

fn encode_name(name: &str) -> [u8; SET_NAME_LEN] {
    let mut bytes = [0u8; SET_NAME_LEN];
    let len = name.len().min(SET_NAME_LEN - 1);
    bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
    bytes
}

fn decode_name(bytes: &[u8; SET_NAME_LEN]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(SET_NAME_LEN);
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn key(storage: u32, net: &Network) -> LpmKey<SetKey> {
    LpmKey::new(
        SET_KEY_STORAGE_BITS + u32::from(net.prefix),
        SetKey {
            storage,
            addr: net.addr,
        },
    )
}

fn network_of(key: &LpmKey<SetKey>) -> Network {
    let prefix = key.prefix_len().saturating_sub(SET_KEY_STORAGE_BITS) as u8;
    let addr = key.data().addr;
    let mapped = addr[..10].iter().all(|b| *b == 0) && addr[10] == 0xff && addr[11] == 0xff;
    Network {
        addr,
        prefix,
        family: if mapped && prefix >= 96 {
            FAMILY_IPV4
        } else {
            FAMILY_IPV6
        },
    }
}

/// Whether `key` is a single address (/32, /128), which `SET_HOSTS` holds while it has room.
fn is_host(key: &LpmKey<SetKey>) -> bool {
    key.prefix_len() == SET_KEY_STORAGE_BITS + 128
}

/// Whether a map update failed because the map is full (a hash without preallocation).
fn is_full(error: &MapError) -> bool {
    matches!(error, MapError::SyscallError(call) if call.io_error.raw_os_error() == Some(libc::E2BIG))
}

/// A stored prefix, with the map it is in.
#[derive(Clone, Copy)]
struct Stored {
    key: LpmKey<SetKey>,
    value: SetValue,
    /// In `SET_HOSTS` rather than `SET_NETS`.
    hashed: bool,
}

/// The two maps of the sets' prefixes, for one prefix at a time: each prefix is in
/// exactly one of them, a host in the hash unless the hash was full when it came.
struct SetMaps {
    trie: LpmTrie<MapData, SetKey, SetValue>,
    hosts: HashMap<MapData, SetKey, SetValue>,
}

impl SetMaps {
    /// Where `key` is stored, if it is.
    fn find(&self, key: &LpmKey<SetKey>) -> Result<Option<bool>> {
        if is_host(key) {
            match self.hosts.get(&key.data(), 0) {
                Ok(_) => return Ok(Some(true)),
                Err(error) if is_not_found(&error) => {}
                Err(error) => return Err(error).context("reading SET_HOSTS"),
            }
        }
        match self.trie.get(key, 0) {
            Ok(_) => Ok(Some(false)),
            Err(error) if is_not_found(&error) => Ok(None),
            Err(error) => Err(error).context("reading SET_NETS"),
        }
    }

    /// Stores `key` with `value` where it is, or where a new prefix goes; whether it is new.
    fn insert(&mut self, key: &LpmKey<SetKey>, value: SetValue) -> Result<bool> {
        let found = self.find(key)?;
        if found == Some(true) || (found.is_none() && is_host(key)) {
            match self.hosts.insert(key.data(), value, 0) {
                Ok(()) => return Ok(found.is_none()),
                Err(error) if found.is_none() && is_full(&error) => {}
                Err(error) => return Err(error).context("writing SET_HOSTS"),
            }
        }
        self.trie
            .insert(key, value, 0)
            .context("writing SET_NETS")?;
        Ok(found.is_none())
    }

    /// Deletes `key` from the map it is in (the hash when `hashed`); whether it was still
    /// there.
    fn remove(&mut self, key: &LpmKey<SetKey>, hashed: bool) -> Result<bool> {
        let removed = if hashed {
            self.hosts.remove(&key.data())
        } else {
            self.trie.remove(key)
        };
        match removed {
            Ok(()) => Ok(true),
            Err(error) if is_not_found(&error) => Ok(false),
            Err(error) => Err(error).context("deleting a set prefix"),
        }
    }

    /// Deletes `key` wherever it is stored, asking the hash first for a single address;
    /// whether it was there.
    fn remove_any(&mut self, key: &LpmKey<SetKey>) -> Result<bool> {
        if is_host(key) && self.remove(key, true)? {
            return Ok(true);
        }
        self.remove(key, false)
    }
}

impl PinnedMaps {
    fn set_maps(&self) -> Result<SetMaps> {
        Ok(SetMaps {
            trie: LpmTrie::try_from(self.map(map_names::SET_NETS)?)
                .context("map SET_NETS is not an LPM trie")?,
            hosts: HashMap::try_from(self.map(map_names::SET_HOSTS)?)
                .context("map SET_HOSTS is not a hash map")?,
        })
    }

    /// A set map for the batch commands (`bpf::batch`), which whole sets use.
    fn set_map_data(&self, name: &str) -> Result<MapData> {
        MapData::from_pin(self.dir().join(name)).with_context(|| format!("opening {name}"))
    }

    /// Every prefix of every storage, with its value and its map.
    fn all_set_prefixes(&self) -> Result<Vec<Stored>> {
        let mut out = Vec::new();
        batch::for_each(
            &self.set_map_data(map_names::SET_NETS)?,
            |key: &LpmKey<SetKey>, value| {
                out.push(Stored {
                    key: *key,
                    value: *value,
                    hashed: false,
                })
            },
        )
        .context("reading SET_NETS")?;
        batch::for_each(&self.set_map_data(map_names::SET_HOSTS)?, |key, value| {
            out.push(Stored {
                key: LpmKey::new(SET_KEY_STORAGE_BITS + 128, *key),
                value: *value,
                hashed: true,
            })
        })
        .context("reading SET_HOSTS")?;
        Ok(out)
    }

    /// Deletes `prefixes` from their maps; how many were there.
    fn delete_set_prefixes(&self, prefixes: &[Stored]) -> Result<u32> {
        let (hashed, trie): (Vec<&Stored>, Vec<&Stored>) =
            prefixes.iter().partition(|stored| stored.hashed);
        let hosts: Vec<SetKey> = hashed.iter().map(|stored| stored.key.data()).collect();
        let nets: Vec<LpmKey<SetKey>> = trie.iter().map(|stored| stored.key).collect();
        let deleted = batch::delete(&self.set_map_data(map_names::SET_HOSTS)?, &hosts)
            .context("deleting set addresses")?
            + batch::delete(&self.set_map_data(map_names::SET_NETS)?, &nets)
                .context("deleting set prefixes")?;
        Ok(deleted as u32)
    }

    /// Stores new `prefixes` (none of them stored yet) with the batch commands: single
    /// addresses in the hash as far as it has room, the rest in the trie.
    pub(crate) fn store_set_prefixes(&self, prefixes: &[(LpmKey<SetKey>, SetValue)]) -> Result<()> {
        let (hosts, mut nets): (Vec<_>, Vec<_>) =
            prefixes.iter().copied().partition(|(key, _)| is_host(key));
        let host_entries: Vec<(SetKey, SetValue)> = hosts
            .iter()
            .map(|(key, value)| (key.data(), *value))
            .collect();
        let hashed =
            batch::update_until_full(&self.set_map_data(map_names::SET_HOSTS)?, &host_entries)
                .context("storing set addresses in SET_HOSTS")?;
        nets.extend_from_slice(&hosts[hashed..]);
        batch::update(&self.set_map_data(map_names::SET_NETS)?, &nets).map_err(|error| {
            anyhow::anyhow!(
                "{error} (the set trie holds at most {} prefixes over all sets, and a replace needs room for the old and the new set at once)",
                session_common::sets::SET_TRIE_ENTRIES
            )
        })
    }

    fn set_info_map(&self) -> Result<Array<MapData, SetInfo>> {
        self.array::<SetInfo>(map_names::SET_INFO)
    }

    /// Every storage's [`SetInfo`], by storage number.
    fn set_infos(&self) -> Result<Vec<SetInfo>> {
        let infos = self.set_info_map()?;
        (0..MAX_SET_STORAGE)
            .map(|storage| infos.get(&storage, 0).context("reading SET_INFO"))
            .collect()
    }

    fn write_info(&self, storage: u32, info: SetInfo) -> Result<()> {
        self.set_info_map()?
            .set(storage, info, 0)
            .context("writing SET_INFO")
    }

    /// A free storage, marked as loading `name`; retired ones are freed first when none
    /// is free. The caller holds the [`SetsLock`].
    fn claim_storage(&self, name: &str) -> Result<u32> {
        let mut infos = self.set_infos()?;
        if !infos.iter().any(|info| info.state == set_state::FREE) {
            self.free_retired()?;
            infos = self.set_infos()?;
        }
        let Some(storage) = infos.iter().position(|info| info.state == set_state::FREE) else {
            bail!(
                "all {MAX_SET_STORAGE} set storages are in use (sets being replaced or loaded at once); wait for the other changes to finish and try again"
            );
        };
        let storage = storage as u32;
        self.write_info(
            storage,
            SetInfo {
                name: encode_name(name),
                state: set_state::LOADING,
                ..SetInfo::default()
            },
        )?;
        Ok(storage)
    }

    /// Writes `nets` into the empty `storage`; the number of new prefixes.
    fn fill_storage(&self, storage: u32, nets: &[Network], expires_ns: u64) -> Result<u32> {
        let value = SetValue { expires_ns };
        let entries: Vec<(LpmKey<SetKey>, SetValue)> =
            nets.iter().map(|net| (key(storage, net), value)).collect();
        self.store_set_prefixes(&entries)
            .with_context(|| format!("cannot store the set's {} prefixes", nets.len()))?;
        Ok(nets.len() as u32)
    }

    /// Deletes every prefix of `storage` and frees it; how many prefixes it deleted.
    fn clear_storage(&self, storage: u32) -> Result<u32> {
        let prefixes: Vec<Stored> = self
            .all_set_prefixes()?
            .into_iter()
            .filter(|stored| stored.key.data().storage == storage)
            .collect();
        let deleted = self.delete_set_prefixes(&prefixes)?;
        self.write_info(storage, SetInfo::default())?;
        Ok(deleted)
    }

    /// Loads the sets of a policy about to be applied into fresh storages and writes
    /// `bank`'s references to them. Called by `apply_policy` before the bank flip.
    pub(crate) fn load_sets(&self, bank: u32, sets: &CompiledSets) -> Result<()> {
        let mut storages: BTreeMap<&str, u32> = BTreeMap::new();
        for name in sets.src.iter().chain(&sets.dst) {
            if storages.contains_key(name.as_str()) {
                continue;
            }
            let storage = self.claim_storage(name)?;
            let nets = sets.contents.get(name).map_or(&[][..], |nets| &nets[..]);
            let entries = self
                .fill_storage(storage, nets, 0)
                .with_context(|| format!("loading set `{name}`"))?;
            self.write_info(
                storage,
                SetInfo {
                    name: encode_name(name),
                    state: set_state::LOADING,
                    entries,
                    ..SetInfo::default()
                },
            )?;
            storages.insert(name, storage);
        }
        let mut refs = SetRefs::default();
        for (dim, names) in [(0, &sets.src), (1, &sets.dst)] {
            if names.len() > MAX_SETS_PER_DIM as usize {
                bail!("a policy can use at most {MAX_SETS_PER_DIM} sets per dimension");
            }
            for (i, name) in names.iter().enumerate() {
                let storage = storages[name.as_str()];
                if dim == 0 {
                    refs.src[i] = storage;
                } else {
                    refs.dst[i] = storage;
                }
            }
        }
        refs.src_count = sets.src.len() as u32;
        refs.dst_count = sets.dst.len() as u32;
        self.array::<SetRefs>(map_names::SET_REFS)?
            .set(bank, refs, 0)
            .context("writing the policy's set references")
    }

    /// After a bank flip: the storages the active bank reads become their sets' current
    /// contents, and every other storage is freed (after [`GRACE`]).
    pub(crate) fn release_sets(&self) -> Result<()> {
        let (active, _) = self.active_policy()?;
        let refs = self
            .array::<SetRefs>(map_names::SET_REFS)?
            .get(&active, 0)
            .context("reading SET_REFS")?;
        let used: Vec<u32> = refs.src[..refs.src_count as usize]
            .iter()
            .chain(&refs.dst[..refs.dst_count as usize])
            .copied()
            .collect();
        let infos = self.set_infos()?;
        let mut stale = Vec::new();
        for (storage, info) in infos.iter().enumerate() {
            let storage = storage as u32;
            if used.contains(&storage) {
                if info.state != set_state::ACTIVE {
                    self.write_info(
                        storage,
                        SetInfo {
                            state: set_state::ACTIVE,
                            ..*info
                        },
                    )?;
                }
            } else if info.state != set_state::FREE {
                stale.push(storage);
            }
        }
        if !stale.is_empty() {
            std::thread::sleep(GRACE);
        }
        for storage in stale {
            self.clear_storage(storage)?;
        }
        Ok(())
    }

    /// The storage holding set `name` now, with its info.
    fn active_storage(&self, name: &str) -> Result<(u32, SetInfo)> {
        let infos = self.set_infos()?;
        infos
            .iter()
            .enumerate()
            .find(|(_, info)| info.state == set_state::ACTIVE && decode_name(&info.name) == name)
            .map(|(storage, info)| (storage as u32, *info))
            .ok_or_else(|| {
                let known: Vec<String> = infos
                    .iter()
                    .filter(|info| info.state == set_state::ACTIVE)
                    .map(|info| decode_name(&info.name))
                    .collect();
                anyhow::anyhow!(
                    "no set `{name}` in the running policy (sets in use: {}); define it under [sets] and use it in a rule, then `session reload`",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                )
            })
    }

    /// The sets the running policy uses.
    pub fn sets(&self) -> Result<Vec<SetSummary>> {
        Ok(self
            .set_infos()?
            .iter()
            .enumerate()
            .filter(|(_, info)| info.state == set_state::ACTIVE)
            .map(|(storage, info)| SetSummary {
                name: decode_name(&info.name),
                storage: storage as u32,
                entries: info.entries,
                changes: info.changes,
            })
            .collect())
    }

    /// The sets the active policy bank reads, as the host engine holds them, so that
    /// sessions imported into a running firewall (`session restore`, takeover) are judged
    /// by the sets in force, live changes included; prefixes expired at `now_ns` are left
    /// out, as the kernel path ignores them.
    pub(crate) fn active_host_sets(&self, now_ns: u64) -> Result<HostSets> {
        let (active, _) = self.active_policy()?;
        let refs = self
            .array::<SetRefs>(map_names::SET_REFS)?
            .get(&active, 0)
            .context("reading SET_REFS")?;
        let used = refs.src[..(refs.src_count as usize).min(refs.src.len())]
            .iter()
            .chain(&refs.dst[..(refs.dst_count as usize).min(refs.dst.len())]);
        let Some(highest) = used.clone().max() else {
            return Ok(HostSets::default());
        };
        let mut storages = vec![HostSet::default(); *highest as usize + 1];
        for Stored { key, value, .. } in self.all_set_prefixes()? {
            let storage = key.data().storage as usize;
            if value.live(now_ns) && storage < storages.len() {
                storages[storage].insert(&network_of(&key));
            }
        }
        Ok(HostSets { refs, storages })
    }

    /// The prefixes of set `name`: the trie's in its order, then the hashed addresses.
    pub fn set_members(&self, name: &str) -> Result<Vec<SetMember>> {
        let (storage, _) = self.active_storage(name)?;
        let mut out = Vec::new();
        for Stored { key, value, .. } in self.all_set_prefixes()? {
            if key.data().storage == storage {
                out.push(SetMember {
                    network: network_of(&key),
                    expires_ns: value.expires_ns,
                });
            }
        }
        Ok(out)
    }

    /// Adds `nets` to set `name`, each until `expires_ns` (CLOCK_MONOTONIC, 0 = never); a
    /// prefix already there takes the new expiry. The number of prefixes that were new.
    pub fn set_add(&self, name: &str, nets: &[Network], expires_ns: u64) -> Result<u32> {
        let _sets = SetsLock::acquire(self.dir())?;
        let (storage, info) = self.active_storage(name)?;
        let mut maps = self.set_maps()?;
        let value = SetValue { expires_ns };
        let mut added = 0;
        for net in nets {
            let new = maps.insert(&key(storage, net), value).with_context(|| {
                format!(
                    "cannot add {} to set `{name}` (the set trie holds at most {} prefixes over all sets)",
                    show_network(net),
                    session_common::sets::SET_TRIE_ENTRIES
                )
            })?;
            added += u32::from(new);
        }
        let info = SetInfo {
            expiring: info.expiring.saturating_add(if expires_ns == 0 {
                0
            } else {
                nets.len() as u32
            }),
            ..info
        };
        self.changed(storage, info, info.entries.saturating_add(added))?;
        Ok(added)
    }

    /// Deletes `nets` from set `name`; the number that were there.
    pub fn set_delete(&self, name: &str, nets: &[Network]) -> Result<u32> {
        let _sets = SetsLock::acquire(self.dir())?;
        let (storage, info) = self.active_storage(name)?;
        let mut maps = self.set_maps()?;
        let mut removed = 0;
        for net in nets {
            removed += u32::from(maps.remove_any(&key(storage, net))?);
        }
        self.changed(storage, info, info.entries.saturating_sub(removed))?;
        Ok(removed)
    }

    /// Replaces the contents of set `name` with `nets` atomically: they are loaded into a
    /// fresh storage, then every policy bank's reference moves to it at once; the old
    /// storage is retired, for [`Self::free_retired_sets`].
    pub fn set_replace(&self, name: &str, nets: &[Network]) -> Result<()> {
        let _sets = SetsLock::acquire(self.dir())?;
        let (old, info) = self.active_storage(name)?;
        let fresh = self.claim_storage(name)?;
        let loaded = self.fill_storage(fresh, nets, 0).and_then(|entries| {
            let mut refs_map = self.array::<SetRefs>(map_names::SET_REFS)?;
            for bank in 0..2 {
                let mut refs = refs_map.get(&bank, 0).context("reading SET_REFS")?;
                let mut moved = false;
                for storage in refs.src.iter_mut().chain(refs.dst.iter_mut()) {
                    if *storage == old {
                        *storage = fresh;
                        moved = true;
                    }
                }
                if moved {
                    refs_map
                        .set(bank, refs, 0)
                        .context("switching the set's references")?;
                }
            }
            Ok(entries)
        });
        let entries = match loaded {
            Ok(entries) => entries,
            Err(error) => {
                self.clear_storage(fresh)?;
                return Err(error);
            }
        };
        let info = SetInfo {
            expiring: 0,
            ..info
        };
        self.write_info(
            old,
            SetInfo {
                state: set_state::RETIRED,
                ..info
            },
        )?;
        self.changed(fresh, info, entries)
    }

    /// Frees the storages that replaces retired; how many prefixes it deleted. The
    /// daemon's reaper calls it, so that `session set replace` returns once the new
    /// contents are in force rather than after deleting the old ones.
    pub fn free_retired_sets(&self) -> Result<u32> {
        if !self
            .set_infos()?
            .iter()
            .any(|info| info.state == set_state::RETIRED)
        {
            return Ok(0);
        }
        let _sets = SetsLock::acquire(self.dir())?;
        self.free_retired()
    }

    /// [`Self::free_retired_sets`] for a caller that holds the [`SetsLock`].
    fn free_retired(&self) -> Result<u32> {
        let retired: Vec<u32> = (0..)
            .zip(self.set_infos()?)
            .filter(|(_, info)| info.state == set_state::RETIRED)
            .map(|(storage, _)| storage)
            .collect();
        if retired.is_empty() {
            return Ok(0);
        }
        // A packet that read a retired storage's reference just before the switch may
        // still be looking it up.
        std::thread::sleep(GRACE);
        let mut freed = 0;
        for storage in retired {
            freed += self.clear_storage(storage)?;
        }
        Ok(freed)
    }

    /// Records a change of the set in `storage` (now holding `entries` prefixes) and bumps
    /// the active policy's generation so sessions' cached verdicts are decided afresh.
    fn changed(&self, storage: u32, info: SetInfo, entries: u32) -> Result<()> {
        self.write_info(
            storage,
            SetInfo {
                state: set_state::ACTIVE,
                entries,
                changes: info.changes.wrapping_add(1),
                ..info
            },
        )?;
        let (active, header) = self.active_policy()?;
        self.array::<PolicyHeader>(map_names::POLICY)?
            .set(
                active,
                PolicyHeader {
                    generation: header.generation.wrapping_add(1),
                    ..header
                },
                0,
            )
            .context("bumping the policy generation")?;
        self.bump(session_common::wire::DaemonCounter::SetChanges, 1)
    }

    /// Deletes the prefixes whose expiry has passed at `now_ns` (CLOCK_MONOTONIC); how
    /// many. The kernel already ignores them; this frees their memory.
    pub fn expire_set_members(&self, now_ns: u64) -> Result<u64> {
        if self.set_infos()?.iter().all(|info| info.expiring == 0) {
            return Ok(0);
        }
        let _sets = SetsLock::acquire(self.dir())?;
        let mut infos = self.set_infos()?;
        let mut still_expiring = vec![0u32; infos.len()];
        let mut expired: Vec<Stored> = Vec::new();
        for stored in self.all_set_prefixes()? {
            if !stored.value.live(now_ns) {
                expired.push(stored);
            } else if stored.value.expires_ns != 0
                && let Some(count) = still_expiring.get_mut(stored.key.data().storage as usize)
            {
                *count += 1;
            }
        }
        // Per key, to know each one's storage: expiring prefixes are bans, few at a time.
        let mut maps = self.set_maps()?;
        let mut removed = 0;
        for Stored { key, hashed, .. } in expired {
            if maps.remove(&key, hashed)? {
                removed += 1;
                if let Some(info) = infos.get_mut(key.data().storage as usize) {
                    info.entries = info.entries.saturating_sub(1);
                }
            }
        }
        for (info, count) in infos.iter_mut().zip(still_expiring) {
            info.expiring = count;
        }
        for (storage, info) in infos.into_iter().enumerate() {
            if info.state != set_state::FREE {
                self.write_info(storage as u32, info)?;
            }
        }
        Ok(removed)
    }
}

/// `net` as the operator wrote it: `a.b.c.d/len` or `x::/len`.
pub fn show_network(net: &Network) -> String {
    if net.family == FAMILY_IPV4 {
        let a = &net.addr[12..];
        format!(
            "{}.{}.{}.{}/{}",
            a[0],
            a[1],
            a[2],
            a[3],
            net.prefix.saturating_sub(96)
        )
    } else {
        format!("{}/{}", std::net::Ipv6Addr::from(net.addr), net.prefix)
    }
}
