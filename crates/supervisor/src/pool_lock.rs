//! The pool's exclusive lock on its cache directory: one pool per cache directory.
//!
//! Two pools must not share a cache directory (their snapshot builders and result caches would
//! fight over it), and a second pool started by mistake with the first one's configuration must
//! be refused rather than run beside it. The master takes an exclusive `flock` on
//! `CACHE_DIR/ferrocorn.lock` before it binds anything and holds it for its lifetime (its
//! workers inherit the descriptor, so a pool whose master died still holds it while a worker
//! drains). The file records the holder's pid, for the refusal's message. The kernel releases the
//! lock when the last descriptor closes, so a crashed pool leaves nothing to clean up.

use std::fs::{File, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The name of the lock file inside the cache directory.
pub const LOCK_FILE: &str = "ferrocorn.lock";

/// A held lock; released when dropped (and by the kernel when the process exits).
#[derive(Debug)]
pub struct PoolLock {
    file: File,
}

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another ferrocorn pool{} uses the cache directory {} (it holds {}): stop it, or give this pool its own cache_dir",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        dir.display(),
        LOCK_FILE
    )]
    Held { dir: PathBuf, holder: Option<u32> },
    #[error("cannot lock the cache directory {}: {source}", dir.display())]
    Io { dir: PathBuf, source: io::Error },
}

impl PoolLock {
    /// Create `cache_dir` if needed and lock it for this process.
    pub fn acquire(cache_dir: &Path) -> Result<Self, LockError> {
        let io_error = |source| LockError::Io {
            dir: cache_dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(cache_dir).map_err(io_error)?;
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(cache_dir.join(LOCK_FILE))
            .map_err(io_error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let holder = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Err(LockError::Held {
                    dir: cache_dir.to_owned(),
                    holder,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io_error(e)),
        }
        let lock = Self { file };
        lock.record_holder().map_err(io_error)?;
        Ok(lock)
    }

    /// The lock a binary upgrade's predecessor handed over: the same open file, so the same
    /// `flock` (shared by both masters until the old one exits).
    pub fn adopt(fd: std::os::fd::OwnedFd) -> Self {
        Self {
            file: File::from(fd),
        }
    }

    /// Write this process's pid into the lock file, as the pool's holder.
    pub fn record_holder(&self) -> io::Result<()> {
        let mut file = &self.file;
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())
    }

    /// The lock's descriptor (for a binary upgrade's hand-off).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("cache");
        let first = PoolLock::acquire(&cache).expect("first");
        match PoolLock::acquire(&cache) {
            Err(LockError::Held { holder, .. }) => assert_eq!(holder, Some(std::process::id())),
            other => panic!("expected Held, got {other:?}"),
        }
        drop(first);
        PoolLock::acquire(&cache).expect("free again");
    }
}
