//! The saved-table file of `session save` / `session restore` (docs/RECORDS.md): a header,
//! the string tables the records index, the records, and a CRC-32 of all of it.
//!
//! Decoding checks everything (magic, versions, lengths, every record, the checksum)
//! before the caller may change anything, so a damaged file, one from another format
//! version or one too large for the table is refused whole.

use std::{io::Write as _, path::Path};

use session_common::record::{NO_NAME, RECORD_LEN, RECORD_VERSION, RecordError, SessionRecord};
use thiserror::Error;

/// First bytes of every saved table.
pub const MAGIC: [u8; 8] = *b"SESSTAB\0";
/// Version of the container (header and string tables). The records have their own
/// version ([`RECORD_VERSION`]); a reader refuses a file when either differs.
pub const FILE_VERSION: u16 = 1;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 40;
/// Longest name a string table holds (rule names are at most 64 bytes, interface names
/// 15).
const MAX_NAME_LEN: usize = 64;
/// Most names a string table holds (rules and interfaces are far fewer).
const MAX_NAMES: u32 = 65_534;

/// A saved session table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableFile {
    /// Wall-clock time of the save, in nanoseconds since the Unix epoch: a restore
    /// subtracts the time the file waited from each session's remaining time.
    pub saved_unix_ns: u64,
    /// Names of the rules that admitted the sessions ([`SessionRecord::rule`] indexes it).
    pub rules: Vec<String>,
    /// Names of the interfaces the sessions' first packets crossed
    /// ([`SessionRecord::origin_iface`] indexes it).
    pub ifaces: Vec<String>,
    /// The sessions.
    pub records: Vec<SessionRecord>,
}

/// Why a file is not a table this version can restore.
#[derive(Debug, Error)]
pub enum FileError {
    /// Not a saved table at all.
    #[error("not a session table file (it does not start with the magic bytes of `session save`)")]
    Magic,
    /// Written by another version of the format.
    #[error(
        "saved in format version {found_file}/record version {found_record}; this session reads {FILE_VERSION}/{RECORD_VERSION} only: restore it with the version that saved it"
    )]
    Version {
        /// The file's container version.
        found_file: u16,
        /// The file's record version.
        found_record: u16,
    },
    /// The record length in the header does not match the record version.
    #[error("records of {0} bytes, but this record version has {RECORD_LEN}")]
    RecordLen(u16),
    /// Shorter or longer than its header says.
    #[error(
        "the file is {found} bytes, its header says {expected}: it was cut short or appended to"
    )]
    Length {
        /// Bytes the header implies.
        expected: u64,
        /// Bytes there are.
        found: u64,
    },
    /// The checksum does not match the contents.
    #[error(
        "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is damaged"
    )]
    Checksum {
        /// The checksum at the end of the file.
        stored: u32,
        /// The checksum of the contents.
        computed: u32,
    },
    /// A string table entry is not valid.
    #[error("string table entry {index} is not a valid name")]
    Name {
        /// Position in the file's string tables.
        index: usize,
    },
    /// A record does not describe a valid session.
    #[error("record {index} is invalid: {source}")]
    Record {
        /// Position of the record.
        index: u64,
        /// What is wrong with it.
        source: RecordError,
    },
    /// A record indexes a name that is not in the table.
    #[error("record {index} names a rule or interface the file's tables do not hold")]
    Dangling {
        /// Position of the record.
        index: u64,
    },
    /// More sessions than the table can hold.
    #[error(
        "the file holds {count} sessions, more than this table's max_sessions ({capacity}): raise `[limits] max_sessions` (then `session down` and start again) to restore it"
    )]
    TooMany {
        /// Sessions in the file.
        count: u64,
        /// Sessions the table holds.
        capacity: u64,
    },
}

/// Little-endian cursor over the file's bytes; running out is a length error.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FileError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len());
        let Some(end) = end else {
            return Err(FileError::Length {
                expected: (self.at + n) as u64 + 4,
                found: self.bytes.len() as u64 + 4,
            });
        };
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u16(&mut self) -> Result<u16, FileError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, FileError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, FileError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

