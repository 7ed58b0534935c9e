//! `cargo xtask fuzz`: runs the cargo-fuzz targets (packet pipeline, config parser) for a
//! bounded time each, installing cargo-fuzz first when it is missing.

use std::{path::Path, process::Command};

use anyhow::{Context, Result};

use crate::{cmd, setup};

/// The fuzz targets in session-user/fuzz.
const TARGETS: &[&str] = &["packet_pipeline", "config"];

/// The cargo-fuzz release known to work with this toolchain.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Fuzzes every target for `seconds` seconds; a crash fails with the reproducer's path.
pub fn run(root: &Path, seconds: u64) -> Result<()> {
    setup::run().context("setup failed")?;
    ensure_cargo_fuzz()?;
    let fuzz_dir = root.join("session-user");
    for target in TARGETS {
        println!("fuzz: {target} for {seconds} s");
        cmd::run(
            Command::new("cargo")
                .args(["+nightly", "fuzz", "run", target, "--"])
                .arg(format!("-max_total_time={seconds}"))
                .arg("-rss_limit_mb=2048")
                .arg("-timeout=10")
                .current_dir(&fuzz_dir),
        )
        .with_context(|| {
            format!("fuzz target {target} failed: the reproducer is under session-user/fuzz/artifacts/{target}")
        })?;
    }
    println!("fuzz: PASSED: {} targets, {seconds} s each", TARGETS.len());
    Ok(())
}

fn ensure_cargo_fuzz() -> Result<()> {
    if Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|out| out.status.success())
    {
        println!("ok: cargo-fuzz present");
        return Ok(());
    }
    println!("installing: cargo-fuzz {CARGO_FUZZ_VERSION}");
    cmd::run(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
    .context("installing cargo-fuzz failed: check the network and `cargo --version`")
}
