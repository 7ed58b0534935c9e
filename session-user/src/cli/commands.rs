//! What each command does: `run` and `events` start the async runtime, the others read
//! or change the pinned maps of a running (or stopped) firewall and print the result.

use std::{
    io::Write as _,
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{CommandFactory as _, Parser as _};
use session_common::wire::DaemonCounter;

use crate::{
    bpf::{clock::monotonic_ns, loader, pinned::PinnedMaps},
    cli::{
        self,
        args::{Cli, Command},
        man::man_page,
        views::{SessionView, SourceView, Stats, sessions_table, sources_table},
    },
    daemon::{
        lock::Owner,
        run::{self, RunOptions},
        teardown,
    },
    policy::{compile::compile, config},
};

/// How long `session reload` waits for the daemon to switch policy.
const RELOAD_WAIT: Duration = Duration::from_secs(5);

/// Validates the daemon's config here (so errors reach the operator, not only the
/// daemon's log), signals the daemon, and waits until it has applied the policy (the new
/// generation is active and the sessions it refuses are gone).
fn reload(pin_dir: &Path) -> Result<()> {
    let owner = Owner::find(pin_dir)?;
    let config =
        config::load(&owner.config).context("reload refused, the running policy is unchanged")?;
    compile(&config.policy, loader::ifindex)
        .context("reload refused, the running policy is unchanged")?;
    let maps = PinnedMaps::open(pin_dir)?;
    let applies = maps.daemon_counter(DaemonCounter::PolicyApplies)?;
    owner
        .signal(rustix::process::Signal::HUP)
        .with_context(|| format!("signalling the daemon (pid {})", owner.pid))?;
    let deadline = Instant::now() + RELOAD_WAIT;
    while Instant::now() < deadline {
        if maps.daemon_counter(DaemonCounter::PolicyApplies)? != applies {
            let (_, now) = maps.active_policy()?;
            println!(
                "{}: reloaded, policy generation {} active",
                owner.config.display(),
                now.generation
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "the daemon (pid {}) did not apply the policy within {RELOAD_WAIT:?}; see its log",
        owner.pid
    )
}

/// The `session` binary's entry point: parses the command line, runs the command and
/// turns an error into a message on stderr and exit status 1.
pub fn main() -> ExitCode {
    // The kernel programs' records (target `session_kernel`) pass at every level: the
    // config's `[logging] kernel_level` already chose which the programs emit.
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,session_kernel=trace"),
    )
    .init();
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("session: {error:#}");
            if lacks_root(&error) {
                eprintln!(
                    "session: this command needs root (the firewall's pins, maps and lock are root-only): run it as root, e.g. with sudo"
                );
            }
            ExitCode::FAILURE
        }
    }
}

/// Whether `error` comes from a permission check and we are not root, so the operator
/// learns that the fix is running as root rather than only which file was refused.
fn lacks_root(error: &anyhow::Error) -> bool {
    let root = rustix::process::geteuid().is_root();
    !root
        && error.chain().any(|cause| {
            cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
                io.kind() == std::io::ErrorKind::PermissionDenied
                    || io.raw_os_error() == Some(libc::EPERM)
            })
        })
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Run {
            config,
            ifaces,
            restore,
            pin,
        } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(run::run(RunOptions {
                config,
                ifaces,
                pin_dir: pin.pin_dir,
                restore,
            }))
        }
        Command::Save { file, pin } => crate::continuity::commands::save(&pin.pin_dir, &file),
        Command::Restore { file, pin } => crate::continuity::commands::restore(&pin.pin_dir, &file),
        Command::List {
            json,
            sources: true,
            pin,
            ..
        } => {
            let maps = PinnedMaps::open(&pin.pin_dir)?;
            let names = maps.rule_names()?;
            let views: Vec<SourceView> = maps
                .limit_sources()?
                .iter()
                .map(|entry| SourceView::new(entry, &names))
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&views)?);
            } else {
                print!("{}", sources_table(&views));
            }
            Ok(())
        }
        Command::List {
            json, filter, pin, ..
        } => {
            let maps = PinnedMaps::open(&pin.pin_dir)?;
            let now = monotonic_ns();
            let names = maps.rule_names()?;
            let mut views: Vec<SessionView> = maps
                .live_sessions(now)?
                .iter()
                .map(|(key, session)| SessionView::new(key, session, now, &names))
                .filter(|view| filter.matches(view))
                .collect();
            views.sort_by(|a, b| {
                (a.proto.as_str(), a.src, a.sport, a.dst, a.dport).cmp(&(
                    b.proto.as_str(),
                    b.src,
                    b.sport,
                    b.dst,
                    b.dport,
                ))
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&views)?);
            } else {
                print!("{}", sessions_table(&views));
            }
            Ok(())
        }
        Command::Stats { json, pin } => {
            let maps = PinnedMaps::open(&pin.pin_dir)?;
            let mut counters = maps.counters()?;
            counters.extend(maps.daemon_counters()?);
            let sessions = maps.live_sessions(monotonic_ns())?.len() as u64;
            let stats = Stats::new(
                counters,
                sessions,
                maps.max_sessions()?,
                &maps.rule_names()?,
                &maps.rule_hits()?,
                &maps.limit_stats()?,
            );
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print!("{}", stats.to_text());
            }
            Ok(())
        }
        Command::Flush { filter, pin } => {
            let maps = PinnedMaps::open(&pin.pin_dir)?;
            let now = monotonic_ns();
            let names = maps.rule_names()?;
            let keys: Vec<_> = maps
                .live_sessions(now)?
                .iter()
                .filter(|(key, session)| {
                    filter.matches(&SessionView::new(key, session, now, &names))
                })
                .map(|(key, _)| *key)
                .collect();
            let removed = maps.remove_sessions(&keys)?;
            println!("flushed {removed} session(s)");
            Ok(())
        }
        Command::Reload { pin } => reload(&pin.pin_dir),
        Command::Set { action } => crate::cli::set::run(action),
        Command::Sync { action } => crate::cli::sync::run(action),
        Command::Events { json, pin } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(cli::events::follow(&pin.pin_dir, json)),
        Command::Down { pin } => {
            for line in teardown::down(&pin.pin_dir)? {
                println!("{line}");
            }
            Ok(())
        }
        Command::Check { file } => {
            let config = config::load(&file)?;
            for warning in &config.warnings {
                eprintln!(
                    "{}:{}:{}: warning: {}",
                    warning.path.display(),
                    warning.line,
                    warning.column,
                    warning.message
                );
            }
            println!("{}: ok", file.display());
            for line in crate::cli::set::check_report(&config.policy) {
                println!("{line}");
            }
            for rule in &config.policy.rules {
                if let Some(limit) = &rule.limit {
                    println!("{}", limit.describe(&rule.name));
                }
            }
            if let Some(line) = config.syn_defence.describe() {
                println!("{line}");
            }
            Ok(())
        }
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "session", &mut script);
            write_stdout(&script)
        }
        Command::Man => write_stdout(&man_page()?),
    }
}

/// Writes generated text to stdout, reporting a failed write (e.g. a full disk) as an error.
fn write_stdout(bytes: &[u8]) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .context("writing to stdout")
}
