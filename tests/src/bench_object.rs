//! The benchmarks' eBPF object (`session-bench`: `session_noop`, `session_drop_all`,
//! `session_bench_wire` and the load generator `session_bench_send`, with their maps),
//! which the daemon neither embeds nor loads.

use anyhow::Context as _;
use aya::{Ebpf, EbpfLoader};
use session_common::wire::map_names;

/// The object session-user's build script built (see build.rs).
static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("SESSION_BENCH_OBJECT"));

/// Loads the object with the generator's frame table sized for `frames` (at least one);
/// its maps are not pinned, so they go with the returned handle. The caller loads the
/// programs it needs by name.
pub fn load(frames: u32) -> anyhow::Result<Ebpf> {
    EbpfLoader::new()
        .map_max_entries(map_names::BENCH_FRAMES, frames.max(1))
        .load(BENCH_OBJECT)
        .context("loading the benchmarks' eBPF object")
}
