//! Developer tasks for the `session` workspace, run as `cargo xtask <command>`.
//!
//! They live in Rust rather than in shell scripts so that the toolchain recipe, the test
//! run and the network-namespace demo are one checked, portable program with errors that
//! tell the operator what to do next.

mod bench;
mod checks;
mod cmd;
mod differential;
mod dist;
mod fuzz;
mod lab;
mod setup;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Parser, Subcommand};

/// Command line of `cargo xtask`.
#[derive(Parser)]
#[command(about = "Set up, test, lint and demo the session firewall")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

/// The tasks; each one is also documented in README.md.
#[derive(Subcommand)]
enum Task {
    /// Install and check what building and testing need (run as root; idempotent, fast when done)
    Setup,
    /// Run setup, build the `session` binary and run the whole test suite
    Test {
        /// Extra arguments for `cargo test`, given after `--`
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Check formatting and run clippy on the host crates and on the eBPF crate
    Lint,
    /// Demo: run the firewall between two network namespaces and show what it allows
    Lab,
    /// Build a release and write what a host needs to target/dist/ (binary, man page, completions, systemd unit, example config)
    Dist {
        /// Package the debug build instead of a release build (quicker, for checking)
        #[arg(long)]
        debug: bool,
    },
    /// Fuzz the packet pipeline and the config parser (installs cargo-fuzz if missing)
    Fuzz {
        /// Seconds per target
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Benchmarks in release mode (root; several minutes): kernel path, policy and table scale, end to end
    Bench {
        /// Run only this benchmark: `kernel` or `e2e`
        #[arg(long)]
        only: Option<String>,
    },
    /// Compare the XDP program with the host model on N seeded, partly mutated frames (root)
    Differential {
        /// Frames to compare
        #[arg(long, default_value_t = 1_000_000)]
        packets: u64,
        /// Seed in hex (default: the test's own)
        #[arg(long, value_parser = differential::parse_seed)]
        seed: Option<u64>,
    },
    /// Boot other kernels in qemu and run the checks there: a matrix kernel × check (root)
    VmTest {
        /// Kernels to test: 6.1, 6.12 or host (this machine's, without a VM); repeat for several
        #[arg(long = "kernel", default_values_t = ["6.1".to_string(), "6.12".to_string(), vm::HOST.to_string()])]
        kernels: Vec<String>,
        /// How much runs: quick is what `cargo xtask test` runs, full runs the long sequences
        #[arg(long, value_enum, default_value_t = vm::Scope::Full)]
        scope: vm::Scope,
        /// How qemu runs the guest: tcg (software, works here) or kvm
        #[arg(long, value_enum, default_value_t = vm::Accel::Tcg)]
        accel: vm::Accel,
        /// Run only these checks (verify, kernel-path, smoke-...); repeat for several
        #[arg(long = "check")]
        only: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let root = workspace_root();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Test { args } => checks::test(&root, &args),
        Task::Lint => checks::lint(&root),
        Task::Lab => lab::run(&root),
        Task::Dist { debug } => dist::run(&root, debug),
        Task::Fuzz { seconds } => fuzz::run(&root, seconds),
        Task::Bench { only } => bench::run(&root, only.as_deref()),
        Task::Differential { packets, seed } => differential::run(&root, packets, seed),
        Task::VmTest {
            kernels,
            scope,
            accel,
            only,
        } => setup::run().and_then(|()| vm::run(&root, &kernels, scope, accel, &only)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root, so that every task works from whatever directory cargo was run in.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest directory sits inside the workspace")
        .to_path_buf()
}
