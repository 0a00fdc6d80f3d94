//! Opening a worker's DuckDB instance and serving the datasets from it.
//!
//! An [`Instance`] is opened first, with one thread, so that a worker can restrict itself with
//! the kernel's sandbox while it is still single-threaded; [`Engine::start`] then configures and
//! locks it down, in the order DuckDB requires (settings that are frozen later must be set
//! first). [`Engine::open`] does both, for callers without a sandbox of their own.
//!
//! 1. at open: one query thread and no I/O threads, `memory_limit`, a fixed HTTP client pool
//!    (nothing DuckDB does afterwards reads the system's limits), extension autoload and
//!    autoinstall off;
//! 2. `threads` and `async_threads` (DuckDB's threads start now), `temp_directory` (the worker's
//!    own spill directory), `max_temp_directory_size` and `parquet_metadata_cache`;
//! 3. datasets registered (this reads Parquet footers and attaches snapshots, so it precedes the
//!    lock-down); a dataset that cannot be registered is reported as unavailable;
//! 4. `allowed_directories` = the data, temp and snapshot directories;
//! 5. `enable_external_access = false` (only the allowed directories stay readable);
//! 6. `lock_configuration = true` (no statement can undo 1–5).
//!
//! Then it proves the sandbox: DuckDB itself must refuse to read a probe file outside the allowed
//! directories, or the engine refuses to start. A worker never reports ready with an open
//! sandbox.
//!
//! # Datasets and snapshots
//!
//! Each dataset is a view named after it. In `parquet` storage the view reads the Parquet files.
//! In `snapshot` storage (see [`crate::snapshot`]) it reads a DuckDB database file built from
//! them, attached read-only. Until that file exists the view reads the Parquet files and this
//! engine's builder thread (one per worker; the pool's build lock lets one build run at a time)
//! builds it with a connection to this same instance, inside its memory limit. When a dataset's
//! files change, the snapshot of the old version keeps serving until the new one is published;
//! then the view moves to it at the next refresh, and the old file is detached once no query
//! that started before the move is still running.
//!
//! # Queries
//!
//! [`Engine::run`] passes a statement through the gate ([`crate::gate`]) and runs the one
//! statement DuckDB extracted from it on a pooled raw connection (`crate::pool`), whose cache
//! of prepared statements makes a repeated statement parsed, bound and planned once per
//! connection (DuckDB re-binds it by itself when a view it reads changes). The engine's own
//! catalogue statements run on a duckdb-rs connection.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use duckdb::Connection;

use crate::Error;
use crate::capi::Database;
use crate::catalog::{self, DatasetInfo, sql_path};
use crate::encode::Format;
use crate::gate::Analysis;
use crate::query::{Outcome, QueryError, QuerySpec, ResultSink};
use crate::run::{ChunkSink, Encoded, Runner};
use crate::serving::Serving;
use crate::snapshot::{DatasetOptions, SnapshotDir, SnapshotPolicy, StorageSettings};

/// What a worker's DuckDB instance is given.
#[derive(Clone, Debug, Default)]
pub struct EngineSettings {
    /// The Parquet data directory; the only directory queries may read.
    pub data_dir: PathBuf,
    /// This worker's own spill directory; created on open, removed when the engine drops.
    pub temp_dir: PathBuf,
    /// DuckDB's `memory_limit` for this worker, in bytes.
    pub memory_limit_bytes: u64,
    /// DuckDB's `threads` for this worker.
    pub threads: u32,
    /// DuckDB's `max_temp_directory_size` for this worker; `None` keeps DuckDB's default (90 % of
    /// the free disk space).
    pub max_temp_bytes: Option<u64>,
    /// Parquet views or snapshots, per dataset.
    pub storage: StorageSettings,
    /// A file outside every allowed directory that must exist and that DuckDB must refuse to
    /// read once the sandbox is locked (the boot-time proof); `None` probes nothing.
    pub sandbox_probe: Option<PathBuf>,
    /// Test builds only: leave DuckDB's sandbox open and the statement gate off, so that a test
    /// can show what the kernel's sandbox stops on its own.
    #[cfg(feature = "test-hooks")]
    pub unlocked_for_tests: bool,
}

