//! Feeds arbitrary frame sequences through the whole pipeline (parser, tracker, policy,
//! fragment records, rule limits, the SYN-flood defence) as the kernel runs it: it must
//! never panic, every packet it judges must be counted exactly once as accepted or
//! dropped, fragments never create sessions, and no source holds more sessions than its
//! rule's limit. A record whose control byte has its top bit set is also sent as the first
//! and a later fragment of one datagram, so the fuzzer reaches the follow paths at once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use session_common::wire::{Counter, Hook, NS_PER_SEC, Settings, settings_flags};
use session_testkit::{
    accept_new_rule, inbound_drop_policy, overload_ban_rules, return_traffic_rule,
};
use session_user::{
    host_engine::Model,
    policy::{compile::compile, config},
};

const POLICY: &str = concat!(
    inbound_drop_policy!(),
    return_traffic_rule!("return"),
    accept_new_rule!("web", "tcp", [80, "8000-8080"]),
    overload_ban_rules!(),
    r#"
[[rule]]
name = "limited"
state = ["new"]
proto = "udp"
action = "accept"
limit = { max_src_conn = 2, max_src_conn_rate = "3/2s", max_conn = 5, src_prefix_v6 = 64, overload = "abusers" }

[[rule]]
name = "ping"
proto = "icmp"
icmp_type = ["echo-request"]
action = "accept"
"#
);

fuzz_target!(|data: &[u8]| {
    let config = config::parse(std::path::Path::new("fuzz.toml"), POLICY).expect("policy parses");
    let policy = compile(&config.policy, |_| None).expect("policy compiles");
    let mut settings = Settings::default();
    if data.first().is_some_and(|b| b & 1 == 1) {
        settings.flags |= settings_flags::TCP_LOOSE;
    }
    // The second bit defends the web ports, whose sockets the model says are listening.
    if data.first().is_some_and(|b| b & 2 == 2) {
        settings.flags |= settings_flags::SYN_DEFENCE;
    }
    let mut model = Model::new(settings, &policy);
    for port in [80, 8080] {
        model
            .sockets
            .defended
            .insert(port, session_common::syn_defence::DefendedPort::new(0));
        model.sockets.listening.insert(port);
    }
    let mut now = NS_PER_SEC;
    let mut judged = 0u64;
    // Each record: 1 control byte (hook, time step), 1 length byte, then the frame.
    let mut rest = data.get(1..).unwrap_or_default();
    while rest.len() >= 2 {
        let control = rest[0];
        let len = (rest[1] as usize).min(rest.len() - 2);
        let frame = &rest[2..2 + len];
        rest = &rest[2 + len..];
        let hook = if control & 1 == 0 {
            Hook::Ingress
        } else {
            Hook::Egress
        };
        now += u64::from((control & 0x7f) >> 1) * NS_PER_SEC;
        if model.packet(frame, hook, 1, now).is_some() {
            judged += 1;
        }
        if control & 0x80 != 0 {
            for word in [0x2000u16, 0x0001 | (u16::from(control) << 3 & 0x1ff8)] {
                let Some(piece) = as_fragment(frame, word) else {
                    break;
                };
                let before = model.sessions.map.len();
                if model.packet(&piece, hook, 1, now).is_some() {
                    judged += 1;
                }
                if word != 0x2000 {
                    assert!(
                        model.sessions.map.len() <= before,
                        "a later fragment created a session"
                    );
                }
            }
        }
    }
    let counters = &model.counters;
    assert!(
        model.fragments.map.len() <= model.fragments.capacity,
        "the fragment records outgrew their bound"
    );
    assert_eq!(counters.get(Counter::PacketsSeen), judged);
    assert!(
        model.limits.sources.values().all(|source| source.conns <= 2),
        "a source holds more sessions than max_src_conn"
    );
    assert_eq!(
        counters.get(Counter::PacketsAccepted) + counters.get(Counter::PacketsDropped),
        judged
    );
});

/// An untagged IPv4 frame with its flags/offset word set to `word` (first fragment:
/// MF; later: an offset), its id and everything else kept.
fn as_fragment(frame: &[u8], word: u16) -> Option<Vec<u8>> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let mut out = frame.to_vec();
    out[20..22].copy_from_slice(&word.to_be_bytes());
    Some(out)
}
