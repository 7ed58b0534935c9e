//! A third namespace, `attacker`, joined to fw by a veth pair of its own, so that a flood
//! reaches the firewall over a different link than the lab's client traffic, as it would
//! from another host. Without it, the flood and the client's connections share one veth
//! ring, and ring overflow (not the firewall) would decide which client segments are lost.
//!
//! fw's end is [`FW_FLOOD_IFACE`]; a daemon protects it too when the config names it in
//! `interfaces`. No addresses are needed: the generator sends hand-built frames. The
//! namespace (and with it both veth ends) is deleted on drop.

use crate::{Lab, Side, delete_netns, host, mac_of, wait_until_up};

/// The attacker's end of the flood link.
pub const ATTACKER_IFACE: &str = "veth-atk";
/// fw's end of the flood link; name it in the daemon config's `interfaces`.
pub const FW_FLOOD_IFACE: &str = "veth-fw2";

/// The attacker namespace and its link to fw; deleted on drop.
pub struct Attacker {
    ns: String,
    fw_ns: String,
}

impl Attacker {
    /// Creates the namespace next to `lab` and links it to fw; both ends are up.
    pub fn new(lab: &Lab) -> Attacker {
        let fw_ns = lab.ns(Side::Fw).to_string();
        let attacker = Attacker {
            ns: format!("{fw_ns}-atk"),
            fw_ns,
        };
        host(&["ip", "netns", "add", &attacker.ns]);
        host(&[
            "ip",
            "-n",
            &attacker.ns,
            "link",
            "add",
            ATTACKER_IFACE,
            "type",
            "veth",
            "peer",
            "name",
            FW_FLOOD_IFACE,
            "netns",
            &attacker.fw_ns,
        ]);
        for (ns, iface) in [
            (&attacker.ns, ATTACKER_IFACE),
            (&attacker.ns, "lo"),
            (&attacker.fw_ns, FW_FLOOD_IFACE),
        ] {
            host(&["ip", "-n", ns, "link", "set", iface, "up"]);
        }
        wait_until_up(&attacker.ns, ATTACKER_IFACE);
        wait_until_up(&attacker.fw_ns, FW_FLOOD_IFACE);
        attacker
    }

    /// The attacker namespace's name, for [`crate::loadgen::Blast::netns`].
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The MAC address of the attacker's end of the link.
    pub fn mac(&self) -> [u8; 6] {
        mac_of(&self.ns, ATTACKER_IFACE)
    }

    /// The MAC address of fw's end of the link, the flood frames' destination.
    pub fn fw_mac(&self) -> [u8; 6] {
        mac_of(&self.fw_ns, FW_FLOOD_IFACE)
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        delete_netns(&self.ns);
    }
}
