//! Whole packet sequences through the host model of the engine (`Model`), checking the
//! per-packet `ct state` nftables would report, the session state nf_conntrack would hold,
//! timeouts, verdicts and counters.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use session_common::{
    engine::Outcome,
    packet::{PacketMeta, parse},
    track::flow_key,
    wire::{
        Action, Counter, CtState, FlowState, Hook, Session, Settings, TcpState, event_kind,
        session_flags, settings_flags, verdict_flags,
    },
};
use session_testkit::{
    accept_new_rule,
    frames::{self, Tcp, tcp_flags},
};
use session_user::{
    host_engine::{Model, ModelRules},
    policy::{
        compile::{self, CompiledPolicy},
        config,
    },
};

const S: u64 = 1_000_000_000;
const IF_OUTSIDE: u32 = 2;

const SYN: u8 = tcp_flags::SYN;
const ACK: u8 = tcp_flags::ACK;
const FIN: u8 = tcp_flags::FIN;
const RST: u8 = tcp_flags::RST;
const PSH: u8 = tcp_flags::PSH;

fn client() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))
}

fn server() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2))
}

fn router() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, 254))
}

fn client6() -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1))
}

fn server6() -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2))
}

fn router6() -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0xfe))
}

/// The settings and the compiled policy of a test config; every interface is IF_OUTSIDE.
fn compiled(text: &str) -> (Settings, CompiledPolicy) {
    let config = config::parse(Path::new("test.toml"), text)
        .unwrap_or_else(|e| panic!("test config rejected: {e}"));
    let compiled =
        compile::compile(&config.policy, |_| Some(IF_OUTSIDE)).expect("test policy compiles");
    (config.settings, compiled)
}

fn model_from(text: &str) -> Model {
    let (settings, policy) = compiled(text);
    Model::new(settings, &policy)
}

/// Accepts everything: shows tracking without the policy in the way.
fn permissive() -> Model {
    model_from("[policy]\ninbound = \"accept\"\noutbound = \"accept\"\n")
}

fn permissive_with(extra: &str) -> Model {
    model_from(&format!(
        "{extra}\n[policy]\ninbound = \"accept\"\noutbound = \"accept\"\n"
    ))
}

/// A host that serves TCP 8080 and drops everything else that is not established/related.
const RESTRICTIVE: &str = concat!(
    r#"
[policy]
inbound = "drop"
outbound = "drop"

[[rule]]
name = "return-traffic"
state = ["established", "related"]
direction = "any"
action = "accept"
"#,
    accept_new_rule!("web", "tcp", 8080),
    r#"
[[rule]]
name = "client-out"
state = ["new"]
direction = "out"
action = "accept"
"#
);

fn restrictive() -> Model {
    model_from(RESTRICTIVE)
}

fn tcp_frame(src: IpAddr, dst: IpAddr, segment: Tcp) -> Vec<u8> {
    frames::frame(src, dst, frames::tcp(segment))
}

fn seg(sport: u16, dport: u16, flags: u8, seq: u32, ack: u32) -> Tcp {
    Tcp::new(sport, dport, flags).seq_ack(seq, ack)
}

fn udp_frame(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, len: usize) -> Vec<u8> {
    frames::frame(src, dst, frames::udp(sport, dport, len))
}

/// Runs a frame; panics (with context) if the model says it is not IP.
fn run(model: &mut Model, frame: &[u8], hook: Hook, now: u64, what: &str) -> Outcome {
    model
        .packet(frame, hook, IF_OUTSIDE, now)
        .unwrap_or_else(|| panic!("{what}: frame treated as non-IP"))
}

/// Runs a frame at ingress and checks its ct state.
fn expect_state(model: &mut Model, frame: &[u8], now: u64, state: CtState, what: &str) -> Outcome {
    let outcome = run(model, frame, Hook::Ingress, now, what);
    assert_eq!(outcome.state, state, "{what}: ct state");
    outcome
}

fn expect_verdict(
    model: &mut Model,
    frame: &[u8],
    hook: Hook,
    now: u64,
    state: CtState,
    action: Action,
    what: &str,
) {
    let outcome = run(model, frame, hook, now, what);
    assert_eq!(outcome.state, state, "{what}: ct state");
    assert_eq!(outcome.decision.action, action, "{what}: verdict");
}

/// The session (live or expired) the frame belongs to.
fn session_of(model: &Model, frame: &[u8]) -> Option<Session> {
    let mut meta = PacketMeta::default();
    parse(frame, &mut meta).expect("frame parses");
    let (key, _) = flow_key(&meta);
    model.sessions.map.get(&key).copied()
}

fn tcp_state(model: &Model, frame: &[u8]) -> TcpState {
    let session = session_of(model, frame).expect("a session exists for this flow");
    TcpState::from_u8(session.state)
}

fn assured(session: &Session) -> bool {
    session.flags & session_flags::ASSURED != 0
}

fn counter(model: &Model, which: Counter) -> u64 {
    model.counters.get(which)
}

/// A client at 198.18.0.1:40000 and a server at 198.18.0.2:8080 with sequence numbers.
struct Conn {
    cport: u16,
    sport: u16,
    cseq: u32,
    sseq: u32,
}

impl Conn {
    fn new() -> Conn {
        Conn {
            cport: 40000,
            sport: 8080,
            cseq: 1_000,
            sseq: 5_000_000,
        }
    }

    fn c(&self, flags: u8) -> Vec<u8> {
        tcp_frame(
            client(),
            server(),
            seg(
                self.cport,
                self.sport,
                flags,
                self.cseq,
                if flags & ACK != 0 { self.sseq } else { 0 },
            ),
        )
    }

    fn s(&self, flags: u8) -> Vec<u8> {
        tcp_frame(
            server(),
            client(),
            seg(
                self.sport,
                self.cport,
                flags,
                self.sseq,
                if flags & ACK != 0 { self.cseq } else { 0 },
            ),
        )
    }

    fn c_data(&self, len: usize) -> Vec<u8> {
        tcp_frame(
            client(),
            server(),
            seg(self.cport, self.sport, ACK | PSH, self.cseq, self.sseq).payload(len),
        )
    }

    fn s_data(&self, len: usize) -> Vec<u8> {
        tcp_frame(
            server(),
            client(),
            seg(self.sport, self.cport, ACK | PSH, self.sseq, self.cseq).payload(len),
        )
    }

    /// SYN in, SYN-ACK out, ACK in at t = 0, 1, 2 ns through a policy that must accept
    /// all three; checks their states and verdicts.
    fn handshake_accepted(&mut self, model: &mut Model) {
        let steps = [
            (Hook::Ingress, CtState::New, "SYN"),
            (Hook::Egress, CtState::Established, "SYN-ACK"),
            (Hook::Ingress, CtState::Established, "ACK"),
        ];
        for (now, (hook, state, what)) in steps.into_iter().enumerate() {
            let frame = match now {
                0 => self.c(SYN),
                1 => {
                    self.cseq += 1;
                    self.s(SYN | ACK)
                }
                _ => {
                    self.sseq += 1;
                    self.c(ACK)
                }
            };
            expect_verdict(model, &frame, hook, now as u64, state, Action::Accept, what);
        }
    }

    /// SYN, SYN-ACK, ACK at t = 0, 1 ms, 2 ms; checks the per-packet states.
    fn handshake(&mut self, model: &mut Model) {
        let syn = self.c(SYN);
        expect_state(model, &syn, 0, CtState::New, "SYN");
        self.cseq += 1;
        let synack = self.s(SYN | ACK);
        expect_state(model, &synack, 1_000_000, CtState::Established, "SYN-ACK");
        self.sseq += 1;
        expect_state(model, &self.c(ACK), 2_000_000, CtState::Established, "ACK");
    }
}

// ---------------------------------------------------------------- TCP

#[test]
fn tcp_handshake_reports_new_then_established_and_ends_established_and_assured() {
    let mut model = permissive();
    let mut conn = Conn::new();
    let syn = conn.c(SYN);
    expect_state(&mut model, &syn, 0, CtState::New, "SYN");
    assert_eq!(tcp_state(&model, &syn), TcpState::SynSent);
    let session = session_of(&model, &syn).expect("session after SYN");
    assert_eq!(session.expires_ns, 120 * S, "SYN_SENT timeout");
    assert!(!assured(&session));

    conn.cseq += 1;
    let synack = conn.s(SYN | ACK);
    expect_state(&mut model, &synack, S, CtState::Established, "SYN-ACK");
    assert_eq!(tcp_state(&model, &syn), TcpState::SynRecv);
    let session = session_of(&model, &syn).expect("session");
    assert_eq!(session.expires_ns, S + 60 * S, "SYN_RECV timeout");
    assert!(
        !assured(&session),
        "not assured before the handshake completes"
    );

    conn.sseq += 1;
    expect_state(&mut model, &conn.c(ACK), 2 * S, CtState::Established, "ACK");
    let session = session_of(&model, &syn).expect("session");
    assert_eq!(TcpState::from_u8(session.state), TcpState::Established);
    assert!(
        assured(&session),
        "the third packet of the handshake assures the session"
    );
    assert_eq!(
        session.expires_ns,
        2 * S + 432_000 * S,
        "ESTABLISHED timeout"
    );
    assert_eq!(session.packets, [2, 1]);
    assert_eq!(model.sessions.map.len(), 1);
    assert_eq!(counter(&model, Counter::SessionsCreated), 1);
}

#[test]
fn tcp_handshake_with_window_scaling_then_data_both_ways_stays_established() {
    let mut model = permissive();
    let mut conn = Conn::new();
    let syn = tcp_frame(
        client(),
        server(),
        seg(conn.cport, conn.sport, SYN, conn.cseq, 0).wscale(7),
    );
    expect_state(&mut model, &syn, 0, CtState::New, "SYN");
    conn.cseq += 1;
    let synack = tcp_frame(
        server(),
        client(),
        seg(conn.sport, conn.cport, SYN | ACK, conn.sseq, conn.cseq).wscale(7),
    );
    expect_state(
        &mut model,
        &synack,
        S / 100,
        CtState::Established,
        "SYN-ACK",
    );
    conn.sseq += 1;
    expect_state(
        &mut model,
        &conn.c(ACK),
        S / 50,
        CtState::Established,
        "ACK",
    );
    let mut now = S;
    for round in 0..20 {
        expect_state(
            &mut model,
            &conn.c_data(1400),
            now,
            CtState::Established,
            &format!("client data {round}"),
        );
        conn.cseq += 1400;
        expect_state(
            &mut model,
            &conn.s_data(1400),
            now + 1000,
            CtState::Established,
            &format!("server data {round}"),
        );
        conn.sseq += 1400;
        now += S / 10;
    }
    expect_state(
        &mut model,
        &conn.c(ACK),
        now,
        CtState::Established,
        "final ACK",
    );
    assert_eq!(tcp_state(&model, &syn), TcpState::Established);
    assert_eq!(counter(&model, Counter::StateInvalid), 0);
}

#[test]
fn tcp_retransmitted_syn_is_still_new() {
    let mut model = permissive();
    let conn = Conn::new();
    let syn = conn.c(SYN);
    expect_state(&mut model, &syn, 0, CtState::New, "SYN");
    expect_state(&mut model, &syn, S, CtState::New, "retransmitted SYN");
    assert_eq!(tcp_state(&model, &syn), TcpState::SynSent);
    assert_eq!(
        session_of(&model, &syn).expect("session").expires_ns,
        120 * S,
        "a retransmitted SYN does not renew the timeout (kernel >= 5.15)"
    );
    assert_eq!(counter(&model, Counter::SessionsCreated), 1);
}

