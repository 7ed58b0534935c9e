//! The fast path (`[forwarding] fast_path`): fw routes between the client (LAN) and
//! upstream (WAN), and packets of established TCP and UDP sessions cross it in XDP, with
//! the hop taken off their IP headers as the kernel's forwarding would; new flows, ICMP
//! and packets whose hop limit runs out still go through the kernel.

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use session_tests::router::{
    UPSTREAM_IFACE, UPSTREAM_V4, UPSTREAM_V6, Upstream, WAN_IFACE, lan_out_rule, routed_lab,
    router_policy, upstream_host,
};
use session_tests::{
    FW_IFACE, Family, IO_TIMEOUT, Lab, Side, accept_within, counter, delta, set_socket_option,
};

/// A router's policy in which the LAN may open anything, upstream nothing.
fn lan_out_policy(fast_path: bool) -> String {
    router_policy(fast_path, &lan_out_rule(None))
}

fn upstream_addr(family: Family, port: u16) -> SocketAddr {
    let ip = match family {
        Family::V4 => UPSTREAM_V4,
        Family::V6 => UPSTREAM_V6,
    };
    SocketAddr::new(ip.parse().expect("upstream address"), port)
}

/// Asks the kernel to report each datagram's TTL or hop limit with it.
fn report_hops(socket: &UdpSocket, family: Family) {
    let on: libc::c_int = 1;
    match family {
        Family::V4 => {
            set_socket_option(socket.as_raw_fd(), libc::IPPROTO_IP, libc::IP_RECVTTL, &on)
        }
        Family::V6 => set_socket_option(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_RECVHOPLIMIT,
            &on,
        ),
    }
}

/// The TTL or hop limit the next datagram on `socket` arrived with, if one arrives within
/// the socket's read timeout ([`report_hops`] must be on).
fn recv_hops(socket: &UdpSocket) -> Option<u8> {
    let mut data = [0u8; 2048];
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: all zero bytes are a valid msghdr; the pointers are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: every buffer `msg` points at lives until the call returns.
    if unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, 0) } < 0 {
        return None;
    }
    let mut hops = None;
    // SAFETY: walking the control messages the kernel wrote into `control`, with the
    // length it reported in `msg`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let (level, kind) = ((*cmsg).cmsg_level, (*cmsg).cmsg_type);
            if (level, kind) == (libc::IPPROTO_IP, libc::IP_TTL)
                || (level, kind) == (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT)
            {
                hops = Some(libc::CMSG_DATA(cmsg).cast::<libc::c_int>().read_unaligned() as u8);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Some(hops.expect("no TTL or hop limit came with the datagram"))
}

/// Sends `count` datagrams from the client to upstream's socket over an established UDP
/// session (upstream answered the first) and returns the hops each arrived with.
fn udp_hops(
    lab: &Lab,
    upstream: &Upstream<'_>,
    family: Family,
    port: u16,
    count: usize,
    ttl: Option<u32>,
) -> Vec<u8> {
    let server = upstream
        .in_ns(|| UdpSocket::bind(upstream_addr(family, port)))
        .expect("binding upstream's UDP socket");
    server
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("read timeout");
    report_hops(&server, family);
    let client = lab.udp_socket(Side::Client, family, port);
    client
        .connect(upstream_addr(family, port))
        .expect("connecting the client's socket");
    client
        .send(b"open")
        .expect("client sends the first datagram");
    recv_hops(&server).expect("the first datagram crossed fw");
    server
        .send_to(b"answer", family.sock(Side::Client, port))
        .expect("upstream answers");
    let mut answer = [0u8; 16];
    client
        .recv(&mut answer)
        .expect("the answer crossed fw: the session is established");
    if let Some(ttl) = ttl {
        let (level, name) = match family {
            Family::V4 => (libc::IPPROTO_IP, libc::IP_TTL),
            Family::V6 => (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS),
        };
        set_socket_option(client.as_raw_fd(), level, name, &(ttl as libc::c_int));
    }
    (0..count)
        .filter_map(|i| {
            client
                .send(format!("datagram {i}").as_bytes())
                .expect("client sends");
            recv_hops(&server)
        })
        .collect()
}

