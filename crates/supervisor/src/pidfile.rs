//! The PID file: written atomically (temporary file, then rename), removed on exit.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A written PID file; dropping it removes the file if it still holds this process's pid.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    pid: u32,
}

impl PidFile {
    pub fn create(path: &Path) -> io::Result<Self> {
        let pid = std::process::id();
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        writeln!(tmp, "{pid}")?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(Self {
            path: path.to_owned(),
            pid,
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.path)
            .is_ok_and(|text| text.trim() == self.pid.to_string());
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f.pid");
        let pidfile = PidFile::create(&path).expect("create");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read").trim(),
            std::process::id().to_string()
        );
        drop(pidfile);
        assert!(!path.exists());
    }
}