#[test]
fn tcp_retransmitted_synack_is_ignored_but_established() {
    let mut model = permissive();
    let mut conn = Conn::new();
    expect_state(&mut model, &conn.c(SYN), 0, CtState::New, "SYN");
    conn.cseq += 1;
    let synack = conn.s(SYN | ACK);
    expect_state(&mut model, &synack, S, CtState::Established, "SYN-ACK");
    expect_state(
        &mut model,
        &synack,
        2 * S,
        CtState::Established,
        "retransmitted SYN-ACK",
    );
    assert_eq!(tcp_state(&model, &synack), TcpState::SynRecv);
    assert_eq!(counter(&model, Counter::TcpIgnored), 1);
}

#[test]
fn tcp_client_close_goes_fin_wait_close_wait_last_ack_time_wait() {
    let mut model = permissive();
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    let key_frame = conn.c(ACK);
    let fin = conn.c(FIN | ACK);
    expect_state(&mut model, &fin, S, CtState::Established, "client FIN");
    assert_eq!(tcp_state(&model, &key_frame), TcpState::FinWait);
    assert_eq!(
        session_of(&model, &key_frame).expect("session").expires_ns,
        S + 120 * S
    );
    conn.cseq += 1;
    expect_state(
        &mut model,
        &conn.s(ACK),
        2 * S,
        CtState::Established,
        "server ACK of FIN",
    );
    assert_eq!(tcp_state(&model, &key_frame), TcpState::CloseWait);
    assert_eq!(
        session_of(&model, &key_frame).expect("session").expires_ns,
        2 * S + 60 * S
    );
    expect_state(
        &mut model,
        &conn.s(FIN | ACK),
        3 * S,
        CtState::Established,
        "server FIN",
    );
    assert_eq!(tcp_state(&model, &key_frame), TcpState::LastAck);
    assert_eq!(
        session_of(&model, &key_frame).expect("session").expires_ns,
        3 * S + 30 * S
    );
    conn.sseq += 1;
    expect_state(
        &mut model,
        &conn.c(ACK),
        4 * S,
        CtState::Established,
        "client last ACK",
    );
    assert_eq!(tcp_state(&model, &key_frame), TcpState::TimeWait);
    assert_eq!(
        session_of(&model, &key_frame).expect("session").expires_ns,
        4 * S + 120 * S
    );
}

#[test]
fn tcp_server_close_reaches_time_wait_too() {
    let mut model = permissive();
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    let key_frame = conn.c(ACK);
    expect_state(
        &mut model,
        &conn.s(FIN | ACK),
        S,
        CtState::Established,
        "server FIN",
    );
    assert_eq!(tcp_state(&model, &key_frame), TcpState::FinWait);
    conn.sseq += 1;
    expect_state(
        &mut model,
        &conn.c(ACK),
        2 * S,
        CtState::Established,
        "client ACK",
    );
    assert_eq!(tcp_state(&model, &key_frame), TcpState::CloseWait);
    expect_state(
        &mut model,
        &conn.c(FIN | ACK),
        3 * S,
        CtState::Established,
        "client FIN",
    );
    assert_eq!(tcp_state(&model, &key_frame), TcpState::LastAck);
    conn.cseq += 1;
    expect_state(
        &mut model,
        &conn.s(ACK),
        4 * S,
        CtState::Established,
        "server last ACK",
    );
    assert_eq!(tcp_state(&model, &key_frame), TcpState::TimeWait);
}

#[test]
fn tcp_simultaneous_fin_goes_through_last_ack() {
    let mut model = permissive();
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    let key_frame = conn.c(ACK);
    expect_state(
        &mut model,
        &conn.c(FIN | ACK),
        S,
        CtState::Established,
        "client FIN",
    );
    expect_state(
        &mut model,
        &conn.s(FIN | ACK),
        S + 1,
        CtState::Established,
        "server FIN crossing it",
    );
    assert_eq!(tcp_state(&model, &key_frame), TcpState::LastAck);
    conn.cseq += 1;
    conn.sseq += 1;
    expect_state(
        &mut model,
        &conn.c(ACK),
        2 * S,
        CtState::Established,
        "client ACK",
    );
    assert_eq!(tcp_state(&model, &key_frame), TcpState::TimeWait);
    expect_state(
        &mut model,
        &conn.s(ACK),
        2 * S + 1,
        CtState::Established,
        "server ACK",
    );
    assert_eq!(tcp_state(&model, &key_frame), TcpState::TimeWait);
}

#[test]
fn tcp_new_syn_on_a_time_wait_tuple_is_new_again() {
    let mut model = restrictive();
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    expect_state(
        &mut model,
        &conn.c(FIN | ACK),
        S,
        CtState::Established,
        "client FIN",
    );
    conn.cseq += 1;
    expect_state(
        &mut model,
        &conn.s(ACK),
        S,
        CtState::Established,
        "server ACK",
    );
    expect_state(
        &mut model,
        &conn.s(FIN | ACK),
        S,
        CtState::Established,
        "server FIN",
    );
    conn.sseq += 1;
    expect_state(
        &mut model,
        &conn.c(ACK),
        S,
        CtState::Established,
        "client last ACK",
    );
    assert_eq!(tcp_state(&model, &conn.c(ACK)), TcpState::TimeWait);

    // Same ports, fresh ISN, 10 s later: still in TIME_WAIT's 120 s.
    let mut again = Conn {
        cseq: 9_000_000,
        sseq: 70_000,
        ..Conn::new()
    };
    let syn = again.c(SYN);
    expect_verdict(
        &mut model,
        &syn,
        Hook::Ingress,
        10 * S,
        CtState::New,
        Action::Accept,
        "SYN reusing the tuple",
    );
    assert_eq!(tcp_state(&model, &syn), TcpState::SynSent);
    let session = session_of(&model, &syn).expect("session");
    assert!(
        !assured(&session),
        "the reopened session starts from scratch"
    );
    assert_eq!(session.created_ns, 10 * S);
    assert_eq!(session.packets, [1, 0]);
    again.cseq += 1;
    expect_verdict(
        &mut model,
        &again.s(SYN | ACK),
        Hook::Egress,
        11 * S,
        CtState::Established,
        Action::Accept,
        "SYN-ACK",
    );
    again.sseq += 1;
    expect_verdict(
        &mut model,
        &again.c(ACK),
        Hook::Ingress,
        12 * S,
        CtState::Established,
        Action::Accept,
        "ACK",
    );
    assert_eq!(tcp_state(&model, &syn), TcpState::Established);
    assert_eq!(counter(&model, Counter::SessionsCreated), 2);
}

#[test]
fn tcp_rst_from_the_client_closes_an_established_session() {
    let mut model = permissive();
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    let rst = conn.c(RST | ACK);
    expect_state(&mut model, &rst, 5 * S, CtState::Established, "client RST");
    assert_eq!(tcp_state(&model, &rst), TcpState::Close);
    assert_eq!(
        session_of(&model, &rst).expect("session").expires_ns,
        5 * S + 10 * S,
        "CLOSE timeout"
    );
    // Stragglers of the closed connection still belong to it.
    expect_state(
        &mut model,
        &conn.s_data(10),
        6 * S,
        CtState::Established,
        "late server data",
    );
    assert_eq!(tcp_state(&model, &rst), TcpState::Close);
}

#[test]
fn tcp_rst_from_the_server_closes_an_established_session() {
    let mut model = permissive();
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    let rst = conn.s(RST);
    expect_state(&mut model, &rst, 5 * S, CtState::Established, "server RST");
    assert_eq!(tcp_state(&model, &rst), TcpState::Close);
}

#[test]
fn tcp_new_syn_after_rst_is_new_again() {
    let mut model = permissive();
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    expect_state(
        &mut model,
        &conn.c(RST | ACK),
        S,
        CtState::Established,
        "client RST",
    );
    let again = Conn {
        cseq: 77_777,
        ..Conn::new()
    };
    let syn = again.c(SYN);
    expect_state(&mut model, &syn, 2 * S, CtState::New, "SYN after RST");
    assert_eq!(tcp_state(&model, &syn), TcpState::SynSent);
}

#[test]
fn tcp_rst_with_an_old_sequence_number_is_invalid() {
    let mut model = permissive();
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    let stale = tcp_frame(
        server(),
        client(),
        seg(
            conn.sport,
            conn.cport,
            RST,
            conn.sseq.wrapping_sub(100_000),
            0,
        ),
    );
    expect_state(
        &mut model,
        &stale,
        S,
        CtState::Invalid,
        "RST far before the window",
    );
    assert_eq!(tcp_state(&model, &stale), TcpState::Established);
}

#[test]
fn tcp_challenge_ack_to_a_syn_in_last_ack_does_not_end_the_session() {
    let mut model = permissive();
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    expect_state(
        &mut model,
        &conn.c(FIN | ACK),
        S,
        CtState::Established,
        "client FIN",
    );
    conn.cseq += 1;
    expect_state(
        &mut model,
        &conn.s(ACK),
        S,
        CtState::Established,
        "server ACK",
    );
    expect_state(
        &mut model,
        &conn.s(FIN | ACK),
        S,
        CtState::Established,
        "server FIN",
    );
    conn.sseq += 1;
    let key_frame = conn.c(ACK);
    assert_eq!(tcp_state(&model, &key_frame), TcpState::LastAck);
    let syn = tcp_frame(
        client(),
        server(),
        seg(conn.cport, conn.sport, SYN, 777_777, 0),
    );
    expect_state(
        &mut model,
        &syn,
        2 * S,
        CtState::Established,
        "SYN in LAST_ACK (ignored)",
    );
    // RFC 5961: the server answers the SYN with a challenge ACK, which is not the last ACK.
    expect_state(
        &mut model,
        &conn.s(ACK),
        2 * S + 1,
        CtState::Established,
        "challenge ACK",
    );
    assert_eq!(
        tcp_state(&model, &key_frame),
        TcpState::LastAck,
        "a challenge ACK does not ack the last FIN"
    );
    expect_state(
        &mut model,
        &conn.c(ACK),
        2 * S + 2,
        CtState::Established,
        "the real last ACK",
    );
    assert_eq!(tcp_state(&model, &key_frame), TcpState::TimeWait);
}

#[test]
fn tcp_rst_answering_a_syn_let_through_on_an_established_session_closes_it() {
    let mut model = permissive();
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    // The client reconnects from the same port; the server has no such connection any more.
    let new_isn = 600_000_000u32;
    let syn = tcp_frame(
        client(),
        server(),
        seg(conn.cport, conn.sport, SYN, new_isn, 0),
    );
    expect_state(
        &mut model,
        &syn,
        S,
        CtState::Established,
        "SYN in ESTABLISHED (ignored)",
    );
    let rst = tcp_frame(
        server(),
        client(),
        seg(conn.sport, conn.cport, RST | ACK, 0, new_isn + 1).window(0),
    );
    expect_state(
        &mut model,
        &rst,
        S + 1,
        CtState::Established,
        "RST answering that SYN",
    );
    assert_eq!(tcp_state(&model, &syn), TcpState::Close);
}

