//! Whole-map reads and writes with the kernel's batch commands (`BPF_MAP_*_BATCH`), which
//! aya does not wrap: a million sessions or set prefixes in a few hundred system calls
//! instead of one or two each. Hash maps and LPM tries both take them (Linux 5.6 and 5.14).

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{Pod, maps::MapData};
use session_common::wire::{FlowKey, Session};

/// `BPF_MAP_LOOKUP_BATCH` from the kernel's `enum bpf_cmd`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `BPF_MAP_UPDATE_BATCH` from the kernel's `enum bpf_cmd`.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// `BPF_MAP_DELETE_BATCH` from the kernel's `enum bpf_cmd`.
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Entries per batch: large enough that a million entries take a few hundred system
/// calls, and larger than any hash bucket, which the kernel returns whole.
const BATCH: usize = 4096;

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

/// Runs the batch command `cmd` on `attr`; the kernel writes back how many entries it
/// processed into `attr.count`, also when it fails part-way.
fn batch_call(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr` batch member; every pointer in it is the
    // caller's buffer of `count` keys (and values) of the map's types, or a cursor of at
    // least the map's key size, all alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The raw file descriptor the batch commands take.
fn fd_of(data: &MapData) -> u32 {
    data.fd().as_fd().as_raw_fd() as u32
}

/// Hands every entry of the map `data` to `each`, read with `BPF_MAP_LOOKUP_BATCH`.
/// Entries written or deleted meanwhile may be seen or not, as with per-key iteration.
pub(crate) fn for_each<K: Pod, V: Pod>(
    data: &MapData,
    mut each: impl FnMut(&K, &V),
) -> io::Result<()> {
    let mut keys = vec![0u8; BATCH * size_of::<K>()];
    let mut values = vec![0u8; BATCH * size_of::<V>()];
    // The kernel's cursor: a bucket index (u32) for hash maps, the last key read for
    // other maps (LPM tries); room for either.
    let cursor_len = size_of::<K>().max(size_of::<u64>());
    let mut cursor_in = vec![0u8; cursor_len];
    let mut cursor_out = vec![0u8; cursor_len];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { cursor_in.as_ptr() as u64 },
            out_batch: cursor_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd_of(data),
            ..BatchAttr::default()
        };
        let last = match batch_call(BPF_MAP_LOOKUP_BATCH, &mut attr) {
            Ok(()) => false,
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => true,
            Err(error) => return Err(error),
        };
        for i in 0..(attr.count as usize).min(BATCH) {
            // SAFETY: the kernel filled entry `i` of both buffers, which hold BATCH keys
            // and values; `Pod` types take any bytes, and the reads are unaligned.
            let (key, value) = unsafe {
                (
                    (keys.as_ptr() as *const K).add(i).read_unaligned(),
                    (values.as_ptr() as *const V).add(i).read_unaligned(),
                )
            };
            each(&key, &value);
        }
        if last {
            return Ok(());
        }
        std::mem::swap(&mut cursor_in, &mut cursor_out);
        first = false;
    }
}

/// Stores `entries` in the map `data` with `BPF_MAP_UPDATE_BATCH`, replacing what is
/// under a key already (batches take no `BPF_NOEXIST`: callers leave out the keys they
/// find present). Stops at the first error (`ENOSPC` when the map is full), leaving the
/// entries stored before it in place.
pub(crate) fn update<K: Pod, V: Pod>(data: &MapData, entries: &[(K, V)]) -> io::Result<()> {
    let (_, result) = update_counted(data, entries);
    result
}

/// [`update`] into a map that may fill up, as a hash map without preallocation does
/// (`E2BIG`): how many of `entries`, from the first, it stored before the map was full.
pub(crate) fn update_until_full<K: Pod, V: Pod>(
    data: &MapData,
    entries: &[(K, V)],
) -> io::Result<usize> {
    match update_counted(data, entries) {
        (stored, Err(error)) if error.raw_os_error() == Some(libc::E2BIG) => Ok(stored),
        (stored, result) => result.map(|()| stored),
    }
}

/// [`update`]'s batches, with how many entries they stored, also when one failed.
fn update_counted<K: Pod, V: Pod>(data: &MapData, entries: &[(K, V)]) -> (usize, io::Result<()>) {
    let mut stored = 0;
    for chunk in entries.chunks(BATCH) {
        let keys: Vec<K> = chunk.iter().map(|(key, _)| *key).collect();
        let values: Vec<V> = chunk.iter().map(|(_, value)| *value).collect();
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: fd_of(data),
            ..BatchAttr::default()
        };
        let result = batch_call(BPF_MAP_UPDATE_BATCH, &mut attr);
        stored += (attr.count as usize).min(chunk.len());
        if result.is_err() {
            return (stored, result);
        }
    }
    (stored, Ok(()))
}

/// Deletes `keys` from the map `data` with `BPF_MAP_DELETE_BATCH`; a key already gone
/// (deleted meanwhile by another writer) is skipped. The number deleted.
pub(crate) fn delete<K: Pod>(data: &MapData, keys: &[K]) -> io::Result<usize> {
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(BATCH)];
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd_of(data),
            ..BatchAttr::default()
        };
        let result = batch_call(BPF_MAP_DELETE_BATCH, &mut attr);
        let done = (attr.count as usize).min(chunk.len());
        deleted += done;
        match result {
            Ok(()) => rest = &rest[chunk.len()..],
            // The kernel stopped at the missing key `done`: skip it and go on after it.
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {
                rest = &rest[(done + 1).min(rest.len())..];
            }
            Err(error) => return Err(error),
        }
    }
    Ok(deleted)
}

/// Keys of the sessions in the hash map `data` that expired at `now`: per-key iteration
/// costs two system calls per session, which made a sweep of 1M sessions take seconds of
/// daemon CPU (see BENCHMARKS.md). Every session read, expired or not, is handed to
/// `each`.
pub(crate) fn sweep_tier(
    data: &MapData,
    now: u64,
    mut each: impl FnMut(&FlowKey, &Session),
) -> io::Result<Vec<FlowKey>> {
    let mut expired = Vec::new();
    for_each(data, |key: &FlowKey, session: &Session| {
        each(key, session);
        if session.expires_ns <= now {
            expired.push(*key);
        }
    })?;
    Ok(expired)
}
