//! ferrocorn's master process: configuration, listeners, and supervision of the worker pool.
//!
//! `main.rs` only calls [`main`]. The master parses the configuration, binds the listeners, maps
//! the shared scoreboard, forks the workers and then only watches them: signals, heartbeats,
//! exits. It never serves a request and never opens DuckDB.
//!
//! # Layout
//!
//! - [`accounts`]: `ferrocorn user add` and `ferrocorn key add`, entries of the users file.
//! - [`cli`]: command-line flags, and loading every configuration layer.
//! - [`keys`]: every configuration key, declared once (raw layer, defaults, flags, docs).
//! - [`config`]: raw configuration (defaults, file, environment) and its resolution into
//!   [`config::Config`].
//! - [`listeners`]: binding TCP and unix sockets, per slot (`SO_REUSEPORT`) or shared.
//! - [`master`]: the supervision loop: turns signals, exits and the scoreboard into events, and
//!   performs the pool's actions (fork, signal, steer, listeners, systemd).
//! - [`pool`]: the pool's bookkeeping as a pure state machine (slots, successors, recycling,
//!   reload rolls, scaling, crash backoff, lifecycle), driven by events.
//! - [`logging`]: the log subscriber, reopened on SIGUSR1.
//! - [`pidfile`]: the atomically written PID file.
//! - [`pool_lock`]: the exclusive lock that makes a pool the only one on its cache directory.
//! - [`sys`]: every `unsafe` call of the supervisor (fork, the reuseport BPF program, claiming
//!   passed descriptors).
//! - [`upgrade`]: the binary upgrade (USR2): the hand-off from the old master to the new one.
//!
//! # Fork rules
//!
//! DuckDB and tokio are not fork-safe, and a child forked from a multi-threaded process may only
//! call async-signal-safe functions. So **the master is single-threaded at every fork**:
//!
//! - no tokio runtime, DuckDB handle, thread pool or logging thread is ever created in the
//!   master; the log subscriber writes synchronously;
//! - signals are blocked and read from a `signalfd` in the master's own loop (no signal thread,
//!   no handler state for the child to inherit); a child unblocks them before it builds its
//!   runtime;
//! - everything not fork-safe is created by the worker after the fork
//!   ([`ferrocorn_worker::run`]);
//! - a child closes the master's descriptors (signalfd, wake-up pipe, other slots' listeners)
//!   before it does anything else.
//!
//! The end-to-end test `master_is_single_threaded_and_workers_are_its_children` reads the
//! master's thread count from `/proc/<pid>/status`.
//!
//! # Exit codes
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | stopped by a signal (TERM, INT, QUIT), or `--check-config`/`--print-config` succeeded |
//! | 3 | no worker could boot at start-up (the reason is printed) |
//! | 64 | invalid flags or configuration (`EX_USAGE`) |
//! | 69 | a listener could not be bound, e.g. the port is in use, also by another pool's `SO_REUSEPORT` group; or another pool holds the cache directory (`EX_UNAVAILABLE`) |
//! | 71 | an operating-system call failed at start-up (`EX_OSERR`) |
//! | 73 | the log or PID file, or the cache directory's lock file, could not be created (`EX_CANTCREAT`) |

pub mod accounts;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod control;
pub mod keys;
pub mod listeners;
pub mod logging;
pub mod master;
pub mod pidfile;
pub mod pool;
pub mod pool_lock;
mod sys;
pub mod upgrade;
mod usage;

use std::path::PathBuf;

use clap::Parser;

use crate::cli::Cli;
use crate::config::{Config, ProcessEnv};
use crate::master::Master;

pub const EXIT_USAGE: i32 = 64;
pub const EXIT_UNAVAILABLE: i32 = 69;
pub const EXIT_OSERR: i32 = 71;
pub const EXIT_CANTCREAT: i32 = 73;
pub use ferrocorn_worker::EXIT_BOOT_FAILED;