#[test]
fn tcp_rst_in_a_closing_state_closes_without_sequence_checks() {
    let mut model = permissive();
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    expect_state(
        &mut model,
        &conn.c(FIN | ACK),
        S,
        CtState::Established,
        "client FIN",
    );
    let key_frame = conn.c(ACK);
    assert_eq!(tcp_state(&model, &key_frame), TcpState::FinWait);
    // The tuple was re-used behind a NAT: the RST carries a sequence we never saw.
    let rst = tcp_frame(
        server(),
        client(),
        seg(
            conn.sport,
            conn.cport,
            RST,
            conn.sseq.wrapping_sub(200_000),
            0,
        ),
    );
    expect_state(
        &mut model,
        &rst,
        2 * S,
        CtState::Established,
        "RST with a stale sequence in FIN_WAIT",
    );
    assert_eq!(tcp_state(&model, &key_frame), TcpState::Close);
}

#[test]
fn tcp_rst_as_the_first_reply_kills_the_session() {
    let mut model = restrictive();
    let mut conn = Conn::new();
    let syn = conn.c(SYN);
    expect_verdict(
        &mut model,
        &syn,
        Hook::Ingress,
        0,
        CtState::New,
        Action::Accept,
        "SYN",
    );
    conn.cseq += 1;
    let rst = tcp_frame(
        server(),
        client(),
        seg(conn.sport, conn.cport, RST | ACK, 0, conn.cseq).window(0),
    );
    expect_verdict(
        &mut model,
        &rst,
        Hook::Egress,
        S / 1000,
        CtState::Established,
        Action::Accept,
        "RST,ACK answering the SYN",
    );
    assert!(
        session_of(&model, &syn).is_none(),
        "the session is gone at once"
    );
    assert!(model.sessions.map.is_empty());
    // The client's retransmitted SYN starts over.
    expect_verdict(
        &mut model,
        &syn,
        Hook::Ingress,
        S,
        CtState::New,
        Action::Accept,
        "SYN again",
    );
    assert_eq!(tcp_state(&model, &syn), TcpState::SynSent);
}

#[test]
fn tcp_simultaneous_open_goes_through_syn_sent2() {
    let mut model = permissive();
    let a = client();
    let b = server();
    let (pa, pb) = (5000u16, 6000u16);
    let (mut sa, mut sb) = (100u32, 900_000u32);
    let syn_a = tcp_frame(a, b, seg(pa, pb, SYN, sa, 0));
    expect_state(&mut model, &syn_a, 0, CtState::New, "A's SYN");
    assert_eq!(tcp_state(&model, &syn_a), TcpState::SynSent);
    let syn_b = tcp_frame(b, a, seg(pb, pa, SYN, sb, 0));
    expect_state(
        &mut model,
        &syn_b,
        1,
        CtState::Established,
        "B's crossing SYN",
    );
    assert_eq!(tcp_state(&model, &syn_a), TcpState::SynSent2);
    sa += 1;
    sb += 1;
    expect_state(
        &mut model,
        &tcp_frame(a, b, seg(pa, pb, SYN | ACK, sa - 1, sb)),
        2,
        CtState::Established,
        "A's SYN-ACK",
    );
    assert_eq!(tcp_state(&model, &syn_a), TcpState::SynRecv);
    expect_state(
        &mut model,
        &tcp_frame(b, a, seg(pb, pa, SYN | ACK, sb - 1, sa)),
        3,
        CtState::Established,
        "B's SYN-ACK",
    );
    assert_eq!(tcp_state(&model, &syn_a), TcpState::SynRecv);
    expect_state(
        &mut model,
        &tcp_frame(b, a, seg(pb, pa, ACK, sb, sa)),
        4,
        CtState::Established,
        "B's ACK",
    );
    assert_eq!(
        tcp_state(&model, &syn_a),
        TcpState::Established,
        "simultaneous open: reply ACK in SYN_RECV establishes"
    );
    expect_state(
        &mut model,
        &tcp_frame(a, b, seg(pa, pb, ACK, sa, sb)),
        5,
        CtState::Established,
        "A's ACK",
    );
    assert_eq!(tcp_state(&model, &syn_a), TcpState::Established);
    assert!(assured(&session_of(&model, &syn_a).expect("session")));
}

#[test]
fn tcp_half_close_lets_the_other_side_keep_sending() {
    let mut model = restrictive();
    let mut conn = Conn::new();
    conn.handshake_accepted(&mut model);
    let key_frame = conn.c(ACK);
    // The client is done sending.
    expect_verdict(
        &mut model,
        &conn.c(FIN | ACK),
        Hook::Ingress,
        S,
        CtState::Established,
        Action::Accept,
        "client FIN",
    );
    conn.cseq += 1;
    expect_verdict(
        &mut model,
        &conn.s(ACK),
        Hook::Egress,
        S,
        CtState::Established,
        Action::Accept,
        "server ACK",
    );
    assert_eq!(tcp_state(&model, &key_frame), TcpState::CloseWait);
    // The server goes on sending for a while; the client acknowledges.
    for i in 0..5u64 {
        expect_verdict(
            &mut model,
            &conn.s_data(1000),
            Hook::Egress,
            2 * S + i,
            CtState::Established,
            Action::Accept,
            "server data after half-close",
        );
        conn.sseq += 1000;
        expect_verdict(
            &mut model,
            &conn.c(ACK),
            Hook::Ingress,
            2 * S + i,
            CtState::Established,
            Action::Accept,
            "client ACK after half-close",
        );
        assert_eq!(tcp_state(&model, &key_frame), TcpState::CloseWait);
    }
    expect_verdict(
        &mut model,
        &conn.s(FIN | ACK),
        Hook::Egress,
        3 * S,
        CtState::Established,
        Action::Accept,
        "server FIN",
    );
    conn.sseq += 1;
    assert_eq!(tcp_state(&model, &key_frame), TcpState::LastAck);
    expect_verdict(
        &mut model,
        &conn.c(ACK),
        Hook::Ingress,
        3 * S,
        CtState::Established,
        Action::Accept,
        "client last ACK",
    );
    assert_eq!(tcp_state(&model, &key_frame), TcpState::TimeWait);
}

#[test]
fn tcp_stray_ack_without_a_session_is_invalid_when_tcp_loose_is_off() {
    let mut model = restrictive();
    let conn = Conn::new();
    let ack = conn.c(ACK);
    expect_verdict(
        &mut model,
        &ack,
        Hook::Ingress,
        0,
        CtState::Invalid,
        Action::Drop,
        "stray ACK",
    );
    assert!(model.sessions.map.is_empty());
    assert_eq!(counter(&model, Counter::InvalidTcpState), 1);
    for (flags, what) in [
        (FIN | ACK, "stray FIN"),
        (RST, "stray RST"),
        (SYN | ACK, "stray SYN-ACK"),
        (ACK | PSH, "stray data"),
    ] {
        let mut permissive = permissive();
        expect_state(&mut permissive, &conn.c(flags), 0, CtState::Invalid, what);
        assert!(
            permissive.sessions.map.is_empty(),
            "{what} must not create a session"
        );
    }
}

#[test]
fn tcp_loose_picks_up_a_connection_from_a_mid_stream_ack() {
    let mut model = permissive_with("[tracking]\ntcp_loose = true\n");
    let conn = Conn::new();
    let ack = conn.c_data(100);
    expect_state(
        &mut model,
        &ack,
        0,
        CtState::New,
        "mid-stream data, picked up",
    );
    let session = session_of(&model, &ack).expect("session picked up");
    assert_eq!(TcpState::from_u8(session.state), TcpState::Established);
    assert_ne!(session.flags & session_flags::PICKED_UP, 0);
    assert_eq!(
        session.expires_ns,
        300 * S,
        "picked up without reply: unacknowledged timeout, not 5 days"
    );
    expect_state(
        &mut model,
        &conn.s(ACK),
        S,
        CtState::Established,
        "the peer answers",
    );
    // nf_conntrack sets SEEN_REPLY only after the handler ran, so the first answer still
    // counts as "no reply yet": no ASSURED, timeout still capped.
    let session = session_of(&model, &ack).expect("session");
    assert!(!assured(&session), "not assured by the first answer");
    assert_eq!(session.expires_ns, S + 300 * S);
    expect_state(
        &mut model,
        &conn.c(ACK),
        2 * S,
        CtState::Established,
        "the originator goes on",
    );
    let session = session_of(&model, &ack).expect("session");
    assert!(assured(&session), "assured once both directions were seen");
    assert_eq!(session.expires_ns, 2 * S + 432_000 * S);
    // A lone FIN or RST still cannot be picked up.
    let other = Conn {
        cport: 40001,
        ..Conn::new()
    };
    expect_state(
        &mut model,
        &other.c(FIN | ACK),
        0,
        CtState::Invalid,
        "FIN without session",
    );
    expect_state(
        &mut model,
        &other.c(RST),
        0,
        CtState::Invalid,
        "RST without session",
    );
}

#[test]
fn tcp_out_of_window_data_is_invalid_with_window_checking() {
    let mut model = restrictive();
    let mut conn = Conn::new();
    conn.handshake_accepted(&mut model);
    let far = tcp_frame(
        client(),
        server(),
        seg(
            conn.cport,
            conn.sport,
            ACK | PSH,
            conn.cseq.wrapping_add(50_000_000),
            conn.sseq,
        )
        .payload(100),
    );
    expect_verdict(
        &mut model,
        &far,
        Hook::Ingress,
        S,
        CtState::Invalid,
        Action::Drop,
        "data 50 MB ahead of the window",
    );
    let bad_ack = tcp_frame(
        client(),
        server(),
        seg(
            conn.cport,
            conn.sport,
            ACK,
            conn.cseq,
            conn.sseq.wrapping_add(10_000_000),
        ),
    );
    expect_verdict(
        &mut model,
        &bad_ack,
        Hook::Ingress,
        S,
        CtState::Invalid,
        Action::Drop,
        "ACK of data never sent",
    );
    assert_eq!(counter(&model, Counter::InvalidTcpWindow), 2);
    assert_eq!(
        tcp_state(&model, &far),
        TcpState::Established,
        "invalid segments do not change the session"
    );
    // In-window data still passes.
    expect_verdict(
        &mut model,
        &conn.c_data(100),
        Hook::Ingress,
        2 * S,
        CtState::Established,
        Action::Accept,
        "in-window data",
    );
}

#[test]
fn tcp_delayed_segment_already_acknowledged_is_ignored_not_invalid() {
    let mut model = restrictive();
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    let first = conn.c_data(1460);
    let first_ack = conn.s(ACK);
    let mut now = S;
    for _ in 0..60 {
        expect_verdict(
            &mut model,
            &conn.c_data(1460),
            Hook::Ingress,
            now,
            CtState::Established,
            Action::Accept,
            "client data",
        );
        conn.cseq += 1460;
        expect_verdict(
            &mut model,
            &conn.s(ACK),
            Hook::Egress,
            now,
            CtState::Established,
            Action::Accept,
            "server ACK",
        );
        now += S / 100;
    }
    // 87 600 bytes later the very first segment shows up again, long after it was acknowledged.
    expect_verdict(
        &mut model,
        &first,
        Hook::Ingress,
        now,
        CtState::Established,
        Action::Accept,
        "delayed duplicate of the first segment",
    );
    // And an ACK delayed just as long.
    expect_verdict(
        &mut model,
        &first_ack,
        Hook::Egress,
        now,
        CtState::Established,
        Action::Accept,
        "overly delayed ACK",
    );
    assert_eq!(tcp_state(&model, &first), TcpState::Established);
}

