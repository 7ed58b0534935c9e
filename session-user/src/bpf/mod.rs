//! Everything that talks to the kernel's BPF side: loading the embedded object with its
//! maps pinned, attaching through pinned links, reading and writing the pinned maps,
//! calibrating the programs' clock, and asking the netdev family what an interface can do.

mod batch;
pub mod clock;
pub mod kernel_log;
pub mod limits;
pub mod links;
pub mod loader;
pub mod netdev;
pub mod pinned;
mod presence;
pub mod sets;
pub mod syn_defence;
mod tc_netlink;
