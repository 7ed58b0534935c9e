//! Compiles a validated policy into the fixed-size rule entries the kernel walks.
//!
//! A rule with several networks, port ranges or ICMP types becomes one entry per
//! combination, all carrying the rule's id, so the kernel's match stays a handful of
//! compares per entry.

use session_common::wire::{
    FAMILY_IPV4, FAMILY_IPV6, MAX_RULES, PolicyHeader, RULE_NAME_LEN, Rule, RuleName, rule_flags,
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
}

/// Compiles `policy`; `ifindex` resolves interface names.
pub fn compile(
    policy: &Policy,
    ifindex: impl Fn(&str) -> Option<u32>,
) -> Result<CompiledPolicy, CompileError> {
    let mut entries = Vec::new();
    let mut names = Vec::new();
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
        expand(spec, id as u16, &ifindexes, &mut entries);
    }
    let bitmaps = rule_bitmaps::build(&entries)?;
    Ok(CompiledPolicy {
        bitmaps,
        header: PolicyHeader {
            rule_count: entries.len() as u32,
            generation: 0,
            default_inbound: policy.inbound as u8,
            default_outbound: policy.outbound as u8,
            _pad: [0; 6],
        },
        entries,
        names,
    })
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
    let by_family = |nets: &[Network]| -> [u64; 3] {
        if nets.is_empty() {
            return [1, 0, 0];
        }
        let mut counts = [0u64; 3];
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
    let (srcs, dsts) = (by_family(&spec.src), by_family(&spec.dst));
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

fn expand(spec: &RuleSpec, id: u16, ifindexes: &[u32], out: &mut Vec<Rule>) {
    let any_net = Network {
        addr: [0; 16],
        prefix: 0,
        family: 0,
    };
    let srcs = or_any(&spec.src, any_net);
    let dsts = or_any(&spec.dst, any_net);
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
        for src in &srcs {
            for dst in &dsts {
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
                                _pad2: [0; 2],
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
