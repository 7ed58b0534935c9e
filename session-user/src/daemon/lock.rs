//! One daemon per pin directory: a lock file under /run/session records which process
//! owns the pinned maps and which config it runs, so a second daemon refuses clearly and
//! `session reload` knows whom to signal and what to validate first.

use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use rustix::process::{Pid, Signal};

/// Where lock files live.
const RUN_DIR: &str = "/run/session";

/// A file under /run/session that belongs to the daemon of `pin_dir`, e.g. its lock.
pub fn run_path(pin_dir: &Path, extension: &str) -> PathBuf {
    let id: String = pin_dir
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    Path::new(RUN_DIR).join(format!("{id}.{extension}"))
}

fn lock_path(pin_dir: &Path) -> PathBuf {
    run_path(pin_dir, "lock")
}

/// A lock file, open and locked; removed when dropped, while still locked: whoever opens
/// the path next gets a new file, and a lock taken on a file that is no longer at the path
/// is taken again on the new one (see [`is_at_path`]), so none pile up in /run/session.
struct HeldFile {
    _file: File,
    path: PathBuf,
}

impl Drop for HeldFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Opens the lock file at `path` under /run/session, creating it readable by root only.
fn open_lock_file(path: &Path) -> Result<File> {
    std::fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening lock file {}", path.display()))
}

/// Held by the running daemon; released when it exits, however it exits.
pub struct InstanceLock {
    _held: HeldFile,
}

/// Whether `file` is still the file at `path` (not unlinked or replaced meanwhile).
fn is_at_path(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

/// Takes the exclusive lock on `file` if nobody holds it (std's `try_lock` is
/// `flock(LOCK_EX | LOCK_NB)` on Linux, so older daemons and `flock(1)` see the same lock).
fn try_flock(file: &File) -> bool {
    file.try_lock().is_ok()
}

/// The error for a lock another daemon holds, naming it (the holder writes its pid right
/// after locking, so a just-started one gets a moment).
fn already_running(mut file: File, pin_dir: &Path) -> anyhow::Error {
    let mut owner = Owner::read(&mut file);
    for _ in 0..20 {
        if owner.is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        let _ = file.seek(SeekFrom::Start(0));
        owner = Owner::read(&mut file);
    }
    let owner = owner.map_or_else(
        |_| "unknown pid".to_string(),
        |owner| format!("pid {}, config {}", owner.pid, owner.config.display()),
    );
    anyhow::anyhow!(
        "another session daemon already runs with pin directory {} ({owner}); stop it first, or use another --pin-dir",
        pin_dir.display()
    )
}

impl InstanceLock {
    /// Takes the lock for `pin_dir`, or explains who holds it.
    pub fn acquire(pin_dir: &Path, config: &Path) -> Result<InstanceLock> {
        let path = lock_path(pin_dir);
        let locked = loop {
            let file = open_lock_file(&path)?;
            if !try_flock(&file) {
                break Err(file);
            }
            // Locked, but the previous holder removed the file on exit: lock the new one.
            if is_at_path(&file, &path) {
                break Ok(file);
            }
        };
        let mut file = match locked {
            Ok(file) => file,
            Err(held) => return Err(already_running(held, pin_dir)),
        };
        let config = config
            .canonicalize()
            .unwrap_or_else(|_| config.to_path_buf());
        // A lock file left by an older version may be world-readable.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .context("restricting the lock file to root")?;
        file.set_len(0).context("truncating the lock file")?;
        file.seek(SeekFrom::Start(0))
            .context("rewinding the lock file")?;
        writeln!(file, "{}\n{}", std::process::id(), config.display())
            .context("writing the lock file")?;
        Ok(InstanceLock {
            _held: HeldFile { _file: file, path },
        })
    }
}

/// Held while the named sets of a pin directory change: a policy apply, `session set`,
/// the reaper's expiry. Each reads which set storages are free, claims and frees storages
/// and rewrites the banks' references to them; two at once (a `session set replace`
/// during a reload) would free a storage the other is filling. Taking it waits for the
/// holder; dropping it releases it.
pub struct SetsLock {
    _held: HeldFile,
}

impl SetsLock {
    /// Waits for and takes the set lock of `pin_dir`.
    pub fn acquire(pin_dir: &Path) -> Result<SetsLock> {
        let path = run_path(pin_dir, "sets.lock");
        loop {
            let file = open_lock_file(&path)?;
            file.lock()
                .with_context(|| format!("locking {}", path.display()))?;
            if is_at_path(&file, &path) {
                return Ok(SetsLock {
                    _held: HeldFile { _file: file, path },
                });
            }
        }
    }
}

/// The daemon that holds a pin directory.
#[derive(Debug)]
pub struct Owner {
    /// Its process id.
    pub pid: i32,
    /// The config file it runs.
    pub config: PathBuf,
}

impl Owner {
    fn read(file: &mut File) -> Result<Owner> {
        let mut text = String::new();
        file.read_to_string(&mut text)
            .context("reading the lock file")?;
        let mut lines = text.lines();
        let pid = lines
            .next()
            .and_then(|line| line.trim().parse().ok())
            .filter(|&pid: &i32| pid > 0)
            .context("lock file has no pid")?;
        let config = PathBuf::from(lines.next().context("lock file has no config path")?);
        Ok(Owner { pid, config })
    }

    /// Sends `signal` to the daemon. The pid is positive (`read` checks it), so this never
    /// signals a process group.
    pub fn signal(&self, signal: Signal) -> std::io::Result<()> {
        let pid = Pid::from_raw(self.pid).ok_or(std::io::ErrorKind::InvalidData)?;
        Ok(rustix::process::kill_process(pid, signal)?)
    }

    /// The running daemon for `pin_dir`, or an error saying none runs.
    pub fn find(pin_dir: &Path) -> Result<Owner> {
        Owner::running(pin_dir)?.with_context(|| {
            format!(
                "no session daemon runs with pin directory {}: start one with `session run --config FILE`",
                pin_dir.display()
            )
        })
    }

    /// The running daemon for `pin_dir`, if any: someone holds its lock.
    pub fn running(pin_dir: &Path) -> Result<Option<Owner>> {
        let path = lock_path(pin_dir);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => bail!(
                "permission denied reading {}: only root may control the session daemon; run this command as root",
                path.display()
            ),
            Err(error) => {
                return Err(error).with_context(|| format!("opening {}", path.display()));
            }
        };
        if try_flock(&file) {
            return Ok(None);
        }
        Owner::read(&mut file).map(Some)
    }
}
