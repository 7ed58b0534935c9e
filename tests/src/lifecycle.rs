//! Harness for the lifecycle, fault and security tests: signalling and restarting the
//! daemon of a lab, running the CLI where it may fail, and a live TCP stream that proves
//! established connections keep flowing while the daemon goes away and comes back.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{JoinHandle, sleep};
use std::time::{Duration, Instant};

use crate::{BPFFS, Background, CLI_TIMEOUT_SECS, Daemon, Family, Lab, Side, delta, describe};

/// The port the stream policy opens.
pub const STREAM_PORT: u16 = 8080;
/// A port the stream policy gives no rule: new connections to it are dropped.
pub const CLOSED_PORT: u16 = 9090;
/// Bytes that prove a live stream is moving at a given moment (about a quarter second).
pub const PROGRESS: u64 = 40_000;

/// The policy of the lifecycle, fault and security tests and of the end-to-end
/// benchmark: return traffic accepted, invalid packets dropped, new TCP only to
/// [`STREAM_PORT`], everything else inbound dropped.
pub const STREAM_POLICY: &str = concat!(
    session_testkit::inbound_drop_policy!(),
    session_testkit::return_traffic_rule!("return-traffic"),
    session_testkit::invalid_drop_rule!(),
    session_testkit::accept_new_rule!("stream", "tcp", 8080),
);

/// How long a live stream may run at most, whatever the test does.
const STREAM_LIFETIME: Duration = Duration::from_secs(120);
/// Bytes per write of a live stream, and the pause between writes: about 200 KiB/s, enough
/// that a gap of a few milliseconds shows, little enough for a shared 2-CPU machine.
const STREAM_CHUNK: usize = 1024;
const STREAM_PAUSE: Duration = Duration::from_millis(5);

/// The byte at offset `n` of a live stream: a pattern with a period (251) that no chunk
/// size divides, so a lost, duplicated or reordered chunk is noticed.
fn pattern(n: u64) -> u8 {
    (n % 251) as u8
}

impl Lab {
    /// The bpffs directory where this lab's daemon pins its maps and links.
    pub fn pin_dir(&self) -> PathBuf {
        Path::new(BPFFS).join(&self.base)
    }

