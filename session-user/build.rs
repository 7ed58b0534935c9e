//! Builds session-ebpf for the BPF target with aya-build and leaves the object in
//! `OUT_DIR`, where `src/loader.rs` embeds it.

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
    )
}
