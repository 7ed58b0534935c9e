//! Limits on the sessions a rule admits, after pf's `max-src-conn`, `max-src-conn-rate`
//! and `max`, and nftables' `ct count`: how many sessions one source (an address, or a
//! prefix such as a /24 or a /64) may hold at once through a rule, how many it may open
//! per interval, and how many the rule admits in all. A source over its limits is refused
//! (the packet dropped and counted) and, when the rule says so, *overloaded*: its prefix
//! goes into a named set with an expiry, which other rules match like any set.
//!
//! The state per source lives in a bounded LRU map keyed by [`SourceKey`]; the rule's own
//! total in an array. The kernel counts a session when it admits it and uncounts it when
//! the session closes or is removed ([`crate::wire::session_flags::COUNTED`] says which
//! sessions are counted, so that happens once). The daemon's reaper recounts both from the
//! session table at every sweep, which corrects what no packet could: sessions the
//! unassured tier evicted, and sources the LRU map forgot under a flood of others.

use bytemuck::{Pod, Zeroable};

use crate::wire::{FAMILY_IPV4, FlowKey, MAX_RULES};

/// Sources tracked at once when `[limits] max_tracked_sources` is not set.
pub const DEFAULT_MAX_TRACKED_SOURCES: u32 = 65_536;

/// Entries of the rule-limit array: one per rule id and policy bank.
pub const RULE_LIMIT_SLOTS: u32 = 2 * MAX_RULES;

/// Slots of the per-rule limit counters ([`LimitHit`]): one per rule id and kind.
pub const LIMIT_HIT_SLOTS: u32 = LimitHit::COUNT * MAX_RULES;

/// One thousand: the rate bucket counts thousandths of a session, so that it refills
/// smoothly between whole sessions.
const MILLI: u64 = 1000;

/// Bits of [`RuleLimit::flags`].
pub mod limit_flags {
    /// An overloaded source's sessions that the rule admitted are flushed (pf's `flush`).
    pub const FLUSH: u8 = 1;
    /// All of an overloaded source's sessions are flushed, whatever rule admitted them
    /// (pf's `flush global`); set together with [`FLUSH`].
    pub const FLUSH_GLOBAL: u8 = 2;
}

/// The limits of one rule, at `bank * MAX_RULES + rule_id` in `RULE_LIMITS`. A zero cap is
/// no cap.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RuleLimit {
    /// Sessions one source may hold through the rule at once.
    pub max_src_conn: u32,
    /// Sessions the rule admits at once, from all sources.
    pub max_conn: u32,
    /// New sessions one source may open per `rate_interval_ms`.
    pub rate_count: u32,
    /// The interval of `rate_count`, in milliseconds.
    pub rate_interval_ms: u32,
    /// How long an overloaded source stays in the overload set, in ns; 0 for ever.
    pub overload_timeout_ns: u64,
    /// Prefix length that makes an IPv4 source (32: each address on its own).
    pub src_prefix_v4: u8,
    /// Prefix length that makes an IPv6 source (64 counts a typical subnet as one).
    pub src_prefix_v6: u8,
    /// The overload set: the bank's source set `i` as `i + 1`; 0 for none.
    pub overload_set: u8,
    /// [`limit_flags`] bits.
    pub flags: u8,
    /// Explicit padding.
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<RuleLimit>() == 32);

impl RuleLimit {
    /// Whether the rule has any limit at all.
    #[inline(always)]
    pub fn is_set(&self) -> bool {
        self.max_src_conn != 0 || self.max_conn != 0 || self.rate_count != 0
    }

    /// The prefix length of a source of `family`.
    #[inline(always)]
    pub fn prefix(&self, family: u8) -> u8 {
        if family == FAMILY_IPV4 {
            self.src_prefix_v4.min(32)
        } else {
            self.src_prefix_v6.min(128)
        }
    }
}

/// A source as one rule counts it: the rule and the source's prefix. An IPv4 prefix is
/// kept IPv4-mapped, as every address here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SourceKey {
    /// The source address masked to `prefix` (bits of the IPv4 or IPv6 address).
    pub addr: [u8; 16],
    /// The rule that counts the source.
    pub rule_id: u16,
    /// Family of the address.
    pub family: u8,
    /// Prefix length in the family's own bits (32 or fewer for IPv4).
    pub prefix: u8,
}
const _: () = assert!(core::mem::size_of::<SourceKey>() == 20);

