//! `session sync status` and `session sync check`: the state sync link as the running
//! daemon reports it in its counters (`[sync]`, docs/SYNC.md), and whether this firewall
//! may take the traffic, for keepalived.

use anyhow::{Result, bail};
use clap::Subcommand;
use serde::Serialize;
use session_common::wire::DaemonCounter;

use crate::{bpf::pinned::PinnedMaps, cli::args::PinDir, daemon::lock::Owner};

/// What `session sync` does.
#[derive(Subcommand)]
pub enum SyncCommand {
    /// The peer's state, how far it is behind, and the link's counters.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pin: PinDir,
    },
    /// Exit 0 when this firewall may hold the virtual addresses: keepalived's check.
    ///
    /// Succeeds (printing `ready`) when the daemon of the pin directory runs and its
    /// session table may take the traffic over: at once without `[sync]`; with it, once
    /// the peer's full resync has arrived whole, or when no peer answered within 2 s of
    /// the start. Fails with the reason otherwise: no daemon runs (it died, or was never
    /// started), or it is still taking in the peer's table. Once ready, a daemon stays
    /// ready for its life. keepalived runs it as a `vrrp_script` (see
    /// config/examples/ha-keepalived.conf): a firewall whose daemon stays down gives the
    /// addresses to its peer, and one that was restarted takes them back only with the
    /// peer's sessions in its table.
    ///
    /// Example:
    ///
    ///     session sync check && echo this firewall may be the active one
    #[command(verbatim_doc_comment)]
    Check {
        #[command(flatten)]
        pin: PinDir,
    },
}

/// The link's state and counters, as printed.
#[derive(Debug, Serialize, PartialEq)]
pub struct SyncStatus {
    /// `down`, `resyncing`, `up`, `off` when the daemon never ran a sync link, or
    /// `stopped` when no daemon runs (the counters below are then its last run's).
    pub peer: &'static str,
    /// The running daemon's process id; none when no daemon runs.
    pub daemon_pid: Option<u32>,
    /// Whether the running daemon's table may take the traffic over (`session sync
    /// check`).
    pub ready: bool,
    /// Milliseconds the oldest unacknowledged change has waited.
    pub lag_ms: f64,
    /// Messages waiting for the peer's acknowledgement.
    pub unacknowledged: u64,
    /// Datagrams sent, retransmissions included.
    pub sent: u64,
    /// Authenticated datagrams received.
    pub received: u64,
    /// Data messages sent again.
    pub retransmitted: u64,
    /// Full resyncs begun towards the peer.
    pub resyncs: u64,
    /// Datagrams dropped: wrong key, forged, or from another address.
    pub auth_failures: u64,
    /// Authenticated datagrams refused (malformed, replayed, stale).
    pub refused: u64,
    /// Session changes sent.
    pub changes_sent: u64,
    /// Sessions installed or updated from the peer.
    pub installed: u64,
    /// Sessions deleted on the peer's word.
    pub deleted: u64,
    /// Sessions from the peer the policy would not admit.
    pub policy_refused: u64,
}

impl SyncStatus {
    /// The status from the daemon counters and the pid of the daemon that runs, if one
    /// does: counters a dead daemon left behind describe no live link.
    pub fn from_counters(
        daemon_pid: Option<u32>,
        get: impl Fn(DaemonCounter) -> u64,
    ) -> SyncStatus {
        let sent = get(DaemonCounter::SyncSent);
        SyncStatus {
            peer: match (daemon_pid, sent, get(DaemonCounter::SyncPeerState)) {
                (None, _, _) => "stopped",
                (_, 0, _) => "off",
                (_, _, 2) => "up",
                (_, _, 1) => "resyncing",
                _ => "down",
            },
            daemon_pid,
            ready: daemon_pid.is_some_and(|pid| u64::from(pid) == get(DaemonCounter::SyncReadyPid)),
            lag_ms: get(DaemonCounter::SyncLagNs) as f64 / 1e6,
            unacknowledged: get(DaemonCounter::SyncUnacknowledged),
            sent,
            received: get(DaemonCounter::SyncReceived),
            retransmitted: get(DaemonCounter::SyncRetransmitted),
            resyncs: get(DaemonCounter::SyncResyncs),
            auth_failures: get(DaemonCounter::SyncAuthFailures),
            refused: get(DaemonCounter::SyncRefused),
            changes_sent: get(DaemonCounter::SyncChangesSent),
            installed: get(DaemonCounter::SyncInstalled),
            deleted: get(DaemonCounter::SyncDeleted),
            policy_refused: get(DaemonCounter::SyncPolicyRefused),
        }
    }

