//! `session sync status`: the state sync link as the running daemon reports it in its
//! counters (`[sync]`, docs/SYNC.md).

use anyhow::Result;
use clap::Subcommand;
use serde::Serialize;
use session_common::wire::DaemonCounter;

use crate::{bpf::pinned::PinnedMaps, cli::args::PinDir};

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
}

/// The link's state and counters, as printed.
#[derive(Debug, Serialize, PartialEq)]
pub struct SyncStatus {
    /// `down`, `resyncing`, `up`, or `off` when the daemon never ran a sync link.
    pub peer: &'static str,
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
    /// The status from the daemon counters.
    pub fn from_counters(get: impl Fn(DaemonCounter) -> u64) -> SyncStatus {
        let sent = get(DaemonCounter::SyncSent);
        SyncStatus {
            peer: match (sent, get(DaemonCounter::SyncPeerState)) {
                (0, _) => "off",
                (_, 2) => "up",
                (_, 1) => "resyncing",
                _ => "down",
            },
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

    /// The text `session sync status` prints.
    pub fn to_text(&self) -> String {
        format!(
            "peer           {}\nlag            {:.1} ms\nunacknowledged {}\nsent           {} datagrams ({} retransmitted)\nreceived       {} datagrams\nresyncs        {}\nauth failures  {}\nrefused        {}\nchanges sent   {}\ninstalled      {}\ndeleted        {}\npolicy refused {}\n",
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

/// Runs `session sync ...`.
pub fn run(command: SyncCommand) -> Result<()> {
    match command {
        SyncCommand::Status { json, pin } => {
            let maps = PinnedMaps::open(&pin.pin_dir)?;
            let mut values = [0u64; DaemonCounter::COUNT as usize];
            for (counter, _) in DaemonCounter::ALL {
                values[counter as usize] = maps.daemon_counter(counter)?;
            }
            let status = SyncStatus::from_counters(|counter| values[counter as usize]);
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
        let status = SyncStatus::from_counters(|counter| match counter {
            DaemonCounter::SyncSent => 10,
            DaemonCounter::SyncPeerState => 2,
            DaemonCounter::SyncLagNs => 3_500_000,
            DaemonCounter::SyncAuthFailures => 4,
            _ => 0,
        });
        assert_eq!(status.peer, "up");
        assert_eq!(status.lag_ms, 3.5);
        assert_eq!(status.auth_failures, 4);
        assert!(status.to_text().contains("auth failures  4"));
        let never = SyncStatus::from_counters(|_| 0);
        assert_eq!(never.peer, "off");
    }
}
