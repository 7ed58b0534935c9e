//! Feeds arbitrary frame sequences through the whole pipeline (parser, tracker, policy)
//! as the kernel runs it: it must never panic, and every packet it judges must be
//! counted exactly once as accepted or dropped.
#![no_main]

use libfuzzer_sys::fuzz_target;
use session_common::wire::{Counter, Hook, NS_PER_SEC, Settings, settings_flags};
use session_user::{
    host_engine::Model,
    policy::{compile::compile, config},
};

const POLICY: &str = r#"
[policy]
inbound = "drop"
outbound = "accept"
[[rule]]
name = "return"
state = ["established", "related"]
action = "accept"
[[rule]]
name = "web"
state = ["new"]
proto = "tcp"
dport = [80, "8000-8080"]
action = "accept"
[[rule]]
name = "ping"
proto = "icmp"
icmp_type = ["echo-request"]
action = "accept"
"#;

fuzz_target!(|data: &[u8]| {
    let config = config::parse(std::path::Path::new("fuzz.toml"), POLICY).expect("policy parses");
    let policy = compile(&config.policy, |_| None).expect("policy compiles");
    let mut settings = Settings::default();
    if data.first().is_some_and(|b| b & 1 == 1) {
        settings.flags |= settings_flags::TCP_LOOSE;
    }
    let mut model = Model::new(settings, &policy);
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
        now += u64::from(control >> 1) * NS_PER_SEC;
        if model.packet(frame, hook, 1, now).is_some() {
            judged += 1;
        }
    }
    let counters = &model.counters;
    assert_eq!(counters.get(Counter::PacketsSeen), judged);
    assert_eq!(
        counters.get(Counter::PacketsAccepted) + counters.get(Counter::PacketsDropped),
        judged
    );
});
