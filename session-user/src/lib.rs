//! The `session` daemon and CLI as a library, one folder per concern:
//!
//! - [`policy`]: the TOML configuration, its validation and its compilation into the
//!   kernel's rule entries and rule bitmaps; nothing there touches the kernel;
//! - [`bpf`]: the kernel side as the daemon sees it: loading the eBPF object, pinned maps
//!   and links, the clock calibration and netdev queries;
//! - [`daemon`]: `session run` and what keeps it going: the run loop, reaper, reloads and
//!   readmission, events, metrics, the instance lock, privileges, and `session down`;
//! - [`cli`]: the command line: arguments, the commands that talk to a running firewall,
//!   what they print, and the man page;
//! - [`continuity`]: sessions that outlive the firewall: takeover at first start, save and
//!   restore of the table in a versioned file;
//! - [`host_engine`]: session-common's engine over plain collections, which production
//!   runs for readmission and the tests run as the kernel's reference.

pub mod bpf;
pub mod cli;
pub mod continuity;
pub mod daemon;
pub mod host_engine;
pub mod policy;
pub mod sync;
