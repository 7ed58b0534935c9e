//! SYN-flood defence for the host's own listening ports (`[syn_defence]`): a SYN to a
//! defended port that the policy admits is handed to the host's TCP stack without a
//! session, and the connection gets its session only once the host's stack holds it as
//! established, that is once the client has answered the host's SYN-ACK. The host's own
//! SYN queue and SYN cookies (`net.ipv4.tcp_syncookies`) answer the flood; spoofed SYNs
//! never get as far as a session, so a flood of them costs the table nothing.
//!
//! Between the SYN and the session, the packets of the handshake pass without a session
//! on what the host's stack knows of them ([`Socket`]): the host's SYN-ACK (its own
//! answer), and the client's ACK when the stack holds a request for it or its SYN cookie
//! is valid; both are ESTABLISHED to the policy, as conntrack sees them. Anything else
//! without a session stays INVALID. A port is defended always, or only while it receives
//! more SYNs a second than `above` ([`DefendedPort`]); below that, SYNs get sessions as
//! on any other port.

use bytemuck::{Pod, Zeroable};

use crate::wire::NS_PER_SEC;

/// Ports `[syn_defence]` may list.
pub const MAX_DEFENDED_PORTS: u32 = 1024;

/// A defended port: the value under its number in `SYN_DEFENCE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DefendedPort {
    /// SYNs a second above which the defence engages; 0 for always.
    pub above: u32,
    /// SYNs counted in `second`.
    pub count: u32,
    /// The second (of the programs' clock) `count` counts.
    pub second: u64,
}
const _: () = assert!(core::mem::size_of::<DefendedPort>() == 16);

impl DefendedPort {
    /// A port defended above `above` SYNs a second (0: always).
    pub fn new(above: u32) -> DefendedPort {
        DefendedPort {
            above,
            ..DefendedPort::default()
        }
    }

    /// Counts a SYN at `now` and says whether the defence is engaged for it: always,
    /// or when this second's SYNs, this one included, are more than `above`. The count
    /// is shared by the CPUs without atomics, so under load it may run a few SYNs short;
    /// the rate it engages at is approximate.
    #[inline(always)]
    pub fn engaged(&mut self, now: u64) -> bool {
        let second = now / NS_PER_SEC;
        if self.second != second {
            self.second = second;
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.above == 0 || self.count > self.above
    }
}

/// What the host's TCP stack holds for the connection a packet belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Socket {
    /// Nothing: no listener, no connection (or one that is closing).
    Unknown,
    /// A listening socket, and no handshake of this connection in progress.
    Listening,
    /// A handshake in progress: the stack holds a request for the connection, or the
    /// packet is an ACK whose SYN cookie the stack would accept.
    Handshake,
    /// An established connection (or one past establishment, not yet closed).
    Established,
}

impl Socket {
    /// The state of a socket the kernel found (`bpf_sock::state`, the kernel's TCP
    /// states), with whether a listener's SYN cookie check accepted the packet.
    #[inline(always)]
    pub fn of_state(state: u32, cookie_valid: bool) -> Socket {
        match state {
            tcp_state::LISTEN if cookie_valid => Socket::Handshake,
            tcp_state::LISTEN => Socket::Listening,
            tcp_state::NEW_SYN_RECV | tcp_state::SYN_RECV => Socket::Handshake,
            tcp_state::ESTABLISHED
            | tcp_state::FIN_WAIT1
            | tcp_state::FIN_WAIT2
            | tcp_state::CLOSE_WAIT
            | tcp_state::LAST_ACK
            | tcp_state::CLOSING => Socket::Established,
            _ => Socket::Unknown,
        }
    }
}

/// The kernel's TCP socket states (`include/net/tcp_states.h`).
pub mod tcp_state {
    /// Connected.
    pub const ESTABLISHED: u32 = 1;
    /// A full socket waiting for the final ACK (fast open).
    pub const SYN_RECV: u32 = 3;
    /// Sent FIN.
    pub const FIN_WAIT1: u32 = 4;
    /// Peer acknowledged our FIN.
    pub const FIN_WAIT2: u32 = 5;
    /// Peer sent FIN.
    pub const CLOSE_WAIT: u32 = 8;
    /// Both sent FIN, waiting for the last ACK.
    pub const LAST_ACK: u32 = 9;
    /// A listening socket.
    pub const LISTEN: u32 = 10;
    /// Both sent FIN at once.
    pub const CLOSING: u32 = 11;
    /// A request socket: the host answered a SYN and waits for the ACK.
    pub const NEW_SYN_RECV: u32 = 12;
}

