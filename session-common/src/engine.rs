//! The per-packet pipeline shared by the XDP and TC programs: parse, classify, track,
//! apply the policy, account. Storage is abstracted behind small traits so the kernel backs
//! them with BPF maps and the host with plain collections.

use crate::packet::{IcmpKind, PacketBytes, PacketMeta, ParseError, parse};
use crate::track::{
    Invalid, Update, account, direction, embedded_key, flow_key, mark_seen, new_session, state_for,
    update,
};
use crate::wire::{
    Action, Counter, CtState, Dir, FlowKey, HIT_DEFAULT_INBOUND, HIT_DEFAULT_OUTBOUND, Hook,
    MAX_RULES, PolicyHeader, RULE_ID_DEFAULT, Rule, Session, Settings, TcpState, event_kind, proto,
    session_flags,
};

/// The session table, in two tiers like the kernel's early-drop policy: new sessions go
/// to a tier where, when it is full, the least recently used unassured session makes room;
/// once assured, a session moves to a protected tier that never evicts.
pub trait SessionTable {
    /// The session stored under `key` in either tier, whether expired or not.
    fn get_mut(&mut self, key: &FlowKey) -> Option<&mut Session>;
    /// Stores a new `session` under `key` in the unassured tier; false when refused.
    fn insert(&mut self, key: &FlowKey, session: &Session) -> bool;
    /// Removes the session under `key` from both tiers.
    fn remove(&mut self, key: &FlowKey);
    /// Moves the session under `key` into the protected tier, setting
    /// [`session_flags::PROTECTED`]; false (and nothing changed) when that tier is full.
    fn protect(&mut self, key: &FlowKey) -> bool;
}

/// The active policy.
///
/// [`rule_matches`]: crate::policy::rule_matches
pub trait RuleSource {
    /// The active bank and its header.
    fn header(&self) -> Option<(u32, &PolicyHeader)>;
    /// The first of the `count` entries of `bank` that [`rule_matches`] the packet. The walk
    /// is the backend's so the kernel can run it in `bpf_loop`, verified once.
    fn first_match(
        &self,
        bank: u32,
        count: u32,
        meta: &PacketMeta,
        state: CtState,
        hook: Hook,
        ifindex: u32,
    ) -> Option<&Rule>;
}

/// Where the pipeline counts what it did.
pub trait Counters {
    /// Adds one to a global counter.
    fn count(&mut self, counter: Counter);
    /// Adds one to a rule-hit slot (a rule id or a default slot).
    fn hit(&mut self, slot: u32);
}

/// The decision of the policy for one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// What to do with the packet.
    pub action: Action,
    /// Rule id that decided, or [`RULE_ID_DEFAULT`].
    pub rule_id: u16,
    /// Hit slot to count.
    pub slot: u32,
    /// Generation of the policy that decided.
    pub generation: u32,
    /// Whether the deciding rule asked for the packet to be reported (`log = true`).
    pub log: bool,
}

/// Working memory for one packet. The kernel keeps it in a per-CPU map because the BPF
/// stack (512 bytes) cannot hold it next to everything else.
#[derive(Clone, Copy, Debug, Default)]
pub struct Scratch {
    /// The parsed packet.
    pub meta: PacketMeta,
    /// A session being created for the packet.
    pub session: Session,
}

/// Everything the pipeline concluded about one packet, for tests and the host model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The packet's `ct state`.
    pub state: CtState,
    /// The policy's decision.
    pub decision: Decision,
    /// The packet stored a new session.
    pub created: bool,
    /// The packet closed its session (finished the FIN handshake, or reset it).
    pub closed: bool,
}

impl Outcome {
    /// The [`event_kind`] bits the kernel reports for this packet; 0 for none.
    #[inline(always)]
    pub fn event_kind(&self) -> u8 {
        (if self.created { event_kind::NEW } else { 0 })
            | (if self.closed { event_kind::CLOSED } else { 0 })
            | (if self.decision.log {
                event_kind::LOGGED
            } else {
                0
            })
    }
}

