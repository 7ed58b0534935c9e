//! The sync datagram: a versioned header, session changes as session records
//! (docs/RECORDS.md) and an HMAC-SHA256 tag over everything before it (docs/SYNC.md).
//! Pure: encoding, decoding and authentication take bytes and give bytes.

use hmac::{Hmac, Mac as _};
use session_common::{
    record::{RECORD_LEN, RecordError, SessionRecord},
    wire::{FlowKey, TcpState, proto},
};
use sha2::Sha256;

/// First bytes of every sync datagram.
pub const MAGIC: [u8; 4] = *b"SSYN";
/// Version of the datagram layout; a receiver refuses other versions.
pub const VERSION: u8 = 1;
/// Bytes of the header.
pub const HEADER_LEN: usize = 64;
/// Bytes of the authentication tag at the end.
pub const TAG_LEN: usize = 32;
/// Bytes of an interface name in an entry (IFNAMSIZ less the NUL).
pub const IFACE_LEN: usize = 15;
/// Bytes of one entry: the operation, the interface name and the record.
pub const ENTRY_LEN: usize = 1 + IFACE_LEN + RECORD_LEN;
/// Entries in one datagram: the datagram stays below a 1500-byte link's MTU.
pub const MAX_ENTRIES: usize = 8;
/// The largest datagram a sender writes.
pub const MAX_DATAGRAM: usize = HEADER_LEN + MAX_ENTRIES * ENTRY_LEN + TAG_LEN;
// With IPv4's and UDP's headers (28 bytes) it fits a 1500-byte link unfragmented.
const _: () = assert!(MAX_DATAGRAM + 28 <= 1500);

/// What a datagram is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// "I am here": the sender's boot, and what it has received from the addressee.
    Hello = 1,
    /// Session changes under a sequence number.
    Data = 2,
    /// Acknowledgement only.
    Ack = 3,
}

/// Bits of [`Header::flags`] on data messages.
pub mod data_flags {
    /// The first message of a full resync: the receiver forgets, at its end, what it
    /// holds from the sender and the resync did not carry.
    pub const RESYNC_START: u32 = 1;
    /// The last message of a full resync.
    pub const RESYNC_END: u32 = 2;
}

/// The fixed part of a datagram.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// [`Kind`] as a number.
    pub kind: u8,
    /// The sender's boot id: random at each daemon start.
    pub boot: u64,
    /// The sender's stream: a new one begins with each full resync.
    pub stream: u32,
    /// [`data_flags`].
    pub flags: u32,
    /// Sequence number of a data message within its stream (from 1), 0 otherwise.
    pub seq: u64,
    /// Boot id of the addressee's stream being acknowledged (0: none yet).
    pub ack_boot: u64,
    /// Stream being acknowledged.
    pub ack_stream: u32,
    /// Every message of that stream up to this one has arrived (cumulative).
    pub ack_seq: u64,
    /// The sender's wall clock (ns since the epoch): a datagram of an earlier boot,
    /// replayed, is older than what the receiver already saw.
    pub wall_ns: u64,
}

/// One change to a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The session was created or changed: its record and the name of the interface of
    /// its first packet ("" when unknown).
    Upsert(SessionRecord, String),
    /// The session was deleted or expired.
    Delete(FlowKey),
}

/// A decoded, authenticated datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    /// Its header.
    pub header: Header,
    /// Its changes (data messages).
    pub changes: Vec<Change>,
}

/// Why a datagram was refused. Any of these: counted and dropped, nothing changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than a header and a tag, or longer than any sender writes.
    #[error("datagram of {0} bytes is not a sync message")]
    Length(usize),
    /// The tag does not match: another key, or tampered with.
    #[error("authentication failed (wrong key or tampered datagram)")]
    Authentication,
    /// Not a sync datagram, or another version.
    #[error("unknown magic or version")]
    Version,
    /// Unknown kind, operation, or an entry count that disagrees with the length.
    #[error("malformed datagram")]
    Malformed,
    /// An entry's record is not a session the kernel path could have made.
    #[error("invalid session record: {0}")]
    Record(RecordError),
}

/// The shared key of a sync link.
#[derive(Clone)]
pub struct SyncKey(Vec<u8>);

/// Fewest bytes a key file must hold: HMAC-SHA256 wants 32 bytes of entropy.
pub const MIN_KEY_LEN: usize = 32;

impl SyncKey {
    /// A key of these bytes; `None` when shorter than [`MIN_KEY_LEN`].
    pub fn new(bytes: &[u8]) -> Option<SyncKey> {
        (bytes.len() >= MIN_KEY_LEN).then(|| SyncKey(bytes.to_vec()))
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }
}

impl core::fmt::Debug for SyncKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("SyncKey(..)")
    }
}

