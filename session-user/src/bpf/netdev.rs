//! Whether an interface can transmit frames that XDP redirects to it, asked of the kernel's
//! `netdev` generic netlink family (Linux 6.3+).
//!
//! The kernel drops a redirected frame silently when the target cannot transmit it, so the
//! question has to be asked before the fast path relies on the interface. Message building
//! and reply parsing are pure functions over bytes; only [`can_transmit_xdp`] talks to the
//! kernel.

use std::{io, os::fd::OwnedFd, time::Duration};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use rustix::{
    io::Errno,
    net::{
        self, AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, netdevice, netlink,
        sockopt::Timeout,
    },
};

/// Message type of an error reply; its payload starts with a negative errno (`netlink.h`).
const NLMSG_ERROR: u16 = 0x2;
/// Marks a message as a request: the kernel only acts on messages that carry it (`netlink.h`).
const NLM_F_REQUEST: u16 = 0x01;
/// Size of `struct nlmsghdr`, after which the generic netlink header starts (`netlink.h`).
const NLMSG_HDRLEN: usize = 16;
/// Size of `struct nlattr`, the length and type in front of every attribute (`netlink.h`).
const NLA_HDRLEN: usize = 4;
/// Every attribute is padded to this, so the next one starts aligned (`netlink.h`).
const NLA_ALIGNTO: usize = 4;
/// The bits of `nla_type` that are the type, without the nested and byte-order flags
/// (`netlink.h`), so that a flagged attribute is still found by its type.
const NLA_TYPE_MASK: u16 = !((1 << 15) | (1 << 14));
/// Size of `struct genlmsghdr` (command, version, reserved), after which the attributes
/// start (`genetlink.h`).
const GENL_HDRLEN: usize = 4;
/// Message type of the generic netlink controller, the one family with a fixed id: it is
/// how the id of every other family is found (`genetlink.h`).
const GENL_ID_CTRL: u16 = 0x10;
/// Version of the controller family (`net/netlink/genetlink.c`); sent for good form, the
/// kernel does not check it.
const GENL_CTRL_VERSION: u8 = 0x2;
/// Controller command that looks a family up by name, to learn the `netdev` family's id
/// (`genetlink.h`).
const CTRL_CMD_GETFAMILY: u8 = 3;
/// Attribute of the controller's answer that holds the family id, a u16 (`genetlink.h`).
const CTRL_ATTR_FAMILY_ID: u16 = 1;
/// Attribute of the lookup that holds the family name (`genetlink.h`).
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
/// Name of the family that reports XDP features (`netdev.h`), NUL-terminated because the
/// controller's policy for the name is `NLA_NUL_STRING`.
const NETDEV_FAMILY_NAME: &[u8] = b"netdev\0";
/// Version of the `netdev` family (`netdev.h`); sent for good form, the kernel does not
/// check it.
const NETDEV_FAMILY_VERSION: u8 = 1;
/// `netdev` command that reports one interface, selected by index (`netdev.h`).
const NETDEV_CMD_DEV_GET: u8 = 1;
/// Attribute that selects the interface of a `NETDEV_CMD_DEV_GET`, a u32 (`netdev.h`).
const NETDEV_A_DEV_IFINDEX: u16 = 1;
/// Attribute of the answer with the interface's XDP feature bits, a u64 (`netdev.h`).
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
/// The feature bit of a driver that implements `ndo_xdp_xmit`, without which frames
/// redirected to the interface are dropped (`netdev.h`).
const NETDEV_XDP_ACT_NDO_XMIT: u64 = 4;
/// Sequence number of the family lookup, checked on its reply so that no other message is
/// taken for the answer.
const FAMILY_SEQ: u32 = 1;
/// Sequence number of the interface query, checked on its reply for the same reason.
const DEV_GET_SEQ: u32 = 2;
/// Size of the receive buffer: the kernel builds a single reply in at most 8 KiB
/// (`NLMSG_GOODSIZE`), so twice that leaves room to spare.
const RECV_BUF_LEN: usize = 16 * 1024;
/// How long to wait for the kernel's reply, so that a kernel that never answers cannot
/// hang the daemon's start.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// The index of network interface `name`, if it exists (`if_nametoindex`).
pub fn name_to_index(name: &str) -> Option<u32> {
    netdevice::name_to_index(ioctl_socket().ok()?, name).ok()
}

