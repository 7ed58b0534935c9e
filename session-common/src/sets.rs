//! Named address sets (block and allow lists of up to millions of prefixes) as the kernel
//! path and the host model both see them.
//!
//! A set is stored once, outside the policy: its prefixes live in one LPM trie shared by
//! all sets (`SET_NETS`), keyed by a *storage* number and the prefix, so adding or deleting
//! a member is one map update whatever the set's size. Its single addresses (/32, /128:
//! most of a ban list) live in a hash keyed the same way (`SET_HOSTS`), because a trie of
//! a million hosts is some twenty nodes deep; a host that finds the hash full goes to the
//! trie, and a lookup asks the trie first (networks only, so shallow), then the hash. A rule that names a set compiles to
//! one entry (not one per prefix) whose source or destination says "member of the bank's
//! set `i` of that dimension" ([`crate::wire::Rule::src_set`]). Each policy bank says in a
//! [`SetRefs`] which storage each of its set references reads, so an atomic replace fills
//! a fresh storage and then switches the reference: a packet sees the whole old or the
//! whole new set.
//!
//! The classifier looks a new flow's source up once per source set the bank uses (and the
//! destination likewise), folds the answers into a membership mask, and reads the
//! precomputed bitmap of the entries that accept that mask (`bits_slot::SRC_SETS`), which
//! joins the AND of the other dimensions. A bank without sets skips all of it.

use bytemuck::{Pod, Zeroable};

use crate::wire::Rule;

/// Set references of one dimension one bank can hold. Each combination of memberships has
/// its own precomputed bitmap, so this is kept small: 2^8 bitmaps per dimension and bank.
pub const MAX_SETS_PER_DIM: u32 = 8;

/// Membership masks of one dimension: bitmaps per dimension and bank.
pub const SET_MASKS: u32 = 1 << MAX_SETS_PER_DIM;

/// Storages the set trie can hold at once: every set both banks reference, plus the fresh
/// storages that replacements are being loaded into.
pub const MAX_SET_STORAGE: u32 = 64;

/// Prefixes the set trie holds, over all storages: twice the largest configurable
/// `[limits] max_set_entries`, so that a replacement of a set at the cap fits next to the
/// set it replaces. An LPM trie allocates per prefix, so the bound costs no memory.
pub const SET_TRIE_ENTRIES: u32 = 2 * MAX_SET_ENTRIES_LIMIT;

/// Highest `[limits] max_set_entries` a config may ask for.
pub const MAX_SET_ENTRIES_LIMIT: u32 = 1 << 22;

/// Bytes of a set name, NUL-padded.
pub const SET_NAME_LEN: usize = 32;

/// Bits of an LPM prefix length taken by [`SetKey::storage`].
pub const SET_KEY_STORAGE_BITS: u32 = 32;

/// Key data of the set trie: the storage, then the address (IPv4-mapped for IPv4). A
/// prefix of length `p` is stored with prefix length [`SET_KEY_STORAGE_BITS`]` + p`, so
/// storages never see each other's prefixes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SetKey {
    /// Storage number, below [`MAX_SET_STORAGE`].
    pub storage: u32,
    /// Prefix or packet address.
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<SetKey>() == 20);

/// Value of a set prefix: when it stops being a member.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SetValue {
    /// CLOCK_MONOTONIC time (ns, the clock of `bpf_ktime_get_coarse_ns`) from which the
    /// prefix no longer counts; 0 for never. The daemon's reaper deletes expired prefixes.
    pub expires_ns: u64,
}
const _: () = assert!(core::mem::size_of::<SetValue>() == 8);

impl SetValue {
    /// Whether the prefix still counts at `now`.
    #[inline(always)]
    pub fn live(&self, now: u64) -> bool {
        self.expires_ns == 0 || now < self.expires_ns
    }
}

/// The sets one policy bank references, per dimension, as storage numbers: entry `i` of
/// `src` is the storage a rule with `src_set == i + 1` reads. One value per bank in
/// `SET_REFS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SetRefs {
    /// Source sets in use (the first `src_count` of `src`).
    pub src_count: u32,
    /// Destination sets in use.
    pub dst_count: u32,
    /// Storage of each source set.
    pub src: [u32; MAX_SETS_PER_DIM as usize],
    /// Storage of each destination set.
    pub dst: [u32; MAX_SETS_PER_DIM as usize],
}
const _: () = assert!(core::mem::size_of::<SetRefs>() == 72);

