//! The benchmarks' fast load generator: frames made in the kernel and handed to a veth as
//! XDP frames, the way a NIC's driver hands them over.
//!
//! The `AF_PACKET` generator ([`crate::loadgen::blast`]) sends socket buffers. When the
//! veth peer runs XDP, it must first copy each such buffer into a page of its own (about
//! 680 ns a packet here), which no NIC with native XDP does, so every XDP firewall looks
//! slower on that path than it would be on hardware. [`xdp_blast`] instead runs
//! `session_bench_send` with `BPF_PROG_TEST_RUN` in live-frame mode in the sender's
//! namespace: each run writes the next frame of its table into a page of the kernel's
//! test page pool and transmits it on the sender's veth end, whose peer receives it as an
//! XDP frame. The peer must be able to take XDP frames: it needs an XDP program or GRO
//! turned on (`ethtool -K IFACE gro on`).
//!
//! The kernel runs the peer's receive processing on the sending CPU, when each batch is
//! flushed: the receiving side's work is softirq time there, the generator's own is system
//! time.

use std::{
    ffi::CString,
    io,
    net::Ipv6Addr,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::{
    maps::{Array, PerCpuArray, PerCpuValues},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp},
};
use session_common::wire::{BENCH_FRAME_PREFIX, BenchCursor, BenchFrame, map_names};

use crate::{
    enter_netns,
    loadgen::{Blast, Sent},
};

/// Frames of the first test run, which measures the rate the later runs are sized by.
const FIRST_RUN_FRAMES: u32 = 8_192;
/// How long each later test run should take. A run cannot be stopped early, and between
/// runs nothing is sent while the kernel tears down one run's page pool and sets up the
/// next: with runs of 8,192 frames the sending CPU stood idle most of the time. Long runs
/// make that pause negligible, short ones keep the duration bound.
const RUN_TIME: Duration = Duration::from_millis(250);
/// Frames the kernel generates before it flushes them to the peer, whose receive
/// processing then runs: the kernel's default, which veth's 256-frame ring absorbs.
const FLUSH_BATCH: u32 = 64;

/// The ones' complement sum of the 16-bit words of every address [`v6_source`] returns.
const V6_WORD_SUM: u16 = 0x5eed;

/// The layout of the kernel's `struct xdp_md`, the test run's context, through which the
/// frames' interface is chosen (the kernel wants `data_end` to be the frame's length).
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// Sends `b.frames` cyclically into `b.iface` in namespace `b.netns` as XDP frames, from
/// one thread, until `b.max_packets` were sent or `b.max_duration` passed; returns how many
/// it sent and how long it took. The frames must all have the same length and differ only
/// in their first [`BENCH_FRAME_PREFIX`] bytes; `b.threads` must be 1 (veth receives on one
/// queue) and `b.rate_pps` `None` (it always sends as fast as it can).
pub fn xdp_blast(b: &Blast) -> io::Result<Sent> {
    let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidInput, message);
    let template = b
        .frames
        .first()
        .ok_or_else(|| invalid("a blast needs at least one frame".into()))?;
    if b.threads != 1 || b.rate_pps.is_some() {
        return Err(invalid(
            "the XDP generator sends from one thread, as fast as it can".into(),
        ));
    }
    if template.len() < BENCH_FRAME_PREFIX {
        return Err(invalid(format!(
            "a {}-byte frame is shorter than the {BENCH_FRAME_PREFIX} bytes the XDP generator writes",
            template.len()
        )));
    }
    if let Some(index) = b.frames.iter().position(|frame| {
        frame.len() != template.len()
            || frame[BENCH_FRAME_PREFIX..] != template[BENCH_FRAME_PREFIX..]
    }) {
        return Err(invalid(format!(
            "frame {index} differs from the first after byte {BENCH_FRAME_PREFIX}, which the XDP generator does not write"
        )));
    }
    let count = u32::try_from(b.frames.len())
        .map_err(|_| invalid(format!("{} frames are too many", b.frames.len())))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter_netns(&b.netns)?;
                send(b, template, count)
                    .map_err(|error| io::Error::other(format!("XDP generator: {error:#}")))
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the XDP generator's thread panicked")))
    })
}