/// Encodes and signs a datagram; at most [`MAX_ENTRIES`] changes.
pub fn encode(key: &SyncKey, header: &Header, changes: &[Change]) -> Vec<u8> {
    assert!(
        changes.len() <= MAX_ENTRIES,
        "too many changes for one datagram"
    );
    let mut out = Vec::with_capacity(HEADER_LEN + changes.len() * ENTRY_LEN + TAG_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(header.kind);
    out.extend_from_slice(&(changes.len() as u16).to_le_bytes());
    out.extend_from_slice(&header.boot.to_le_bytes());
    out.extend_from_slice(&header.stream.to_le_bytes());
    out.extend_from_slice(&header.flags.to_le_bytes());
    out.extend_from_slice(&header.seq.to_le_bytes());
    out.extend_from_slice(&header.ack_boot.to_le_bytes());
    out.extend_from_slice(&header.ack_stream.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&header.ack_seq.to_le_bytes());
    out.extend_from_slice(&header.wall_ns.to_le_bytes());
    debug_assert_eq!(out.len(), HEADER_LEN);
    for change in changes {
        let mut record = [0u8; RECORD_LEN];
        let mut iface = [0u8; IFACE_LEN];
        match change {
            Change::Upsert(session, name) => {
                out.push(1);
                let name = name.as_bytes();
                let len = name.len().min(IFACE_LEN);
                iface[..len].copy_from_slice(&name[..len]);
                session.encode(&mut record);
            }
            Change::Delete(key) => {
                out.push(2);
                delete_record(key).encode(&mut record);
            }
        }
        out.extend_from_slice(&iface);
        out.extend_from_slice(&record);
    }
    let tag = key.mac().chain_update(&out).finalize().into_bytes();
    out.extend_from_slice(&tag);
    out
}

/// The record a delete carries: the key, and the one state every protocol has that a
/// record may hold (TCP's CLOSE, otherwise unreplied); nothing else.
fn delete_record(key: &FlowKey) -> SessionRecord {
    SessionRecord {
        key: *key,
        state: if key.proto == proto::TCP {
            TcpState::Close as u8
        } else {
            0
        },
        rule: session_common::record::NO_NAME,
        origin_iface: session_common::record::NO_NAME,
        ..SessionRecord::default()
    }
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes[at..at + 2].try_into().expect("2 bytes"))
}
fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Authenticates, then decodes a datagram. The tag is checked first (in constant time),
/// so bytes from anyone without the key are never parsed further.
pub fn decode(key: &SyncKey, bytes: &[u8]) -> Result<Datagram, WireError> {
    if bytes.len() < HEADER_LEN + TAG_LEN || bytes.len() > MAX_DATAGRAM {
        return Err(WireError::Length(bytes.len()));
    }
    let (body, tag) = bytes.split_at(bytes.len() - TAG_LEN);
    key.mac()
        .chain_update(body)
        .verify_slice(tag)
        .map_err(|_| WireError::Authentication)?;
    if body[..4] != MAGIC || body[4] != VERSION {
        return Err(WireError::Version);
    }
    let kind = body[5];
    if !(Kind::Hello as u8..=Kind::Ack as u8).contains(&kind) || body[44..48] != [0; 4] {
        return Err(WireError::Malformed);
    }
    let count = u16_at(body, 6) as usize;
    if body.len() != HEADER_LEN + count * ENTRY_LEN || (count > 0 && kind != Kind::Data as u8) {
        return Err(WireError::Malformed);
    }
    let header = Header {
        kind,
        boot: u64_at(body, 8),
        stream: u32_at(body, 16),
        flags: u32_at(body, 20),
        seq: u64_at(body, 24),
        ack_boot: u64_at(body, 32),
        ack_stream: u32_at(body, 40),
        ack_seq: u64_at(body, 48),
        wall_ns: u64_at(body, 56),
    };
    if (kind == Kind::Data as u8) != (header.seq != 0) {
        return Err(WireError::Malformed);
    }
    let mut changes = Vec::with_capacity(count);
    for entry in body[HEADER_LEN..].chunks_exact(ENTRY_LEN) {
        let name = &entry[1..1 + IFACE_LEN];
        let record: &[u8; RECORD_LEN] = entry[1 + IFACE_LEN..].try_into().expect("entry size");
        let record = SessionRecord::decode(record).map_err(WireError::Record)?;
        changes.push(match entry[0] {
            1 => {
                let len = name.iter().position(|&b| b == 0).unwrap_or(IFACE_LEN);
                if name[len..].iter().any(|&b| b != 0) {
                    return Err(WireError::Malformed);
                }
                let name = core::str::from_utf8(&name[..len]).map_err(|_| WireError::Malformed)?;
                Change::Upsert(record, name.to_string())
            }
            2 if record == delete_record(&record.key) && name.iter().all(|&b| b == 0) => {
                Change::Delete(record.key)
            }
            _ => return Err(WireError::Malformed),
        });
    }
    Ok(Datagram { header, changes })
}

