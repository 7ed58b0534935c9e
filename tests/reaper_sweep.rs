//! The reaper runs off the daemon's event loop: while it sweeps a million expired sessions
//! (seconds in a debug build), `session events` clients are still served and events still
//! delivered. Proven by order, not by timing: a logged packet's event reaches a client
//! while the daemon's `sessions_expired` counter, which the sweep bumps only when it ends,
//! still shows none of the million removed. With the sweep on the event loop, the event
//! could only come after.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use session_common::wire::{DaemonCounter, FAMILY_IPV4, FlowKey, Session, map_names};
use session_tests::{
    BLOCKED_UDP_RULE, Family, Lab, Side, WEB_POLICY, lifecycle::PinGuard, wait_for,
};
use session_user::bpf::{
    clock::monotonic_ns, kernel_log::KernelLogLevel, loader, pinned::PinnedMaps,
};

/// Table capacity, a power of two as the default is.
const CAPACITY: u32 = 1 << 20;
/// Expired sessions the daemon finds when it starts: its first sweep removes them all.
const EXPIRED: u32 = 1_000_000;
const BLOCKED: u16 = 9999;

/// A distinct canonical UDP key per index: the server 198.18.0.2:5353 sorts lower than
/// the clients from 198.19.0.0/16.
fn key(index: u32) -> FlowKey {
    FlowKey {
        addr_lo: Ipv4Addr::new(198, 18, 0, 2).to_ipv6_mapped().octets(),
        addr_hi: Ipv4Addr::new(198, 19, (index >> 8) as u8, index as u8)
            .to_ipv6_mapped()
            .octets(),
        port_lo: 5353,
        port_hi: 1024 + (index >> 16) as u16,
        proto: 17,
        family: FAMILY_IPV4,
        ..FlowKey::default()
    }
}

/// Creates the lab's maps as the daemon would (same capacity) and fills the protected
/// table with [`EXPIRED`] sessions that expired a moment ago.
fn fill_expired(lab: &Lab) {
    let pin = lab.pin_dir();
    let ebpf = loader::load(
        &pin,
        loader::Sizes::sessions(CAPACITY),
        false,
        KernelLogLevel::default(),
    )
    .unwrap_or_else(|error| panic!("creating the maps under {}: {error:#}", pin.display()));
    let data = MapData::from_pin(pin.join(map_names::SESSIONS))
        .unwrap_or_else(|error| panic!("opening the pinned session table: {error}"));
    let mut table: HashMap<MapData, FlowKey, Session> =
        HashMap::try_from(Map::from_map_data(data).expect("a map"))
            .unwrap_or_else(|error| panic!("the session table is not a hash map: {error}"));
    let now = monotonic_ns();
    let session = Session {
        created_ns: now - 2_000_000_000,
        expires_ns: now - 1,
        ..Session::default()
    };
    for index in 0..EXPIRED {
        table
            .insert(key(index), session, 0)
            .unwrap_or_else(|error| panic!("inserting expired session {index}: {error}"));
    }
    drop(ebpf);
}

#[test]
fn events_are_delivered_while_the_reaper_sweeps_a_million_sessions() {
    let lab = Lab::new("rp");
    let _pins = PinGuard::new(lab.pin_dir());
    let filled = Instant::now();
    fill_expired(&lab);
    eprintln!(
        "filled {EXPIRED} expired sessions in {:?}",
        filled.elapsed()
    );
    let policy = format!("[limits]\nmax_sessions = {CAPACITY}\n{WEB_POLICY}{BLOCKED_UDP_RULE}");
    let daemon = lab.daemon(&policy);
    let ready = Instant::now();
    let client = daemon.cli_background(&["events", "--json"]);
    let socket = lab.udp_socket(Side::Client, Family::V4, 0);
    let to = Family::V4.sock(Side::Fw, BLOCKED);
    let delivered = wait_for(
        "a logged packet's event while the reaper sweeps",
        Duration::from_secs(120),
        || {
            lab.in_ns(Side::Client, || socket.send_to(b"probe", to))
                .unwrap_or_else(|e| panic!("sending to {to}: {e}"));
            std::thread::sleep(Duration::from_millis(50));
            client
                .stdout()
                .lines()
                .any(|line| line.contains("\"dport\":9999") && line.contains("logged"))
                .then(|| ready.elapsed())
        },
    );
    // The daemon's counters, read straight from their pinned map: `session stats` would
    // also count the million sessions, which takes longer than the sweep.
    let maps = PinnedMaps::open(daemon.pin_dir()).expect("the daemon's pinned maps");
    let read = |counter| {
        maps.daemon_counter(counter)
            .unwrap_or_else(|error| panic!("reading {counter:?}: {error:#}"))
    };
    let expired_then = read(DaemonCounter::SessionsExpired);
    let runs_then = read(DaemonCounter::ReaperRuns);
    let expired = wait_for(
        "the reaper to finish its sweep",
        Duration::from_secs(300),
        || {
            std::thread::sleep(Duration::from_millis(100));
            (read(DaemonCounter::ReaperRuns) > 0).then(|| read(DaemonCounter::SessionsExpired))
        },
    );
    let sweep = Duration::from_nanos(read(DaemonCounter::ReaperLastNs));
    eprintln!(
        "event delivered {delivered:?} after ready; the sweep of {EXPIRED} sessions took {sweep:?}"
    );
    assert_eq!(
        expired,
        u64::from(EXPIRED),
        "the first sweep must remove every expired session"
    );
    assert!(
        expired_then == 0 && runs_then == 0,
        "the event came only after the sweep ended ({expired_then} sessions expired, {runs_then} \
         sweeps done when it was seen {delivered:?} after ready; the sweep took {sweep:?}): \
         the reaper blocks the event loop"
    );
}
