//! The little netlink the takeover needs: dump requests (ctnetlink, sock_diag), one route
//! lookup, and attribute walking. Message building and parsing are pure functions over
//! bytes, unit-tested; only [`Socket`] talks to the kernel.

use std::{io, os::fd::OwnedFd, time::Duration};

use anyhow::{Context as _, Result, bail};
use rustix::{
    io::Errno,
    net::{
        self, AddressFamily, Protocol, RecvFlags, SendFlags, SocketFlags, SocketType, netlink,
        sockopt::Timeout,
    },
};

/// `NLMSG_ERROR` (`netlink.h`): the payload starts with a negative errno.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE` (`netlink.h`): the end of a dump.
pub const NLMSG_DONE: u16 = 3;
/// `NLM_F_REQUEST` (`netlink.h`).
pub const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_DUMP` (`NLM_F_ROOT | NLM_F_MATCH`, `netlink.h`).
pub const NLM_F_DUMP: u16 = 0x300;
/// Size of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
/// The bits of an attribute type without the nested and byte-order flags (`netlink.h`).
const NLA_TYPE_MASK: u16 = 0x3fff;
/// Size of the receive buffer: dumps come in messages of up to 32 KiB.
const RECV_BUF_LEN: usize = 64 * 1024;
/// How long to wait for the kernel, so a kernel that never answers cannot hang a start.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// Rounds `len` up to netlink's 4-byte alignment.
pub fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// A request: header (length filled in), then `payload`.
pub fn request(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + payload.len();
    let mut out = Vec::with_capacity(align(len));
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(align(len), 0);
    out
}

/// Appends an attribute (type, `value`) to `out`, padded.
pub fn put_attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len() + align(len) - len, 0);
}

/// One message of a reply: its type and payload (after the header).
#[derive(Debug)]
pub struct Message<'a> {
    /// `nlmsg_type`.
    pub kind: u16,
    /// Everything after the header.
    pub payload: &'a [u8],
}

/// The messages in one datagram; stops at a truncated one.
pub fn messages(mut buf: &[u8]) -> impl Iterator<Item = Message<'_>> {
    std::iter::from_fn(move || {
        if buf.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(buf[..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return None;
        }
        let kind = u16::from_ne_bytes(buf[4..6].try_into().ok()?);
        let message = Message {
            kind,
            payload: &buf[NLMSG_HDRLEN..len],
        };
        buf = &buf[align(len).min(buf.len())..];
        Some(message)
    })
}

/// The attributes in `buf`: (type without flags, value); stops at a truncated one.
pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        if len < 4 || len > buf.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        let value = &buf[4..len];
        buf = &buf[align(len).min(buf.len())..];
        Some((kind, value))
    })
}

/// The value of the first attribute of type `kind` in `buf`.
pub fn attr(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buf).find(|(k, _)| *k == kind).map(|(_, v)| v)
}

/// A netlink socket of one protocol, connected to the kernel, with a receive timeout.
pub struct Socket {
    fd: OwnedFd,
}

impl Socket {
    /// Opens a socket of netlink `protocol` (`netlink::NETFILTER`, `netlink::SOCK_DIAG`...;
    /// `None` is `NETLINK_ROUTE`, protocol 0) connected to the kernel.
    pub fn open(protocol: Option<Protocol>) -> Result<Socket> {
        let fd = net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            protocol,
        )
        .map_err(io::Error::from)
        .with_context(|| format!("cannot open a netlink socket (protocol {protocol:?})"))?;
        net::sockopt::set_socket_timeout(&fd, Timeout::Recv, Some(RECV_TIMEOUT))
            .map_err(io::Error::from)
            .context("setting a netlink receive timeout")?;
        // Port 0 is the kernel.
        net::connect(&fd, &netlink::SocketAddrNetlink::new(0, 0))
            .map_err(io::Error::from)
            .context("connecting a netlink socket to the kernel")?;
        Ok(Socket { fd })
    }

    /// Sends one message (or several, concatenated) to the kernel.
    pub fn send(&self, message: &[u8]) -> Result<()> {
        loop {
            match net::send(&self.fd, message, SendFlags::empty()) {
                Ok(_) => return Ok(()),
                Err(Errno::INTR) => {}
                Err(error) => {
                    return Err(io::Error::from(error)).context("sending a netlink request");
                }
            }
        }
    }

    fn recv(&self, buf: &mut [u8]) -> Result<usize> {
        loop {
            match net::recv(&self.fd, &mut *buf, RecvFlags::empty()) {
                Ok((got, _)) => return Ok(got),
                Err(Errno::INTR) => {}
                Err(error) => {
                    return Err(io::Error::from(error)).context("reading a netlink reply");
                }
            }
        }
    }

    /// Sends a dump request and hands each reply message's payload to `each`, until the
    /// kernel says it is done. An error message fails the dump with its errno.
    pub fn dump(&self, message: &[u8], mut each: impl FnMut(&Message<'_>)) -> Result<()> {
        self.send(message)?;
        let mut buf = vec![0u8; RECV_BUF_LEN];
        loop {
            let len = self.recv(&mut buf)?;
            if len == 0 {
                bail!("the kernel closed the netlink socket during a dump");
            }
            for message in messages(&buf[..len]) {
                match message.kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let errno = error_code(message.payload);
                        if errno == 0 {
                            return Ok(());
                        }
                        return Err(io::Error::from_raw_os_error(errno))
                            .context("the kernel refused the netlink dump");
                    }
                    _ => each(&message),
                }
            }
        }
    }

    /// Sends a request that has one reply and returns that reply's type and payload (an
    /// acknowledgement is `NLMSG_ERROR` with errno 0).
    pub fn ask(&self, message: &[u8]) -> Result<(u16, Vec<u8>)> {
        self.send(message)?;
        let mut buf = vec![0u8; RECV_BUF_LEN];
        let len = self.recv(&mut buf)?;
        let Some(reply) = messages(&buf[..len]).next() else {
            bail!("a netlink reply too short to read");
        };
        if reply.kind == NLMSG_ERROR {
            let errno = error_code(reply.payload);
            if errno != 0 {
                return Err(io::Error::from_raw_os_error(errno)).context("the kernel refused");
            }
        }
        Ok((reply.kind, reply.payload.to_vec()))
    }
}

/// The positive errno of an `NLMSG_ERROR` payload (0: an acknowledgement).
fn error_code(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .map(|b| -i32::from_ne_bytes(b.try_into().expect("4 bytes")))
        .unwrap_or(libc::EPROTO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_padding_and_flags_masked() {
        let mut buf = Vec::new();
        put_attr(&mut buf, 1, &[7]);
        put_attr(&mut buf, 2 | 0x8000, &[1, 2, 3, 4, 5]);
        assert_eq!(buf.len(), 8 + 12);
        let found: Vec<_> = attrs(&buf).collect();
        assert_eq!(found, vec![(1, &[7u8][..]), (2, &[1u8, 2, 3, 4, 5][..])]);
        assert_eq!(attr(&buf, 2), Some(&[1u8, 2, 3, 4, 5][..]));
        // A truncated attribute ends the walk instead of reading past the buffer.
        assert_eq!(attrs(&buf[..10]).count(), 1);
    }

    #[test]
    fn messages_split_a_datagram_and_stop_at_a_truncated_one() {
        let mut datagram = request(20, 0, 1, &[1, 2, 3]);
        datagram.extend(request(NLMSG_DONE, 0, 1, &[]));
        let found: Vec<_> = messages(&datagram)
            .map(|m| (m.kind, m.payload.len()))
            .collect();
        assert_eq!(found, vec![(20, 3), (NLMSG_DONE, 0)]);
        assert_eq!(messages(&datagram[..10]).count(), 0);
    }
}
