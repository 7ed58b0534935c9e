//! Which existing sessions a newly applied policy no longer admits.
//!
//! Packets of a session are judged by the active policy with their current state, so a
//! policy that accepts `established` would otherwise keep every session admitted under the
//! old policy alive until it times out, even those the new policy would refuse to open.
//! After each apply, the daemon asks the new policy whether it would admit each session's
//! first packet (same addresses, ports, protocol, ICMP type, hook and interface, state
//! new) and removes the sessions it would not; their next packets are judged afresh, as
//! new or invalid packets.

use session_common::{
    engine::evaluate,
    packet::PacketMeta,
    track::originator_endpoints,
    wire::{Action, CtState, FlowKey, Hook, Session, proto, session_flags},
};

use crate::{host_engine::ModelRules, policy::compile::CompiledPolicy};

/// The first packet of the session stored under `key`, as far as the policy can see it.
fn first_packet(key: &FlowKey, session: &Session) -> PacketMeta {
    let (src, sport, dst, dport) = originator_endpoints(key, session);
    let mut meta = PacketMeta {
        family: key.family,
        proto: key.proto,
        src,
        dst,
        sport,
        dport,
        ..PacketMeta::default()
    };
    if key.proto == proto::ICMP || key.proto == proto::ICMPV6 {
        meta.icmp_type = session.origin_icmp_type;
    }
    meta
}

fn admitted_by(rules: &ModelRules, key: &FlowKey, session: &Session) -> bool {
    admitting_rule(rules, key, session).is_some()
}

/// The id of the rule of `rules` that would admit the first packet of the session stored
/// under `key` ([`session_common::wire::RULE_ID_DEFAULT`] for a default action), or `None`
/// when the policy would not admit it. Sessions imported into the table (takeover,
/// restore) are judged by this, exactly as a reload judges the sessions it finds.
pub fn admitting_rule(rules: &ModelRules, key: &FlowKey, session: &Session) -> Option<u16> {
    let hook = if session.flags & session_flags::ORIGIN_EGRESS != 0 {
        Hook::Egress
    } else {
        Hook::Ingress
    };
    let ifindex = u32::from_ne_bytes(session.origin_ifindex);
    let decision = evaluate(
        rules,
        &first_packet(key, session),
        CtState::New,
        hook,
        ifindex,
    );
    (decision.action == Action::Accept).then_some(decision.rule_id)
}

/// The keys of `sessions` that `policy` would not admit.
pub fn refused(policy: &CompiledPolicy, sessions: &[(FlowKey, Session)]) -> Vec<FlowKey> {
    let rules = ModelRules::new(policy);
    sessions
        .iter()
        .filter(|(key, session)| !admitted_by(&rules, key, session))
        .map(|(key, _)| *key)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, path::Path};

    use session_common::wire::Hook;

    use super::*;
    use session_testkit::frames;

    use crate::{
        host_engine::Model,
        policy::{compile::compile, config},
    };

    const OUTSIDE: u32 = 7;

    fn policy(rules: &str) -> CompiledPolicy {
        let text = format!("[policy]\ninbound = \"drop\"\noutbound = \"drop\"\n{rules}");
        let config = config::parse(Path::new("test.toml"), &text)
            .unwrap_or_else(|e| panic!("test config rejected: {e}"));
        compile(&config.policy, |_| Some(OUTSIDE)).expect("test policy compiles")
    }

    const RETURN: &str = "[[rule]]\nname = \"return\"\nstate = [\"established\", \"related\"]\ndirection = \"any\"\naction = \"accept\"\n";

    fn open(model: &mut Model, src: &str, dst: &str, dport: u16, hook: Hook) {
        let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        let frame = frames::frame(src, dst, frames::udp(40000, dport, 8));
        let outcome = model.packet(&frame, hook, OUTSIDE, 0).expect("an IP frame");
        assert!(
            outcome.created,
            "session to port {dport} not created: {outcome:?}"
        );
    }

    #[test]
    fn sessions_the_new_policy_would_not_open_are_refused_and_others_kept() {
        let old = policy(&format!(
            "{RETURN}[[rule]]\nname = \"dns\"\nstate = [\"new\"]\nproto = \"udp\"\ndport = [53, 5353]\naction = \"accept\"\n\
             [[rule]]\nname = \"out\"\nstate = [\"new\"]\ndirection = \"out\"\naction = \"accept\"\n"
        ));
        let mut model = Model::new(Default::default(), &old);
        open(&mut model, "198.18.0.1", "198.18.0.2", 53, Hook::Ingress);
        open(&mut model, "198.18.0.1", "198.18.0.2", 5353, Hook::Ingress);
        open(&mut model, "198.18.0.2", "198.18.0.9", 9999, Hook::Egress);
        open(&mut model, "2001:2::1", "2001:2::2", 53, Hook::Ingress);
        let sessions: Vec<_> = model.sessions.map.iter().map(|(k, s)| (*k, *s)).collect();

        // Port 5353 is no longer open, and outbound is now limited to port 53.
        let new = policy(&format!(
            "{RETURN}[[rule]]\nname = \"dns\"\nstate = [\"new\"]\nproto = \"udp\"\ndport = [53]\naction = \"accept\"\ndirection = \"any\"\n"
        ));
        let mut refused_ports: Vec<u16> = refused(&new, &sessions)
            .iter()
            .map(|key| {
                if key.port_lo == 40000 {
                    key.port_hi
                } else {
                    key.port_lo
                }
            })
            .collect();
        refused_ports.sort_unstable();
        assert_eq!(refused_ports, [5353, 9999]);

        // The old policy still admits all of them.
        assert!(refused(&old, &sessions).is_empty());
    }

    #[test]
    fn an_imported_session_gets_the_id_of_the_rule_that_admits_it_now() {
        let old = policy(&format!(
            "{RETURN}[[rule]]\nname = \"any-udp\"\nstate = [\"new\"]\nproto = \"udp\"\naction = \"accept\"\n"
        ));
        let mut model = Model::new(Default::default(), &old);
        open(&mut model, "198.18.0.1", "198.18.0.2", 53, Hook::Ingress);
        open(&mut model, "198.18.0.1", "198.18.0.2", 9999, Hook::Ingress);
        let new = policy(&format!(
            "{RETURN}[[rule]]\nname = \"other\"\nstate = [\"new\"]\nproto = \"tcp\"\naction = \"accept\"\n\
             [[rule]]\nname = \"dns\"\nstate = [\"new\"]\nproto = \"udp\"\ndport = [53]\naction = \"accept\"\n"
        ));
        let rules = ModelRules::new(&new);
        for (key, session) in &model.sessions.map {
            let port = if key.port_lo == 40000 {
                key.port_hi
            } else {
                key.port_lo
            };
            let rule = admitting_rule(&rules, key, session);
            match port {
                53 => assert_eq!(rule, Some(2), "the third rule, `dns`, admits it"),
                _ => assert_eq!(rule, None, "nothing admits port {port}"),
            }
        }
    }
}
