//! TC attachment through netlink (a clsact qdisc and a cls_bpf filter in direct-action
//! mode) for kernels without TCX links, which arrived in Linux 6.6.
//!
//! A cls_bpf filter belongs to the interface, not to a process: it stays attached after
//! the daemon exits, as a pinned TCX link does. What the link's pin gave, this module
//! gives with a fixed filter address and a marker:
//! - one filter per hook at a fixed priority and handle ([`PRIORITY`], [`HANDLE`]), so a
//!   restarted daemon finds it again and replaces its program with `RTM_NEWTFILTER`
//!   without `NLM_F_CREATE`, which cls_bpf does atomically (the new program is swapped in
//!   under RCU; no packet meets an interface without a program);
//! - the program itself pinned at the hook's marker path under the links directory, so
//!   that `session down` and a restarted daemon know which interfaces have a filter.
//!
//! The difference from TCX: the filter is addressed by (interface, priority, handle), not
//! owned through a file descriptor, so another tool that deletes that filter (`tc filter
//! del`) or the clsact qdisc removes the firewall from that hook, and nothing but the
//! daemon's next start notices. ARCHITECTURE.md documents this.

use std::{io, path::Path};

use anyhow::{Context as _, Result};
use aya::programs::{
    Link as _, ProgramError, SchedClassifier, TcAttachType,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
};
use log::debug;

/// The filter priority of session's programs: 1, so that they judge a packet before any
/// other classifier on the hook (tc numbers its own filters from 49152 down).
pub const PRIORITY: u16 = 1;

/// The filter handle of session's programs, fixed so that a restarted daemon finds the
/// filter it replaces ("SE" in ASCII, to be recognisable in `tc filter show`).
pub const HANDLE: u32 = 0x5345;

fn handle() -> TcHandle {
    TcHandle::new(0, HANDLE as u16)
}

/// The errno inside an aya program error from netlink, if there is one.
fn errno(error: &ProgramError) -> Option<i32> {
    match error {
        ProgramError::TcError(TcError::NetlinkError(e)) | ProgramError::NetlinkError(e) => {
            e.raw_os_error()
        }
        ProgramError::TcError(TcError::IoError(e)) => e.raw_os_error(),
        _ => None,
    }
}

/// Attaches `program` on `side` of `iface` as session's cls_bpf filter, replacing the
/// program of the filter a previous daemon left there (returns `true` then), and pins
/// the program at `marker`.
pub fn attach(
    program: &mut SchedClassifier,
    side: TcAttachType,
    iface: &str,
    marker: &Path,
) -> Result<bool> {
    if let Err(error) = tc::qdisc_add_clsact(iface) {
        // Usually EEXIST: the qdisc is there from a previous daemon or another tool.
        debug!("{iface}: adding the clsact qdisc: {error}");
    }
    let existing = SchedClassifierLink::attached(iface, side, PRIORITY, handle(), None)
        .with_context(|| format!("{iface}: no such interface"))?;
    let (id, adopted) = match program.attach_to_link(existing) {
        Ok(id) => (id, true),
        Err(error) if errno(&error) == Some(libc::ENOENT) => {
            let options = TcAttachOptions::Netlink(NlOptions {
                priority: PRIORITY,
                handle: handle(),
                classid: None,
            });
            let id = program
                .attach_with_options(iface, side, options)
                .with_context(|| {
                    format!(
                        "attaching the {side:?} program to {iface} as a cls_bpf filter (priority {PRIORITY}, handle {HANDLE:#x}); is another filter at that priority with another protocol? (`tc filter show dev {iface} {}`)",
                        side_name(side)
                    )
                })?;
            (id, false)
        }
        Err(error) => {
            return Err(error).with_context(|| {
                format!("replacing the program of session's {side:?} filter on {iface}")
            });
        }
    };
    let link = program.take_link(id)?;
    // The filter must outlive this process: dropping the handle would delete it, and it
    // holds no file descriptor or memory to leak.
    std::mem::forget(link);
    if let Err(error) = std::fs::remove_file(marker)
        && error.kind() != io::ErrorKind::NotFound
    {
        return Err(error).with_context(|| format!("removing the old marker {}", marker.display()));
    }
    program.pin(marker).with_context(|| {
        format!(
            "pinning the program at {} to mark {iface}'s filter",
            marker.display()
        )
    })?;
    Ok(adopted)
}

/// Deletes session's filter on `side` of `iface` if it is there, then the marker. An
/// interface that is gone took its filters with it.
pub fn detach(side: TcAttachType, iface: &str, marker: &Path) -> Result<()> {
    if let Ok(link) = SchedClassifierLink::attached(iface, side, PRIORITY, handle(), None) {
        match link.detach() {
            Ok(()) => {}
            Err(error) if matches!(errno(&error), Some(libc::ENOENT | libc::ENODEV)) => {}
            Err(error) => {
                return Err(error).with_context(|| {
                    format!(
                        "deleting session's {side:?} filter on {iface} (priority {PRIORITY}, handle {HANDLE:#x})"
                    )
                });
            }
        }
    }
    match std::fs::remove_file(marker) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).with_context(|| format!("removing {}", marker.display())),
    }
}

/// `ingress` or `egress`, as `tc` spells the side.
fn side_name(side: TcAttachType) -> &'static str {
    match side {
        TcAttachType::Egress => "egress",
        _ => "ingress",
    }
}

/// Whether this kernel has TCX links (Linux 6.6): without them TC programs attach
/// through netlink. Checked by version, as aya itself does.
pub fn tcx_available() -> Result<bool> {
    let version = aya::util::KernelVersion::current().context("reading the kernel version")?;
    Ok(version >= aya::util::KernelVersion::new(6, 6, 0))
}