/// What a storage holds, for `session set` and the daemon: one value per storage in
/// `SET_INFO`. Only user space reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SetInfo {
    /// The set's name, NUL-padded.
    pub name: [u8; SET_NAME_LEN],
    /// [`set_state`] of the storage.
    pub state: u32,
    /// Prefixes stored.
    pub entries: u32,
    /// Live changes (add, delete, flush, replace) made to the set since it was loaded.
    pub changes: u64,
    /// Prefixes added with an expiry and not yet freed: the reaper walks the set trie
    /// only while some storage has any.
    pub expiring: u32,
    /// Explicit padding.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SetInfo>() == 56);

impl Default for SetInfo {
    fn default() -> Self {
        Self::zeroed()
    }
}

/// Values of [`SetInfo::state`].
pub mod set_state {
    /// Unused.
    pub const FREE: u32 = 0;
    /// Being filled by an apply or a replace; no bank reads it yet.
    pub const LOADING: u32 = 1;
    /// The current contents of its set.
    pub const ACTIVE: u32 = 2;
    /// Replaced: no bank reads it any more, and the daemon's reaper frees it (so that
    /// `session set replace` returns once the new contents are in force).
    pub const RETIRED: u32 = 3;
}

/// The membership mask of an address in the first `count` of `storages`: bit `i` set when
/// `member(storages[i])`. A bounded loop without data-dependent exits besides the count.
#[inline(always)]
pub fn membership(
    count: u32,
    storages: &[u32; MAX_SETS_PER_DIM as usize],
    mut member: impl FnMut(u32) -> bool,
) -> u32 {
    let mut mask = 0u32;
    let mut i = 0usize;
    while i < MAX_SETS_PER_DIM as usize {
        if i as u32 >= count {
            break;
        }
        if member(storages[i]) {
            mask |= 1 << i;
        }
        i += 1;
    }
    mask & (SET_MASKS - 1)
}

/// Whether an entry's set conditions hold for an address whose source sets are
/// `src_mask` and destination sets `dst_mask` (as [`membership`] computes them). An entry
/// without sets always passes; the rest of the entry is [`crate::policy::rule_matches`].
#[inline(always)]
pub fn sets_match(rule: &Rule, src_mask: u32, dst_mask: u32) -> bool {
    mask_accepts(rule.src_set, src_mask) && mask_accepts(rule.dst_set, dst_mask)
}

/// Whether membership mask `mask` satisfies an entry whose set in this dimension is `set`
/// (0 = none): the bitmap builder's rule for slot `SRC_SETS + mask`.
#[inline(always)]
pub fn mask_accepts(set: u8, mask: u32) -> bool {
    set == 0 || mask & (1u32 << (set.wrapping_sub(1) & 7)) != 0
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::{SetInfo, SetKey, SetRefs, SetValue};

    // SAFETY: `SetKey` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for SetKey {}
    // SAFETY: `SetValue` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for SetValue {}
    // SAFETY: `SetRefs` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for SetRefs {}
    // SAFETY: `SetInfo` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for SetInfo {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_sets_the_bits_of_the_sets_holding_the_address_within_the_count() {
        let storages = [10, 11, 12, 13, 14, 15, 16, 17];
        assert_eq!(membership(0, &storages, |_| true), 0);
        assert_eq!(membership(3, &storages, |_| true), 0b111);
        assert_eq!(membership(8, &storages, |s| s % 2 == 1), 0b1010_1010);
        assert_eq!(membership(99, &storages, |_| true), 0xff);
    }

    #[test]
    fn sets_match_requires_membership_only_of_the_entrys_own_sets() {
        let mut rule = Rule::zeroed();
        assert!(sets_match(&rule, 0, 0));
        rule.src_set = 3;
        assert!(!sets_match(&rule, 0b011, 0));
        assert!(sets_match(&rule, 0b100, 0));
        rule.dst_set = 1;
        assert!(!sets_match(&rule, 0b100, 0));
        assert!(sets_match(&rule, 0b100, 1));
        for mask in 0..SET_MASKS {
            assert_eq!(mask_accepts(3, mask), mask & 4 != 0);
            assert!(mask_accepts(0, mask));
        }
    }

    #[test]
    fn expiry_zero_is_forever_and_otherwise_ends_at_the_time() {
        assert!(SetValue { expires_ns: 0 }.live(u64::MAX));
        assert!(SetValue { expires_ns: 10 }.live(9));
        assert!(!SetValue { expires_ns: 10 }.live(10));
    }
}
