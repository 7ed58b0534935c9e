//! Compiles a validated policy into the fixed-size rule entries the kernel walks.
//!
//! A rule with several networks, port ranges or ICMP types becomes one entry per
//! combination, all carrying the rule's id, so the kernel's match stays a handful of
//! compares per entry.

use std::{collections::BTreeMap, sync::Arc};

use session_common::{
    limits::RuleLimit,
    sets::MAX_SETS_PER_DIM,
    wire::{
        FAMILY_IPV4, FAMILY_IPV6, MAX_RULES, PolicyHeader, RULE_NAME_LEN, Rule, RuleName,
        rule_flags,
    },
};

use crate::policy::{
    config::{Network, Policy, RuleSpec},
    rule_bitmaps::{self, RuleBitmapError, RuleBitmaps},
};

/// Why a policy cannot be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The policy needs more entries than a bank holds.
    #[error(
        "rule `{rule}` (line {line}) brings the policy to {entries} kernel entries, more than the {max} a policy can hold; \
         split address or port lists into fewer combinations or use ranges"
    )]
    TooManyEntries {
        /// Rule that overflowed.
        rule: String,
        /// Its line in the config.
        line: usize,
        /// Entries needed so far.
        entries: u64,
        /// The limit.
        max: u32,
    },
    /// A rule names an interface that does not exist here.
    #[error(
        "rule `{rule}` (line {line}) names interface `{iface}`, which does not exist on this host"
    )]
    UnknownInterface {
        /// The rule.
        rule: String,
        /// Its line.
        line: usize,
        /// The interface.
        iface: String,
    },
    /// The entries cannot be indexed by the kernel's classifier.
    #[error(transparent)]
    Bitmaps(#[from] RuleBitmapError),
    /// The rules name more sets in one dimension than a bank can reference.
    #[error(
        "rule `{rule}` (line {line}) names a {dim} set beyond the {max} different {dim} sets a policy can use; \
         merge sets (a set can hold IPv4 and IPv6 prefixes of any length)"
    )]
    TooManySets {
        /// The rule.
        rule: String,
        /// Its line.
        line: usize,
        /// "source" or "destination".
        dim: &'static str,
        /// The limit.
        max: u32,
    },
}

/// The named sets a compiled policy references, as its bank's `SetRefs` will: per
/// dimension, set `i` is what entries with `src_set`/`dst_set` `i + 1` test.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompiledSets {
    /// Names of the source sets, by index.
    pub src: Vec<String>,
    /// Names of the destination sets, by index.
    pub dst: Vec<String>,
    /// Prefixes of every referenced set, by name.
    pub contents: BTreeMap<String, Arc<Vec<Network>>>,
}

/// A policy ready to be written into one bank.
#[derive(Clone, Debug, PartialEq)]
pub struct CompiledPolicy {
    /// Entries in match order.
    pub entries: Vec<Rule>,
    /// Rule names indexed by rule id.
    pub names: Vec<RuleName>,
    /// Default actions (generation is set when applied).
    pub header: PolicyHeader,
    /// The kernel classifier's bitmaps of `entries`.
    pub bitmaps: RuleBitmaps,
    /// The sets the entries reference.
    pub sets: CompiledSets,
    /// The limits of the rules that have any, by rule id.
    pub limits: Vec<(u16, RuleLimit)>,
}

