//! `cargo xtask vm-test`: the kernel matrix. For each kernel it boots Debian's kernel
//! package in qemu with an initramfs holding the test binaries (see [`rootfs`]), runs the
//! checks there and reads their results from the console; for `host` it runs the same
//! checks directly. It prints a matrix kernel × check with the verifier's instruction
//! counts and fails if any check failed anywhere.

mod kernel;
mod matrix;
mod qemu;
mod rootfs;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub use qemu::Accel;

use crate::{checks, cmd};

/// The name of the column that runs on the machine's own kernel, without a VM.
pub const HOST: &str = "host";

/// One check: a test binary run with arguments, in the guest and on the host alike.
#[derive(Clone, Debug)]
pub struct Check {
    /// Its name in the matrix and in the guest's result lines.
    pub name: &'static str,
    /// The cargo package of the test target.
    package: &'static str,
    /// The test target (`[[test]]` name), also the binary's name in the guest.
    pub binary: &'static str,
    /// Arguments for the test binary (the libtest harness).
    pub args: Vec<String>,
    /// Environment for the check.
    pub env: Vec<(String, String)>,
    /// The check is killed after this long.
    pub timeout_secs: u64,
}

/// How much runs in each VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scope {
    /// What `cargo xtask test` runs: every check, each with the few tests that cover
    /// what it is for, so that a VM under software emulation fits the suite's budget.
    Quick,
    /// Every check with every test of its file.
    Full,
}

/// The checks of `scope`. Under software emulation every load of the programs takes
/// the verifier about 25 s, and each kernel-path test and each daemon start loads them:
/// the quick scope picks the tests that cover the issue's list (every program verified,
/// kernel against model on XDP and TC, TCP/UDP/ICMP on IPv4 and IPv6, a policy drop,
/// restart without loss, reload, `session down`, the capabilities kept, TC ingress), the
/// full one runs every
/// test of those files.
fn checks(scope: Scope) -> Vec<Check> {
    let quick = scope == Scope::Quick;
    let tests = |names: &[&str]| {
        let mut args = vec!["--test-threads=1".to_string()];
        if quick {
            args.extend(names.iter().map(|name| name.to_string()));
        }
        args
    };
    vec![
        Check {
            name: "verify",
            package: "session-user",
            binary: "verifier",
            args: vec![
                "--test-threads=1".into(),
                "--nocapture".into(),
                "every_program_loads_and_reports_its_verified_instructions".into(),
            ],
            env: Vec::new(),
            timeout_secs: 600,
        },
        Check {
            name: "kernel-path",
            package: "session-user",
            binary: "kernel_path",
            args: tests(&[
                "tcp_handshake_creates_one_session_and_counts_each_direction",
                "kernel_and_model_agree_frame_by_frame",
                "tc_ingress_and_model_agree_frame_by_frame",
            ]),
            env: Vec::new(),
            timeout_secs: 1800,
        },
        Check {
            name: "smoke-policy",
            package: "session-tests",
            binary: "policy_v4",
            args: tests(&[
                "tcp_to_other_port_fails",
                "udp_reply_to_outbound_query_gets_through",
                "outbound_ping_gets_reply_inbound_ping_dropped",
            ]),
            env: Vec::new(),
            timeout_secs: 1200,
        },
        Check {
            name: "smoke-tracking",
            package: "session-tests",
            binary: "tracking",
            args: tests(&[
                "tcp_to_allowed_port_only_v6",
                "udp_port_unreachable_is_related_v6",
                "ping_both_ways_v6",
            ]),
            env: Vec::new(),
            timeout_secs: 1800,
        },
        Check {
            name: "smoke-lifecycle",
            package: "session-tests",
            binary: "lifecycle",
            args: tests(&[
                "sigkill_and_restart_keep_sessions_counters_and_the_stream",
                "reload_under_a_live_stream_loses_nothing",
                "down_removes_everything_and_is_idempotent",
            ]),
            env: Vec::new(),
            timeout_secs: 1800,
        },
        Check {
            name: "smoke-privileges",
            package: "session-tests",
            binary: "security",
            args: tests(&["daemon_keeps_no_capability_after_attaching"]),
            env: Vec::new(),
            timeout_secs: 600,
        },
        Check {
            name: "smoke-tc-ingress",
            package: "session-tests",
            binary: "tc_ingress",
            args: tests(&["tc_ingress_enforces_the_policy_in_place_of_xdp"]),
            env: Vec::new(),
            timeout_secs: 1200,
        },
    ]
}

/// Runs the matrix for `kernels` (names from [`kernel::KERNELS`] or [`HOST`]) with the
/// checks of `scope`, or only those named in `only`; builds the binaries first.
pub fn run(
    root: &Path,
    kernels: &[String],
    scope: Scope,
    accel: Accel,
    only: &[String],
) -> Result<()> {
    for name in kernels {
        if name != HOST {
            kernel::spec(name)?;
        }
    }
    let mut checks = checks(scope);
    for name in only {
        if !checks.iter().any(|c| c.name == name) {
            let known: Vec<&str> = checks.iter().map(|c| c.name).collect();
            bail!(
                "unknown check {name:?}: the checks are {}",
                known.join(", ")
            );
        }
    }
    if !only.is_empty() {
        checks.retain(|c| only.iter().any(|name| name == c.name));
    }
    let binaries = build(root, &checks)?;
    let mut runs = Vec::new();
    for name in kernels {
        let run = if name == HOST {
            run_on_host(&checks, &binaries)?
        } else {
            run_in_vm(root, name, &checks, &binaries, accel)?
        };
        for problem in &run.problems {
            eprintln!("vm: {}: {problem}", run.kernel);
        }
        runs.push(run);
    }
    println!("\n{}", matrix::render(&runs));
    let failed: Vec<&str> = runs
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.kernel.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "the kernel matrix failed on {}: see the checks marked FAIL above and the console logs under target/vm/",
            failed.join(", ")
        );
    }
    Ok(())
}