#[test]
fn established_flows_cross_fw_in_xdp_one_hop_shorter_and_new_ones_through_the_kernel() {
    let lab = routed_lab("fastpath");
    let upstream = upstream_host(&lab);
    let daemon = lab.daemon(&lan_out_policy(true));

    for (family, port) in [(Family::V4, 5001), (Family::V6, 5002)] {
        let before = daemon.stats_json();
        let hops = udp_hops(&lab, &upstream, family, port, 20, None);
        let after = daemon.stats_json();
        assert_eq!(
            hops,
            vec![63; 20],
            "{family:?}: every datagram must arrive, with the client's 64 hops less fw's one"
        );
        let forwarded = delta(&before, &after, "fast_path_forwarded");
        assert_eq!(
            forwarded, 21,
            "{family:?}: upstream's answer (the reply, so established) and the 20 datagrams \
             after it take the fast path; the first datagram (new) does not: {after}"
        );
    }

    // A datagram whose hop limit runs out at fw is the kernel's: it answers with ICMP
    // time exceeded and does not forward it.
    let before = daemon.stats_json();
    let hops = udp_hops(&lab, &upstream, Family::V4, 5003, 3, Some(1));
    let after = daemon.stats_json();
    assert!(
        hops.is_empty(),
        "datagrams sent with TTL 1 must not cross fw, got TTLs {hops:?}"
    );
    assert_eq!(
        delta(&before, &after, "fast_path_forwarded"),
        1,
        "only upstream's answer takes the fast path; a TTL about to run out must not"
    );

    // TCP both ways: a connection from the LAN carries data both ways, and its segments
    // after the handshake take the fast path.
    let before = daemon.stats_json();
    let listener = upstream.tcp_listen(upstream_addr(Family::V4, 443));
    let mut client = lab
        .tcp_connect(Side::Client, upstream_addr(Family::V4, 443), IO_TIMEOUT)
        .expect("the LAN connects upstream");
    let mut server = accept_within(&listener, IO_TIMEOUT);
    for round in 0..50u32 {
        let request = round.to_be_bytes();
        client.write_all(&request).expect("client writes");
        let mut got = [0u8; 4];
        server.read_exact(&mut got).expect("upstream reads");
        assert_eq!(got, request, "round {round}: the request arrived intact");
        server.write_all(&got).expect("upstream answers");
        client.read_exact(&mut got).expect("client reads");
        assert_eq!(got, request, "round {round}: the answer arrived intact");
    }
    let after = daemon.stats_json();
    let forwarded = delta(&before, &after, "fast_path_forwarded");
    assert!(
        forwarded >= 100,
        "the 100 data segments of an established connection take the fast path; \
         {forwarded} did"
    );

    // Upstream still cannot open anything: new flows meet the policy in the kernel path.
    assert!(
        upstream
            .tcp_connect(
                None,
                Family::V4.sock(Side::Client, 22),
                Duration::from_secs(1)
            )
            .is_err(),
        "a connection opened from upstream must stay blocked with the fast path on"
    );
    // The session counts the packets that took the fast path, as any other.
    let sessions = daemon.list_json();
    let session = sessions
        .iter()
        .find(|s| s["proto"] == "tcp" && s["dport"] == 443)
        .unwrap_or_else(|| panic!("no session for the connection: {sessions:?}"));
    for side in ["orig_packets", "reply_packets"] {
        let packets = session[side].as_u64().expect("a packet count");
        assert!(packets >= 50, "{side}: {packets} in {session}");
    }
    drop(daemon);
    drop(upstream);
}

#[test]
fn without_the_switch_no_packet_takes_the_fast_path() {
    let lab = routed_lab("nofastpath");
    let upstream = upstream_host(&lab);
    let daemon = lab.daemon(&lan_out_policy(false));
    let before = daemon.stats_json();
    let hops = udp_hops(&lab, &upstream, Family::V4, 5001, 20, None);
    let after = daemon.stats_json();
    assert_eq!(hops, vec![63; 20], "the kernel forwards every datagram");
    assert_eq!(
        delta(&before, &after, "fast_path_forwarded"),
        0,
        "fast_path = false: nothing may take the fast path"
    );
    assert!(
        counter(&after, "state_established") >= 20,
        "the datagrams are still tracked as established: {after}"
    );
    drop(daemon);
    drop(upstream);
}

#[test]
fn an_interface_that_cannot_take_redirected_frames_is_left_out_with_a_warning() {
    let lab = routed_lab("fastpathout");
    // Upstream's end without GRO: veth drops the XDP frames redirected to wan0.
    let upstream = lab.upstream();
    upstream.ok(
        5,
        &["ethtool", "-K", UPSTREAM_IFACE, "gro", "off", "tx", "off"],
    );
    let daemon = lab.daemon(&lan_out_policy(true));
    let warning = format!("{WAN_IFACE}: the fast path will not forward out of it");
    assert!(
        daemon.stderr().contains(&warning),
        "the daemon must say that {WAN_IFACE} is left out: {}",
        daemon.stderr()
    );
    let before = daemon.stats_json();
    let hops = udp_hops(&lab, &upstream, Family::V4, 5001, 20, None);
    let after = daemon.stats_json();
    assert_eq!(
        hops,
        vec![63; 20],
        "the kernel forwards every datagram upstream"
    );
    assert_eq!(
        delta(&before, &after, "fast_path_forwarded"),
        1,
        "only upstream's answer, out of {FW_IFACE}, takes the fast path"
    );
    drop(daemon);
    drop(upstream);
}
