//! State sync and failover (issue 23): two firewalls behind VRRP virtual addresses
//! (keepalived), `tcp_loose` off on both, sessions synced over their own link. A TCP
//! stream (every byte checked) and a UDP stream run through the active one; when it
//! fails, the standby carries on with both. Also: a lossy sync link converges, a
//! restarted standby gets a full resync, a peer with a wrong key changes nothing.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle, sleep},
    time::{Duration, Instant},
};

use session_tests::{
    ha::{CLIENT, Echo, Fw, HaLab, SERVER},
    wait_for,
};

const TCP_PORT: u16 = 5001;
const UDP_PORT: u16 = 6001;

/// The byte at offset `i` of the TCP stream.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 9)) as u8
}

/// A TCP stream from client to server whose every byte the server checks, and a UDP
/// stream the server echoes; both run until [`Streams::finish`].
struct Streams {
    stop: Arc<AtomicBool>,
    tcp_sender: JoinHandle<Result<u64, String>>,
    tcp_receiver: JoinHandle<Result<u64, String>>,
    udp_sender: JoinHandle<u64>,
    udp_echoes: JoinHandle<Vec<(u64, Instant)>>,
    udp_echo_server: JoinHandle<()>,
    started: Instant,
}

/// What the streams did.
struct Outcome {
    tcp_sent: Result<u64, String>,
    tcp_received: Result<u64, String>,
    udp_sent: u64,
    /// Sequence numbers echoed, with when the echo arrived.
    udp_echoes: Vec<(u64, Instant)>,
}

impl Outcome {
    /// The bytes the TCP stream carried, once checked that every one arrived, in order.
    fn tcp_intact(&self, lab: &HaLab) -> u64 {
        let sent = self
            .tcp_sent
            .as_ref()
            .unwrap_or_else(|e| panic!("TCP sender: {e}\n{}", lab.logs()));
        let received = self
            .tcp_received
            .as_ref()
            .unwrap_or_else(|e| panic!("TCP receiver: {e}\n{}", lab.logs()));
        assert_eq!(received, sent, "every byte sent arrived, in order");
        *sent
    }
}

impl Streams {
    fn start(lab: &HaLab) -> Streams {
        let stop = Arc::new(AtomicBool::new(false));
        let listener = lab.server_listen(TCP_PORT);
        let mut client = lab.client_connect(TCP_PORT);
        let (mut server, _) = listener.accept().expect("accept the stream");
        server
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        client
            .set_write_timeout(Some(Duration::from_secs(30)))
            .expect("write timeout");
        let tcp_receiver = thread::spawn(move || check_stream(&mut server));
        let flag = Arc::clone(&stop);
        let tcp_sender = thread::spawn(move || send_stream(&mut client, &flag));

        let echo = lab.udp("s", SERVER, UDP_PORT);
        echo.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let flag = Arc::clone(&stop);
        let udp_echo_server = thread::spawn(move || {
            let mut buf = [0u8; 64];
            let deadline = Instant::now() + Duration::from_secs(120);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok((len, from)) = echo.recv_from(&mut buf) {
                    let _ = echo.send_to(&buf[..len], from);
                }
            }
        });
        let udp = lab.udp("c", CLIENT, 6000);
        udp.connect((SERVER, UDP_PORT)).expect("connect UDP");
        udp.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let receiver = udp.try_clone().expect("clone UDP socket");
        let flag = Arc::clone(&stop);
        let udp_echoes = thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            let deadline = Instant::now() + Duration::from_secs(120);
            while Instant::now() < deadline {
                match receiver.recv(&mut buf) {
                    Ok(8) => got.push((
                        u64::from_le_bytes(buf[..8].try_into().expect("8 bytes")),
                        Instant::now(),
                    )),
                    Ok(_) => {}
                    Err(_) if flag.load(Ordering::Relaxed) => break,
                    Err(_) => {}
                }
            }
            got
        });
        let flag = Arc::clone(&stop);
        let udp_sender = thread::spawn(move || {
            let mut seq = 0u64;
            let deadline = Instant::now() + Duration::from_secs(120);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                let _ = udp.send(&seq.to_le_bytes());
                seq += 1;
                sleep(Duration::from_millis(10));
            }
            seq
        });
        Streams {
            stop,
            tcp_sender,
            tcp_receiver,
            udp_sender,
            udp_echoes,
            udp_echo_server,
            started: Instant::now(),
        }
    }

    fn finish(self) -> Outcome {
        self.stop.store(true, Ordering::Relaxed);
        let tcp_sent = self.tcp_sender.join().expect("TCP sender");
        let tcp_received = self.tcp_receiver.join().expect("TCP receiver");
        let udp_sent = self.udp_sender.join().expect("UDP sender");
        sleep(Duration::from_millis(300));
        let udp_echoes = self.udp_echoes.join().expect("UDP receiver");
        self.udp_echo_server.join().expect("UDP echo server");
        Outcome {
            tcp_sent,
            tcp_received,
            udp_sent,
            udp_echoes,
        }
    }
}

