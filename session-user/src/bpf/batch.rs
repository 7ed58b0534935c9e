//! Reading a whole session tier with `BPF_MAP_LOOKUP_BATCH`, which aya does not wrap: a
//! sweep of a million sessions in a few hundred system calls instead of two per session.

use aya::maps::MapData;
use session_common::wire::{FlowKey, Session};

/// `BPF_MAP_LOOKUP_BATCH` from the kernel's `enum bpf_cmd` (aya has no batch API).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `BPF_MAP_UPDATE_BATCH` from the kernel's `enum bpf_cmd`.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Entries per batch: large enough that a million-session sweep takes a few hundred
/// system calls, and larger than any hash bucket, which the kernel returns whole.
const REAP_BATCH: usize = 4096;

/// The `batch` member of the kernel's `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Keys of the sessions in the hash map `data` that expired at `now`, read with
/// `BPF_MAP_LOOKUP_BATCH`: per-key iteration costs two system calls per session, which
/// made a sweep of 1M sessions take seconds of daemon CPU (see BENCHMARKS.md). Every
/// session read, expired or not, is handed to `each`.
pub(crate) fn sweep_tier(
    data: &MapData,
    now: u64,
    mut each: impl FnMut(&FlowKey, &Session),
) -> std::io::Result<Vec<FlowKey>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = data.fd().as_fd().as_raw_fd();
    let mut keys = vec![FlowKey::default(); REAP_BATCH];
    let mut values = vec![Session::default(); REAP_BATCH];
    // The kernel's cursor for hash maps is a bucket index (u32); a u64 leaves room.
    let mut cursor_in = 0u64;
    let mut cursor_out = 0u64;
    let mut first = true;
    let mut expired = Vec::new();
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &cursor_in as *const u64 as u64
            },
            out_batch: &mut cursor_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: REAP_BATCH as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the attribute points at buffers of REAP_BATCH keys and values of the
        // map's key and value types and at the cursors, all alive for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let last = if rc < 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::ENOENT) {
                return Err(error);
            }
            true
        } else {
            false
        };
        let filled = (attr.count as usize).min(REAP_BATCH);
        keys[..filled]
            .iter()
            .zip(&values[..filled])
            .for_each(|(key, session)| each(key, session));
        expired.extend(
            keys[..filled]
                .iter()
                .zip(&values[..filled])
                .filter(|(_, session)| session.expires_ns <= now)
                .map(|(key, _)| *key),
        );
        if last {
            return Ok(expired);
        }
        cursor_in = cursor_out;
        first = false;
    }
}

/// Stores `sessions` in the hash map `data` with `BPF_MAP_UPDATE_BATCH`: a million
/// restored sessions in a few hundred system calls instead of one each. An entry already
/// under a key is replaced (the kernel takes no `BPF_NOEXIST` for batches: callers leave
/// out the keys they find present). Stops at the first error (`ENOSPC` when the map is
/// full), leaving the sessions stored before it in place.
pub(crate) fn insert_batch(data: &MapData, sessions: &[(FlowKey, Session)]) -> std::io::Result<()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = data.fd().as_fd().as_raw_fd();
    for chunk in sessions.chunks(REAP_BATCH) {
        let keys: Vec<FlowKey> = chunk.iter().map(|(key, _)| *key).collect();
        let values: Vec<Session> = chunk.iter().map(|(_, session)| *session).collect();
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the attribute points at `count` keys and values of the map's key and
        // value types, alive for the call; the kernel only reads them.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