/// The name of the network interface with index `ifindex`, if it exists and its name is
/// UTF-8 (`if_indextoname`).
pub fn index_to_name(ifindex: u32) -> Option<String> {
    netdevice::index_to_name(ioctl_socket().ok()?, ifindex).ok()
}

/// A socket to ask interface ioctls of, in this process's network namespace, as the C
/// library's `if_nametoindex` opens one: a Unix datagram socket needs no network set up.
fn ioctl_socket() -> io::Result<OwnedFd> {
    Ok(net::socket_with(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Whether frames redirected by XDP to interface `ifindex` can leave through it.
///
/// The fast path redirects frames out of an interface; a driver without `ndo_xdp_xmit`, or
/// a veth whose peer has neither GRO nor an XDP program, drops them without a trace. This
/// asks the kernel whether the interface advertises `NETDEV_XDP_ACT_NDO_XMIT`. It gives
/// `Ok(None)` on a kernel older than 6.3, which has no `netdev` family and so no answer;
/// a missing interface (`ENODEV`) or any failure to talk to the kernel is an error.
pub fn can_transmit_xdp(ifindex: u32) -> Result<Option<bool>> {
    let socket = open_socket()?;
    let mut buf = vec![0u8; RECV_BUF_LEN];

    let len = transact(&socket, &family_request(FAMILY_SEQ), &mut buf)
        .context("cannot ask the kernel for the id of the `netdev` generic netlink family")?;
    let reply = buf.get(..len).context("reply length beyond the buffer")?;
    let Some(family) = parse_family_reply(reply, FAMILY_SEQ)
        .context("cannot read the id of the `netdev` generic netlink family")?
    else {
        return Ok(None);
    };

    let len = transact(
        &socket,
        &dev_get_request(family, DEV_GET_SEQ, ifindex),
        &mut buf,
    )
    .with_context(|| {
        format!("cannot ask the kernel for the XDP features of interface index {ifindex}")
    })?;
    let reply = buf.get(..len).context("reply length beyond the buffer")?;
    let ndo_xmit = parse_dev_get_reply(reply, family, DEV_GET_SEQ)
        .with_context(|| format!("cannot read the XDP features of interface index {ifindex}"))?;
    Ok(Some(ndo_xmit))
}

/// A generic netlink socket connected to the kernel, so that it only accepts the kernel's
/// messages, with a receive timeout.
fn open_socket() -> Result<OwnedFd> {
    let socket = net::socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        Some(netlink::GENERIC),
    )
    .map_err(io::Error::from)
    .context("cannot open a generic netlink socket")?;
    net::sockopt::set_socket_timeout(&socket, Timeout::Recv, Some(RECV_TIMEOUT))
        .map_err(io::Error::from)
        .context("cannot set a receive timeout on the generic netlink socket")?;
    // Port 0 is the kernel.
    net::connect(&socket, &netlink::SocketAddrNetlink::new(0, 0))
        .map_err(io::Error::from)
        .context("cannot connect the generic netlink socket to the kernel")?;
    Ok(socket)
}

/// Sends one request and receives the kernel's reply into `buf`, returning its length.
fn transact(socket: &OwnedFd, request: &[u8], buf: &mut [u8]) -> Result<usize> {
    let sent = loop {
        match net::send(socket, request, SendFlags::empty()) {
            Ok(sent) => break sent,
            Err(Errno::INTR) => {}
            Err(err) => return Err(io::Error::from(err)).context("cannot send the request"),
        }
    };
    ensure!(
        sent == request.len(),
        "sent {sent} of the request's {} bytes",
        request.len()
    );

    loop {
        // MSG_TRUNC makes the kernel report the whole reply's length, so that a reply
        // longer than the buffer is noticed rather than read cut short.
        match net::recv(socket, &mut *buf, RecvFlags::TRUNC) {
            Ok((_, len)) if len > buf.len() => {
                bail!(
                    "the reply of {len} bytes does not fit the {} byte buffer",
                    buf.len()
                )
            }
            Ok((_, len)) => return Ok(len),
            Err(Errno::INTR) => {}
            Err(err) => return Err(io::Error::from(err)).context("cannot receive the reply"),
        }
    }
}

/// `len` rounded up to the alignment of netlink attributes.
fn nla_align(len: usize) -> usize {
    len.next_multiple_of(NLA_ALIGNTO)
}

/// A generic netlink request to family `nlmsg_type` with one attribute.
fn genl_request(
    nlmsg_type: u16,
    seq: u32,
    cmd: u8,
    version: u8,
    attr_type: u16,
    payload: &[u8],
) -> Vec<u8> {
    let attr_len = NLA_HDRLEN + payload.len();
    let len = NLMSG_HDRLEN + GENL_HDRLEN + nla_align(attr_len);
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&nlmsg_type.to_ne_bytes());
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    // Sender port 0: the kernel knows the sender from the socket and does not read it.
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&[cmd, version, 0, 0]);
    msg.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    msg.extend_from_slice(&attr_type.to_ne_bytes());
    msg.extend_from_slice(payload);
    msg.resize(len, 0);
    msg
}

