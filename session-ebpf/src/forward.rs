//! The fast path's kernel half (`session_common::forward` has the rest): the FIB lookup
//! that says where the kernel would forward a packet, and the redirect out of there.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::generated::bpf_fib_lookup as fib_lookup,
    macros::map,
    maps::DevMapHash,
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use session_common::{
    forward::{ipv4_hop, ipv6_hop},
    packet::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, PacketMeta},
};

use crate::{diagnostics::LOG_TARGET, tables::MAX_MANAGED_IFACES};

/// The interfaces the fast path forwards out of, by index: the daemon adds each interface
/// it manages that can transmit frames redirected by XDP (`xdp-features`), so a packet
/// leaves only by one of those.
#[map]
static FAST_PATH_PORTS: DevMapHash = DevMapHash::pinned(MAX_MANAGED_IFACES, 0);

/// Address families as the FIB lookup takes them (`AF_INET`, `AF_INET6`).
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// The first byte of an IPv4 header without options (version 4, 5 words): options
/// (record route, timestamps) are for the kernel to process, as nftables' flowtables
/// leave them to it too.
const IPV4_NO_OPTIONS: u8 = 0x45;
/// The traffic class and flow label of an IPv6 header's first word (`IPV6_FLOWINFO_MASK`).
const IPV6_FLOWINFO_MASK: u32 = 0x0fff_ffff;

/// Forwards the packet the way the kernel would, if it would send it out of another
/// managed interface: takes a hop off its IP header, rewrites its Ethernet addresses and
/// returns the redirect's XDP action. `None`, with the packet unchanged, leaves it to the
/// kernel: for a local address, no route, forwarding off, a neighbour not yet resolved,
/// a packet over the egress MTU, a TTL about to run out, IPv4 options, a VLAN tag, an
/// egress interface that is not one of the ports, or `ingress`, the one the packet came
/// in by (the kernel sends ICMP redirects).
#[inline(always)]
pub fn fast_forward(ctx: &XdpContext, ingress: u32, meta: &PacketMeta) -> Option<u32> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let ip = data + ETH_HLEN;
    if ip + 20 > end {
        return None;
    }
    // SAFETY: the check above keeps the Ethernet header, and an IPv4 header's fixed
    // part, inside the frame.
    let ethertype = u16::from_be_bytes(unsafe { *((data + 12) as *const [u8; 2]) });
    // SAFETY: all zero bytes are a valid `bpf_fib_lookup` (integers and unions of them).
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.l4_protocol = meta.proto;
    fib.sport = meta.sport.to_be();
    fib.dport = meta.dport.to_be();
    fib.__bindgen_anon_1.tot_len = meta.ip_len as u16;
    fib.ifindex = ingress;
    let v4 = match ethertype {
        ETH_P_IP => {
            // SAFETY: an IPv4 header's fixed part lies in the frame (checked above).
            if unsafe { *(ip as *const u8) } != IPV4_NO_OPTIONS {
                return None;
            }
            fib.family = AF_INET;
            // SAFETY: an IPv4 header's fixed part lies in the frame (checked above);
            // the addresses are the parsed packet's, IPv4-mapped.
            unsafe {
                fib.__bindgen_anon_2.tos = *((ip + 1) as *const u8);
                fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(tail4(&meta.src));
                fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(tail4(&meta.dst));
            }
            true
        }
        ETH_P_IPV6 => {
            if ip + 40 > end {
                return None;
            }
            fib.family = AF_INET6;
            // SAFETY: the IPv6 header lies in the frame (checked just above).
            let first = u32::from_be_bytes(unsafe { *(ip as *const [u8; 4]) });
            fib.__bindgen_anon_2.flowinfo = (first & IPV6_FLOWINFO_MASK).to_be();
            fib.__bindgen_anon_3.ipv6_src = words(&meta.src);
            fib.__bindgen_anon_4.ipv6_dst = words(&meta.dst);
            false
        }
        _ => return None,
    };
    // SAFETY: `fib` is a whole `bpf_fib_lookup` on the stack and `ctx.ctx` the program's
    // own context.
    let found = unsafe {
        fib_lookup(
            ctx.ctx as *mut c_void,
            &mut fib,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if found != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        debug!(
            ctx,
            target: LOG_TARGET,
            "fast path: FIB lookup for a packet from ifindex {} returned {} (BPF_FIB_LKUP_RET_*: 1 blackhole, 2 unreachable, 3 prohibit, 4 not forwarded (local), 5 forwarding off, 7 no neighbour yet, 8 fragmentation needed); left to the kernel",
            ingress,
            found
        );
        return None;
    }
    if fib.ifindex == ingress {
        return None;
    }
    // Fails unless the egress interface is one of the ports, and changes nothing: the
    // redirect it sets up happens only if the program returns its action, so a packet
    // left to the kernel below goes on unredirected.
    let Ok(redirect) = FAST_PATH_PORTS.redirect(fib.ifindex, 0) else {
        debug!(
            ctx,
            target: LOG_TARGET,
            "fast path: egress ifindex {} is not a fast-path port (not managed, or it cannot transmit redirected frames); left to the kernel",
            fib.ifindex
        );
        return None;
    };
    // SAFETY: the headers written lie in the frame: IPv4's first 12 bytes by the first
    // check, IPv6's first 8 by its own.
    let hopped = unsafe {
        if v4 {
            ipv4_hop(&mut *(ip as *mut [u8; 12]))
        } else {
            ipv6_hop(&mut *(ip as *mut [u8; 8]))
        }
    };
    if !hopped {
        return None;
    }
    // SAFETY: the Ethernet header lies in the frame.
    unsafe {
        *(data as *mut [u8; 6]) = fib.dmac;
        *((data + 6) as *mut [u8; 6]) = fib.smac;
    }
    Some(redirect)
}

/// The IPv4 address in an IPv4-mapped address.
#[inline(always)]
fn tail4(mapped: &[u8; 16]) -> [u8; 4] {
    [mapped[12], mapped[13], mapped[14], mapped[15]]
}

/// An IPv6 address as the FIB lookup's four words, in network byte order.
#[inline(always)]
fn words(addr: &[u8; 16]) -> [u32; 4] {
    let word = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    [word(0), word(4), word(8), word(12)]
}