/// Why the master could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(listeners::BindError),
    #[error(transparent)]
    Locked(pool_lock::LockError),
    #[error("cannot write pid file {0}: {1}")]
    PidFile(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Os(&'static str, std::io::Error),
    #[error("binary upgrade: {0}")]
    Handoff(String),
}

impl StartError {
    fn exit_code(&self) -> i32 {
        match self {
            Self::Bind(_) => EXIT_UNAVAILABLE,
            Self::Locked(pool_lock::LockError::Held { .. }) => EXIT_UNAVAILABLE,
            Self::Locked(pool_lock::LockError::Io { .. }) => EXIT_CANTCREAT,
            Self::PidFile(..) => EXIT_CANTCREAT,
            Self::Os(..) | Self::Handoff(_) => EXIT_OSERR,
        }
    }
}

/// The `ferrocorn` command; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { 0 };
        }
    };
    match &cli.command {
        Some(cli::Command::User(cli::UserCommand::Add(args))) => return accounts::add_user(args),
        Some(cli::Command::Key(cli::KeyCommand::Add(args))) => return accounts::add_key(args),
        Some(
            cli::Command::Healthcheck { .. }
            | cli::Command::Status
            | cli::Command::Reload { .. }
            | cli::Command::Scale { .. },
        )
        | None => {}
    }
    let (raw, origins) = match cli.load(&ProcessEnv) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("ferrocorn: {e}");
            return EXIT_USAGE;
        }
    };
    let seconds = |s: u64| std::time::Duration::from_secs(s.max(1));
    let request = match &cli.command {
        Some(cli::Command::Healthcheck { timeout }) => return healthcheck(&raw, seconds(*timeout)),
        Some(cli::Command::Status) => Some((control::Request::Status, seconds(5))),
        Some(cli::Command::Reload { timeout }) => {
            Some((control::Request::Reload, seconds(*timeout)))
        }
        Some(cli::Command::Scale { workers }) => {
            match control::Request::parse(&format!("scale {workers}")) {
                Ok(request) => Some((request, seconds(5))),
                Err(e) => {
                    eprintln!("ferrocorn: {e}");
                    return EXIT_USAGE;
                }
            }
        }
        _ => None,
    };
    if let Some((request, wait)) = request {
        let cache_dir =
            std::path::absolute(raw.cache_dir.clone().unwrap_or_default()).unwrap_or_default();
        return control::run(&cache_dir, &request, wait);
    }
    if cli.print_config {
        print!("{}", config::render(&raw, &origins));
    }
    let config = match Config::resolve(&raw) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ferrocorn: {e}");
            return EXIT_USAGE;
        }
    };
    if cli.print_config {
        return 0;
    }
    if cli.check_config {
        eprintln!("ferrocorn: configuration is valid");
        return 0;
    }
    if let Err(e) = logging::init(
        &config.loglevel,
        config.errorlog.as_deref(),
        config.log_format,
    ) {
        eprintln!("ferrocorn: cannot open the error log: {e}");
        return EXIT_CANTCREAT;
    }
    let master = match Master::start(cli, raw, config) {
        Ok(master) => master,
        Err(e) => {
            eprintln!("ferrocorn: {e}");
            return e.exit_code();
        }
    };
    master.run()
}

/// `ferrocorn healthcheck`: `GET /readyz` (a worker whose DuckDB answers) on the
/// configuration's first address (a wildcard
/// address is asked on loopback); 0 when it answers 200 in time, 1 when not, 64 when the
/// configuration names no usable address.
fn healthcheck(raw: &config::RawConfig, timeout: std::time::Duration) -> i32 {
    let Some(first) = raw.bind.as_ref().and_then(|b| b.first()) else {
        eprintln!("ferrocorn: healthcheck: no bind address");
        return EXIT_USAGE;
    };
    let addr = match config::BindAddr::parse(first) {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("ferrocorn: healthcheck: bind {first:?}: {e}");
            return EXIT_USAGE;
        }
    };
    let request = b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let answer = |stream: &mut dyn ReadWrite| -> std::io::Result<String> {
        stream.write_all(request)?;
        let mut head = [0u8; 16];
        let mut read = 0;
        while read < head.len() {
            match stream.read(&mut head[read..])? {
                0 => break,
                n => read += n,
            }
        }
        Ok(String::from_utf8_lossy(&head[..read]).into_owned())
    };
    let status = match &addr {
        config::BindAddr::Tcp(socket) => {
            let mut target = *socket;
            if target.ip().is_unspecified() {
                target.set_ip(if target.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            std::net::TcpStream::connect_timeout(&target, timeout).and_then(|mut s| {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                answer(&mut s)
            })
        }
        config::BindAddr::Unix(path) => {
            std::os::unix::net::UnixStream::connect(path).and_then(|mut s| {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                answer(&mut s)
            })
        }
    };
    match status {
        Ok(head) if head.starts_with("HTTP/1.1 200") => 0,
        Ok(head) => {
            eprintln!(
                "ferrocorn: healthcheck: {addr} answered {:?}",
                head.lines().next().unwrap_or("")
            );
            1
        }
        Err(e) => {
            eprintln!("ferrocorn: healthcheck: {addr}: {e}");
            1
        }
    }
}

/// A stream the health check can talk on (TCP or unix).
trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}