/// First matching rule of the active bank, else the hook's default action.
#[inline(always)]
pub fn evaluate<R: RuleSource>(
    rules: &R,
    meta: &PacketMeta,
    state: CtState,
    hook: Hook,
    ifindex: u32,
) -> Decision {
    let default_slot = match hook {
        Hook::Ingress => HIT_DEFAULT_INBOUND,
        Hook::Egress => HIT_DEFAULT_OUTBOUND,
    };
    let Some((bank, header)) = rules.header() else {
        return Decision {
            action: Action::Accept,
            rule_id: RULE_ID_DEFAULT,
            slot: default_slot,
            generation: 0,
            log: false,
        };
    };
    let generation = header.generation;
    let count = header.rule_count;
    let default = match hook {
        Hook::Ingress => header.default_inbound,
        Hook::Egress => header.default_outbound,
    };
    if let Some(rule) = rules.first_match(bank, count.min(MAX_RULES), meta, state, hook, ifindex) {
        return Decision {
            action: action_of(rule.action),
            rule_id: rule.rule_id,
            slot: rule.rule_id as u32,
            generation,
            log: rule.log != 0,
        };
    }
    Decision {
        action: action_of(default),
        rule_id: RULE_ID_DEFAULT,
        slot: default_slot,
        generation,
        log: false,
    }
}

#[inline(always)]
fn action_of(byte: u8) -> Action {
    if byte == Action::Drop as u8 {
        Action::Drop
    } else {
        Action::Accept
    }
}

#[inline(always)]
fn invalid_counter(reason: Invalid) -> Counter {
    match reason {
        Invalid::TcpFlags => Counter::InvalidTcpFlags,
        Invalid::TcpState => Counter::InvalidTcpState,
        Invalid::TcpWindow => Counter::InvalidTcpWindow,
        Invalid::Icmp => Counter::InvalidIcmp,
    }
}

/// Runs one frame through parse, tracking and policy; returns what to do with it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn process<P, S, R, C>(
    pkt: &P,
    hook: Hook,
    ifindex: u32,
    now: u64,
    settings: &Settings,
    sessions: &mut S,
    rules: &R,
    counters: &mut C,
    scratch: &mut Scratch,
) -> Option<Outcome>
where
    P: PacketBytes + ?Sized,
    S: SessionTable,
    R: RuleSource,
    C: Counters,
{
    let Scratch { meta, session } = scratch;
    match parse(pkt, meta) {
        Ok(()) => {}
        Err(ParseError::NotIp) => {
            counters.count(Counter::PacketsNonIp);
            return None;
        }
        Err(error) => {
            counters.count(Counter::PacketsSeen);
            counters.count(match error {
                ParseError::Fragment => Counter::InvalidFragment,
                _ => Counter::InvalidMalformed,
            });
            *meta = PacketMeta::default();
            return Some(finish(
                meta,
                None,
                Tracked::of(CtState::Invalid),
                hook,
                ifindex,
                sessions,
                rules,
                counters,
            ));
        }
    }
    counters.count(Counter::PacketsSeen);
    let (key, src_is_lo) = flow_key(meta);
    let tracked = classify(
        meta, &key, src_is_lo, now, settings, sessions, counters, session,
    );
    Some(finish(
        meta,
        tracked.pending.then_some((&key, session)),
        tracked,
        hook,
        ifindex,
        sessions,
        rules,
        counters,
    ))
}

/// What tracking concluded about one packet.
#[derive(Clone, Copy)]
struct Tracked {
    /// The packet's `ct state`.
    state: CtState,
    /// The packet starts a flow: the session in scratch is to be inserted if accepted.
    pending: bool,
    /// The packet closed its session.
    closed: bool,
}

impl Tracked {
    #[inline(always)]
    fn of(state: CtState) -> Tracked {
        Tracked {
            state,
            pending: false,
            closed: false,
        }
    }
}

/// Whether a TCP state means the connection is over (both FINs acknowledged, or reset).
#[inline(always)]
fn is_closing(state: u8) -> bool {
    state == TcpState::TimeWait as u8 || state == TcpState::Close as u8
}