/// Keys for the sync module's tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use session_common::wire::{FAMILY_IPV4, FlowKey, proto};

    /// A TCP key from 198.18.0.1:`port` to 198.18.0.`last`:80.
    pub(crate) fn key_v4(last: u8, port: u16) -> FlowKey {
        let mut lo = [0u8; 16];
        lo[10] = 0xff;
        lo[11] = 0xff;
        lo[12..].copy_from_slice(&[198, 18, 0, 1]);
        let mut hi = lo;
        hi[15] = last;
        FlowKey {
            addr_lo: lo,
            addr_hi: hi,
            port_lo: port,
            port_hi: 80,
            proto: proto::TCP,
            family: FAMILY_IPV4,
            _pad: [0; 2],
        }
    }
}

#[cfg(test)]
mod tests {
    use session_common::wire::{TcpPeer, session_flags};

    use super::{tests_support::key_v4, *};

    fn record(last: u8) -> SessionRecord {
        SessionRecord {
            key: key_v4(last, 40000),
            state: TcpState::Established as u8,
            flags: session_flags::SEEN_REPLY | session_flags::ASSURED | session_flags::ORIG_IS_LO,
            rule: session_common::record::NO_NAME,
            origin_iface: session_common::record::NO_NAME,
            remaining_ns: 5_000_000_000,
            age_ns: 1_000,
            tcp: [TcpPeer {
                end: 1000,
                maxend: 2000,
                maxwin: 1000,
                maxack: 900,
                ..TcpPeer::default()
            }; 2],
            ..SessionRecord::default()
        }
    }

    fn sync_key(byte: u8) -> SyncKey {
        SyncKey::new(&[byte; 32]).expect("32 bytes")
    }

    fn header() -> Header {
        Header {
            kind: Kind::Data as u8,
            boot: 7,
            stream: 2,
            flags: data_flags::RESYNC_START,
            seq: 3,
            ack_boot: 9,
            ack_stream: 1,
            ack_seq: 44,
            wall_ns: 123,
        }
    }

    #[test]
    fn a_datagram_survives_encoding() {
        let changes = vec![
            Change::Upsert(record(2), "lan0".to_string()),
            Change::Delete(key_v4(3, 1234)),
        ];
        let bytes = encode(&sync_key(1), &header(), &changes);
        assert_eq!(bytes.len(), HEADER_LEN + 2 * ENTRY_LEN + TAG_LEN);
        let datagram = decode(&sync_key(1), &bytes).expect("decodes");
        assert_eq!(datagram.header, header());
        assert_eq!(datagram.changes, changes);
    }

    #[test]
    fn another_key_or_any_flipped_bit_is_refused() {
        let bytes = encode(&sync_key(1), &header(), &[Change::Delete(key_v4(3, 1))]);
        assert_eq!(decode(&sync_key(2), &bytes), Err(WireError::Authentication));
        for at in [0, 5, 30, HEADER_LEN + 3, bytes.len() - 1] {
            let mut tampered = bytes.clone();
            tampered[at] ^= 1;
            assert_eq!(
                decode(&sync_key(1), &tampered),
                Err(WireError::Authentication),
                "bit flipped at {at}"
            );
        }
        assert_eq!(
            decode(&sync_key(1), &bytes[..40]),
            Err(WireError::Length(40))
        );
    }

    #[test]
    fn signed_but_malformed_datagrams_are_refused() {
        let key = sync_key(1);
        let mut hello = header();
        hello.kind = Kind::Hello as u8;
        hello.seq = 0;
        assert!(
            decode(&key, &encode(&key, &hello, &[])).is_ok(),
            "a hello decodes"
        );
        let with_changes = encode(&key, &hello, &[Change::Delete(key_v4(3, 1))]);
        assert_eq!(decode(&key, &with_changes), Err(WireError::Malformed));
        let mut unknown = hello;
        unknown.kind = 9;
        assert_eq!(
            decode(&key, &encode(&key, &unknown, &[])),
            Err(WireError::Malformed)
        );
        let mut bad_record = record(2);
        bad_record.state = 0;
        assert_eq!(
            decode(
                &key,
                &encode(
                    &key,
                    &header(),
                    &[Change::Upsert(bad_record, String::new())]
                )
            ),
            Err(WireError::Record(RecordError::State(0)))
        );
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(SyncKey::new(&[1; 31]).is_none());
        assert!(SyncKey::new(&[1; 32]).is_some());
    }
}