#[test]
fn tcp_out_of_window_data_is_accepted_with_tcp_liberal() {
    let mut model = model_from(&format!("[tracking]\ntcp_liberal = true\n{RESTRICTIVE}"));
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    let far = tcp_frame(
        client(),
        server(),
        seg(
            conn.cport,
            conn.sport,
            ACK | PSH,
            conn.cseq.wrapping_add(50_000_000),
            conn.sseq,
        )
        .payload(100),
    );
    expect_verdict(
        &mut model,
        &far,
        Hook::Ingress,
        S,
        CtState::Established,
        Action::Accept,
        "far data, liberal",
    );
    assert_eq!(counter(&model, Counter::InvalidTcpWindow), 0);
}

#[test]
fn tcp_out_of_window_data_is_accepted_with_window_checking_off() {
    let mut model = model_from(&format!(
        "[tracking]\ntcp_window_check = false\n{RESTRICTIVE}"
    ));
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    let far = tcp_frame(
        client(),
        server(),
        seg(
            conn.cport,
            conn.sport,
            ACK | PSH,
            conn.cseq.wrapping_add(50_000_000),
            conn.sseq,
        )
        .payload(100),
    );
    expect_verdict(
        &mut model,
        &far,
        Hook::Ingress,
        S,
        CtState::Established,
        Action::Accept,
        "far data, no window check",
    );
}

#[test]
fn tcp_syn_to_an_established_session_is_ignored_not_invalid() {
    let mut model = restrictive();
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    let new_isn = tcp_frame(
        client(),
        server(),
        seg(conn.cport, conn.sport, SYN, 123_456_789, 0),
    );
    expect_verdict(
        &mut model,
        &new_isn,
        Hook::Ingress,
        S,
        CtState::Established,
        Action::Accept,
        "SYN in ESTABLISHED",
    );
    assert_eq!(counter(&model, Counter::TcpIgnored), 1);
    assert_eq!(counter(&model, Counter::StateInvalid), 0);
    assert_eq!(tcp_state(&model, &new_isn), TcpState::Established);
    // The old connection goes on undisturbed.
    expect_verdict(
        &mut model,
        &conn.c_data(10),
        Hook::Ingress,
        2 * S,
        CtState::Established,
        Action::Accept,
        "data",
    );
}

#[test]
fn tcp_synack_answering_an_ignored_syn_resynchronises_the_session() {
    let mut model = permissive();
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    // The client lost its state and reconnects with the same ports; the server, which
    // had lost its state too, answers: firewall is the only one out of sync.
    let new_isn = 123_456_789u32;
    let syn = tcp_frame(
        client(),
        server(),
        seg(conn.cport, conn.sport, SYN, new_isn, 0),
    );
    expect_state(
        &mut model,
        &syn,
        S,
        CtState::Established,
        "SYN in ESTABLISHED (ignored)",
    );
    let synack = tcp_frame(
        server(),
        client(),
        seg(conn.sport, conn.cport, SYN | ACK, 42, new_isn + 1),
    );
    expect_state(
        &mut model,
        &synack,
        S + 1,
        CtState::Established,
        "SYN-ACK answering it",
    );
    assert_eq!(tcp_state(&model, &syn), TcpState::SynRecv);
    let ack = tcp_frame(
        client(),
        server(),
        seg(conn.cport, conn.sport, ACK, new_isn + 1, 43),
    );
    expect_state(&mut model, &ack, S + 2, CtState::Established, "ACK");
    assert_eq!(tcp_state(&model, &syn), TcpState::Established);
}

#[test]
fn tcp_invalid_flag_combinations_are_invalid_with_or_without_a_session() {
    let mut model = permissive();
    let mut conn = Conn::new();
    for (flags, what) in [
        (SYN | FIN, "SYN+FIN"),
        (0, "null"),
        (FIN | PSH | tcp_flags::URG, "xmas"),
        (SYN | RST, "SYN+RST"),
    ] {
        expect_state(
            &mut model,
            &conn.c(flags),
            0,
            CtState::Invalid,
            &format!("{what} without session"),
        );
    }
    conn.handshake(&mut model);
    for (flags, what) in [
        (SYN | FIN, "SYN+FIN"),
        (0, "null"),
        (FIN, "FIN without ACK"),
    ] {
        expect_state(
            &mut model,
            &conn.c(flags),
            S,
            CtState::Invalid,
            &format!("{what} in a session"),
        );
    }
    assert_eq!(tcp_state(&model, &conn.c(ACK)), TcpState::Established);
    assert!(counter(&model, Counter::InvalidTcpFlags) >= 7);
}

#[test]
fn tcp_unacknowledged_data_and_retransmissions_shorten_the_timeout() {
    let mut model = permissive_with("[timeouts]\ntcp_retrans = 50\ntcp_unacknowledged = 200\n");
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    let data = conn.c_data(500);
    expect_state(&mut model, &data, S, CtState::Established, "data");
    assert_eq!(
        session_of(&model, &data).expect("session").expires_ns,
        S + 200 * S,
        "unacknowledged data"
    );
    for i in 1..=3u64 {
        expect_state(
            &mut model,
            &data,
            S + i * S,
            CtState::Established,
            "retransmission",
        );
    }
    assert_eq!(
        session_of(&model, &data).expect("session").expires_ns,
        4 * S + 50 * S,
        "after max_retrans retransmissions"
    );
    conn.cseq += 500;
    expect_state(
        &mut model,
        &conn.s(ACK),
        5 * S,
        CtState::Established,
        "the server acknowledges",
    );
    assert_eq!(
        session_of(&model, &data).expect("session").expires_ns,
        5 * S + 432_000 * S,
        "back to the ESTABLISHED timeout"
    );
}

#[test]
fn tcp_session_expires_and_the_next_syn_is_new() {
    let mut model = permissive();
    let conn = Conn::new();
    let syn = conn.c(SYN);
    expect_state(&mut model, &syn, 0, CtState::New, "SYN");
    expect_state(
        &mut model,
        &syn,
        121 * S,
        CtState::New,
        "SYN after SYN_SENT expired",
    );
    assert_eq!(counter(&model, Counter::SessionsExpiredInline), 1);
    assert_eq!(
        session_of(&model, &syn).expect("session").created_ns,
        121 * S
    );
}

#[test]
fn tcp_ack_after_the_established_timeout_is_invalid() {
    let mut model = permissive_with("[timeouts]\ntcp_established = 5\n");
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    expect_state(
        &mut model,
        &conn.c(ACK),
        4 * S,
        CtState::Established,
        "ACK within 5 s",
    );
    expect_state(
        &mut model,
        &conn.c(ACK),
        10 * S,
        CtState::Invalid,
        "ACK after the session expired",
    );
}

#[test]
fn session_is_expired_exactly_at_its_expiry_time() {
    let mut model = permissive();
    let out = udp_frame(client(), server(), 40000, 53, 0);
    let back = udp_frame(server(), client(), 53, 40000, 0);
    expect_state(&mut model, &out, 0, CtState::New, "query");
    expect_state(
        &mut model,
        &back,
        30 * S - 1,
        CtState::Established,
        "1 ns before expiry",
    );
    // Refreshed to 30 s - 1 ns + 30 s by the answer.
    expect_state(
        &mut model,
        &back,
        60 * S - 1,
        CtState::New,
        "at expiry (nf_ct_is_expired: timeout <= now)",
    );
}

#[test]
fn tcp_rst_from_the_originator_in_syn_sent_kills_the_session() {
    let mut model = permissive();
    let conn = Conn::new();
    let syn = conn.c(SYN);
    expect_state(&mut model, &syn, 0, CtState::New, "SYN");
    let abort = tcp_frame(
        client(),
        server(),
        seg(conn.cport, conn.sport, RST, conn.cseq + 1, 0),
    );
    expect_state(
        &mut model,
        &abort,
        1,
        CtState::New,
        "client aborts before any reply",
    );
    assert!(
        session_of(&model, &syn).is_none(),
        "no reply yet: an RST deletes the session"
    );
}

#[test]
fn tcp_rst_inside_the_window_but_not_exact_keeps_established_with_the_close_timeout() {
    let mut model = permissive();
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    let rst = tcp_frame(
        client(),
        server(),
        seg(conn.cport, conn.sport, RST, conn.cseq + 1000, 0),
    );
    expect_state(
        &mut model,
        &rst,
        5 * S,
        CtState::Established,
        "in-window RST with a sequence not exactly expected",
    );
    let session = session_of(&model, &rst).expect("session");
    assert_eq!(
        TcpState::from_u8(session.state),
        TcpState::Established,
        "kept for a challenge ACK"
    );
    assert_eq!(
        session.expires_ns,
        5 * S + 10 * S,
        "but on the CLOSE timeout"
    );
}

#[test]
fn tcp_server_reopening_a_time_wait_tuple_is_new_with_the_server_as_originator() {
    let mut model = permissive();
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    expect_state(
        &mut model,
        &conn.c(FIN | ACK),
        S,
        CtState::Established,
        "client FIN",
    );
    conn.cseq += 1;
    expect_state(
        &mut model,
        &conn.s(FIN | ACK),
        S,
        CtState::Established,
        "server FIN",
    );
    conn.sseq += 1;
    expect_state(
        &mut model,
        &conn.c(ACK),
        S,
        CtState::Established,
        "client ACK",
    );
    expect_state(
        &mut model,
        &conn.s(ACK),
        S,
        CtState::Established,
        "server ACK",
    );
    assert_eq!(tcp_state(&model, &conn.c(ACK)), TcpState::TimeWait);
    let server_syn = tcp_frame(
        server(),
        client(),
        seg(conn.sport, conn.cport, SYN, 31_337, 0),
    );
    expect_state(
        &mut model,
        &server_syn,
        2 * S,
        CtState::New,
        "server SYN on the TIME_WAIT tuple",
    );
    assert_eq!(tcp_state(&model, &server_syn), TcpState::SynSent);
    let client_synack = tcp_frame(
        client(),
        server(),
        seg(conn.cport, conn.sport, SYN | ACK, 99, 31_338),
    );
    expect_state(
        &mut model,
        &client_synack,
        2 * S + 1,
        CtState::Established,
        "client SYN-ACK is the reply now",
    );
    assert_eq!(tcp_state(&model, &server_syn), TcpState::SynRecv);
}

// ---------------------------------------------------------------- UDP

#[test]
fn udp_unreplied_then_replied_with_kernel_timeouts() {
    let mut model = permissive();
    let out = udp_frame(client(), server(), 40000, 53, 30);
    let back = udp_frame(server(), client(), 53, 40000, 60);
    expect_state(&mut model, &out, 0, CtState::New, "query");
    let session = session_of(&model, &out).expect("session");
    assert_eq!(FlowState::from_u8(session.state), FlowState::Unreplied);
    assert_eq!(session.expires_ns, 30 * S);
    expect_state(
        &mut model,
        &out,
        S / 2,
        CtState::New,
        "second query before any answer",
    );
    expect_state(&mut model, &back, S, CtState::Established, "answer");
    let session = session_of(&model, &out).expect("session");
    assert_eq!(FlowState::from_u8(session.state), FlowState::Replied);
    assert_eq!(
        session.expires_ns,
        S + 30 * S,
        "first answer within 2 s: still the unreplied timeout"
    );
    assert!(!assured(&session));
    expect_state(
        &mut model,
        &out,
        3 * S,
        CtState::Established,
        "query after 2 s",
    );
    let session = session_of(&model, &out).expect("session");
    assert_eq!(
        session.expires_ns,
        3 * S + 120 * S,
        "a stream after 2 s: the replied timeout"
    );
    assert!(assured(&session));
    assert_eq!(session.packets, [3, 1]);
    assert_eq!(session.bytes, [2 * (20 + 38) + (20 + 38), 20 + 68]);
}

