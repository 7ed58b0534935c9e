//! The `session` command: a stateful eBPF firewall daemon and the tools to inspect it.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{CommandFactory as _, Parser, Subcommand};
use clap_complete::Shell;
use clap_mangen::{
    Man,
    roff::{Roff, bold, italic, roman},
};
use session_common::wire::DaemonCounter;
use session_user::{
    compile::compile,
    config,
    daemon::{self, RunOptions},
    events,
    instance::Owner,
    loader,
    maps::{DEFAULT_PIN_DIR, PinnedMaps, monotonic_ns},
    report::{SessionFilter, SessionView, Stats, sessions_table},
    teardown,
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
    // SAFETY: kill with a pid read from the daemon's own lock file and a valid signal.
    if unsafe { libc::kill(owner.pid, libc::SIGHUP) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("signalling the daemon (pid {})", owner.pid));
    }
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

/// Stateful firewall and connection tracking in eBPF (XDP or TC ingress, TC egress).
///
/// Start the firewall with `session run --config FILE`; inspect it from another shell with
/// `session list` and `session stats`; validate a config with `session check FILE`.
/// `session <COMMAND> --help` explains each command and gives an example. `run`, `list`,
/// `flush`, `stats`, `reload` and `down` need root; `check` and the packaging commands
/// (`completions`, `man`) do not.
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

