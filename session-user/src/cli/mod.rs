//! The `session` command line: its arguments (`args`), what each command does
//! (`commands`), what `list` and `stats` print (`views`) and the man page (`man`).

pub mod args;
pub mod commands;
pub mod man;
pub mod set;
pub mod views;
