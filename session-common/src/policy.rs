//! Policy matching: which compiled rule, if any, a classified packet matches.

use crate::packet::PacketMeta;
use crate::wire::{CtState, Hook, Rule, proto, rule_flags};

/// Whether `rule` matches a packet with this state, hook and interface.
#[inline(always)]
pub fn rule_matches(
    rule: &Rule,
    meta: &PacketMeta,
    state: CtState,
    hook: Hook,
    ifindex: u32,
) -> bool {
    if rule.state_mask & state.bit() == 0 || rule.hook_mask & hook.bit() == 0 {
        return false;
    }
    if rule.ifindex != 0 && rule.ifindex != ifindex {
        return false;
    }
    if (rule.family != 0 && rule.family != meta.family)
        || (rule.proto != 0 && rule.proto != meta.proto)
    {
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
    (half(addr, 0) & half(mask, 0)) == half(net, 0)
        && (half(addr, 8) & half(mask, 8)) == half(net, 8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::ipv4_mapped;
    use crate::wire::{FAMILY_IPV4, FAMILY_IPV6};

    const ALL_STATES: u8 = 0x1f;
    const BOTH_HOOKS: u8 = 0x03;

    /// A network and its mask from an address and a prefix in the 128-bit space.
    fn net(addr: [u8; 16], prefix: u32) -> ([u8; 16], [u8; 16]) {
        let bits = u128::from_be_bytes(addr);
        let mask = if prefix == 0 {
            0
        } else {
            u128::MAX << (128 - prefix)
        };
        ((bits & mask).to_be_bytes(), mask.to_be_bytes())
    }

    fn v4net(a: [u8; 4], prefix: u32) -> ([u8; 16], [u8; 16]) {
        assert!(prefix <= 32);
        net(ipv4_mapped(a), 96 + prefix)
    }

    fn v6(text: &str) -> [u8; 16] {
        // Tiny parser for the test addresses used here: "2001:2::x" style with one "::".
        let (head, tail) = text.split_once("::").unwrap_or((text, ""));
        let parse = |part: &str| -> [u16; 8] {
            let mut out = [0u16; 8];
            for (i, group) in part.split(':').filter(|g| !g.is_empty()).enumerate() {
                out[i] = u16::from_str_radix(group, 16).expect("hex group");
            }
            out
        };
        let head_groups = parse(head);
        let head_len = head.split(':').filter(|g| !g.is_empty()).count();
        let tail_groups = parse(tail);
        let tail_len = tail.split(':').filter(|g| !g.is_empty()).count();
        let mut groups = [0u16; 8];
        groups[..head_len].copy_from_slice(&head_groups[..head_len]);
        groups[8 - tail_len..].copy_from_slice(&tail_groups[..tail_len]);
        let mut out = [0u8; 16];
        for (i, group) in groups.iter().enumerate() {
            out[2 * i..2 * i + 2].copy_from_slice(&group.to_be_bytes());
        }
        out
    }

    fn any_rule() -> Rule {
        Rule {
            state_mask: ALL_STATES,
            hook_mask: BOTH_HOOKS,
            sport_hi: u16::MAX,
            dport_hi: u16::MAX,
            ..Rule::default()
        }
    }

    fn tcp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> PacketMeta {
        PacketMeta {
            family: FAMILY_IPV4,
            proto: proto::TCP,
            src: ipv4_mapped(src),
            dst: ipv4_mapped(dst),
            sport,
            dport,
            ..PacketMeta::default()
        }
    }

    fn matches(rule: &Rule, meta: &PacketMeta) -> bool {
        rule_matches(rule, meta, CtState::New, Hook::Ingress, 1)
    }

    #[test]
    fn rule_without_matches_matches_everything() {
        let rule = any_rule();
        assert!(matches(&rule, &tcp4([1, 2, 3, 4], 1, [5, 6, 7, 8], 2)));
        let v6_packet = PacketMeta {
            family: FAMILY_IPV6,
            proto: 47,
            src: v6("2001:2::1"),
            dst: v6("fe80::1"),
            ..PacketMeta::default()
        };
        assert!(rule_matches(
            &rule,
            &v6_packet,
            CtState::Invalid,
            Hook::Egress,
            99
        ));
        assert!(rule_matches(
            &rule,
            &PacketMeta::default(),
            CtState::Untracked,
            Hook::Ingress,
            0
        ));
    }

    #[test]
    fn state_mask_selects_states() {
        let rule = Rule {
            state_mask: CtState::Established.bit() | CtState::Related.bit(),
            ..any_rule()
        };
        let pkt = tcp4([1, 1, 1, 1], 1, [2, 2, 2, 2], 2);
        for (state, expected) in [
            (CtState::New, false),
            (CtState::Established, true),
            (CtState::Related, true),
            (CtState::Invalid, false),
            (CtState::Untracked, false),
        ] {
            assert_eq!(
                rule_matches(&rule, &pkt, state, Hook::Ingress, 1),
                expected,
                "{state:?}"
            );
        }
        let none = Rule {
            state_mask: 0,
            ..any_rule()
        };
        assert!(!matches(&none, &pkt));
    }

    #[test]
    fn hook_mask_selects_direction() {
        let pkt = tcp4([1, 1, 1, 1], 1, [2, 2, 2, 2], 2);
        let inbound = Rule {
            hook_mask: Hook::Ingress.bit(),
            ..any_rule()
        };
        let outbound = Rule {
            hook_mask: Hook::Egress.bit(),
            ..any_rule()
        };
        assert!(rule_matches(&inbound, &pkt, CtState::New, Hook::Ingress, 1));
        assert!(!rule_matches(&inbound, &pkt, CtState::New, Hook::Egress, 1));
        assert!(rule_matches(&outbound, &pkt, CtState::New, Hook::Egress, 1));
        assert!(!rule_matches(
            &outbound,
            &pkt,
            CtState::New,
            Hook::Ingress,
            1
        ));
    }

    #[test]
    fn ifindex_zero_is_any_interface_otherwise_exact() {
        let pkt = tcp4([1, 1, 1, 1], 1, [2, 2, 2, 2], 2);
        let rule = Rule {
            ifindex: 7,
            ..any_rule()
        };
        assert!(rule_matches(&rule, &pkt, CtState::New, Hook::Ingress, 7));
        assert!(!rule_matches(&rule, &pkt, CtState::New, Hook::Ingress, 8));
        assert!(rule_matches(
            &any_rule(),
            &pkt,
            CtState::New,
            Hook::Ingress,
            8
        ));
    }

    #[test]
    fn family_and_protocol_must_match_when_set() {
        let pkt = tcp4([1, 1, 1, 1], 1, [2, 2, 2, 2], 2);
        assert!(matches(
            &Rule {
                family: FAMILY_IPV4,
                ..any_rule()
            },
            &pkt
        ));
        assert!(!matches(
            &Rule {
                family: FAMILY_IPV6,
                ..any_rule()
            },
            &pkt
        ));
        assert!(matches(
            &Rule {
                proto: proto::TCP,
                ..any_rule()
            },
            &pkt
        ));
        assert!(!matches(
            &Rule {
                proto: proto::UDP,
                ..any_rule()
            },
            &pkt
        ));
    }

    #[test]
    fn ipv4_cidr_masks_match_inside_and_not_outside() {
        for (network, prefix, inside, outside) in [
            ([198, 18, 0, 0], 15, [198, 19, 255, 255], [198, 20, 0, 0]),
            ([198, 18, 0, 0], 15, [198, 18, 0, 0], [198, 17, 255, 255]),
            ([10, 1, 2, 0], 24, [10, 1, 2, 200], [10, 1, 3, 1]),
            ([10, 1, 2, 0], 23, [10, 1, 3, 1], [10, 1, 4, 1]),
            ([10, 1, 2, 3], 32, [10, 1, 2, 3], [10, 1, 2, 2]),
            ([10, 1, 2, 128], 25, [10, 1, 2, 255], [10, 1, 2, 127]),
            (
                [128, 0, 0, 0],
                1,
                [255, 255, 255, 255],
                [127, 255, 255, 255],
            ),
        ] {
            let (src_net, src_mask) = v4net(network, prefix);
            let rule = Rule {
                src_net,
                src_mask,
                ..any_rule()
            };
            assert!(
                matches(&rule, &tcp4(inside, 1, [9, 9, 9, 9], 2)),
                "{network:?}/{prefix} must contain {inside:?}"
            );
            assert!(
                !matches(&rule, &tcp4(outside, 1, [9, 9, 9, 9], 2)),
                "{network:?}/{prefix} must not contain {outside:?}"
            );
            // The same network as destination.
            let rule = Rule {
                dst_net: src_net,
                dst_mask: src_mask,
                ..any_rule()
            };
            assert!(matches(&rule, &tcp4([9, 9, 9, 9], 1, inside, 2)));
            assert!(!matches(&rule, &tcp4([9, 9, 9, 9], 1, outside, 2)));
        }
    }

    #[test]
    fn ipv4_slash_zero_matches_every_ipv4_address_but_not_ipv6() {
        let (src_net, src_mask) = v4net([0, 0, 0, 0], 0);
        let rule = Rule {
            src_net,
            src_mask,
            ..any_rule()
        };
        assert!(matches(
            &rule,
            &tcp4([255, 255, 255, 255], 1, [1, 1, 1, 1], 2)
        ));
        assert!(matches(&rule, &tcp4([0, 0, 0, 0], 1, [1, 1, 1, 1], 2)));
        let v6_packet = PacketMeta {
            family: FAMILY_IPV6,
            proto: proto::TCP,
            src: v6("2001:2::1"),
            dst: v6("2001:2::2"),
            ..PacketMeta::default()
        };
        assert!(
            !matches(&rule, &v6_packet),
            "an IPv4 /0 is ::ffff:0:0/96, not all of IPv6"
        );
    }

    #[test]
    fn ipv6_cidr_masks_match_inside_and_not_outside() {
        for (network, prefix, inside, outside) in [
            ("2001:2::", 48, "2001:2:0:ffff::1", "2001:2:1::1"),
            (
                "2001:2::",
                64,
                "2001:2::ffff:ffff:ffff:ffff",
                "2001:2:0:1::",
            ),
            ("2001:2::", 127, "2001:2::1", "2001:2::2"),
            ("2001:2::5", 128, "2001:2::5", "2001:2::4"),
            ("2001:2::80", 121, "2001:2::ff", "2001:2::7f"),
            ("fe80::", 10, "febf::1", "fec0::1"),
            ("::", 0, "ffff::1", "::"),
        ] {
            let (dst_net, dst_mask) = net(v6(network), prefix);
            let rule = Rule {
                dst_net,
                dst_mask,
                ..any_rule()
            };
            let packet = |dst: &str| PacketMeta {
                family: FAMILY_IPV6,
                proto: proto::UDP,
                src: v6("2001:db8::1"),
                dst: v6(dst),
                ..PacketMeta::default()
            };
            assert!(
                matches(&rule, &packet(inside)),
                "{network}/{prefix} must contain {inside}"
            );
            if prefix != 0 {
                assert!(
                    !matches(&rule, &packet(outside)),
                    "{network}/{prefix} must not contain {outside}"
                );
            }
        }
    }

    #[test]
    fn source_and_destination_networks_must_both_match() {
        let (src_net, src_mask) = v4net([10, 0, 0, 0], 8);
        let (dst_net, dst_mask) = v4net([192, 168, 0, 0], 16);
        let rule = Rule {
            src_net,
            src_mask,
            dst_net,
            dst_mask,
            ..any_rule()
        };
        assert!(matches(&rule, &tcp4([10, 9, 9, 9], 1, [192, 168, 1, 1], 2)));
        assert!(
            !matches(&rule, &tcp4([192, 168, 1, 1], 1, [10, 9, 9, 9], 2)),
            "swapped endpoints"
        );
        assert!(!matches(
            &rule,
            &tcp4([10, 9, 9, 9], 1, [192, 169, 1, 1], 2)
        ));
    }

    #[test]
    fn port_ranges_are_inclusive() {
        let rule = Rule {
            dport_lo: 8000,
            dport_hi: 8080,
            match_flags: rule_flags::PORTS,
            ..any_rule()
        };
        for (dport, expected) in [
            (7999, false),
            (8000, true),
            (8042, true),
            (8080, true),
            (8081, false),
        ] {
            assert_eq!(
                matches(&rule, &tcp4([1, 1, 1, 1], 40000, [2, 2, 2, 2], dport)),
                expected,
                "dport {dport}"
            );
        }
        let rule = Rule {
            sport_lo: 53,
            sport_hi: 53,
            match_flags: rule_flags::PORTS,
            ..any_rule()
        };
        assert!(matches(&rule, &tcp4([1, 1, 1, 1], 53, [2, 2, 2, 2], 9)));
        assert!(
            !matches(&rule, &tcp4([1, 1, 1, 1], 54, [2, 2, 2, 2], 53)),
            "sport, not dport"
        );
        let udp = PacketMeta {
            proto: proto::UDP,
            ..tcp4([1, 1, 1, 1], 53, [2, 2, 2, 2], 9)
        };
        assert!(matches(&rule, &udp));
    }

    #[test]
    fn port_matches_never_match_protocols_without_ports() {
        let rule = Rule {
            match_flags: rule_flags::PORTS,
            ..any_rule()
        };
        for protocol in [proto::ICMP, proto::ICMPV6, 47, 132] {
            let pkt = PacketMeta {
                proto: protocol,
                ..tcp4([1, 1, 1, 1], 0, [2, 2, 2, 2], 0)
            };
            assert!(!matches(&rule, &pkt), "protocol {protocol}");
        }
        // Without the flag, ranges are not looked at at all.
        let unflagged = Rule {
            dport_lo: 1,
            dport_hi: 1,
            ..any_rule()
        };
        assert!(matches(&unflagged, &tcp4([1, 1, 1, 1], 5, [2, 2, 2, 2], 5)));
    }

    #[test]
    fn icmp_type_matches_only_icmp_packets_of_that_type() {
        let rule = Rule {
            icmp_type: 8,
            match_flags: rule_flags::ICMP_TYPE,
            ..any_rule()
        };
        let icmp = |protocol, icmp_type| PacketMeta {
            proto: protocol,
            icmp_type,
            ..tcp4([1, 1, 1, 1], 0, [2, 2, 2, 2], 0)
        };
        assert!(matches(&rule, &icmp(proto::ICMP, 8)));
        assert!(!matches(&rule, &icmp(proto::ICMP, 0)));
        assert!(
            matches(&rule, &icmp(proto::ICMPV6, 8)),
            "the compiler pins the protocol, not the matcher"
        );
        assert!(
            !matches(&rule, &icmp(proto::TCP, 8)),
            "a TCP packet never matches an ICMP type"
        );
        assert!(!matches(&rule, &icmp(proto::UDP, 8)));
        let type_zero = Rule {
            icmp_type: 0,
            match_flags: rule_flags::ICMP_TYPE,
            ..any_rule()
        };
        assert!(matches(&type_zero, &icmp(proto::ICMP, 0)));
        assert!(!matches(&type_zero, &icmp(proto::ICMP, 3)));
    }
}
