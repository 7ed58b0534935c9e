//! The rules' limits on new sessions (`session_common::limits`) in BPF maps. Admission
//! and release run as global BPF functions, so the verifier checks them once rather than
//! on every path of the pipeline that reaches them.

use aya_ebpf::{
    helpers::generated::bpf_ktime_get_coarse_ns,
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, lpm_trie::Key as LpmKey},
};
use session_common::{
    engine::Limits,
    limits::{
        Admission, DEFAULT_MAX_TRACKED_SOURCES, LIMIT_HIT_SLOTS, LimitHit, LimitStore,
        RULE_LIMIT_SLOTS, RuleLimit, SourceKey, SourceState, admit_new, overload_source,
        release_session,
    },
    packet::PacketMeta,
    sets::{MAX_SET_STORAGE, MAX_SETS_PER_DIM, SET_KEY_STORAGE_BITS, SetKey, SetValue},
    wire::{FlowKey, MAX_RULES},
};

use crate::tables::{SET_HOSTS, SET_INFO, SET_NETS, SET_REFS};

/// Each rule's limits, at `bank * MAX_RULES + rule_id`; all zero for a rule without.
#[map]
static RULE_LIMITS: Array<RuleLimit> = Array::pinned(RULE_LIMIT_SLOTS, 0);
/// What each limited rule knows of each source. An LRU, so a flood of sources cannot grow
/// it; the loader sizes it from `[limits] max_tracked_sources`.
#[map]
static SRC_LIMITS: LruHashMap<SourceKey, SourceState> =
    LruHashMap::pinned(DEFAULT_MAX_TRACKED_SOURCES, 0);
/// Sessions each limited rule holds, by rule id.
#[map]
static RULE_CONNS: Array<u32> = Array::pinned(MAX_RULES, 0);
/// Per-rule limit counters ([`LimitHit`]).
#[map]
static LIMIT_HITS: PerCpuArray<u64> = PerCpuArray::pinned(LIMIT_HIT_SLOTS, 0);

/// [`Admission`] as a global function's scalar answer.
const UNLIMITED: i32 = 0;
const COUNTED: i32 = 1;
const REFUSED: i32 = 2;
const REFUSED_TO_OVERLOAD: i32 = 3;

/// The limits in their maps.
pub struct BpfLimits;

impl Limits for BpfLimits {
    #[inline(always)]
    fn admit(&mut self, bank: u32, rule_id: u16, meta: &PacketMeta, now: u64) -> Admission {
        match session_limit_admit(meta, bank, rule_id as u32, now) {
            COUNTED => Admission::Counted,
            REFUSED => Admission::Refused { overload: false },
            REFUSED_TO_OVERLOAD => Admission::Refused { overload: true },
            _ => Admission::Unlimited,
        }
    }

    #[inline(always)]
    fn overload(&mut self, bank: u32, rule_id: u16, meta: &PacketMeta, _now: u64) -> bool {
        session_limit_overload(meta, bank, rule_id as u32) != 0
    }

    #[inline(always)]
    fn release(&mut self, bank: u32, rule_id: u16, key: &FlowKey, orig_is_lo: bool) {
        session_limit_release(key, bank, rule_id as u32, u32::from(orig_is_lo));
    }
}

/// [`admit_new`] for the packet `meta` under rule `rule_id` of `bank`, as a global
/// function (called from the program, not from another function, so that its stack
/// adds to the program's alone); answers one of the codes above.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn session_limit_admit(
    meta: *const PacketMeta,
    bank: u32,
    rule_id: u32,
    now: u64,
) -> i32 {
    // SAFETY: the caller passes its packet; the verifier only knows it may be null.
    let Some(meta) = (unsafe { meta.as_ref() }) else {
        return UNLIMITED;
    };
    match admit_new(
        &mut BpfLimitStore,
        bank,
        rule_id as u16,
        meta.family,
        &meta.src,
        now,
    ) {
        Admission::Unlimited => UNLIMITED,
        Admission::Counted => COUNTED,
        Admission::Refused { overload: true } => REFUSED_TO_OVERLOAD,
        Admission::Refused { overload: false } => REFUSED,
    }
}

/// [`overload_source`] for the packet `meta`, as a global function: 1 when the source
/// is in the overload set, 0 when it has no room. Without the programs' clock: the set's
/// expiry is on the clock the set lookup reads (see [`BpfLimitStore::overload`]).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn session_limit_overload(meta: *const PacketMeta, bank: u32, rule_id: u32) -> i32 {
    // SAFETY: the caller passes its packet; the verifier only knows it may be null.
    let Some(meta) = (unsafe { meta.as_ref() }) else {
        return 0;
    };
    i32::from(overload_source(
        &mut BpfLimitStore,
        bank,
        rule_id as u16,
        meta.family,
        &meta.src,
        0,
    ))
}

/// [`release_session`] for the session under `key`, as a global function; 0 always.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn session_limit_release(
    key: *const FlowKey,
    bank: u32,
    rule_id: u32,
    orig_is_lo: u32,
) -> i32 {
    // SAFETY: the caller passes the session's key; the verifier only knows it may be null.
    if let Some(key) = unsafe { key.as_ref() } {
        release_session(
            &mut BpfLimitStore,
            bank,
            rule_id as u16,
            key,
            orig_is_lo != 0,
        );
    }
    0
}

/// The maps behind [`LimitStore`].
struct BpfLimitStore;

impl LimitStore for BpfLimitStore {
    #[inline(always)]
    fn rule_limit(&self, bank: u32, rule_id: u16) -> Option<RuleLimit> {
        let slot = (bank & 1) * MAX_RULES + (rule_id as u32 % MAX_RULES);
        RULE_LIMITS.get(slot).copied().filter(RuleLimit::is_set)
    }

