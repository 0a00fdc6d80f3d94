//! Snapshots: a dataset's Parquet files loaded once into a DuckDB database file that every worker
//! attaches read-only.
//!
//! A snapshot file is named after everything its content depends on — the dataset's version
//! (every file's name, size and modification time), the sort key, DuckDB's version and this
//! module's format number — so a restart with unchanged files finds it and rebuilds nothing, and a
//! changed dataset can never be served from an old file under its new version.
//!
//! Files on disk, all in the snapshot directory:
//!
//! - `NAME.HASH.duckdb`: a published snapshot. It only ever appears by `rename`, complete and
//!   synced. Each worker that attaches it holds a shared `flock` on it for as long as it is
//!   attached.
//! - `NAME.HASH.duckdb.tmp`: a build in progress (or the remains of a builder that died).
//! - `build.lock`: held exclusively by the one process of the pool that builds or collects
//!   garbage; builds run one at a time, so a build never takes more than one worker's share of
//!   memory and threads.
//!
//! Garbage collection runs under the build lock after a fresh scan of the data directory: a
//! snapshot that is not the current target of its dataset and that no worker holds (an exclusive
//! `flock` succeeds) is removed, and so is every temporary file. A worker's builder runs it after
//! each build and each time its worker detaches a snapshot (the moments a file can lose its last
//! holder), and once a minute for files released by workers that exited.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, TryLockError};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use duckdb::Connection;

use crate::catalog::{self, Dataset, sql_ident};

/// Bump when the layout of a snapshot file changes: old files are then rebuilt, never misread.
/// Format 3: the table is named after its dataset (so that a query's bare name resolves to it
/// through the connection's search path), not `data`.
const FORMAT: u32 = 3;
const LOCK_FILE: &str = "build.lock";

/// How a dataset is stored for querying.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageMode {
    /// A snapshot when the dataset's Parquet files fit the memory budget, else Parquet views.
    #[default]
    Auto,
    /// Views over the Parquet files: always the files' current content.
    Parquet,
    /// A DuckDB snapshot, rebuilt in the background when the files change.
    Snapshot,
}

impl std::str::FromStr for StorageMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "parquet" => Ok(Self::Parquet),
            "snapshot" => Ok(Self::Snapshot),
            _ => Err(format!("{text:?} is not one of auto, snapshot, parquet")),
        }
    }
}

/// Per-dataset storage options (`[datasets.NAME]` in the configuration).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetOptions {
    /// Overrides the pool's `storage` for this dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageMode>,
    /// The column a snapshot is sorted and indexed by: range filters on it skip every row group
    /// whose zone map excludes them, and point lookups go through the index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sort_key: Option<String>,
    /// Queries a worker runs on this dataset before it serves (a worker runs them before it serves); empty for
    /// the default warm-up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warmup: Vec<String>,
}

/// How the engine stores datasets.
#[derive(Clone, Debug, Default)]
pub struct StorageSettings {
    /// Where snapshots live; `None` turns snapshots off (every dataset is a Parquet view).
    pub snapshot_dir: Option<PathBuf>,
    /// The mode of datasets without their own.
    pub default_mode: StorageMode,
    /// Per-dataset options, by dataset name.
    pub datasets: BTreeMap<String, DatasetOptions>,
    /// `Auto` makes a snapshot of a dataset whose Parquet files total at most this many bytes.
    pub auto_max_bytes: u64,
}

/// Which snapshot file each dataset should be served from: the storage settings applied to one
/// snapshot directory and one DuckDB version. The engine and its builder share one.
#[derive(Debug)]
pub struct SnapshotPolicy {
    pub dir: SnapshotDir,
    pub storage: StorageSettings,
    pub duckdb_version: String,
}

/// The snapshot a dataset should be served from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub path: PathBuf,
    pub sort_key: Option<String>,
}

impl SnapshotPolicy {
    /// The snapshot `dataset` should be served from, or `None` for Parquet views.
    pub fn target(&self, dataset: &Dataset) -> Option<Target> {
        let options = self.storage.datasets.get(&dataset.name);
        let mode = options
            .and_then(|o| o.storage)
            .unwrap_or(self.storage.default_mode);
        let snapshot = match mode {
            StorageMode::Parquet => false,
            StorageMode::Snapshot => true,
            StorageMode::Auto => dataset.bytes <= self.storage.auto_max_bytes,
        };
        snapshot.then(|| {
            let sort_key = options.and_then(|o| o.sort_key.clone());
            Target {
                path: self
                    .dir
                    .target(dataset, sort_key.as_deref(), &self.duckdb_version),
                sort_key,
            }
        })
    }