/// Writes the pattern in 8 KiB chunks every 2 ms (about 4 MB/s) until `stop`, then
/// closes its side; returns the bytes written.
fn send_stream(stream: &mut TcpStream, stop: &AtomicBool) -> Result<u64, String> {
    let mut sent = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let chunk: Vec<u8> = (sent..sent + 8192).map(pattern).collect();
        stream
            .write_all(&chunk)
            .map_err(|e| format!("write at byte {sent}: {e}"))?;
        sent += chunk.len() as u64;
        sleep(Duration::from_millis(2));
    }
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    Ok(sent)
}

/// Reads to the end, checking every byte against the pattern; returns the bytes read.
fn check_stream(stream: &mut TcpStream) -> Result<u64, String> {
    let mut got = 0u64;
    let mut buf = vec![0u8; 65536];
    loop {
        let len = stream
            .read(&mut buf)
            .map_err(|e| format!("read at byte {got}: {e}"))?;
        if len == 0 {
            return Ok(got);
        }
        for (i, byte) in buf[..len].iter().enumerate() {
            let at = got + i as u64;
            if *byte != pattern(at) {
                return Err(format!("byte {at} is {byte}, not {}", pattern(at)));
            }
        }
        got += len as u64;
    }
}

/// A lab with both daemons and both keepalived running, fw1 the active, the link up.
fn active_standby(tag: &str) -> HaLab {
    let mut lab = HaLab::new(tag);
    lab.start_session(Fw::One);
    lab.start_session(Fw::Two);
    lab.start_keepalived(Fw::One);
    lab.wait_master(Fw::One, Duration::from_secs(10));
    lab.start_keepalived(Fw::Two);
    for fw in [Fw::One, Fw::Two] {
        wait_for(
            &format!("{fw:?}'s sync peer to be up"),
            Duration::from_secs(10),
            || (lab.sync_status(fw)["peer"] == "up").then_some(()),
        );
    }
    lab
}

/// A lab with fw1 the active, the streams running through it and synced to fw2.
fn streams_through_the_active(tag: &str) -> (HaLab, Streams) {
    let lab = active_standby(tag);
    let streams = Streams::start(&lab);
    sleep(Duration::from_secs(1));
    wait_synced(&lab, Fw::Two);
    (lab, streams)
}

/// Waits until the standby holds the streams' sessions as the active has them.
fn wait_synced(lab: &HaLab, standby: Fw) {
    wait_for(
        "the standby to hold the TCP stream ESTABLISHED and the UDP stream REPLIED",
        Duration::from_secs(5),
        || {
            let table = lab.table(standby);
            let tcp = table.iter().any(|(proto, src, _, dst, dport, state)| {
                proto == "tcp"
                    && src == CLIENT
                    && dst == SERVER
                    && *dport == 5001
                    && state == "ESTABLISHED"
            });
            let udp = table.iter().any(|(proto, src, _, _, dport, state)| {
                proto == "udp" && src == CLIENT && *dport == 6001 && state == "REPLIED"
            });
            (tcp && udp).then_some(())
        },
    );
}