    /// The config file [`Lab::daemon`] writes and the daemon reads.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("session.toml")
    }

    /// A path in the lab's scratch directory, for files a test writes (a config the
    /// daemon must not find, say).
    pub fn scratch_path(&self, name: &str) -> PathBuf {
        self.scratch(name)
    }

    /// Runs `session ARGS --pin-dir DIR` in fw, bounded in time, and returns its output
    /// whatever the exit status, for commands expected to fail.
    pub fn session(&self, args: &[&str]) -> Output {
        let bin = self.bin.to_string_lossy();
        let pin = self.pin_dir();
        let pin = pin.to_string_lossy();
        let mut argv = vec![&*bin];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["--pin-dir", &*pin]);
        self.run(Side::Fw, CLI_TIMEOUT_SECS, &argv)
    }

    /// Runs the `session` binary in fw with exactly `args` (no pin directory added),
    /// prefixed by `wrapper` (e.g. `setpriv ...`), and returns its output.
    pub fn session_as(&self, wrapper: &[&str], args: &[&str]) -> Output {
        let bin = self.bin.to_string_lossy();
        let mut argv: Vec<&str> = wrapper.to_vec();
        argv.push(&bin);
        argv.extend_from_slice(args);
        self.run(Side::Fw, CLI_TIMEOUT_SECS, &argv)
    }

    /// Starts `session run` in fw on the current config file, on `ifaces` and with
    /// `pin_dir`, without waiting for it: for daemons expected to refuse to start.
    pub fn daemon_process(&self, ifaces: &[&str], pin_dir: &Path) -> Background<'_> {
        let bin = self.bin.to_string_lossy();
        let config = self.config_path();
        let config = config.to_string_lossy();
        let pin = pin_dir.to_string_lossy();
        let mut argv = vec![&*bin, "run", "--config", &*config, "--pin-dir", &*pin];
        for iface in ifaces {
            argv.extend_from_slice(&["--iface", iface]);
        }
        Background::start(self, Side::Fw, &argv)
    }

    /// Starts the daemon again on the config file already written, with the same pin
    /// directory, and waits until it is ready: the restart of a daemon that was stopped
    /// or killed.
    pub fn restart_daemon(&self) -> Daemon<'_> {
        let policy = std::fs::read_to_string(self.config_path())
            .unwrap_or_else(|e| panic!("cannot read the lab's config: {e}"));
        self.daemon(&policy)
    }

    /// How many cls_bpf filters of session's egress program `tc` shows on the firewall's
    /// interface: kernels before TCX (6.6) attach egress that way, one filter that a
    /// restart replaces rather than adds to; with TCX there are none.
    pub fn egress_tc_filters(&self) -> usize {
        let iface = Lab::iface(Side::Fw);
        let out = self.ok(
            Side::Fw,
            5,
            &["tc", "filter", "show", "dev", iface, "egress"],
        );
        out.lines().filter(|l| l.contains("session_egress")).count()
    }

    /// [`Lab::egress_tc_filters`] while session is attached: 1 before Linux 6.6, else 0.
    pub fn expected_egress_tc_filters() -> usize {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
        let mut numbers = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse::<u32>().unwrap_or(0));
        let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        usize::from(version < (6, 6))
    }

    /// `session stats --json` on this lab's pin directory, which works whether or not a
    /// daemon runs (the maps are pinned).
    pub fn pinned_stats(&self) -> serde_json::Value {
        let out = self.session(&["stats", "--json"]);
        assert!(
            out.status.success(),
            "session stats failed: {}",
            describe(&out)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("`session stats --json` is not JSON: {e}"))
    }

    /// Asserts that a new TCP connection from the client to fw:`port` (a listener is
    /// there) is refused by the firewall: the connect fails, the default drop counts it,
    /// and a capture on fw, behind the firewall, never sees its SYN. The capture is
    /// tcpdump with an in-kernel filter, so a live stream on the same link cannot crowd
    /// the SYN out of its buffer.
    pub fn assert_new_tcp_blocked(&self, port: u16, when: &str) {
        let _listener = self.tcp_listen(Side::Fw, Family::V4, port);
        let filter = format!("tcp dst port {port} and tcp[13] & 2 != 0");
        let mut capture = self.spawn(
            Side::Fw,
            &["tcpdump", "-i", crate::FW_IFACE, "-nn", "-l", "-p", &filter],
        );
        crate::wait_for(
            "tcpdump to start capturing on fw",
            Duration::from_secs(10),
            || {
                capture.assert_running();
                capture.stderr().contains("listening on").then_some(())
            },
        );
        let before = self.pinned_stats();
        let to = Family::V4.sock(Side::Fw, port);
        let attempt = self.tcp_connect(Side::Client, to, Duration::from_millis(800));
        assert!(
            attempt.is_err(),
            "a connection to the forbidden port {port} succeeded {when}"
        );
        sleep(Duration::from_millis(300));
        // tcpdump notices SIGTERM at its next buffer timeout, up to a second later.
        capture.stop(Duration::from_secs(3));
        let captured = capture.stdout();
        assert!(
            captured.trim().is_empty(),
            "SYNs to port {port} reached fw {when}:\n{captured}"
        );
        let dropped = delta(&before, &self.pinned_stats(), "drop_default");
        assert!(
            dropped >= 1,
            "the default drop did not count the SYN {when}"
        );
    }

    /// Starts a [`LiveStream`] from the client to fw:`port`.
    pub fn live_stream(&self, family: Family, port: u16) -> LiveStream {
        let (client, server) = self.tcp_pair(family, port);
        LiveStream::start(client, server)
    }
}

impl Background<'_> {
    /// The process id (for `session run`, the daemon's own: nsenter execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Removes a pin directory on drop, for tests that start daemons outside a [`Daemon`]
/// guard: their pinned links and maps must not outlive the test.
pub struct PinGuard(PathBuf);

impl PinGuard {
    /// Guards `pin_dir`.
    pub fn new(pin_dir: PathBuf) -> PinGuard {
        PinGuard(pin_dir)
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if self.0.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.0)
        {
            eprintln!("warning: cannot remove {}: {e}", self.0.display());
        }
    }
}