    /// The snapshot files `datasets` should be served from.
    pub fn targets(&self, datasets: &[Dataset]) -> HashSet<PathBuf> {
        datasets
            .iter()
            .filter_map(|d| self.target(d))
            .map(|t| t.path)
            .collect()
    }
}

/// A published snapshot this process has open and share-locked: no garbage collection removes it
/// while this value lives.
#[derive(Debug)]
pub struct Held {
    pub path: PathBuf,
    pub bytes: u64,
    _lock: File,
}

/// Why a build did not publish a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Another process of the pool is building; try again later.
    #[error("another process is building")]
    Busy,
    /// The dataset changed (or went away) while it was read; the result was thrown away.
    #[error("the dataset changed during the build")]
    Changed,
    #[error("snapshot file operation failed on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("DuckDB could not build the snapshot")]
    Sql(#[source] duckdb::Error),
    /// The configured sort key names no column of the dataset.
    #[error("sort_key {key:?} is not a column of {dataset} (its columns: {columns})")]
    NoSuchSortKey {
        key: String,
        dataset: String,
        columns: String,
    },
}

impl BuildError {
    /// Whether building the same target again would fail the same way (a sort key that is no
    /// column, SQL DuckDB refuses), rather than depend on the moment (a full or failing disk,
    /// memory, an interruption, another builder).
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::NoSuchSortKey { .. } => true,
            Self::Busy | Self::Changed | Self::Io { .. } => false,
            Self::Sql(e) => {
                let message = e.to_string();
                ![
                    "IO Error",
                    "Out of Memory Error",
                    "INTERRUPT Error",
                    "Interrupt",
                ]
                .iter()
                .any(|kind| message.starts_with(kind))
            }
        }
    }
}

/// The snapshot directory.
#[derive(Clone, Debug)]
pub struct SnapshotDir {
    dir: PathBuf,
}

impl SnapshotDir {
    /// Use (and create) `dir`.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.canonicalize()?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The file a dataset's snapshot has for this version, sort key and DuckDB version.
    pub fn target(
        &self,
        dataset: &Dataset,
        sort_key: Option<&str>,
        duckdb_version: &str,
    ) -> PathBuf {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (FORMAT, &dataset.version, sort_key, duckdb_version).hash(&mut hasher);
        self.dir
            .join(format!("{}.{:016x}.duckdb", dataset.name, hasher.finish()))
    }

    /// Open and share-lock a published snapshot; `None` if there is none at `path` (or it is
    /// being removed).
    pub fn hold(&self, path: &Path) -> Option<Held> {
        let file = File::open(path).ok()?;
        file.try_lock_shared().ok()?;
        // Garbage collection may have removed the file between the open and the lock: only a
        // lock on the file that is still at `path` counts.
        let locked = file.metadata().ok()?;
        let current = std::fs::metadata(path).ok()?;
        (locked.ino() == current.ino() && locked.dev() == current.dev()).then(|| Held {
            path: path.to_owned(),
            bytes: current.len(),
            _lock: file,
        })
    }

