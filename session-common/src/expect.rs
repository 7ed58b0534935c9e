//! Expectations: the replies the host's own broadcast and multicast requests call for.
//!
//! A reply to a request sent to a group address (a DHCP OFFER to the DISCOVER sent to
//! 255.255.255.255, an mDNS answer, a DHCPv6 ADVERTISE to the SOLICIT sent to
//! ff02::1:2) comes from an address the request never named, so it matches no session
//! and would be NEW. The kernel solves this for NetBIOS with its broadcast helper
//! (`nf_conntrack_broadcast`), which, for every such request, registers an expectation
//! whose match makes the reply RELATED. The same is done here for any UDP request to a
//! group address, keyed on the interface, the two ports and, for DHCP and DHCPv6, the
//! transaction id, so that only the server's answer to an outstanding transaction
//! matches and an unsolicited OFFER does not.
//!
//! Only requests the host sends (TC egress) create expectations; replies only look them
//! up. A flood of spoofed replies therefore neither fills the (bounded, LRU) map nor
//! matches anything unless it guesses a live key, and for DHCP that includes a 32-bit
//! (24-bit for DHCPv6) random transaction id.

use crate::{
    packet::PacketMeta,
    wire::{FAMILY_IPV4, FAMILY_IPV6},
};

/// Port a DHCPv4 server listens on (BOOTP server).
pub const DHCP4_SERVER_PORT: u16 = 67;
/// Port a DHCPv4 client listens on (BOOTP client).
pub const DHCP4_CLIENT_PORT: u16 = 68;
/// Port DHCPv6 servers and relays listen on.
pub const DHCP6_SERVER_PORT: u16 = 547;
/// Port DHCPv6 clients listen on.
pub const DHCP6_CLIENT_PORT: u16 = 546;

/// How long an expectation from a DHCPv4 or DHCPv6 request lives. The transaction id
/// makes it precise, so it may outlive slow servers: clients retransmit after 4 s
/// (DHCPv4) or 1 s growing (DHCPv6), each retransmission renewing it.
pub const DHCP_LIFETIME_NS: u64 = 15_000_000_000;
/// How long an expectation from any other request to a group address lives. The kernel's
/// broadcast helper uses 3 s for NetBIOS; 5 s also covers SSDP, whose responders wait
/// up to the M-SEARCH's `MX` (at most 5 s) before answering, and mDNS, whose
/// responders answer within a second.
pub const GENERIC_LIFETIME_NS: u64 = 5_000_000_000;

/// Bytes of UDP payload read to identify a DHCP transaction: the BOOTP header up to and
/// including the xid (op, htype, hlen, hops, xid), which also covers DHCPv6's message
/// type and 24-bit transaction id.
pub const PAYLOAD_BYTES: usize = 8;

/// BOOTP `op` of a client's request.
const BOOTREQUEST: u8 = 1;
/// BOOTP `op` of a server's reply.
const BOOTREPLY: u8 = 2;

/// DHCPv6 message types (RFC 8415 §7.3).
mod dhcp6 {
    pub const SOLICIT: u8 = 1;
    pub const ADVERTISE: u8 = 2;
    pub const REQUEST: u8 = 3;
    pub const CONFIRM: u8 = 4;
    pub const RENEW: u8 = 5;
    pub const REBIND: u8 = 6;
    pub const REPLY: u8 = 7;
    pub const RELEASE: u8 = 8;
    pub const DECLINE: u8 = 9;
    pub const INFORMATION_REQUEST: u8 = 11;
}

/// What an expectation waits for: a UDP datagram on `ifindex`, to the host's
/// `local_port`, from `remote_port`, carrying transaction id `xid` (0 when the exchange
/// has none the firewall reads). The remote address is left open, as in the kernel's
/// broadcast helper: the request named a group, any member may answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ExpectKey {
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Explicit padding; always zero so keys hash identically.
    pub _pad: u8,
    /// The host's port: the request's source port, the reply's destination port.
    pub local_port: u16,
    /// The peer's port: the request's destination port, the reply's source port.
    pub remote_port: u16,
    /// Explicit padding; always zero.
    pub _pad2: u16,
    /// Interface the request left by and the reply must arrive on.
    pub ifindex: u32,
    /// DHCPv4 xid or DHCPv6 transaction id; 0 for other exchanges.
    pub xid: u32,
}
const _: () = assert!(core::mem::size_of::<ExpectKey>() == 16);

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `Copy`, fully initialised plain data with explicit padding
// (checked by bytemuck's Pod derive), so user space may read the kernel's map.
unsafe impl aya::Pod for ExpectKey {}