impl Daemon<'_> {
    /// The daemon's process id (nsenter execs it), for signals and its /proc status.
    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGKILL`) to the daemon.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill with our own child's pid and a valid signal.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
        assert!(
            rc == 0,
            "cannot signal the daemon: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Waits at most `timeout` for the daemon to exit, and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.proc.wait_exit(timeout)
    }

    /// Panics with the daemon's log if it has exited.
    pub fn assert_running(&mut self) {
        self.proc.assert_running();
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        self.proc.stderr()
    }

    /// Waits at most `timeout` for `needle` in the daemon's log.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        crate::wait_for(&format!("{needle:?} in the daemon's log"), timeout, || {
            self.log().contains(needle).then_some(())
        });
    }

    /// Runs `session ARGS --pin-dir DIR` and returns its output whatever the status.
    pub fn cli_output(&self, args: &[&str]) -> Output {
        self.proc.lab.session(args)
    }
}

/// A TCP connection through the firewall that carries a steady, verifiable byte stream
/// from the client to fw on two threads, until [`LiveStream::finish`]. The reader checks
/// every byte against the pattern, so a loss, a duplicate or a reset fails the test, and
/// a pause of [`crate::IO_TIMEOUT`] fails its read; the sender's retransmission count
/// shows whether any segment was dropped on the way, even one TCP repaired.
pub struct LiveStream {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    writer: Option<JoinHandle<Result<(u64, u32), String>>>,
    reader: Option<JoinHandle<Result<u64, String>>>,
}

/// The client's count of retransmitted segments (TCP_INFO), so a test can tell that
/// nothing was dropped even though TCP repaired it.
fn retransmissions(stream: &TcpStream) -> Result<u32, String> {
    // SAFETY: an all-zero tcp_info is valid; getsockopt writes at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket fd, and a buffer of `len` bytes we own.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(format!("TCP_INFO: {}", std::io::Error::last_os_error()));
    }
    Ok(info.tcpi_total_retrans)
}

impl LiveStream {
    /// Starts the stream over an open connection (`client` writes, `server` reads), for
    /// connections [`Lab::live_stream`] does not make (forwarded ones, say).
    pub fn start(mut client: TcpStream, mut server: TcpStream) -> LiveStream {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let writer = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut sent = 0u64;
                let mut chunk = vec![0u8; STREAM_CHUNK];
                while !stop.load(Ordering::Relaxed) && started.elapsed() < STREAM_LIFETIME {
                    for (i, byte) in chunk.iter_mut().enumerate() {
                        *byte = pattern(sent + i as u64);
                    }
                    client
                        .write_all(&chunk)
                        .map_err(|e| format!("client write failed after {sent} bytes: {e}"))?;
                    sent += STREAM_CHUNK as u64;
                    sleep(STREAM_PAUSE);
                }
                let retransmitted = retransmissions(&client)?;
                client
                    .shutdown(Shutdown::Write)
                    .map_err(|e| format!("client shutdown failed: {e}"))?;
                Ok((sent, retransmitted))
            })
        };
        let reader = {
            let received = Arc::clone(&received);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0u64;
                loop {
                    let n = match server.read(&mut buf) {
                        Ok(0) => return Ok(total),
                        Ok(n) => n,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => {
                            return Err(format!("server read failed after {total} bytes: {e}"));
                        }
                    };
                    if let Some(bad) = (0..n).find(|&i| buf[i] != pattern(total + i as u64)) {
                        return Err(format!(
                            "stream corrupted at byte {}: got {}, expected {}",
                            total + bad as u64,
                            buf[bad],
                            pattern(total + bad as u64)
                        ));
                    }
                    total += n as u64;
                    received.store(total, Ordering::Relaxed);
                }
            })
        };
        LiveStream {
            stop,
            received,
            writer: Some(writer),
            reader: Some(reader),
        }
    }

    /// Bytes the server has received and checked so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Waits (at most 10 s) until the server has received `more` bytes beyond what it had
    /// on entry, proving the stream flows at this moment.
    pub fn assert_flowing(&self, more: u64, when: &str) {
        let start = self.received();
        crate::wait_for(
            &format!("the live stream to carry {more} more bytes {when} (had {start})"),
            Duration::from_secs(10),
            || (self.received() >= start + more).then_some(()),
        );
    }

    /// Stops the writer, lets the reader drain to end of file, and panics unless every
    /// byte sent arrived intact and in order with no error or reset on either side, and
    /// no segment had to be retransmitted. Returns the number of bytes carried.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let (sent, retransmitted) = join(self.writer.take(), "writer");
        let received = join(self.reader.take(), "reader");
        assert_eq!(sent, received, "bytes sent and received differ");
        assert_eq!(
            retransmitted, 0,
            "the client retransmitted {retransmitted} segment(s): the path dropped some"
        );
        received
    }
}

fn join<T>(handle: Option<JoinHandle<Result<T, String>>>, what: &str) -> T {
    handle
        .expect("joined once")
        .join()
        .unwrap_or_else(|_| panic!("live stream {what} thread panicked"))
        .unwrap_or_else(|e| panic!("live stream {what}: {e}"))
}

impl Drop for LiveStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
