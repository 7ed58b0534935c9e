//! `session set ...`: live changes to the named sets of the running policy without a
//! reload, like `ipset`, `nft add element` and `pfctl -t T -T ...`.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;

use crate::{
    bpf::{
        clock::monotonic_ns,
        pinned::PinnedMaps,
        sets::{SetMember, show_network},
    },
    cli::args::PinDir,
    policy::{
        config::{Network, Policy},
        sets::{BYTES_PER_HOST, BYTES_PER_NETWORK, host_hash_reserve, parse_prefix, read_set_file},
    },
};

/// What `session set` does.
#[derive(Subcommand)]
pub enum SetCommand {
    /// List the sets of the running policy with their sizes and live changes.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pin: PinDir,
    },
    /// Print the prefixes of one set, one per line (with the seconds left for entries
    /// that expire), in a form `session set replace` and set files take.
    Show {
        /// The set's name, as under [sets].
        name: String,
        #[command(flatten)]
        pin: PinDir,
    },
    /// Add addresses or networks to a set; the next new flow sees them.
    Add {
        /// The set's name.
        name: String,
        /// Addresses or networks (198.18.0.7, 198.18.1.0/24, 2001:2::/64).
        #[arg(required = true)]
        prefixes: Vec<String>,
        /// Remove them again after this many seconds (a ban).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
        #[command(flatten)]
        pin: PinDir,
    },
    /// Delete addresses or networks from a set (exact prefixes, as added).
    Delete {
        /// The set's name.
        name: String,
        /// Addresses or networks.
        #[arg(required = true)]
        prefixes: Vec<String>,
        #[command(flatten)]
        pin: PinDir,
    },
    /// Empty a set at once.
    Flush {
        /// The set's name.
        name: String,
        #[command(flatten)]
        pin: PinDir,
    },
    /// Replace a set's contents with a file's, atomically: packets see the whole old or
    /// the whole new set. A bad line refuses the file with FILE:LINE and changes nothing.
    Replace {
        /// The set's name.
        name: String,
        /// One address or network per line; `#` starts a comment.
        file: PathBuf,
        #[command(flatten)]
        pin: PinDir,
    },
}

/// What `session check` says about a config's sets: each set's size and source, and the
/// total against `[limits] max_set_entries` with the kernel memory it needs.
pub fn check_report(policy: &Policy) -> Vec<String> {
    let mut lines = Vec::new();
    let mut total = 0u64;
    let mut bytes = 0u64;
    for (name, set) in &policy.sets {
        let from = match &set.file {
            Some(path) => format!("from {}", path.display()),
            None => "inline".to_string(),
        };
        let used = policy
            .rules
            .iter()
            .any(|rule| rule.src_sets.contains(name) || rule.dst_sets.contains(name));
        lines.push(format!(
            "set `{name}`: {} prefixes ({from}){}",
            set.networks.len(),
            if used { "" } else { ", used by no rule" }
        ));
        total += set.networks.len() as u64;
        bytes += set
            .networks
            .iter()
            .map(|net| {
                if net.prefix == 128 {
                    BYTES_PER_HOST
                } else {
                    BYTES_PER_NETWORK
                }
            })
            .sum::<u64>();
    }
    if !policy.sets.is_empty() {
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        lines.push(format!(
            "sets: {total} of max_set_entries {} prefixes, about {:.1} MiB of kernel memory ({BYTES_PER_HOST} bytes per single address, {BYTES_PER_NETWORK} per network, twice that while a set is replaced), besides the {:.1} MiB the hash of single addresses takes at start",
            policy.max_set_entries,
            mib(bytes),
            mib(host_hash_reserve(policy.max_set_entries))
        ));
    }
    lines
}

fn parse_all(prefixes: &[String]) -> Result<Vec<Network>> {
    prefixes
        .iter()
        .map(|text| parse_prefix(text.trim()).map_err(anyhow::Error::msg))
        .collect()
}

fn line(member: &SetMember, now: u64) -> String {
    let net = show_network(&member.network);
    if member.expires_ns == 0 {
        net
    } else {
        let left = Duration::from_nanos(member.expires_ns.saturating_sub(now));
        format!("{net} # expires in {}s", left.as_secs())
    }
}

impl SetCommand {
    /// The pin directory the command works on.
    fn pin_dir(&self) -> &Path {
        match self {
            SetCommand::List { pin, .. }
            | SetCommand::Show { pin, .. }
            | SetCommand::Add { pin, .. }
            | SetCommand::Delete { pin, .. }
            | SetCommand::Flush { pin, .. }
            | SetCommand::Replace { pin, .. } => &pin.pin_dir,
        }
    }
}

/// Runs one `session set` command against the maps pinned where it says.
pub fn run(command: SetCommand) -> Result<()> {
    let maps = PinnedMaps::open(command.pin_dir())?;
    match command {
        SetCommand::List { json, .. } => {
            let sets = maps.sets()?;
            if json {
                let array: Vec<_> = sets
                    .iter()
                    .map(|set| {
                        serde_json::json!({
                            "name": set.name,
                            "entries": set.entries,
                            "changes": set.changes,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&array)?);
            } else if sets.is_empty() {
                println!("no sets in the running policy");
            } else {
                println!("{:<31} {:>10} {:>10}", "SET", "ENTRIES", "CHANGES");
                for set in sets {
                    println!("{:<31} {:>10} {:>10}", set.name, set.entries, set.changes);
                }
            }
            Ok(())
        }
        SetCommand::Show { name, .. } => {
            let now = monotonic_ns();
            let mut out = String::new();
            for member in maps.set_members(&name)? {
                if member.expires_ns == 0 || member.expires_ns > now {
                    out.push_str(&line(&member, now));
                    out.push('\n');
                }
            }
            print!("{out}");
            Ok(())
        }
        SetCommand::Add {
            name,
            prefixes,
            timeout,
            ..
        } => {
            let nets = parse_all(&prefixes)?;
            let expires = match timeout {
                None => 0,
                Some(0) => {
                    bail!("--timeout 0 would expire at once: give the seconds the ban lasts")
                }
                Some(seconds) => {
                    monotonic_ns().saturating_add(seconds.saturating_mul(1_000_000_000))
                }
            };
            let added = maps.set_add(&name, &nets, expires)?;
            println!(
                "{name}: added {added}, {} already there",
                nets.len() as u32 - added
            );
            Ok(())
        }
        SetCommand::Delete { name, prefixes, .. } => {
            let nets = parse_all(&prefixes)?;
            let removed = maps.set_delete(&name, &nets)?;
            println!(
                "{name}: deleted {removed}, {} not there",
                nets.len() as u32 - removed
            );
            Ok(())
        }
        SetCommand::Flush { name, .. } => {
            maps.set_replace(&name, &[])?;
            println!("{name}: flushed");
            Ok(())
        }
        SetCommand::Replace { name, file, .. } => {
            let nets =
                read_set_file(&file).with_context(|| format!("set `{name}` is unchanged"))?;
            maps.set_replace(&name, &nets)?;
            println!(
                "{name}: replaced with {} prefixes from {}",
                nets.len(),
                file.display()
            );
            Ok(())
        }
    }
}
