//! The reaper on real pinned maps: `PinnedMaps::reap` reads the tiers in batches
//! (`BPF_MAP_LOOKUP_BATCH`), so it is checked here against the kernel with more sessions
//! than one batch holds, in both tiers. Needs root and a bpffs on /sys/fs/bpf (`cargo xtask
//! setup` mounts it).

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, Map, MapData};
use session_common::wire::{FAMILY_IPV4, FlowKey, Session, map_names};
use session_user::bpf::{
    clock::monotonic_ns, kernel_log::KernelLogLevel, loader, pinned::PinnedMaps,
};

/// Protected-table capacity; the unassured tier gets a quarter.
const CAPACITY: u32 = 16_384;

/// Removes the test's pin directory, also when the test fails.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tier(pin: &Path, name: &str) -> HashMap<MapData, FlowKey, Session> {
    let data = MapData::from_pin(pin.join(name))
        .unwrap_or_else(|error| panic!("opening pinned {name}: {error}"));
    HashMap::try_from(Map::from_map_data(data).expect("a map"))
        .unwrap_or_else(|error| panic!("{name} is not a hash map: {error}"))
}

/// A distinct canonical TCP key per index: the server 198.18.0.2:8080 sorts lower than
/// the clients from 198.19.0.0/16.
fn key(tier: u8, index: u32) -> FlowKey {
    FlowKey {
        addr_lo: Ipv4Addr::new(198, 18, 0, 2).to_ipv6_mapped().octets(),
        addr_hi: Ipv4Addr::new(198, 19, tier, (index % 250) as u8)
            .to_ipv6_mapped()
            .octets(),
        port_lo: 8080,
        port_hi: 1024 + (index / 250) as u16,
        proto: 6,
        family: FAMILY_IPV4,
        ..FlowKey::default()
    }
}

#[test]
fn reap_removes_exactly_the_expired_sessions_of_both_tiers_across_batches() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the reaper test loads eBPF maps and needs root: run it with `cargo xtask test`"
    );
    let pin = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/session-reaper-{}",
        std::process::id()
    )));
    let _ebpf = loader::load(
        &pin.0,
        loader::Sizes::sessions(CAPACITY),
        false,
        KernelLogLevel::default(),
    )
    .unwrap_or_else(|error| panic!("loading the program: {error:#}"));
    let maps = PinnedMaps::open(&pin.0).expect("pinned maps");
    let now = monotonic_ns();
    let mut expired = HashSet::new();
    let mut live = HashSet::new();
    for (tier_index, (name, count)) in [
        (map_names::SESSIONS, 10_000u32),
        (map_names::UNASSURED, 3_000),
    ]
    .into_iter()
    .enumerate()
    {
        let mut map = tier(&pin.0, name);
        for index in 0..count {
            let key = key(tier_index as u8, index);
            let gone = index % 7 == 0;
            let session = Session {
                created_ns: now - 1_000,
                expires_ns: if gone {
                    now - 1
                } else {
                    now + 3_600_000_000_000
                },
                ..Session::default()
            };
            map.insert(key, session, 0)
                .unwrap_or_else(|error| panic!("inserting into {name}: {error}"));
            if gone {
                expired.insert(key);
            } else {
                live.insert(key);
            }
        }
    }

    let mut handed_over = HashSet::new();
    let removed = maps
        .reap(now, |key, session| {
            assert!(
                session.expires_ns <= now,
                "a live session was handed over as removed"
            );
            handed_over.insert(*key);
        })
        .expect("reaping");

    assert_eq!(
        removed,
        expired.len() as u64,
        "the reaper must remove every expired session and nothing else"
    );
    let left: HashSet<FlowKey> = maps
        .all_sessions()
        .expect("reading the tiers")
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert_eq!(
        handed_over, expired,
        "each removed session must be handed to the caller once"
    );
    assert_eq!(
        left, live,
        "exactly the live sessions must remain after the sweep"
    );
}
