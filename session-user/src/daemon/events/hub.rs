//! The daemon's end of the event stream: the Unix socket `session events` clients connect
//! to, and the fan-out that hands every event (serialised once) to each of them.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::maps::{Map, MapData, RingBuf};
use log::warn;
use session_common::wire::{FlowKey, Session, map_names};
use tokio::{
    io::{AsyncWriteExt as _, unix::AsyncFd},
    net::{UnixListener, UnixStream},
    sync::broadcast,
};

use crate::{
    bpf::pinned::PinnedMaps,
    daemon::{
        events::{
            record::{EventRecord, Lost, SetChange},
            ring::read_ring,
        },
        lock,
    },
};

/// Events buffered per `session events` client before a slow one starts losing them.
const CLIENT_BACKLOG: usize = 4096;

/// The Unix socket `session events` connects to for the daemon of `pin_dir`.
pub fn socket_path(pin_dir: &Path) -> PathBuf {
    lock::run_path(pin_dir, "events")
}

/// The daemon's end of the event stream.
pub struct EventHub {
    sender: broadcast::Sender<String>,
    socket: PathBuf,
}

impl EventHub {
    /// Opens the pinned ring buffer, binds the clients' socket and starts the tasks that
    /// read the one and serve the other. Must be called inside the tokio runtime.
    /// With `nudge`, the keys of new and closed sessions also go to state sync.
    pub fn start(maps: &PinnedMaps, nudge: Option<super::ring::SyncNudge>) -> Result<EventHub> {
        let path = maps.dir().join(map_names::EVENTS);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening the event ring buffer {}", path.display()))?;
        let ring = RingBuf::try_from(Map::RingBuf(data))
            .with_context(|| format!("{} is not a ring buffer", path.display()))?;
        // SAFETY: the ring buffer owns its map fd, which stays open and the same until the
        // AsyncFd that owns the ring buffer is dropped.
        let ring = unsafe { AsyncFd::register(ring) }
            .map_err(|error| error.into_parts().1)
            .context("watching the event ring buffer")?;

        let socket = socket_path(maps.dir());
        // We hold the instance lock, so a socket left here belongs to a dead daemon.
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(error).with_context(|| format!("removing stale {}", socket.display()));
            }
        }
        let listener = UnixListener::bind(&socket)
            .with_context(|| format!("creating the events socket {}", socket.display()))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {} to root", socket.display()))?;

        let (sender, _) = broadcast::channel(CLIENT_BACKLOG);
        tokio::spawn(read_ring(
            ring,
            PinnedMaps::open(maps.dir())?,
            sender.clone(),
            nudge,
        ));
        tokio::spawn(serve_clients(listener, sender.clone()));
        Ok(EventHub { sender, socket })
    }

    /// Reports a live change to a named set.
    pub fn set_changed(&self, change: &SetChange) {
        if self.sender.receiver_count() > 0 {
            let _ = self.sender.send(change.to_json());
        }
    }

    /// Reports a session the reaper removed.
    pub fn expired(&self, key: &FlowKey, session: &Session, rule_names: &[String]) {
        if self.sender.receiver_count() > 0 {
            let record = EventRecord::expired(key, session, rule_names);
            let _ = self.sender.send(record.to_json());
        }
    }
}

impl Drop for EventHub {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

async fn serve_clients(listener: UnixListener, sender: broadcast::Sender<String>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(feed_client(stream, sender.subscribe()));
            }
            Err(error) => {
                warn!("events: accepting a client failed: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Streams events to one client until it goes away; a client too slow to keep up is told
/// how many events it missed.
async fn feed_client(mut stream: UnixStream, mut events: broadcast::Receiver<String>) {
    loop {
        let line = match events.recv().await {
            Ok(line) => line,
            Err(broadcast::error::RecvError::Lagged(missed)) => Lost { lost: missed }.to_json(),
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if stream.write_all(line.as_bytes()).await.is_err()
            || stream.write_all(b"\n").await.is_err()
        {
            return;
        }
    }
}
