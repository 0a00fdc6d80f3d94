//! A log file logrotate can move away: every record is appended with one `write` call to an
//! `O_APPEND` file (so records of several processes never interleave), and [`LogFile::reopen`]
//! opens the path anew on SIGUSR1. The master's error log and each worker's access log use it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// An append-only log file that can be reopened at its path.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: Mutex<File>,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl LogFile {
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(open_append(path)?),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Open the path again (logrotate moved the old file); on failure keep writing the old one.
    pub fn reopen(&self) -> io::Result<()> {
        let new = open_append(&self.path)?;
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = new;
        Ok(())
    }

    /// Append one whole record.
    pub fn append(&self, record: &[u8]) -> io::Result<()> {
        self.file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_follows_the_path_after_a_rename() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.log");
        let log = LogFile::open(&path).expect("open");
        log.append(b"one\n").expect("append");
        let rotated = dir.path().join("x.log.1");
        std::fs::rename(&path, &rotated).expect("rename");
        log.append(b"two\n").expect("append");
        log.reopen().expect("reopen");
        log.append(b"three\n").expect("append");
        assert_eq!(
            std::fs::read_to_string(&rotated).expect("read"),
            "one\ntwo\n"
        );
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "three\n");
    }
}
