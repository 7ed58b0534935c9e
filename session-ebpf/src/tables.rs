//! BPF maps and the adapters that let session-common's engine use them.

use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::{
    Global,
    bindings::{
        __sk_buff, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP,
        BPF_RB_NO_WAKEUP, xdp_md,
    },
    helpers::generated::{bpf_ktime_get_coarse_ns, bpf_skb_load_bytes, bpf_xdp_load_bytes},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key as LpmKey},
    programs::{TcContext, XdpContext},
};
use session_common::{
    engine::{Counters, Outcome, RuleSource, Scratch, SessionTable},
    expect::{ExpectKey, Expectations},
    fragment::{DatagramEntry, DatagramKey, FragmentTable, MAX_FRAGMENT_DATAGRAMS},
    packet::{
        MAX_TCP_OPTION_BYTES, OptionBytes, PacketBytes, PacketMeta, ParseError, parse_common_case,
        parse_general, read_syn_options,
    },
    presence,
    rule_bitmaps::{
        ADDR_KEY_BANK_BITS, AddrDim, AddrKey, BitTables, IfaceKey, PortDim, PortIntervals,
        RuleBits, bits_slot, first_match_index,
    },
    sets::{MAX_SET_STORAGE, SET_KEY_STORAGE_BITS, SET_TRIE_ENTRIES, SetKey, SetRefs, SetValue},
    track::{Invalid, Update, decode_update, encode_update, update},
    wire::{
        Counter, CtState, DaemonCounter, Dir, EVENT_RING_BYTES, Event, FlowKey, Hook, MAX_RULES,
        PolicyHeader, RULE_HIT_SLOTS, Rule, RuleName, Session, Settings, session_flags,
        settings_flags,
    },
};

/// Default size; the loader overrides it from the config.
const DEFAULT_MAX_SESSIONS: u32 = 262_144;
/// Interfaces the daemon may attach to at once.
pub const MAX_MANAGED_IFACES: u32 = 256;

#[map]
static SESSIONS: HashMap<FlowKey, Session> = HashMap::pinned(DEFAULT_MAX_SESSIONS, 0);
#[map]
static UNASSURED: LruHashMap<FlowKey, Session> = LruHashMap::pinned(DEFAULT_MAX_SESSIONS / 4, 0);
#[map]
static RULES: Array<Rule> = Array::pinned(2 * MAX_RULES, 0);
#[map]
static POLICY: Array<PolicyHeader> = Array::pinned(2, 0);
#[map]
static ACTIVE_BANK: Array<u32> = Array::pinned(1, 0);
#[map]
static SETTINGS: Array<Settings> = Array::pinned(1, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);
#[map]
static RULE_HITS: PerCpuArray<u64> = PerCpuArray::pinned(RULE_HIT_SLOTS, 0);
#[map]
static RULE_NAMES: Array<RuleName> = Array::pinned(2 * MAX_RULES, 0);
#[map]
static DAEMON_COUNTERS: Array<u64> = Array::pinned(DaemonCounter::COUNT, 0);
#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
#[map]
static MANAGED_IFACES: HashMap<u32, u8> = HashMap::pinned(MAX_MANAGED_IFACES, 0);
#[map]
static EVENTS: RingBuf = RingBuf::pinned(EVENT_RING_BYTES, 0);
#[map]
static RULE_BITS: Array<RuleBits> = Array::pinned(2 * bits_slot::BANK_SLOTS, 0);
#[map]
static PORT_INTERVALS: Array<PortIntervals> = Array::pinned(4, 0);
#[map]
static IFACE_BITS: HashMap<IfaceKey, RuleBits> = HashMap::pinned(CLASSIFY_KEYED_ENTRIES, 0);
#[map]
static SRC_NETS: LpmTrie<AddrKey, RuleBits> = LpmTrie::pinned(CLASSIFY_KEYED_ENTRIES, 0);
#[map]
static DST_NETS: LpmTrie<AddrKey, RuleBits> = LpmTrie::pinned(CLASSIFY_KEYED_ENTRIES, 0);
#[map]
static PRESENCE: Array<u64> =
    Array::pinned(presence::words(presence::MIN_SLOT_BITS), BPF_F_MMAPABLE);