    /// What `session sync check` says: the line to print when this firewall may take
    /// the traffic, or why not.
    pub fn verdict(&self) -> Result<String, String> {
        match self.daemon_pid {
            None => Err(
                "not ready: no session daemon runs with this pin directory; start it (`systemctl start session`)".into(),
            ),
            Some(pid) if self.ready => Ok(format!("ready: daemon pid {pid}")),
            Some(pid) if self.peer == "off" => Err(format!(
                "not ready: the daemon (pid {pid}) is starting"
            )),
            Some(pid) => Err(format!(
                "not ready: the daemon (pid {pid}) is waiting for its peer's full resync (peer {})",
                self.peer
            )),
        }
    }

    /// The text `session sync status` prints.
    pub fn to_text(&self) -> String {
        let daemon = match self.daemon_pid {
            Some(pid) if self.ready => format!("pid {pid}, ready to take the traffic"),
            Some(pid) => format!("pid {pid}, not ready yet (waiting for the peer's table)"),
            None => "not running: the counters below are from its last run".into(),
        };
        format!(
            "daemon         {daemon}\npeer           {}\nlag            {:.1} ms\nunacknowledged {}\nsent           {} datagrams ({} retransmitted)\nreceived       {} datagrams\nresyncs        {}\nauth failures  {}\nrefused        {}\nchanges sent   {}\ninstalled      {}\ndeleted        {}\npolicy refused {}\n",
            self.peer,
            self.lag_ms,
            self.unacknowledged,
            self.sent,
            self.retransmitted,
            self.received,
            self.resyncs,
            self.auth_failures,
            self.refused,
            self.changes_sent,
            self.installed,
            self.deleted,
            self.policy_refused
        )
    }
}

/// The status of the firewall whose maps are pinned in `pin`.
fn read_status(pin: &PinDir) -> Result<SyncStatus> {
    let daemon_pid = Owner::running(&pin.pin_dir)?.and_then(|owner| u32::try_from(owner.pid).ok());
    let maps = PinnedMaps::open(&pin.pin_dir)?;
    // One opening of the counter map for all of them: keepalived runs this every second.
    let mut values = [0u64; DaemonCounter::COUNT as usize];
    for ((counter, _), (_, value)) in DaemonCounter::ALL.iter().zip(maps.daemon_counters()?) {
        values[*counter as usize] = value;
    }
    Ok(SyncStatus::from_counters(daemon_pid, |counter| {
        values[counter as usize]
    }))
}

/// Runs `session sync ...`.
pub fn run(command: SyncCommand) -> Result<()> {
    match command {
        SyncCommand::Check { pin } => match read_status(&pin)?.verdict() {
            Ok(line) => {
                println!("{line}");
                Ok(())
            }
            Err(reason) => bail!(reason),
        },
        SyncCommand::Status { json, pin } => {
            let status = read_status(&pin)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.to_text());
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_reads_the_counters_it_names() {
        let status = SyncStatus::from_counters(Some(7), |counter| match counter {
            DaemonCounter::SyncSent => 10,
            DaemonCounter::SyncPeerState => 2,
            DaemonCounter::SyncLagNs => 3_500_000,
            DaemonCounter::SyncAuthFailures => 4,
            DaemonCounter::SyncReadyPid => 7,
            _ => 0,
        });
        assert_eq!(status.peer, "up");
        assert_eq!(status.lag_ms, 3.5);
        assert_eq!(status.auth_failures, 4);
        assert!(status.to_text().contains("auth failures  4"));
        assert_eq!(status.verdict(), Ok("ready: daemon pid 7".into()));
        let never = SyncStatus::from_counters(Some(7), |_| 0);
        assert_eq!(never.peer, "off");
        assert!(!never.ready);
    }

    #[test]
    fn a_dead_daemons_counters_make_nobody_ready() {
        let counters = |counter| match counter {
            DaemonCounter::SyncSent => 10,
            DaemonCounter::SyncPeerState => 2,
            DaemonCounter::SyncReadyPid => 7,
            _ => 0,
        };
        let dead = SyncStatus::from_counters(None, counters);
        assert_eq!(dead.peer, "stopped");
        assert!(!dead.ready);
        let error = dead.verdict().expect_err("no daemon");
        assert!(error.contains("no session daemon runs"), "{error}");
        let successor = SyncStatus::from_counters(Some(8), counters);
        assert_eq!(successor.peer, "up");
        assert!(!successor.ready, "pid 7's readiness is not pid 8's");
        let error = successor.verdict().expect_err("not ready");
        assert!(
            error.contains("waiting for its peer's full resync"),
            "{error}"
        );
    }
}