impl SourceKey {
    /// The key under which `rule_id` counts a source address `src` of `family`.
    #[inline(always)]
    pub fn of(limit: &RuleLimit, rule_id: u16, family: u8, src: &[u8; 16]) -> SourceKey {
        let prefix = limit.prefix(family);
        SourceKey {
            addr: mask(src, family, prefix),
            rule_id,
            family,
            prefix,
        }
    }

    /// The prefix length of [`SourceKey::addr`] in the 128 bits of an IPv4-mapped address.
    #[inline(always)]
    pub fn mapped_prefix(&self) -> u8 {
        if self.family == FAMILY_IPV4 {
            96 + self.prefix.min(32)
        } else {
            self.prefix.min(128)
        }
    }
}

/// `addr` with every bit past `prefix` (in the family's own bits) cleared. Two 64-bit
/// halves with a few branches, not a loop over bytes: in the kernel, each data-dependent
/// branch inside a 16-step loop doubles what the verifier walks.
#[inline(always)]
pub fn mask(addr: &[u8; 16], family: u8, prefix: u8) -> [u8; 16] {
    let keep = if family == FAMILY_IPV4 {
        96 + prefix.min(32) as u32
    } else {
        prefix.min(128) as u32
    };
    let half_mask = |bits: u32| -> u64 {
        if bits >= 64 {
            u64::MAX
        } else if bits == 0 {
            0
        } else {
            u64::MAX << (64 - bits)
        }
    };
    let mut high = [0u8; 8];
    let mut low = [0u8; 8];
    high.copy_from_slice(&addr[..8]);
    low.copy_from_slice(&addr[8..]);
    let high = u64::from_be_bytes(high) & half_mask(keep);
    let low = u64::from_be_bytes(low) & half_mask(keep.saturating_sub(64));
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&high.to_be_bytes());
    out[8..].copy_from_slice(&low.to_be_bytes());
    out
}

/// What one rule knows of one source: the value under a [`SourceKey`] in `SRC_LIMITS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SourceState {
    /// Sessions the source holds through the rule (admitted, not yet closed or removed).
    pub conns: u32,
    /// New sessions the source was refused.
    pub refused: u32,
    /// The rate bucket's spent part, in thousandths of a session: the source may open a
    /// session while this stays at or below `(rate_count - 1) * 1000`. Zero (a fresh
    /// entry) is a full bucket.
    pub spent_milli: u64,
    /// When the bucket was last brought up to date, in ms of the programs' clock.
    pub refilled_ms: u64,
}
const _: () = assert!(core::mem::size_of::<SourceState>() == 24);

/// Why a new session was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The source holds `max_src_conn` sessions through the rule.
    SourceSessions,
    /// The source opened `rate_count` sessions within the interval.
    SourceRate,
    /// The rule holds `max_conn` sessions.
    RuleSessions,
}

impl Refusal {
    /// Whether a refusal for this reason overloads the source, as pf overloads on
    /// `max-src-conn` and `max-src-conn-rate` (the rule's own total says nothing about
    /// the source).
    #[inline(always)]
    pub fn overloads(self) -> bool {
        self != Refusal::RuleSessions
    }
}

/// Per-rule counters of limits, in a per-CPU array at `kind * MAX_RULES + rule_id`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitHit {
    /// New sessions refused by one of the rule's limits.
    Refused = 0,
    /// Sources the rule put into its overload set.
    Overloaded = 1,
}

impl LimitHit {
    /// Number of kinds.
    pub const COUNT: u32 = 2;

    /// The slot of this kind for `rule_id`.
    #[inline(always)]
    pub fn slot(self, rule_id: u16) -> u32 {
        self as u32 * MAX_RULES + (rule_id as u32 % MAX_RULES)
    }
}

/// Brings the rate bucket of `source` up to `now_ms`: it refills `rate_count` sessions per
/// `rate_interval_ms`, evenly.
#[inline(always)]
fn refill(limit: &RuleLimit, source: &mut SourceState, now_ms: u64) {
    let interval = limit.rate_interval_ms as u64;
    if interval == 0 {
        source.spent_milli = 0;
        return;
    }
    // At most one interval's worth, so that the product stays far inside u64.
    let elapsed = now_ms.saturating_sub(source.refilled_ms).min(interval);
    let refilled = elapsed * limit.rate_count as u64 * MILLI / interval;
    source.spent_milli = source.spent_milli.saturating_sub(refilled);
    source.refilled_ms = now_ms;
}

