//! What the host's TCP stack holds, for the SYN-flood defence
//! (`session_common::syn_defence`): the defended ports in a map, and the stack's socket
//! for a connection found with `bpf_skc_lookup_tcp` (and a listener's SYN cookie checked
//! with `bpf_tcp_check_syncookie`), in global functions that the verifier checks once.

use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock_tuple, tcphdr, xdp_md},
    helpers::generated::{bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie},
    macros::map,
    programs::{TcContext, XdpContext},
};
use session_common::{
    engine::Sockets,
    packet::{PacketMeta, tcp_flags},
    syn_defence::{DefendedPort, MAX_DEFENDED_PORTS, Socket},
    wire::FAMILY_IPV4,
};

use aya_ebpf::maps::HashMap;

/// The ports `[syn_defence]` defends, by number.
#[map]
static SYN_DEFENCE: HashMap<u16, DefendedPort> = HashMap::pinned(MAX_DEFENDED_PORTS, 0);

/// `BPF_F_CURRENT_NETNS`: look the socket up in the packet's own network namespace.
const CURRENT_NETNS: u64 = u64::MAX;

/// [`Socket`] as a global function's scalar answer.
const UNKNOWN: i32 = 0;
const LISTENING: i32 = 1;
const HANDSHAKE: i32 = 2;
const ESTABLISHED: i32 = 3;

/// The defended port `port`, if any.
#[inline(always)]
fn defended_port(port: u16) -> Option<&'static mut DefendedPort> {
    // SAFETY: the entry lives while the program holds the RCU read lock; another CPU may
    // count in it at once, which costs a count, never memory safety.
    SYN_DEFENCE
        .get_ptr_mut(port)
        .map(|port| unsafe { &mut *port })
}

#[inline(always)]
fn decode(code: i32) -> Socket {
    match code {
        LISTENING => Socket::Listening,
        HANDSHAKE => Socket::Handshake,
        ESTABLISHED => Socket::Established,
        _ => Socket::Unknown,
    }
}

/// The XDP program's view of the host's stack.
pub struct XdpSockets<'a>(pub &'a XdpContext);

impl Sockets for XdpSockets<'_> {
    #[inline(always)]
    fn defended(&mut self, port: u16) -> Option<&mut DefendedPort> {
        defended_port(port)
    }

    #[inline(always)]
    fn socket(&mut self, meta: &PacketMeta, inbound: bool) -> Socket {
        decode(session_socket_xdp(self.0.ctx, meta, u32::from(inbound)))
    }
}

/// The TC programs' view of the host's stack.
pub struct SkbSockets<'a>(pub &'a TcContext);

impl Sockets for SkbSockets<'_> {
    #[inline(always)]
    fn defended(&mut self, port: u16) -> Option<&mut DefendedPort> {
        defended_port(port)
    }

    #[inline(always)]
    fn socket(&mut self, meta: &PacketMeta, inbound: bool) -> Socket {
        decode(session_socket_skb(self.0.skb.skb, meta, u32::from(inbound)))
    }
}

/// [`socket`] for an XDP frame, as a global function.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn session_socket_xdp(
    ctx: *mut xdp_md,
    meta: *const PacketMeta,
    inbound: u32,
) -> i32 {
    socket(ctx as *mut c_void, meta, inbound)
}

/// [`socket`] for a socket buffer, as a global function.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn session_socket_skb(
    skb: *mut __sk_buff,
    meta: *const PacketMeta,
    inbound: u32,
) -> i32 {
    socket(skb as *mut c_void, meta, inbound)
}