/// Tracks the packet: returns its state and, for a packet that starts a flow, that the
/// session in `fresh` is to be inserted if the policy accepts it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn classify<S: SessionTable, C: Counters>(
    meta: &PacketMeta,
    key: &FlowKey,
    src_is_lo: bool,
    now: u64,
    settings: &Settings,
    sessions: &mut S,
    counters: &mut C,
    fresh: &mut Session,
) -> Tracked {
    match meta.icmp_kind {
        IcmpKind::Untracked => return Tracked::of(CtState::Untracked),
        IcmpKind::Error => {
            // Only the host that sent the quoted packet may be told about it, as
            // nf_conntrack_inet_error() checks.
            let about = embedded_key(meta);
            return match sessions.get_mut(&about) {
                Some(session) if session.expires_ns > now && meta.dst == meta.inner.src => {
                    Tracked::of(CtState::Related)
                }
                _ => {
                    counters.count(Counter::InvalidIcmp);
                    Tracked::of(CtState::Invalid)
                }
            };
        }
        _ => {}
    }
    let mut kill = false;
    let mut closed = false;
    let mut stale = false;
    let mut protect = false;
    let mut existing = None;
    if let Some(session) = sessions.get_mut(key) {
        if session.expires_ns > now {
            let dir = direction(session, src_is_lo);
            let state = state_for(session, dir);
            let was_closing = is_closing(session.state);
            match update(session, meta, dir, settings, now) {
                Ok(Update::Tracked) => {
                    closed = meta.proto == proto::TCP && !was_closing && is_closing(session.state);
                    account(session, meta, dir);
                    mark_seen(session, meta, dir);
                    protect = session.flags & (session_flags::ASSURED | session_flags::PROTECTED)
                        == session_flags::ASSURED;
                    existing = Some(state);
                }
                Ok(Update::Ignored) => {
                    counters.count(Counter::TcpIgnored);
                    mark_seen(session, meta, dir);
                    existing = Some(state);
                }
                Ok(Update::Kill) => {
                    kill = true;
                    closed = true;
                    existing = Some(state);
                }
                Ok(Update::Reopen) => stale = true,
                Err(reason) => {
                    counters.count(invalid_counter(reason));
                    existing = Some(CtState::Invalid);
                }
            }
        } else {
            counters.count(Counter::SessionsExpiredInline);
            stale = true;
        }
    }
    if kill || stale {
        sessions.remove(key);
    }
    if protect {
        counters.count(if sessions.protect(key) {
            Counter::SessionsProtected
        } else {
            Counter::ProtectedTableFull
        });
    }
    if let Some(state) = existing {
        return Tracked {
            state,
            pending: false,
            closed,
        };
    }
    let started = new_session(fresh, meta, src_is_lo, settings, now)
        .and_then(|()| update(fresh, meta, Dir::Original, settings, now));
    match started {
        Ok(_) => {
            account(fresh, meta, Dir::Original);
            Tracked {
                state: CtState::New,
                pending: true,
                closed: false,
            }
        }
        Err(reason) => {
            counters.count(invalid_counter(reason));
            Tracked::of(CtState::Invalid)
        }
    }
}

/// Applies the policy, inserts an admitted new session, counts the result.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn finish<S: SessionTable, R: RuleSource, C: Counters>(
    meta: &PacketMeta,
    pending: Option<(&FlowKey, &mut Session)>,
    tracked: Tracked,
    hook: Hook,
    ifindex: u32,
    sessions: &mut S,
    rules: &R,
    counters: &mut C,
) -> Outcome {
    let state = tracked.state;
    let mut outcome = Outcome {
        state,
        decision: evaluate(rules, meta, state, hook, ifindex),
        created: false,
        closed: tracked.closed,
    };
    counters.count(match state {
        CtState::New => Counter::StateNew,
        CtState::Established => Counter::StateEstablished,
        CtState::Related => Counter::StateRelated,
        CtState::Invalid => Counter::StateInvalid,
        CtState::Untracked => Counter::StateUntracked,
    });
    let decision = &mut outcome.decision;
    counters.hit(decision.slot);
    if decision.action == Action::Accept
        && let Some((key, session)) = pending
    {
        session.rule_id = decision.rule_id;
        session.policy_generation = decision.generation;
        session.origin_icmp_type = meta.icmp_type;
        session.origin_ifindex = ifindex.to_ne_bytes();
        if hook == Hook::Egress {
            session.flags |= session_flags::ORIGIN_EGRESS;
        }
        if sessions.insert(key, session) {
            counters.count(Counter::SessionsCreated);
            outcome.created = true;
        } else {
            counters.count(Counter::DropTableFull);
            decision.action = Action::Drop;
            counters.count(Counter::PacketsDropped);
            return outcome;
        }
    }
    match outcome.decision.action {
        Action::Accept => counters.count(Counter::PacketsAccepted),
        Action::Drop => {
            counters.count(Counter::PacketsDropped);
            counters.count(if outcome.decision.rule_id == RULE_ID_DEFAULT {
                Counter::DropDefault
            } else {
                Counter::DropRule
            });
        }
    }
    outcome
}