/// Decides whether `rule`'s limits admit one more session from `source` while the rule
/// holds `total` sessions, and counts it in both when they do. `now` is the programs'
/// clock in ns. A refusal changes nothing but `source.refused`.
#[inline(always)]
pub fn admit(
    limit: &RuleLimit,
    source: &mut SourceState,
    total: &mut u32,
    now: u64,
) -> Result<(), Refusal> {
    let refusal = if limit.max_src_conn != 0 && source.conns >= limit.max_src_conn {
        Some(Refusal::SourceSessions)
    } else if limit.max_conn != 0 && *total >= limit.max_conn {
        Some(Refusal::RuleSessions)
    } else if limit.rate_count != 0 {
        refill(limit, source, now / 1_000_000);
        if source.spent_milli + MILLI > limit.rate_count as u64 * MILLI {
            Some(Refusal::SourceRate)
        } else {
            source.spent_milli += MILLI;
            None
        }
    } else {
        None
    };
    if let Some(refusal) = refusal {
        source.refused = source.refused.saturating_add(1);
        return Err(refusal);
    }
    source.conns = source.conns.saturating_add(1);
    *total = total.saturating_add(1);
    Ok(())
}

/// Uncounts a session [`admit`] counted, when it closes or is removed.
#[inline(always)]
pub fn release(source: Option<&mut SourceState>, total: Option<&mut u32>) {
    if let Some(source) = source {
        source.conns = source.conns.saturating_sub(1);
    }
    if let Some(total) = total {
        *total = total.saturating_sub(1);
    }
}

/// What the limits said of a new session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// The rule has no limits in force: the session is not counted.
    Unlimited,
    /// Admitted and counted: the session carries
    /// [`crate::wire::session_flags::COUNTED`].
    Counted,
    /// Refused; `overload` when the source is to go into the rule's overload set
    /// ([`overload_source`]).
    Refused {
        /// A per-source cap refused it and the rule has an overload set.
        overload: bool,
    },
}

/// Where limits keep their state: BPF maps in the kernel, collections on the host.
pub trait LimitStore {
    /// The limits of `rule_id` in policy `bank`, if it has any.
    fn rule_limit(&self, bank: u32, rule_id: u16) -> Option<RuleLimit>;
    /// The state of a source, created empty when absent (an LRU map evicts the least
    /// recently used source to make room); `None` only when it cannot be stored.
    fn source(&mut self, key: &SourceKey) -> Option<&mut SourceState>;
    /// The sessions `rule_id` holds.
    fn total(&mut self, rule_id: u16) -> Option<&mut u32>;
    /// Puts the source `key` into the overload set of `limit` (bank `bank`) until
    /// `now + overload_timeout_ns`; false when the set's maps have no room.
    fn overload(&mut self, bank: u32, limit: &RuleLimit, key: &SourceKey, now: u64) -> bool;
    /// Adds one to a per-rule limit counter.
    fn hit(&mut self, kind: LimitHit, rule_id: u16);

    /// The limits of `rule_id` in `bank`, with the source that `src` (of `family`) is
    /// under them; `None` when the rule has none.
    #[inline(always)]
    fn limited_source(
        &self,
        bank: u32,
        rule_id: u16,
        family: u8,
        src: &[u8; 16],
    ) -> Option<(RuleLimit, SourceKey)> {
        let limit = self.rule_limit(bank, rule_id)?;
        let key = SourceKey::of(&limit, rule_id, family, src);
        Some((limit, key))
    }
}

