//! The shared key file of a sync link.

use std::{os::unix::fs::PermissionsExt as _, path::Path};

use crate::sync::wire::{MIN_KEY_LEN, SyncKey};

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read.
    #[error("cannot read the sync key file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Others than its owner (and group) may read it.
    #[error(
        "the sync key file {path} is readable by every user (mode {mode:o}): `chmod 600 {path}`"
    )]
    WorldReadable {
        /// The file.
        path: String,
        /// Its mode.
        mode: u32,
    },
    /// Too short to be a key.
    #[error(
        "the sync key file {path} holds {len} bytes, fewer than {MIN_KEY_LEN}: make one with `head -c 32 /dev/urandom > {path}` and copy it to the peer"
    )]
    Short {
        /// The file.
        path: String,
        /// Its length.
        len: usize,
    },
}

/// Reads the key in `path`: at least [`MIN_KEY_LEN`] bytes, not readable by every user.
/// A trailing newline is part of the key (both peers read the same file).
pub fn load(path: &Path) -> Result<SyncKey, KeyError> {
    let shown = path.display().to_string();
    let read = |source| KeyError::Read {
        path: shown.clone(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(read)?.permissions().mode();
    if mode & 0o004 != 0 {
        return Err(KeyError::WorldReadable {
            path: shown,
            mode: mode & 0o7777,
        });
    }
    let bytes = std::fs::read(path).map_err(read)?;
    SyncKey::new(&bytes).ok_or(KeyError::Short {
        path: shown,
        len: bytes.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn short_or_world_readable_keys_are_refused_with_the_fix() {
        let dir = std::env::temp_dir().join(format!("session-sync-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let good = write(&dir, "good", &[7; 32], 0o600);
        assert!(load(&good).is_ok());
        let open = write(&dir, "open", &[7; 32], 0o644);
        let error = load(&open).expect_err("world-readable").to_string();
        assert!(error.contains("chmod 600"), "{error}");
        let short = write(&dir, "short", &[7; 8], 0o600);
        let error = load(&short).expect_err("short").to_string();
        assert!(error.contains("/dev/urandom"), "{error}");
        assert!(load(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
