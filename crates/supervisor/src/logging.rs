//! Logging: `tracing` to standard error or to a file that SIGUSR1 reopens (logrotate).
//!
//! The subscriber is installed in the master before any fork and inherited by the workers. It
//! writes synchronously — no logging thread, per the fork rules — each event with one `write`
//! call to an `O_APPEND` file, so lines from several processes do not interleave.

use std::io::{self, Write};
use std::path::Path;
use std::sync::OnceLock;

use ferrocorn_worker::{LogFile, LogFormat};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// The error log file, when there is one (else standard error).
static LOG_FILE: OnceLock<LogFile> = OnceLock::new();

/// Install the global subscriber. `errorlog` of `None` logs to standard error.
pub fn init(loglevel: &str, errorlog: Option<&Path>, format: LogFormat) -> io::Result<()> {
    if let Some(path) = errorlog {
        LOG_FILE
            .set(LogFile::open(path)?)
            .map_err(|_| io::Error::other("logging is already initialised"))?;
    }
    let filter = EnvFilter::try_from_env("FERROCORN_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{loglevel},hyper=warn,h2=warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Sink)
        .with_ansi(false)
        .with_target(false);
    match format {
        // One object per event: timestamp, level and the fields, the message among them.
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    }
    .map_err(io::Error::other)
}

/// Reopen the log file at its path (after logrotate moved it). Standard error needs nothing.
pub fn reopen() {
    if let Some(file) = LOG_FILE.get()
        && let Err(e) = file.reopen()
    {
        // Still writing to the old file: say so there.
        tracing::error!(path = %file.path().display(), error = %e, "cannot reopen the error log");
    }
}

#[derive(Clone, Copy, Debug)]
struct Sink;

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match LOG_FILE.get() {
            Some(file) => file.append(buf).map(|()| buf.len()),
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