#[map]
static PRESENCE_BANK: Array<u32> = Array::pinned(1, 0);
/// Replies the host's broadcast and multicast requests wait for (`expect`), to their
/// expiry. Only requests the host sends add entries, and the LRU evicts the oldest when
/// full, so replies, spoofed or not, can never fill it. Not pinned: entries live seconds,
/// and a restarted daemon's host simply asks again.
#[map]
static EXPECTATIONS: LruHashMap<ExpectKey, u64> = LruHashMap::with_max_entries(MAX_EXPECTATIONS, 0);

/// Outstanding broadcast and multicast requests remembered at once: far more than a host
/// has in flight (a DHCP client has one or two transactions, a resolver a few queries).
const MAX_EXPECTATIONS: u32 = 1024;
/// Every named set's prefixes (`session_common::sets`). LPM tries allocate per prefix
/// (`BPF_F_NO_PREALLOC`), so the bound costs nothing until used.
#[map]
pub(crate) static SET_NETS: LpmTrie<SetKey, SetValue> = LpmTrie::pinned(SET_TRIE_ENTRIES, 0);
/// The sets' single addresses (/32, /128), by storage and address: at a million prefixes
/// the trie's walk to a host is some twenty nodes deep, a hash lookup one step. The loader
/// sizes it from `[limits] max_set_entries`; a host that finds it full goes to `SET_NETS`.
/// Not preallocated: an entry costs memory only once stored (the buckets do at once).
#[map]
pub(crate) static SET_HOSTS: HashMap<SetKey, SetValue> = HashMap::pinned(1, BPF_F_NO_PREALLOC);
#[map]
pub(crate) static SET_REFS: Array<SetRefs> = Array::pinned(2, 0);
/// Read only by user space; declared here so the loader creates and pins it.
#[map]
pub(crate) static SET_INFO: Array<session_common::sets::SetInfo> =
    Array::pinned(MAX_SET_STORAGE, 0);
/// Datagrams in flight whose later fragments follow their first (`session_common::fragment`).
/// Not pinned: a record lives for one datagram, and a restart that loses it sends the
/// datagram's later fragments to the kernel unjudged, which reassembles them only with the
/// first fragment this program let through.
#[map]
static FRAGMENTS: LruHashMap<DatagramKey, DatagramEntry> =
    LruHashMap::with_max_entries(MAX_FRAGMENT_DATAGRAMS, 0);

/// Entries of the keyed classifier tables: per bank, one per rule entry plus the catch-all
/// (interface 0, network ::/0).
const CLASSIFY_KEYED_ENTRIES: u32 = 2 * (MAX_RULES + 1);

/// Reports what the daemon and `session events` want to know about this packet: a session
/// created or closed, or a decision of a `log = true` rule. A full ring buffer loses the
/// event (counted) and never delays the packet. The daemon is not woken for each event
/// (at thousands of connections a second, that is thousands of wake-ups competing with
/// the traffic): it drains the ring on a timer, and is woken when the ring is half full,
/// or, while state sync waits for new sessions, when an event lands in an empty ring.
#[inline(always)]
pub fn report(
    meta: &PacketMeta,
    outcome: &Outcome,
    hook: Hook,
    ifindex: u32,
    now: u64,
    settings: &Settings,
) {
    let kind = outcome.event_kind(meta);
    if kind == 0 {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        BpfCounters.count(Counter::EventsLost);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved ring-buffer record of `Event` size; every field
    // is written before it is submitted.
    unsafe {
        (*event).time_ns = now;
        (*event).src = meta.src;
        (*event).dst = meta.dst;
        (*event).sport = meta.sport;
        (*event).dport = meta.dport;
        (*event).rule_id = outcome.decision.rule_id;
        (*event).kind = kind;
        (*event).proto = meta.proto;
        (*event).family = meta.family;
        (*event).state = outcome.state as u8;
        (*event).action = outcome.decision.action as u8;
        (*event).hook = hook as u8;
        (*event).ifindex = ifindex;
    }
    let wake = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) > EVENT_RING_BYTES as u64 / 2 {
        BPF_RB_FORCE_WAKEUP
    } else if settings.flags & settings_flags::SYNC_EVENTS != 0 {
        // The kernel's adaptive wake-up: only if the daemon had read everything before.
        0
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(wake as u64);
}

/// The settings the daemon wrote.
#[inline(always)]
pub fn settings() -> Option<&'static Settings> {
    SETTINGS.get(0)
}