/// A DuckDB instance just opened, before the engine configures it: empty, with one thread (the
/// caller's: DuckDB starts no thread of its own for one), having read what DuckDB reads when it
/// starts (the system's CPU and memory limits). A worker opens it, then restricts itself with
/// the kernel's sandbox while it is still single-threaded, then starts the [`Engine`] on it.
#[derive(Debug)]
pub struct Instance {
    database: Arc<Database>,
}

impl Instance {
    pub fn open(settings: &EngineSettings) -> Result<Self, Error> {
        let memory_limit = format!("{}MiB", (settings.memory_limit_bytes >> 20).max(16));
        let database = Database::open_in_memory(&[
            ("threads", "1".into()),
            ("async_threads", "0".into()),
            // A fixed size, so that changing the thread counts later reads no system limits (the
            // automatic size reads them from `/proc` and `/sys`); ferrocorn's DuckDB makes no
            // HTTP requests.
            ("http_client_pool_capacity", "1".into()),
            ("max_memory", memory_limit),
            ("autoload_known_extensions", "false".into()),
            ("autoinstall_known_extensions", "false".into()),
        ])
        .map_err(Error::Open)?;
        Ok(Self { database })
    }
}

/// One worker's DuckDB instance.
#[derive(Debug)]
pub struct Engine {
    serving: Serving,
    runner: Runner,
    temp_dir: PathBuf,
    version: String,
    /// Per-dataset options (sort keys, warm-up queries).
    options: BTreeMap<String, DatasetOptions>,
    /// Dropped last: every connection above is to it.
    _database: Arc<Database>,
}

impl Engine {
    /// Open, configure and lock the instance, register the datasets and prove the sandbox.
    pub fn open(settings: &EngineSettings) -> Result<Self, Error> {
        Self::start(settings, Instance::open(settings)?)
    }