/// Where the engine keeps expectations: the kernel in a bounded LRU map, the host model
/// in a hash map. Values are absolute expiry times (ns, the engine's clock).
pub trait Expectations {
    /// Stores (or renews) the expectation `key`, live until `expires_ns`.
    fn expect(&mut self, key: &ExpectKey, expires_ns: u64);
    /// The expiry of the expectation `key`, when one is stored (live or not).
    fn expiry(&mut self, key: &ExpectKey) -> Option<u64>;
}

/// Whether a packet the host sends is addressed to a group: IPv4 limited broadcast
/// (255.255.255.255), IPv4 multicast (224.0.0.0/4), IPv6 multicast (ff00::/8), or any
/// destination whose link-layer address has the group bit (`dst_mac_first` is the
/// first byte of the Ethernet destination), which is how a subnet-directed broadcast
/// (198.18.0.255 on a /24) leaves, without the firewall knowing the subnet.
#[inline(always)]
pub fn is_group_destination(meta: &PacketMeta, dst_mac_first: u8) -> bool {
    if dst_mac_first & 1 != 0 {
        return true;
    }
    match meta.family {
        FAMILY_IPV4 => {
            let v4 = [meta.dst[12], meta.dst[13], meta.dst[14], meta.dst[15]];
            v4 == [255, 255, 255, 255] || v4[0] & 0xf0 == 0xe0
        }
        FAMILY_IPV6 => meta.dst[0] == 0xff,
        _ => false,
    }
}

/// Whether the engine must read [`PAYLOAD_BYTES`] of this UDP packet's payload to build
/// its expectation key: only DHCPv4 and DHCPv6 packets (either port a DHCP port of its
/// family), so other packets pay nothing.
#[inline(always)]
pub fn needs_payload(meta: &PacketMeta) -> bool {
    match meta.family {
        FAMILY_IPV4 => is_dhcp4_port(meta.sport) || is_dhcp4_port(meta.dport),
        FAMILY_IPV6 => is_dhcp6_port(meta.sport) || is_dhcp6_port(meta.dport),
        _ => false,
    }
}

#[inline(always)]
fn is_dhcp4_port(port: u16) -> bool {
    port == DHCP4_SERVER_PORT || port == DHCP4_CLIENT_PORT
}

#[inline(always)]
fn is_dhcp6_port(port: u16) -> bool {
    port == DHCP6_SERVER_PORT || port == DHCP6_CLIENT_PORT
}

/// What a DHCP payload says, given the first [`PAYLOAD_BYTES`] (`None` when the payload
/// is shorter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dhcp {
    /// A client's request carrying this transaction id.
    Request(u32),
    /// A server's reply carrying this transaction id.
    Reply(u32),
    /// Neither: nothing to expect or to match.
    Other,
}

/// Reads a DHCPv4 (BOOTP `op`, xid at bytes 4..8) or DHCPv6 (message type, 24-bit
/// transaction id at bytes 1..4) payload.
#[inline(always)]
fn dhcp(family: u8, payload: Option<[u8; PAYLOAD_BYTES]>, payload_len: u32) -> Dhcp {
    let Some(p) = payload else {
        return Dhcp::Other;
    };
    if family == FAMILY_IPV4 {
        // A BOOTP message has a 236-byte fixed part; anything shorter is not one.
        if payload_len < 236 {
            return Dhcp::Other;
        }
        let xid = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
        return match p[0] {
            BOOTREQUEST => Dhcp::Request(xid),
            BOOTREPLY => Dhcp::Reply(xid),
            _ => Dhcp::Other,
        };
    }
    if payload_len < 4 {
        return Dhcp::Other;
    }
    let xid = u32::from_be_bytes([0, p[1], p[2], p[3]]);
    match p[0] {
        dhcp6::SOLICIT
        | dhcp6::REQUEST
        | dhcp6::CONFIRM
        | dhcp6::RENEW
        | dhcp6::REBIND
        | dhcp6::RELEASE
        | dhcp6::DECLINE
        | dhcp6::INFORMATION_REQUEST => Dhcp::Request(xid),
        dhcp6::ADVERTISE | dhcp6::REPLY => Dhcp::Reply(xid),
        _ => Dhcp::Other,
    }
}

