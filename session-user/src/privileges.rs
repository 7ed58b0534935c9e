//! Giving up privileges once the programs are attached: the daemon's remaining work
//! (applying policies, reaping, reading counters) only touches maps it reaches through
//! root-owned pins, so a compromised daemon should not keep the rest of root's powers.

use anyhow::{Context as _, Result};
use log::{debug, info};

/// CAP_BPF: opening pinned maps (`BPF_OBJ_GET`) and reading and writing them. It is the
/// only capability the daemon uses after attaching; the tests check that reloads, the
/// reaper and interface removal work with it alone.
const CAP_BPF: u32 = 39;

/// The capabilities the daemon keeps.
const KEPT: &[u32] = &[CAP_BPF];

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets in two 32-bit words.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn mask_of(caps: &[u32]) -> u64 {
    caps.iter().fold(0, |mask, cap| mask | 1 << cap)
}

fn last_capability() -> Result<u32> {
    let text = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .context("reading /proc/sys/kernel/cap_last_cap")?;
    text.trim()
        .parse()
        .with_context(|| format!("/proc/sys/kernel/cap_last_cap holds {text:?}"))
}

fn capget() -> Result<[CapData; 2]> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget fills two CapData words for a version 3 header we own.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("capget");
    }
    Ok(data)
}

fn capset(data: &[CapData; 2]) -> Result<()> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: capset reads two CapData words for a version 3 header we own.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("capset");
    }
    Ok(())
}

fn prctl(option: libc::c_int, arg: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(option, arg, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Drops every capability except [`KEPT`] from the effective, permitted, inheritable,
/// ambient and bounding sets, and forbids gaining privileges through execve. Must run
/// before the process starts other threads: capabilities belong to a thread, and new
/// threads inherit the sets of the thread that creates them.
pub fn drop_capabilities() -> Result<()> {
    let keep = mask_of(KEPT);
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1).context("setting no_new_privs")?;
    prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    )
    .context("clearing the ambient capabilities")?;
    // The bounding set needs CAP_SETPCAP, which a daemon started with only the
    // capabilities it needs (systemd's CapabilityBoundingSet=) lacks; its bounding set
    // is then already narrow, so that is not an error.
    for cap in 0..=last_capability()? {
        if keep & (1 << cap) == 0
            && let Err(error) = prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong)
        {
            debug!("bounding set left as is: {error}");
            break;
        }
    }
    let current = capget()?;
    let mut wanted = [CapData::default(); 2];
    for (word, (now, new)) in current.iter().zip(wanted.iter_mut()).enumerate() {
        let keep_word = (keep >> (32 * word)) as u32;
        new.permitted = now.permitted & keep_word;
        new.effective = new.permitted;
    }
    capset(&wanted).context("dropping capabilities")?;
    info!("dropped all capabilities but CAP_BPF");
    Ok(())
}
