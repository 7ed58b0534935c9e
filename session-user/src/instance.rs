//! One daemon per pin directory: a lock file under /run/session records which process
//! owns the pinned maps and which config it runs, so a second daemon refuses clearly and
//! `session reload` knows whom to signal and what to validate first.

use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

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

/// Held by the running daemon; released when it exits, however it exits.
pub struct InstanceLock {
    _file: File,
}

fn try_flock(file: &File) -> bool {
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

impl InstanceLock {
    /// Takes the lock for `pin_dir`, or explains who holds it.
    pub fn acquire(pin_dir: &Path, config: &Path) -> Result<InstanceLock> {
        std::fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
        let path = lock_path(pin_dir);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        if !try_flock(&file) {
            let owner = Owner::read(&mut file).map_or_else(
                |_| "unknown pid".to_string(),
                |owner| format!("pid {}, config {}", owner.pid, owner.config.display()),
            );
            bail!(
                "another session daemon already runs with pin directory {} ({owner}); stop it first, or use another --pin-dir",
                pin_dir.display()
            );
        }
        let config = config
            .canonicalize()
            .unwrap_or_else(|_| config.to_path_buf());
        file.set_len(0).context("truncating the lock file")?;
        file.seek(SeekFrom::Start(0))
            .context("rewinding the lock file")?;
        writeln!(file, "{}\n{}", std::process::id(), config.display())
            .context("writing the lock file")?;
        Ok(InstanceLock { _file: file })
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
            .context("lock file has no pid")?;
        let config = PathBuf::from(lines.next().context("lock file has no config path")?);
        Ok(Owner { pid, config })
    }

    /// The running daemon for `pin_dir`, or an error saying none runs.
    pub fn find(pin_dir: &Path) -> Result<Owner> {
        let path = lock_path(pin_dir);
        let not_running = || {
            format!(
                "no session daemon runs with pin directory {}: start one with `session run --config FILE`",
                pin_dir.display()
            )
        };
        let mut file = File::open(&path).with_context(not_running)?;
        if try_flock(&file) {
            bail!(not_running());
        }
        Owner::read(&mut file)
    }
}
