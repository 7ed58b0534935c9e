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

fn last_capability() -> Result<u32> {
    let text = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .context("reading /proc/sys/kernel/cap_last_cap")?;
    text.trim()
        .parse()
        .with_context(|| format!("/proc/sys/kernel/cap_last_cap holds {text:?}"))
}

fn prctl(option: libc::c_int, arg: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(option, arg, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `CAP_BPF`, from linux/capability.h.
const CAP_BPF: u32 = 39;

/// The capabilities the daemon must keep on this kernel: CAP_BPF before Linux 6.5 while
/// `kernel.unprivileged_bpf_disabled` is set, else none.
fn kept_capabilities() -> Result<Vec<u32>> {
    let version = aya::util::KernelVersion::current().context("reading the kernel version")?;
    if version >= aya::util::KernelVersion::new(6, 5, 0) {
        return Ok(Vec::new());
    }
    let disabled = std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
        .map(|text| text.trim() != "0")
        .unwrap_or(true);
    Ok(if disabled { vec![CAP_BPF] } else { Vec::new() })
}

/// Empties the effective, permitted, inheritable, ambient and bounding capability sets
/// (but for what [`kept_capabilities`] keeps) and forbids gaining privileges through
/// execve. Must run before the process starts other threads: capabilities belong to a
/// thread, and new threads inherit the sets of the thread that creates them.
pub fn drop_all_capabilities() -> Result<()> {
    let keep = kept_capabilities()?;
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1).context("setting no_new_privs")?;
    prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    )
    .context("clearing the ambient capabilities")?;
    // The bounding set needs CAP_SETPCAP, which a daemon started with only the
    // capabilities it needs (systemd's CapabilityBoundingSet=) lacks; its bounding set
    // is then already narrow, so that is not an error.
    for cap in (0..=last_capability()?).filter(|cap| !keep.contains(cap)) {
        if let Err(error) = prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong) {
            debug!("bounding set left as is: {error}");
            break;
        }
    }
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut sets = [CapData::default(); 2];
    for &cap in &keep {
        let word = &mut sets[(cap / 32) as usize];
        word.effective |= 1 << (cap % 32);
        word.permitted |= 1 << (cap % 32);
    }
    // SAFETY: capset reads two CapData words for a version 3 header we own.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, sets.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("dropping capabilities (capset)");
    }
    if keep.is_empty() {
        info!("dropped all capabilities");
    } else {
        info!(
            "dropped all capabilities but CAP_BPF: before Linux 6.5, kernel.unprivileged_bpf_disabled refuses every bpf() command without it"
        );
    }
    Ok(())
}