/// Loads the generator, fills its table and runs it until the blast's bounds; runs on a
/// thread inside the sender's namespace, so the interface index resolves there.
fn send(b: &Blast, template: &[u8], count: u32) -> anyhow::Result<Sent> {
    let name = CString::new(b.iface.as_str()).context("interface name has a NUL")?;
    // SAFETY: if_nametoindex reads a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("no interface {} in {}", b.iface, b.netns));
    }
    let mut ebpf = crate::bench_object::load(count)?;
    let mut table: Array<_, BenchFrame> = ebpf
        .map_mut(map_names::BENCH_FRAMES)
        .context("no frame table in the object")?
        .try_into()?;
    for (index, frame) in b.frames.iter().enumerate() {
        let prefix: BenchFrame = frame[..BENCH_FRAME_PREFIX]
            .try_into()
            .expect("checked to be long enough");
        table
            .set(index as u32, prefix, 0)
            .context("writing a frame")?;
    }
    let mut cursors: PerCpuArray<_, BenchCursor> = ebpf
        .map_mut(map_names::BENCH_CURSOR)
        .context("no cursor in the object")?
        .try_into()?;
    let cpus = aya::util::nr_cpus().map_err(|(_, error)| error)?;
    let start = BenchCursor {
        next: 0,
        frames: count,
    };
    cursors
        .set(0, PerCpuValues::try_from(vec![start; cpus])?, 0)
        .context("writing the cursors")?;
    let program: &mut Xdp = ebpf
        .program_mut("session_bench_send")
        .context("no session_bench_send in the object")?
        .try_into()?;
    program.load().context("loading session_bench_send")?;
    let context = XdpMd {
        data_end: template.len() as u32,
        ingress_ifindex: ifindex,
        ..XdpMd::default()
    };
    // SAFETY: XdpMd is plain u32 fields without padding.
    let context_bytes = unsafe {
        std::slice::from_raw_parts(
            (&raw const context).cast::<u8>(),
            std::mem::size_of::<XdpMd>(),
        )
    };
    let started = Instant::now();
    let deadline = started + b.max_duration;
    let mut sent = 0u64;
    let mut frames = FIRST_RUN_FRAMES;
    loop {
        let now = Instant::now();
        let left = b.max_packets - sent;
        if left == 0 || now >= deadline {
            break;
        }
        let frames_now = u64::from(frames).min(left) as u32;
        program
            .test_run(TestRunOptions {
                data_in: Some(template),
                ctx_in: Some(context_bytes),
                repeat: frames_now,
                attrs: TestRunAttrs::new().xdp_live_frames(FLUSH_BATCH),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN in live-frame mode")?;
        sent += u64::from(frames_now);
        let rate = f64::from(frames_now) / now.elapsed().as_secs_f64().max(1e-6);
        let run = RUN_TIME.min(deadline.saturating_duration_since(Instant::now()));
        frames = (rate * run.as_secs_f64()).clamp(1.0, f64::from(u32::MAX)) as u32;
    }
    Ok(Sent {
        packets: sent,
        elapsed: started.elapsed(),
    })
}

/// The `host`th address of the /64 `network` (its first four words) whose eight 16-bit
/// words add up, in ones' complement, to the same sum as every other address this returns.
/// The TCP and UDP checksums cover the source address, and in an IPv6 frame they lie
/// beyond the [`BENCH_FRAME_PREFIX`] bytes [`xdp_blast`] writes: segments from these
/// sources, alike in all else, carry the same checksum, so the generator can send them
/// from many IPv6 sources. The last word makes up the sum, words 5 and 6 hold `host`.
pub fn v6_source(network: Ipv6Addr, host: u32) -> Ipv6Addr {
    let mut words = network.segments();
    words[4] = 0;
    words[5] = (host >> 16) as u16;
    words[6] = host as u16;
    words[7] = 0;
    let sum = words.iter().fold(0, |sum, &word| ones_add(sum, word));
    words[7] = ones_add(V6_WORD_SUM, !sum);
    Ipv6Addr::from(words)
}

/// `a + b` in ones' complement (the end-around carry), the arithmetic of the Internet
/// checksum.
fn ones_add(a: u16, b: u16) -> u16 {
    let (sum, carry) = a.overflowing_add(b);
    sum + u16::from(carry)
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};

    use super::*;
    use crate::loadgen::syn_frames_from;

    #[test]
    fn syns_from_v6_sources_differ_only_where_the_generator_writes() {
        let networks: [Ipv6Addr; 3] = [
            "2001:2:0:1000::".parse().unwrap(),
            "2001:2:0:f123::".parse().unwrap(),
            "2001:2:0:ffff::".parse().unwrap(),
        ];
        let sources: Vec<IpAddr> = networks
            .iter()
            .flat_map(|&network| {
                [0, 1, 0xffff, 65_537, u32::MAX].map(|host| v6_source(network, host))
            })
            .map(IpAddr::V6)
            .collect();
        for (source, network) in sources.iter().zip(networks.iter().flat_map(|n| [n; 5])) {
            let IpAddr::V6(source) = source else {
                unreachable!()
            };
            assert_eq!(
                source.segments()[..4],
                network.segments()[..4],
                "{source} in {network}/64"
            );
        }
        let unique: std::collections::HashSet<_> = sources.iter().collect();
        assert_eq!(unique.len(), sources.len(), "distinct sources: {sources:?}");
        let dst = SocketAddr::new("2001:2::2".parse().unwrap(), 8080);
        let frames = syn_frames_from([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], dst, &sources);
        for (frame, source) in frames.iter().zip(&sources) {
            assert_eq!(
                frame[BENCH_FRAME_PREFIX..],
                frames[0][BENCH_FRAME_PREFIX..],
                "the SYN from {source} differs from the first after the IPv6 header"
            );
        }
    }
}
