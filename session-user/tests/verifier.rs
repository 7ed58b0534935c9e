//! Loads every program of the eBPF object on the running kernel and prints how many
//! instructions the verifier processed for each, as `SESSION-INSNS <program> <count>`
//! lines that `cargo xtask vm-test` collects into its matrix: whether the programs load
//! is the first thing that differs between kernels, and how close each is to the
//! verifier's limit the second.
//!
//! The firewall's programs are loaded through `loader::load`, the daemon's own path
//! (with its map sizes and globals); the benchmarks' programs through
//! `loader::load_for_bench`. Needs root and a bpffs on /sys/fs/bpf. Run:
//! `cargo test -p session-user --test verifier -- --nocapture`.

use std::path::{Path, PathBuf};

use aya::{Ebpf, programs::Program};
use session_user::bpf::loader;

const BPFFS: &str = "/sys/fs/bpf";
/// The size the daemon's default config asks for.
const MAX_SESSIONS: u32 = 65_536;

/// A pin directory of this test, removed with what is in it when dropped.
struct PinDir(PathBuf);

impl PinDir {
    fn new(tag: &str) -> PinDir {
        PinDir(Path::new(BPFFS).join(format!("session-verify-{tag}-{}", std::process::id())))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.0)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("verifier: could not remove {}: {error}", self.0.display());
        }
    }
}

/// The verified instruction count of each loaded program of `ebpf`, by name (the others
/// have no file descriptor).
fn counts(ebpf: &Ebpf) -> Vec<(String, u32)> {
    ebpf.programs()
        .filter_map(|(name, program)| {
            program.fd().ok()?;
            let info = program
                .info()
                .unwrap_or_else(|e| panic!("reading the info of the loaded {name}: {e}"));
            let count = info.verified_instruction_count().unwrap_or_else(|| {
                panic!(
                    "the kernel does not report verified instructions for {name} (Linux 5.16+ does)"
                )
            });
            Some((name.to_string(), count))
        })
        .collect()
}

#[test]
fn every_program_loads_and_reports_its_verified_instructions() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(euid == 0, "loading eBPF needs root (euid is {euid})");
    let firewall_pins = PinDir::new("fw");
    let firewall = loader::load(&firewall_pins.0, MAX_SESSIONS, true)
        .unwrap_or_else(|e| panic!("the firewall's programs do not load: {e:#}"));
    let mut loaded = counts(&firewall);
    assert!(
        loaded.len() >= 3,
        "expected the XDP ingress, TC ingress and egress programs, loaded {loaded:?}"
    );
    let bench_pins = PinDir::new("bench");
    let mut bench = loader::load_for_bench(&bench_pins.0, 1)
        .unwrap_or_else(|e| panic!("the benchmark object does not load: {e:#}"));
    for (name, program) in bench.programs_mut() {
        if loaded.iter().any(|(have, _)| have == name) {
            continue;
        }
        let result = match program {
            Program::Xdp(p) => p.load(),
            Program::SchedClassifier(p) => p.load(),
            _ => panic!("{name}: neither XDP nor TC, a program type this test does not know"),
        };
        result.unwrap_or_else(|e| panic!("{name} does not load on this kernel: {e:?}"));
    }
    loaded.extend(
        counts(&bench)
            .into_iter()
            .filter(|(name, _)| !loaded.iter().any(|(have, _)| have == name))
            .collect::<Vec<_>>(),
    );
    loaded.sort();
    // On a line of its own: libtest has printed the test's name without a newline.
    println!();
    for (name, count) in &loaded {
        println!("SESSION-INSNS {name} {count}");
    }
}