/// This CPU's working memory for the packet being processed.
#[inline(always)]
pub fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: the pointer is to this CPU's entry of a per-CPU map, valid while the program
    // runs; a program runs to the end on one CPU without preemption by another program
    // of this object, and each program takes the scratch entry once, so this is the only
    // reference to it.
    SCRATCH.get_ptr_mut(0).map(|ptr| unsafe { &mut *ptr })
}

/// Whether an ingress program (XDP or TC) runs on `ifindex`, so it already tracked the
/// packet.
#[inline(always)]
pub fn is_managed(ifindex: u32) -> bool {
    // SAFETY: `get` is unsafe because another CPU may update the value under the returned
    // reference; only whether an entry exists is used, not the value.
    unsafe { MANAGED_IFACES.get(ifindex).is_some() }
}

/// An XDP frame. The program is not loaded for multi-buffer frames, so the kernel only
/// gives it linear frames: every byte lies between `data` and `data_end`.
pub struct XdpBytes<'a>(pub &'a XdpContext);

impl PacketBytes for XdpBytes<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.data_end() - self.0.data()
    }

    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        // Through the helper: the verifier accepts a direct read at a variable offset
        // only by tracking every packet-pointer range, which took it past its limit
        // across the parser's paths when that was tried.
        let mut buf = MaybeUninit::<[u8; N]>::uninit();
        // SAFETY: the helper writes at most N bytes into `buf`, which holds N.
        let ret = unsafe {
            bpf_xdp_load_bytes(
                self.0.ctx,
                offset as u32,
                buf.as_mut_ptr() as *mut c_void,
                N as u32,
            )
        };
        // SAFETY: the helper filled all N bytes when it returned 0.
        (ret == 0).then(|| unsafe { buf.assume_init() })
    }

    #[inline(always)]
    fn head<const N: usize>(&self) -> Option<&[u8; N]> {
        direct_head(self.0.data(), self.0.data_end())
    }

    #[inline(always)]
    fn parse_into(&self, meta: &mut PacketMeta) -> Result<(), ParseError> {
        if parse_common_case(self, meta) {
            return Ok(());
        }
        decode_parse(session_parse_xdp(self.0.ctx, meta))
    }

    #[inline(always)]
    fn syn_options_into(&self, meta: &mut PacketMeta, room: &mut OptionBytes) {
        if meta.tcp_options_at != 0 {
            session_syn_options_xdp(self.0.ctx, meta, room);
        }
    }

    #[inline(always)]
    fn load_options(
        &self,
        offset: usize,
        len: usize,
        buf: &mut [u8; MAX_TCP_OPTION_BYTES],
    ) -> bool {
        let Some(len) = option_load_len(len) else {
            return false;
        };
        // SAFETY: the helper writes `len` bytes into `buf`, at most its size (checked above).
        let ret = unsafe {
            bpf_xdp_load_bytes(
                self.0.ctx,
                offset as u32,
                buf.as_mut_ptr() as *mut c_void,
                len,
            )
        };
        ret == 0
    }
}