#[test]
fn udp_session_expires_after_30_s_unreplied() {
    let mut model = permissive();
    let out = udp_frame(client(), server(), 40000, 53, 30);
    expect_state(&mut model, &out, 0, CtState::New, "query");
    expect_state(&mut model, &out, 29 * S, CtState::New, "query within 30 s");
    let back = udp_frame(server(), client(), 53, 40000, 60);
    // 29 s + 30 s later: the session has expired; the "answer" starts its own flow.
    expect_state(
        &mut model,
        &back,
        60 * S,
        CtState::New,
        "late answer after expiry",
    );
    assert_eq!(counter(&model, Counter::SessionsExpiredInline), 1);
    let mut model = restrictive();
    expect_verdict(
        &mut model,
        &out,
        Hook::Egress,
        0,
        CtState::New,
        Action::Accept,
        "query out",
    );
    expect_verdict(
        &mut model,
        &back,
        Hook::Ingress,
        10 * S,
        CtState::Established,
        Action::Accept,
        "answer in time",
    );
    expect_verdict(
        &mut model,
        &back,
        Hook::Ingress,
        10 * S + 31 * S,
        CtState::New,
        Action::Drop,
        "answer after expiry is a new inbound flow",
    );
}

#[test]
fn udp_replied_stream_lives_120_s() {
    let mut model = permissive();
    let out = udp_frame(client(), server(), 5000, 5001, 10);
    let back = udp_frame(server(), client(), 5001, 5000, 10);
    expect_state(&mut model, &out, 0, CtState::New, "first");
    expect_state(&mut model, &back, S, CtState::Established, "answer");
    expect_state(&mut model, &out, 3 * S, CtState::Established, "stream");
    expect_state(
        &mut model,
        &back,
        3 * S + 119 * S,
        CtState::Established,
        "within 120 s",
    );
    expect_state(
        &mut model,
        &back,
        3 * S + 119 * S + 121 * S,
        CtState::New,
        "after 120 s of silence",
    );
}

// ---------------------------------------------------------------- ICMP

#[test]
fn icmp_echo_request_and_reply_v4() {
    let mut model = restrictive();
    let request = frames::frame(client(), server(), frames::echo(false, false, 0x4242, 1));
    let reply = frames::frame(server(), client(), frames::echo(false, true, 0x4242, 1));
    expect_verdict(
        &mut model,
        &request,
        Hook::Egress,
        0,
        CtState::New,
        Action::Accept,
        "echo request out",
    );
    let session = session_of(&model, &request).expect("session");
    assert_eq!(session.expires_ns, 30 * S);
    expect_verdict(
        &mut model,
        &reply,
        Hook::Ingress,
        S,
        CtState::Established,
        Action::Accept,
        "echo reply in",
    );
    let session = session_of(&model, &request).expect("session");
    assert_eq!(FlowState::from_u8(session.state), FlowState::Replied);
    assert_eq!(session.expires_ns, S + 30 * S);
    let request2 = frames::frame(client(), server(), frames::echo(false, false, 0x4242, 2));
    expect_verdict(
        &mut model,
        &request2,
        Hook::Egress,
        2 * S,
        CtState::Established,
        Action::Accept,
        "second ping, same id",
    );
    assert_eq!(model.sessions.map.len(), 1);
    // An unsolicited reply (other id) is invalid and dropped.
    let stray = frames::frame(server(), client(), frames::echo(false, true, 0x4243, 1));
    expect_verdict(
        &mut model,
        &stray,
        Hook::Ingress,
        3 * S,
        CtState::Invalid,
        Action::Drop,
        "unsolicited echo reply",
    );
}

#[test]
fn icmp_echo_request_and_reply_v6() {
    let mut model = permissive();
    let request = frames::frame(client6(), server6(), frames::echo(true, false, 7, 1));
    let reply = frames::frame(server6(), client6(), frames::echo(true, true, 7, 1));
    expect_state(&mut model, &request, 0, CtState::New, "echo request");
    expect_state(&mut model, &reply, S, CtState::Established, "echo reply");
    let session = session_of(&model, &request).expect("session");
    assert_eq!(FlowState::from_u8(session.state), FlowState::Replied);
    assert_eq!(session.packets, [1, 1]);
    expect_state(
        &mut model,
        &request,
        32 * S,
        CtState::New,
        "after the 30 s ICMP timeout",
    );
}

#[test]
fn icmp_echo_reply_without_request_is_invalid() {
    let mut model = permissive();
    let reply = frames::frame(server(), client(), frames::echo(false, true, 1, 1));
    expect_state(
        &mut model,
        &reply,
        0,
        CtState::Invalid,
        "echo reply out of nowhere",
    );
    let reply6 = frames::frame(server6(), client6(), frames::echo(true, true, 1, 1));
    expect_state(
        &mut model,
        &reply6,
        0,
        CtState::Invalid,
        "ICMPv6 echo reply out of nowhere",
    );
    assert!(model.sessions.map.is_empty());
}

#[test]
/// A deliberate difference (docs/ARCHITECTURE.md): nf_conntrack keys ICMP on the type too
/// and would make B's request a NEW conntrack; our key is the id alone, so it lands on A's
/// session in the reply direction, where only replies are valid.
fn icmp_echo_request_from_the_other_side_with_the_same_id_is_invalid() {
    let mut model = permissive();
    let a_request = frames::frame(client(), server(), frames::echo(false, false, 9, 1));
    let b_reply = frames::frame(server(), client(), frames::echo(false, true, 9, 1));
    expect_state(&mut model, &a_request, 0, CtState::New, "A pings B");
    expect_state(&mut model, &b_reply, 1, CtState::Established, "B answers");
    let b_request = frames::frame(server(), client(), frames::echo(false, false, 9, 1));
    expect_state(
        &mut model,
        &b_request,
        2,
        CtState::Invalid,
        "B pings A with the same id",
    );
}

fn ip_packet_of(frame: &[u8]) -> &[u8] {
    &frame[14..]
}

#[test]
fn icmp_port_unreachable_about_a_tracked_udp_flow_is_related() {
    let mut model = restrictive();
    let out = udp_frame(client(), server(), 40000, 53, 30);
    expect_verdict(
        &mut model,
        &out,
        Hook::Egress,
        0,
        CtState::New,
        Action::Accept,
        "query out",
    );
    let unreachable = frames::icmp_error(server(), client(), 3, 3, ip_packet_of(&out));
    expect_verdict(
        &mut model,
        &unreachable,
        Hook::Ingress,
        S,
        CtState::Related,
        Action::Accept,
        "port unreachable",
    );
    // From a router on the path, too.
    let from_router = frames::icmp_error(router(), client(), 11, 0, ip_packet_of(&out));
    expect_verdict(
        &mut model,
        &from_router,
        Hook::Ingress,
        S,
        CtState::Related,
        Action::Accept,
        "time exceeded from a router",
    );
    assert_eq!(counter(&model, Counter::StateRelated), 2);
    // An error does not refresh or create sessions.
    assert_eq!(model.sessions.map.len(), 1);
    assert_eq!(
        session_of(&model, &out).expect("session").expires_ns,
        30 * S
    );
}

#[test]
fn icmp_fragmentation_needed_about_a_tracked_tcp_flow_is_related() {
    let mut model = restrictive();
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    let data = conn.s_data(1400);
    let too_big = frames::icmp_error(router(), server(), 3, 4, ip_packet_of(&data));
    expect_verdict(
        &mut model,
        &too_big,
        Hook::Ingress,
        S,
        CtState::Related,
        Action::Accept,
        "frag needed about server data",
    );
}

#[test]
fn icmpv6_packet_too_big_about_a_tracked_tcp_flow_is_related() {
    let mut model = permissive();
    let syn = tcp_frame(client6(), server6(), seg(40000, 443, SYN, 10, 0));
    expect_state(&mut model, &syn, 0, CtState::New, "SYN");
    let synack = tcp_frame(server6(), client6(), seg(443, 40000, SYN | ACK, 500, 11));
    expect_state(&mut model, &synack, 1, CtState::Established, "SYN-ACK");
    let data = tcp_frame(
        client6(),
        server6(),
        seg(40000, 443, ACK | PSH, 11, 501).payload(1400),
    );
    expect_state(&mut model, &data, 2, CtState::Established, "data");
    let too_big = frames::frame(
        router6(),
        client6(),
        frames::icmp(true, 2, 0, [0, 0, 5, 0], &ip_packet_of(&data)[..1232]),
    );
    expect_state(&mut model, &too_big, 3, CtState::Related, "packet too big");
    let unreachable = frames::icmp_error(server6(), client6(), 1, 4, ip_packet_of(&data));
    expect_state(
        &mut model,
        &unreachable,
        4,
        CtState::Related,
        "ICMPv6 port unreachable",
    );
}

#[test]
fn icmp_error_sent_to_a_host_other_than_the_quoted_sender_is_invalid() {
    let mut model = restrictive();
    let out = udp_frame(client(), server(), 40000, 53, 30);
    expect_verdict(
        &mut model,
        &out,
        Hook::Egress,
        0,
        CtState::New,
        Action::Accept,
        "query out",
    );
    let bystander = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 99));
    let bogus = frames::icmp_error(server(), bystander, 3, 3, ip_packet_of(&out));
    expect_verdict(
        &mut model,
        &bogus,
        Hook::Ingress,
        S,
        CtState::Invalid,
        Action::Drop,
        "error about client's flow sent to a bystander",
    );
    let bystander6 = IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x99));
    let out6 = udp_frame(client6(), server6(), 1000, 53, 0);
    expect_verdict(
        &mut model,
        &out6,
        Hook::Egress,
        0,
        CtState::New,
        Action::Accept,
        "IPv6 query out",
    );
    let bogus6 = frames::icmp_error(server6(), bystander6, 1, 4, ip_packet_of(&out6));
    expect_verdict(
        &mut model,
        &bogus6,
        Hook::Ingress,
        S,
        CtState::Invalid,
        Action::Drop,
        "ICMPv6 error to a bystander",
    );
}

#[test]
fn icmp_error_about_an_unknown_flow_is_invalid() {
    let mut model = restrictive();
    let never_sent = udp_frame(client(), server(), 40000, 53, 30);
    let unreachable = frames::icmp_error(server(), client(), 3, 3, ip_packet_of(&never_sent));
    expect_verdict(
        &mut model,
        &unreachable,
        Hook::Ingress,
        0,
        CtState::Invalid,
        Action::Drop,
        "unreachable about nothing",
    );
    let never_sent6 = udp_frame(client6(), server6(), 1, 2, 0);
    let unreachable6 = frames::icmp_error(server6(), client6(), 1, 4, ip_packet_of(&never_sent6));
    expect_verdict(
        &mut model,
        &unreachable6,
        Hook::Ingress,
        0,
        CtState::Invalid,
        Action::Drop,
        "ICMPv6 unreachable about nothing",
    );
    assert_eq!(counter(&model, Counter::InvalidIcmp), 2);
    assert!(model.sessions.map.is_empty());
}

#[test]
fn icmp_error_about_an_expired_flow_is_invalid() {
    let mut model = permissive();
    let out = udp_frame(client(), server(), 40000, 53, 30);
    expect_state(&mut model, &out, 0, CtState::New, "query");
    let unreachable = frames::icmp_error(server(), client(), 3, 3, ip_packet_of(&out));
    expect_state(
        &mut model,
        &unreachable,
        31 * S,
        CtState::Invalid,
        "unreachable after the flow expired",
    );
}

