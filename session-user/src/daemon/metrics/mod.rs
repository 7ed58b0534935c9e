//! The opt-in Prometheus endpoint: with `[metrics] listen = "ADDR:PORT"` in the config the
//! daemon answers `GET /metrics` there with the Prometheus text exposition format (0.0.4).
//!
//! Every scrape reads the pinned maps afresh, exactly as `session stats` does, so the
//! metrics and the CLI never disagree and the server keeps no state of its own. One file
//! per idea:
//!
//! - [`snapshot`]: what one scrape reads from the pinned maps;
//! - [`families`]: how a snapshot becomes metric families (names, types, labels, help),
//!   encoded by the `prometheus-client` crate;
//! - [`server`]: the tiny HTTP endpoint that serves them.

pub mod families;
pub mod server;
pub mod snapshot;

pub use server::{MetricsServer, start};