/// `len` as the option loads pass it to their helper, when it is 1 to
/// [`MAX_TCP_OPTION_BYTES`]. The range check is on an opaque `len - 1`, and the length is
/// made from it after: LLVM can prove the check from the header length's own checks and
/// would drop it, and Linux 6.1's verifier then sees a length that may be negative or
/// zero (later verifiers follow the proof themselves).
#[inline(always)]
fn option_load_len(len: usize) -> Option<u32> {
    let below = session_common::opaque(len.wrapping_sub(1));
    if below >= MAX_TCP_OPTION_BYTES {
        return None;
    }
    Some(below as u32 + 1)
}

/// The general parser of an XDP frame, for the frames the common case inlined in
/// `parse_into` refuses, as a global BPF function (exported, so its BTF linkage is
/// global): the verifier checks it once, on its own, and the program after it sees only
/// its answer, where an inlined general parser makes the verifier walk everything after
/// it again for each of its many paths. Returns [`parse_encoded`]'s code.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn session_parse_xdp(ctx: *mut xdp_md, meta: *mut PacketMeta) -> i32 {
    parse_encoded(&XdpBytes(&XdpContext::new(ctx)), meta)
}

/// [`session_parse_xdp`] for the TC program's socket buffers.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn session_parse_skb(skb: *mut __sk_buff, meta: *mut PacketMeta) -> i32 {
    parse_encoded(&SkbBytes(&TcContext::new(skb)), meta)
}

/// A SYN's options read into `meta` ([`read_syn_options`]), as a global BPF function for
/// the reason [`session_parse_xdp`] is one: the tracker reaches the read on several paths.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn session_syn_options_xdp(
    ctx: *mut xdp_md,
    meta: *mut PacketMeta,
    room: *mut OptionBytes,
) -> i32 {
    syn_options(&XdpBytes(&XdpContext::new(ctx)), meta, room)
}

/// [`session_syn_options_xdp`] for the TC programs' socket buffers.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn session_syn_options_skb(
    skb: *mut __sk_buff,
    meta: *mut PacketMeta,
    room: *mut OptionBytes,
) -> i32 {
    syn_options(&SkbBytes(&TcContext::new(skb)), meta, room)
}

/// [`read_syn_options`] on what a global function is handed; 0 always (a global
/// function returns a scalar).
#[inline(always)]
fn syn_options<P: PacketBytes>(pkt: &P, meta: *mut PacketMeta, room: *mut OptionBytes) -> i32 {
    // SAFETY: the caller passes its packet metadata and its scratch room; the verifier
    // only knows they may be null.
    if let (Some(meta), Some(room)) = unsafe { (meta.as_mut(), room.as_mut()) } {
        read_syn_options(pkt, meta, room);
    }
    0
}

/// Parses `pkt` into `meta` on the general path and answers as a global function can: 0
/// when parsed, else 1 + the error.
#[inline(always)]
fn parse_encoded<P: PacketBytes>(pkt: &P, meta: *mut PacketMeta) -> i32 {
    // SAFETY: the caller passes its packet metadata; the verifier only knows it may be null.
    let result = match unsafe { meta.as_mut() } {
        Some(meta) => parse_general(pkt, meta),
        None => Err(ParseError::Malformed),
    };
    match result {
        Ok(()) => 0,
        Err(error) => 1 + error as i32,
    }
}

/// The inverse of [`parse_encoded`]'s code; an unknown code is a malformed frame.
#[inline(always)]
fn decode_parse(code: i32) -> Result<(), ParseError> {
    match code {
        0 => Ok(()),
        1 => Err(ParseError::NotIp),
        3 => Err(ParseError::Fragment),
        4 => Err(ParseError::FirstFragment),
        5 => Err(ParseError::TinyFragment),
        _ => Err(ParseError::Malformed),
    }
}

