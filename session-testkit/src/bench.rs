//! What the benchmarks share: where their results go, when they have nothing to run, and
//! the sessions they fill tables with.

use std::path::{Path, PathBuf};

use session_common::{
    packet::PacketMeta,
    track::flow_key,
    wire::{FlowKey, Session, TcpState, session_flags},
};

/// Where a benchmark writes its JSON and Markdown results: `SESSION_BENCH_DIR` when set,
/// else the workspace's target/bench (this crate, like every bench's crate, sits one level
/// below the workspace root).
pub fn out_dir() -> PathBuf {
    std::env::var_os("SESSION_BENCH_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench"),
        PathBuf::from,
    )
}

/// Whether the harness only asked for the list of benchmarks (`--list`, as
/// `cargo test --benches` does): a bench binary then must run nothing.
pub fn only_listing() -> bool {
    std::env::args().any(|arg| arg == "--list")
}

/// The key and the session the kernel holds for the TCP flow `meta` once it is
/// established, replied, assured and protected, created at `now` and expiring an hour
/// later: what the benchmarks preload their tables with.
pub fn established_session(meta: &PacketMeta, now: u64) -> (FlowKey, Session) {
    let (key, src_is_lo) = flow_key(meta);
    let mut session = Session {
        created_ns: now,
        expires_ns: now + 3_600_000_000_000,
        state: TcpState::Established as u8,
        flags: session_flags::SEEN_REPLY | session_flags::ASSURED | session_flags::PROTECTED,
        ..Session::default()
    };
    if src_is_lo {
        session.flags |= session_flags::ORIG_IS_LO;
    }
    (key, session)
}
