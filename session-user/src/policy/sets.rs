//! Named sets as the operator writes them: inline lists under `[sets]` or files of one
//! address or network per line (`name = { file = "/etc/session/block.txt" }`), parsed with
//! `file:line` errors; the host's membership index of a set, used by the host model and
//! the tests; and the memory estimate `session check` reports.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use session_common::{
    sets::SET_NAME_LEN,
    wire::{FAMILY_IPV4, FAMILY_IPV6},
};

use crate::policy::config::Network;

/// Default `[limits] max_set_entries`: prefixes all sets of a policy may hold together.
/// The sets' host hash takes its buckets from the start ([`host_hash_reserve`], 8 MiB at
/// this default), so the default is the order of pf's `table-entries` (200,000) rather
/// than room for a million; a config asks for more.
pub const DEFAULT_MAX_SET_ENTRIES: u32 = 1 << 18;

/// Kernel memory one stored network takes, for the estimate `session check` prints: an
/// LPM trie node with its 20-byte key and 8-byte value is a 96-byte allocation, and a trie
/// of n prefixes holds up to n - 1 intermediate nodes of the same size besides.
pub const BYTES_PER_NETWORK: u64 = 2 * 96;

/// Kernel memory one stored single address takes in the host hash: its element (header,
/// 20-byte key, 8-byte value) is 88 bytes by the kernel's accounting, a 96-byte allocation.
pub const BYTES_PER_HOST: u64 = 96;

/// Entries of the sets' host hash (`SET_HOSTS`) for `[limits] max_set_entries`: room for
/// every set's single addresses twice, as a replace holds the old and the new set at once.
pub fn set_host_capacity(max_set_entries: u32) -> u32 {
    max_set_entries.saturating_mul(2)
}

/// Bytes of buckets the kernel allocates for the host hash when it creates it, used or
/// not: 16 a bucket, one bucket per entry rounded up to a power of two.
pub fn host_hash_reserve(max_set_entries: u32) -> u64 {
    16 * u64::from(set_host_capacity(max_set_entries)).next_power_of_two()
}

/// One named set of a policy.
#[derive(Clone, Debug, PartialEq)]
pub struct SetSpec {
    /// Its prefixes, in file or list order, duplicates removed.
    pub networks: Arc<Vec<Network>>,
    /// The file it was read from, when it is a file set (re-read on every reload).
    pub file: Option<PathBuf>,
}

/// Why a set file cannot be used; the message names the file and line.
#[derive(Debug, thiserror::Error)]
pub enum SetFileError {
    /// The file cannot be read.
    #[error("cannot read set file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not an address or network.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
}

/// Whether `name` can name a set: what fits `SetInfo::name` and a shell argument.
pub fn valid_set_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < SET_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Parses `addr` or `addr/prefix` (IPv4 or IPv6) into a masked network; the error says
/// what is wrong, for the caller to locate.
pub fn parse_prefix(text: &str) -> Result<Network, String> {
    let (addr_text, prefix_text) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let addr: IpAddr = addr_text.parse().map_err(|_| {
        format!("`{text}` is not an IP address or CIDR network (e.g. 198.18.0.0/15 or 2001:2::/48)")
    })?;
    let (bytes, family, max_prefix, offset) = match addr {
        IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), FAMILY_IPV4, 32u8, 96u8),
        IpAddr::V6(v6) => (v6.octets(), FAMILY_IPV6, 128u8, 0u8),
    };
    let prefix = match prefix_text {
        None => max_prefix,
        Some(p) => match p.parse::<u8>() {
            Ok(p) if p <= max_prefix => p,
            _ => {
                return Err(format!(
                    "`{text}` has an invalid prefix length: it must be 0 to {max_prefix}"
                ));
            }
        },
    };
    let network = Network {
        addr: bytes,
        prefix: prefix + offset,
        family,
    };
    let mask = network.mask();
    if bytes.iter().zip(mask).any(|(byte, m)| byte & !m != 0) {
        return Err(format!(
            "`{text}` has host bits set; did you mean the network address of that prefix?"
        ));
    }
    Ok(network)
}

/// Parses the text of a set file: one address or network per line; `#` starts a comment;
/// blank lines are skipped. `path` is only used in messages. Duplicates are dropped.
pub fn parse_set_file(path: &Path, text: &str) -> Result<Vec<Network>, SetFileError> {
    let mut out = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let item = line.split('#').next().unwrap_or("").trim();
        if item.is_empty() {
            continue;
        }
        if item.contains(char::is_whitespace) {
            return Err(SetFileError::Line {
                path: path.to_path_buf(),
                line: index + 1,
                message: format!(
                    "`{item}` holds more than one item: put one address or network on each line (comments start with #)"
                ),
            });
        }
        let network = parse_prefix(item).map_err(|message| SetFileError::Line {
            path: path.to_path_buf(),
            line: index + 1,
            message,
        })?;
        out.push(network);
    }
    Ok(dedup(out))
}