/// Asks the stack of the packet's namespace for the socket of its connection, seen as
/// the stack sees an arriving packet (remote end as source), and answers its [`Socket`]
/// code; a listener's answer for an arriving ACK says whether the ACK's SYN cookie is
/// valid.
#[inline(always)]
fn socket(ctx: *mut c_void, meta: *const PacketMeta, inbound: u32) -> i32 {
    // SAFETY: the caller passes its packet metadata; the verifier only knows it may be null.
    let Some(meta) = (unsafe { meta.as_ref() }) else {
        return UNKNOWN;
    };
    let inbound = inbound != 0;
    let (remote, local, remote_port, local_port) = if inbound {
        (&meta.src, &meta.dst, meta.sport, meta.dport)
    } else {
        (&meta.dst, &meta.src, meta.dport, meta.sport)
    };
    // Uninitialised, then written in full for the family's part the helper reads: a
    // zeroed tuple would cost a call to `memset`, whose frame the verifier adds to the
    // program's stack.
    let mut tuple = MaybeUninit::<bpf_sock_tuple>::uninit();
    let v4 = meta.family == FAMILY_IPV4;
    let size = if v4 {
        // SAFETY: writing the IPv4 member's every field.
        unsafe {
            let ipv4 = &raw mut (*tuple.as_mut_ptr()).__bindgen_anon_1.ipv4;
            (*ipv4).saddr = u32::from_ne_bytes([remote[12], remote[13], remote[14], remote[15]]);
            (*ipv4).daddr = u32::from_ne_bytes([local[12], local[13], local[14], local[15]]);
            (*ipv4).sport = remote_port.to_be();
            (*ipv4).dport = local_port.to_be();
        }
        size_of::<u32>() as u32 * 3
    } else {
        // SAFETY: writing the IPv6 member's every field, which span the whole tuple.
        unsafe {
            let ipv6 = &raw mut (*tuple.as_mut_ptr()).__bindgen_anon_1.ipv6;
            (*ipv6).saddr = words(remote);
            (*ipv6).daddr = words(local);
            (*ipv6).sport = remote_port.to_be();
            (*ipv6).dport = local_port.to_be();
        }
        size_of::<bpf_sock_tuple>() as u32
    };
    // SAFETY: `ctx` is the program's context, `tuple` a filled tuple of `size` bytes; a
    // socket found is released below on every path.
    let sk = unsafe { bpf_skc_lookup_tcp(ctx, tuple.as_mut_ptr(), size, CURRENT_NETNS, 0) };
    if sk.is_null() {
        return UNKNOWN;
    }
    // SAFETY: a socket the helper returned, readable until released.
    let state = unsafe { (*sk).state };
    let ack = meta.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST) == tcp_flags::ACK;
    let cookie_valid = inbound
        && ack
        && state == session_common::syn_defence::tcp_state::LISTEN
        && cookie_valid(sk as *mut c_void, meta, v4);
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(sk as *mut c_void) };
    match Socket::of_state(state, cookie_valid) {
        Socket::Unknown => UNKNOWN,
        Socket::Listening => LISTENING,
        Socket::Handshake => HANDSHAKE,
        Socket::Established => ESTABLISHED,
    }
}

/// Bytes of the headers the SYN cookie check reads, rebuilt from the parsed packet: an
/// IP header (IPv4 in the first 20 bytes, or IPv6) then a TCP header without options at
/// [`TCP_AT`]. The helper reads their fixed fields only (addresses, ports, sequence
/// numbers, flags); built here they need no bounds the verifier must track in the frame.
const HEADER_WORDS: usize = 8;
/// Where the TCP header starts in the rebuilt headers.
const TCP_AT: usize = 40;

/// Whether the listener `sk` would accept the ACK of `meta` as the answer to one of its
/// SYN cookies (`bpf_tcp_check_syncookie`).
#[inline(always)]
fn cookie_valid(sk: *mut c_void, meta: &PacketMeta, v4: bool) -> bool {
    let mut words = MaybeUninit::<[u64; HEADER_WORDS]>::uninit();
    let base = words.as_mut_ptr().cast::<u64>();
    let mut i = 0;
    while i < HEADER_WORDS {
        // SAFETY: word `i` lies in `words`. One volatile store a word: plain zero
        // stores would be merged into a call to `memset`, whose frame the verifier adds
        // to the program's stack.
        unsafe { base.add(i).write_volatile(0) };
        i += 1;
    }
    // SAFETY: every word was zeroed above, so all 64 bytes are initialised.
    let bytes = unsafe { &mut *words.as_mut_ptr().cast::<[u8; HEADER_WORDS * 8]>() };
    put(bytes, TCP_AT, &meta.sport.to_be_bytes());
    put(bytes, TCP_AT + 2, &meta.dport.to_be_bytes());
    put(bytes, TCP_AT + 4, &meta.seq.to_be_bytes());
    put(bytes, TCP_AT + 8, &meta.ack.to_be_bytes());
    bytes[TCP_AT + 12] = 5 << 4;
    bytes[TCP_AT + 13] = meta.tcp_flags;
    let ip_len = if v4 {
        bytes[0] = 0x45;
        put(
            bytes,
            12,
            &[meta.src[12], meta.src[13], meta.src[14], meta.src[15]],
        );
        put(
            bytes,
            16,
            &[meta.dst[12], meta.dst[13], meta.dst[14], meta.dst[15]],
        );
        20
    } else {
        bytes[0] = 0x60;
        put(bytes, 8, &meta.src);
        put(bytes, 24, &meta.dst);
        40
    };
    // SAFETY: `sk` is a held listener; the headers are initialised stack memory of the
    // lengths given.
    unsafe {
        bpf_tcp_check_syncookie(
            sk,
            bytes.as_mut_ptr() as *mut c_void,
            ip_len,
            bytes.as_mut_ptr().add(TCP_AT) as *mut tcphdr,
            20,
        ) == 0
    }
}

/// Writes `value` into `out` at `at`, a byte at a time: a slice copy becomes a call to
/// `memcpy`.
#[inline(always)]
fn put<const N: usize>(out: &mut [u8; HEADER_WORDS * 8], at: usize, value: &[u8; N]) {
    let mut i = 0;
    while i < N {
        if let Some(byte) = out.get_mut(at + i) {
            *byte = value[i];
        }
        i += 1;
    }
}

/// An address as the four big-endian words of a socket tuple.
#[inline(always)]
fn words(addr: &[u8; 16]) -> [u32; 4] {
    let word = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    [word(0), word(4), word(8), word(12)]
}