    /// The pool's build lock, if no other process holds it.
    fn lock(&self) -> Result<File, BuildError> {
        let path = self.dir.join(LOCK_FILE);
        let io = |source| BuildError::Io {
            path: path.clone(),
            source,
        };
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(TryLockError::WouldBlock) => Err(BuildError::Busy),
            Err(TryLockError::Error(e)) => Err(io(e)),
        }
    }

    /// Build `dataset`'s snapshot at `target` with `conn` (a connection to the worker's own
    /// instance, so the build stays within its memory limit and spills to its temp directory),
    /// unless one exists. `data_dir` is rescanned before and after: if the dataset's version is
    /// no longer `dataset.version`, nothing is published.
    pub fn build(
        &self,
        conn: &Connection,
        data_dir: &Path,
        dataset: &Dataset,
        sort_key: Option<&str>,
        target: &Path,
    ) -> Result<bool, BuildError> {
        let _lock = self.lock()?;
        if target.exists() {
            return Ok(false);
        }
        let still_current = || {
            catalog::scan(data_dir).is_ok_and(|now| {
                now.iter()
                    .any(|d| d.name == dataset.name && d.version == dataset.version)
            })
        };
        if !still_current() {
            return Err(BuildError::Changed);
        }
        if let Some(key) = sort_key {
            let columns = column_names(conn, dataset).map_err(BuildError::Sql)?;
            if !columns.iter().any(|c| c == key) {
                return Err(BuildError::NoSuchSortKey {
                    key: key.to_owned(),
                    dataset: dataset.name.clone(),
                    columns: columns.join(", "),
                });
            }
        }
        let temp = temp_name(target);
        remove_if_exists(&temp)?;
        remove_if_exists(&wal_name(&temp))?;
        let alias = format!("ferrocorn_build_{}", dataset.name);
        let built = conn
            .execute_batch(&format!(
                "ATTACH {file} AS \"{alias}\"",
                file = catalog::sql_string(&temp.display().to_string()),
            ))
            .and_then(|()| {
                let order = sort_key.map_or(String::new(), |key| format!(" ORDER BY {}", sql_ident(key)));
                conn.execute_batch(&format!(
                    "CREATE TABLE \"{alias}\".main.{table} AS SELECT * FROM {source}{order}",
                    table = sql_ident(&dataset.name),
                    source = dataset.source_sql(),
                ))
            })
            .map(|()| {
                // Sorted, the key's zone maps already skip every other row group; the index
                // finds a row within its group without scanning the key column. A snapshot
                // without it (say the index does not fit in memory) is still correct.
                if let Some(key) = sort_key {
                    let index = conn.execute_batch(&format!(
                        "CREATE INDEX sort_key ON \"{alias}\".main.{} ({})",
                        sql_ident(&dataset.name),
                        sql_ident(key)
                    ));
                    if let Err(e) = index {
                        tracing::warn!(dataset = %dataset.name, error = %e, "snapshot built without an index on its sort key");
                    }
                }
            })
            .and_then(|()| conn.execute_batch(&format!("CHECKPOINT \"{alias}\"")));
        // Detach whatever happened, so a failed build leaves nothing attached.
        let _ = conn.execute_batch(&format!("DETACH DATABASE IF EXISTS \"{alias}\""));
        if let Err(e) = built {
            let _ = std::fs::remove_file(&temp);
            let _ = std::fs::remove_file(wal_name(&temp));
            return Err(BuildError::Sql(e));
        }
        if !still_current() {
            let _ = std::fs::remove_file(&temp);
            return Err(BuildError::Changed);
        }
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| BuildError::Io { path, source }
        };
        File::open(&temp)
            .and_then(|f| f.sync_all())
            .map_err(io(&temp))?;
        std::fs::rename(&temp, target).map_err(io(target))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(true)
    }

    /// Why the build of `target` failed, if a worker of the pool recorded a failure.
    pub fn failure(&self, target: &Path) -> Option<String> {
        std::fs::read_to_string(failure_name(target)).ok()
    }

    /// Record that the build of `target` failed, and why, so that no worker of the pool (nor the
    /// next start) tries it again: a change of the files or of the options names another target.
    pub fn record_failure(&self, target: &Path, reason: &str) -> std::io::Result<()> {
        let path = failure_name(target);
        let temp = temp_name(&path);
        std::fs::write(&temp, reason)?;
        std::fs::rename(&temp, &path)
    }

    /// Remove snapshots that are not a current target (`wanted`, from a scan taken under the
    /// lock by `targets`) and that no process holds, and every temporary file. Skipped when
    /// another process holds the build lock. Returns the files removed.
    pub fn collect_garbage(
        &self,
        targets: impl FnOnce() -> Option<HashSet<PathBuf>>,
    ) -> Vec<PathBuf> {
        let Ok(_lock) = self.lock() else {
            return Vec::new();
        };
        let Some(wanted) = targets() else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let unused = if name.ends_with(".duckdb") {
                !wanted.contains(&path) && File::open(&path).is_ok_and(|f| f.try_lock().is_ok())
            } else if let Some(target) = name.strip_suffix(FAILED_SUFFIX) {
                // The record of a failed build goes with its target.
                !wanted.contains(&self.dir.join(target))
            } else {
                // A temporary file or WAL: only a builder holding the lock writes one.
                name.ends_with(".tmp") || name.ends_with(".wal")
            };
            if unused && std::fs::remove_file(&path).is_ok() {
                removed.push(path);
            }
        }
        removed
    }
}

/// What a failed build's record adds to its target's name.
const FAILED_SUFFIX: &str = ".failed";

fn failure_name(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_owned();
    name.push(FAILED_SUFFIX);
    PathBuf::from(name)
}

/// The column names of `dataset`'s files.
fn column_names(conn: &Connection, dataset: &Dataset) -> duckdb::Result<Vec<String>> {
    let mut statement = conn.prepare(&format!(
        "SELECT column_name FROM (DESCRIBE SELECT * FROM {})",
        dataset.source_sql()
    ))?;
    statement
        .query_map([], |row| row.get(0))
        .and_then(|rows| rows.collect())
}

fn temp_name(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

fn wal_name(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".wal");
    PathBuf::from(name)
}

fn remove_if_exists(path: &Path) -> Result<(), BuildError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(BuildError::Io {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}