impl TableFile {
    /// The file's bytes (docs/RECORDS.md).
    pub fn encode(&self) -> Vec<u8> {
        let names_len: usize = self
            .rules
            .iter()
            .chain(&self.ifaces)
            .map(|name| 1 + name.len().min(MAX_NAME_LEN))
            .sum();
        let mut out =
            Vec::with_capacity(HEADER_LEN + names_len + self.records.len() * RECORD_LEN + 4);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FILE_VERSION.to_le_bytes());
        out.extend_from_slice(&RECORD_VERSION.to_le_bytes());
        out.extend_from_slice(&(RECORD_LEN as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.saved_unix_ns.to_le_bytes());
        out.extend_from_slice(&(self.records.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.rules.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.ifaces.len() as u32).to_le_bytes());
        debug_assert_eq!(out.len(), HEADER_LEN);
        for name in self.rules.iter().chain(&self.ifaces) {
            let bytes = &name.as_bytes()[..name.len().min(MAX_NAME_LEN)];
            out.push(bytes.len() as u8);
            out.extend_from_slice(bytes);
        }
        let mut record = [0u8; RECORD_LEN];
        for session in &self.records {
            session.encode(&mut record);
            out.extend_from_slice(&record);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// The most bytes a file for a table of `capacity` sessions can have (full name
    /// tables): a larger file is refused before it is read into memory.
    pub fn max_len(capacity: u64) -> u64 {
        (HEADER_LEN as u64 + 4)
            .saturating_add(2 * u64::from(MAX_NAMES) * (1 + MAX_NAME_LEN as u64))
            .saturating_add(capacity.saturating_mul(RECORD_LEN as u64))
    }

    /// Reads and checks a whole file; `capacity` is how many sessions the table holds.
    pub fn decode(bytes: &[u8], capacity: u64) -> Result<TableFile, FileError> {
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            return Err(FileError::Magic);
        }
        if bytes.len() < HEADER_LEN + 4 {
            return Err(FileError::Length {
                expected: (HEADER_LEN + 4) as u64,
                found: bytes.len() as u64,
            });
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let mut c = Cursor { bytes: body, at: 8 };
        let found_file = c.u16()?;
        let found_record = c.u16()?;
        if found_file != FILE_VERSION || found_record != RECORD_VERSION {
            return Err(FileError::Version {
                found_file,
                found_record,
            });
        }
        let record_len = c.u16()?;
        if record_len as usize != RECORD_LEN {
            return Err(FileError::RecordLen(record_len));
        }
        let _reserved = c.u16()?;
        let saved_unix_ns = c.u64()?;
        let count = c.u64()?;
        let rule_count = c.u32()?;
        let iface_count = c.u32()?;
        // Checked before the checksum, so that the error says what the operator can fix.
        let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
        let computed = crc32fast::hash(body);
        if stored != computed {
            return Err(FileError::Checksum { stored, computed });
        }
        if count > capacity {
            return Err(FileError::TooMany { count, capacity });
        }
        if rule_count > MAX_NAMES || iface_count > MAX_NAMES {
            return Err(FileError::Name { index: 0 });
        }
        let mut names = Vec::with_capacity((rule_count + iface_count) as usize);
        for index in 0..(rule_count + iface_count) as usize {
            let len = c.take(1)?[0] as usize;
            let name = std::str::from_utf8(c.take(len)?)
                .ok()
                .filter(|name| !name.is_empty() && !name.contains('\0'))
                .ok_or(FileError::Name { index })?;
            names.push(name.to_string());
        }
        let ifaces = names.split_off(rule_count as usize);
        let rules = names;
        let expected = (c.at as u64)
            .saturating_add(count.saturating_mul(RECORD_LEN as u64))
            .saturating_add(4);
        if expected != bytes.len() as u64 {
            return Err(FileError::Length {
                expected,
                found: bytes.len() as u64,
            });
        }
        let mut records = Vec::with_capacity(count as usize);
        for index in 0..count {
            let raw: &[u8; RECORD_LEN] = c.take(RECORD_LEN)?.try_into().expect("one record");
            let record =
                SessionRecord::decode(raw).map_err(|source| FileError::Record { index, source })?;
            let dangling = |i: u16, table: &[String]| i != NO_NAME && i as usize >= table.len();
            if dangling(record.rule, &rules) || dangling(record.origin_iface, &ifaces) {
                return Err(FileError::Dangling { index });
            }
            records.push(record);
        }
        Ok(TableFile {
            saved_unix_ns,
            rules,
            ifaces,
            records,
        })
    }

    /// Writes the file atomically: to a temporary file next to `path`, synced, then
    /// renamed over it, so that a crash or a full disk never leaves half a table where a
    /// good one was.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = path.with_file_name(format!(".{name}.tmp"));
        // A temporary file a crash left behind goes first; then create_new (O_EXCL)
        // refuses to follow a link planted in its place.
        let _ = std::fs::remove_file(&tmp);
        let result = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode_0600()
                .open(&tmp)?;
            file.write_all(&self.encode())?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Opening saved tables readable by root only: they list every connection of the host.
trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt as _;
        self.mode(0o600)
    }
}

#[cfg(test)]
mod tests {
    use session_common::wire::{FAMILY_IPV6, FlowKey, proto};

