//! Builds session-ebpf for the BPF target with aya-build and leaves its two objects in
//! `OUT_DIR`: `session`, which `src/bpf/loader.rs` embeds, and `session-bench`, the
//! benchmarks' programs, which only test support loads: its path goes to dependent
//! build scripts as `DEP_SESSION_EBPF_BENCH_OBJECT` (see `links` in Cargo.toml).

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR unset")?;
    let ebpf_dir = format!("{manifest_dir}/../session-ebpf");
    println!("cargo:rerun-if-changed={manifest_dir}/../session-common/src");
    aya_build::build_ebpf(
        [Package {
            name: "session-ebpf",
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )?;
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR unset")?;
    println!("cargo:bench_object={out_dir}/session-bench");
    Ok(())
}
