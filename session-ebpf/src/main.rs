//! Kernel side of `session`: XDP (or TC, where the config asks) on ingress and TC on
//! egress. Each program only wires packet bytes and BPF maps into
//! `session_common::engine::process` and maps its answer to a verdict; all logic lives in
//! session-common.
#![no_std]
#![no_main]

mod diagnostics;
mod forward;
mod limits;
mod sockets;
mod tables;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use session_common::{
    engine::{Counters, process},
    forward::may_fast_forward,
    wire::{Action, Counter, Hook, Settings, settings_flags},
};

use crate::{
    diagnostics::{LoggedCounters, Unjudged},
    forward::fast_forward,
    limits::BpfLimits,
    sockets::{SkbSockets, XdpSockets},
    tables::{
        BpfCounters, BpfExpectations, BpfFragments, BpfRules, BpfSessions, SkbBytes, XdpBytes,
        is_managed, report, scratch, settings,
    },
};

/// CLOCK_MONOTONIC at the last timer tick: at most one tick behind the daemon's clock,
/// which timeouts of seconds do not notice. Read from the tick counter through the
/// daemon's calibration (`session_common::clock`), one inlined load; before calibration,
/// from the coarse clock helper, a call that cost 18–27 ns a packet where measured.
#[inline(always)]
fn now(settings: &Settings) -> u64 {
    // SAFETY: a helper without arguments.
    match settings.clock.now_ns(unsafe { bpf_jiffies64() }) {
        Some(ns) => ns,
        // SAFETY: a helper without arguments.
        None => unsafe { bpf_ktime_get_coarse_ns() },
    }
}

/// What ingress does with a packet: what the policy decided, or, for a packet the fast
/// path forwarded, the redirect's XDP action.
enum Ingress {
    Judged(Action),
    Forwarded(u32),
}

/// The XDP entry point. `inline(always)` reaches the function the `xdp` macro wraps: left
/// out of line, its frame adds a 32-byte call level to the stack the verifier sums over
/// the deepest call chain, which took the program past 512 bytes on Linux 6.1.
#[xdp]
#[inline(always)]
pub fn session_ingress(ctx: XdpContext) -> u32 {
    match try_ingress(&ctx) {
        Ok(Ingress::Judged(Action::Accept)) => xdp_action::XDP_PASS,
        Ok(Ingress::Forwarded(redirect)) => redirect,
        Ok(Ingress::Judged(Action::Drop)) => xdp_action::XDP_DROP,
        Err(unjudged) => {
            unjudged.report(&ctx, Hook::Ingress);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn try_ingress(ctx: &XdpContext) -> Result<Ingress, Unjudged> {
    let settings = settings().ok_or(Unjudged::NoSettings)?;
    let scratch = scratch().ok_or(Unjudged::NoScratch)?;
    let now = now(settings);
    let ifindex = ctx.ingress_ifindex() as u32;
    let outcome = process(
        &XdpBytes(ctx),
        Hook::Ingress,
        ifindex,
        now,
        settings,
        &mut BpfSessions,
        &mut BpfFragments,
        &BpfRules,
        &mut LoggedCounters {
            ctx,
            hook: Hook::Ingress,
            ifindex,
        },
        &mut BpfExpectations,
        &mut BpfLimits,
        &mut XdpSockets(ctx),
        scratch,
    );
    let Some(outcome) = outcome else {
        return Ok(Ingress::Judged(Action::Accept));
    };
    report(
        &scratch.meta,
        &outcome,
        Hook::Ingress,
        ifindex,
        now,
        settings,
    );
    if settings.flags & settings_flags::FAST_PATH != 0
        && may_fast_forward(&outcome, scratch.meta.proto)
        && let Some(redirect) = fast_forward(ctx, ifindex, &scratch.meta)
    {
        BpfCounters.count(Counter::FastPathForwarded);
        return Ok(Ingress::Forwarded(redirect));
    }
    Ok(Ingress::Judged(outcome.decision.action))
}

/// Ingress through TC instead of XDP, for the interfaces the config lists under
/// `[attach] tc_ingress`: on a veth fed by local sockets (a container's host side), veth
/// copies every socket buffer into a page before XDP may see it, a cost TC does not pay.
/// The same judgement as `session_ingress`, without the fast path, which is XDP's.
#[classifier]
pub fn session_ingress_tc(ctx: TcContext) -> i32 {
    // SAFETY: the kernel passes the program a valid `__sk_buff`, readable while it runs.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    tc_verdict(&ctx, Hook::Ingress, judge_skb(&ctx, Hook::Ingress, ifindex))
}

#[classifier]
pub fn session_egress(ctx: TcContext) -> i32 {
    tc_verdict(&ctx, Hook::Egress, try_egress(&ctx))
}

/// The TC verdict for a judgement on `hook`; the error verdict of both TC programs.
#[inline(always)]
fn tc_verdict(ctx: &TcContext, hook: Hook, judged: Result<Action, Unjudged>) -> i32 {
    match judged {
        Ok(Action::Accept) => TC_ACT_OK,
        Ok(Action::Drop) => TC_ACT_SHOT,
        Err(unjudged) => {
            unjudged.report(ctx, hook);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn try_egress(ctx: &TcContext) -> Result<Action, Unjudged> {
    let skb = ctx.skb.skb;
    // SAFETY: the kernel passes the program a valid `__sk_buff`, readable while it runs.
    let (ingress_ifindex, ifindex) = unsafe { ((*skb).ingress_ifindex, (*skb).ifindex) };
    if ingress_ifindex != 0 && is_managed(ingress_ifindex) {
        return Ok(Action::Accept);
    }
    judge_skb(ctx, Hook::Egress, ifindex)
}

/// What the policy decides for a socket buffer on `hook` of `ifindex`.
#[inline(always)]
fn judge_skb(ctx: &TcContext, hook: Hook, ifindex: u32) -> Result<Action, Unjudged> {
    let settings = settings().ok_or(Unjudged::NoSettings)?;
    let scratch = scratch().ok_or(Unjudged::NoScratch)?;
    let now = now(settings);
    let outcome = process(
        &SkbBytes(ctx),
        hook,
        ifindex,
        now,
        settings,
        &mut BpfSessions,
        &mut BpfFragments,
        &BpfRules,
        &mut LoggedCounters { ctx, hook, ifindex },
        &mut BpfExpectations,
        &mut BpfLimits,
        &mut SkbSockets(ctx),
        scratch,
    );
    Ok(outcome.map_or(Action::Accept, |outcome| {
        report(&scratch.meta, &outcome, hook, ifindex, now, settings);
        outcome.decision.action
    }))
}

/// What the daemon calibrates the clock from: run by `BPF_PROG_TEST_RUN`, it writes the
/// tick counter and then CLOCK_MONOTONIC (ns) over the first 16 bytes of the frame, which
/// the run hands back.
#[xdp]
pub fn session_clock(ctx: XdpContext) -> u32 {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    if data + 16 > data_end {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: helpers without arguments; the 16 bytes at `data` lie in the frame.
    unsafe {
        let reading = [bpf_jiffies64(), bpf_ktime_get_ns()];
        (data as *mut [u64; 2]).write_unaligned(reading);
    }
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
