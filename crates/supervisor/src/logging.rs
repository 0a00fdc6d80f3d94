//! Logging: `tracing` to standard error or to a file that SIGUSR1 reopens (logrotate).
//!
//! The subscriber is installed in the master before any fork and inherited by the workers. It
//! writes synchronously — no logging thread, per the fork rules — each event with one `write`
//! call to an `O_APPEND` file, so lines from several processes do not interleave.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

static LOG_FILE: Mutex<Option<(PathBuf, File)>> = Mutex::new(None);

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Install the global subscriber. `errorlog` of `None` logs to standard error.
pub fn init(loglevel: &str, errorlog: Option<&Path>) -> io::Result<()> {
    if let Some(path) = errorlog {
        let file = open(path)?;
        *LOG_FILE.lock().unwrap_or_else(|e| e.into_inner()) = Some((path.to_owned(), file));
    }
    let filter = EnvFilter::try_from_env("FERROCORN_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{loglevel},hyper=warn,h2=warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Sink)
        .with_ansi(false)
        .with_target(false)
        .try_init()
        .map_err(io::Error::other)
}

/// Reopen the log file at its path (after logrotate moved it). Standard error needs nothing.
pub fn reopen() {
    let mut guard = LOG_FILE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((path, file)) = guard.as_mut() {
        match open(path) {
            Ok(new) => *file = new,
            Err(e) => {
                let _ = writeln!(file, "ERROR cannot reopen log file {}: {e}", path.display());
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Sink;

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut guard = LOG_FILE.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_mut() {
            Some((_, file)) => file.write(buf),
            None => io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = Sink;

    fn make_writer(&'a self) -> Self::Writer {
        Sink
    }
}