/// The first `N` bytes between `data` and `data_end`, read in place: at a fixed offset
/// the verifier checks one bound.
#[inline(always)]
fn direct_head<'a, const N: usize>(data: usize, data_end: usize) -> Option<&'a [u8; N]> {
    if data + N > data_end {
        return None;
    }
    // SAFETY: the N bytes from `data` are packet memory, valid while the program runs.
    Some(unsafe { &*(data as *const [u8; N]) })
}

/// A socket buffer, read through `bpf_skb_load_bytes` except for its first bytes, which
/// are read in place when they lie in its linear part.
pub struct SkbBytes<'a>(pub &'a TcContext);

impl PacketBytes for SkbBytes<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len() as usize
    }

    #[inline(always)]
    fn head<const N: usize>(&self) -> Option<&[u8; N]> {
        direct_head(self.0.data(), self.0.data_end())
    }

    #[inline(always)]
    fn parse_into(&self, meta: &mut PacketMeta) -> Result<(), ParseError> {
        if parse_common_case(self, meta) {
            return Ok(());
        }
        decode_parse(session_parse_skb(self.0.skb.skb, meta))
    }

    #[inline(always)]
    fn syn_options_into(&self, meta: &mut PacketMeta, room: &mut OptionBytes) {
        if meta.tcp_options_at != 0 {
            session_syn_options_skb(self.0.skb.skb, meta, room);
        }
    }

    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        // Uninitialised, as in `XdpBytes::load`.
        let mut buf = MaybeUninit::<[u8; N]>::uninit();
        // SAFETY: the helper writes at most N bytes into `buf`, which holds N.
        let ret = unsafe {
            bpf_skb_load_bytes(
                self.0.skb.skb as *const c_void,
                offset as u32,
                buf.as_mut_ptr() as *mut c_void,
                N as u32,
            )
        };
        // SAFETY: the helper filled all N bytes when it returned 0.
        (ret == 0).then(|| unsafe { buf.assume_init() })
    }

    #[inline(always)]
    fn load_options(
        &self,
        offset: usize,
        len: usize,
        buf: &mut [u8; MAX_TCP_OPTION_BYTES],
    ) -> bool {
        let Some(len) = option_load_len(len) else {
            return false;
        };
        // SAFETY: the helper writes `len` bytes into `buf`, at most its size (checked above).
        let ret = unsafe {
            bpf_skb_load_bytes(
                self.0.skb.skb as *const c_void,
                offset as u32,
                buf.as_mut_ptr() as *mut c_void,
                len,
            )
        };
        ret == 0
    }
}

/// Slots per bank of the presence filter as a power of two, which the loader sets for the
/// configured capacity (`presence::slot_bits_for`) when it sizes `PRESENCE`. Left at 0,
/// as by the benchmarks' loader, the filter is off.
#[unsafe(no_mangle)]
static PRESENCE_SLOT_BITS: Global<u32> = Global::new(0);

/// [`PRESENCE_SLOT_BITS`] when the filter is on.
#[inline(always)]
fn presence_slot_bits() -> Option<u32> {
    let bits = PRESENCE_SLOT_BITS.load();
    (presence::MIN_SLOT_BITS..=presence::MAX_SLOT_BITS)
        .contains(&bits)
        .then_some(bits)
}

/// Sets the slot of `key` in both banks of the presence filter, after a session was
/// stored under it.
#[inline(always)]
fn mark_present(key: &FlowKey) {
    let Some(bits) = presence_slot_bits() else {
        return;
    };
    let slot = presence::slot(key, bits);
    for bank in 0..2 {
        let offset = presence::byte_offset(bank, slot, bits);
        if let Some(word) = PRESENCE.get_ptr_mut(offset / 8) {
            // SAFETY: the byte lies within the map's 8-byte value at `word`, which lives as
            // long as the program. A byte store leaves the word's other slots alone.
            unsafe {
                word.cast::<u8>()
                    .add((offset % 8) as usize)
                    .write_volatile(1)
            };
        }
    }
}