/// Judges a new session from `src` (of `family`) that rule `rule_id` of `bank` is about
/// to admit, in `store`.
#[inline(always)]
pub fn admit_new<L: LimitStore>(
    store: &mut L,
    bank: u32,
    rule_id: u16,
    family: u8,
    src: &[u8; 16],
    now: u64,
) -> Admission {
    let Some((limit, key)) = store.limited_source(bank, rule_id, family, src) else {
        return Admission::Unlimited;
    };
    let mut total = store.total(rule_id).map_or(0, |total| *total);
    // An LRU map always finds room; were it not to, the session would go uncounted.
    let Some(source) = store.source(&key) else {
        return Admission::Unlimited;
    };
    match admit(&limit, source, &mut total, now) {
        Ok(()) => {
            if let Some(stored) = store.total(rule_id) {
                *stored = total;
            }
            Admission::Counted
        }
        Err(refusal) => {
            store.hit(LimitHit::Refused, rule_id);
            Admission::Refused {
                overload: refusal.overloads() && limit.overload_set != 0,
            }
        }
    }
}

/// Puts the source `src` that rule `rule_id` of `bank` refused into the rule's overload
/// set; false when the set's maps have no room (or the rule has no overload set).
#[inline(always)]
pub fn overload_source<L: LimitStore>(
    store: &mut L,
    bank: u32,
    rule_id: u16,
    family: u8,
    src: &[u8; 16],
    now: u64,
) -> bool {
    let Some((limit, key)) = store.limited_source(bank, rule_id, family, src) else {
        return false;
    };
    if limit.overload_set == 0 {
        return false;
    }
    let overloaded = store.overload(bank, &limit, &key, now);
    if overloaded {
        store.hit(LimitHit::Overloaded, rule_id);
    }
    overloaded
}