    /// [`Engine::open`] on an instance opened beforehand (see [`Instance`]).
    pub fn start(settings: &EngineSettings, instance: Instance) -> Result<Self, Error> {
        let data_dir = settings
            .data_dir
            .canonicalize()
            .map_err(|source| Error::DataDir {
                path: settings.data_dir.clone(),
                source,
            })?;
        std::fs::create_dir_all(&settings.temp_dir).map_err(|source| Error::TempDir {
            path: settings.temp_dir.clone(),
            source,
        })?;
        let temp_dir = settings
            .temp_dir
            .canonicalize()
            .map_err(|source| Error::TempDir {
                path: settings.temp_dir.clone(),
                source,
            })?;
        // Without a usable snapshot directory the datasets are served from Parquet: slower,
        // never wrong, and no reason to refuse to serve.
        let snapshot_dir = settings.storage.snapshot_dir.as_ref().and_then(|dir| {
            SnapshotDir::open(dir)
                .inspect_err(|e| {
                    tracing::warn!(path = %dir.display(), error = %e, "snapshots off: cannot use their directory");
                })
                .ok()
        });
        let datasets = catalog::scan(&data_dir)?;

        let database = instance.database;
        let conn = database.rust_connection().map_err(Error::Connect)?;
        // The instance opened with one thread; the others start now, inside whatever sandbox
        // the caller entered meanwhile: DuckDB's query threads, and its I/O threads (DuckDB's
        // default is four per core of the machine; a worker has its share of the cores).
        if settings.threads > 1 {
            set(
                &conn,
                "threads",
                &format!("SET threads = {}", settings.threads),
            )?;
        }
        set(
            &conn,
            "async_threads",
            &format!("SET async_threads = {}", 4 * settings.threads.max(1)),
        )?;

        set(
            &conn,
            "temp_directory",
            &format!("SET temp_directory = {}", sql_path(&temp_dir)),
        )?;
        if let Some(bytes) = settings.max_temp_bytes {
            set(
                &conn,
                "max_temp_directory_size",
                &format!(
                    "SET max_temp_directory_size = '{}MiB'",
                    (bytes >> 20).max(1)
                ),
            )?;
        }
        // Parquet footers are parsed once per file version, not once per query. DuckDB validates
        // each entry against the file's modification time (and distrusts times under ten seconds
        // old), so a replaced file is never read through stale metadata.
        set(
            &conn,
            "parquet_metadata_cache",
            "SET parquet_metadata_cache = true",
        )?;
        let mut allowed = vec![quote_dir(&data_dir), quote_dir(&temp_dir)];
        if let Some(dir) = &snapshot_dir {
            allowed.push(quote_dir(dir.path()));
        }

        let version = conn
            .query_row("SELECT version()", [], |row| row.get::<_, String>(0))
            .map_err(Error::Query)?;
        #[cfg(feature = "test-hooks")]
        let unlocked = settings.unlocked_for_tests;
        #[cfg(not(feature = "test-hooks"))]
        let unlocked = false;
        let runner = Runner::new(database.clone(), &conn, unlocked)?;
        let policy = snapshot_dir.map(|dir| {
            Arc::new(SnapshotPolicy {
                dir,
                storage: settings.storage.clone(),
                duckdb_version: version.clone(),
            })
        });
        let builder_conn = match &policy {
            Some(_) => Some(database.rust_connection().map_err(Error::Connect)?),
            None => None,
        };
        let serving = Serving::start(conn, builder_conn, policy, data_dir, datasets);
        if !unlocked {
            serving.with_conn(|conn| {
                set(
                    conn,
                    "allowed_directories",
                    &format!("SET allowed_directories = [{}]", allowed.join(", ")),
                )?;
                set(
                    conn,
                    "enable_external_access",
                    "SET enable_external_access = false",
                )?;
                set(conn, "lock_configuration", "SET lock_configuration = true")?;
                match &settings.sandbox_probe {
                    Some(probe) => prove_sandbox(conn, probe),
                    None => Ok(()),
                }
            })?;
        }
        Ok(Self {
            serving,
            runner,
            temp_dir,
            version,
            options: settings.storage.datasets.clone(),
            _database: database,
        })
    }

    /// The registered datasets.
    pub fn catalog(&self) -> Arc<Vec<DatasetInfo>> {
        self.serving.catalog()
    }

    /// Whether [`Engine::refresh_if_due`] would rescan now.
    pub fn refresh_due(&self, interval: Duration) -> bool {
        self.serving.refresh_due(interval)
    }

    /// Rescan the data directory if the last scan is older than `interval` (see
    /// [`crate::serving`]). Returns whether the catalogue changed.
    pub fn refresh_if_due(&self, interval: Duration) -> bool {
        self.serving.refresh_if_due(interval)
    }

    /// Ask DuckDB to answer `SELECT 1` (readiness).
    pub fn ping(&self) -> Result<(), Error> {
        self.serving.ping()
    }

    /// Bytes DuckDB holds in its buffer manager now (the `memory_limit` it is held to). Blocks
    /// briefly: call it off the event loop.
    pub fn memory_in_use(&self) -> Result<u64, Error> {
        self.serving.memory_in_use()
    }

    /// The gate's analysis of `sql`, if it is remembered (no DuckDB call).
    pub fn cached_analysis(&self, sql: &str) -> Option<Arc<Analysis>> {
        self.runner.cached_analysis(sql)
    }

    /// The gate's analysis of `sql` (see [`crate::gate`]): DuckDB parses it, nothing is bound or
    /// executed. Blocks on a miss: call it from a thread that may block.
    pub fn analyze(&self, sql: &str) -> Result<Arc<Analysis>, QueryError> {
        self.runner.analyze(sql)
    }