/// The tracker as a global BPF function, for the reason [`session_parse_xdp`] is one: the
/// verifier checks the TCP state machine once, not once for every path that reaches it.
/// `dir` is a [`Dir`] as an integer; returns [`encode_update`]'s code.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn session_track(
    session: *mut Session,
    meta: *const PacketMeta,
    dir: u32,
    settings: *const Settings,
    now: u64,
) -> i32 {
    // SAFETY: the callers pass a session, the packet's metadata and the settings from
    // their maps; the verifier only knows each may be null.
    let (Some(session), Some(meta), Some(settings)) =
        (unsafe { (session.as_mut(), meta.as_ref(), settings.as_ref()) })
    else {
        return encode_update(Err(Invalid::TcpState));
    };
    let dir = if dir == Dir::Reply as u32 {
        Dir::Reply
    } else {
        Dir::Original
    };
    encode_update(update(session, meta, dir, settings, now))
}

/// The two pinned session maps, protected (assured) and unassured, behind the presence
/// filter for connection attempts.
pub struct BpfSessions;

impl SessionTable for BpfSessions {
    /// Whether the presence filter's active bank has the slot of `key` set; true when the
    /// filter is off or cannot be read, so that only a clear slot skips the lookups. Byte
    /// `i` of a word is its bits `8i..8i+8`: the object is little-endian, like the hosts
    /// that load it.
    #[inline(always)]
    fn may_hold(&self, key: &FlowKey) -> bool {
        let (Some(bits), Some(bank)) = (presence_slot_bits(), PRESENCE_BANK.get(0)) else {
            return true;
        };
        let offset = presence::byte_offset(*bank, presence::slot(key, bits), bits);
        PRESENCE
            .get(offset / 8)
            .is_none_or(|word| (word >> (8 * (offset % 8))) & 0xff != 0)
    }

    #[inline(always)]
    fn track(
        session: &mut Session,
        meta: &PacketMeta,
        dir: Dir,
        settings: &Settings,
        now: u64,
    ) -> Result<Update, Invalid> {
        decode_update(session_track(session, meta, dir as u32, settings, now))
    }

    #[inline(always)]
    fn get_mut(&mut self, key: &FlowKey) -> Option<&mut Session> {
        SESSIONS
            .get_ptr_mut(key)
            .or_else(|| UNASSURED.get_ptr_mut(key))
            // SAFETY: a map value, valid while the program runs (hash map values are freed
            // only after an RCU grace period) and borrowed from `self` so this program holds
            // no other reference to it. Another CPU may write the same session meanwhile,
            // as the kernel's own conntrack races on a flow's packets; the engine only
            // reads and writes plain integers there.
            .map(|ptr| unsafe { &mut *ptr })
    }

    #[inline(always)]
    fn insert(&mut self, key: &FlowKey, session: &Session) -> bool {
        let stored = UNASSURED.insert(key, session, 0).is_ok();
        if stored {
            mark_present(key);
        }
        stored
    }

    #[inline(always)]
    fn remove(&mut self, key: &FlowKey) {
        let _ = SESSIONS.remove(key);
        let _ = UNASSURED.remove(key);
    }

    #[inline(always)]
    fn protect(&mut self, key: &FlowKey) -> bool {
        let Some(ptr) = UNASSURED.get_ptr_mut(key) else {
            return false;
        };
        // SAFETY: as in `get_mut`: a map value valid while the program runs, referenced
        // nowhere else in this program.
        let session = unsafe { &mut *ptr };
        session.flags |= session_flags::PROTECTED;
        // By reference: a by-value copy would put 120 more bytes on the BPF stack.
        let stored: &Session = session;
        if SESSIONS.insert(key, stored, 0).is_err() {
            session.flags &= !session_flags::PROTECTED;
            return false;
        }
        mark_present(key);
        let _ = UNASSURED.remove(key);
        true
    }
}

