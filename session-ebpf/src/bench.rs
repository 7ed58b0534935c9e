//! The benchmarks' own programs, in an object of their own (`session-bench`) so that the
//! daemon neither embeds nor loads them: baselines to measure `session_ingress` against,
//! the wire between the end-to-end benchmark's veth pairs, and the load generator that
//! feeds it. Only test support loads this object (session-tests' `bench_object`, and the
//! kernel-path benchmark).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, DevMapHash, PerCpuArray},
    programs::XdpContext,
};
use session_common::wire::{BENCH_FRAME_PREFIX, BenchCursor, BenchFrame};

/// The generator's frames; one entry unless a benchmark sizes it at load time.
#[map]
static BENCH_FRAMES: Array<BenchFrame> = Array::with_max_entries(1, 0);
/// The generator's place in `BENCH_FRAMES`, per CPU.
#[map]
static BENCH_CURSOR: PerCpuArray<BenchCursor> = PerCpuArray::with_max_entries(1, 0);

/// The benchmark wire's two ports, each keyed by its own interface index and holding the
/// other's: a frame that enters one leaves by the other.
#[map]
static BENCH_WIRE: DevMapHash = DevMapHash::with_max_entries(2, 0);

/// Does nothing: the baseline the benchmark measures `session_ingress` against.
#[xdp]
pub fn session_noop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Drops every frame: the end-to-end benchmark's floor for a flood the policy drops,
/// what dropping in XDP costs on a path at the least.
#[xdp]
pub fn session_drop_all(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// The end-to-end benchmark's cable between two veth pairs: passes every frame from one
/// wire port to the other by `XDP_REDIRECT`, so the next veth receives it as an XDP frame,
/// as from a NIC, even when a local socket sent it.
#[xdp]
pub fn session_bench_wire(ctx: XdpContext) -> u32 {
    BENCH_WIRE
        .redirect(ctx.ingress_ifindex() as u32, 0)
        .unwrap_or(xdp_action::XDP_DROP)
}

/// The end-to-end load generator, run by `BPF_PROG_TEST_RUN` in live-frame mode: each
/// run writes the next frame of `BENCH_FRAMES` over the template and transmits it on the
/// test run's interface. A veth peer then receives it as an XDP frame in a page of its
/// own, as from a NIC, rather than as a socket's buffer it would have to copy first.
#[xdp]
pub fn session_bench_send(ctx: XdpContext) -> u32 {
    match try_bench_send(&ctx) {
        Some(()) => xdp_action::XDP_TX,
        None => xdp_action::XDP_ABORTED,
    }
}

#[inline(always)]
fn try_bench_send(ctx: &XdpContext) -> Option<()> {
    // SAFETY: this CPU's entry of a per-CPU map, valid while the program runs and
    // referenced nowhere else.
    let cursor = unsafe { &mut *BENCH_CURSOR.get_ptr_mut(0)? };
    let index = if cursor.next < cursor.frames {
        cursor.next
    } else {
        0
    };
    cursor.next = index + 1;
    let frame = BENCH_FRAMES.get(index)?;
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + BENCH_FRAME_PREFIX > end {
        return None;
    }
    // SAFETY: the check above keeps all BENCH_FRAME_PREFIX bytes inside the frame.
    unsafe {
        core::ptr::copy_nonoverlapping(frame.as_ptr(), start as *mut u8, BENCH_FRAME_PREFIX);
    }
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
