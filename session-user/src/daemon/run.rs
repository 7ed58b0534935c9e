//! `session run`: load, attach through pinned links, apply the policy, reap, reload on
//! SIGHUP; on exit the links stay, so enforcement continues without the daemon.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use log::{error, info, warn};
use session_common::{
    clock::TickClock,
    wire::{DaemonCounter, map_names, settings_flags},
};
use tokio::{
    signal::unix::{SignalKind, signal},
    task::{self, JoinHandle},
};

use crate::{
    bpf::{clock, clock::monotonic_ns, kernel_log, links, loader, netdev, pinned::PinnedMaps},
    continuity,
    daemon::{
        events::EventHub,
        lock::InstanceLock,
        metrics, privileges, readmission,
        reaper::{self, REAP_INTERVAL, next_reap_delay},
        set_events::{SET_WATCH_INTERVAL, SetWatch},
        sync_task,
    },
    policy::{
        compile::{CompiledPolicy, compile},
        config::{self, Config},
    },
};

/// Options of `session run`.
pub struct RunOptions {
    /// The configuration file.
    pub config: PathBuf,
    /// Interfaces given on the command line, in addition to the config's.
    pub ifaces: Vec<String>,
    /// Where the maps are pinned.
    pub pin_dir: PathBuf,
    /// A table `session save` wrote, restored when the daemon creates a new table.
    pub restore: Option<PathBuf>,
}

fn compile_for_host(config: &Config) -> Result<CompiledPolicy> {
    Ok(compile(&config.policy, loader::ifindex)?)
}

fn interfaces(config: &Config, extra: &[String]) -> Result<Vec<(String, u32)>> {
    let mut names: Vec<String> = config.interfaces.clone();
    for iface in extra {
        if !names.contains(iface) {
            names.push(iface.clone());
        }
    }
    if names.is_empty() {
        bail!(
            "no interfaces to protect: list them in `interfaces = [...]` in the config or pass --iface NAME"
        );
    }
    if let Some(stray) = config.tc_ingress.iter().find(|name| !names.contains(name)) {
        bail!(
            "`[attach] tc_ingress` names `{stray}`, which is not an interface to protect: add it to `interfaces = [...]` or pass --iface {stray}, or remove it from tc_ingress"
        );
    }
    names
        .into_iter()
        .map(|name| match loader::ifindex(&name) {
            Some(index) => Ok((name, index)),
            None => bail!("interface `{name}` does not exist on this host (see `ip link`)"),
        })
        .collect()
}

/// Runs the daemon until SIGINT or SIGTERM. The programs stay attached afterwards,
/// through their pinned links, with the last applied policy; `session down` removes them.
pub async fn run(options: RunOptions) -> Result<()> {
    let config = config::load(&options.config)?;
    for warning in &config.warnings {
        warn!("{warning}");
    }
    let mut ifaces = interfaces(&config, &options.ifaces)?;
    links::check_kernel()?;
    let _lock = InstanceLock::acquire(&options.pin_dir, &options.config)?;
    let policy = compile_for_host(&config)?;
    loader::check_bpffs(&options.pin_dir)?;
    let fresh = !options.pin_dir.exists();
    let pinned_before = links::pinned_interfaces(&options.pin_dir)?;
    let ebpf = match start(&options, &config, &policy, &ifaces, &pinned_before) {
        Ok(ebpf) => ebpf,
        Err(error) => {
            if fresh && let Err(cleanup) = std::fs::remove_dir_all(&options.pin_dir) {
                warn!(
                    "could not remove {} after the failed start: {cleanup}",
                    options.pin_dir.display()
                );
            }
            return Err(error);
        }
    };
    let maps = PinnedMaps::open(&options.pin_dir)?;
    for stale in pinned_before
        .iter()
        .filter(|name| !ifaces.iter().any(|(have, _)| have == *name))
    {
        links::detach_and_wait(&options.pin_dir, stale)?;
        if let Some(index) = loader::ifindex(stale) {
            maps.set_managed(index, false)?;
        }
        info!("{stale}: no longer configured, detached");
    }
    // The links are pinned: the object's own handles are no longer needed.
    drop(ebpf);
    // Both bind sockets and open maps: done while the daemon still has its privileges.
    let _metrics = match config.metrics {
        Some(addr) => Some(metrics::start(addr, &options.pin_dir).await?),
        None => None,
    };
    let sync = config
        .sync
        .as_ref()
        .map(|sync| sync_task::prepare(sync, &maps))
        .transpose()?;
    // Without a peer to wait for, the table may take traffic as soon as it is in force;
    // with one, the sync thread says when (`session sync check`).
    let ready_pid = if sync.is_none() {
        std::process::id().into()
    } else {
        0
    };
    maps.set_daemon_counter(DaemonCounter::SyncReadyPid, ready_pid)?;
    let events = Arc::new(EventHub::start(
        &maps,
        sync.as_ref().map(sync_task::Prepared::nudge),
    )?);
    privileges::drop_all_capabilities()?;
    let _sync = sync.map(sync_task::Prepared::spawn).transpose()?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "session: ready").context("writing to stdout")?;
        stdout.flush().context("flushing stdout")?;
    }
    let result = serve(&options, &maps, &mut ifaces, &config, &events).await;
    info!(
        "exiting; {} interface(s) stay protected by the pinned links under {} with the last applied policy (`session down` removes them)",
        ifaces.len(),
        options.pin_dir.display()
    );
    result
}

