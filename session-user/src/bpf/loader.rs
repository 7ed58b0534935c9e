//! Loading the embedded eBPF object with its maps pinned, and attaching its programs.

use std::{os::unix::fs::DirBuilderExt as _, path::Path};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::lpm_trie::Key as LpmKey,
    programs::{SchedClassifier, Xdp},
};
use session_common::{
    limits::DEFAULT_MAX_TRACKED_SOURCES,
    presence,
    sets::{SET_KEY_STORAGE_BITS, SetKey, SetValue},
    wire::{Counter, DaemonCounter, Session, Settings, map_names},
};

use crate::{
    bpf::{
        batch,
        kernel_log::{self, KernelLogLevel},
        links,
        pinned::{PinnedMaps, pinned_map_info},
    },
    daemon::lock::SetsLock,
    policy::sets::{DEFAULT_MAX_SET_ENTRIES, set_host_capacity},
};

/// The eBPF object built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/session"));

const INGRESS_PROGRAM: &str = "session_ingress";
const INGRESS_TC_PROGRAM: &str = "session_ingress_tc";
const EGRESS_PROGRAM: &str = "session_egress";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Refuses early, with what to do, when the pin directory is not on a bpffs.
pub fn check_bpffs(pin_dir: &Path) -> Result<()> {
    let mut probe = pin_dir;
    while !probe.exists() {
        probe = probe.parent().with_context(|| {
            format!("pin directory {} has no existing parent", pin_dir.display())
        })?;
    }
    let stat = rustix::fs::statfs(probe)
        .map_err(std::io::Error::from)
        .with_context(|| format!("cannot stat {}", probe.display()))?;
    if stat.f_type as i64 != BPF_FS_MAGIC {
        bail!(
            "{} is not on a BPF filesystem: mount one with `mount -t bpf bpf /sys/fs/bpf` (`cargo xtask setup` does it) or pass --pin-dir under a bpffs",
            probe.display()
        );
    }
    Ok(())
}

/// Makes sure `pin_dir` is on a bpffs and exists, readable by root only.
fn create_pin_dir(pin_dir: &Path) -> Result<()> {
    check_bpffs(pin_dir)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(pin_dir)
        .with_context(|| format!("creating pin directory {}", pin_dir.display()))
}

/// Size of the unassured tier for a protected table of `max_sessions`: a quarter of it, as
/// room for handshakes in progress, and never less than 1024.
pub fn unassured_capacity(max_sessions: u32) -> u32 {
    (max_sessions / 4).max(1024)
}

/// What the loader sizes from the config.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// `max_sessions`: the protected tier's entries.
    pub max_sessions: u32,
    /// `[limits] max_set_entries`: sizes the sets' host hash ([`set_host_capacity`]).
    pub max_set_entries: u32,
    /// `[limits] max_tracked_sources`: the rules' limits' LRU of sources.
    pub max_tracked_sources: u32,
}

impl Sizes {
    /// A table of `max_sessions` with the default set limit, as a config that leaves
    /// `[limits] max_set_entries` out gets.
    pub fn sessions(max_sessions: u32) -> Self {
        Sizes {
            max_sessions,
            max_set_entries: DEFAULT_MAX_SET_ENTRIES,
            max_tracked_sources: DEFAULT_MAX_TRACKED_SOURCES,
        }
    }
}

