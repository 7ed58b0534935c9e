//! The per-packet pipeline shared by the XDP and TC programs: parse, track (which gives
//! the ct state), apply the policy, account. Storage is abstracted behind small traits so the kernel backs
//! them with BPF maps and the host with plain collections.

use crate::{
    expect::{self, Expectations},
    fragment::{
        DatagramEntry, DatagramKey, Follow, FragmentTable, conflicts, datagram_key, decision_of,
        ends_datagram, fill_entry, follow, state_of, unjudged,
    },
    limits::Admission,
    packet::{IcmpKind, OptionBytes, PacketBytes, PacketMeta, ParseError, tcp_flags},
    syn_defence::{self, DefendedPort, Socket},
    track::{
        Invalid, Update, account, direction, embedded_key, flow_key, mark_seen, new_session_with,
        state_for, update,
    },
    wire::{
        Action, Counter, CtState, Dir, FlowKey, HIT_DEFAULT_INBOUND, HIT_DEFAULT_OUTBOUND, Hook,
        MAX_RULES, PolicyHeader, RULE_ID_DEFAULT, Rule, Session, Settings, TcpState, event_kind,
        proto, rule_flags, session_flags, settings_flags, verdict_flags,
    },
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
    /// Whether a session may be stored under `key`; false only when none is. Asked before
    /// the lookup of a connection attempt ([`crate::presence::is_connection_attempt`]),
    /// which a table with a presence filter answers without reading its buckets.
    fn may_hold(&self, _key: &FlowKey) -> bool {
        true
    }
    /// Moves `session` by one packet with [`update`]. The kernel runs it as a BPF function
    /// of its own, which the verifier checks once instead of once per path reaching it.
    #[inline(always)]
    fn track(
        session: &mut Session,
        meta: &PacketMeta,
        dir: Dir,
        settings: &Settings,
        now: u64,
    ) -> Result<Update, Invalid>
    where
        Self: Sized,
    {
        update(session, meta, dir, settings, now)
    }
}