/// Stops the streams and checks that every TCP byte arrived and that `fw` carried them at
/// the end (over a thousand packets accepted since `accepted_before`); returns what they
/// did and the TCP bytes sent.
fn finish_through(lab: &HaLab, streams: Streams, fw: Fw, accepted_before: u64) -> (Outcome, u64) {
    let outcome = streams.finish();
    let sent = outcome.tcp_intact(lab);
    let through = accepted(lab, fw) - accepted_before;
    assert!(
        through > 1000,
        "the streams went on through {fw:?} ({through} packets accepted there)"
    );
    assert!(sent > 1_000_000, "the stream ran ({sent} bytes)");
    (outcome, sent)
}

/// Waits until `fw`'s `session sync check` (keepalived's health check) passes.
fn wait_check_passes(lab: &HaLab, fw: Fw) {
    wait_for(
        &format!("{fw:?}'s `session sync check` to pass"),
        Duration::from_secs(10),
        || {
            let check = lab.cli_status(fw, &["sync", "check"]);
            check.status.success().then_some(())
        },
    );
}

/// Packets `fw` accepted so far.
fn accepted(lab: &HaLab, fw: Fw) -> u64 {
    stat(lab, fw, "packets_accepted")
}

/// The counter `name` of `fw`'s `session stats`.
fn stat(lab: &HaLab, fw: Fw, name: &str) -> u64 {
    let stats: serde_json::Value =
        serde_json::from_str(&lab.cli(fw, &["stats", "--json"])).expect("stats are JSON");
    session_tests::counter(&stats, name)
}

/// Runs the streams through fw1, fails it over with `fail`, and checks that both streams
/// went on through fw2: every TCP byte arrived in order with no reset, and UDP echoes
/// came back through fw2 after the failover.
fn streams_survive_failover(tag: &str, fail: impl FnOnce(&mut HaLab)) {
    let (mut lab, streams) = streams_through_the_active(tag);
    let accepted_before = accepted(&lab, Fw::Two);
    let failed_at = Instant::now();
    fail(&mut lab);
    lab.wait_master(Fw::Two, Duration::from_secs(15));
    let promoted_after = failed_at.elapsed();
    assert!(
        lab.ever_master(Fw::Two),
        "fw2's keepalived logged its promotion"
    );
    sleep(Duration::from_secs(3));
    let started = streams.started;
    let (outcome, sent) = finish_through(&lab, streams, Fw::Two, accepted_before);
    let after: Vec<u64> = outcome
        .udp_echoes
        .iter()
        .filter(|(_, at)| *at > failed_at + promoted_after + Duration::from_millis(500))
        .map(|(seq, _)| *seq)
        .collect();
    assert!(
        after.len() > 50,
        "UDP echoes came back through fw2 after the failover: {} of {} sent (stream started {:?} before the failure)",
        after.len(),
        outcome.udp_sent,
        failed_at - started
    );
    eprintln!(
        "{tag}: fw2 promoted {promoted_after:?} after the failure; TCP {sent} bytes intact; UDP {} of {} echoed",
        outcome.udp_echoes.len(),
        outcome.udp_sent
    );
}

#[test]
fn streams_survive_when_the_active_keepalived_stops() {
    streams_survive_failover("stop", |lab| lab.stop_keepalived(Fw::One, "-TERM"));
}

#[test]
fn streams_survive_when_the_active_loses_its_links() {
    streams_survive_failover("cut", |lab| lab.cut_links(Fw::One));
}

/// The active's session daemon is SIGKILLed and stays down: its pinned programs go on
/// forwarding, but nothing is replicated any more, so keepalived's health check (`session
/// sync check`, five failures a second apart) moves the addresses to the standby.
#[test]
fn streams_survive_when_the_active_daemon_is_killed() {
    streams_survive_failover("kill", |lab| {
        lab.stop_session(Fw::One, "-KILL");
        let check = lab.cli_status(Fw::One, &["sync", "check"]);
        assert!(
            !check.status.success()
                && String::from_utf8_lossy(&check.stderr).contains("no session daemon runs"),
            "the check fails once the daemon is gone: {check:?}"
        );
    });
}

