//! `cargo xtask test` and `cargo xtask lint`: the whole suite and the style gate, each as
//! one command so that CI and developers run exactly the same thing.
//!
//! The host passes leave out `session-ebpf`: it is a `no_std`, `no_main` program for the
//! `bpfel-unknown-none` target that cannot be built for the host. `session-user`'s build
//! script compiles it for its real target, and `lint` checks it in a pass of its own.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{cmd, fuzz, setup, vm};

/// Runs setup, builds the `session` binary, then every test in the workspace, a short
/// fuzz run of each fuzz target and the checks in a VM for each of [`SUITE_KERNELS`].
pub fn test(root: &Path, extra: &[String]) -> Result<()> {
    let start = Instant::now();
    let result = run_suite(root, extra);
    let took = minutes(start.elapsed());
    match result {
        Ok(()) => {
            println!("test: PASSED: build and whole test suite in {took}");
            Ok(())
        }
        Err(err) => Err(err.context(format!("test: FAILED after {took}"))),
    }
}

/// The steps of `test`, stopping at the first failure.
fn run_suite(root: &Path, extra: &[String]) -> Result<()> {
    setup::run().context("setup failed")?;
    build_session(root)?;
    cmd::run(
        cargo()
            .args([
                "test",
                "--workspace",
                "--exclude",
                "session-ebpf",
                "--no-fail-fast",
            ])
            .args(extra)
            .env("SESSION_BIN", session_bin(root))
            .env("RUST_BACKTRACE", "1")
            .current_dir(root),
    )
    .context("some tests failed: see the failures listed above")?;
    fuzz::run(root, FUZZ_SMOKE_SECS).context("the fuzz smoke run failed")?;
    vm::run(
        root,
        &SUITE_KERNELS.map(str::to_string),
        vm::Scope::Quick,
        vm::Accel::Tcg,
        &[],
    )
    .context("the kernel matrix failed (run `cargo xtask vm-test --kernel 6.1` to repeat it)")
}

/// The kernels the suite boots in VMs besides running on the host's own: the oldest one
/// supported. `cargo xtask vm-test` runs the whole matrix.
const SUITE_KERNELS: [&str; 1] = ["6.1"];

/// Seconds per fuzz target in the suite's smoke run; `cargo xtask fuzz` runs longer.
const FUZZ_SMOKE_SECS: u64 = 15;

/// Builds `target/debug/session`; its build script compiles the eBPF program.
pub fn build_session(root: &Path) -> Result<()> {
    cmd::run(
        cargo()
            .args(["build", "-p", "session-user"])
            .current_dir(root),
    )
    .context("building the session binary (and its eBPF program) failed: fix the errors above")
}

/// Where `build_session` puts the daemon and CLI.
pub fn session_bin(root: &Path) -> std::path::PathBuf {
    root.join("target/debug/session")
}

/// Runs every lint pass, even after one fails, and reports all that failed.
pub fn lint(root: &Path) -> Result<()> {
    let ebpf_dir = root.join("session-ebpf");
    let passes: [(&str, Command); 3] = [
        ("cargo fmt --all --check (fix with `cargo fmt --all`)", {
            let mut c = cargo();
            c.args(["fmt", "--all", "--check"]).current_dir(root);
            c
        }),
        ("clippy on the host crates", {
            let mut c = cargo();
            c.args([
                "clippy",
                "--workspace",
                "--exclude",
                "session-ebpf",
                "--all-targets",
            ])
            .args(["--", "-D", "warnings"])
            .current_dir(root);
            c
        }),
        ("clippy on session-ebpf for bpfel-unknown-none", {
            let mut c = cargo();
            c.args(["+nightly", "clippy", "-p", "session-ebpf"])
                .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
                .args(["--", "-D", "warnings"])
                .current_dir(&ebpf_dir);
            c
        }),
    ];
    let mut failed = Vec::new();
    for (what, mut command) in passes {
        println!("lint: {what}");
        if let Err(err) = cmd::run(&mut command) {
            eprintln!("lint: {err:#}");
            failed.push(what);
        }
    }
    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join("; "));
    }
    println!("lint: PASSED");
    Ok(())
}

/// A cargo command without incremental compilation: the suite and the lint build every
/// crate once, so incremental caches only cost disk (over a GiB, which a fresh CI machine
/// may not have).
fn cargo() -> Command {
    let mut command = Command::new("cargo");
    command.env("CARGO_INCREMENTAL", "0");
    command
}

/// A duration as "1m05s" for the summary lines.
fn minutes(d: Duration) -> String {
    let secs = d.as_secs();
    format!("{}m{:02}s", secs / 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_pads_seconds() {
        assert_eq!(minutes(Duration::from_secs(65)), "1m05s", "65 s");
        assert_eq!(
            minutes(Duration::from_millis(900)),
            "0m00s",
            "under a second"
        );
    }
}
