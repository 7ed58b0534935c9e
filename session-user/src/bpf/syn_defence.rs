//! The ports `[syn_defence]` defends, in the pinned map the programs read
//! (`session_common::syn_defence`).

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData};
use session_common::{syn_defence::DefendedPort, wire::map_names};

use crate::{
    bpf::pinned::{PinnedMaps, is_not_found},
    policy::config::SynDefence,
};

impl PinnedMaps {
    fn defended_ports(&self) -> Result<HashMap<MapData, u16, DefendedPort>> {
        HashMap::try_from(self.map(map_names::SYN_DEFENCE)?)
            .context("map SYN_DEFENCE is not a hash map")
    }

    /// Makes the defended ports those of `defence`: ports no longer listed are removed
    /// first, then each listed one is written with its rate (its SYN count restarts).
    /// The programs look ports up only while the settings' `SYN_DEFENCE` flag is set,
    /// which the settings written with the same config carry.
    pub fn write_syn_defence(&self, defence: &SynDefence) -> Result<()> {
        let mut ports = self.defended_ports()?;
        let stale: Vec<u16> = ports
            .keys()
            .filter_map(Result::ok)
            .filter(|port| defence.ports.binary_search(port).is_err())
            .collect();
        for port in stale {
            match ports.remove(&port) {
                Ok(()) => {}
                Err(error) if is_not_found(&error) => {}
                Err(error) => return Err(error).context("removing a port from SYN_DEFENCE"),
            }
        }
        for port in &defence.ports {
            ports
                .insert(port, DefendedPort::new(defence.above), 0)
                .with_context(|| format!("defending port {port} in SYN_DEFENCE"))?;
        }
        Ok(())
    }
}
