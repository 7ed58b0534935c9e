//! The command line as clap parses it: every command, its options and its long help,
//! which is also the man page's text.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use clap_complete::Shell;

use crate::{bpf::pinned::DEFAULT_PIN_DIR, cli::views::SessionFilter};

/// Stateful firewall and connection tracking in eBPF (XDP or TC ingress, TC egress).
///
/// Start the firewall with `session run --config FILE`; inspect it from another shell with
/// `session list` and `session stats`; validate a config with `session check FILE`.
/// `session <COMMAND> --help` explains each command and gives an example. `run`, `list`,
/// `flush`, `stats`, `reload` and `down` need root; `check` and the packaging commands
/// (`completions`, `man`) do not.
#[derive(Parser)]
#[command(name = "session", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Args)]
pub struct PinDir {
    /// bpffs directory holding the firewall's pinned maps.
    #[arg(long, env = "SESSION_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

/// The subcommands. Each doc comment's first line is the one-line summary in
/// `session --help`; the rest is the long help of `session <COMMAND> --help` and the man
/// page, kept verbatim so that examples stay on their own indented lines.
#[derive(Subcommand)]
pub enum Command {
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
        /// Restore the sessions `session save` wrote to FILE when the daemon creates a
        /// new session table (after a reboot or `session down`). A missing file is
        /// noted and skipped; a damaged one is refused and the daemon starts without it.
        #[arg(long, value_name = "FILE")]
        restore: Option<PathBuf>,
        #[command(flatten)]
        pin: PinDir,
    },
    /// Save the session table to a file, for `session restore` or `run --restore`.
    ///
    /// Writes every live session (addresses, ports, protocol state, TCP window data,
    /// counters, time left, the rule that admitted it) in session's versioned table
    /// format with a checksum (docs/RECORDS.md), atomically, mode 0600, and prints
    /// `saved N session(s) to FILE`. The packaged systemd unit saves on stop and restores
    /// on start, so a reboot keeps a router's connections.
    ///
    /// Example:
    ///
    ///     session save /var/lib/session/sessions.table
    #[command(verbatim_doc_comment)]
    Save {
        /// The file to write (replaced whole).
        file: PathBuf,
        #[command(flatten)]
        pin: PinDir,
    },
    /// Restore sessions saved by `session save` into the running firewall's table.
    ///
    /// Checks the whole file first: a damaged file, one of another format version, or one
    /// with more sessions than max_sessions is refused with the reason and changes
    /// nothing. Then every saved session gets its time left minus the time the file
    /// waited, is judged by the policy in force as a reload judges existing sessions, and
    /// is added unless the table already has its flow. Prints what was restored and what
    /// was refused, expired or already present.
    ///
    /// Example:
    ///
    ///     session restore /var/lib/session/sessions.table
    #[command(verbatim_doc_comment)]
    Restore {
        /// The file `session save` wrote.
        file: PathBuf,
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
    ///
    /// With --sources it lists instead the sources that rules with a `limit` table count
    /// (like `pfctl -s Sources`): rule, source prefix, sessions held, sessions refused.
    #[command(verbatim_doc_comment)]
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// List the sources the rules' limits count instead of the sessions.
        #[arg(long)]
        sources: bool,
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
    /// Change the running policy's named sets live: list, show, add, delete, flush, replace.
    ///
    /// A set is defined under [sets] in the config (a list, or `{ file = "PATH" }` with one
    /// address or network per line) and used by rules as `src = ["@NAME"]`; whatever its
    /// size it costs its rule one kernel entry. These commands write the set in the kernel
    /// at once, without a reload: the next new flow sees the change, and existing sessions
    /// are judged afresh against the rules (a rule for `new` flows leaves them be; one that
    /// also matches `established` drops them). Entries added with --timeout expire on
    /// their own. A reload or restart re-reads the sets from the config and their files,
    /// so live changes that should last belong in the set's file too.
    ///
    /// Examples:
    ///
    ///     session set add block 198.51.100.7 2001:db8::/64
    ///     session set add bans 198.51.100.9 --timeout 3600
    ///     session set delete block 198.51.100.7
    ///     session set replace block /etc/session/block.txt
    ///     session set show block
    #[command(verbatim_doc_comment)]
    Set {
        #[command(subcommand)]
        action: crate::cli::set::SetCommand,
    },
    /// Show the state sync link to the peer firewall (`[sync]`).
    ///
    /// Prints the peer's state (up, resyncing, down; off when this firewall has no sync
    /// link), how long the oldest change the peer has not acknowledged has waited (lag),
    /// and the link's counters: datagrams sent, retransmitted and received, full resyncs,
    /// datagrams dropped for failing authentication, sessions installed from the peer.
    ///
    /// Example, as JSON for a monitoring script:
    ///
    ///     session sync status --json
    #[command(verbatim_doc_comment)]
    Sync {
        #[command(subcommand)]
        action: crate::cli::sync::SyncCommand,
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