/// Builds the `session` binary and the checks' test binaries; returns (name in the
/// guest, host path) for each.
fn build(root: &Path, checks: &[Check]) -> Result<Vec<(String, PathBuf)>> {
    checks::build_session(root)?;
    let mut binaries = vec![("session".to_string(), checks::session_bin(root))];
    let mut packages: Vec<&str> = checks.iter().map(|c| c.package).collect();
    packages.dedup();
    for package in packages {
        let mut cargo = Command::new("cargo");
        cargo
            .args(["test", "--no-run", "--message-format=json", "-p", package])
            .current_dir(root);
        for check in checks.iter().filter(|c| c.package == package) {
            cargo.args(["--test", check.binary]);
        }
        let out = cmd::stdout(&mut cargo)
            .with_context(|| format!("building the test binaries of {package} failed"))?;
        for check in checks.iter().filter(|c| c.package == package) {
            let path = test_executable(&out, check.binary).with_context(|| {
                format!("cargo did not report the test binary {}", check.binary)
            })?;
            binaries.push((check.binary.to_string(), path));
        }
    }
    Ok(binaries)
}

/// The executable of test target `name` in cargo's JSON messages.
fn test_executable(messages: &str, name: &str) -> Option<PathBuf> {
    messages.lines().find_map(|line| {
        let message: serde_json::Value = serde_json::from_str(line).ok()?;
        let target = &message["target"];
        let is_test = target["kind"].as_array()?.iter().any(|kind| kind == "test");
        (message["reason"] == "compiler-artifact" && is_test && target["name"] == name)
            .then(|| message["executable"].as_str().map(PathBuf::from))
            .flatten()
    })
}

/// Boots `name`'s kernel with the checks and reads their results.
fn run_in_vm(
    root: &Path,
    name: &str,
    checks: &[Check],
    binaries: &[(String, PathBuf)],
    accel: Accel,
) -> Result<matrix::Run> {
    let kernel = kernel::fetch(kernel::spec(name)?)?;
    let dir = root.join("target/vm").join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let initrd = rootfs::build(&dir, &kernel, binaries, checks)?;
    let deadline = Duration::from_secs(checks.iter().map(|c| c.timeout_secs).sum::<u64>() + 120);
    let log = dir.join("console.log");
    println!(
        "vm: booting {} ({accel:?}); console in {}",
        kernel.spec.package,
        log.display()
    );
    let boot = qemu::boot(&kernel.vmlinuz, &initrd, accel, deadline, &log)?;
    let expected: Vec<&str> = checks.iter().map(|c| c.name).collect();
    let mut run = matrix::Run::from_console(name, &boot.console, &expected);
    if boot.timed_out {
        run.problems.push(format!(
            "killed after {}s (the VM's deadline)",
            deadline.as_secs()
        ));
    }
    run.took = boot.took;
    for line in boot
        .console
        .iter()
        .filter(|l| l.starts_with(rootfs::OUTPUT_PREFIX))
    {
        println!("vm: {name} {line}");
    }
    Ok(run)
}

/// Runs the checks on this machine's kernel, the same binaries with the same arguments.
fn run_on_host(checks: &[Check], binaries: &[(String, PathBuf)]) -> Result<matrix::Run> {
    let start = Instant::now();
    let mut run = matrix::Run {
        kernel: HOST.to_string(),
        release: Some(
            cmd::stdout(Command::new("uname").arg("-r"))?
                .trim()
                .to_string(),
        ),
        ..matrix::Run::default()
    };
    let session = &binaries[0].1;
    for check in checks {
        let binary = binaries
            .iter()
            .find(|(name, _)| name == check.binary)
            .map(|(_, path)| path)
            .context("a check's binary was not built")?;
        println!("vm: host: {}", check.name);
        let began = Instant::now();
        let out = Command::new("timeout")
            .args(["-k", "5", &check.timeout_secs.to_string()])
            .arg(binary)
            .args(&check.args)
            .envs(check.env.iter().map(|(k, v)| (k, v)))
            .env("SESSION_BIN", session)
            .env("RUST_BACKTRACE", "1")
            .output()
            .with_context(|| format!("could not run {}", binary.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines() {
            let mut words = matrix::unprefixed(line).split_whitespace();
            if words.next() == Some(matrix::INSNS_MARK) {
                run.add_insns(words.next(), words.next());
            }
        }
        if !out.status.success() {
            println!("{text}{}", String::from_utf8_lossy(&out.stderr));
        }
        run.results.push(matrix::CheckResult {
            name: check.name.to_string(),
            passed: out.status.success(),
            secs: began.elapsed().as_secs_f64(),
        });
    }
    run.took = start.elapsed();
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_executable_is_found_among_cargo_messages() {
        let messages = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"x"},"executable":null}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"kernel_path"},"executable":"/t/kernel_path-abc"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            test_executable(messages, "kernel_path"),
            Some(PathBuf::from("/t/kernel_path-abc"))
        );
        assert_eq!(
            test_executable(messages, "x"),
            None,
            "a library is not a test"
        );
    }
}