/// The fragment records, an LRU map: a flood of first fragments evicts the oldest.
pub struct BpfFragments;

impl FragmentTable for BpfFragments {
    #[inline(always)]
    fn get(&self, key: &DatagramKey) -> Option<&DatagramEntry> {
        // SAFETY: the record is map memory, valid while the program runs; a concurrent
        // update on another CPU can only change its fields, all plain integers.
        unsafe { FRAGMENTS.get(key) }
    }

    #[inline(always)]
    fn insert(&mut self, key: &DatagramKey, entry: &DatagramEntry) {
        let _ = FRAGMENTS.insert(key, entry, 0);
    }

    #[inline(always)]
    fn remove(&mut self, key: &DatagramKey) {
        let _ = FRAGMENTS.remove(key);
    }
}

/// The two policy banks and the active-bank switch.
pub struct BpfRules;

impl RuleSource for BpfRules {
    #[inline(always)]
    fn header(&self) -> Option<(u32, &PolicyHeader)> {
        let bank = *ACTIVE_BANK.get(0)? & 1;
        Some((bank, POLICY.get(bank)?))
    }

    #[inline(always)]
    fn first_match(
        &self,
        bank: u32,
        count: u32,
        meta: &PacketMeta,
        state: CtState,
        hook: Hook,
        ifindex: u32,
    ) -> Option<&Rule> {
        let selector = state as u32 | (hook as u32) << 8;
        let index = session_rule_search(meta, bank, count, selector, ifindex);
        if index == NOT_FOUND {
            return None;
        }
        RULES.get((bank & 1) * MAX_RULES + (index & (MAX_RULES - 1)))
    }
}

/// Marks "no rule matched" in [`session_rule_search`]'s answer.
const NOT_FOUND: u32 = u32::MAX;

/// The classifier as a global BPF function (its BTF linkage is global because it is
/// exported): the verifier checks it once, on its own, where an inlined classifier is
/// checked again for every path the tracker takes to reach it, which took the program
/// past the 1M-instruction limit. So its arguments are plain numbers it must check, and
/// a pointer to the packet the verifier knows the size of; BPF passes at most five, so
/// `selector` carries the ct state in its low byte and the hook in the next. Returns the
/// index of the first matching entry, or [`NOT_FOUND`].
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn session_rule_search(
    meta: *const PacketMeta,
    bank: u32,
    count: u32,
    selector: u32,
    ifindex: u32,
) -> u32 {
    let Some(&state) = CtState::ALL.get((selector & 0xff) as usize) else {
        return NOT_FOUND;
    };
    // SAFETY: the caller passes its packet; the verifier only knows it may be null.
    let Some(meta) = (unsafe { meta.as_ref() }) else {
        return NOT_FOUND;
    };
    let hook = if selector >> 8 == Hook::Egress as u32 {
        Hook::Egress
    } else {
        Hook::Ingress
    };
    first_match_index(&BpfBitTables, bank, count, meta, state, hook, ifindex).unwrap_or(NOT_FOUND)
}

/// The classifier's bitmap maps (see `session_common::rule_bitmaps`).
struct BpfBitTables;

impl BitTables for BpfBitTables {
    #[inline(always)]
    fn bits(&self, bank: u32, slot: u32) -> Option<&RuleBits> {
        RULE_BITS.get((bank & 1) * bits_slot::BANK_SLOTS + slot)
    }

    #[inline(always)]
    fn iface_bits(&self, bank: u32, ifindex: u32) -> Option<&RuleBits> {
        // SAFETY: `get` is unsafe because the daemon may write the value under the
        // reference; it writes a bank only while that bank is inactive (`apply_policy`
        // switches banks after), so packets read values that stay put.
        unsafe {
            IFACE_BITS.get(IfaceKey {
                bank: bank & 1,
                ifindex,
            })
        }
    }

