//! Session events, like `conntrack -E`: the kernel path reports new and closed sessions and
//! the packets of `log = true` rules through a ring buffer; the daemon reads it, adds the
//! sessions its reaper expires, writes rate-limited log lines for logged packets, and
//! streams every event as a JSON line to the `session events` clients on a Unix socket.
//!
//! The daemon is the ring buffer's only reader (a ring buffer hands each record to one
//! consumer), so `session events` (cli/events.rs) asks the daemon instead of reading the
//! map itself. One file per idea:
//!
//! - [`record`]: the typed event, [`record::EventRecord`], which the daemon serialises and
//!   the client deserialises: the JSON line of docs/CONTRACT.md and the human line;
//! - [`ring`]: reading the kernel's ring buffer and turning its records into events;
//! - [`log_limiter`]: the token bucket that keeps log lines of logged packets in bounds;
//! - [`hub`]: the clients' socket and the fan-out of each event to every client.

pub mod hub;
pub mod log_limiter;
pub mod record;
pub mod ring;

pub use hub::{EventHub, socket_path};