/// What the defence does with a TCP packet without a session, given what the host's
/// stack holds for its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not the defence's: the packet is tracked as on any port.
    Track,
    /// Part of a handshake the host's stack is doing: passes as ESTABLISHED without a
    /// session.
    Handshake,
    /// The first packet after the handshake: the connection gets its session now,
    /// picked up established.
    PickUp,
}

/// The defence's verdict for a TCP packet without a session on a defended port: a SYN
/// (`syn`, without ACK) arriving (`inbound`) that the stack listens for is handed over;
/// the host's own SYN-ACK passes; the client's later packets pass while the handshake is
/// in progress and pick the connection up once it is established. The host's own later
/// packets pass on an established connection without picking it up, so that the session
/// is always the client's, as the SYN would have made it (a server that speaks first
/// gets its session at the client's first answer). A SYN leaving the host is its own
/// connection attempt: tracked.
#[inline(always)]
pub fn verdict(inbound: bool, syn: bool, syn_ack: bool, socket: Socket) -> Verdict {
    match (inbound, syn, syn_ack, socket) {
        (true, true, _, Socket::Listening) => Verdict::Handshake,
        (false, false, true, Socket::Handshake | Socket::Listening) => Verdict::Handshake,
        (true, false, false, Socket::Handshake) => Verdict::Handshake,
        (true, false, false, Socket::Established) => Verdict::PickUp,
        (false, false, false, Socket::Handshake | Socket::Established) => Verdict::Handshake,
        _ => Verdict::Track,
    }
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::DefendedPort;

    // SAFETY: `DefendedPort` derives `bytemuck::Pod`: any bytes are a valid value.
    unsafe impl aya::Pod for DefendedPort {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = NS_PER_SEC;

    #[test]
    fn an_always_defended_port_is_always_engaged() {
        let mut port = DefendedPort::new(0);
        assert!((0..5).all(|i| port.engaged(10 * S + i)));
    }

    #[test]
    fn a_port_engages_above_its_rate_and_disengages_the_next_quiet_second() {
        let mut port = DefendedPort::new(3);
        let engaged: [bool; 5] = core::array::from_fn(|i| port.engaged(7 * S + i as u64));
        assert_eq!(engaged, [false, false, false, true, true]);
        assert!(!port.engaged(8 * S), "a new second counts from zero");
        assert_eq!(port.count, 1);
    }

    #[test]
    fn socket_states_map_to_what_the_defence_needs() {
        assert_eq!(
            Socket::of_state(tcp_state::LISTEN, false),
            Socket::Listening
        );
        assert_eq!(Socket::of_state(tcp_state::LISTEN, true), Socket::Handshake);
        assert_eq!(
            Socket::of_state(tcp_state::NEW_SYN_RECV, false),
            Socket::Handshake
        );
        for state in [1, 4, 5, 8, 9, 11] {
            assert_eq!(
                Socket::of_state(state, false),
                Socket::Established,
                "{state}"
            );
        }
        // TIME_WAIT (6), CLOSE (7), SYN_SENT (2): nothing to pass a packet on.
        for state in [2, 6, 7, 0, 99] {
            assert_eq!(Socket::of_state(state, false), Socket::Unknown, "{state}");
        }
    }

    #[test]
    fn only_what_the_host_stack_vouches_for_passes_without_a_session() {
        use Socket::*;
        // A SYN arriving for a listener is handed over; without one it is tracked.
        assert_eq!(verdict(true, true, false, Listening), Verdict::Handshake);
        assert_eq!(verdict(true, true, false, Unknown), Verdict::Track);
        // The host's SYN-ACK passes.
        assert_eq!(verdict(false, false, true, Handshake), Verdict::Handshake);
        assert_eq!(verdict(false, false, true, Listening), Verdict::Handshake);
        // The client's ACK passes on a request or a valid cookie, and not on a bare
        // listener (a spoofed ACK) or nothing.
        assert_eq!(verdict(true, false, false, Handshake), Verdict::Handshake);
        assert_eq!(verdict(true, false, false, Listening), Verdict::Track);
        assert_eq!(verdict(true, false, false, Unknown), Verdict::Track);
        // After the handshake, the client's packet picks the connection up; the host's
        // passes until then.
        assert_eq!(verdict(true, false, false, Established), Verdict::PickUp);
        assert_eq!(
            verdict(false, false, false, Established),
            Verdict::Handshake
        );
        // The host's own SYN is its own connection.
        assert_eq!(verdict(false, true, false, Listening), Verdict::Track);
        // A SYN-ACK arriving is never the defence's.
        assert_eq!(verdict(true, false, true, Handshake), Verdict::Track);
    }
}