/// Loads the programs with the pinned maps, applies settings and policy, and attaches to
/// every interface. When an interface fails, the interfaces this call attached afresh are
/// detached again; those whose links a previous daemon pinned keep running.
fn start(
    options: &RunOptions,
    config: &Config,
    policy: &CompiledPolicy,
    ifaces: &[(String, u32)],
    pinned_before: &[String],
) -> Result<aya::Ebpf> {
    // A new table (first start, or after `session down`) is seeded before attaching.
    let new_table = !options.pin_dir.join(map_names::SESSIONS).exists();
    let mut ebpf = loader::load(
        &options.pin_dir,
        loader::Sizes {
            max_sessions: config.max_sessions,
            max_set_entries: config.policy.max_set_entries,
            max_tracked_sources: config.max_tracked_sources,
        },
        !config.tc_ingress.is_empty(),
        config.kernel_log_level,
    )?;
    kernel_log::forward(&mut ebpf)?;
    let maps = PinnedMaps::open(&options.pin_dir)?;
    maps.write_syn_defence(&config.syn_defence)?;
    maps.write_settings(&config.settings)?;
    let clock = clock::calibrate(&mut ebpf).unwrap_or_else(|error| {
        warn!(
            "{error:#}; the programs read the kernel's coarse clock instead, which cost 18–27 ns a packet more where measured"
        );
        TickClock::default()
    });
    maps.write_clock(clock)?;
    let generation = maps.apply_policy(policy)?;
    if new_table {
        let protected: Vec<u32> = ifaces.iter().map(|(_, index)| *index).collect();
        continuity::seed(
            &maps,
            options.restore.as_deref(),
            &config.settings,
            &protected,
        );
    }
    // Sessions kept from before a restart count against the limits from the start.
    maps.recount_limits(monotonic_ns())?;
    remove_refused(&maps, policy)?;
    maps.rebuild_presence()?;
    maps.bump(DaemonCounter::PolicyApplies, 1)?;
    info!(
        "policy generation {generation} active: {} rules, {} kernel entries",
        policy.names.len(),
        policy.entries.len()
    );
    for (done, (name, index)) in ifaces.iter().enumerate() {
        let attached = maps
            .set_managed(*index, true)
            .and_then(|()| {
                let tc_ingress = config.tc_ingress.contains(name);
                loader::attach(&mut ebpf, &options.pin_dir, name, tc_ingress)
            })
            .and_then(|()| offer_fast_path(&maps, config, name, *index));
        if let Err(error) = attached {
            for (name, index) in &ifaces[..=done] {
                if pinned_before.contains(name) {
                    continue;
                }
                if let Err(undo) = links::detach_and_wait(&options.pin_dir, name)
                    .and_then(|_| maps.set_managed(*index, false))
                {
                    warn!("{name}: could not undo the attachment: {undo:#}");
                }
            }
            return Err(error);
        }
    }
    Ok(ebpf)
}

/// The event loop: signals, interface checks and the reaper's timer. Each sweep runs as a
/// blocking task off this loop (a sweep of a million sessions takes most of a second, in
/// which the event ring, `session events` clients, metrics and signals would otherwise
/// wait); the next one is scheduled when it ends, so sweeps never overlap.
async fn serve(
    options: &RunOptions,
    maps: &PinnedMaps,
    ifaces: &mut Vec<(String, u32)>,
    started: &Config,
    events: &Arc<EventHub>,
) -> Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let mut housekeeping = tokio::time::interval(REAP_INTERVAL);
    // The first sweep runs at once: a restarted daemon frees what expired meanwhile.
    let reaper = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(reaper);
    let mut set_watch = SetWatch::new(maps);
    let mut set_ticks = tokio::time::interval(SET_WATCH_INTERVAL);
    let mut sweep: Option<JoinHandle<Duration>> = None;
    loop {
        tokio::select! {
            _ = sigint.recv() => { info!("SIGINT: shutting down"); return Ok(()); }
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); return Ok(()); }
            _ = sighup.recv() => reload(&options.config, maps, ifaces, started),
            _ = housekeeping.tick() => watch_interfaces(&options.pin_dir, maps, ifaces),
            _ = set_ticks.tick() => set_watch.poll(maps, events),
            _ = &mut reaper, if sweep.is_none() => {
                let (maps, events) = (maps.clone(), Arc::clone(events));
                sweep = Some(task::spawn_blocking(move || reaper::reap(&maps, &events)));
            }
            swept = async { sweep.as_mut().expect("guarded by is_some").await }, if sweep.is_some() => {
                sweep = None;
                let took = swept.unwrap_or_else(|error| {
                    error!("reaper: the sweep failed: {error}");
                    REAP_INTERVAL
                });
                reaper.as_mut().reset(tokio::time::Instant::now() + next_reap_delay(took));
            }
        }
    }
}