/// The active policy.
///
/// [`rule_matches`]: crate::policy::rule_matches
pub trait RuleSource {
    /// The active bank and its header.
    fn header(&self) -> Option<(u32, &PolicyHeader)>;
    /// The first of the `count` entries of `bank` that [`rule_matches`] the packet. The
    /// search is the backend's: the host model walks the entries (the reference), the
    /// kernel ANDs rule bitmaps in a separately verified function.
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

/// The limits rules put on the sessions they admit ([`crate::limits`]): the kernel backs
/// them with BPF maps in a separately verified function, the host model with collections.
pub trait Limits {
    /// Whether the limits of `rule_id` (in policy `bank`) admit a new session from the
    /// packet's source, counting it when they do; a refusal may overload the source.
    fn admit(&mut self, bank: u32, rule_id: u16, meta: &PacketMeta, now: u64) -> Admission;
    /// Puts the packet's source into the overload set of `rule_id`, whose limits refused
    /// it; false when the set has no room.
    fn overload(&mut self, bank: u32, rule_id: u16, meta: &PacketMeta, now: u64) -> bool;
    /// Uncounts a session of `rule_id` under `key` that [`Limits::admit`] counted; its
    /// source is the lower endpoint of the key when `orig_is_lo`.
    fn release(&mut self, bank: u32, rule_id: u16, key: &FlowKey, orig_is_lo: bool);
}

/// What the host's TCP stack holds, for the SYN-flood defence ([`crate::syn_defence`]):
/// the kernel asks the stack with socket lookups, the host model a table.
pub trait Sockets {
    /// The host's port `port` when `[syn_defence]` defends it.
    fn defended(&mut self, port: u16) -> Option<&mut DefendedPort>;
    /// What the host's stack holds for the TCP connection of `meta`, which arrives
    /// (`inbound`) or leaves.
    fn socket(&mut self, meta: &PacketMeta, inbound: bool) -> Socket;
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
    /// Whether the deciding rule has limits a new session must pass.
    pub limited: bool,
}

/// Working memory for one packet. The kernel keeps it in a per-CPU map because the BPF
/// stack (512 bytes) cannot hold it next to everything else.
#[derive(Clone, Copy, Debug, Default)]
pub struct Scratch {
    /// The parsed packet.
    pub meta: PacketMeta,
    /// A session being created for the packet.
    pub session: Session,
    /// A fragment's datagram identity.
    pub datagram: DatagramKey,
    /// The record a first fragment leaves for its datagram.
    pub entry: DatagramEntry,
    /// A SYN's options, while they are read.
    pub options: OptionBytes,
    /// The packet's flow key: here rather than on the stack, which Linux 6.1 allows the
    /// XDP program only 288 bytes of (see docs/ARCHITECTURE.md).
    pub key: FlowKey,
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
    /// The packet is an IP fragment, which the fast path leaves to the kernel.
    pub fragment: bool,
    /// The rule's limits refused the packet's source and put it into its overload set.
    pub overloaded: bool,
}

impl Outcome {
    /// The [`event_kind`] bits the kernel reports for this packet (`meta`); 0 for none.
    #[inline(always)]
    pub fn event_kind(&self, meta: &PacketMeta) -> u8 {
        (if self.created { event_kind::NEW } else { 0 })
            | (if meta.sync_changed != 0 {
                event_kind::CHANGED
            } else {
                0
            })
            | (if self.closed { event_kind::CLOSED } else { 0 })
            | (if self.decision.log {
                event_kind::LOGGED
            } else {
                0
            })
            | (if self.overloaded {
                event_kind::OVERLOADED
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
    decide(rules, rules.header(), meta, state, hook, ifindex)
}

/// The active policy as [`RuleSource::header`] returns it: bank and header.
type ActivePolicy<'a> = Option<(u32, &'a PolicyHeader)>;

/// [`evaluate`] against a header already read for this packet.
#[inline(always)]
fn decide<R: RuleSource>(
    rules: &R,
    policy: ActivePolicy<'_>,
    meta: &PacketMeta,
    state: CtState,
    hook: Hook,
    ifindex: u32,
) -> Decision {
    let default_slot = default_slot(hook);
    let Some((bank, header)) = policy else {
        return Decision {
            action: Action::Accept,
            rule_id: RULE_ID_DEFAULT,
            slot: default_slot,
            generation: 0,
            log: false,
            limited: false,
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
            limited: rule.match_flags & rule_flags::LIMITED != 0,
        };
    }
    Decision {
        action: action_of(default),
        rule_id: RULE_ID_DEFAULT,
        slot: default_slot,
        generation,
        log: false,
        limited: false,
    }
}

/// The hit slot of the hook's default action.
#[inline(always)]
fn default_slot(hook: Hook) -> u32 {
    match hook {
        Hook::Ingress => HIT_DEFAULT_INBOUND,
        Hook::Egress => HIT_DEFAULT_OUTBOUND,
    }
}

/// The [`verdict_flags`] that say for which packets a cached verdict holds.
#[inline(always)]
fn verdict_key(state: CtState, hook: Hook) -> u8 {
    verdict_flags::VALID
        | (if hook == Hook::Egress {
            verdict_flags::EGRESS
        } else {
            0
        })
        | ((state as u8) << verdict_flags::STATE_SHIFT)
}

/// Whether a session's packets may reuse a cached verdict at all (see [`verdict_flags`]).
#[inline(always)]
fn cacheable(meta: &PacketMeta) -> bool {
    meta.proto != proto::ICMP && meta.proto != proto::ICMPV6
}

/// The verdict cached for `dir` of `session`, if it holds for this packet under the
/// policy of `generation`.
#[inline(always)]
fn cached_decision(
    session: &Session,
    dir: Dir,
    state: CtState,
    hook: Hook,
    ifindex: u32,
    generation: u32,
) -> Option<Decision> {
    let d = dir as usize & 1;
    let flags = session.verdict_flags[d];
    if session.verdict_generation != generation
        || session.verdict_ifindex[d] != ifindex
        || flags & !(verdict_flags::DROP | verdict_flags::LOG) != verdict_key(state, hook)
    {
        return None;
    }
    let rule_id = session.verdict_rule[d];
    Some(Decision {
        action: if flags & verdict_flags::DROP != 0 {
            Action::Drop
        } else {
            Action::Accept
        },
        rule_id,
        slot: if rule_id == RULE_ID_DEFAULT {
            default_slot(hook)
        } else {
            rule_id as u32
        },
        generation,
        log: flags & verdict_flags::LOG != 0,
        limited: false,
    })
}

/// Caches `decision` for `dir` of `session`; a new generation forgets the other
/// direction's verdict.
#[inline(always)]
fn cache_decision(
    session: &mut Session,
    dir: Dir,
    state: CtState,
    hook: Hook,
    ifindex: u32,
    decision: &Decision,
) {
    if session.verdict_generation != decision.generation {
        session.verdict_generation = decision.generation;
        session.verdict_flags = [0; 2];
    }
    let d = dir as usize & 1;
    session.verdict_ifindex[d] = ifindex;
    session.verdict_rule[d] = decision.rule_id;
    session.verdict_flags[d] = verdict_key(state, hook)
        | (if decision.action == Action::Drop {
            verdict_flags::DROP
        } else {
            0
        })
        | (if decision.log { verdict_flags::LOG } else { 0 });
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
/// Fragments ([`crate::fragment`]) pay for the fragment table; whole packets never touch it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn process<P, S, F, R, C, E, L, K>(
    pkt: &P,
    hook: Hook,
    ifindex: u32,
    now: u64,
    settings: &Settings,
    sessions: &mut S,
    fragments: &mut F,
    rules: &R,
    counters: &mut C,
    expectations: &mut E,
    limits: &mut L,
    sockets: &mut K,
    scratch: &mut Scratch,
) -> Option<Outcome>
where
    P: PacketBytes + ?Sized,
    S: SessionTable,
    F: FragmentTable,
    R: RuleSource,
    C: Counters,
    E: Expectations,
    L: Limits,
    K: Sockets,
{
    let Scratch {
        meta,
        session,
        datagram,
        entry,
        options,
        key,
    } = scratch;
    let parsed = pkt.parse_into(meta);
    if parsed == Err(ParseError::NotIp) {
        counters.count(Counter::PacketsNonIp);
        return None;
    }
    let judge = Judge {
        rules,
        policy: rules.header(),
        hook,
        ifindex,
    };
    let mut first_fragment = false;
    let invalid = match parsed {
        Ok(()) => None,
        Err(ParseError::Fragment) => {
            return Some(follow_fragment(
                meta, datagram, now, &judge, sessions, fragments, counters,
            ));
        }
        Err(ParseError::FirstFragment) => {
            datagram_key(meta, datagram);
            if conflicts(fragments.get(datagram), meta, now) {
                Some(Counter::InvalidFragment)
            } else {
                first_fragment = true;
                None
            }
        }
        Err(ParseError::TinyFragment) => Some(Counter::InvalidFragment),
        Err(ParseError::Malformed | ParseError::NotIp) => Some(Counter::InvalidMalformed),
    };
    if let Some(reason) = invalid {
        counters.count(Counter::PacketsSeen);
        counters.count(reason);
        let fragment = meta.fragment != 0;
        crate::zero_words(meta);
        let mut outcome = finish(
            meta,
            None,
            None,
            Tracked::of(CtState::Invalid),
            &judge,
            sessions,
            counters,
            &mut NoLimits,
            now,
            |_: &mut Session| Ok(()),
        );
        outcome.fragment = fragment;
        return Some(outcome);
    }
    counters.count(Counter::PacketsSeen);
    let src_is_lo;
    (*key, src_is_lo) = flow_key(meta);
    let key: &FlowKey = key;
    let mut tracked = track_packet(
        pkt,
        meta,
        key,
        src_is_lo,
        now,
        settings,
        &judge,
        sessions,
        counters,
        expectations,
        limits,
        sockets,
        session,
        options,
    );
    // A connection attempt the policy admits reads its SYN's options now, for the session
    // its admission builds; one the policy drops never reads them.
    if tracked.pending && !tracked.built && tracked.decision.is_none() {
        let admitted = tracked.decide(&judge, meta).action == Action::Accept;
        if admitted {
            pkt.syn_options_into(meta, options);
        }
    }
    let mut outcome = finish(
        meta,
        Some(key),
        tracked.pending.then_some((key, session)),
        tracked,
        &judge,
        sessions,
        counters,
        limits,
        now,
        |fresh: &mut Session| start_session::<S>(fresh, meta, src_is_lo, false, settings, now),
    );
    // Only an accepted UDP packet that tracking left NEW pays for setting up an
    // expectation (at ingress, only one without a session pays for the lookup: see
    // `track_packet`).
    if hook == Hook::Egress
        && outcome.state == CtState::New
        && meta.proto == proto::UDP
        && outcome.decision.action == Action::Accept
    {
        expect_replies(pkt, meta, ifindex, now, expectations, counters);
    }
    if first_fragment {
        fill_entry(
            entry,
            meta,
            key,
            src_is_lo,
            outcome.state,
            &outcome.decision,
            now,
        );
        fragments.insert(datagram, entry);
        outcome.fragment = true;
    }
    Some(outcome)
}

/// The first payload bytes of a UDP packet when [`expect::needs_payload`] asks for them
/// (DHCP) and the parser could say where they are.
#[inline(always)]
fn expect_payload<P: PacketBytes + ?Sized>(
    pkt: &P,
    meta: &PacketMeta,
) -> Option<[u8; expect::PAYLOAD_BYTES]> {
    if !expect::needs_payload(meta) || meta.udp_payload_at == 0 {
        return None;
    }
    pkt.load::<{ expect::PAYLOAD_BYTES }>(meta.udp_payload_at as usize)
}

/// Whether a NEW UDP packet arriving on `ifindex` answers a live expectation: then it is
/// RELATED, as the kernel classifies a connection it expected, and creates no session
/// (each reply must answer a live expectation of its own; see docs/ARCHITECTURE.md).
#[inline(always)]
fn answers_expectation<P: PacketBytes + ?Sized, E: Expectations>(
    pkt: &P,
    meta: &PacketMeta,
    ifindex: u32,
    now: u64,
    expectations: &mut E,
) -> bool {
    let Some(key) = expect::reply(meta, ifindex, expect_payload(pkt, meta)) else {
        return false;
    };
    expectations
        .expiry(&key)
        .is_some_and(|expires| expect::is_live(expires, now))
}

/// Sets up the expectation of an accepted NEW UDP packet the host sends on `ifindex`,
/// when it goes to a broadcast or multicast address.
#[inline(always)]
fn expect_replies<P: PacketBytes + ?Sized, E: Expectations, C: Counters>(
    pkt: &P,
    meta: &PacketMeta,
    ifindex: u32,
    now: u64,
    expectations: &mut E,
    counters: &mut C,
) {
    let dst_mac_first = pkt.load::<1>(0).map_or(0, |byte| byte[0]);
    if !expect::is_group_destination(meta, dst_mac_first) {
        return;
    }
    if let Some((key, expires)) = expect::request(meta, ifindex, expect_payload(pkt, meta), now) {
        expectations.expect(&key, expires);
        counters.count(Counter::ExpectationsCreated);
    }
}

/// A later fragment: gets its datagram's recorded state and verdict and is counted in its
/// session; INVALID when it would overlap the transport header; passed unjudged, touching
/// no table, when its datagram is unknown.
#[inline(always)]
fn follow_fragment<S: SessionTable, F: FragmentTable, R: RuleSource, C: Counters>(
    meta: &mut PacketMeta,
    datagram: &mut DatagramKey,
    now: u64,
    judge: &Judge<'_, R>,
    sessions: &mut S,
    fragments: &mut F,
    counters: &mut C,
) -> Outcome {
    counters.count(Counter::PacketsSeen);
    datagram_key(meta, datagram);
    let found = fragments.get(datagram);
    match follow(found, meta, now) {
        Follow::Unknown => {
            counters.count(Counter::FragmentsUnknown);
            counters.count(Counter::PacketsAccepted);
            Outcome {
                state: CtState::Untracked,
                decision: unjudged(default_slot(judge.hook)),
                created: false,
                closed: false,
                fragment: true,
                overloaded: false,
            }
        }
        Follow::Overlap => {
            counters.count(Counter::InvalidFragment);
            crate::zero_words(meta);
            let mut outcome = finish(
                meta,
                None,
                None,
                Tracked::of(CtState::Invalid),
                judge,
                sessions,
                counters,
                &mut NoLimits,
                now,
                |_: &mut Session| Ok(()),
            );
            outcome.fragment = true;
            outcome
        }
        Follow::Follow => {
            let Some(entry) = found else {
                // `follow` answers Follow only with a record.
                return Outcome {
                    state: CtState::Untracked,
                    decision: unjudged(default_slot(judge.hook)),
                    created: false,
                    closed: false,
                    fragment: true,
                    overloaded: false,
                };
            };
            let state = state_of(entry);
            let decision = decision_of(entry);
            if let Some(session) = sessions.get_mut(&entry.flow)
                && session.expires_ns > now
            {
                let dir = direction(session, entry.src_is_lo != 0);
                account(session, meta, dir);
            }
            if ends_datagram(meta) {
                fragments.remove(datagram);
            }
            counters.count(Counter::FragmentsFollowed);
            count_verdict(state, &decision, counters);
            Outcome {
                state,
                decision,
                created: false,
                closed: false,
                fragment: true,
                overloaded: false,
            }
        }
    }
}

/// Counts a packet's state, rule hit and fate, as [`finish`] does for a judged packet.
#[inline(always)]
fn count_verdict<C: Counters>(state: CtState, decision: &Decision, counters: &mut C) {
    counters.count(state_counter(state));
    counters.hit(decision.slot);
    count_fate(decision, counters);
}

/// Counts what became of a judged packet: accepted, or dropped by a rule or the default.
#[inline(always)]
fn count_fate<C: Counters>(decision: &Decision, counters: &mut C) {
    match decision.action {
        Action::Accept => counters.count(Counter::PacketsAccepted),
        Action::Drop => {
            counters.count(Counter::PacketsDropped);
            counters.count(if decision.rule_id == RULE_ID_DEFAULT {
                Counter::DropDefault
            } else {
                Counter::DropRule
            });
        }
    }
}

/// The counter of a `ct state`.
#[inline(always)]
fn state_counter(state: CtState) -> Counter {
    match state {
        CtState::New => Counter::StateNew,
        CtState::Established => Counter::StateEstablished,
        CtState::Related => Counter::StateRelated,
        CtState::Invalid => Counter::StateInvalid,
        CtState::Untracked => Counter::StateUntracked,
    }
}

/// Builds the session a packet starts, as nf_conntrack runs `tcp_new()` then
/// `tcp_packet()`, and counts the packet in it. `pick_up` lets a TCP segment that is not
/// a SYN start it, as `tcp_loose` does for every connection: the SYN-flood defence does
/// so for a connection the host's stack holds as established.
#[inline(always)]
fn start_session<S: SessionTable>(
    fresh: &mut Session,
    meta: &PacketMeta,
    src_is_lo: bool,
    pick_up: bool,
    settings: &Settings,
    now: u64,
) -> Result<(), Invalid> {
    let loose = pick_up || settings.has(settings_flags::TCP_LOOSE);
    new_session_with(fresh, meta, src_is_lo, loose, now)?;
    S::track(fresh, meta, Dir::Original, settings, now)?;
    account(fresh, meta, Dir::Original);
    Ok(())
}

/// The SYN-flood defence's verdict for a TCP packet without a session at `hook`: only for
/// a defended port of the host (the destination of what arrives, the source of what
/// leaves); an arriving SYN counts towards the port's rate and is the defence's only
/// while the rate engages it.
#[inline(always)]
fn defend<K: Sockets>(
    meta: &PacketMeta,
    hook: Hook,
    now: u64,
    sockets: &mut K,
) -> syn_defence::Verdict {
    let inbound = hook == Hook::Ingress;
    let flags = meta.tcp_flags;
    let syn = flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;
    let syn_ack = flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN | tcp_flags::ACK;
    let local_port = if inbound { meta.dport } else { meta.sport };
    let Some(port) = sockets.defended(local_port) else {
        return syn_defence::Verdict::Track;
    };
    if inbound && syn && !port.engaged(now) {
        return syn_defence::Verdict::Track;
    }
    syn_defence::verdict(inbound, syn, syn_ack, sockets.socket(meta, inbound))
}

/// Uncounts `session` from its rule's limits, once: when it closes, is removed, or is
/// refused a place in the table.
#[inline(always)]
fn uncount<L: Limits>(session: &mut Session, key: &FlowKey, bank: u32, limits: &mut L) {
    if session.flags & session_flags::COUNTED == 0 {
        return;
    }
    session.flags &= !session_flags::COUNTED;
    let orig_is_lo = session.flags & session_flags::ORIG_IS_LO != 0;
    limits.release(bank, session.rule_id, key, orig_is_lo);
}

/// The limits of a packet that can create no session (invalid packets, fragments).
struct NoLimits;

impl Limits for NoLimits {
    #[inline(always)]
    fn admit(&mut self, _: u32, _: u16, _: &PacketMeta, _: u64) -> Admission {
        Admission::Unlimited
    }

    #[inline(always)]
    fn overload(&mut self, _: u32, _: u16, _: &PacketMeta, _: u64) -> bool {
        false
    }

    #[inline(always)]
    fn release(&mut self, _: u32, _: u16, _: &FlowKey, _: bool) {}
}

/// The policy as it stands for one packet: read once, so that a cached verdict and a
/// fresh decision see the same generation.
struct Judge<'a, R> {
    rules: &'a R,
    policy: ActivePolicy<'a>,
    hook: Hook,
    ifindex: u32,
}

impl<R: RuleSource> Judge<'_, R> {
    /// The policy's decision for this packet in `state`.
    #[inline(always)]
    fn decide(&self, meta: &PacketMeta, state: CtState) -> Decision {
        decide(
            self.rules,
            self.policy,
            meta,
            state,
            self.hook,
            self.ifindex,
        )
    }