/// The controller request that looks up the id of the `netdev` family.
fn family_request(seq: u32) -> Vec<u8> {
    genl_request(
        GENL_ID_CTRL,
        seq,
        CTRL_CMD_GETFAMILY,
        GENL_CTRL_VERSION,
        CTRL_ATTR_FAMILY_NAME,
        NETDEV_FAMILY_NAME,
    )
}

/// The `netdev` request for interface `ifindex`, sent to the family whose id is `family`.
fn dev_get_request(family: u16, seq: u32, ifindex: u32) -> Vec<u8> {
    genl_request(
        family,
        seq,
        NETDEV_CMD_DEV_GET,
        NETDEV_FAMILY_VERSION,
        NETDEV_A_DEV_IFINDEX,
        &ifindex.to_ne_bytes(),
    )
}

/// What the kernel answered to one request.
#[derive(Debug, PartialEq, Eq)]
enum Reply<'a> {
    /// The attributes of the answer, after the generic netlink header.
    Attributes(&'a [u8]),
    /// An error reply, with its errno as a positive number.
    Error(i32),
}

/// The `N` bytes of `buf` at `at`, or `None` if `buf` is too short.
fn bytes_at<const N: usize>(buf: &[u8], at: usize) -> Option<[u8; N]> {
    buf.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// The first message of `buf`, which must answer request `seq` with a message of type
/// `nlmsg_type` or with an error.
fn parse_reply(buf: &[u8], nlmsg_type: u16, seq: u32) -> Result<Reply<'_>> {
    let len = bytes_at(buf, 0)
        .map(u32::from_ne_bytes)
        .context("reply shorter than a netlink header")?;
    let len = usize::try_from(len).context("netlink message length beyond the address space")?;
    ensure!(
        (NLMSG_HDRLEN..=buf.len()).contains(&len),
        "netlink message length {len} does not fit the {} bytes received",
        buf.len()
    );
    let ty = bytes_at(buf, 4)
        .map(u16::from_ne_bytes)
        .context("reply shorter than a netlink header")?;
    let reply_seq = bytes_at(buf, 8)
        .map(u32::from_ne_bytes)
        .context("reply shorter than a netlink header")?;
    ensure!(
        reply_seq == seq,
        "reply to sequence number {reply_seq}, expected {seq}"
    );
    let payload = &buf[NLMSG_HDRLEN..len];

    if ty == NLMSG_ERROR {
        let error = bytes_at(payload, 0)
            .map(i32::from_ne_bytes)
            .context("error reply without an error code")?;
        ensure!(
            error < 0,
            "the kernel acknowledged the request (code {error}) instead of answering it"
        );
        let errno = error
            .checked_neg()
            .ok_or_else(|| anyhow!("error reply with the invalid code {error}"))?;
        return Ok(Reply::Error(errno));
    }
    ensure!(
        ty == nlmsg_type,
        "reply of message type {ty}, expected {nlmsg_type}"
    );
    let attrs = payload
        .get(GENL_HDRLEN..)
        .context("reply shorter than a generic netlink header")?;
    Ok(Reply::Attributes(attrs))
}

/// The payload of the first attribute of type `wanted` in `attrs`, `None` if there is none.
fn find_attr(mut attrs: &[u8], wanted: u16) -> Result<Option<&[u8]>> {
    while !attrs.is_empty() {
        let len = bytes_at(attrs, 0)
            .map(u16::from_ne_bytes)
            .context("attribute header cut short")?;
        let ty = bytes_at(attrs, 2)
            .map(u16::from_ne_bytes)
            .context("attribute header cut short")?;
        let len = usize::from(len);
        ensure!(
            (NLA_HDRLEN..=attrs.len()).contains(&len),
            "attribute length {len} does not fit the {} bytes left",
            attrs.len()
        );
        if ty & NLA_TYPE_MASK == wanted {
            return Ok(Some(&attrs[NLA_HDRLEN..len]));
        }
        // The last attribute may come without its padding.
        attrs = &attrs[nla_align(len).min(attrs.len())..];
    }
    Ok(None)
}

