//! Policy matching: which compiled rule, if any, a classified packet matches.

use crate::packet::PacketMeta;
use crate::wire::{CtState, Hook, Rule, proto, rule_flags};

/// Whether `rule` matches a packet with this state, hook and interface.
#[inline(always)]
pub fn rule_matches(rule: &Rule, meta: &PacketMeta, state: CtState, hook: Hook, ifindex: u32) -> bool {
    if rule.state_mask & state.bit() == 0 || rule.hook_mask & hook.bit() == 0 {
        return false;
    }
    if rule.ifindex != 0 && rule.ifindex != ifindex {
        return false;
    }
    if (rule.family != 0 && rule.family != meta.family) || (rule.proto != 0 && rule.proto != meta.proto) {
        return false;
    }
    if !in_network(&meta.src, &rule.src_net, &rule.src_mask)
        || !in_network(&meta.dst, &rule.dst_net, &rule.dst_mask)
    {
        return false;
    }
    if rule.match_flags & rule_flags::PORTS != 0 {
        if meta.proto != proto::TCP && meta.proto != proto::UDP {
            return false;
        }
        if meta.sport < rule.sport_lo
            || meta.sport > rule.sport_hi
            || meta.dport < rule.dport_lo
            || meta.dport > rule.dport_hi
        {
            return false;
        }
    }
    if rule.match_flags & rule_flags::ICMP_TYPE != 0 {
        if meta.proto != proto::ICMP && meta.proto != proto::ICMPV6 {
            return false;
        }
        if meta.icmp_type != rule.icmp_type {
            return false;
        }
    }
    true
}

/// `addr & mask == net`, on two u64 halves.
#[inline(always)]
fn in_network(addr: &[u8; 16], net: &[u8; 16], mask: &[u8; 16]) -> bool {
    let half = |bytes: &[u8; 16], at: usize| {
        let mut word = [0u8; 8];
        let mut i = 0;
        while i < 8 {
            word[i] = bytes[at + i];
            i += 1;
        }
        u64::from_ne_bytes(word)
    };
    (half(addr, 0) & half(mask, 0)) == half(net, 0) && (half(addr, 8) & half(mask, 8)) == half(net, 8)
}