    /// The active bank; 0 without a policy, whose rules then have no limits to release.
    /// A plain number rather than an `Option`: the verifier refuses the copy of an unset
    /// register that the compiler may make of a `None`'s payload.
    #[inline(always)]
    fn bank(&self) -> u32 {
        match self.policy {
            Some((bank, _)) => bank,
            None => 0,
        }
    }

    /// The verdict cached for a packet of `session` in direction `dir`, when one holds.
    #[inline(always)]
    fn cached(&self, session: &Session, dir: Dir, state: CtState) -> Option<Decision> {
        let generation = self.policy.map_or(0, |(_, header)| header.generation);
        cached_decision(session, dir, state, self.hook, self.ifindex, generation)
    }
}

/// What tracking concluded about one packet.
#[derive(Clone, Copy)]
struct Tracked {
    /// The packet's `ct state`.
    state: CtState,
    /// The packet starts a flow: the session in scratch is to be inserted if accepted.
    pending: bool,
    /// The session in scratch is built; false for a connection attempt, whose session is
    /// built only once the policy admits it.
    built: bool,
    /// The packet closed its session.
    closed: bool,
    /// The verdict cached in the packet's live session, when one holds.
    decision: Option<Decision>,
    /// The direction of the packet's live session whose verdict is to be cached once the
    /// policy has decided (no verdict held).
    cache_for: Option<Dir>,
}

impl Tracked {
    /// Decides the packet's verdict now and keeps it for [`finish`].
    #[inline(always)]
    fn decide<R: RuleSource>(&mut self, judge: &Judge<'_, R>, meta: &PacketMeta) -> Decision {
        let decision = judge.decide(meta, self.state);
        self.decision = Some(decision);
        decision
    }

