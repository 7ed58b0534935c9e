//! The `session` command line: its arguments (`args`), what each command does
//! (`commands`), what `list` and `stats` print (`views`), the `session events` client
//! (`events`), `session set` (`set`), `session sync status` (`sync`) and the man page
//! (`man`).

pub mod args;
pub mod commands;
#[cfg(test)]
pub(crate) mod contract_examples;
pub mod events;
pub mod man;
pub mod set;
pub mod sync;
pub mod views;
