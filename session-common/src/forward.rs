//! The fast path for forwarded traffic: with `[forwarding] fast_path` on, an accepted
//! packet of an established TCP or UDP session that the kernel would forward from one
//! managed interface to another is forwarded by XDP itself, the way nftables' flowtables
//! do it after the IP stack, so it skips building a socket buffer, the routing code and
//! every netfilter hook. What that needs from the packet is here; the FIB lookup and the
//! redirect are the kernel program's.

use crate::engine::Outcome;
use crate::wire::{Action, CtState, proto};

/// Whether the packet may leave through the fast path: accepted, of an established TCP
/// or UDP session, neither opening nor closing it, and not an IP fragment. First packets,
/// ICMP (and the errors related to sessions) and closing segments go through the kernel,
/// which resolves neighbours, answers with ICMP errors and so sees every session start
/// and end; fragments go through it because one of a datagram's fragments may reach the
/// kernel unjudged (`fragment`), and the kernel forwards a datagram's fragments together.
#[inline(always)]
pub fn may_fast_forward(outcome: &Outcome, transport: u8) -> bool {
    outcome.state == CtState::Established
        && outcome.decision.action == Action::Accept
        && !outcome.created
        && !outcome.closed
        && !outcome.fragment
        && (transport == proto::TCP || transport == proto::UDP)
}

/// Offset of the TTL in an IPv4 header.
const IPV4_TTL: usize = 8;
/// Offset of the header checksum in an IPv4 header.
const IPV4_CHECKSUM: usize = 10;
/// Offset of the hop limit in an IPv6 header.
const IPV6_HOP_LIMIT: usize = 7;

/// Takes one hop off an IPv4 header's first 12 bytes: the TTL goes down by one and the
/// checksum is patched for it (RFC 1624), as the kernel's `ip_decrease_ttl` does. False,
/// with the header untouched, when the TTL is 1 or less: the kernel must answer that
/// packet with ICMP time exceeded, so it does not take the fast path.
#[inline(always)]
pub fn ipv4_hop(header: &mut [u8; 12]) -> bool {
    let ttl = header[IPV4_TTL];
    if ttl <= 1 {
        return false;
    }
    header[IPV4_TTL] = ttl - 1;
    // The TTL is the high byte of its 16-bit word, so the word drops by 0x0100 and the
    // one's complement checksum rises by as much, with the carry folded back in.
    let check =
        u16::from_be_bytes([header[IPV4_CHECKSUM], header[IPV4_CHECKSUM + 1]]) as u32 + 0x0100;
    let check = (check + (check >> 16)) as u16;
    [header[IPV4_CHECKSUM], header[IPV4_CHECKSUM + 1]] = check.to_be_bytes();
    true
}

/// Takes one hop off an IPv6 header's first 8 bytes: the hop limit goes down by one (IPv6
/// has no header checksum). False, with the header untouched, when it is 1 or less.
#[inline(always)]
pub fn ipv6_hop(header: &mut [u8; 8]) -> bool {
    let hop_limit = header[IPV6_HOP_LIMIT];
    if hop_limit <= 1 {
        return false;
    }
    header[IPV6_HOP_LIMIT] = hop_limit - 1;
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Decision;
    use crate::wire::RULE_ID_DEFAULT;
    use proptest::prelude::*;

    /// The one's complement sum of a header's 16-bit words, folded: 0xffff when its
    /// checksum is right.
    fn folded_sum(header: &[u8; 20]) -> u16 {
        let mut sum: u32 = header
            .chunks(2)
            .map(|word| u16::from_be_bytes([word[0], word[1]]) as u32)
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    /// A 20-byte IPv4 header with `fill` in every field but the TTL, and its checksum.
    fn ipv4_header(fill: [u8; 20], ttl: u8) -> [u8; 20] {
        let mut header = fill;
        header[IPV4_TTL] = ttl;
        header[IPV4_CHECKSUM..IPV4_CHECKSUM + 2].copy_from_slice(&[0, 0]);
        let check = !folded_sum(&header);
        header[IPV4_CHECKSUM..IPV4_CHECKSUM + 2].copy_from_slice(&check.to_be_bytes());
        header
    }

    fn hop(header: &mut [u8; 20]) -> bool {
        ipv4_hop((&mut header[..12]).try_into().expect("12 bytes"))
    }

    proptest! {
        #[test]
        fn an_ipv4_hop_keeps_the_checksum_right(fill in any::<[u8; 20]>(), ttl in 2u8..) {
            let mut header = ipv4_header(fill, ttl);
            prop_assert!(hop(&mut header));
            prop_assert_eq!(header[IPV4_TTL], ttl - 1);
            prop_assert_eq!(folded_sum(&header), 0xffff, "checksum wrong after the hop");
            let mut expected = fill;
            expected[IPV4_TTL] = ttl - 1;
            expected[IPV4_CHECKSUM..IPV4_CHECKSUM + 2].copy_from_slice(&header[10..12]);
            prop_assert_eq!(header, expected, "a byte other than TTL and checksum changed");
        }
    }

    #[test]
    fn a_packet_out_of_hops_is_left_to_the_kernel() {
        for ttl in [0, 1] {
            let mut header = ipv4_header([0x45; 20], ttl);
            let before = header;
            assert!(!hop(&mut header), "TTL {ttl} took the fast path");
            assert_eq!(header, before, "TTL {ttl}: the header changed");
            let mut v6 = [0x60, 0, 0, 0, 0, 8, 17, ttl];
            assert!(!ipv6_hop(&mut v6), "hop limit {ttl} took the fast path");
            assert_eq!(v6[IPV6_HOP_LIMIT], ttl);
        }
        let mut v6 = [0x60, 0, 0, 0, 0, 8, 17, 64];
        assert!(ipv6_hop(&mut v6));
        assert_eq!(v6, [0x60, 0, 0, 0, 0, 8, 17, 63]);
    }

    #[test]
    fn only_accepted_established_tcp_and_udp_in_mid_session_take_the_fast_path() {
        let established = Outcome {
            state: CtState::Established,
            decision: Decision {
                action: Action::Accept,
                rule_id: RULE_ID_DEFAULT,
                slot: 0,
                generation: 1,
                log: false,
                limited: false,
            },
            created: false,
            closed: false,
            fragment: false,
            overloaded: false,
        };
        assert!(may_fast_forward(&established, proto::TCP));
        assert!(may_fast_forward(&established, proto::UDP));
        for transport in [proto::ICMP, proto::ICMPV6, 47] {
            assert!(!may_fast_forward(&established, transport), "{transport}");
        }
        for state in [
            CtState::New,
            CtState::Related,
            CtState::Invalid,
            CtState::Untracked,
        ] {
            let outcome = Outcome {
                state,
                ..established
            };
            assert!(!may_fast_forward(&outcome, proto::TCP), "{state:?}");
        }
        let dropped = Outcome {
            decision: Decision {
                action: Action::Drop,
                ..established.decision
            },
            ..established
        };
        let closing = Outcome {
            closed: true,
            ..established
        };
        let opening = Outcome {
            created: true,
            ..established
        };
        let fragment = Outcome {
            fragment: true,
            ..established
        };
        for outcome in [dropped, closing, opening, fragment] {
            assert!(!may_fast_forward(&outcome, proto::TCP), "{outcome:?}");
        }
    }
}