    #[inline(always)]
    fn of(state: CtState) -> Tracked {
        Tracked {
            state,
            pending: false,
            built: true,
            closed: false,
            decision: None,
            cache_for: None,
        }
    }
}

/// What state sync sends a peer at once when it changes: the session's state and its
/// seen-reply and assured flags (the rest, timeouts and window edges, waits for the scan).
#[inline(always)]
pub fn sync_marks(session: &Session) -> u16 {
    ((session.state as u16) << 8)
        | (session.flags & (session_flags::SEEN_REPLY | session_flags::ASSURED)) as u16
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
fn track_packet<P, S, R, C, E, L, K>(
    pkt: &P,
    meta: &mut PacketMeta,
    key: &FlowKey,
    src_is_lo: bool,
    now: u64,
    settings: &Settings,
    judge: &Judge<'_, R>,
    sessions: &mut S,
    counters: &mut C,
    expectations: &mut E,
    limits: &mut L,
    sockets: &mut K,
    fresh: &mut Session,
    options: &mut OptionBytes,
) -> Tracked
where
    P: PacketBytes + ?Sized,
    S: SessionTable,
    R: RuleSource,
    C: Counters,
    E: Expectations,
    L: Limits,
    K: Sockets,
{
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
    let mut decision = None;
    let mut cache_for = None;
    let attempt = crate::presence::is_connection_attempt(meta);
    let found = if attempt && !sessions.may_hold(key) {
        None
    } else {
        sessions.get_mut(key)
    };
    if let Some(session) = found {
        if session.expires_ns > now {
            let dir = direction(session, src_is_lo);
            let state = state_for(session, dir);
            let was_closing = is_closing(session.state);
            let marks = sync_marks(session);
            pkt.syn_options_into(meta, options);
            match S::track(session, meta, dir, settings, now) {
                Ok(Update::Tracked) => {
                    cache_for = cacheable(meta).then_some(dir);
                    closed = meta.proto == proto::TCP && !was_closing && is_closing(session.state);
                    account(session, meta, dir);
                    mark_seen(session, meta, dir);
                    // Kept in the packet's metadata, which lives in map memory in the
                    // kernel: the verifier does not split its paths on a stored flag.
                    if settings.has(settings_flags::SYNC_EVENTS) && sync_marks(session) != marks {
                        meta.sync_changed = 1;
                    }
                    protect = session.flags & (session_flags::ASSURED | session_flags::PROTECTED)
                        == session_flags::ASSURED;
                    existing = Some(state);
                }
                Ok(Update::Ignored) => {
                    cache_for = cacheable(meta).then_some(dir);
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
            if let (Some(dir), Some(state)) = (cache_for, existing) {
                decision = judge.cached(session, dir, state);
                if decision.is_some() {
                    cache_for = None;
                }
            }
        } else {
            counters.count(Counter::SessionsExpiredInline);
            stale = true;
        }
        if closed || kill || stale {
            uncount(session, key, judge.bank(), limits);
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
            built: true,
            closed,
            decision,
            cache_for,
        };
    }
    let new_flow = |built| Tracked {
        state: CtState::New,
        pending: true,
        built,
        closed: false,
        decision: None,
        cache_for: None,
    };
    // A TCP packet of no session on a port the SYN-flood defence holds: what the host's
    // stack knows of its connection decides (only with `[syn_defence]` configured).
    if meta.proto == proto::TCP && settings.has(settings_flags::SYN_DEFENCE) {
        match defend(meta, judge.hook, now, sockets) {
            syn_defence::Verdict::Track => {}
            syn_defence::Verdict::Handshake => {
                counters.count(Counter::SynDefenceHandshake);
                return Tracked::of(if attempt {
                    CtState::New
                } else {
                    CtState::Established
                });
            }
            syn_defence::Verdict::PickUp => {
                pkt.syn_options_into(meta, options);
                return match start_session::<S>(fresh, meta, src_is_lo, true, settings, now) {
                    Ok(()) => {
                        counters.count(Counter::SynDefencePickedUp);
                        new_flow(true)
                    }
                    Err(reason) => {
                        counters.count(invalid_counter(reason));
                        Tracked::of(CtState::Invalid)
                    }
                };
            }
        }
    }
    // A UDP packet of no session that answers a request the host sent to a group
    // address: the only packets that pay for the expectation lookup.
    if meta.proto == proto::UDP
        && judge.hook == Hook::Ingress
        && answers_expectation(pkt, meta, judge.ifindex, now, expectations)
    {
        counters.count(Counter::ExpectationHits);
        return Tracked::of(CtState::Related);
    }
    // A connection attempt's session is built only once the policy admits it: under a SYN
    // flood the policy drops, building them is work thrown away. Building one never fails
    // (track's `a_connection_attempt_always_builds_its_session` checks it).
    if attempt {
        return new_flow(false);
    }
    pkt.syn_options_into(meta, options);
    match start_session::<S>(fresh, meta, src_is_lo, false, settings, now) {
        Ok(()) => new_flow(true),
        Err(reason) => {
            counters.count(invalid_counter(reason));
            Tracked::of(CtState::Invalid)
        }
    }
}

/// Applies the policy, builds (with `build`, when tracking left it unbuilt) and inserts an
/// admitted new session, counts the result.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn finish<S: SessionTable, R: RuleSource, C: Counters, L: Limits>(
    meta: &PacketMeta,
    key: Option<&FlowKey>,
    pending: Option<(&FlowKey, &mut Session)>,
    tracked: Tracked,
    judge: &Judge<'_, R>,
    sessions: &mut S,
    counters: &mut C,
    limits: &mut L,
    now: u64,
    build: impl FnOnce(&mut Session) -> Result<(), Invalid>,
) -> Outcome {
    let state = tracked.state;
    let mut outcome = Outcome {
        state,
        decision: match tracked.decision {
            Some(decision) => decision,
            None => judge.decide(meta, state),
        },
        created: false,
        closed: tracked.closed,
        fragment: false,
        overloaded: false,
    };
    // The one place the policy decides, so the kernel program holds one copy of the
    // classifier; a live session's verdict is cached here, after a second lookup that
    // only the first packet of each direction and generation pays.
    if let (Some(dir), Some(key)) = (tracked.cache_for, key)
        && let Some(session) = sessions.get_mut(key)
    {
        cache_decision(
            session,
            dir,
            state,
            judge.hook,
            judge.ifindex,
            &outcome.decision,
        );
    }
    counters.count(state_counter(state));
    let decision = &mut outcome.decision;
    counters.hit(decision.slot);
    if decision.action == Action::Accept
        && let Some((key, session)) = pending
    {
        if !tracked.built
            && let Err(reason) = build(session)
        {
            // Unreachable: a connection attempt always builds (see `track_packet`); were it
            // reached, the packet would be invalid and is dropped as such.
            counters.count(invalid_counter(reason));
            outcome.state = CtState::Invalid;
            decision.action = Action::Drop;
            counters.count(Counter::PacketsDropped);
            return outcome;
        }
        session.rule_id = decision.rule_id;
        session.origin_icmp_type = meta.icmp_type;
        session.origin_ifindex = judge.ifindex.to_ne_bytes();
        if judge.hook == Hook::Egress {
            session.flags |= session_flags::ORIGIN_EGRESS;
        }
        session.verdict_generation = decision.generation;
        if cacheable(meta) {
            cache_decision(
                session,
                Dir::Original,
                state,
                judge.hook,
                judge.ifindex,
                decision,
            );
        }
        if decision.limited {
            let bank = judge.bank();
            match limits.admit(bank, decision.rule_id, meta, now) {
                Admission::Unlimited => {}
                Admission::Counted => session.flags |= session_flags::COUNTED,
                Admission::Refused { overload } => {
                    counters.count(Counter::LimitRefused);
                    if overload {
                        let overloaded = limits.overload(bank, decision.rule_id, meta, now);
                        counters.count(if overloaded {
                            Counter::SourcesOverloaded
                        } else {
                            Counter::OverloadSetFull
                        });
                        outcome.overloaded = overloaded;
                    }
                    decision.action = Action::Drop;
                    counters.count(Counter::PacketsDropped);
                    counters.count(Counter::DropRule);
                    return outcome;
                }
            }
        }
        if sessions.insert(key, session) {
            counters.count(Counter::SessionsCreated);
            outcome.created = true;
        } else {
            uncount(session, key, judge.bank(), limits);
            counters.count(Counter::DropTableFull);
            decision.action = Action::Drop;
            counters.count(Counter::PacketsDropped);
            return outcome;
        }
    }
    count_fate(&outcome.decision, counters);
    outcome
}