/// The active's keepalived stops, the standby carries the streams for a few seconds,
/// then the active's keepalived starts again and takes the addresses back (it has the
/// higher priority): the streams come back through fw1 without a reset or a lost byte,
/// although their sequence numbers moved on while fw2 carried them.
#[test]
fn streams_survive_a_failover_and_the_failback() {
    let (mut lab, streams) = streams_through_the_active("failback");
    lab.stop_keepalived(Fw::One, "-TERM");
    lab.wait_master(Fw::Two, Duration::from_secs(15));
    sleep(Duration::from_secs(3));
    let accepted_before = accepted(&lab, Fw::One);
    let failed_back_at = Instant::now();
    lab.start_keepalived(Fw::One);
    lab.wait_master(Fw::One, Duration::from_secs(15));
    let back_after = failed_back_at.elapsed();
    sleep(Duration::from_secs(3));
    let (outcome, sent) = finish_through(&lab, streams, Fw::One, accepted_before);
    let after: usize = outcome
        .udp_echoes
        .iter()
        .filter(|(_, at)| *at > failed_back_at + back_after + Duration::from_millis(500))
        .count();
    assert!(
        after > 50,
        "UDP echoes came back through fw1 after the failback: {after}"
    );
    eprintln!(
        "failback: fw1 took the addresses back {back_after:?} after its keepalived started; TCP {sent} bytes intact"
    );
}

/// fw1 loses every link, the sync link too, for a few seconds: fw2 carries the streams
/// and opens a connection fw1 never hears of. When the links come back, fw1 takes the
/// addresses back at once (VRRP preemption), without waiting for the peers' resync; a
/// segment of those connections that reached fw1 before the resync would be INVALID and
/// sent again by TCP. Either way: no reset, no lost byte, and the new connection works
/// through fw1. The INVALID count on fw1 is printed, not asserted: it depends on which
/// arrives first.
#[test]
fn streams_survive_a_partition_and_the_return() {
    let (lab, streams) = streams_through_the_active("partition");
    lab.lossy_sync(Fw::One, 1);
    lab.cut_links(Fw::One);
    lab.wait_master(Fw::Two, Duration::from_secs(15));
    let listener = lab.server_listen(TCP_PORT + 1);
    let mut client = lab.client_connect(TCP_PORT + 1);
    let (mut server, _) = listener.accept().expect("accept through fw2");
    for stream in [&mut client, &mut server] {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
    }
    let round_trip = |client: &mut TcpStream, server: &mut TcpStream, what: &str| {
        let mut buf = [0u8; 5];
        client.write_all(b"hello").expect("client writes");
        server
            .read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("{what}: the server reads: {e}"));
        server.write_all(&buf).expect("server answers");
        client
            .read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("{what}: the client reads the answer: {e}"));
        assert_eq!(&buf, b"hello", "{what}");
    };
    round_trip(&mut client, &mut server, "through fw2 during the partition");
    // Long enough for each side to count the other down (2 s without a datagram).
    sleep(Duration::from_secs(3));
    let accepted_before = accepted(&lab, Fw::One);
    lab.restore_links(Fw::One);
    lab.clear_sync_loss(Fw::One);
    lab.wait_master(Fw::One, Duration::from_secs(15));
    round_trip(&mut client, &mut server, "through fw1 after its return");
    sleep(Duration::from_secs(3));
    let (_, sent) = finish_through(&lab, streams, Fw::One, accepted_before);
    let invalid = stat(&lab, Fw::One, "state_invalid");
    eprintln!(
        "partition: TCP {sent} bytes intact; the connection opened on fw2 works through fw1; fw1 judged {invalid} packet(s) INVALID"
    );
}

