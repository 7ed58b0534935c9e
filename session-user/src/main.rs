//! The `session` command: a stateful eBPF firewall daemon and the tools to inspect it.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use session_user::{
    compile::compile,
    config,
    daemon::{self, RunOptions},
    instance::Owner,
    loader,
    maps::{DEFAULT_PIN_DIR, PinnedMaps, monotonic_ns},
    report::{SessionFilter, SessionView, Stats, sessions_table},
};

/// How long `session reload` waits for the daemon to switch policy.
const RELOAD_WAIT: Duration = Duration::from_secs(5);

/// Validates the daemon's config here (so errors reach the operator, not only the
/// daemon's log), signals the daemon, and waits for the new policy generation.
fn reload(pin_dir: &Path) -> Result<()> {
    let owner = Owner::find(pin_dir)?;
    let config =
        config::load(&owner.config).context("reload refused, the running policy is unchanged")?;
    compile(&config.policy, loader::ifindex)
        .context("reload refused, the running policy is unchanged")?;
    let maps = PinnedMaps::open(pin_dir)?;
    let (_, before) = maps.active_policy()?;
    // SAFETY: kill with a pid read from the daemon's own lock file and a valid signal.
    if unsafe { libc::kill(owner.pid, libc::SIGHUP) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("signalling the daemon (pid {})", owner.pid));
    }
    let deadline = Instant::now() + RELOAD_WAIT;
    while Instant::now() < deadline {
        let (_, now) = maps.active_policy()?;
        if now.generation != before.generation {
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

/// Stateful firewall and connection tracking in eBPF (XDP ingress, TC egress).
///
/// Start the firewall with `session run --config FILE`; inspect it from another shell with
/// `session list` and `session stats`; validate a config with `session check FILE`.
#[derive(Parser)]
#[command(name = "session", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct PinDir {
    /// bpffs directory holding the firewall's pinned maps.
    #[arg(long, env = "SESSION_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the firewall in the foreground until SIGINT/SIGTERM (SIGHUP reloads the config).
    Run {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Interface to protect, in addition to the config's `interfaces` (repeatable).
        #[arg(long = "iface", value_name = "NAME")]
        ifaces: Vec<String>,
        #[command(flatten)]
        pin: PinDir,
    },
    /// List tracked sessions (like `conntrack -L`).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        filter: SessionFilter,
        #[command(flatten)]
        pin: PinDir,
    },
    /// Delete tracked sessions (all, or those matching the filters), like `conntrack -F`.
    Flush {
        #[command(flatten)]
        filter: SessionFilter,
        #[command(flatten)]
        pin: PinDir,
    },
    /// Validate the running daemon's config file and make it apply it (like SIGHUP).
    Reload {
        #[command(flatten)]
        pin: PinDir,
    },
    /// Show counters, rule hits and table fill.
    Stats {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pin: PinDir,
    },
    /// Validate a configuration file without applying it.
    Check {
        /// Configuration file (TOML).
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("session: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Run {
            config,
            ifaces,
            pin,
        } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(daemon::run(RunOptions {
                config,
                ifaces,
                pin_dir: pin.pin_dir,
            }))
        }
        Command::List { json, filter, pin } => {
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
                let array: Vec<_> = views.iter().map(SessionView::to_json).collect();
                println!("{}", serde_json::to_string_pretty(&array)?);
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
            );
            if json {
                println!("{}", serde_json::to_string_pretty(&stats.to_json())?);
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
            Ok(())
        }
    }
}