#[test]
fn icmp_error_about_a_tracked_echo_is_related() {
    let mut model = permissive();
    let request = frames::frame(client(), server(), frames::echo(false, false, 0x77, 1));
    expect_state(&mut model, &request, 0, CtState::New, "echo request");
    let unreachable = frames::icmp_error(router(), client(), 3, 1, ip_packet_of(&request));
    expect_state(
        &mut model,
        &unreachable,
        1,
        CtState::Related,
        "host unreachable about the ping",
    );
}

#[test]
fn icmpv6_neighbour_discovery_is_untracked() {
    let mut model = restrictive();
    let target = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    for (icmp_type, what) in [
        (135u8, "neighbour solicitation"),
        (136, "neighbour advertisement"),
        (133, "router solicitation"),
        (134, "router advertisement"),
        (143, "MLDv2 report"),
    ] {
        let frame = frames::frame(
            client6(),
            server6(),
            frames::icmp(true, icmp_type, 0, [0; 4], &target),
        );
        expect_verdict(
            &mut model,
            &frame,
            Hook::Ingress,
            0,
            CtState::Untracked,
            Action::Drop,
            what,
        );
    }
    assert!(model.sessions.map.is_empty());
    assert_eq!(counter(&model, Counter::StateUntracked), 5);
    // With a rule for untracked packets they pass.
    let mut model = model_from(
        "[policy]\ninbound = \"drop\"\n[[rule]]\nname = \"nd\"\nstate = [\"untracked\"]\naction = \"accept\"\n",
    );
    let ns = frames::frame(
        client6(),
        server6(),
        frames::icmp(true, 135, 0, [0; 4], &target),
    );
    expect_verdict(
        &mut model,
        &ns,
        Hook::Ingress,
        0,
        CtState::Untracked,
        Action::Accept,
        "NS with an untracked rule",
    );
}

// ---------------------------------------------------------------- other protocols

#[test]
fn other_protocols_are_tracked_generically_by_address_pair() {
    let mut model = permissive();
    let out = frames::frame(client(), server(), (253, vec![0u8; 40]));
    let back = frames::frame(server(), client(), (253, vec![0u8; 12]));
    expect_state(&mut model, &out, 0, CtState::New, "first packet");
    let session = session_of(&model, &out).expect("session");
    assert_eq!(session.expires_ns, 600 * S, "generic timeout");
    expect_state(&mut model, &back, S, CtState::Established, "answer");
    assert_eq!(
        FlowState::from_u8(session_of(&model, &out).expect("session").state),
        FlowState::Replied
    );
    expect_state(
        &mut model,
        &out,
        S + 601 * S,
        CtState::New,
        "after the generic timeout",
    );
}

// ---------------------------------------------------------------- fragments, malformed, non-IP

#[test]
fn a_later_fragment_without_its_first_passes_unjudged_and_inside_a_tcp_header_is_invalid() {
    let mut model = restrictive();
    let mut ip = frames::ip_packet(client(), server(), 17, &[0u8; 64]);
    ip[6] = 0x00;
    ip[7] = 185; // offset 1480 bytes
    let frame = frames::ethernet(&ip);
    // No first fragment seen: handed to the kernel, which cannot deliver it without one.
    expect_verdict(
        &mut model,
        &frame,
        Hook::Ingress,
        0,
        CtState::Untracked,
        Action::Accept,
        "later fragment of an unknown datagram",
    );
    assert_eq!(counter(&model, Counter::FragmentsUnknown), 1);
    assert_eq!(
        counter(&model, Counter::StateUntracked),
        0,
        "in no state counter"
    );
    assert!(model.sessions.map.is_empty());
    assert!(model.fragments.map.is_empty(), "it touches no table");
    // At offset 8 of a TCP datagram it could rewrite the flags (RFC 1858).
    let mut ip = frames::ip_packet(client(), server(), 6, &[0u8; 64]);
    ip[6] = 0x00;
    ip[7] = 1;
    let frame = frames::ethernet(&ip);
    expect_verdict(
        &mut model,
        &frame,
        Hook::Ingress,
        0,
        CtState::Invalid,
        Action::Drop,
        "fragment inside a TCP header",
    );
    assert_eq!(counter(&model, Counter::InvalidFragment), 1);
    let mut model = permissive();
    expect_state(
        &mut model,
        &frame,
        0,
        CtState::Invalid,
        "fragment inside a TCP header, permissive",
    );
    assert!(model.sessions.map.is_empty());
}

#[test]
fn truncated_packets_are_invalid() {
    let mut model = permissive();
    let syn = Conn::new().c(SYN);
    let cut = &syn[..14 + 20 + 10];
    expect_state(
        &mut model,
        cut,
        0,
        CtState::Invalid,
        "SYN cut inside its TCP header",
    );
    assert_eq!(counter(&model, Counter::InvalidMalformed), 1);
    assert!(model.sessions.map.is_empty());
}

#[test]
fn non_ip_frames_are_passed_and_counted_apart() {
    let mut model = restrictive();
    let mut arp = vec![0xff; 12];
    arp.extend_from_slice(&0x0806u16.to_be_bytes());
    arp.extend_from_slice(&[0u8; 28]);
    assert!(
        model.packet(&arp, Hook::Ingress, IF_OUTSIDE, 0).is_none(),
        "ARP is not judged"
    );
    assert_eq!(counter(&model, Counter::PacketsNonIp), 1);
    assert_eq!(counter(&model, Counter::PacketsSeen), 0);
}

// ---------------------------------------------------------------- policy verdicts and counters

#[test]
fn restrictive_policy_admits_only_new_connections_to_8080() {
    let mut model = restrictive();
    let ssh = tcp_frame(client(), server(), seg(40000, 22, SYN, 1, 0));
    expect_verdict(
        &mut model,
        &ssh,
        Hook::Ingress,
        0,
        CtState::New,
        Action::Drop,
        "SYN to 22",
    );
    assert!(
        session_of(&model, &ssh).is_none(),
        "a dropped packet creates no session"
    );
    // The server's answer for the dropped flow has nothing to be established against.
    let ssh_synack = tcp_frame(server(), client(), seg(22, 40000, SYN | ACK, 9, 2));
    expect_verdict(
        &mut model,
        &ssh_synack,
        Hook::Egress,
        1,
        CtState::Invalid,
        Action::Drop,
        "SYN-ACK of a dropped SYN",
    );
    let web = tcp_frame(client(), server(), seg(40000, 8080, SYN, 1, 0));
    expect_verdict(
        &mut model,
        &web,
        Hook::Ingress,
        2,
        CtState::New,
        Action::Accept,
        "SYN to 8080",
    );
    let session = session_of(&model, &web).expect("session");
    assert_eq!(session.rule_id, 1, "admitted by rule `web`");
    assert_eq!(session.verdict_generation, 1);
    let udp = udp_frame(client(), server(), 40000, 8080, 10);
    expect_verdict(
        &mut model,
        &udp,
        Hook::Ingress,
        3,
        CtState::New,
        Action::Drop,
        "UDP to 8080",
    );
}

#[test]
fn ipv4_rule_networks_do_not_match_ipv4_mapped_ipv6_packets() {
    let mut model = model_from(
        "[policy]\ninbound = \"drop\"\n[[rule]]\nname = \"lab\"\nsrc = [\"198.18.0.0/15\"]\naction = \"accept\"\n",
    );
    let v4 = udp_frame(client(), server(), 1, 2, 0);
    expect_verdict(
        &mut model,
        &v4,
        Hook::Ingress,
        0,
        CtState::New,
        Action::Accept,
        "IPv4 from the lab",
    );
    let mapped_src = IpAddr::V6("::ffff:198.18.0.1".parse().expect("address"));
    let v6 = udp_frame(mapped_src, server6(), 1, 2, 0);
    expect_verdict(
        &mut model,
        &v6,
        Hook::Ingress,
        0,
        CtState::New,
        Action::Drop,
        "IPv6 with an IPv4-mapped source",
    );
}

#[test]
fn counters_add_up_over_a_mixed_run() {
    let mut model = restrictive();
    let mut conn = Conn::new();
    let mut now = 0;
    let mut run_at = |model: &mut Model, frame: &[u8], hook: Hook| {
        now += S / 10;
        model.packet(frame, hook, IF_OUTSIDE, now);
    };
    run_at(&mut model, &conn.c(SYN), Hook::Ingress);
    conn.cseq += 1;
    run_at(&mut model, &conn.s(SYN | ACK), Hook::Egress);
    conn.sseq += 1;
    run_at(&mut model, &conn.c(ACK), Hook::Ingress);
    run_at(&mut model, &conn.c_data(100), Hook::Ingress);
    run_at(
        &mut model,
        &tcp_frame(client(), server(), seg(1, 22, SYN, 1, 0)),
        Hook::Ingress,
    );
    run_at(
        &mut model,
        &tcp_frame(client(), server(), seg(2, 22, ACK, 1, 1)),
        Hook::Ingress,
    );
    run_at(
        &mut model,
        &udp_frame(server(), client(), 53, 9999, 1),
        Hook::Egress,
    );
    run_at(
        &mut model,
        &udp_frame(client(), server(), 9999, 53, 1),
        Hook::Ingress,
    );
    run_at(
        &mut model,
        &frames::frame(client(), server(), frames::echo(false, false, 1, 1)),
        Hook::Ingress,
    );
    run_at(
        &mut model,
        &frames::frame(
            client6(),
            server6(),
            frames::icmp(true, 135, 0, [0; 4], &[0; 16]),
        ),
        Hook::Ingress,
    );
    let mut arp = vec![0xff; 12];
    arp.extend_from_slice(&0x0806u16.to_be_bytes());
    arp.extend_from_slice(&[0u8; 28]);
    run_at(&mut model, &arp, Hook::Ingress);

    let seen = counter(&model, Counter::PacketsSeen);
    assert_eq!(seen, 10);
    assert_eq!(counter(&model, Counter::PacketsNonIp), 1);
    assert_eq!(
        counter(&model, Counter::PacketsAccepted) + counter(&model, Counter::PacketsDropped),
        seen,
        "every IP packet is accepted or dropped"
    );
    let by_state = [
        Counter::StateNew,
        Counter::StateEstablished,
        Counter::StateRelated,
        Counter::StateInvalid,
        Counter::StateUntracked,
    ]
    .iter()
    .map(|c| counter(&model, *c))
    .sum::<u64>();
    assert_eq!(by_state, seen, "every IP packet gets exactly one state");
    assert_eq!(
        counter(&model, Counter::PacketsDropped),
        counter(&model, Counter::DropRule)
            + counter(&model, Counter::DropDefault)
            + counter(&model, Counter::DropTableFull)
    );
    // SYN to 8080 and the outbound UDP query created sessions; the SYN to 22 did not.
    assert_eq!(counter(&model, Counter::SessionsCreated), 2);
    assert_eq!(model.sessions.map.len(), 2);
    assert_eq!(counter(&model, Counter::StateNew), 4);
    assert_eq!(counter(&model, Counter::StateEstablished), 4);
    assert_eq!(counter(&model, Counter::StateInvalid), 1);
    assert_eq!(counter(&model, Counter::StateUntracked), 1);
    assert_eq!(counter(&model, Counter::PacketsAccepted), 6);
    let hits: u64 = model.counters.hits.iter().sum();
    assert_eq!(hits, seen, "each IP packet hits one rule or default slot");
}