/// Largest set file read: far above a file of `MAX_SET_ENTRIES_LIMIT` lines, and a bound
/// on what a path such as /dev/zero can make `session check` or a reload read.
pub const MAX_SET_FILE_BYTES: u64 = 256 << 20;

/// Reads and parses a set file (a regular file of at most [`MAX_SET_FILE_BYTES`]).
pub fn read_set_file(path: &Path) -> Result<Vec<Network>, SetFileError> {
    use std::io::Read as _;
    let error = |source| SetFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(error)?;
    if !file.metadata().map_err(error)?.is_file() {
        return Err(error(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let mut text = String::new();
    file.take(MAX_SET_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(error)?;
    if text.len() as u64 > MAX_SET_FILE_BYTES {
        return Err(error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_SET_FILE_BYTES} bytes"),
        )));
    }
    parse_set_file(path, &text)
}

/// `networks` without repeats, in first-seen order.
pub fn dedup(networks: Vec<Network>) -> Vec<Network> {
    let mut seen = HashSet::with_capacity(networks.len());
    networks
        .into_iter()
        .filter(|net| seen.insert((net.addr, net.prefix)))
        .collect()
}

/// A set's membership test on the host: one hash set of networks per prefix length, so a
/// lookup costs at most one probe per length the set uses.
#[derive(Clone, Debug, Default)]
pub struct HostSet {
    by_prefix: BTreeMap<u8, HashSet<u128>>,
}

impl HostSet {
    /// The index of `networks`.
    pub fn new(networks: &[Network]) -> HostSet {
        let mut set = HostSet::default();
        for net in networks {
            set.insert(net);
        }
        set
    }

    /// Adds `net`.
    pub fn insert(&mut self, net: &Network) {
        self.by_prefix
            .entry(net.prefix)
            .or_default()
            .insert(u128::from_be_bytes(net.addr));
    }

    /// Removes `net`; whether it was there.
    pub fn remove(&mut self, net: &Network) -> bool {
        self.by_prefix
            .get_mut(&net.prefix)
            .is_some_and(|nets| nets.remove(&u128::from_be_bytes(net.addr)))
    }

    /// Whether a network of the set holds `addr` (IPv4-mapped for IPv4).
    pub fn contains(&self, addr: &[u8; 16]) -> bool {
        let addr = u128::from_be_bytes(*addr);
        self.by_prefix.iter().any(|(&prefix, nets)| {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            nets.contains(&(addr & mask))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_file_takes_addresses_networks_comments_and_blank_lines() {
        let text =
            "# blocklist\n198.18.0.1\n\n198.18.1.0/24\n  2001:2::/64   # office\n198.18.0.1\n";
        let nets = parse_set_file(Path::new("b.txt"), text).expect("valid file");
        assert_eq!(nets.len(), 3, "the repeated address counts once");
        assert_eq!(nets[0].prefix, 128);
        assert_eq!(nets[1].prefix, 96 + 24);
        assert_eq!(nets[2].family, FAMILY_IPV6);
    }

    #[test]
    fn a_bad_line_is_refused_with_its_file_and_line() {
        let text = "198.18.0.1\n# fine\n198.18.0.1/33\n";
        let error = parse_set_file(Path::new("/etc/session/b.txt"), text)
            .expect_err("a /33 is not a network");
        let message = error.to_string();
        assert!(
            message.starts_with("/etc/session/b.txt:3: "),
            "message: {message}"
        );
        assert!(message.contains("prefix length"), "message: {message}");
        let error = parse_set_file(Path::new("b.txt"), "198.18.0.1/15\n").expect_err("host bits");
        assert!(error.to_string().contains("b.txt:1: "), "{error}");
        let error = parse_set_file(Path::new("b.txt"), "ok\n").expect_err("not an address");
        assert!(error.to_string().contains("not an IP address"), "{error}");
        let error = parse_set_file(Path::new("b.txt"), "198.18.0.1 198.18.0.2\n").expect_err("two");
        assert!(error.to_string().contains("one address"), "{error}");
    }

    #[test]
    fn the_host_index_finds_addresses_in_any_of_its_prefixes() {
        let nets = parse_set_file(Path::new("s"), "198.18.0.0/24\n198.19.1.1\n2001:2::/64\n")
            .expect("valid");
        let mut set = HostSet::new(&nets);
        let v4 = |text: &str| match text.parse::<IpAddr>().expect("address") {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        };
        assert!(set.contains(&v4("198.18.0.77")));
        assert!(!set.contains(&v4("198.18.1.0")));
        assert!(set.contains(&v4("198.19.1.1")));
        assert!(!set.contains(&v4("198.19.1.2")));
        assert!(set.contains(&v4("2001:2::ffff")));
        assert!(!set.contains(&v4("2001:2:0:1::")));
        assert!(set.remove(&nets[1]));
        assert!(!set.contains(&v4("198.19.1.1")));
    }
}