/// Loads the object, reusing maps already pinned under `pin_dir` (so sessions and
/// counters survive a restart) and pinning new ones there with root-only access. The TC
/// ingress program is loaded only when `tc_ingress` says some interface needs it: the
/// verifier takes a while over each program. The programs log at `log_level` and above
/// (see [`kernel_log`]), fixed here so that the verifier prunes the sites below it.
pub fn load(
    pin_dir: &Path,
    sizes: Sizes,
    tc_ingress: bool,
    log_level: KernelLogLevel,
) -> Result<Ebpf> {
    let Sizes {
        max_sessions,
        max_set_entries,
        max_tracked_sources,
    } = sizes;
    create_pin_dir(pin_dir)?;
    unpin_retired_maps(pin_dir)?;
    // Held until the resized host hash has its entries back, so no `session set` change
    // falls between the two maps.
    let _sets = SetsLock::acquire(pin_dir)?;
    let host_capacity = set_host_capacity(max_set_entries);
    let carried_hosts = unpin_resized_set_hosts(pin_dir, host_capacity)?;
    let slot_bits = presence::slot_bits_for(max_sessions);
    unpin_resized_sources(pin_dir, max_tracked_sources)?;
    recreate_resized_counters(
        pin_dir,
        &[
            (map_names::COUNTERS, Counter::COUNT),
            (map_names::DAEMON_COUNTERS, DaemonCounter::COUNT),
        ],
    )?;
    check_pinned_sizes(
        pin_dir,
        &[
            (map_names::SESSIONS, max_sessions, size_of::<Session>()),
            (
                map_names::UNASSURED,
                unassured_capacity(max_sessions),
                size_of::<Session>(),
            ),
            (
                map_names::PRESENCE,
                presence::words(slot_bits),
                size_of::<u64>(),
            ),
            (map_names::SETTINGS, 1, size_of::<Settings>()),
        ],
    )?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .map_max_entries(map_names::SESSIONS, max_sessions)
        .map_max_entries(map_names::UNASSURED, unassured_capacity(max_sessions))
        .map_max_entries(map_names::PRESENCE, presence::words(slot_bits))
        .map_max_entries(map_names::SET_HOSTS, host_capacity)
        .map_max_entries(map_names::SRC_LIMITS, max_tracked_sources)
        .override_global("PRESENCE_SLOT_BITS", &slot_bits, true)
        .override_global(kernel_log::LEVEL_GLOBAL, &(log_level as u8), true)
        .load(EBPF_OBJECT)
        .with_context(|| {
            format!(
                "loading the eBPF program with maps pinned in {}",
                pin_dir.display()
            )
        })?;
    let ingress: &mut Xdp = program(&mut ebpf, INGRESS_PROGRAM)?
        .try_into()
        .context("ingress program is not XDP")?;
    ingress
        .load()
        .context("the kernel rejected the XDP program")?;
    let egress: &mut SchedClassifier = program(&mut ebpf, EGRESS_PROGRAM)?
        .try_into()
        .context("egress program is not a TC classifier")?;
    egress
        .load()
        .context("the kernel rejected the TC program")?;
    if tc_ingress {
        let ingress: &mut SchedClassifier = program(&mut ebpf, INGRESS_TC_PROGRAM)?
            .try_into()
            .context("TC ingress program is not a TC classifier")?;
        ingress
            .load()
            .context("the kernel rejected the TC ingress program")?;
    }
    if !carried_hosts.is_empty() {
        PinnedMaps::open(pin_dir)?
            .store_set_prefixes(&carried_hosts)
            .context("moving the sets' addresses into the resized SET_HOSTS")?;
    }
    Ok(ebpf)
}

/// Maps that earlier versions of session pinned and this one no longer has: their
/// programs may still be attached and keep them alive, but nothing pinned should outlive
/// the upgrade. `PORT_BOUNDS` held the sorted port interval starts that `PORT_INTERVALS`
/// replaced.
const RETIRED_MAPS: &[&str] = &["PORT_BOUNDS"];

/// Unpins the [`RETIRED_MAPS`] an older version left under `pin_dir`.
fn unpin_retired_maps(pin_dir: &Path) -> Result<()> {
    for name in RETIRED_MAPS {
        let path = pin_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => log::info!(
                "unpinned {}, which an older version of session used",
                path.display()
            ),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(error).with_context(|| format!("unpinning {}", path.display()));
            }
        }
    }
    Ok(())
}

/// Unpins the sets' host hash when it was pinned with another size than `capacity` (after
/// a change of `[limits] max_set_entries`), so that the loader creates it afresh, and
/// returns its entries for the new one: the programs still attached read the old map
/// until this daemon's programs replace them, so no packet misses a set's member.
fn unpin_resized_set_hosts(
    pin_dir: &Path,
    capacity: u32,
) -> Result<Vec<(LpmKey<SetKey>, SetValue)>> {
    let path = pin_dir.join(map_names::SET_HOSTS);
    let Some((map, info)) = pinned_map_info(&path)? else {
        return Ok(Vec::new());
    };
    let pinned = info.max_entries();
    if pinned == capacity {
        return Ok(Vec::new());
    }
    let mut entries = Vec::new();
    batch::for_each(&map, |key: &SetKey, value: &SetValue| {
        entries.push((LpmKey::new(SET_KEY_STORAGE_BITS + 128, *key), *value))
    })
    .with_context(|| format!("reading {}", path.display()))?;
    std::fs::remove_file(&path)
        .with_context(|| format!("unpinning {} to resize it", path.display()))?;
    log::info!(
        "{} held room for {pinned} set addresses; [limits] max_set_entries now asks for {capacity}: recreated, its {} addresses carried over",
        path.display(),
        entries.len()
    );
    Ok(entries)
}