    /// Run one query, streaming its result into `sink` as Arrow batches. Blocks: call it from a
    /// thread that may block (a worker's blocking pool).
    ///
    /// The statement passes the gate first ([`crate::gate`]): one statement by DuckDB's parser,
    /// a query by its parse tree and by its prepared type, reading only datasets that are
    /// available. Each query runs on its own connection to the instance, so it can be interrupted
    /// alone.
    pub fn run(
        &self,
        spec: &QuerySpec<'_>,
        sink: &mut dyn ResultSink,
    ) -> Result<Outcome, QueryError> {
        self.runner.run(&self.serving, spec, sink)
    }

    /// Run one query and encode its result in `format`, handing the bytes to `sink` as they are
    /// produced: the one pipeline from a statement to response bytes. Blocks, like
    /// [`Engine::run`].
    pub fn run_encoded(
        &self,
        spec: &QuerySpec<'_>,
        format: Format,
        sink: &mut dyn ChunkSink,
    ) -> Result<Encoded, QueryError> {
        self.runner.run_encoded(&self.serving, spec, format, sink)
    }

    /// How many datasets are registered.
    pub fn dataset_count(&self) -> usize {
        self.catalog().len()
    }

    /// The column `dataset`'s snapshot is sorted and indexed by, if it has one.
    pub fn sort_key(&self, dataset: &str) -> Option<&str> {
        self.options.get(dataset)?.sort_key.as_deref()
    }

    /// The warm-up queries configured for `dataset` (a worker runs them before it serves).
    pub fn warmup_queries(&self, dataset: &str) -> &[String] {
        self.options.get(dataset).map_or(&[], |o| &o.warmup)
    }

    /// DuckDB's version string, e.g. `v2.0.0`.
    pub fn duckdb_version(&self) -> &str {
        &self.version
    }

    #[cfg(test)]
    pub(crate) fn idle_connections(&self) -> usize {
        self.runner.idle_connections()
    }

    #[cfg(test)]
    pub(crate) fn with_catalogue_connection<R>(&self, f: impl FnOnce(&Connection) -> R) -> R {
        self.serving.with_conn(f)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.serving.stop_builder();
        // Under the worker's kernel sandbox the directory itself cannot be removed (that needs
        // write access to its parent): the master removes it when it reaps the worker.
        if let Err(e) = std::fs::remove_dir_all(&self.temp_dir)
            && !matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            )
        {
            tracing::warn!(path = %self.temp_dir.display(), error = %e, "cannot remove temp directory");
        }
    }
}

fn set(conn: &Connection, setting: &'static str, sql: &str) -> Result<(), Error> {
    conn.execute_batch(sql)
        .map_err(|source| Error::Setting { setting, source })
}

/// A directory as an `allowed_directories` entry: with a trailing slash, so that `/data` does not
/// also allow `/data-private`.
fn quote_dir(path: &Path) -> String {
    let mut text = path.display().to_string();
    if !text.ends_with('/') {
        text.push('/');
    }
    format!("'{}'", text.replace('\'', "''"))
}