/// A daemon back within systemd's restart delay (2 s) keeps the addresses: the health
/// check's five failures are not reached, fw2 never becomes master, and the streams go
/// on through fw1 without a lost byte.
#[test]
fn a_daemon_restarted_within_seconds_keeps_the_addresses() {
    let (mut lab, streams) = streams_through_the_active("restart-active");
    lab.stop_session(Fw::One, "-KILL");
    sleep(Duration::from_secs(2));
    lab.start_session(Fw::One);
    wait_check_passes(&lab, Fw::One);
    // Past the point where five failed checks would have moved the addresses.
    sleep(Duration::from_secs(4));
    assert!(
        lab.holds_vip(Fw::One),
        "fw1 kept the addresses\n{}",
        lab.logs()
    );
    assert!(
        !lab.ever_master(Fw::Two),
        "fw2 never took them\n{}",
        lab.logs()
    );
    let outcome = streams.finish();
    outcome.tcp_intact(&lab);
    assert!(
        outcome.udp_echoes.len() as u64 + 5 >= outcome.udp_sent,
        "UDP went on: {} of {} echoed",
        outcome.udp_echoes.len(),
        outcome.udp_sent
    );
}

/// Opens one UDP flow from each client port of `ports` to the echo server and waits
/// for its echo (retrying a few times), so each is a REPLIED session on the active.
fn udp_flows(lab: &HaLab, ports: std::ops::Range<u16>) {
    for port in ports {
        let socket = lab.udp("c", CLIENT, port);
        socket.connect((SERVER, UDP_PORT)).expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let mut buf = [0u8; 8];
        let echoed = (0..5)
            .any(|_| socket.send(&port.to_le_bytes()).is_ok() && socket.recv(&mut buf).is_ok());
        assert!(echoed, "UDP flow from port {port} echoed\n{}", lab.logs());
    }
}

/// Opens `count` TCP connections from the client to the server and returns both ends.
fn tcp_connections(lab: &HaLab, port: u16, count: usize) -> Vec<(TcpStream, TcpStream)> {
    let listener = lab.server_listen(port);
    (0..count)
        .map(|_| {
            let client = lab.client_connect(port);
            let (server, _) = listener.accept().expect("accept");
            (client, server)
        })
        .collect()
}

/// Waits at most `timeout` until both firewalls' TCP and UDP tables are equal and hold
/// at least `at_least` sessions; returns how long it took.
fn wait_equal_tables(lab: &HaLab, at_least: usize, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let (one, two) = (lab.table(Fw::One), lab.table(Fw::Two));
        if one == two && one.len() >= at_least {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "the tables differ {timeout:?} after the loss stopped: fw1 has {} sessions, fw2 {}; only in fw1: {:?}; only in fw2: {:?}",
            one.len(),
            two.len(),
            one.iter()
                .filter(|s| !two.contains(s))
                .take(5)
                .collect::<Vec<_>>(),
            two.iter()
                .filter(|s| !one.contains(s))
                .take(5)
                .collect::<Vec<_>>(),
        );
        sleep(Duration::from_millis(50));
    }
}