    #[inline(always)]
    fn addr_bits(&self, dim: AddrDim, bank: u32, addr: &[u8; 16]) -> Option<&RuleBits> {
        let key = LpmKey::new(
            ADDR_KEY_BANK_BITS + 128,
            AddrKey {
                bank: bank & 1,
                addr: *addr,
            },
        );
        match dim {
            AddrDim::Source => SRC_NETS.get(&key),
            AddrDim::Destination => DST_NETS.get(&key),
        }
    }

    #[inline(always)]
    fn port_intervals(&self, bank: u32, dim: PortDim) -> Option<&PortIntervals> {
        PORT_INTERVALS.get((bank & 1) * 2 + dim as u32)
    }

    #[inline(always)]
    fn entry(&self, bank: u32, index: u32) -> Option<&Rule> {
        RULES.get((bank & 1) * MAX_RULES + (index & (MAX_RULES - 1)))
    }

    #[inline(always)]
    fn set_refs(&self, bank: u32) -> Option<&SetRefs> {
        SET_REFS.get(bank & 1)
    }

    #[inline(always)]
    #[allow(
        clippy::needless_borrows_for_generic_args,
        reason = "keys passed by value are copied, and the verifier then walked more for the XDP program: 370,671 against 301,731 instructions on Linux 6.1, 399,918 against 390,898 on 6.18"
    )]
    fn set_member(&self, storage: u32, addr: &[u8; 16]) -> bool {
        let key = SetKey {
            storage: storage & (MAX_SET_STORAGE - 1),
            addr: *addr,
        };
        // The trie first: it holds the networks (and a few spilled hosts) and stays small
        // and shallow, so a network's member costs no hash lookup, and a host's member
        // one short walk more. Either map's live entry makes a member.
        live_set_value(
            SET_NETS
                .get(&LpmKey::new(SET_KEY_STORAGE_BITS + 128, key))
                .copied(),
        ) || {
            // SAFETY: the value is copied out at once, while the program holds the RCU
            // read lock that keeps the entry alive.
            live_set_value(unsafe { SET_HOSTS.get(&key) }.copied())
        }
    }
}

/// Whether a set prefix's value (if one was found) still counts; the clock is read only
/// for prefixes that expire (ban lists).
#[inline(always)]
fn live_set_value(value: Option<SetValue>) -> bool {
    match value {
        Some(value) => {
            value.expires_ns == 0
                // SAFETY: a helper without arguments.
                || value.live(unsafe { bpf_ktime_get_coarse_ns() })
        }
        None => false,
    }
}

/// The per-CPU counter arrays.
pub struct BpfCounters;

impl Counters for BpfCounters {
    #[inline(always)]
    fn count(&mut self, counter: Counter) {
        if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
            // SAFETY: this CPU's counter in a per-CPU map, valid while the program runs and
            // written by no other CPU.
            unsafe { *slot += 1 };
        }
    }

    #[inline(always)]
    fn hit(&mut self, slot: u32) {
        if let Some(counter) = RULE_HITS.get_ptr_mut(slot) {
            // SAFETY: as in `count`: this CPU's slot of a per-CPU map.
            unsafe { *counter += 1 };
        }
    }
}

/// The expectations in their LRU map.
pub struct BpfExpectations;

impl Expectations for BpfExpectations {
    #[inline(always)]
    fn expect(&mut self, key: &ExpectKey, expires_ns: u64) {
        // A failed insert (no memory) leaves the reply unexpected: it is then NEW, which
        // the policy decides, as without expectations.
        let _ = EXPECTATIONS.insert(key, expires_ns, 0);
    }

    #[inline(always)]
    fn expiry(&mut self, key: &ExpectKey) -> Option<u64> {
        // SAFETY: the value is copied out at once; a concurrent update can only make it
        // another valid expiry.
        unsafe { EXPECTATIONS.get(key).copied() }
    }
}