/// The subcommands. Each doc comment's first line is the one-line summary in
/// `session --help`; the rest is the long help of `session <COMMAND> --help` and the man
/// page, kept verbatim so that examples stay on their own indented lines.
#[derive(Subcommand)]
enum Command {
    /// Run the firewall in the foreground until SIGINT/SIGTERM (SIGHUP reloads the config).
    ///
    /// Loads the eBPF programs, pins their maps under the pin directory, attaches them to
    /// every interface in the config's `interfaces` and to each --iface (XDP for the
    /// packets that arrive, or TC ingress on the interfaces under `[attach] tc_ingress`;
    /// TC egress for the packets the host sends), applies the policy and prints
    /// `session: ready` on stdout once it is in force. The programs are
    /// attached through links pinned under the pin directory: SIGINT or SIGTERM exits 0
    /// and the firewall keeps enforcing the last applied policy without the daemon (a
    /// new daemon adopts the links without a gap); `session down` removes it. Once
    /// attached, the daemon drops every capability. Logs go to stderr (RUST_LOG=debug for
    /// more). SIGHUP, or `session reload`, applies the config file again. Only one
    /// daemon can run per pin directory. Needs root (CAP_BPF, CAP_NET_ADMIN). With
    /// `[metrics] listen = "127.0.0.1:9640"` in the config it also serves Prometheus
    /// metrics at http://127.0.0.1:9640/metrics.
    ///
    /// Example:
    ///
    ///     session run --config /etc/session/session.toml --iface eth0
    #[command(verbatim_doc_comment)]
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
    ///
    /// Reads the running firewall's session table from its pinned maps and prints one
    /// line per live session: protocol, state, originator and responder, time left,
    /// packets and bytes each way, and the rule that opened it. Every filter given must
    /// hold. Use the same --pin-dir as `session run`.
    ///
    /// Example, the established TCP sessions to or from port 22:
    ///
    ///     session list --proto tcp --state established --port 22
    #[command(verbatim_doc_comment)]
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
    ///
    /// Removes the matching sessions from the running firewall's table and prints
    /// `flushed N session(s)`. Without filters it empties the table. A flushed flow's next
    /// packet is treated as new, so the policy decides again whether it may pass.
    ///
    /// Example, forget every session with 198.51.100.7:
    ///
    ///     session flush --addr 198.51.100.7
    #[command(verbatim_doc_comment)]
    Flush {
        #[command(flatten)]
        filter: SessionFilter,
        #[command(flatten)]
        pin: PinDir,
    },
    /// Validate the running daemon's config file and make it apply it (like SIGHUP).
    ///
    /// Finds the daemon that owns the pin directory, validates the config file it was
    /// started with and, when the file is valid, signals the daemon and waits until the
    /// new policy generation is active, then prints it. When the file is invalid it exits
    /// 1 with `FILE:LINE:COL: message` and the running policy is unchanged. Interface
    /// changes need a restart.
    ///
    /// Example, after editing /etc/session/session.toml:
    ///
    ///     session reload
    #[command(verbatim_doc_comment)]
    Reload {
        #[command(flatten)]
        pin: PinDir,
    },
    /// Stop the daemon and remove the firewall: links, attachments and maps.
    ///
    /// Stops the daemon that owns the pin directory, if one runs (SIGTERM, then SIGKILL
    /// after 10 s), removes every pinned link (which detaches the programs from the
    /// interfaces) and every pinned map, then the pin directory, and prints one line per
    /// thing removed. Sessions and counters are gone afterwards. Running it again, or
    /// where nothing was ever started, prints that there is nothing to remove and exits 0.
    ///
    /// Example:
    ///
    ///     session down
    #[command(verbatim_doc_comment)]
    Down {
        #[command(flatten)]
        pin: PinDir,
    },
    /// Show counters, rule hits and table fill.
    ///
    /// Prints the firewall's global counters (packets seen, accepted and dropped, by
    /// session state and by drop reason), how many times each rule and each default
    /// action matched, and how many sessions the table holds out of its maximum. Counters
    /// are totals since the maps were created.
    ///
    /// Example, as JSON for a monitoring script:
    ///
    ///     session stats --json
    #[command(verbatim_doc_comment)]
    Stats {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pin: PinDir,
    },
    /// Follow session events live (like `conntrack -E`): new, closed, expired, logged.
    ///
    /// Connects to the running daemon and prints one line per event until interrupted:
    /// a session created ([NEW]), closed by its own packets, FIN or RST ([CLOSED]),
    /// removed after its timeout ([EXPIRED]), or a packet decided by a rule with
    /// `log = true` ([LOGGED]), with addresses, ports, state, action and rule. With --json,
    /// one JSON object per line. A client that reads too slowly is told how many events it
    /// missed; the firewall never waits for it.
    ///
    /// Example, the events of logged rules as JSON:
    ///
    ///     session events --json | grep logged
    #[command(verbatim_doc_comment)]
    Events {
        /// Print one JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pin: PinDir,
    },
    /// Validate a configuration file without applying it.
    ///
    /// Parses the file and validates every setting, set and rule, without loading
    /// anything or needing root, so it also works on a build machine. (Whether the
    /// interfaces a rule names exist is checked when the file is applied on the host.)
    /// Prints `FILE: ok` and exits 0 when the file is valid; otherwise prints
    /// `FILE:LINE:COL: message` on stderr and exits 1.
    ///
    /// Example:
    ///
    ///     session check /etc/session/session.toml
    #[command(verbatim_doc_comment)]
    Check {
        /// Configuration file (TOML).
        file: PathBuf,
    },
    /// Print a shell completion script (for packaging).
    ///
    /// Writes the completion script for SHELL to stdout. Packages install it where the
    /// shell looks for completions; `cargo xtask dist` writes the bash, zsh and fish ones.
    ///
    /// Example, for bash:
    ///
    ///     session completions bash > /usr/share/bash-completion/completions/session
    #[command(verbatim_doc_comment)]
    Completions {
        /// The shell to write completions for.
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the session(1) man page in roff (for packaging).
    ///
    /// Writes one manual page to stdout that documents every command, its options, the
    /// signals, files and exit status. `cargo xtask dist` writes it as session.1.
    ///
    /// Example:
    ///
    ///     session man > /usr/local/share/man/man1/session.1
    #[command(verbatim_doc_comment)]
    Man,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
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
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
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
        Command::Events { json, pin } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(events::follow(&pin.pin_dir, json)),
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

/// The session(1) manual page: clap_mangen's title, name, synopsis, description and
/// options of `session`; a list of the commands; one section per command with its own
/// synopsis, description and options; then what an operator of the installed daemon
/// needs (signals, files, environment, exit status) and the version.
fn man_page() -> Result<Vec<u8>> {
    let mut cli = Cli::command().disable_help_subcommand(true);
    cli.build();
    let man = Man::new(cli.clone()).manual("session manual");
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;

    let commands: Vec<&clap::Command> =
        cli.get_subcommands().filter(|c| !c.is_hide_set()).collect();
    let mut list = Roff::new();
    list.control("SH", ["COMMANDS"]);
    for command in &commands {
        list.control("TP", []);
        list.text([bold(format!("session {}", command.get_name()))]);
        if let Some(about) = command.get_about() {
            list.text([roman(about.to_string())]);
        }
    }
    list.text([roman("Each command is described in its own section below.")]);
    list.to_writer(&mut page)?;

    for command in commands {
        let mut heading = Roff::new();
        heading.control(
            "SH",
            [format!("SESSION {}", command.get_name().to_uppercase()).as_str()],
        );
        heading.to_writer(&mut page)?;
        // The command's own sections become subsections of its section.
        let sub = Man::new(command.clone());
        let mut sections = Vec::new();
        sub.render_synopsis_section(&mut sections)?;
        sub.render_description_section(&mut sections)?;
        sub.render_options_section(&mut sections)?;
        for line in String::from_utf8(sections)?.lines() {
            match line.strip_prefix(".SH ") {
                Some(title) => writeln!(page, ".SS {title}")?,
                None => writeln!(page, "{line}")?,
            }
        }
    }

    operator_sections().to_writer(&mut page)?;
    man.render_version_section(&mut page)?;

    // Every rendered piece starts with roff's apostrophe preamble; keep only the first.
    let preamble = Roff::new().render();
    let body = String::from_utf8(page)?.replace(&preamble, "");
    Ok(format!("{preamble}{body}").into_bytes())
}

/// The man page sections that are not in the command line's help: signals, files,
/// environment, exit status, see also.
fn operator_sections() -> Roff {
    let mut roff = Roff::new();
    let entry = |roff: &mut Roff, term: clap_mangen::roff::Inline, text: &str| {
        roff.control("TP", []);
        roff.text([term]);
        roff.text([roman(text)]);
    };
    roff.control("SH", ["SIGNALS"]);
    roff.text([roman("Handled by "), bold("session run"), roman(":")]);
    entry(
        &mut roff,
        bold("SIGHUP"),
        "Read the config file again and apply it. An invalid file is logged and the running \
         policy stays in force; interface changes need a restart.",
    );
    entry(
        &mut roff,
        bold("SIGINT, SIGTERM"),
        "Exit 0. The programs stay attached through their pinned links and keep enforcing \
         the last applied policy; the next daemon adopts them. session down removes them.",
    );
    roff.control("SH", ["FILES"]);
    entry(
        &mut roff,
        italic("/etc/session/session.toml"),
        "The configuration the packaged systemd unit (session.service) runs. The format is \
         described in the commented example session.toml.example.",
    );
    entry(
        &mut roff,
        italic(DEFAULT_PIN_DIR),
        "The default pin directory: the firewall's maps, pinned on the BPF filesystem.",
    );
    entry(
        &mut roff,
        italic(format!("{DEFAULT_PIN_DIR}/links")),
        "The pinned XDP and TCX links (IFACE-xdp or IFACE-tc-ingress, and IFACE-tc) that \
         keep the programs attached while no daemon runs; session down removes them.",
    );
    entry(
        &mut roff,
        italic("/run/session/*.lock"),
        "One lock file per pin directory, held by the running daemon; it records the \
         daemon's pid and config file for session reload.",
    );
    roff.control("SH", ["ENVIRONMENT"]);
    entry(
        &mut roff,
        bold("SESSION_PIN_DIR"),
        "The pin directory when --pin-dir is not given.",
    );
    entry(
        &mut roff,
        bold("RUST_LOG"),
        "Log level of the messages on stderr: error, warn, info (the default) or debug.",
    );
    roff.control("SH", ["EXIT STATUS"]);
    entry(&mut roff, bold("0"), "Success.");
    entry(
        &mut roff,
        bold("1"),
        "An error, printed on stderr: an invalid config file (as FILE:LINE:COL: message), \
         no running daemon, missing privileges, an interface that does not exist.",
    );
    entry(&mut roff, bold("2"), "Invalid command-line arguments.");
    roff.control("SH", ["SEE ALSO"]);
    roff.text([
        bold("conntrack"),
        roman("(8), "),
        bold("nft"),
        roman("(8), "),
        bold("systemctl"),
        roman("(1), "),
        bold("bpftool"),
        roman("(8)"),
    ]);
    roff
}