/// Compiles `policy`; `ifindex` resolves interface names.
pub fn compile(
    policy: &Policy,
    ifindex: impl Fn(&str) -> Option<u32>,
) -> Result<CompiledPolicy, CompileError> {
    let mut entries = Vec::new();
    let mut names = Vec::new();
    let mut sets = CompiledSets::default();
    let mut limits = Vec::new();
    for (id, spec) in policy.rules.iter().enumerate() {
        names.push(rule_name(&spec.name));
        let mut ifindexes = Vec::new();
        for iface in &spec.ifaces {
            ifindexes.push(
                ifindex(iface).ok_or_else(|| CompileError::UnknownInterface {
                    rule: spec.name.clone(),
                    line: spec.line,
                    iface: iface.clone(),
                })?,
            );
        }
        let needed = (entries.len() as u64).saturating_add(entry_count(spec));
        if needed > MAX_RULES as u64 {
            return Err(CompileError::TooManyEntries {
                rule: spec.name.clone(),
                line: spec.line,
                entries: needed,
                max: MAX_RULES,
            });
        }
        let src_sets = set_indexes(spec, &spec.src_sets, &mut sets.src, "source")?;
        let dst_sets = set_indexes(spec, &spec.dst_sets, &mut sets.dst, "destination")?;
        // An overload set is a source set of the bank, so that the kernel finds the
        // storage it writes to where the classifier reads it.
        let overload = spec.limit.iter().flat_map(|limit| &limit.overload);
        let overload_set = match overload.clone().next() {
            Some(name) => {
                set_indexes(spec, std::slice::from_ref(name), &mut sets.src, "source")?[0]
            }
            None => 0,
        };
        for name in spec.src_sets.iter().chain(&spec.dst_sets).chain(overload) {
            if let Some(set) = policy.sets.get(name) {
                sets.contents
                    .insert(name.clone(), Arc::clone(&set.networks));
            }
        }
        let first = entries.len();
        expand(
            spec,
            id as u16,
            &ifindexes,
            &src_sets,
            &dst_sets,
            &mut entries,
        );
        if let Some(limit) = &spec.limit {
            limits.push((id as u16, limit.compile(overload_set)));
            for entry in &mut entries[first..] {
                entry.match_flags |= rule_flags::LIMITED;
            }
        }
    }
    let bitmaps = rule_bitmaps::build(&entries)?;
    Ok(CompiledPolicy {
        bitmaps,
        sets,
        header: PolicyHeader {
            rule_count: entries.len() as u32,
            generation: 0,
            default_inbound: policy.inbound as u8,
            default_outbound: policy.outbound as u8,
            _pad: [0; 6],
        },
        entries,
        names,
        limits,
    })
}

/// The `src_set`/`dst_set` values (index + 1) of the sets `names`, giving names not yet in
/// `known` the next index.
fn set_indexes(
    spec: &RuleSpec,
    names: &[String],
    known: &mut Vec<String>,
    dim: &'static str,
) -> Result<Vec<u8>, CompileError> {
    let mut out = Vec::new();
    for name in names {
        let index = match known.iter().position(|have| have == name) {
            Some(index) => index,
            None => {
                if known.len() >= MAX_SETS_PER_DIM as usize {
                    return Err(CompileError::TooManySets {
                        rule: spec.name.clone(),
                        line: spec.line,
                        dim,
                        max: MAX_SETS_PER_DIM,
                    });
                }
                known.push(name.clone());
                known.len() - 1
            }
        };
        out.push(index as u8 + 1);
    }
    Ok(out)
}

fn rule_name(name: &str) -> RuleName {
    let mut bytes = [0u8; RULE_NAME_LEN];
    let len = name.len().min(RULE_NAME_LEN - 1);
    bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
    RuleName { bytes }
}

/// Decodes a stored rule name.
pub fn decode_name(name: &RuleName) -> String {
    let end = name
        .bytes
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(RULE_NAME_LEN);
    String::from_utf8_lossy(&name.bytes[..end]).into_owned()
}

