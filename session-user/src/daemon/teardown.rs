//! `session down`: stop the daemon of a pin directory and remove everything it leaves in
//! the kernel (pinned links, hence the attachments, and pinned maps), so that a firewall
//! which keeps enforcing without its daemon can still be removed with one command.

use std::{
    io,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use rustix::process::Signal;
use session_common::wire::map_names;

use crate::{
    bpf::{
        links::{self, links_dir},
        loader,
    },
    daemon::{
        events,
        lock::{self, Owner},
    },
};

/// How long the daemon gets to exit after SIGTERM before it is sent SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

/// Sends `signal` to the daemon; one that has already exited is not an error.
fn signal(owner: &Owner, signal: Signal) -> Result<()> {
    match owner.signal(signal) {
        Err(error) if error.raw_os_error() != Some(libc::ESRCH) => {
            Err(error).with_context(|| format!("signalling the daemon (pid {})", owner.pid))
        }
        _ => Ok(()),
    }
}

/// Waits until no daemon holds the lock of `pin_dir`, at most `timeout`.
fn wait_stopped(pin_dir: &Path, timeout: Duration) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if Owner::running(pin_dir)?.is_none() {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(POLL);
    }
}

/// Stops the daemon: SIGTERM, then SIGKILL if it is still there after [`STOP_GRACE`].
fn stop(pin_dir: &Path, owner: &Owner) -> Result<String> {
    signal(owner, Signal::TERM)?;
    if wait_stopped(pin_dir, STOP_GRACE)? {
        return Ok(format!("stopped the daemon (pid {})", owner.pid));
    }
    signal(owner, Signal::KILL)?;
    if wait_stopped(pin_dir, STOP_GRACE)? {
        return Ok(format!(
            "killed the daemon (pid {}), which ignored SIGTERM for {STOP_GRACE:?}",
            owner.pid
        ));
    }
    bail!(
        "the daemon (pid {}) is still running after SIGKILL; nothing was removed",
        owner.pid
    )
}

/// Removes one pinned file, and says so in `report`.
fn remove_pin(path: &Path, what: &str, report: &mut Vec<String>) -> Result<()> {
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    report.push(format!("removed {what} {}", path.display()));
    Ok(())
}

/// Stops the daemon of `pin_dir` if one runs, detaches every pinned link, removes every
/// pin and the directory, and returns one line per thing done. Running it again finds
/// nothing and says so.
pub fn down(pin_dir: &Path) -> Result<Vec<String>> {
    let mut report = Vec::new();
    if let Some(owner) = Owner::running(pin_dir)? {
        report.push(stop(pin_dir, &owner)?);
    }
    // A daemon killed with SIGKILL leaves its lock file and events socket behind.
    for leftover in [
        lock::run_path(pin_dir, "lock"),
        events::socket_path(pin_dir),
    ] {
        if std::fs::remove_file(&leftover).is_ok() {
            report.push(format!("removed {}", leftover.display()));
        }
    }
    match std::fs::metadata(pin_dir) {
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            if report.is_empty() {
                report.push(format!(
                    "nothing to remove: no daemon runs and {} does not exist",
                    pin_dir.display()
                ));
            }
            return Ok(report);
        }
        Err(error) if error.kind() == io::ErrorKind::PermissionDenied => bail!(
            "permission denied reading {}: only root may remove the firewall; run this command as root",
            pin_dir.display()
        ),
        Err(error) => return Err(error).with_context(|| format!("reading {}", pin_dir.display())),
    }
    loader::check_bpffs(pin_dir)?;
    let links = links_dir(pin_dir);
    if !pin_dir.join(map_names::SESSIONS).exists() && !links.exists() {
        bail!(
            "{} holds no session maps or links; refusing to remove it (is --pin-dir right?)",
            pin_dir.display()
        );
    }
    for iface in links::pinned_interfaces(pin_dir)? {
        for path in links::detach_and_wait(pin_dir, &iface)? {
            report.push(format!("detached {iface}: removed link {}", path.display()));
        }
    }
    if links.exists() {
        std::fs::remove_dir(&links).with_context(|| {
            format!(
                "removing {} (it holds files session did not pin)",
                links.display()
            )
        })?;
    }
    let mut maps: Vec<_> = std::fs::read_dir(pin_dir)
        .with_context(|| format!("reading {}", pin_dir.display()))?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<io::Result<_>>()
        .with_context(|| format!("reading {}", pin_dir.display()))?;
    maps.sort();
    for path in maps {
        remove_pin(&path, "map", &mut report)?;
    }
    std::fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    report.push(format!("removed {}", pin_dir.display()));
    Ok(report)
}
