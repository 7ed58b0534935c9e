//! The kernel programs' own log (aya-log): the level they log at, fixed when they are
//! loaded so that the verifier prunes every site below it, and the forwarding of their
//! records into the daemon's log.

use std::fmt;

use anyhow::{Context as _, Result};
use aya::Ebpf;
use aya_log::EbpfLogger;
use log::warn;
use tokio::io::{Interest, unix::AsyncFd};

/// The most detailed kernel log records the programs emit (`[logging] kernel_level`).
/// Each level includes those above it; the numbers are aya-log's, which the loader
/// writes into the programs' `AYA_LOG_LEVEL`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelLogLevel {
    /// No records at all.
    Off = 0,
    /// Packets dropped because the program could not judge them (fail closed).
    Error = 1,
    /// The default: what an operator must see (today the same records as `Error`).
    #[default]
    Warn = 2,
    /// Nothing more today; accepted for symmetry with `RUST_LOG`.
    Info = 3,
    /// Per-packet diagnostics: packets the parser refused, fast-path FIB misses. Costs
    /// time per packet and floods the log under load: for diagnosing only.
    Debug = 4,
    /// Everything (today the same records as `Debug`).
    Trace = 5,
}

impl KernelLogLevel {
    /// Every level with its name in the config, in increasing detail.
    pub const ALL: [(KernelLogLevel, &'static str); 6] = [
        (KernelLogLevel::Off, "off"),
        (KernelLogLevel::Error, "error"),
        (KernelLogLevel::Warn, "warn"),
        (KernelLogLevel::Info, "info"),
        (KernelLogLevel::Debug, "debug"),
        (KernelLogLevel::Trace, "trace"),
    ];

    /// The level named `name` in the config, if there is one.
    pub fn from_name(name: &str) -> Option<KernelLogLevel> {
        Self::ALL
            .iter()
            .find(|(_, known)| *known == name)
            .map(|(level, _)| *level)
    }

    /// The level's name in the config.
    pub fn name(self) -> &'static str {
        Self::ALL[self as usize].1
    }
}

impl fmt::Display for KernelLogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The global in the object that holds the level (aya-log-ebpf's `AYA_LOG_LEVEL`).
pub const LEVEL_GLOBAL: &str = aya_log::LEVEL;

/// Starts forwarding the loaded programs' log records into the daemon's log (`log`'s
/// logger: stderr), from a task of the current tokio runtime; records of level `Off`
/// programs never come. Takes the log ring out of `ebpf`, so call it before dropping it.
pub fn forward(ebpf: &mut Ebpf) -> Result<()> {
    let logger = EbpfLogger::init(ebpf).context("opening the kernel programs' log ring")?;
    // SAFETY: the descriptor is the ring buffer map's, which the logger owns and keeps
    // open, unchanged, until the AsyncFd that owns the logger is dropped.
    let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|error| error.into_parts().1)
        .context("watching the kernel programs' log ring")?;
    tokio::spawn(async move {
        loop {
            match logger.readable_mut().await {
                Ok(mut ready) => {
                    ready.get_inner_mut().flush();
                    ready.clear_ready();
                }
                Err(error) => {
                    warn!("the kernel programs' log is no longer forwarded: {error}");
                    return;
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_levels_are_aya_logs_and_named_as_in_the_config() {
        for (level, aya) in [
            (KernelLogLevel::Error, aya_log::Level::Error),
            (KernelLogLevel::Warn, aya_log::Level::Warn),
            (KernelLogLevel::Info, aya_log::Level::Info),
            (KernelLogLevel::Debug, aya_log::Level::Debug),
            (KernelLogLevel::Trace, aya_log::Level::Trace),
        ] {
            assert_eq!(
                level as u8,
                u8::from(aya),
                "{level} must be aya-log's number"
            );
        }
        for (level, name) in KernelLogLevel::ALL {
            assert_eq!(KernelLogLevel::from_name(name), Some(level));
            assert_eq!(level.name(), name);
        }
        assert_eq!(KernelLogLevel::from_name("warning"), None);
        assert_eq!(KernelLogLevel::default(), KernelLogLevel::Warn);
    }
}
