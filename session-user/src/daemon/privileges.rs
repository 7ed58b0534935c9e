//! Giving up privileges once the programs are attached. Everything the daemon does
//! afterwards (opening the pinned maps with `BPF_OBJ_GET`, reading and writing them,
//! removing the pins of a vanished interface) is checked against the pins' owner and
//! mode, and the daemon stays uid 0, their owner; since Linux 6.5
//! `kernel.unprivileged_bpf_disabled` only guards creating maps and loading programs.
//! So the daemon needs no capability at all, and a compromised daemon keeps none of
//! root's powers beyond its own files. The tests check that reloads, the reaper and
//! interface removal work this way.
//!
//! Before Linux 6.5, `kernel.unprivileged_bpf_disabled` (on by default in Debian's and
//! most distributions' kernels) refuses every `bpf()` command to a process without
//! CAP_BPF, opening a pinned map included: there the daemon keeps CAP_BPF alone, which
//! lets it use BPF objects but not reach anything else of root's.

use anyhow::{Context as _, Result};
use log::{debug, info};
use rustix::thread::{self as thread, CapabilitySet, CapabilitySets};

fn last_capability() -> Result<u32> {
    let text = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .context("reading /proc/sys/kernel/cap_last_cap")?;
    text.trim()
        .parse()
        .with_context(|| format!("/proc/sys/kernel/cap_last_cap holds {text:?}"))
}

/// The capabilities the daemon must keep on this kernel: CAP_BPF before Linux 6.5 while
/// `kernel.unprivileged_bpf_disabled` is set, else none.
fn kept_capabilities() -> Result<CapabilitySet> {
    let version = aya::util::KernelVersion::current().context("reading the kernel version")?;
    if version >= aya::util::KernelVersion::new(6, 5, 0) {
        return Ok(CapabilitySet::empty());
    }
    let disabled = std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
        .map(|text| text.trim() != "0")
        .unwrap_or(true);
    Ok(if disabled {
        CapabilitySet::BPF
    } else {
        CapabilitySet::empty()
    })
}

/// Empties the effective, permitted, inheritable, ambient and bounding capability sets
/// (but for what [`kept_capabilities`] keeps) and forbids gaining privileges through
/// execve. Must run before the process starts other threads: capabilities belong to a
/// thread, and new threads inherit the sets of the thread that creates them.
pub fn drop_all_capabilities() -> Result<()> {
    let keep = kept_capabilities()?;
    thread::set_no_new_privs(true).context("setting no_new_privs")?;
    thread::clear_ambient_capability_set().context("clearing the ambient capabilities")?;
    // The bounding set needs CAP_SETPCAP, which a daemon started with only the
    // capabilities it needs (systemd's CapabilityBoundingSet=) lacks; its bounding set
    // is then already narrow, so that is not an error. Capabilities past the 64 that a
    // version 3 set holds do not exist.
    for cap in 0..=last_capability()?.min(63) {
        let one = CapabilitySet::from_bits_retain(1 << cap);
        if keep.contains(one) {
            continue;
        }
        if let Err(error) = thread::remove_capability_from_bounding_set(one) {
            debug!("bounding set left as is: {error}");
            break;
        }
    }
    thread::set_capabilities(
        None,
        CapabilitySets {
            effective: keep,
            permitted: keep,
            inheritable: CapabilitySet::empty(),
        },
    )
    .context("dropping capabilities (capset)")?;
    if keep.is_empty() {
        info!("dropped all capabilities");
    } else {
        info!(
            "dropped all capabilities but CAP_BPF: before Linux 6.5, kernel.unprivileged_bpf_disabled refuses every bpf() command without it"
        );
    }
    Ok(())
}