    #[inline(always)]
    fn source(&mut self, key: &SourceKey) -> Option<&mut SourceState> {
        if let Some(state) = SRC_LIMITS.get_ptr_mut(key) {
            // SAFETY: the entry lives while the program holds the RCU read lock; another
            // CPU may update it at once, which costs a count, never memory safety.
            return Some(unsafe { &mut *state });
        }
        // BPF_NOEXIST: another CPU's entry for the source, stored meanwhile, stays.
        let _ = SRC_LIMITS.insert(key, SourceState::default(), 1);
        // SAFETY: as above.
        SRC_LIMITS
            .get_ptr_mut(key)
            .map(|state| unsafe { &mut *state })
    }

    #[inline(always)]
    fn total(&mut self, rule_id: u16) -> Option<&mut u32> {
        // SAFETY: an array entry lives as long as the program; races cost a count.
        RULE_CONNS
            .get_ptr_mut(rule_id as u32 % MAX_RULES)
            .map(|total| unsafe { &mut *total })
    }

    #[inline(always)]
    fn overload(&mut self, bank: u32, limit: &RuleLimit, key: &SourceKey, _now: u64) -> bool {
        let Some(refs) = SET_REFS.get(bank & 1) else {
            return false;
        };
        let index = limit.overload_set.wrapping_sub(1) as u32;
        if index >= refs.src_count || index >= MAX_SETS_PER_DIM {
            return false;
        }
        // Masked after a volatile read, so that the compiler, which knows the bound from
        // the check above, keeps the mask the verifier needs to bound the index.
        // SAFETY: reading a local.
        let index = unsafe { core::ptr::read_volatile(&index) } & (MAX_SETS_PER_DIM - 1);
        let storage = refs.src[index as usize] & (MAX_SET_STORAGE - 1);
        let set_key = SetKey {
            storage,
            addr: key.addr,
        };
        // The clock set expiry is read by (`tables::live_set_value`).
        // SAFETY: a helper without arguments.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        let value = SetValue {
            expires_ns: if limit.overload_timeout_ns == 0 {
                0
            } else {
                now.saturating_add(limit.overload_timeout_ns)
            },
        };
        let prefix = key.mapped_prefix() as u32;
        // A host goes into the host hash, spilling into the trie when the hash is full,
        // as `session set add` stores it; a network into the trie.
        let stored = if prefix == 128 {
            store_host(&set_key, &value, now).or_else(|| store_net(&set_key, prefix, &value, now))
        } else {
            store_net(&set_key, prefix, &value, now)
        };
        match stored {
            Some(stored) => {
                count_entry(storage, stored.added, value.expires_ns != 0);
                true
            }
            None => false,
        }
    }

    #[inline(always)]
    fn hit(&mut self, kind: LimitHit, rule_id: u16) {
        if let Some(slot) = LIMIT_HITS.get_ptr_mut(kind.slot(rule_id)) {
            // SAFETY: this CPU's slot of a per-CPU map.
            unsafe { *slot += 1 };
        }
    }
}

/// What storing an overloaded source did.
struct Stored {
    /// A new entry was added (not an expired one renewed).
    added: bool,
}

/// Stores `key` in the host hash until `value`; `None` when the hash has no room.
#[inline(always)]
fn store_host(key: &SetKey, value: &SetValue, now: u64) -> Option<Stored> {
    // SAFETY: the value is copied out at once.
    if let Some(old) = unsafe { SET_HOSTS.get(key) }.copied() {
        // Renew an expired ban the reaper has not freed yet; a live one stands.
        return renew(old, now, || SET_HOSTS.insert(key, value, 2).is_ok());
    }
    // BPF_NOEXIST: a ban another CPU stored meanwhile stands.
    SET_HOSTS
        .insert(key, value, 1)
        .is_ok()
        .then_some(Stored { added: true })
}

/// Stores `key`/`prefix` in the set trie until `value`; `None` when it has no room.
#[inline(always)]
fn store_net(key: &SetKey, prefix: u32, value: &SetValue, now: u64) -> Option<Stored> {
    let lpm = LpmKey::new(SET_KEY_STORAGE_BITS + prefix, *key);
    // The longest match of at most this length: the prefix itself or a shorter one that
    // covers it, whose live entry bans the source already.
    if let Some(old) = SET_NETS.get(&lpm).copied() {
        return renew(old, now, || SET_NETS.insert(&lpm, value, 0).is_ok());
    }
    SET_NETS
        .insert(&lpm, value, 0)
        .is_ok()
        .then_some(Stored { added: true })
}

/// An existing entry `old`: a live one stands (the source is banned already); an expired
/// one is renewed by `write`.
#[inline(always)]
fn renew(old: SetValue, now: u64, write: impl FnOnce() -> bool) -> Option<Stored> {
    if old.live(now) || write() {
        Some(Stored { added: false })
    } else {
        None
    }
}

/// Counts an overload entry in its storage's [`session_common::sets::SetInfo`], as
/// `session set add` counts one, so that `session set show` and the reaper see it.
#[inline(always)]
fn count_entry(storage: u32, added: bool, expiring: bool) {
    let Some(info) = SET_INFO.get_ptr_mut(storage) else {
        return;
    };
    // SAFETY: an array entry lives as long as the program. The daemon writes it under
    // its sets lock, which the kernel does not take: a race costs a count, which the
    // reaper's walk of expiring entries does not depend on for correctness.
    unsafe {
        if added {
            (*info).entries += 1;
        }
        if expiring {
            (*info).expiring += 1;
        }
    }
}
