//! `session save` and `session restore`, on the pinned maps of a running (or stopped)
//! firewall.

use std::path::Path;

use anyhow::Result;
use session_common::wire::DaemonCounter;

use crate::{
    bpf::{clock::monotonic_ns, pinned::PinnedMaps},
    continuity::import::{self, ImportReport, unix_now_ns},
};

/// `session save FILE`.
pub fn save(pin_dir: &Path, file: &Path) -> Result<()> {
    let maps = PinnedMaps::open(pin_dir)?;
    let count = import::save(&maps, file, monotonic_ns(), unix_now_ns())?;
    println!("saved {count} session(s) to {}", file.display());
    Ok(())
}

/// `session restore FILE`.
pub fn restore(pin_dir: &Path, file: &Path) -> Result<()> {
    let maps = PinnedMaps::open(pin_dir)?;
    let report = restore_into(&maps, file)?;
    println!("{}", describe(&report, file));
    Ok(())
}

/// Restores `file` into `maps` and counts the result in the daemon counters.
pub fn restore_into(maps: &PinnedMaps, file: &Path) -> Result<ImportReport> {
    let report = import::restore(maps, file, monotonic_ns(), unix_now_ns())?;
    maps.bump(DaemonCounter::SessionsRestored, report.imported)?;
    maps.bump(DaemonCounter::RestoreRefused, report.not_imported())?;
    // The restored sessions count against their rules' limits at once.
    maps.recount_limits(monotonic_ns())?;
    Ok(report)
}

/// The one line that says what a restore did.
pub fn describe(report: &ImportReport, file: &Path) -> String {
    format!(
        "restored {} session(s) from {}; {} refused by the policy in force, {} expired while the file waited, {} already in the table",
        report.imported,
        file.display(),
        report.refused,
        report.expired,
        report.present
    )
}