/// The client and server ports of the DHCP protocol of `family`.
#[inline(always)]
fn dhcp_ports(family: u8) -> (u16, u16) {
    if family == FAMILY_IPV4 {
        (DHCP4_CLIENT_PORT, DHCP4_SERVER_PORT)
    } else {
        (DHCP6_CLIENT_PORT, DHCP6_SERVER_PORT)
    }
}

/// The expectation a UDP request the host sends to a group address sets up, with its
/// expiry, when it sets one up. `payload` holds the first payload bytes when
/// [`needs_payload`] asked for them. A DHCP request (client port to server port) expects
/// its transaction's replies; a DHCP packet of any other kind (a relay's, a server's)
/// expects nothing; any other request expects replies to its source port from its
/// destination port for [`GENERIC_LIFETIME_NS`].
#[inline(always)]
pub fn request(
    meta: &PacketMeta,
    ifindex: u32,
    payload: Option<[u8; PAYLOAD_BYTES]>,
    now: u64,
) -> Option<(ExpectKey, u64)> {
    let mut key = ExpectKey {
        family: meta.family,
        local_port: meta.sport,
        remote_port: meta.dport,
        ifindex,
        ..ExpectKey::default()
    };
    if !needs_payload(meta) {
        return Some((key, now.saturating_add(GENERIC_LIFETIME_NS)));
    }
    if (meta.sport, meta.dport) != dhcp_ports(meta.family) {
        return None;
    }
    match dhcp(meta.family, payload, meta.payload_len) {
        Dhcp::Request(xid) => {
            key.xid = xid;
            Some((key, now.saturating_add(DHCP_LIFETIME_NS)))
        }
        _ => None,
    }
}

/// The expectation a UDP packet arriving on `ifindex` would answer, if it can answer
/// one: the mirror of [`request`]. A packet from or to a DHCP port answers only as a
/// server's reply (server port to client port, BOOTREPLY or ADVERTISE/REPLY) carrying
/// its transaction id.
#[inline(always)]
pub fn reply(
    meta: &PacketMeta,
    ifindex: u32,
    payload: Option<[u8; PAYLOAD_BYTES]>,
) -> Option<ExpectKey> {
    let mut key = ExpectKey {
        family: meta.family,
        local_port: meta.dport,
        remote_port: meta.sport,
        ifindex,
        ..ExpectKey::default()
    };
    if !needs_payload(meta) {
        return Some(key);
    }
    let (client, server) = dhcp_ports(meta.family);
    if (meta.sport, meta.dport) != (server, client) {
        return None;
    }
    match dhcp(meta.family, payload, meta.payload_len) {
        Dhcp::Reply(xid) => {
            key.xid = xid;
            Some(key)
        }
        _ => None,
    }
}

