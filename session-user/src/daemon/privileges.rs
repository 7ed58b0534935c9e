//! Giving up privileges once the programs are attached. Everything the daemon does
//! afterwards (opening the pinned maps with `BPF_OBJ_GET`, reading and writing them,
//! removing the pins of a vanished interface) is checked against the pins' owner and
//! mode, and the daemon stays uid 0, their owner; since Linux 6.5
//! `kernel.unprivileged_bpf_disabled` only guards creating maps and loading programs.
//! So the daemon needs no capability at all, and a compromised daemon keeps none of
//! root's powers beyond its own files. The tests check that reloads, the reaper and
//! interface removal work this way.

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

/// Empties the effective, permitted, inheritable, ambient and bounding capability sets
/// and forbids gaining privileges through execve. Must run before the process starts
/// other threads: capabilities belong to a thread, and new threads inherit the sets of
/// the thread that creates them.
pub fn drop_all_capabilities() -> Result<()> {
    thread::set_no_new_privs(true).context("setting no_new_privs")?;
    thread::clear_ambient_capability_set().context("clearing the ambient capabilities")?;
    // The bounding set needs CAP_SETPCAP, which a daemon started with only the
    // capabilities it needs (systemd's CapabilityBoundingSet=) lacks; its bounding set
    // is then already narrow, so that is not an error. Capabilities past the 64 that a
    // version 3 set holds do not exist.
    for cap in 0..=last_capability()?.min(63) {
        let one = CapabilitySet::from_bits_retain(1 << cap);
        if let Err(error) = thread::remove_capability_from_bounding_set(one) {
            debug!("bounding set left as is: {error}");
            break;
        }
    }
    thread::set_capabilities(
        None,
        CapabilitySets {
            effective: CapabilitySet::empty(),
            permitted: CapabilitySet::empty(),
            inheritable: CapabilitySet::empty(),
        },
    )
    .context("dropping capabilities (capset)")?;
    info!("dropped all capabilities");
    Ok(())
}
