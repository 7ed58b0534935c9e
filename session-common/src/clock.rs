//! The kernel programs' clock: the kernel's tick counter (`jiffies`) turned into
//! CLOCK_MONOTONIC nanoseconds. Reading the counter is one load, which the verifier
//! inlines, where the clock helpers are a call into the timekeeping code: 27 ns of a
//! dropped SYN's 117 and 19 of an established packet's on the machine of BENCHMARKS.md. The daemon calibrates the
//! conversion once at start from tick edges it observes; the kernel advances the counter
//! from the monotonic clock in steps of exactly one tick, so the two never drift apart.

use bytemuck::{Pod, Zeroable};

use crate::wire::NS_PER_SEC;

/// How many nanoseconds a tick lasts and where tick 0 lies on CLOCK_MONOTONIC; all zero
/// when not calibrated, and then the programs read the coarse clock helper instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TickClock {
    /// The kernel's `TICK_NSEC`: nanoseconds per tick, `round(10^9 / HZ)`.
    pub tick_ns: u64,
    /// CLOCK_MONOTONIC at tick 0, modulo 2^64 (the counter starts far from 0).
    pub offset_ns: u64,
}
const _: () = assert!(core::mem::size_of::<TickClock>() == 16);

/// One moment the tick counter was seen to change: its new value and CLOCK_MONOTONIC read
/// right after it, in the same program run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TickEdge {
    /// The counter's new value.
    pub jiffies: u64,
    /// CLOCK_MONOTONIC (ns) when it was read.
    pub mono_ns: u64,
}

/// Fewest ticks between two calibration edges: enough that an edge seen a few
/// microseconds late cannot pass for another tick rate.
pub const MIN_CALIBRATION_TICKS: u64 = 4;

/// The tick rates the kernel can be built with (`kernel/Kconfig.hz`). A measurement is
/// matched to one of them, never taken as it is: a rate off by a part in ten thousand
/// would put the clock seconds off within a day.
pub const KERNEL_HZ: [u64; 4] = [100, 250, 300, 1000];

/// How far, in parts per thousand, the measured tick may lie from the rate it is matched
/// to before the measurement is refused as disturbed (a preempted observer).
const TOLERANCE_PER_MILLE: u64 = 5;

impl TickClock {
    /// CLOCK_MONOTONIC at the start of tick `jiffies`, when calibrated: at most one tick
    /// behind the precise clock, as CLOCK_MONOTONIC_COARSE is.
    #[inline(always)]
    pub fn now_ns(&self, jiffies: u64) -> Option<u64> {
        (self.tick_ns != 0).then(|| {
            jiffies
                .wrapping_mul(self.tick_ns)
                .wrapping_add(self.offset_ns)
        })
    }

    /// The clock two observed edges imply: the one of [`KERNEL_HZ`] their distance
    /// matches, anchored at the later edge. None when the edges are too close or their
    /// distance matches no rate closely enough; calibrate again.
    pub fn from_edges(first: TickEdge, second: TickEdge) -> Option<TickClock> {
        let ticks = second.jiffies.checked_sub(first.jiffies)?;
        let elapsed = second.mono_ns.checked_sub(first.mono_ns)?;
        if ticks < MIN_CALIBRATION_TICKS {
            return None;
        }
        let measured = elapsed / ticks;
        let tick_ns = KERNEL_HZ
            .iter()
            .map(|hz| (NS_PER_SEC + hz / 2) / hz)
            .find(|tick_ns| measured.abs_diff(*tick_ns) * 1000 <= tick_ns * TOLERANCE_PER_MILLE)?;
        Some(TickClock {
            tick_ns,
            offset_ns: second
                .mono_ns
                .wrapping_sub(second.jiffies.wrapping_mul(tick_ns)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counter's start value at boot on a 64-bit kernel: `(u32)(-300 * HZ)`.
    fn initial_jiffies(hz: u64) -> u64 {
        (1u64 << 32) - 300 * hz
    }

    /// The edge of tick `n` after boot as a kernel at `hz` makes it, seen `late_ns` late.
    fn edge(hz: u64, n: u64, late_ns: u64) -> TickEdge {
        let tick_ns = (NS_PER_SEC + hz / 2) / hz;
        TickEdge {
            jiffies: initial_jiffies(hz) + n,
            mono_ns: n * tick_ns + late_ns,
        }
    }

    #[test]
    fn every_common_tick_rate_is_recovered_exactly() {
        for hz in KERNEL_HZ {
            let first = edge(hz, 50_000, 3_000);
            let second = edge(hz, 50_000 + hz / 10, 1_000);
            let clock = TickClock::from_edges(first, second)
                .unwrap_or_else(|| panic!("no clock from 100 ms of edges at HZ={hz}"));
            assert_eq!(clock.tick_ns, (NS_PER_SEC + hz / 2) / hz, "HZ={hz}");
            let later = edge(hz, 9_000_000, 0);
            let now = clock.now_ns(later.jiffies).expect("calibrated");
            assert!(
                now.abs_diff(later.mono_ns) <= 1_000,
                "HZ={hz}: tick {} read as {now} ns, the monotonic clock said {}",
                later.jiffies,
                later.mono_ns
            );
        }
    }

    #[test]
    fn edges_that_no_kernel_rate_explains_are_refused() {
        let first = edge(1000, 10_000, 0);
        let mut second = edge(1000, 10_050, 0);
        second.mono_ns += 2_000_000;
        assert_eq!(TickClock::from_edges(first, second), None);
    }

    #[test]
    fn edges_too_close_or_out_of_order_are_refused() {
        let first = edge(250, 1_000, 0);
        assert_eq!(TickClock::from_edges(first, edge(250, 1_002, 0)), None);
        assert_eq!(TickClock::from_edges(edge(250, 1_100, 0), first), None);
        assert_eq!(TickClock::from_edges(first, first), None);
    }

    #[test]
    fn an_uncalibrated_clock_answers_none() {
        assert_eq!(TickClock::default().now_ns(4_294_967_296), None);
    }
}