/// Uncounts a session of `rule_id` under `flow` that [`admit_new`] counted; its source
/// is the key's lower endpoint when `orig_is_lo`.
#[inline(always)]
pub fn release_session<L: LimitStore>(
    store: &mut L,
    bank: u32,
    rule_id: u16,
    flow: &FlowKey,
    orig_is_lo: bool,
) {
    let src = if orig_is_lo {
        &flow.addr_lo
    } else {
        &flow.addr_hi
    };
    let Some((_, key)) = store.limited_source(bank, rule_id, flow.family, src) else {
        return;
    };
    release(store.source(&key), None);
    release(None, store.total(rule_id));
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::{RuleLimit, SourceKey, SourceState};

    // SAFETY: `RuleLimit` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for RuleLimit {}
    // SAFETY: `SourceKey` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for SourceKey {}
    // SAFETY: `SourceState` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for SourceState {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::FAMILY_IPV6;

    const MS: u64 = 1_000_000;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> [u8; 16] {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&[a, b, c, d]);
        addr
    }

    #[test]
    fn a_source_is_its_address_masked_to_the_rules_prefix_for_its_family() {
        let limit = RuleLimit {
            src_prefix_v4: 24,
            src_prefix_v6: 64,
            ..RuleLimit::default()
        };
        let key = SourceKey::of(&limit, 3, FAMILY_IPV4, &v4(198, 18, 7, 200));
        assert_eq!(key.addr, v4(198, 18, 7, 0));
        assert_eq!((key.rule_id, key.prefix, key.mapped_prefix()), (3, 24, 120));
        let mut v6 = [0u8; 16];
        v6[..2].copy_from_slice(&[0x20, 0x01]);
        v6[2..4].copy_from_slice(&[0x00, 0x02]);
        v6[8..].copy_from_slice(&[9; 8]);
        let key = SourceKey::of(&limit, 3, FAMILY_IPV6, &v6);
        assert_eq!(&key.addr[..8], &v6[..8]);
        assert_eq!(&key.addr[8..], &[0; 8]);
        assert_eq!(
            mask(&v4(198, 18, 7, 200), FAMILY_IPV4, 30),
            v4(198, 18, 7, 200)
        );
        assert_eq!(
            mask(&v4(198, 18, 7, 203), FAMILY_IPV4, 30),
            v4(198, 18, 7, 200)
        );
        assert_eq!(mask(&v4(198, 18, 7, 203), FAMILY_IPV4, 0), v4(0, 0, 0, 0));
        assert_eq!(mask(&v6, FAMILY_IPV6, 128), v6);
    }

    #[test]
    fn the_concurrent_cap_refuses_the_source_at_the_cap_until_a_session_is_released() {
        let limit = RuleLimit {
            max_src_conn: 2,
            ..RuleLimit::default()
        };
        let (mut source, mut total) = (SourceState::default(), 0);
        assert_eq!(admit(&limit, &mut source, &mut total, 0), Ok(()));
        assert_eq!(admit(&limit, &mut source, &mut total, 0), Ok(()));
        assert_eq!(
            admit(&limit, &mut source, &mut total, 0),
            Err(Refusal::SourceSessions)
        );
        assert_eq!((source.conns, source.refused, total), (2, 1, 2));
        release(Some(&mut source), Some(&mut total));
        assert_eq!(admit(&limit, &mut source, &mut total, 0), Ok(()));
    }

    #[test]
    fn the_rules_total_cap_counts_every_source_and_does_not_overload() {
        let limit = RuleLimit {
            max_conn: 2,
            ..RuleLimit::default()
        };
        let mut total = 0;
        let mut sources = [SourceState::default(); 3];
        assert_eq!(admit(&limit, &mut sources[0], &mut total, 0), Ok(()));
        assert_eq!(admit(&limit, &mut sources[1], &mut total, 0), Ok(()));
        let refused = admit(&limit, &mut sources[2], &mut total, 0);
        assert_eq!(refused, Err(Refusal::RuleSessions));
        assert!(!Refusal::RuleSessions.overloads());
        assert!(Refusal::SourceRate.overloads() && Refusal::SourceSessions.overloads());
    }

    #[test]
    fn the_rate_cap_allows_a_burst_of_its_count_then_refills_evenly_over_the_interval() {
        let limit = RuleLimit {
            rate_count: 3,
            rate_interval_ms: 3000,
            ..RuleLimit::default()
        };
        let (mut source, mut total) = (SourceState::default(), 0);
        let start = 10_000 * MS;
        for _ in 0..3 {
            assert_eq!(admit(&limit, &mut source, &mut total, start), Ok(()));
        }
        let refused = admit(&limit, &mut source, &mut total, start + 500 * MS);
        assert_eq!(refused, Err(Refusal::SourceRate));
        // One session's worth refills after a third of the interval.
        assert_eq!(
            admit(&limit, &mut source, &mut total, start + 1000 * MS),
            Ok(())
        );
        assert_eq!(
            admit(&limit, &mut source, &mut total, start + 1100 * MS),
            Err(Refusal::SourceRate)
        );
        // A long pause refills the whole bucket and no more.
        let later = start + 3600 * 1000 * MS;
        for _ in 0..3 {
            assert_eq!(admit(&limit, &mut source, &mut total, later), Ok(()));
        }
        assert_eq!(
            admit(&limit, &mut source, &mut total, later),
            Err(Refusal::SourceRate)
        );
    }

    #[test]
    fn over_any_stretch_the_rate_cap_admits_at_most_its_count_plus_what_refilled() {
        let limit = RuleLimit {
            rate_count: 5,
            rate_interval_ms: 1000,
            ..RuleLimit::default()
        };
        let (mut source, mut total) = (SourceState::default(), 0);
        let mut admitted = 0u64;
        // One attempt every 7 ms for 10 s: at most 5 + 10 s * 5/s admitted.
        for step in 0..(10_000 / 7) {
            if admit(&limit, &mut source, &mut total, 1_000 * MS + step * 7 * MS).is_ok() {
                admitted += 1;
            }
        }
        assert!((50..=55).contains(&admitted), "admitted {admitted}");
    }

    #[test]
    fn a_refusal_never_counts_a_session_and_release_never_goes_below_zero() {
        let limit = RuleLimit {
            max_src_conn: 1,
            rate_count: 1,
            rate_interval_ms: 1000,
            ..RuleLimit::default()
        };
        let (mut source, mut total) = (SourceState::default(), 0);
        assert_eq!(admit(&limit, &mut source, &mut total, MS), Ok(()));
        release(Some(&mut source), Some(&mut total));
        release(Some(&mut source), Some(&mut total));
        assert_eq!((source.conns, total), (0, 0));
        let refused = admit(&limit, &mut source, &mut total, 2 * MS);
        assert_eq!(refused, Err(Refusal::SourceRate));
        assert_eq!((source.conns, total, source.refused), (0, 0, 1));
    }

    #[test]
    fn per_rule_counter_slots_do_not_overlap() {
        assert_eq!(LimitHit::Refused.slot(0), 0);
        assert_eq!(LimitHit::Overloaded.slot(0), MAX_RULES);
        assert!(LimitHit::Overloaded.slot(MAX_RULES as u16 - 1) < LIMIT_HIT_SLOTS);
    }
}