/// The id of the `netdev` family from the controller's reply, `None` if there is no such
/// family.
fn parse_family_reply(buf: &[u8], seq: u32) -> Result<Option<u16>> {
    match parse_reply(buf, GENL_ID_CTRL, seq)? {
        Reply::Error(libc::ENOENT) => Ok(None),
        Reply::Error(errno) => Err(io::Error::from_raw_os_error(errno))
            .context("the generic netlink controller refused the lookup"),
        Reply::Attributes(attrs) => {
            let id = find_attr(attrs, CTRL_ATTR_FAMILY_ID)?
                .context("the controller's reply has no family id")?;
            let id = <[u8; 2]>::try_from(id)
                .map_err(|_| anyhow!("family id of {} bytes, expected 2", id.len()))?;
            Ok(Some(u16::from_ne_bytes(id)))
        }
    }
}

/// Whether the `netdev` family's reply about an interface has the `NDO_XMIT` feature bit.
fn parse_dev_get_reply(buf: &[u8], family: u16, seq: u32) -> Result<bool> {
    match parse_reply(buf, family, seq)? {
        Reply::Error(errno) => Err(io::Error::from_raw_os_error(errno))
            .context("the kernel's `netdev` family refused the request"),
        Reply::Attributes(attrs) => {
            let features = find_attr(attrs, NETDEV_A_DEV_XDP_FEATURES)?
                .context("the reply has no XDP features attribute")?;
            let features = <[u8; 8]>::try_from(features)
                .map_err(|_| anyhow!("XDP features of {} bytes, expected 8", features.len()))?;
            Ok(u64::from_ne_bytes(features) & NETDEV_XDP_ACT_NDO_XMIT != 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The family id the tests pretend the kernel gave `netdev`.
    const FAMILY: u16 = 0x1a;

    /// One attribute, padded.
    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = ((NLA_HDRLEN + payload.len()) as u16).to_ne_bytes().to_vec();
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(nla_align(out.len()), 0);
        out
    }

    /// One netlink message as the kernel sends it.
    fn message(ty: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = ((NLMSG_HDRLEN + payload.len()) as u32)
            .to_ne_bytes()
            .to_vec();
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&4242u32.to_ne_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// A generic netlink reply with the given attributes.
    fn genl_reply(ty: u16, seq: u32, cmd: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut payload = vec![cmd, 1, 0, 0];
        for a in attrs {
            payload.extend_from_slice(a);
        }
        message(ty, seq, &payload)
    }

    /// An error reply carrying `-errno` and, as the kernel does, the start of the request.
    fn error_reply(seq: u32, errno: i32) -> Vec<u8> {
        let mut payload = (-errno).to_ne_bytes().to_vec();
        payload.extend_from_slice(&family_request(seq)[..NLMSG_HDRLEN]);
        message(NLMSG_ERROR, seq, &payload)
    }

    /// The controller's answer naming `netdev` with id [`FAMILY`].
    fn family_reply(seq: u32) -> Vec<u8> {
        genl_reply(
            GENL_ID_CTRL,
            seq,
            1,
            &[
                attr(CTRL_ATTR_FAMILY_NAME, NETDEV_FAMILY_NAME),
                attr(CTRL_ATTR_FAMILY_ID, &FAMILY.to_ne_bytes()),
                attr(3, &1u32.to_ne_bytes()),
            ],
        )
    }

    /// The `netdev` answer about interface 7 with the given feature bits, with the pad
    /// attribute the kernel may put before a u64.
    fn dev_get_reply(seq: u32, features: u64) -> Vec<u8> {
        genl_reply(
            FAMILY,
            seq,
            NETDEV_CMD_DEV_GET,
            &[
                attr(NETDEV_A_DEV_IFINDEX, &7u32.to_ne_bytes()),
                attr(2, &[]),
                attr(NETDEV_A_DEV_XDP_FEATURES, &features.to_ne_bytes()),
                attr(5, &0u64.to_ne_bytes()),
            ],
        )
    }

    #[test]
    fn family_request_bytes() {
        let mut expected = Vec::new();
        expected.extend_from_slice(&32u32.to_ne_bytes());
        expected.extend_from_slice(&0x10u16.to_ne_bytes());
        expected.extend_from_slice(&1u16.to_ne_bytes());
        expected.extend_from_slice(&9u32.to_ne_bytes());
        expected.extend_from_slice(&0u32.to_ne_bytes());
        expected.extend_from_slice(&[3, 2, 0, 0]);
        expected.extend_from_slice(&11u16.to_ne_bytes());
        expected.extend_from_slice(&2u16.to_ne_bytes());
        expected.extend_from_slice(b"netdev\0\0");
        assert_eq!(family_request(9), expected);
    }

    #[test]
    fn dev_get_request_bytes() {
        let mut expected = Vec::new();
        expected.extend_from_slice(&28u32.to_ne_bytes());
        expected.extend_from_slice(&FAMILY.to_ne_bytes());
        expected.extend_from_slice(&1u16.to_ne_bytes());
        expected.extend_from_slice(&5u32.to_ne_bytes());
        expected.extend_from_slice(&0u32.to_ne_bytes());
        expected.extend_from_slice(&[1, 1, 0, 0]);
        expected.extend_from_slice(&8u16.to_ne_bytes());
        expected.extend_from_slice(&1u16.to_ne_bytes());
        expected.extend_from_slice(&0x0102_0304u32.to_ne_bytes());
        assert_eq!(dev_get_request(FAMILY, 5, 0x0102_0304), expected);
    }

    #[test]
    fn family_reply_gives_the_id() {
        let id = parse_family_reply(&family_reply(FAMILY_SEQ), FAMILY_SEQ)
            .expect("a well-formed controller reply parses");
        assert_eq!(id, Some(FAMILY));
    }

    #[test]
    fn family_reply_to_another_request_is_an_error() {
        let err = parse_family_reply(&family_reply(FAMILY_SEQ + 1), FAMILY_SEQ)
            .expect_err("a reply with the wrong sequence number is refused");
        assert!(format!("{err:#}").contains("sequence number"), "{err:#}");
    }

    #[test]
    fn family_reply_without_id_is_an_error() {
        let reply = genl_reply(
            GENL_ID_CTRL,
            FAMILY_SEQ,
            1,
            &[attr(CTRL_ATTR_FAMILY_NAME, NETDEV_FAMILY_NAME)],
        );
        assert!(parse_family_reply(&reply, FAMILY_SEQ).is_err());
    }

    #[test]
    fn dev_get_reply_with_ndo_xmit() {
        let features = 1 | 2 | NETDEV_XDP_ACT_NDO_XMIT;
        let reply = dev_get_reply(DEV_GET_SEQ, features);
        assert!(
            parse_dev_get_reply(&reply, FAMILY, DEV_GET_SEQ)
                .expect("a well-formed netdev reply parses")
        );
    }

    #[test]
    fn dev_get_reply_without_ndo_xmit() {
        let features = 1 | 2 | 8 | 64;
        let reply = dev_get_reply(DEV_GET_SEQ, features);
        assert!(
            !parse_dev_get_reply(&reply, FAMILY, DEV_GET_SEQ)
                .expect("a well-formed netdev reply parses")
        );
    }

    #[test]
    fn dev_get_reply_from_another_family_is_an_error() {
        let reply = dev_get_reply(DEV_GET_SEQ, NETDEV_XDP_ACT_NDO_XMIT);
        assert!(parse_dev_get_reply(&reply, FAMILY + 1, DEV_GET_SEQ).is_err());
    }

    #[test]
    fn enoent_from_the_controller_means_no_family() {
        let reply = error_reply(FAMILY_SEQ, libc::ENOENT);
        let id =
            parse_family_reply(&reply, FAMILY_SEQ).expect("ENOENT is an answer, not a failure");
        assert_eq!(id, None);
    }

    #[test]
    fn other_errors_from_the_controller_are_errors() {
        let reply = error_reply(FAMILY_SEQ, libc::ENODEV);
        let err = parse_family_reply(&reply, FAMILY_SEQ).expect_err("ENODEV is a failure");
        assert!(format!("{err:#}").contains("os error 19"), "{err:#}");
    }

    #[test]
    fn enodev_from_netdev_is_an_error() {
        let reply = error_reply(DEV_GET_SEQ, libc::ENODEV);
        let err = parse_dev_get_reply(&reply, FAMILY, DEV_GET_SEQ)
            .expect_err("a missing interface is a failure");
        let io = err
            .downcast_ref::<io::Error>()
            .expect("the errno is kept as an io::Error");
        assert_eq!(io.raw_os_error(), Some(libc::ENODEV));
    }

    #[test]
    fn enoent_from_netdev_is_an_error() {
        let reply = error_reply(DEV_GET_SEQ, libc::ENOENT);
        assert!(parse_dev_get_reply(&reply, FAMILY, DEV_GET_SEQ).is_err());
    }

    #[test]
    fn acknowledgement_is_not_an_answer() {
        let reply = message(NLMSG_ERROR, FAMILY_SEQ, &0i32.to_ne_bytes());
        assert!(parse_family_reply(&reply, FAMILY_SEQ).is_err());
        let reply = message(NLMSG_ERROR, FAMILY_SEQ, &i32::MIN.to_ne_bytes());
        assert!(parse_family_reply(&reply, FAMILY_SEQ).is_err());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let family = family_reply(FAMILY_SEQ);
        for len in 0..family.len() {
            assert!(
                parse_family_reply(&family[..len], FAMILY_SEQ).is_err(),
                "family reply cut to {len} bytes"
            );
        }
        let dev = dev_get_reply(DEV_GET_SEQ, NETDEV_XDP_ACT_NDO_XMIT);
        for len in 0..dev.len() {
            assert!(
                parse_dev_get_reply(&dev[..len], FAMILY, DEV_GET_SEQ).is_err(),
                "netdev reply cut to {len} bytes"
            );
        }
        let error = error_reply(FAMILY_SEQ, libc::ENOENT);
        for len in 0..NLMSG_HDRLEN + 4 {
            assert!(
                parse_family_reply(&error[..len], FAMILY_SEQ).is_err(),
                "error reply cut to {len} bytes"
            );
        }
    }

    #[test]
    fn garbage_is_an_error() {
        let mut lying_length = family_reply(FAMILY_SEQ);
        lying_length[..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse_family_reply(&lying_length, FAMILY_SEQ).is_err());

        let mut short_length = family_reply(FAMILY_SEQ);
        short_length[..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(parse_family_reply(&short_length, FAMILY_SEQ).is_err());

        let zero_attr = genl_reply(GENL_ID_CTRL, FAMILY_SEQ, 1, &[vec![0, 0, 0, 0]]);
        assert!(parse_family_reply(&zero_attr, FAMILY_SEQ).is_err());

        let long_attr = genl_reply(
            GENL_ID_CTRL,
            FAMILY_SEQ,
            1,
            &[[200u16.to_ne_bytes(), CTRL_ATTR_FAMILY_ID.to_ne_bytes()].concat()],
        );
        assert!(parse_family_reply(&long_attr, FAMILY_SEQ).is_err());

        let wide_id = genl_reply(
            GENL_ID_CTRL,
            FAMILY_SEQ,
            1,
            &[attr(CTRL_ATTR_FAMILY_ID, &1u32.to_ne_bytes())],
        );
        assert!(parse_family_reply(&wide_id, FAMILY_SEQ).is_err());

        let narrow_features = genl_reply(
            FAMILY,
            DEV_GET_SEQ,
            NETDEV_CMD_DEV_GET,
            &[attr(NETDEV_A_DEV_XDP_FEATURES, &[4])],
        );
        assert!(parse_dev_get_reply(&narrow_features, FAMILY, DEV_GET_SEQ).is_err());

        for seed in 0u32..512 {
            let noise: Vec<u8> = (0..64u32)
                .map(|i| (seed.wrapping_mul(2_654_435_761).wrapping_add(i * 97) >> 7) as u8)
                .collect();
            let _ = parse_family_reply(&noise, FAMILY_SEQ);
            let _ = parse_dev_get_reply(&noise, FAMILY, DEV_GET_SEQ);
        }
    }

    #[test]
    fn loopback_cannot_transmit_xdp() {
        let answer = can_transmit_xdp(1).expect("the kernel answers about the loopback interface");
        assert_eq!(
            answer,
            Some(false),
            "this kernel has the netdev family, and loopback has no ndo_xdp_xmit"
        );
    }
}