/// Whether an expectation expiring at `expires_ns` still holds at `now`.
#[inline(always)]
pub fn is_live(expires_ns: u64, now: u64) -> bool {
    expires_ns > now
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::ipv4_mapped;
    use crate::wire::proto;

    fn udp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload_len: u32) -> PacketMeta {
        PacketMeta {
            family: FAMILY_IPV4,
            proto: proto::UDP,
            src: ipv4_mapped(src),
            dst: ipv4_mapped(dst),
            sport,
            dport,
            payload_len,
            ..PacketMeta::default()
        }
    }

    fn udp6(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16, payload_len: u32) -> PacketMeta {
        PacketMeta {
            family: FAMILY_IPV6,
            proto: proto::UDP,
            src,
            dst,
            sport,
            dport,
            payload_len,
            ..PacketMeta::default()
        }
    }

    fn bootp(op: u8, xid: u32) -> Option<[u8; PAYLOAD_BYTES]> {
        let x = xid.to_be_bytes();
        Some([op, 1, 6, 0, x[0], x[1], x[2], x[3]])
    }

    fn dhcp6_msg(kind: u8, xid: u32) -> Option<[u8; PAYLOAD_BYTES]> {
        let x = xid.to_be_bytes();
        Some([kind, x[1], x[2], x[3], 0, 1, 0, 14])
    }

    const ALL_DHCP6: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2];
    const CLIENT6: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
    const SERVER6: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20];

    #[test]
    fn group_destinations_are_broadcast_multicast_or_a_group_mac() {
        let to = |dst| udp4([198, 18, 0, 2], 1000, dst, 137, 50);
        assert!(is_group_destination(&to([255, 255, 255, 255]), 0x02));
        assert!(is_group_destination(&to([224, 0, 0, 251]), 0x01));
        assert!(is_group_destination(&to([239, 255, 255, 250]), 0x01));
        assert!(!is_group_destination(&to([198, 18, 0, 1]), 0x02));
        // A subnet-directed broadcast is only known by its link-layer destination.
        assert!(is_group_destination(&to([198, 18, 0, 255]), 0xff));
        assert!(!is_group_destination(&to([198, 18, 0, 255]), 0x02));
        let v6 = udp6(CLIENT6, 546, ALL_DHCP6, 547, 40);
        assert!(is_group_destination(&v6, 0x02));
        assert!(!is_group_destination(
            &udp6(CLIENT6, 546, SERVER6, 547, 40),
            0x02
        ));
    }

    #[test]
    fn only_dhcp_ports_need_the_payload() {
        assert!(needs_payload(&udp4([0; 4], 68, [255; 4], 67, 300)));
        assert!(needs_payload(&udp4([1; 4], 67, [255; 4], 68, 300)));
        assert!(!needs_payload(&udp4(
            [1; 4],
            5353,
            [224, 0, 0, 251],
            5353,
            30
        )));
        assert!(needs_payload(&udp6(CLIENT6, 546, ALL_DHCP6, 547, 40)));
        // Port 546 over IPv4 is not DHCP.
        assert!(!needs_payload(&udp4([1; 4], 546, [255; 4], 547, 40)));
    }

    #[test]
    fn a_discover_expects_the_offer_of_its_transaction_only() {
        let discover = udp4([0; 4], 68, [255; 4], 67, 300);
        let (key, expires) = request(&discover, 3, bootp(1, 0xdead_beef), 1_000).unwrap();
        assert_eq!(expires, 1_000 + DHCP_LIFETIME_NS);
        assert_eq!(
            (key.local_port, key.remote_port, key.xid),
            (68, 67, 0xdead_beef)
        );
        // OFFER broadcast, or unicast to the offered address: same key.
        for dst in [[255; 4], [198, 18, 0, 50]] {
            let offer = udp4([198, 18, 0, 1], 67, dst, 68, 300);
            assert_eq!(reply(&offer, 3, bootp(2, 0xdead_beef)), Some(key));
            assert_ne!(reply(&offer, 3, bootp(2, 0xdead_bef0)), Some(key));
            assert_ne!(reply(&offer, 4, bootp(2, 0xdead_beef)), Some(key));
            // A BOOTREQUEST from port 67 is not a reply.
            assert_eq!(reply(&offer, 3, bootp(1, 0xdead_beef)), None);
        }
    }

    #[test]
    fn dhcp_packets_that_are_not_client_requests_expect_nothing() {
        // A server's broadcast reply, or a relay's packet, sets nothing up.
        let offer = udp4([198, 18, 0, 1], 67, [255; 4], 68, 300);
        assert_eq!(request(&offer, 3, bootp(2, 7), 0), None);
        let relay = udp4([198, 18, 0, 1], 67, [255; 4], 67, 300);
        assert_eq!(request(&relay, 3, bootp(1, 7), 0), None);
        // A BOOTREPLY from the client port, a truncated message, no payload read.
        let from_client = udp4([0; 4], 68, [255; 4], 67, 300);
        assert_eq!(request(&from_client, 3, bootp(2, 7), 0), None);
        let short = udp4([0; 4], 68, [255; 4], 67, 100);
        assert_eq!(request(&short, 3, bootp(1, 7), 0), None);
        assert_eq!(request(&from_client, 3, None, 0), None);
        // Nor does a reply answer anything when short or unread.
        let short_offer = udp4([198, 18, 0, 1], 67, [255; 4], 68, 100);
        assert_eq!(reply(&short_offer, 3, bootp(2, 7)), None);
        assert_eq!(reply(&offer, 3, None), None);
        // A packet to port 68 from anything but 67 answers nothing.
        let stray = udp4([198, 18, 0, 1], 1067, [255; 4], 68, 300);
        assert_eq!(reply(&stray, 3, bootp(2, 7)), None);
    }

    #[test]
    fn dhcp6_requests_expect_advertise_and_reply_of_their_transaction() {
        for kind in [1, 3, 4, 5, 6, 8, 9, 11] {
            let ask = udp6(CLIENT6, 546, ALL_DHCP6, 547, 60);
            let (key, expires) = request(&ask, 5, dhcp6_msg(kind, 0x00ab_cdef), 10).unwrap();
            assert_eq!(expires, 10 + DHCP_LIFETIME_NS);
            assert_eq!(key.xid, 0x00ab_cdef);
            let answer = udp6(SERVER6, 547, CLIENT6, 546, 80);
            assert_eq!(reply(&answer, 5, dhcp6_msg(2, 0x00ab_cdef)), Some(key));
            assert_eq!(reply(&answer, 5, dhcp6_msg(7, 0x00ab_cdef)), Some(key));
            assert_ne!(reply(&answer, 5, dhcp6_msg(7, 0x00ab_cdee)), Some(key));
        }
        // ADVERTISE, REPLY, RECONFIGURE (10), relay messages (12, 13) from a client: none.
        for kind in [2, 7, 10, 12, 13] {
            let odd = udp6(CLIENT6, 546, ALL_DHCP6, 547, 60);
            assert_eq!(request(&odd, 5, dhcp6_msg(kind, 1), 0), None);
        }
        // A RECONFIGURE (server-initiated) answers nothing.
        let reconfigure = udp6(SERVER6, 547, CLIENT6, 546, 80);
        assert_eq!(reply(&reconfigure, 5, dhcp6_msg(10, 1)), None);
    }

    #[test]
    fn other_requests_expect_replies_to_their_port_for_a_short_while() {
        let query = udp4([198, 18, 0, 2], 5353, [224, 0, 0, 251], 5353, 30);
        let (key, expires) = request(&query, 2, None, 100).unwrap();
        assert_eq!(expires, 100 + GENERIC_LIFETIME_NS);
        assert_eq!(key.xid, 0);
        let multicast_answer = udp4([198, 18, 0, 9], 5353, [224, 0, 0, 251], 5353, 60);
        let unicast_answer = udp4([198, 18, 0, 9], 5353, [198, 18, 0, 2], 5353, 60);
        assert_eq!(reply(&multicast_answer, 2, None), Some(key));
        assert_eq!(reply(&unicast_answer, 2, None), Some(key));
        // SSDP: the reply comes back to the ephemeral source port from 1900.
        let search = udp4([198, 18, 0, 2], 40000, [239, 255, 255, 250], 1900, 90);
        let (key, _) = request(&search, 2, None, 0).unwrap();
        let answer = udp4([198, 18, 0, 7], 1900, [198, 18, 0, 2], 40000, 200);
        assert_eq!(reply(&answer, 2, None), Some(key));
        let other_port = udp4([198, 18, 0, 7], 1900, [198, 18, 0, 2], 40001, 200);
        assert_ne!(reply(&other_port, 2, None), Some(key));
    }

    #[test]
    fn families_never_share_keys() {
        let v4 = udp4([198, 18, 0, 2], 5353, [224, 0, 0, 251], 5353, 30);
        let v6 = udp6(CLIENT6, 5353, [0xff; 16], 5353, 30);
        assert_ne!(
            request(&v4, 2, None, 0).unwrap().0,
            request(&v6, 2, None, 0).unwrap().0
        );
    }

    #[test]
    fn an_expectation_holds_until_its_expiry() {
        assert!(is_live(10, 9));
        assert!(!is_live(10, 10));
        assert!(!is_live(10, 11));
    }
}
