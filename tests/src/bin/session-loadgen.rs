//! `session-loadgen`: a bounded SYN or UDP flood from many spoofed sources, sent from a
//! named network namespace with [`session_tests::loadgen`], so that xtask and benchmarks
//! can drive the generator without linking it. Prints one JSON line with what was sent.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use session_tests::loadgen::{self, Blast};

/// Which kind of flood to build.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Kind {
    /// TCP SYNs: one new TCP session per frame.
    Syn,
    /// Small UDP datagrams: one new UDP session per frame.
    Udp,
}

/// Sends a bounded flood of prebuilt frames from spoofed benchmark-range sources
/// (198.19.0.0/16, 2001:2:0:ff00::/64) out of one interface of a network namespace.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Network namespace (a name under /var/run/netns) to send from.
    #[arg(long)]
    netns: String,
    /// Interface in that namespace to send through.
    #[arg(long)]
    iface: String,
    /// Source MAC of the frames (usually the interface's own), as aa:bb:cc:dd:ee:ff.
    #[arg(long)]
    src_mac: String,
    /// Destination MAC of the frames (the receiving interface's).
    #[arg(long)]
    dst_mac: String,
    /// Destination address (IPv4 in 198.18.0.0/15 or IPv6 in 2001:2::/48).
    #[arg(long)]
    dst: IpAddr,
    /// Destination ports, cycled over the frames.
    #[arg(long, value_delimiter = ',', default_value = "80")]
    ports: Vec<u16>,
    /// Kind of flood.
    #[arg(long, value_enum, default_value = "syn")]
    kind: Kind,
    /// Distinct spoofed sources (frames in the cycle).
    #[arg(long, default_value_t = loadgen::MAX_SOURCES)]
    sources: usize,
    /// Sender threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Stop after this many packets.
    #[arg(long, default_value_t = 1_000_000)]
    max_packets: u64,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Target rate in packets per second (default: as fast as possible).
    #[arg(long)]
    rate: Option<u64>,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let bytes = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<Vec<u8>, _>>()
        .with_context(|| format!("MAC {text:?} is not hex bytes separated by colons"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC {text:?} does not have 6 bytes"))
}

/// Whether `dst` is in the benchmarking ranges the project may send to.
fn in_benchmark_range(dst: IpAddr) -> bool {
    match dst {
        IpAddr::V4(v4) => matches!(v4.octets(), [198, 18 | 19, _, _]),
        IpAddr::V6(v6) => v6.segments()[..3] == [0x2001, 2, 0],
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !in_benchmark_range(args.dst) {
        bail!(
            "destination {} is outside 198.18.0.0/15 and 2001:2::/48; floods may only target \
             the benchmarking ranges",
            args.dst
        );
    }
    if !(args.duration > 0.0 && args.duration <= 600.0) {
        bail!("--duration must be between 0 and 600 seconds");
    }
    let src_mac = parse_mac(&args.src_mac).context("bad --src-mac")?;
    let dst_mac = parse_mac(&args.dst_mac).context("bad --dst-mac")?;
    let sources = args.sources.clamp(1, loadgen::MAX_SOURCES);
    let frames = match args.kind {
        Kind::Syn => loadgen::syn_frames(src_mac, dst_mac, args.dst, &args.ports, sources),
        Kind::Udp => loadgen::udp_frames(src_mac, dst_mac, args.dst, &args.ports, sources),
    };
    let blast = Blast {
        netns: args.netns,
        iface: args.iface,
        frames,
        threads: args.threads,
        max_packets: args.max_packets,
        max_duration: Duration::from_secs_f64(args.duration),
        rate_pps: args.rate,
    };
    let sent = loadgen::blast(&blast)
        .with_context(|| format!("flood from {} on {} failed", blast.netns, blast.iface))?;
    println!(
        "{{\"packets\":{},\"elapsed_s\":{:.6},\"pps\":{:.0}}}",
        sent.packets,
        sent.elapsed.as_secs_f64(),
        sent.pps()
    );
    Ok(())
}
