//! The verifier's view of the kernel programs as the daemon loads them, at each kernel log
//! level (`[logging] kernel_level`): how many instructions it walked for each program.
//! Printed (run with `--nocapture`) so a change to the kernel side can be compared with
//! the figure before it, and bounded so that a change that makes the verifier walk far
//! more fails here rather than on a customer's kernel. Loading at `trace` proves that the
//! debug sites, pruned at the default level, verify too. Needs root and a bpffs on
//! /sys/fs/bpf (`cargo xtask setup` mounts it).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use aya::programs::{SchedClassifier, Xdp};
use session_user::bpf::{kernel_log::KernelLogLevel, loader};

/// Removes the test's pin directory, also when the test fails.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The verifier's own limit on instructions walked per program.
const VERIFIER_LIMIT: u32 = 1_000_000;

/// The verifier's walk and the size after verification of each program, loaded at `level`.
fn walks(level: KernelLogLevel) -> Vec<(&'static str, u32, u32)> {
    // Two tests walk the default level at once, so each call has a directory of its own.
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let pin = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/session-verifier-{}-{level}-{}",
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    )));
    let mut ebpf = loader::load(&pin.0, loader::Sizes::sessions(65_536), true, level)
        .unwrap_or_else(|error| panic!("loading the programs at kernel_level {level}: {error:#}"));
    let mut out = Vec::new();
    for name in ["session_ingress", "session_ingress_tc", "session_egress"] {
        let program = ebpf
            .program_mut(name)
            .unwrap_or_else(|| panic!("{name} missing from the object"));
        let info = match name {
            "session_ingress" => <&mut Xdp>::try_from(program).map(|p| p.info()),
            _ => <&mut SchedClassifier>::try_from(program).map(|p| p.info()),
        }
        .unwrap_or_else(|error| panic!("{name} has an unexpected type: {error}"))
        .unwrap_or_else(|error| panic!("reading {name}'s program info: {error}"));
        let verified = info
            .verified_instruction_count()
            .unwrap_or_else(|| panic!("this kernel does not report {name}'s verified count"));
        let xlated = info.size_translated().unwrap_or(0) / 8;
        println!(
            "kernel_level {level}: {name}: the verifier walked {verified} instructions; {xlated} after verification"
        );
        assert!(
            verified > 0 && verified < VERIFIER_LIMIT,
            "{name} at kernel_level {level}: {verified} instructions walked, the verifier's limit is {VERIFIER_LIMIT}"
        );
        out.push((name, verified, xlated));
    }
    out
}

#[test]
fn the_programs_verify_at_every_kernel_log_level_and_the_walk_is_printed() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the verifier test loads eBPF programs and needs root: run it with `cargo xtask test`"
    );
    let default = walks(KernelLogLevel::default());

    let off = walks(KernelLogLevel::Off);
    let trace = walks(KernelLogLevel::Trace);
    for ((name, at_default, size_default), ((_, _, size_off), (_, _, size_trace))) in
        default.iter().zip(off.iter().zip(&trace))
    {
        assert!(
            size_off <= size_default && size_default < size_trace,
            "{name}: the verifier must prune the log sites below the level: {size_off} instructions \
             with logging off, {size_default} at the default level, {size_trace} at trace"
        );
        assert!(*at_default > 0);
    }
}

#[test]
fn the_daemons_object_holds_no_benchmark_program_or_map() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the verifier test loads eBPF programs and needs root: run it with `cargo xtask test`"
    );
    let pin = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/session-verifier-{}-contents",
        std::process::id()
    )));
    let ebpf = loader::load(
        &pin.0,
        loader::Sizes::sessions(65_536),
        false,
        KernelLogLevel::default(),
    )
    .unwrap_or_else(|error| panic!("loading the programs: {error:#}"));
    let programs: Vec<&str> = ebpf.programs().map(|(name, _)| name).collect();
    let maps: Vec<&str> = ebpf.maps().map(|(name, _)| name).collect();
    assert!(
        programs.contains(&"session_ingress") && maps.contains(&"SESSIONS"),
        "the firewall's programs and maps must be there: {programs:?} {maps:?}"
    );
    for bench in [
        "session_noop",
        "session_drop_all",
        "session_bench_wire",
        "session_bench_send",
    ] {
        assert!(
            !programs.contains(&bench),
            "{bench} belongs to the benchmarks' object, not the daemon's: {programs:?}"
        );
    }
    for bench in ["BENCH_FRAMES", "BENCH_CURSOR", "BENCH_WIRE"] {
        assert!(
            !maps.contains(&bench),
            "{bench} belongs to the benchmarks' object, not the daemon's: {maps:?}"
        );
    }
}

/// What `cargo xtask vm-test` collects into its matrix: whether the daemon's programs load
/// on this kernel at the default level, and how many instructions the verifier walked for
/// each, as `SESSION-INSNS <program> <count>` lines.
#[test]
fn every_program_loads_and_reports_its_verified_instructions() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the verifier test loads eBPF programs and needs root: run it with `cargo xtask test`"
    );
    let default = walks(KernelLogLevel::default());
    // On a line of its own: libtest has printed the test's name without a newline.
    println!();
    for (name, verified, _) in &default {
        println!("SESSION-INSNS {name} {verified}");
    }
}