#[test]
fn a_flood_of_new_flows_evicts_only_unassured_sessions() {
    let mut model = permissive();
    model.sessions.unassured_capacity = Some(2);
    let mut now = 0;
    // An assured UDP stream: replied, then used again after the 2 s stream threshold.
    expect_state(
        &mut model,
        &udp_frame(client(), server(), 1000, 53, 0),
        now,
        CtState::New,
        "stream query",
    );
    expect_state(
        &mut model,
        &udp_frame(server(), client(), 53, 1000, 0),
        now,
        CtState::Established,
        "stream answer",
    );
    now += 3_000_000_000;
    expect_state(
        &mut model,
        &udp_frame(client(), server(), 1000, 53, 0),
        now,
        CtState::Established,
        "stream again",
    );
    assert_eq!(
        counter(&model, Counter::SessionsProtected),
        1,
        "the stream is protected once assured"
    );
    // A flood of one-packet flows, far more than the unassured tier holds.
    for port in 2000..2050u16 {
        expect_state(
            &mut model,
            &udp_frame(client(), server(), port, 53, 0),
            now,
            CtState::New,
            "flood",
        );
    }
    assert_eq!(
        counter(&model, Counter::SessionsCreated),
        51,
        "every new flow was admitted"
    );
    assert_eq!(
        model.sessions.map.len(),
        3,
        "the protected stream plus a full unassured tier"
    );
    expect_state(
        &mut model,
        &udp_frame(server(), client(), 53, 1000, 0),
        now,
        CtState::Established,
        "the assured stream survived the flood",
    );
    assert_eq!(counter(&model, Counter::DropTableFull), 0);
}

#[test]
fn assured_session_stays_unprotected_when_the_protected_tier_is_full() {
    let mut model = permissive();
    model.sessions.protected_capacity = Some(0);
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    let session = session_of(&model, &conn.c(ACK)).expect("session");
    assert!(assured(&session));
    assert_eq!(session.flags & session_flags::PROTECTED, 0);
    assert_eq!(counter(&model, Counter::ProtectedTableFull), 1);
    expect_state(
        &mut model,
        &conn.c_data(10),
        S,
        CtState::Established,
        "still tracked",
    );
}

#[test]
fn tcp_handshake_moves_the_session_to_the_protected_tier() {
    let mut model = permissive();
    let mut conn = Conn::new();
    conn.handshake(&mut model);
    let session = session_of(&model, &conn.c(ACK)).expect("session");
    assert_ne!(session.flags & session_flags::PROTECTED, 0);
    assert_eq!(counter(&model, Counter::SessionsProtected), 1);
    expect_state(
        &mut model,
        &conn.c_data(10),
        S,
        CtState::Established,
        "data",
    );
    assert_eq!(
        counter(&model, Counter::SessionsProtected),
        1,
        "protected once only"
    );
}

#[test]
fn peer_syn_reopening_a_time_wait_tuple_kills_the_old_session_even_when_dropped() {
    // The host (198.18.0.2) connects out; the remote later reuses the tuple towards a port
    // the policy does not open. nf_conntrack kills the old entry before the new one is
    // dropped, so stragglers of the old connection are INVALID afterwards.
    let mut model = restrictive();
    let host = server();
    let remote = client();
    let (hp, rp) = (45_000u16, 443u16);
    let (mut hs, mut rs) = (10u32, 90_000u32);
    let h = |flags: u8, seq: u32, ack: u32| tcp_frame(host, remote, seg(hp, rp, flags, seq, ack));
    let r = |flags: u8, seq: u32, ack: u32| tcp_frame(remote, host, seg(rp, hp, flags, seq, ack));
    expect_verdict(
        &mut model,
        &h(SYN, hs, 0),
        Hook::Egress,
        0,
        CtState::New,
        Action::Accept,
        "host SYN",
    );
    hs += 1;
    expect_verdict(
        &mut model,
        &r(SYN | ACK, rs, hs),
        Hook::Ingress,
        1,
        CtState::Established,
        Action::Accept,
        "SYN-ACK",
    );
    rs += 1;
    expect_verdict(
        &mut model,
        &h(ACK, hs, rs),
        Hook::Egress,
        2,
        CtState::Established,
        Action::Accept,
        "ACK",
    );
    expect_verdict(
        &mut model,
        &h(FIN | ACK, hs, rs),
        Hook::Egress,
        3,
        CtState::Established,
        Action::Accept,
        "host FIN",
    );
    hs += 1;
    expect_verdict(
        &mut model,
        &r(FIN | ACK, rs, hs),
        Hook::Ingress,
        4,
        CtState::Established,
        Action::Accept,
        "remote FIN",
    );
    rs += 1;
    let last_ack = h(ACK, hs, rs);
    expect_verdict(
        &mut model,
        &last_ack,
        Hook::Egress,
        5,
        CtState::Established,
        Action::Accept,
        "host last ACK",
    );
    assert_eq!(tcp_state(&model, &last_ack), TcpState::TimeWait);
    let reuse = r(SYN, 5_000_000, 0);
    expect_verdict(
        &mut model,
        &reuse,
        Hook::Ingress,
        S,
        CtState::New,
        Action::Drop,
        "remote SYN on the TIME_WAIT tuple",
    );
    assert!(
        session_of(&model, &reuse).is_none(),
        "old session killed, new one not admitted"
    );
    expect_verdict(
        &mut model,
        &last_ack,
        Hook::Egress,
        S + 1,
        CtState::Invalid,
        Action::Drop,
        "retransmitted last ACK",
    );
}

/// Handshake with the given window-scale offers, then the client acknowledges with a raw
/// window of 1000; returns the state of a server segment 5000 bytes ahead.
fn server_data_beyond_raw_window(client_scale: Option<u8>, server_scale: Option<u8>) -> CtState {
    let mut model = permissive();
    let (cport, sport) = (40000u16, 8080u16);
    let (cseq, sseq) = (1_000u32, 5_000_000u32);
    let mut syn = seg(cport, sport, SYN, cseq, 0);
    if let Some(scale) = client_scale {
        syn = syn.wscale(scale);
    }
    expect_state(
        &mut model,
        &tcp_frame(client(), server(), syn),
        0,
        CtState::New,
        "SYN",
    );
    let mut synack = seg(sport, cport, SYN | ACK, sseq, cseq + 1);
    if let Some(scale) = server_scale {
        synack = synack.wscale(scale);
    }
    expect_state(
        &mut model,
        &tcp_frame(server(), client(), synack),
        1,
        CtState::Established,
        "SYN-ACK",
    );
    let ack = seg(cport, sport, ACK, cseq + 1, sseq + 1).window(1000);
    expect_state(
        &mut model,
        &tcp_frame(client(), server(), ack),
        2,
        CtState::Established,
        "ACK, window 1000",
    );
    // Beyond the unscaled window by more than the client's largest window (64240), so
    // the kernel's "a few bytes more than expected" tolerance cannot apply either.
    let ahead = seg(sport, cport, ACK | PSH, sseq + 1 + 70_000, cseq + 1).payload(100);
    run(
        &mut model,
        &tcp_frame(server(), client(), ahead),
        Hook::Ingress,
        3,
        "server data 70000 bytes ahead",
    )
    .state
}

#[test]
fn tcp_window_scaling_applies_only_when_both_sides_offer_it() {
    assert_eq!(
        server_data_beyond_raw_window(Some(7), Some(7)),
        CtState::Established,
        "both offered: the window is 1000 << 7"
    );
    assert_eq!(
        server_data_beyond_raw_window(Some(7), None),
        CtState::Invalid,
        "only the client offered: no scaling, the window is 1000 bytes"
    );
    assert_eq!(
        server_data_beyond_raw_window(None, Some(7)),
        CtState::Invalid,
        "only the server offered: no scaling"
    );
    assert_eq!(server_data_beyond_raw_window(None, None), CtState::Invalid);
}

// ---------------------------------------------------------------- events

/// What the kernel reports as events: a session created by the packet that stores it,
/// closed by the packet that completes the FIN handshake (once) or by a RST that kills it,
/// and the decisions of `log = true` rules only.
#[test]
fn outcomes_flag_created_closed_and_logged_packets_for_events() {
    let mut model = model_from(&format!(
        "{RESTRICTIVE}\n[[rule]]\nname = \"logged-udp\"\nproto = \"udp\"\naction = \"drop\"\nlog = true\n"
    ));
    let mut conn = Conn::new();
    let syn = conn.c(SYN);
    let first = run(&mut model, &syn, Hook::Ingress, 0, "SYN");
    assert!(
        first.created && !first.closed && !first.decision.log,
        "{first:?}"
    );
    conn.cseq += 1;
    let synack = run(
        &mut model,
        &conn.s(SYN | ACK),
        Hook::Egress,
        1_000,
        "SYN-ACK",
    );
    assert!(!synack.created && !synack.closed, "{synack:?}");
    conn.sseq += 1;
    run(&mut model, &conn.c(ACK), Hook::Ingress, 2_000, "ACK");

    let steps = [
        (Hook::Ingress, "client FIN"),
        (Hook::Egress, "server ACK"),
        (Hook::Egress, "server FIN"),
        (Hook::Ingress, "client last ACK"),
    ];
    let mut closed_by = Vec::new();
    for (i, (hook, what)) in steps.into_iter().enumerate() {
        let frame = match i {
            0 => conn.c(FIN | ACK),
            1 => {
                conn.cseq += 1;
                conn.s(ACK)
            }
            2 => conn.s(FIN | ACK),
            _ => {
                conn.sseq += 1;
                conn.c(ACK)
            }
        };
        let outcome = run(&mut model, &frame, hook, S + i as u64, what);
        assert!(!outcome.created, "{what}: {outcome:?}");
        if outcome.closed {
            closed_by.push(what);
        }
    }
    assert_eq!(closed_by, ["client last ACK"], "exactly one packet closes");
    let again = run(
        &mut model,
        &conn.c(ACK),
        Hook::Ingress,
        2 * S,
        "ACK in TIME_WAIT",
    );
    assert!(!again.closed, "a closed session closes once: {again:?}");

    // A RST before any reply kills the session: closed as well.
    let mut other = Conn::new();
    other.cport = 40001;
    run(
        &mut model,
        &other.c(SYN),
        Hook::Ingress,
        3 * S,
        "second SYN",
    );
    other.cseq += 1;
    let reset = run(&mut model, &other.c(RST), Hook::Ingress, 3 * S + 1, "RST");
    assert!(reset.closed, "{reset:?}");

    let udp = run(
        &mut model,
        &udp_frame(client(), server(), 5000, 9999, 10),
        Hook::Ingress,
        4 * S,
        "logged UDP",
    );
    assert!(udp.decision.log && !udp.created, "{udp:?}");
    assert_eq!(udp.decision.action, Action::Drop);
}