/// Unpins the limits' LRU of sources when it was pinned with another size than
/// `[limits] max_tracked_sources` asks for, so that the loader creates it afresh. Nothing
/// is carried over: the daemon recounts every source's sessions from the table once the
/// policy is applied, and only the rate buckets start full again.
fn unpin_resized_sources(pin_dir: &Path, capacity: u32) -> Result<()> {
    let path = pin_dir.join(map_names::SRC_LIMITS);
    let Some((_, info)) = pinned_map_info(&path)? else {
        return Ok(());
    };
    let pinned = info.max_entries();
    if pinned != capacity {
        std::fs::remove_file(&path)
            .with_context(|| format!("unpinning {} to resize it", path.display()))?;
        log::info!(
            "{} tracked {pinned} sources; [limits] max_tracked_sources now asks for {capacity}: recreated, its counts recounted from the table",
            path.display()
        );
    }
    Ok(())
}

/// Unpins the counter arrays of `counters` (name, entries this version has) that another
/// version of session pinned with another number of counters, so that the loader creates
/// them afresh: an upgrade that adds counters keeps the sessions and restarts the counters
/// at zero, where refusing would make the operator run `session down` and lose every
/// session. The programs still attached keep counting into the old array until this
/// daemon's programs replace them.
fn recreate_resized_counters(pin_dir: &Path, counters: &[(&str, u32)]) -> Result<()> {
    for &(name, entries) in counters {
        let path = pin_dir.join(name);
        let Some((_, info)) = pinned_map_info(&path)? else {
            continue;
        };
        let pinned = info.max_entries();
        if pinned != entries {
            std::fs::remove_file(&path)
                .with_context(|| format!("unpinning {} to recreate it", path.display()))?;
            log::info!(
                "{} held {pinned} counters, pinned by another version of session; this one has {entries}: recreated, its counters start again at zero",
                path.display()
            );
        }
    }
    Ok(())
}

/// Refuses maps pinned under `pin_dir` with another size than `sizes` asks for (entries,
/// value bytes): the loader reuses a pinned map as it is, so after a change of
/// `max_sessions` the table would silently keep its old size, and the presence filter
/// would no longer match the program's idea of it; a value of another size comes from
/// another version of session, whose layout the programs cannot read.
fn check_pinned_sizes(pin_dir: &Path, sizes: &[(&str, u32, usize)]) -> Result<()> {
    let down = format!(
        "Run `session down --pin-dir {}` first (it removes the pinned sessions), then start again",
        pin_dir.display()
    );
    for &(name, entries, value_size) in sizes {
        let path = pin_dir.join(name);
        let Some((_, info)) = pinned_map_info(&path)? else {
            continue;
        };
        if info.value_size() as usize != value_size {
            bail!(
                "{} was pinned by another version of session ({} bytes a value, this one needs {value_size}). {down}",
                path.display(),
                info.value_size()
            );
        }
        let pinned = info.max_entries();
        if pinned != entries {
            bail!(
                "{} was pinned with {pinned} entries, but this config needs {entries}: max_sessions changed since the maps were pinned (or another version of session pinned them). {down}",
                path.display()
            );
        }
    }
    Ok(())
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))
}

/// Attaches XDP on ingress (native when the driver supports it), or the TC ingress
/// program when `tc_ingress`, and TCX on egress, as links pinned under `pin_dir` so that
/// they outlive this process (see [`links`]).
pub fn attach(ebpf: &mut Ebpf, pin_dir: &Path, iface: &str, tc_ingress: bool) -> Result<()> {
    let wanted_ingress = if tc_ingress {
        INGRESS_TC_PROGRAM
    } else {
        INGRESS_PROGRAM
    };
    let (mut ingress, mut egress) = (None, None);
    for (name, program) in ebpf.programs_mut() {
        if name == wanted_ingress {
            ingress = Some(program);
        } else if name == EGRESS_PROGRAM {
            egress = Some(program);
        }
    }
    let ingress = ingress
        .with_context(|| format!("program {wanted_ingress} missing from the eBPF object"))?;
    let ingress = if tc_ingress {
        links::Ingress::Tc(ingress.try_into()?)
    } else {
        links::Ingress::Xdp(ingress.try_into()?)
    };
    let egress: &mut SchedClassifier = egress
        .with_context(|| format!("program {EGRESS_PROGRAM} missing from the eBPF object"))?
        .try_into()?;
    links::attach(pin_dir, ingress, egress, iface)
}

/// The index of a network interface, if it exists.
pub fn ifindex(iface: &str) -> Option<u32> {
    crate::bpf::netdev::name_to_index(iface)
}
