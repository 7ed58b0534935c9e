//! State sync to a standby peer (docs/SYNC.md), after conntrackd's FTFW mode and pfsync:
//!
//! - [`wire`]: the authenticated, versioned datagram carrying session records;
//! - [`link`]: sequence numbers, acknowledgements, retransmission, replay window and full
//!   resync between two peers;
//! - [`changes`]: which local changes the peer has not seen, and how a received session
//!   is stored;
//! - [`key`]: the shared key file.
//!
//! All of it is pure (bytes and `now` in, bytes and decisions out) and lives here rather
//! than in session-common because it needs `std` collections and the HMAC crates, which
//! the kernel side must not link; the daemon's task (`daemon::sync_task`) does the I/O.

pub mod changes;
pub mod key;
pub mod link;
pub mod wire;