/// "Any" for a list that was not given.
/// How many kernel entries `spec` compiles into, counted without building them, so that
/// a hostile rule (huge address and port lists) is refused before it allocates anything.
pub fn entry_count(spec: &RuleSpec) -> u64 {
    let by_family = |nets: &[Network], sets: usize| -> [u64; 3] {
        if nets.is_empty() && sets == 0 {
            return [1, 0, 0];
        }
        // A set is one entry of any family: its prefixes are not expanded.
        let mut counts = [sets as u64, 0, 0];
        for net in nets {
            counts[match net.family {
                FAMILY_IPV4 => 1,
                FAMILY_IPV6 => 2,
                _ => 0,
            }] += 1;
        }
        counts
    };
    const FAMILIES: [u8; 3] = [0, FAMILY_IPV4, FAMILY_IPV6];
    let (srcs, dsts) = (
        by_family(&spec.src, spec.src_sets.len()),
        by_family(&spec.dst, spec.dst_sets.len()),
    );
    let mut pairs = 0u64;
    for (s, &src_family) in FAMILIES.iter().enumerate() {
        for (d, &dst_family) in FAMILIES.iter().enumerate() {
            if combined_family(spec.family, src_family, dst_family).is_some() {
                pairs = pairs.saturating_add(srcs[s].saturating_mul(dsts[d]));
            }
        }
    }
    let len_or_one = |n: usize| (n as u64).max(1);
    pairs
        .saturating_mul(len_or_one(spec.ifaces.len()))
        .saturating_mul(len_or_one(spec.sport.len()))
        .saturating_mul(len_or_one(spec.dport.len()))
        .saturating_mul(len_or_one(spec.icmp_types.len()))
}

fn or_any<T: Copy>(list: &[T], any: T) -> Vec<T> {
    if list.is_empty() {
        vec![any]
    } else {
        list.to_vec()
    }
}

/// The address alternatives of one dimension: each network, then each set (as ::/0 with
/// the set's index + 1), or "any" when there are neither.
fn addresses(nets: &[Network], sets: &[u8]) -> Vec<(Network, u8)> {
    let any_net = Network {
        addr: [0; 16],
        prefix: 0,
        family: 0,
    };
    let mut out: Vec<(Network, u8)> = nets.iter().map(|net| (*net, 0)).collect();
    out.extend(sets.iter().map(|set| (any_net, *set)));
    if out.is_empty() {
        out.push((any_net, 0));
    }
    out
}

fn expand(
    spec: &RuleSpec,
    id: u16,
    ifindexes: &[u32],
    src_sets: &[u8],
    dst_sets: &[u8],
    out: &mut Vec<Rule>,
) {
    let srcs = addresses(&spec.src, src_sets);
    let dsts = addresses(&spec.dst, dst_sets);
    let sports = or_any(&spec.sport, (0, u16::MAX));
    let dports = or_any(&spec.dport, (0, u16::MAX));
    let icmp: Vec<Option<u8>> = if spec.icmp_types.is_empty() {
        vec![None]
    } else {
        spec.icmp_types.iter().copied().map(Some).collect()
    };
    let ifaces = or_any(ifindexes, 0);
    let has_ports = !spec.sport.is_empty() || !spec.dport.is_empty();
    for &ifindex in &ifaces {
        for (src, src_set) in &srcs {
            for (dst, dst_set) in &dsts {
                let Some(family) = combined_family(spec.family, src.family, dst.family) else {
                    continue;
                };
                for &(sport_lo, sport_hi) in &sports {
                    for &(dport_lo, dport_hi) in &dports {
                        for icmp_type in &icmp {
                            let mut match_flags = 0;
                            if has_ports {
                                match_flags |= rule_flags::PORTS;
                            }
                            if icmp_type.is_some() {
                                match_flags |= rule_flags::ICMP_TYPE;
                            }
                            out.push(Rule {
                                src_net: src.addr,
                                src_mask: src.mask(),
                                dst_net: dst.addr,
                                dst_mask: dst.mask(),
                                sport_lo,
                                sport_hi,
                                dport_lo,
                                dport_hi,
                                ifindex,
                                state_mask: spec.states,
                                hook_mask: spec.hooks,
                                proto: spec.proto,
                                family,
                                icmp_type: icmp_type.unwrap_or(0),
                                match_flags,
                                action: spec.action as u8,
                                log: u8::from(spec.log),
                                rule_id: id,
                                src_set: *src_set,
                                dst_set: *dst_set,
                            });
                        }
                    }
                }
            }
        }
    }
}

/// The family an entry must match, or `None` when its parts can never agree.
fn combined_family(rule: u8, src: u8, dst: u8) -> Option<u8> {
    let mut family = rule;
    for part in [src, dst] {
        if part == 0 {
            continue;
        }
        if family != 0 && family != part {
            return None;
        }
        family = part;
    }
    Some(family)
}
