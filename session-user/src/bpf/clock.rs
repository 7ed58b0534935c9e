//! Calibrating the kernel programs' clock (`session_common::clock`) on this host: the
//! conversion from the kernel's tick counter to CLOCK_MONOTONIC depends on the kernel's
//! tick rate and its boot, which only the kernel can show.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use session_common::clock::{KERNEL_HZ, MIN_CALIBRATION_TICKS, TickClock, TickEdge};

const CLOCK_PROGRAM: &str = "session_clock";

/// Slowest tick the kernel can have (HZ=100).
const LONGEST_TICK: Duration = Duration::from_millis(10);

/// Times a calibration is tried before giving up: one is refused only when this process
/// was held up while it watched an edge.
const ATTEMPTS: u32 = 3;

/// Calibrates the programs' clock with the `session_clock` program of `ebpf`: observes
/// two edges of the tick counter some ticks apart and matches their distance to a kernel
/// tick rate. Takes about 60 ms.
pub fn calibrate(ebpf: &mut Ebpf) -> Result<TickClock> {
    let program: &mut Xdp = ebpf
        .program_mut(CLOCK_PROGRAM)
        .with_context(|| format!("program {CLOCK_PROGRAM} missing from the eBPF object"))?
        .try_into()
        .context("the clock program is not XDP")?;
    program
        .load()
        .context("the kernel rejected the clock program")?;
    for _ in 0..ATTEMPTS {
        let first = next_edge(program)?;
        std::thread::sleep(LONGEST_TICK * (MIN_CALIBRATION_TICKS as u32 + 1));
        let second = next_edge(program)?;
        if let Some(clock) = TickClock::from_edges(first, second) {
            return Ok(clock);
        }
    }
    bail!(
        "the kernel's tick counter advanced at none of the rates {KERNEL_HZ:?} HZ in {ATTEMPTS} tries"
    )
}

/// The next change of the tick counter, as the first reading that shows it.
fn next_edge(program: &Xdp) -> Result<TickEdge> {
    let start = read(program)?;
    let deadline = Instant::now() + 2 * LONGEST_TICK;
    loop {
        let reading = read(program)?;
        if reading.jiffies != start.jiffies {
            return Ok(reading);
        }
        if Instant::now() > deadline {
            bail!(
                "the kernel's tick counter stood still for {:?}",
                2 * LONGEST_TICK
            );
        }
    }
}

/// One run of the clock program: the tick counter and then CLOCK_MONOTONIC.
fn read(program: &Xdp) -> Result<TickEdge> {
    let frame = [0u8; 64];
    let mut out = [0u8; 64];
    program
        .test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .context("running the clock program with BPF_PROG_TEST_RUN")?;
    let word = |at: usize| {
        u64::from_ne_bytes(
            out[at..at + 8]
                .try_into()
                .expect("an 8-byte slice of the frame"),
        )
    };
    Ok(TickEdge {
        jiffies: word(0),
        mono_ns: word(8),
    })
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
