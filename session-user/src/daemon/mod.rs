//! `session run` and the work around it: the run loop, reloads and the readmission of
//! existing sessions, the event stream, the metrics endpoint, the one-daemon lock,
//! dropping privileges, and `session down`, which removes what a daemon leaves behind.

pub mod events;
pub mod lock;
pub mod metrics;
pub mod privileges;
pub mod readmission;
pub mod reaper;
pub mod run;
pub mod set_events;
pub mod sync_task;
pub mod teardown;