/// While state sync listens, the packets that change what sync sends at once (the TCP
/// state, the seen-reply and assured flags) are reported as changes, and no other;
/// without sync no packet is.
#[test]
fn with_sync_the_packets_that_change_a_sessions_state_or_flags_are_reported() {
    let changed_by = |sync: bool| {
        let (mut settings, policy) =
            compiled("[policy]\ninbound = \"accept\"\noutbound = \"accept\"\n");
        if sync {
            settings.flags |= settings_flags::SYNC_EVENTS;
        }
        let mut model = Model::new(settings, &policy);
        let mut conn = Conn::new();
        let mut changed = Vec::new();
        let mut step = |model: &mut Model, frame: Vec<u8>, hook: Hook, what: &'static str| {
            let now = changed.len() as u64 + 1;
            let outcome = run(model, &frame, hook, now * 1_000, what);
            let kind = outcome.event_kind(&model.last_meta);
            changed.push((what, kind & event_kind::CHANGED != 0));
        };
        step(&mut model, conn.c(SYN), Hook::Ingress, "SYN");
        conn.cseq += 1;
        step(&mut model, conn.s(SYN | ACK), Hook::Egress, "SYN-ACK");
        conn.sseq += 1;
        step(&mut model, conn.c(ACK), Hook::Ingress, "ACK");
        step(&mut model, conn.c_data(100), Hook::Ingress, "client data");
        conn.cseq += 100;
        step(&mut model, conn.s(ACK), Hook::Egress, "server ACK of data");
        step(&mut model, conn.c(FIN | ACK), Hook::Ingress, "client FIN");
        step(
            &mut model,
            udp_frame(client(), server(), 5000, 53, 10),
            Hook::Ingress,
            "UDP query",
        );
        step(
            &mut model,
            udp_frame(server(), client(), 53, 5000, 10),
            Hook::Egress,
            "UDP answer",
        );
        step(
            &mut model,
            udp_frame(server(), client(), 53, 5000, 10),
            Hook::Egress,
            "second UDP answer",
        );
        changed
            .into_iter()
            .filter(|(_, changed)| *changed)
            .map(|(what, _)| what)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        changed_by(true),
        ["SYN-ACK", "ACK", "client FIN", "UDP answer"],
        "a new session is reported as new, not changed; data in ESTABLISHED changes nothing"
    );
    assert!(
        changed_by(false).is_empty(),
        "without sync nothing is reported changed"
    );
}

// ---------------------------------------------------------------- verdict cache

/// The policy of `text` as the model's active bank at `generation`.
fn rules_at(text: &str, generation: u32) -> ModelRules {
    let mut rules = ModelRules::new(&compiled(text).1);
    rules.header.generation = generation;
    rules
}

/// RESTRICTIVE without its return-traffic rule: established packets fall to the default.
const RESTRICTIVE_NO_RETURN: &str = concat!(
    r#"
[policy]
inbound = "drop"
outbound = "drop"
"#,
    accept_new_rule!("web", "tcp", 8080),
);

#[test]
fn established_packets_reuse_the_cached_verdict_until_the_policy_generation_changes() {
    let mut model = restrictive();
    let mut conn = Conn::new();
    conn.handshake_accepted(&mut model);
    let data = conn.c_data(10);
    expect_verdict(
        &mut model,
        &data,
        Hook::Ingress,
        3,
        CtState::Established,
        Action::Accept,
        "data",
    );
    let session = session_of(&model, &data).expect("session");
    assert!(
        session
            .verdict_flags
            .iter()
            .all(|flags| flags & verdict_flags::VALID != 0),
        "both directions have a cached verdict: {session:?}"
    );

    // Same generation, different rules: only a cached verdict can still accept.
    model.rules = rules_at(RESTRICTIVE_NO_RETURN, 1);
    let hits_before = model.counters.hits.clone();
    expect_verdict(
        &mut model,
        &data,
        Hook::Ingress,
        4,
        CtState::Established,
        Action::Accept,
        "cached",
    );
    let counted: u64 = model
        .counters
        .hits
        .iter()
        .zip(&hits_before)
        .map(|(a, b)| a - b)
        .sum();
    assert_eq!(counted, 1, "a cached verdict still counts one rule hit");

    // A new generation decides afresh, in both directions.
    model.rules = rules_at(RESTRICTIVE_NO_RETURN, 2);
    expect_verdict(
        &mut model,
        &data,
        Hook::Ingress,
        5,
        CtState::Established,
        Action::Drop,
        "new generation",
    );
    expect_verdict(
        &mut model,
        &conn.s_data(10),
        Hook::Egress,
        6,
        CtState::Established,
        Action::Drop,
        "reply, new generation",
    );
}

#[test]
fn a_cached_verdict_is_not_reused_on_another_hook_or_interface_or_for_icmp() {
    let mut model = model_from(
        r#"
[policy]
inbound = "drop"
outbound = "accept"

[[rule]]
name = "udp-in-on-outside"
iface = ["outside"]
proto = "udp"
action = "accept"
"#,
    );
    let query = udp_frame(client(), server(), 5000, 53, 10);
    let outcome = model
        .packet(&query, Hook::Ingress, IF_OUTSIDE, 0)
        .expect("IP");
    assert_eq!(
        (outcome.state, outcome.decision.action),
        (CtState::New, Action::Accept)
    );
    // The same flow's next packet arriving on another interface is decided for it.
    let other = model
        .packet(&query, Hook::Ingress, IF_OUTSIDE + 1, 1)
        .expect("IP");
    assert_eq!(
        (other.state, other.decision.action),
        (CtState::New, Action::Drop),
        "{other:?}"
    );
    let back = model
        .packet(&query, Hook::Ingress, IF_OUTSIDE, 2)
        .expect("IP");
    assert_eq!(back.decision.action, Action::Accept, "{back:?}");
    // And on the egress hook, where the rule does not apply but the default accepts.
    let out = model
        .packet(&query, Hook::Egress, IF_OUTSIDE, 3)
        .expect("IP");
    assert_eq!(
        out.decision.rule_id,
        session_common::wire::RULE_ID_DEFAULT,
        "{out:?}"
    );

    // ICMP flows are never cached: their type can change within a direction.
    let ping = frames::frame(client(), server(), frames::echo(false, false, 7, 1));
    let sent = model
        .packet(&ping, Hook::Egress, IF_OUTSIDE, 4)
        .expect("IP");
    assert!(sent.created, "{sent:?}");
    let session = session_of(&model, &ping).expect("ICMP session");
    assert_eq!(session.verdict_flags, [0, 0], "{session:?}");
}

// ---------------------------------------------------------------------------------------
// Expectations: replies to the host's broadcast and multicast requests.
// ---------------------------------------------------------------------------------------

/// A BOOTP message of `op` (1 request, 2 reply) with transaction id `xid`.
fn bootp(op: u8, xid: u32) -> Vec<u8> {
    let mut message = vec![0u8; 300];
    message[..4].copy_from_slice(&[op, 1, 6, 0]);
    message[4..8].copy_from_slice(&xid.to_be_bytes());
    message
}

fn dhcp_frame(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, op: u8, xid: u32) -> Vec<u8> {
    frames::frame(
        src,
        dst,
        frames::udp_carrying(sport, dport, &bootp(op, xid)),
    )
}

#[test]
fn a_dhcp_offer_is_related_while_its_discovers_expectation_lives() {
    let mut model = restrictive();
    let (any, bcast) = (
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V4(Ipv4Addr::BROADCAST),
    );
    let discover = dhcp_frame(any, bcast, 68, 67, 1, 7);
    let offer = dhcp_frame(server(), bcast, 67, 68, 2, 7);
    let t0 = 100 * S;
    expect_verdict(
        &mut model,
        &offer,
        Hook::Ingress,
        t0,
        CtState::New,
        Action::Drop,
        "OFFER before any DISCOVER",
    );
    expect_verdict(
        &mut model,
        &discover,
        Hook::Egress,
        t0,
        CtState::New,
        Action::Accept,
        "DISCOVER",
    );
    expect_verdict(
        &mut model,
        &offer,
        Hook::Ingress,
        t0 + S,
        CtState::Related,
        Action::Accept,
        "OFFER",
    );
    assert_eq!(
        session_of(&model, &offer),
        None,
        "the OFFER created no session"
    );
    expect_verdict(
        &mut model,
        &offer,
        Hook::Ingress,
        t0 + 14 * S,
        CtState::Related,
        Action::Accept,
        "OFFER at 14 s",
    );
    expect_verdict(
        &mut model,
        &offer,
        Hook::Ingress,
        t0 + 15 * S,
        CtState::New,
        Action::Drop,
        "OFFER at 15 s: expired",
    );
    // A retransmitted DISCOVER renews the expectation.
    expect_verdict(
        &mut model,
        &discover,
        Hook::Egress,
        t0 + 16 * S,
        CtState::New,
        Action::Accept,
        "DISCOVER again",
    );
    expect_verdict(
        &mut model,
        &offer,
        Hook::Ingress,
        t0 + 30 * S,
        CtState::Related,
        Action::Accept,
        "OFFER at 30 s",
    );
    // The same OFFER on another interface answers nothing.
    let elsewhere = model.packet(&offer, Hook::Ingress, IF_OUTSIDE + 1, t0 + 17 * S);
    assert_eq!(
        elsewhere.map(|o| o.state),
        Some(CtState::New),
        "OFFER on another interface"
    );
    assert_eq!(counter(&model, Counter::ExpectationsCreated), 2);
    assert_eq!(counter(&model, Counter::ExpectationHits), 3);
}

#[test]
fn a_generic_expectation_lives_five_seconds_and_only_for_its_ports() {
    let mut model = restrictive();
    let group = IpAddr::V4(Ipv4Addr::new(239, 255, 255, 250));
    let search = udp_frame(server(), group, 40000, 1900, 90);
    let answer = udp_frame(client(), server(), 1900, 40000, 200);
    let t0 = 100 * S;
    expect_verdict(
        &mut model,
        &search,
        Hook::Egress,
        t0,
        CtState::New,
        Action::Accept,
        "M-SEARCH",
    );
    expect_verdict(
        &mut model,
        &answer,
        Hook::Ingress,
        t0 + 4 * S,
        CtState::Related,
        Action::Accept,
        "answer at 4 s",
    );
    expect_verdict(
        &mut model,
        &answer,
        Hook::Ingress,
        t0 + 5 * S,
        CtState::New,
        Action::Drop,
        "answer at 5 s: expired",
    );
    let wrong_port = udp_frame(client(), server(), 1901, 40000, 200);
    expect_verdict(
        &mut model,
        &search,
        Hook::Egress,
        t0 + 6 * S,
        CtState::New,
        Action::Accept,
        "M-SEARCH again",
    );
    expect_verdict(
        &mut model,
        &wrong_port,
        Hook::Ingress,
        t0 + 6 * S,
        CtState::New,
        Action::Drop,
        "from another port",
    );
    // A unicast request sets up nothing: its reply comes back in its session.
    let unicast = udp_frame(server(), client(), 40001, 1900, 90);
    let before = counter(&model, Counter::ExpectationsCreated);
    expect_verdict(
        &mut model,
        &unicast,
        Hook::Egress,
        t0 + 6 * S,
        CtState::New,
        Action::Accept,
        "unicast request",
    );
    assert_eq!(counter(&model, Counter::ExpectationsCreated), before);
    // A request the policy drops sets up nothing either.
    let mut closed = model_from(
        "[policy]\ninbound = \"drop\"\noutbound = \"drop\"\n[[rule]]\nname = \"return\"\nstate = [\"established\", \"related\"]\naction = \"accept\"\n",
    );
    expect_verdict(
        &mut closed,
        &search,
        Hook::Egress,
        t0,
        CtState::New,
        Action::Drop,
        "dropped M-SEARCH",
    );
    expect_verdict(
        &mut closed,
        &answer,
        Hook::Ingress,
        t0 + S,
        CtState::New,
        Action::Drop,
        "answer to a dropped M-SEARCH",
    );
    assert_eq!(counter(&closed, Counter::ExpectationsCreated), 0);
}