    use super::*;

    fn table(count: usize) -> TableFile {
        let records = (0..count)
            .map(|i| SessionRecord {
                key: FlowKey {
                    addr_lo: [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                    addr_hi: [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                    port_lo: i as u16,
                    port_hi: 22,
                    proto: proto::UDP,
                    family: FAMILY_IPV6,
                    _pad: [0; 2],
                },
                state: 1,
                rule: (i % 2) as u16,
                origin_iface: if i % 3 == 0 { NO_NAME } else { 0 },
                remaining_ns: 1_000 + i as u64,
                ..SessionRecord::default()
            })
            .collect();
        TableFile {
            saved_unix_ns: 1_700_000_000_000_000_000,
            rules: vec!["ssh".into(), "return-traffic".into()],
            ifaces: vec!["veth0".into()],
            records,
        }
    }

    #[test]
    fn a_table_survives_encoding() {
        let original = table(50);
        let bytes = original.encode();
        assert_eq!(bytes.len(), HEADER_LEN + 4 + 15 + 6 + 50 * RECORD_LEN + 4);
        assert_eq!(TableFile::decode(&bytes, 50).expect("valid"), original);
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let bytes = table(3).encode();
        for at in 0..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[at] ^= 1 << bit;
                assert!(
                    TableFile::decode(&damaged, 100).is_err(),
                    "flip of bit {bit} at byte {at} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn truncation_other_versions_and_too_many_sessions_are_refused_with_their_reason() {
        let bytes = table(3).encode();
        for len in 0..bytes.len() {
            assert!(
                TableFile::decode(&bytes[..len], 100).is_err(),
                "cut at {len}"
            );
        }
        let mut other = bytes.clone();
        other[8] = 2;
        assert!(matches!(
            TableFile::decode(&other, 100),
            Err(FileError::Version { found_file: 2, .. })
        ));
        assert!(matches!(
            TableFile::decode(&bytes, 2),
            Err(FileError::TooMany {
                count: 3,
                capacity: 2
            })
        ));
        assert!(matches!(
            TableFile::decode(b"GARBAGE!and more", 100),
            Err(FileError::Magic)
        ));
    }

    #[test]
    fn a_record_naming_a_missing_rule_is_refused_even_with_a_good_checksum() {
        let mut bad = table(2);
        bad.records[1].rule = 7;
        assert!(matches!(
            TableFile::decode(&bad.encode(), 100),
            Err(FileError::Dangling { index: 1 })
        ));
    }
}
