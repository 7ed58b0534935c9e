//! Bare XDP programs of the benchmarks' object ([`crate::bench_object`]), attached in a
//! lab by the benchmarks and by the tests of their tools: the end-to-end benchmark's baselines (`session_noop`,
//! `session_drop_all`) on fw's veth, and the wire of a [`Lab::wired`] lab
//! (`session_bench_wire`).

use aya::{
    maps::DevMapHash,
    programs::{Xdp, XdpMode},
};
use session_common::wire::map_names;

use crate::{FW_IFACE, Lab, Side, WIRE_CLIENT_PORT, WIRE_FW_PORT, in_netns};

/// A bare XDP program of the benchmarks' object (`session_noop`, `session_drop_all` or
/// `session_bench_wire`) attached in a lab. Drop it after the lab, so the interfaces (and
/// with them the attachments) are gone before the links are closed.
pub struct BareXdp {
    _ebpf: aya::Ebpf,
}

impl BareXdp {
    /// `program` on fw's veth end.
    pub fn attach(lab: &Lab, program: &str) -> BareXdp {
        BareXdp::load(program, lab.ns(Side::Fw), &[FW_IFACE], |_| {})
    }

    /// The wire of a [`Lab::wired`] lab: `session_bench_wire` on both ports, each port
    /// sending to the other.
    pub fn wire(lab: &Lab) -> BareXdp {
        let ns = lab.wire_ns().expect("a wired lab");
        BareXdp::load(
            "session_bench_wire",
            ns,
            &[WIRE_CLIENT_PORT, WIRE_FW_PORT],
            |ebpf| {
                let map = ebpf
                    .map_mut(map_names::BENCH_WIRE)
                    .expect("BENCH_WIRE in the object");
                let mut ports = DevMapHash::try_from(map)
                    .unwrap_or_else(|error| panic!("BENCH_WIRE is a device hash: {error}"));
                let [client, fw] = [WIRE_CLIENT_PORT, WIRE_FW_PORT].map(ifindex);
                // The kernel resolves the targets in the caller's namespace: the wire's.
                for (from, to) in [(client, fw), (fw, client)] {
                    ports
                        .insert(from, to, None, 0)
                        .unwrap_or_else(|error| panic!("filling BENCH_WIRE: {error}"));
                }
            },
        )
    }

    /// Loads the object, attaches `program` to `ifaces` in the namespace `ns` and runs
    /// `set_up` there on the loaded object.
    fn load(
        program: &str,
        ns: &str,
        ifaces: &[&str],
        set_up: impl FnOnce(&mut aya::Ebpf) + Send,
    ) -> BareXdp {
        let mut ebpf = crate::bench_object::load(1)
            .unwrap_or_else(|error| panic!("loading the eBPF object: {error:#}"));
        // Resolving the interfaces and creating the links happen in the namespace.
        in_netns(ns, || {
            let xdp: &mut Xdp = ebpf
                .program_mut(program)
                .unwrap_or_else(|| panic!("{program} in the object"))
                .try_into()
                .unwrap_or_else(|error| panic!("{program} is XDP: {error}"));
            xdp.load()
                .unwrap_or_else(|error| panic!("loading {program}: {error}"));
            for iface in ifaces {
                xdp.attach(iface, XdpMode::Driver)
                    .unwrap_or_else(|error| panic!("attaching {program} to {iface}: {error}"));
            }
            set_up(&mut ebpf);
        });
        BareXdp { _ebpf: ebpf }
    }
}

/// The index of `iface` in the calling thread's namespace.
fn ifindex(iface: &str) -> u32 {
    let name = std::ffi::CString::new(iface).expect("interface name without NUL");
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => panic!("no interface {iface}: {}", std::io::Error::last_os_error()),
        index => index,
    }
}