/// Applies the config file again; a bad file is reported and changes nothing. Which
/// interfaces are attached, with which ingress program, and the kernel programs' log
/// level stay as the daemon `started`.
fn reload(path: &Path, maps: &PinnedMaps, ifaces: &[(String, u32)], started: &Config) {
    let attached_tc_ingress = &started.tc_ingress[..];
    let applied = config::load(path)
        .map_err(anyhow::Error::from)
        .and_then(|config| {
            let wanted: Vec<&String> = config.interfaces.iter().collect();
            if wanted
                .iter()
                .any(|name| !ifaces.iter().any(|(have, _)| have == *name))
            {
                warn!("reload: interface changes need a restart; keeping the attached set");
            }
            let differs = |a: &[String], b: &[String]| a.iter().any(|name| !b.contains(name));
            if differs(&config.tc_ingress, attached_tc_ingress)
                || differs(attached_tc_ingress, &config.tc_ingress)
            {
                warn!(
                    "reload: changes to `[attach] tc_ingress` need a restart; each interface keeps its ingress program"
                );
            }
            if config.sync != started.sync {
                warn!("reload: changes to `[sync]` need a restart; the sync link keeps its settings");
            }
            if config.kernel_log_level != started.kernel_log_level {
                warn!(
                    "reload: changes to `[logging] kernel_level` need a restart; the kernel programs keep logging at {}",
                    started.kernel_log_level
                );
            }
            let policy = compile_for_host(&config)?;
            maps.write_syn_defence(&config.syn_defence)?;
            maps.write_settings(&config.settings)?;
            let generation = maps.apply_policy(&policy)?;
            remove_refused(maps, &policy)?;
            // The new policy's limits count the sessions that exist, from now on.
            maps.recount_limits(monotonic_ns())?;
            // Last: `session reload` waits for this count to know the apply is complete.
            maps.bump(DaemonCounter::PolicyApplies, 1)?;
            Ok(generation)
        });
    match applied {
        Ok(generation) => info!("reload: policy generation {generation} active"),
        Err(error) => error!("reload refused, previous policy still active: {error:#}"),
    }
}

/// Removes the sessions the policy just applied would not admit (see [`readmit`]); the
/// sessions left were admitted under an older policy and are still welcome.
fn remove_refused(maps: &PinnedMaps, policy: &CompiledPolicy) -> Result<()> {
    let sessions = maps.live_sessions(monotonic_ns())?;
    let refused = readmission::refused(policy, &sessions);
    if refused.is_empty() {
        return Ok(());
    }
    let removed = maps.remove_sessions(&refused)?;
    maps.bump(DaemonCounter::SessionsReadmissionRefused, removed)?;
    info!("removed {removed} session(s) that the policy now in force would not admit");
    Ok(())
}

/// Notices protected interfaces that were removed: their links went with them, so their
/// pins are removed and the daemon goes on enforcing on the others.
fn watch_interfaces(pin_dir: &Path, maps: &PinnedMaps, ifaces: &mut Vec<(String, u32)>) {
    let (gone, kept): (Vec<_>, Vec<_>) = ifaces
        .drain(..)
        .partition(|(name, index)| loader::ifindex(name) != Some(*index));
    *ifaces = kept;
    for (name, index) in gone {
        let others: Vec<&str> = ifaces.iter().map(|(name, _)| name.as_str()).collect();
        warn!(
            "{name}: interface removed; still enforcing on [{}]",
            others.join(", ")
        );
        if let Err(error) =
            links::detach(pin_dir, &name).and_then(|_| maps.set_managed(index, false))
        {
            warn!("{name}: could not remove its pinned links: {error:#}");
        }
    }
}

/// Makes `name` one of the fast path's ports if it can transmit the frames XDP redirects
/// to it; the kernel would drop them silently otherwise. Said when the config turns the
/// fast path on, since then an interface left out is a surprise.
fn offer_fast_path(maps: &PinnedMaps, config: &Config, name: &str, index: u32) -> Result<()> {
    let why_not = match netdev::can_transmit_xdp(index) {
        Ok(Some(true)) => return maps.add_fast_path_port(index),
        Ok(Some(false)) => "its driver cannot transmit frames redirected by XDP (for a veth, turn GRO on at its peer: `ethtool -K PEER gro on`)".to_string(),
        Ok(None) => "this kernel cannot tell whether it can transmit frames redirected by XDP (Linux 6.3 and later can)".to_string(),
        Err(error) => format!("{error:#}"),
    };
    if config.settings.flags & settings_flags::FAST_PATH != 0 {
        warn!("{name}: the fast path will not forward out of it: {why_not}");
    }
    Ok(())
}
