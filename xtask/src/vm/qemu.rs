//! Booting a kernel and an initramfs in qemu and collecting its serial console, with a
//! hard deadline so that a guest that hangs cannot hang the test suite.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{matrix, rootfs};

/// How qemu runs the guest's CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// Software emulation: slow, works everywhere (the default: KVM fails on this
    /// project's machines, see TOOLCHAIN.md).
    Tcg,
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
}

/// What a boot produced.
pub struct Boot {
    /// Every console line, in order.
    pub console: Vec<String>,
    /// Whether the deadline killed the guest.
    pub timed_out: bool,
    /// Wall time from qemu's start to its end.
    pub took: Duration,
}

/// Memory for the guest: the initramfs is unpacked into it, and the tests' maps live in it.
const MEMORY: &str = "2048";

/// Boots `vmlinuz` with `initrd`, writes the console to `log` as it comes (and echoes the
/// result lines), and kills qemu at `deadline`.
pub fn boot(
    vmlinuz: &Path,
    initrd: &Path,
    accel: Accel,
    deadline: Duration,
    log: &Path,
) -> Result<Boot> {
    let mut qemu = Command::new("qemu-system-x86_64");
    match accel {
        Accel::Tcg => qemu.args(["-accel", "tcg", "-cpu", "max"]),
        Accel::Kvm => qemu.args(["-accel", "kvm", "-cpu", "host"]),
    };
    qemu.args(["-smp", "2", "-m", MEMORY])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = qemu.spawn().context(
        "could not start qemu-system-x86_64: install qemu-system-x86 (`cargo xtask setup` does)",
    )?;
    let stdout = child.stdout.take().context("qemu's stdout")?;
    let stderr = child.stderr.take().context("qemu's stderr")?;
    let (tx, rx) = mpsc::channel();
    let err_tx = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if err_tx.send(format!("qemu: {line}")).is_err() {
                break;
            }
        }
    });
    let mut file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut console = Vec::new();
    let mut timed_out = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_string();
                writeln!(file, "{line}").with_context(|| format!("writing {}", log.display()))?;
                let marked = matrix::unprefixed(&line);
                if marked.starts_with(rootfs::RESULT_MARK)
                    || marked.starts_with(rootfs::BOOTED_MARK)
                    || marked.starts_with(rootfs::MODULE_FAILED_MARK)
                    || marked.starts_with(rootfs::PROGRESS_MARK)
                    || line.starts_with("qemu: ")
                {
                    println!("vm:   {line}");
                }
                console.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if start.elapsed() > deadline {
            timed_out = true;
            // The child is ours; kill it by its handle.
            child.kill().ok();
            break;
        }
    }
    child.wait().context("waiting for qemu")?;
    while let Ok(line) = rx.try_recv() {
        console.push(line);
    }
    Ok(Boot {
        console,
        timed_out,
        took: start.elapsed(),
    })
}