/// Once the sandbox is locked, DuckDB itself must refuse to read `probe`, a file that exists
/// outside every allowed directory. An error from the file system does not count: that would be
/// the kernel's sandbox refusing, not DuckDB's.
fn prove_sandbox(conn: &Connection, probe: &Path) -> Result<(), Error> {
    if std::fs::metadata(probe).is_err() {
        return Err(Error::SandboxProbe {
            path: probe.to_owned(),
        });
    }
    let sql = format!("SELECT count(*) FROM read_text({})", sql_path(probe));
    match conn
        .query_row(&sql, [], |row| row.get::<_, i64>(0))
        .map_err(QueryError::from_duckdb)
    {
        Err(QueryError::Permission(_)) => Ok(()),
        _ => Err(Error::SandboxLeak {
            path: probe.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{settings, write_parquet};

    #[test]
    fn opens_registers_datasets_and_locks_the_sandbox() {
        let data = tempfile::tempdir().expect("tempdir");
        let temp = tempfile::tempdir().expect("tempdir");
        write_parquet(data.path(), "numbers");
        let engine = Engine::open(&settings(data.path(), temp.path())).expect("open");
        engine.ping().expect("ping");
        let catalog = engine.catalog();
        assert_eq!(catalog.len(), 1);
        assert_eq!(catalog[0].row_estimate, Some(10));
        assert_eq!(
            catalog[0]
                .columns
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["id", "twice"]
        );
        assert!(engine.duckdb_version().starts_with('v'));

        engine.with_catalogue_connection(|conn| {
            let sum: i64 = conn
                .query_row("SELECT sum(twice) FROM numbers", [], |r| r.get(0))
                .expect("query the view");
            assert_eq!(sum, 90);
            assert!(
                conn.query_row("SELECT count(*) FROM read_text('/etc/passwd')", [], |r| r
                    .get::<_, i64>(
                    0
                ))
                .is_err()
            );
            assert!(
                conn.execute_batch("SET enable_external_access = true")
                    .is_err()
            );
            assert!(conn.execute_batch("SET memory_limit = '10GB'").is_err());
            let cached: bool = conn
                .query_row(
                    "SELECT current_setting('parquet_metadata_cache')",
                    [],
                    |r| r.get(0),
                )
                .expect("setting");
            assert!(cached, "the Parquet metadata cache is on");
        });
    }

    #[test]
    fn the_sandbox_proof_needs_duckdb_itself_to_refuse_the_probe() {
        let data = tempfile::tempdir().expect("tempdir");
        let temp = tempfile::tempdir().expect("tempdir");
        let outside = temp.path().join("probe");
        std::fs::write(&outside, "probe").expect("write");
        let open = |probe: &Path| {
            Engine::open(&EngineSettings {
                sandbox_probe: Some(probe.to_owned()),
                ..settings(data.path(), temp.path())
            })
        };
        open(&outside).expect("a probe outside the allowed directories is refused");
        let missing = temp.path().join("missing");
        assert!(matches!(open(&missing), Err(Error::SandboxProbe { .. })));
        // A probe DuckDB may read (it is in the data directory) fails the proof.
        let inside = data.path().join("probe");
        std::fs::write(&inside, "probe").expect("write");
        assert!(matches!(open(&inside), Err(Error::SandboxLeak { .. })));
    }

    #[test]
    fn the_spill_limit_is_applied() {
        let data = tempfile::tempdir().expect("tempdir");
        let temp = tempfile::tempdir().expect("tempdir");
        let engine = Engine::open(&EngineSettings {
            max_temp_bytes: Some(300 << 20),
            ..settings(data.path(), temp.path())
        })
        .expect("open");
        let limit: String = engine.with_catalogue_connection(|conn| {
            conn.query_row(
                "SELECT current_setting('max_temp_directory_size')",
                [],
                |r| r.get(0),
            )
            .expect("setting")
        });
        assert!(limit.starts_with("300"), "{limit}");
    }

    #[test]
    fn temp_dir_is_removed_on_drop() {
        let data = tempfile::tempdir().expect("tempdir");
        let temp = tempfile::tempdir().expect("tempdir");
        let s = settings(data.path(), temp.path());
        let engine = Engine::open(&s).expect("open");
        assert!(s.temp_dir.exists());
        drop(engine);
        assert!(!s.temp_dir.exists());
    }

    #[test]
    fn missing_data_dir_is_an_error_naming_it() {
        let temp = tempfile::tempdir().expect("tempdir");
        let missing = temp.path().join("nope");
        let err = Engine::open(&settings(&missing, temp.path())).expect_err("must fail");
        assert!(matches!(err, Error::DataDir { ref path, .. } if path == &missing));
    }
}