fn status_counter(lab: &HaLab, fw: Fw, name: &str) -> u64 {
    lab.sync_status(fw)[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in sync status"))
}

#[test]
fn a_lossy_sync_link_converges_once_the_loss_stops() {
    let lab = active_standby("loss");
    let _echo = Echo::start(&lab, UDP_PORT);
    lab.lossy_sync(Fw::One, 10);
    // Flows come and change over 3 s of loss, so that many sync messages cross it.
    for batch in 0..15u16 {
        udp_flows(&lab, 20_000 + batch * 20..20_020 + batch * 20);
        sleep(Duration::from_millis(200));
    }
    let mut connections = tcp_connections(&lab, 5002, 30);
    // State changes under loss too: a third of the connections close.
    for (client, server) in connections.drain(..10) {
        client.shutdown(Shutdown::Both).expect("close client");
        server.shutdown(Shutdown::Both).expect("close server");
    }
    sleep(Duration::from_secs(1));
    let dropped = lab.clear_sync_loss(Fw::One);
    let took = wait_equal_tables(&lab, 320, Duration::from_secs(1));
    assert!(
        dropped >= 5,
        "the loss rule dropped sync datagrams ({dropped})"
    );
    wait_for(
        "the active to count retransmissions",
        Duration::from_secs(2),
        || (status_counter(&lab, Fw::One, "retransmitted") > 0).then_some(()),
    );
    eprintln!(
        "loss: {dropped} sync datagrams dropped; tables equal {took:?} after the loss stopped"
    );
    drop(connections);
}

#[test]
fn a_restarted_standby_gets_a_full_resync() {
    let mut lab = active_standby("restart");
    let _echo = Echo::start(&lab, UDP_PORT);
    udp_flows(&lab, 21_000..21_050);
    wait_equal_tables(&lab, 50, Duration::from_secs(5));
    let resyncs_before = status_counter(&lab, Fw::One, "resyncs");
    // The standby goes, with its table; traffic goes on meanwhile.
    lab.stop_session(Fw::Two, "-TERM");
    lab.cli(Fw::Two, &["down"]);
    udp_flows(&lab, 21_050..21_100);
    // The restarted standby hears nothing from the active at first: keepalived's check
    // must fail until the active's whole table is in the standby's.
    lab.lossy_sync(Fw::Two, 1);
    lab.start_session(Fw::Two);
    let check = lab.cli_status(Fw::Two, &["sync", "check"]);
    assert!(
        !check.status.success()
            && String::from_utf8_lossy(&check.stderr)
                .contains("waiting for its peer's full resync"),
        "a restarted standby that has not heard its peer is not ready: {check:?}"
    );
    lab.clear_sync_loss(Fw::Two);
    wait_check_passes(&lab, Fw::Two);
    let held = lab
        .table(Fw::Two)
        .iter()
        .filter(|(proto, _, sport, _, _, _)| proto == "udp" && (21_000..21_100).contains(sport))
        .count();
    assert_eq!(
        held, 100,
        "the standby held every flow when its check first passed"
    );
    assert_eq!(lab.sync_status(Fw::Two)["ready"], true);
    wait_equal_tables(&lab, 100, Duration::from_secs(10));
    // The counters are published once per interval, after the work they count.
    wait_for(
        "the active to count a full resync to the restarted standby, and the standby to count the whole table installed",
        Duration::from_secs(2),
        || {
            (status_counter(&lab, Fw::One, "resyncs") > resyncs_before
                && status_counter(&lab, Fw::Two, "installed") >= 100)
                .then_some(())
        },
    );
}

#[test]
fn a_peer_with_a_wrong_key_is_refused_and_changes_nothing() {
    let mut lab = HaLab::new("key");
    lab.start_session(Fw::One);
    let wrong = lab.write_key("wrong.key", &[0x33; 32]);
    lab.start_session_with_key(Fw::Two, &wrong);
    lab.start_keepalived(Fw::One);
    lab.wait_master(Fw::One, Duration::from_secs(10));
    let _echo = Echo::start(&lab, UDP_PORT);
    udp_flows(&lab, 22_000..22_020);
    wait_for(
        "both sides to count the other's datagrams as authentication failures",
        Duration::from_secs(5),
        || {
            (status_counter(&lab, Fw::One, "auth_failures") > 0
                && status_counter(&lab, Fw::Two, "auth_failures") > 0)
                .then_some(())
        },
    );
    sleep(Duration::from_millis(500));
    assert_eq!(lab.table(Fw::One).len(), 20, "the active holds the flows");
    assert!(
        lab.table(Fw::Two).is_empty(),
        "nothing from the peer with the wrong key was installed: {:?}",
        lab.table(Fw::Two)
    );
    for fw in [Fw::One, Fw::Two] {
        let status = lab.sync_status(fw);
        assert_ne!(status["peer"], "up", "{fw:?} never saw its peer: {status}");
        assert_eq!(status["installed"], 0, "{fw:?}: {status}");
        assert_eq!(status["received"], 0, "{fw:?}: {status}");
    }
}
