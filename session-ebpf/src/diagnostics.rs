//! What the kernel side tells the operator through aya-log: an error for each packet
//! dropped unjudged (fail closed), and, at `[logging] kernel_level = "debug"`, a record for
//! each packet the engine could not parse. The loader fixes the level in `AYA_LOG_LEVEL`
//! before the verifier runs, which then prunes every disabled site: at the default level
//! (warn) the debug sites cost no instruction at run time.

use aya_ebpf::EbpfContext;
use aya_log_ebpf::{debug, error};
use session_common::{
    engine::Counters,
    wire::{Counter, Hook},
};

use crate::tables::BpfCounters;

/// The target of every kernel log record: the daemon's log shows it, and its default
/// filter lets all of them through, since `[logging] kernel_level` already chose them.
pub const LOG_TARGET: &str = "session_kernel";

/// Why a packet could not be judged: a missing settings or scratch entry, which cannot
/// happen once the loader has filled the maps. Such packets are dropped (fail closed),
/// counted and logged as errors.
pub enum Unjudged {
    /// The `SETTINGS` entry was missing.
    NoSettings,
    /// The per-CPU `SCRATCH` entry was missing.
    NoScratch,
}

impl Unjudged {
    /// Counts the packet in `drop_unjudged` and logs why it was dropped.
    #[inline(always)]
    pub fn report<C: EbpfContext>(self, ctx: &C, hook: Hook) {
        BpfCounters.count(Counter::DropUnjudged);
        match self {
            Unjudged::NoSettings => error!(
                ctx,
                target: LOG_TARGET,
                "{}: packet dropped unjudged: the SETTINGS map has no entry; restart `session run`",
                hook_name(hook)
            ),
            Unjudged::NoScratch => error!(
                ctx,
                target: LOG_TARGET,
                "{}: packet dropped unjudged: the SCRATCH map has no entry for this CPU; restart `session run`",
                hook_name(hook)
            ),
        }
    }
}

/// The engine's counters, which also log each packet the parser refused at debug level,
/// with the hook and interface it came by.
pub struct LoggedCounters<'a, C: EbpfContext> {
    /// The program's context (aya-log's first argument).
    pub ctx: &'a C,
    /// Where the packet is judged.
    pub hook: Hook,
    /// The interface it came by.
    pub ifindex: u32,
}

impl<C: EbpfContext> Counters for LoggedCounters<'_, C> {
    #[inline(always)]
    fn count(&mut self, counter: Counter) {
        BpfCounters.count(counter);
        match counter {
            Counter::InvalidMalformed => debug!(
                self.ctx,
                target: LOG_TARGET,
                "{} ifindex {}: malformed packet (headers truncated or inconsistent), invalid",
                hook_name(self.hook),
                self.ifindex
            ),
            Counter::InvalidFragment => debug!(
                self.ctx,
                target: LOG_TARGET,
                "{} ifindex {}: IP fragment after the first (no transport header to track), invalid",
                hook_name(self.hook),
                self.ifindex
            ),
            _ => {}
        }
    }

    #[inline(always)]
    fn hit(&mut self, slot: u32) {
        BpfCounters.hit(slot);
    }
}

/// The hook's name in log records.
#[inline(always)]
fn hook_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Ingress => "ingress",
        Hook::Egress => "egress",
    }
}
