//! The kernel's wall: each worker restricts its own file-system access with Landlock.
//!
//! The rules, applied before the worker serves anything:
//!
//! - the data directory: read files, list directories (read-only);
//! - the worker's own spill directory and the cache directory (snapshots, results): read, write,
//!   create, remove;
//! - the directories of the error and access log files: create and append only, so that SIGUSR1
//!   can reopen a file logrotate moved away;
//! - nothing else: no other path can be opened, and no TCP port bound or connected (the
//!   listeners are inherited, already bound).
//!
//! Landlock restricts the calling thread and the threads it creates afterwards; before ABI 8
//! nothing can restrict threads that already exist. So the worker restricts itself right after
//! the fork, while it has one thread: it opens its DuckDB instance with one thread (DuckDB reads
//! the system's CPU and memory limits from `/proc` and `/sys` as it starts, and starts no thread
//! of its own), checks that it is still single-threaded, restricts itself, and only then starts
//! its tokio runtime, DuckDB's other threads and the engine. Every thread of the worker is inside
//! the sandbox, and everything DuckDB does after its start-up — reading Parquet, attaching and
//! building snapshots, spilling — runs inside it, which is also the proof that it needs nothing
//! else.
//!
//! The proof: before restricting, the worker creates a probe file next to its spill directory
//! (outside every allowed directory); afterwards, reading it must fail, or the worker refuses to
//! serve. The master removes the probe when it reaps the worker. Where the kernel has no
//! Landlock, the worker logs one warning, `/readyz` says the sandbox is DuckDB-only, and
//! `sandbox = "required"` makes it a boot failure instead.

use std::io;
use std::path::{Path, PathBuf};

use crate::settings::SandboxMode;
use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, LandlockStatus, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus,
};

/// The Landlock ABI whose rights the rules name; a kernel that knows fewer enforces what it can.
const TARGET_ABI: ABI = ABI::V7;

/// The paths a worker's sandbox is made of.
#[derive(Clone, Debug)]
pub struct SandboxPaths {
    /// Read-only.
    pub data_dir: PathBuf,
    /// Read-write, created if missing: the spill directory, the cache directories.
    pub writable: Vec<PathBuf>,
    /// Log files: their directories may get new files (reopen) and the files be appended to.
    pub log_files: Vec<PathBuf>,
    /// A file this worker creates outside every allowed directory, to prove the sandbox holds.
    pub probe: PathBuf,
}

/// What enforces the file-system boundary of this worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SandboxStatus {
    /// The kernel (Landlock, at this ABI) and DuckDB's settings.
    Kernel { abi: i32, complete: bool },
    /// DuckDB's settings only, and why.
    DuckDbOnly { reason: String },
}

impl SandboxStatus {
    /// One line for `/readyz` and the logs.
    pub fn describe(&self) -> String {
        match self {
            Self::Kernel {
                abi,
                complete: true,
            } => format!("landlock (ABI {abi}) and duckdb"),
            Self::Kernel {
                abi,
                complete: false,
            } => format!("landlock (ABI {abi}, partial) and duckdb"),
            Self::DuckDbOnly { reason } => format!("duckdb only: {reason}"),
        }
    }
}

/// Why the sandbox could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot prepare sandbox path {path}")]
    Path {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot restrict the worker with Landlock")]
    Landlock(#[source] landlock::RulesetError),
    #[error("sandbox = \"required\" but the kernel cannot enforce Landlock ({0})")]
    Unavailable(String),
    #[error("sandbox check failed: the worker could still read {0} after restricting itself")]
    Leak(PathBuf),
    #[error("cannot sandbox a worker with {0} threads: Landlock would leave all but one outside")]
    Threads(usize),
}

/// The number of threads of this process.
fn threads() -> io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no thread count in /proc/self/status"))
}

/// Restrict this process (which must have a single thread) to `paths`.
pub fn restrict(paths: &SandboxPaths, mode: SandboxMode) -> Result<SandboxStatus, SandboxError> {
    let path_error = |path: &Path| {
        let path = path.to_owned();
        move |source| SandboxError::Path { path, source }
    };
    let count = threads().map_err(path_error(Path::new("/proc/self/status")))?;
    if count != 1 {
        return Err(SandboxError::Threads(count));
    }
    // A cache directory that cannot be used turns its cache off (the engine and the result
    // cache say so), it does not stop the worker.
    let writable: Vec<&PathBuf> = paths
        .writable
        .iter()
        .filter(|dir| match std::fs::create_dir_all(dir) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "cannot create a directory of the worker's sandbox");
                false
            }
        })
        .collect();
    std::fs::write(&paths.probe, b"ferrocorn sandbox probe\n").map_err(path_error(&paths.probe))?;

    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    let write = read
        | AccessFs::WriteFile
        | AccessFs::MakeReg
        | AccessFs::MakeDir
        | AccessFs::RemoveFile
        | AccessFs::RemoveDir
        | AccessFs::Truncate
        | AccessFs::Refer;
    let append: BitFlags<AccessFs> = AccessFs::WriteFile | AccessFs::MakeReg;

    let rule = |path: &Path, access: BitFlags<AccessFs>| {
        PathFd::new(path)
            .map(|fd| PathBeneath::new(fd, access))
            .map_err(|e| SandboxError::Path {
                path: path.to_owned(),
                source: io::Error::other(e),
            })
    };
    let mut rules = vec![rule(&paths.data_dir, read)?];
    for dir in writable {
        rules.push(rule(dir, write)?);
    }
    for file in &paths.log_files {
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            rules.push(rule(dir, append)?);
        }
    }
    #[cfg(feature = "test-hooks")]
    if std::env::var_os(NO_LANDLOCK_FOR_TESTS).is_some() {
        return without_landlock(LandlockStatus::NotImplemented, mode);
    }
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(TARGET_ABI))
        .and_then(|r| r.handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(rules.into_iter().map(Ok::<_, landlock::RulesetError>)))
        .and_then(|r| r.restrict_self())
        .map_err(SandboxError::Landlock)?;

    let abi = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => effective_abi as i32,
        LandlockStatus::NotEnabled | LandlockStatus::NotImplemented => 0,
    };
    let result = match status.ruleset {
        RulesetStatus::NotEnforced => return without_landlock(status.landlock, mode),
        RulesetStatus::PartiallyEnforced => SandboxStatus::Kernel {
            abi,
            complete: false,
        },
        RulesetStatus::FullyEnforced => SandboxStatus::Kernel {
            abi,
            complete: true,
        },
    };
    if std::fs::read(&paths.probe).is_ok() {
        return Err(SandboxError::Leak(paths.probe.clone()));
    }
    Ok(result)
}

/// The outcome on a kernel that cannot enforce the rules.
fn without_landlock(
    landlock: LandlockStatus,
    mode: SandboxMode,
) -> Result<SandboxStatus, SandboxError> {
    let reason = match landlock {
        LandlockStatus::NotEnabled => "Landlock is not enabled in this kernel",
        LandlockStatus::NotImplemented => "this kernel has no Landlock",
        LandlockStatus::Available { .. } => "Landlock refused the ruleset",
    };
    match mode {
        SandboxMode::Required => Err(SandboxError::Unavailable(reason.into())),
        SandboxMode::Auto => Ok(SandboxStatus::DuckDbOnly {
            reason: reason.into(),
        }),
    }
}

/// Test builds only: with this variable set, the worker behaves as on a kernel without Landlock.
#[cfg(feature = "test-hooks")]
pub const NO_LANDLOCK_FOR_TESTS: &str = "FERROCORN_TEST_NO_LANDLOCK";
