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

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, mpsc};
use std::time::{Duration, Instant};

use duckdb::Connection;
use hashlink::LruCache;

use crate::Error;
use crate::capi::{self, Database, StatementType};
use crate::catalog::{self, Dataset};
use crate::gate::{Analysis, FunctionPolicy};
use crate::pool::{Pool, Purpose, QueryConn};
use crate::query::{Flow, Outcome, QueryError, QuerySpec, ResultSink};
use crate::snapshot::{BuildError, Held, SnapshotDir, SnapshotPolicy, StorageSettings, Target};

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

/// A column of a dataset.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Column {
    pub name: String,
    /// DuckDB's type name, e.g. `DECIMAL(12,2)`.
    #[serde(rename = "type")]
    pub sql_type: String,
}

/// What a dataset is served from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Storage {
    /// A view over the Parquet files.
    Parquet,
    /// A snapshot file attached read-only.
    Snapshot { file: PathBuf, bytes: u64 },
}

/// A registered dataset with what DuckDB knows of it.
#[derive(Clone, Debug)]
pub struct DatasetInfo {
    /// The dataset as served: its version is the one queries see.
    pub dataset: Dataset,
    pub columns: Vec<Column>,
    /// Rows according to the Parquet footers (or the snapshot).
    pub row_estimate: Option<u64>,
    pub storage: Storage,
    /// The version of the files whose snapshot is being built, when it is not the one served.
    pub pending: Option<String>,
    /// Why the dataset cannot be queried (its files are not valid Parquet, say); `None` when
    /// it can. Queries naming an unavailable dataset are refused; the others serve on.
    pub error: Option<String>,
}

/// Statement analyses a worker remembers, by text, and the longest text remembered.
const ANALYSES: usize = 1024;
const MAX_ANALYSED_TEXT: usize = 16 << 10;
/// The engine's own call for a statement's parse tree (see [`crate::gate`]).
const SERIALIZE_SQL: &str = "SELECT json_serialize_sql($1::VARCHAR)";
/// How often the builder thread looks for snapshot files no worker holds any more, besides after
/// each build and each detach: this catches files released by workers that exited.
const GC_INTERVAL: Duration = Duration::from_secs(60);

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
    /// The connection that changes the catalogue (views, attachments).
    conn: Mutex<Connection>,
    /// Query connections.
    pool: Pool,
    /// The functions of the instance, for the gate.
    functions: FunctionPolicy,
    /// Gate analyses of recent statements, by text.
    analyses: Mutex<LruCache<String, Arc<Analysis>>>,
    catalog: RwLock<Arc<Vec<DatasetInfo>>>,
    snapshots: Snapshots,
    last_scan: Mutex<Instant>,
    data_dir: PathBuf,
    temp_dir: PathBuf,
    version: String,
    #[cfg(feature = "test-hooks")]
    unlocked: bool,
    /// Dropped last: every connection above is to it.
    _database: Arc<Database>,
}

/// The engine's snapshot state.
#[derive(Debug)]
struct Snapshots {
    /// `None` when snapshots are off (or their directory is unusable).
    policy: Option<Arc<SnapshotPolicy>>,
    /// What each snapshot-served dataset has attached.
    attached: Mutex<HashMap<String, Attachment>>,
    /// Attachments replaced or dropped, each with the generation that was current while it
    /// served: it is detached once no query holds that generation.
    retired: Mutex<Vec<(Attachment, Arc<()>)>>,
    /// Held by every running query; replaced whenever an attachment retires.
    generation: Mutex<Arc<()>>,
    /// Snapshot files whose build failed: their dataset is served from Parquet instead.
    failed: Arc<Mutex<HashSet<PathBuf>>>,
    builder: Option<Builder>,
    aliases: AtomicU64,
}

#[derive(Debug)]
struct Attachment {
    alias: String,
    _held: Held,
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
            &format!("SET temp_directory = {}", quote(&temp_dir)),
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
        let functions = function_policy(&conn)?;
        let policy = snapshot_dir.map(|dir| {
            Arc::new(SnapshotPolicy {
                dir,
                storage: settings.storage.clone(),
                duckdb_version: version.clone(),
            })
        });
        let failed = Arc::new(Mutex::new(HashSet::new()));
        let builder = match &policy {
            Some(policy) => Some(Builder::start(
                database.rust_connection().map_err(Error::Connect)?,
                BuilderContext {
                    policy: policy.clone(),
                    data_dir: data_dir.clone(),
                    failed: failed.clone(),
                },
            )),
            None => None,
        };
        let engine = Self {
            conn: Mutex::new(conn),
            pool: Pool::new(database.clone()),
            functions,
            analyses: Mutex::new(LruCache::new(ANALYSES)),
            catalog: RwLock::new(Arc::new(Vec::new())),
            snapshots: Snapshots {
                policy,
                attached: Mutex::new(HashMap::new()),
                retired: Mutex::new(Vec::new()),
                generation: Mutex::new(Arc::new(())),
                failed,
                builder,
                aliases: AtomicU64::new(0),
            },
            last_scan: Mutex::new(Instant::now()),
            data_dir,
            temp_dir,
            version,
            #[cfg(feature = "test-hooks")]
            unlocked: settings.unlocked_for_tests,
            _database: database,
        };
        {
            let conn = lock(&engine.conn);
            let mut catalog = Vec::with_capacity(datasets.len());
            for dataset in datasets {
                catalog.push(engine.serve_or_report(&conn, dataset, None));
            }
            *engine.catalog.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(catalog);
            if !engine.unlocked() {
                set(
                    &conn,
                    "allowed_directories",
                    &format!("SET allowed_directories = [{}]", allowed.join(", ")),
                )?;
                set(
                    &conn,
                    "enable_external_access",
                    "SET enable_external_access = false",
                )?;
                set(&conn, "lock_configuration", "SET lock_configuration = true")?;
                if let Some(probe) = &settings.sandbox_probe {
                    prove_sandbox(&conn, probe)?;
                }
            }
        }
        Ok(engine)
    }

    /// The registered datasets.
    pub fn catalog(&self) -> Arc<Vec<DatasetInfo>> {
        self.catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether [`Engine::refresh_if_due`] would rescan now.
    pub fn refresh_due(&self, interval: Duration) -> bool {
        lock(&self.last_scan).elapsed() >= interval
    }

    /// Rescan the data directory if the last scan is older than `interval`: new datasets are
    /// registered, changed ones re-registered, removed ones dropped, finished snapshots attached
    /// and drained ones detached. A dataset that cannot be registered keeps its previous view and
    /// is logged. Returns whether the catalogue changed.
    pub fn refresh_if_due(&self, interval: Duration) -> bool {
        {
            let mut last = lock(&self.last_scan);
            if last.elapsed() < interval {
                return false;
            }
            *last = Instant::now();
        }
        match catalog::scan(&self.data_dir) {
            Ok(datasets) => self.apply(datasets),
            Err(e) => {
                tracing::warn!(error = %e, "cannot rescan the data directory");
                false
            }
        }
    }

    fn apply(&self, datasets: Vec<Dataset>) -> bool {
        let conn = lock(&self.conn);
        self.detach_drained(&conn);
        let current = self.catalog();
        let unchanged = datasets.len() == current.len()
            && datasets.iter().zip(current.iter()).all(|(new, old)| {
                new.name == old.dataset.name
                    && new.version == old.dataset.version
                    && old.pending.is_none()
            });
        if unchanged {
            return false;
        }
        let mut next = Vec::with_capacity(datasets.len());
        for dataset in datasets {
            let old = current.iter().find(|d| d.dataset.name == dataset.name);
            next.push(self.serve_or_report(&conn, dataset, old));
        }
        for gone in current
            .iter()
            .filter(|o| !next.iter().any(|n| n.dataset.name == o.dataset.name))
        {
            let sql = format!("DROP VIEW IF EXISTS \"{}\"", gone.dataset.name);
            if conn.execute_batch(&sql).is_ok() {
                self.retire(&gone.dataset.name);
                tracing::info!(dataset = %gone.dataset.name, "dataset removed");
            }
        }
        let changed = next.len() != current.len()
            || next.iter().zip(current.iter()).any(|(n, o)| {
                n.dataset.version != o.dataset.version
                    || n.storage != o.storage
                    || n.pending != o.pending
            });
        *self.catalog.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        changed
    }

    /// [`Engine::serve`], or — when the dataset cannot be served (its files are not valid
    /// Parquet, say) — a catalogue entry saying why, so that one bad dataset never keeps the
    /// others from serving. A snapshot that served before keeps serving its version.
    fn serve_or_report(
        &self,
        conn: &Connection,
        dataset: Dataset,
        old: Option<&DatasetInfo>,
    ) -> DatasetInfo {
        if let Some(old) = old
            && old.error.is_some()
            && old.dataset.version == dataset.version
        {
            return old.clone();
        }
        let served = match &dataset.problem {
            Some(problem) => Err(problem.clone()),
            None => self
                .serve(conn, dataset.clone(), old)
                .map_err(|e| crate::error::chain(&e)),
        };
        match served {
            Ok(info) => info,
            Err(reason) => {
                tracing::warn!(dataset = %dataset.name, error = %reason, "dataset unavailable");
                match old {
                    Some(old)
                        if matches!(old.storage, Storage::Snapshot { .. })
                            && old.error.is_none() =>
                    {
                        old.clone()
                    }
                    _ => DatasetInfo {
                        dataset,
                        columns: Vec::new(),
                        row_estimate: None,
                        storage: Storage::Parquet,
                        pending: None,
                        error: Some(reason),
                    },
                }
            }
        }
    }

    /// Decide what serves `dataset` now, given what served it before (`old`), and make the view
    /// say so.
    fn serve(
        &self,
        conn: &Connection,
        dataset: Dataset,
        old: Option<&DatasetInfo>,
    ) -> Result<DatasetInfo, Error> {
        let snapshots = &self.snapshots;
        let Some((policy, target)) = snapshots
            .policy
            .as_ref()
            .and_then(|p| Some((p, p.target(&dataset)?)))
        else {
            return self.serve_parquet(conn, dataset, old, None);
        };
        if let Some(old) = old
            && matches!(&old.storage, Storage::Snapshot { file, .. } if *file == target.path)
        {
            return Ok(DatasetInfo {
                pending: None,
                ..old.clone()
            });
        }
        if lock(&snapshots.failed).contains(&target.path) {
            return self.serve_parquet(conn, dataset, old, None);
        }
        if let Some(held) = policy.dir.hold(&target.path) {
            let info = self.attach(conn, dataset, held)?;
            tracing::info!(dataset = %info.dataset.name, version = %info.dataset.version, "serving snapshot");
            return Ok(info);
        }
        if let Some(builder) = &snapshots.builder {
            builder.request(BuildJob {
                dataset: dataset.clone(),
                target,
            });
        }
        match old {
            // The old snapshot keeps serving while the new one is built.
            Some(old) if matches!(old.storage, Storage::Snapshot { .. }) => Ok(DatasetInfo {
                pending: Some(dataset.version),
                ..old.clone()
            }),
            _ => {
                let pending = Some(dataset.version.clone());
                self.serve_parquet(conn, dataset, old, pending)
            }
        }
    }

    fn serve_parquet(
        &self,
        conn: &Connection,
        dataset: Dataset,
        old: Option<&DatasetInfo>,
        pending: Option<String>,
    ) -> Result<DatasetInfo, Error> {
        if let Some(old) = old
            && old.storage == Storage::Parquet
            && old.dataset.version == dataset.version
        {
            return Ok(DatasetInfo {
                pending,
                ..old.clone()
            });
        }
        let info = register(conn, dataset, pending)?;
        self.retire(&info.dataset.name);
        tracing::info!(dataset = %info.dataset.name, version = %info.dataset.version, "dataset registered");
        Ok(info)
    }

    /// Attach a published snapshot and point the dataset's view at it.
    fn attach(
        &self,
        conn: &Connection,
        dataset: Dataset,
        held: Held,
    ) -> Result<DatasetInfo, Error> {
        let n = self.snapshots.aliases.fetch_add(1, Ordering::Relaxed);
        let alias = format!("ferrocorn_snapshot_{n}");
        let failed = |source| Error::Dataset {
            dataset: dataset.name.clone(),
            path: held.path.clone(),
            source,
        };
        conn.execute_batch(&format!(
            "ATTACH {} AS \"{alias}\" (READ_ONLY)",
            quote(&held.path)
        ))
        .map_err(failed)?;
        // Everything that can fail is read from the attached table before the view moves to it,
        // so a failure leaves the view on what it served.
        let table = format!("\"{alias}\".main.data");
        let described = describe(conn, &table).and_then(|columns| {
            let rows = conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| {
                r.get::<_, i64>(0)
            })?;
            conn.execute_batch(&format!(
                "CREATE OR REPLACE VIEW \"{}\" AS SELECT * FROM {table}",
                dataset.name
            ))?;
            Ok((columns, rows))
        });
        let (columns, rows) = match described {
            Ok(found) => found,
            Err(e) => {
                let _ = conn.execute_batch(&format!("DETACH DATABASE IF EXISTS \"{alias}\""));
                return Err(failed(e));
            }
        };
        let info = DatasetInfo {
            storage: Storage::Snapshot {
                file: held.path.clone(),
                bytes: held.bytes,
            },
            dataset,
            columns,
            row_estimate: u64::try_from(rows).ok(),
            pending: None,
            error: None,
        };
        let previous = lock(&self.snapshots.attached)
            .insert(info.dataset.name.clone(), Attachment { alias, _held: held });
        if let Some(previous) = previous {
            self.retire_attachment(previous);
        }
        Ok(info)
    }

    /// The dataset no longer reads its attachment (if it had one): detach it once drained.
    fn retire(&self, name: &str) {
        let previous = lock(&self.snapshots.attached).remove(name);
        if let Some(previous) = previous {
            self.retire_attachment(previous);
        }
    }

    fn retire_attachment(&self, attachment: Attachment) {
        let generation = std::mem::replace(&mut *lock(&self.snapshots.generation), Arc::new(()));
        lock(&self.snapshots.retired).push((attachment, generation));
    }

    /// Detach retired snapshots that no running query can still be reading, and have the
    /// builder look for files that lost their last holder.
    fn detach_drained(&self, conn: &Connection) {
        let mut detached = false;
        lock(&self.snapshots.retired).retain(|(attachment, generation)| {
            if Arc::strong_count(generation) > 1 {
                return true;
            }
            let sql = format!("DETACH DATABASE IF EXISTS \"{}\"", attachment.alias);
            if let Err(e) = conn.execute_batch(&sql) {
                tracing::warn!(alias = %attachment.alias, error = %e, "cannot detach snapshot");
                return true;
            }
            detached = true;
            false
        });
        if detached && let Some(builder) = &self.snapshots.builder {
            builder.collect();
        }
    }

    /// Ask DuckDB to answer `SELECT 1` (readiness).
    pub fn ping(&self) -> Result<(), Error> {
        let conn = lock(&self.conn);
        let one: i32 = conn
            .query_row("SELECT 1", [], |row| row.get(0))
            .map_err(Error::Query)?;
        debug_assert_eq!(one, 1);
        Ok(())
    }

    /// Whether DuckDB's sandbox and the gate are off (test builds only).
    fn unlocked(&self) -> bool {
        #[cfg(feature = "test-hooks")]
        {
            self.unlocked
        }
        #[cfg(not(feature = "test-hooks"))]
        {
            false
        }
    }

    /// The gate's analysis of `sql`, if it is remembered (no DuckDB call).
    pub fn cached_analysis(&self, sql: &str) -> Option<Arc<Analysis>> {
        #[cfg(feature = "test-hooks")]
        if self.unlocked {
            return Some(Arc::new(Analysis::unchecked()));
        }
        lock(&self.analyses).get(sql).cloned()
    }

    /// The gate's analysis of `sql` (see [`crate::gate`]): DuckDB parses it, nothing is bound or
    /// executed. Blocks on a miss: call it from a thread that may block.
    pub fn analyze(&self, sql: &str) -> Result<Arc<Analysis>, QueryError> {
        if let Some(known) = self.cached_analysis(sql) {
            return Ok(known);
        }
        let mut conn = self.pool.checkout()?;
        self.analyze_on(&mut conn, sql)
    }

    fn analyze_on(&self, conn: &mut QueryConn, sql: &str) -> Result<Arc<Analysis>, QueryError> {
        if let Some(known) = self.cached_analysis(sql) {
            return Ok(known);
        }
        // DuckDB's parser first: a syntax error is reported as DuckDB words it, and the number
        // of statements is DuckDB's.
        {
            let extracted = conn.extract(sql)?;
            match extracted.count() {
                0 => return Err(crate::gate::Refusal::Empty.into()),
                1 => {}
                n => return Err(crate::gate::Refusal::MultipleStatements(n).into()),
            }
        }
        let serialized = {
            let prepared =
                conn.prepare(Purpose::Serialize, SERIALIZE_SQL, StatementType::Select)?;
            prepared
                .bind(&[capi::Value::Text(sql.to_owned())])
                .map_err(QueryError::from_message)?;
            let mut stream = prepared.execute().map_err(QueryError::from_message)?;
            let batch = stream
                .next_batch()
                .map_err(QueryError::from_message)?
                .ok_or_else(|| {
                    QueryError::Internal("json_serialize_sql returned nothing".into())
                })?;
            first_text(&batch)
                .ok_or_else(|| QueryError::Internal("json_serialize_sql returned no text".into()))?
        };
        let analysis = Arc::new(crate::gate::analyze(sql, &serialized, &self.functions)?);
        if sql.len() <= MAX_ANALYSED_TEXT {
            lock(&self.analyses).insert(sql.to_owned(), analysis.clone());
        }
        Ok(analysis)
    }

    /// Run one query, streaming its result into `sink`. Blocks: call it from a thread that may
    /// block (a worker's blocking pool).
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
        // Snapshots this query may read stay attached until it ends.
        let _generation = lock(&self.snapshots.generation).clone();
        let mut conn = self.pool.checkout()?;
        sink.started(conn.interrupt_handle());
        let (purpose, text, expected) = match spec.explain {
            None => (Purpose::Query, spec.sql.to_owned(), StatementType::Select),
            Some(explain) => (
                Purpose::Explain,
                explain.wrap(spec.sql),
                StatementType::Explain,
            ),
        };
        if self.unlocked() {
            // Test builds only: run whatever the text is, on purpose.
            return run_unchecked(&mut conn, &text, spec, sink);
        }
        let analysis = self.analyze_on(&mut conn, spec.sql)?;
        analysis.check(&self.catalog())?;
        let prepared = conn.prepare(purpose, &text, expected)?;
        let values = spec.params.bind_order(&prepared.parameter_names())?;
        prepared.bind(&values).map_err(QueryError::from_message)?;
        let mut stream = prepared.execute().map_err(QueryError::from_message)?;
        stream_into(&mut stream, spec.max_rows, sink)
    }

    /// How many datasets are registered.
    pub fn dataset_count(&self) -> usize {
        self.catalog().len()
    }

    /// DuckDB's version string, e.g. `v2.0.0`.
    pub fn duckdb_version(&self) -> &str {
        &self.version
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(builder) = self.snapshots.builder.take() {
            builder.stop();
        }
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

/// Pass a running query's batches to `sink`, cutting the result at `max_rows`.
fn stream_into(
    stream: &mut capi::Stream<'_>,
    max_rows: u64,
    sink: &mut dyn ResultSink,
) -> Result<Outcome, QueryError> {
    let mut outcome = Outcome {
        rows: 0,
        truncated: false,
        stopped: false,
    };
    if sink.schema(stream.schema()) == Flow::Stop {
        outcome.stopped = true;
        return Ok(outcome);
    }
    while let Some(batch) = stream.next_batch().map_err(QueryError::from_message)? {
        if batch.num_rows() == 0 {
            continue;
        }
        let remaining = max_rows.saturating_sub(outcome.rows);
        if remaining == 0 {
            // One more row exists beyond the cap: the result is cut, and says so.
            outcome.truncated = true;
            break;
        }
        let batch = if batch.num_rows() as u64 > remaining {
            outcome.truncated = true;
            batch.slice(0, remaining as usize)
        } else {
            batch
        };
        outcome.rows += batch.num_rows() as u64;
        if sink.batch(batch) == Flow::Stop {
            outcome.stopped = true;
            break;
        }
        if outcome.truncated {
            break;
        }
    }
    // Dropping the stream closes the result, so the connection (and its cached statement) can
    // serve the next query even when this one was cut short.
    Ok(outcome)
}

/// Test builds only: the text extracted and prepared as one statement, of any type, and run.
#[cfg(feature = "test-hooks")]
fn run_unchecked(
    conn: &mut QueryConn,
    text: &str,
    spec: &QuerySpec<'_>,
    sink: &mut dyn ResultSink,
) -> Result<Outcome, QueryError> {
    let extracted = conn.extract(text)?;
    let mut prepared = extracted.prepare(0).map_err(QueryError::from_message)?;
    let values = spec.params.bind_order(&prepared.parameter_names())?;
    prepared.bind(&values).map_err(QueryError::from_message)?;
    let mut stream = prepared.execute().map_err(QueryError::from_message)?;
    stream_into(&mut stream, spec.max_rows, sink)
}

#[cfg(not(feature = "test-hooks"))]
fn run_unchecked(
    _: &mut QueryConn,
    _: &str,
    _: &QuerySpec<'_>,
    _: &mut dyn ResultSink,
) -> Result<Outcome, QueryError> {
    Err(QueryError::Internal("the gate cannot be turned off".into()))
}

/// The first value of a one-column text result.
fn first_text(batch: &arrow::record_batch::RecordBatch) -> Option<String> {
    use arrow::array::{Array, LargeStringArray, StringArray, StringViewArray};
    let column = batch.columns().first()?;
    if column.is_empty() || column.is_null(0) {
        return None;
    }
    let any = column.as_any();
    if let Some(a) = any.downcast_ref::<StringArray>() {
        return Some(a.value(0).to_owned());
    }
    if let Some(a) = any.downcast_ref::<LargeStringArray>() {
        return Some(a.value(0).to_owned());
    }
    any.downcast_ref::<StringViewArray>()
        .map(|a| a.value(0).to_owned())
}

/// What `duckdb_functions()` says of every function of the instance, for the gate.
fn function_policy(conn: &Connection) -> Result<FunctionPolicy, Error> {
    let mut policy = FunctionPolicy::default();
    let mut statement = conn
        .prepare("SELECT function_name, stability FROM duckdb_functions()")
        .map_err(Error::Query)?;
    let rows = statement
        .query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, Option<String>>(1)?))
        })
        .map_err(Error::Query)?;
    for row in rows {
        let (name, stability) = row.map_err(Error::Query)?;
        policy.add(&name, stability.as_deref().unwrap_or(""));
    }
    Ok(policy)
}

/// A snapshot to build.
#[derive(Debug)]
struct BuildJob {
    dataset: Dataset,
    target: Target,
}

/// What the builder thread is asked to do.
#[derive(Debug)]
enum Work {
    Build(BuildJob),
    /// A snapshot was detached: its file may have no holder left.
    Collect,
}

/// What the builder thread needs besides its connection.
#[derive(Debug)]
struct BuilderContext {
    policy: Arc<SnapshotPolicy>,
    data_dir: PathBuf,
    failed: Arc<Mutex<HashSet<PathBuf>>>,
}

impl BuilderContext {
    /// Remove the snapshot files no current target needs and no process holds.
    fn collect_garbage(&self) {
        let targets = || Some(self.policy.targets(&catalog::scan(&self.data_dir).ok()?));
        for path in self.policy.dir.collect_garbage(targets) {
            tracing::info!(path = %path.display(), "snapshot file removed");
        }
    }

    fn build(&self, conn: &Connection, job: &BuildJob) {
        let started = Instant::now();
        let name = &job.dataset.name;
        let target = &job.target;
        match self.policy.dir.build(
            conn,
            &self.data_dir,
            &job.dataset,
            target.sort_key.as_deref(),
            &target.path,
        ) {
            Ok(true) => tracing::info!(
                dataset = %name,
                version = %job.dataset.version,
                seconds = started.elapsed().as_secs_f64(),
                bytes = std::fs::metadata(&target.path).map_or(0, |m| m.len()),
                "snapshot built"
            ),
            Ok(false) | Err(BuildError::Busy | BuildError::Changed) => {}
            Err(e) => {
                tracing::warn!(dataset = %name, error = %crate::error::chain(&e), "snapshot build failed; serving Parquet");
                lock(&self.failed).insert(target.path.clone());
            }
        }
    }
}

/// The worker's snapshot builder: a thread that builds requested snapshots one at a time and
/// collects unused ones.
struct Builder {
    work: Mutex<Option<mpsc::Sender<Work>>>,
    /// Targets requested and not yet attempted, so a job is queued once.
    queued: Arc<Mutex<HashSet<PathBuf>>>,
    interrupt: Arc<duckdb::InterruptHandle>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("queued", &self.queued)
            .finish_non_exhaustive()
    }
}

impl Builder {
    fn start(conn: Connection, context: BuilderContext) -> Self {
        let (tx, rx) = mpsc::channel::<Work>();
        let queued = Arc::new(Mutex::new(HashSet::new()));
        let interrupt = conn.interrupt_handle();
        let thread = {
            let queued = queued.clone();
            std::thread::Builder::new()
                .name("snapshot-builder".into())
                .spawn(move || {
                    loop {
                        match rx.recv_timeout(GC_INTERVAL) {
                            Ok(Work::Build(job)) => {
                                context.build(&conn, &job);
                                lock(&queued).remove(&job.target.path);
                            }
                            Ok(Work::Collect) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                            Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        }
                        context.collect_garbage();
                    }
                })
                .ok()
        };
        Self {
            work: Mutex::new(Some(tx)),
            queued,
            interrupt,
            thread,
        }
    }

    fn request(&self, job: BuildJob) {
        if lock(&self.queued).insert(job.target.path.clone()) {
            self.send(Work::Build(job));
        }
    }

    /// Look for snapshot files that have lost their last holder.
    fn collect(&self) {
        self.send(Work::Collect);
    }

    fn send(&self, work: Work) {
        if let Some(tx) = lock(&self.work).as_ref() {
            let _ = tx.send(work);
        }
    }

    /// Interrupt a build in progress and wait for the thread to end.
    fn stop(mut self) {
        lock(&self.work).take();
        self.interrupt.interrupt();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The columns of `relation` (SQL text: a quoted name or a qualified table).
fn describe(conn: &Connection, relation: &str) -> duckdb::Result<Vec<Column>> {
    let mut statement = conn.prepare(&format!(
        "SELECT column_name, column_type FROM (DESCRIBE {relation})"
    ))?;
    statement
        .query_map([], |row| {
            Ok(Column {
                name: row.get(0)?,
                sql_type: row.get(1)?,
            })
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
}

/// Create (or replace) a dataset's Parquet view and read its columns and row estimate.
fn register(
    conn: &Connection,
    dataset: Dataset,
    pending: Option<String>,
) -> Result<DatasetInfo, Error> {
    let failed = |source| Error::Dataset {
        dataset: dataset.name.clone(),
        path: dataset.path.clone(),
        source,
    };
    conn.execute_batch(&dataset.view_sql()).map_err(failed)?;
    let columns = describe(conn, &format!("\"{}\"", dataset.name)).map_err(failed)?;
    let row_estimate = conn
        .query_row(
            &format!(
                "SELECT CAST(sum(num_rows) AS BIGINT) FROM parquet_file_metadata({})",
                dataset.source_pattern()
            ),
            [],
            |row| row.get::<_, Option<i64>>(0),
        )
        .ok()
        .flatten()
        .and_then(|n| u64::try_from(n).ok());
    Ok(DatasetInfo {
        dataset,
        columns,
        row_estimate,
        storage: Storage::Parquet,
        pending,
        error: None,
    })
}

fn set(conn: &Connection, setting: &'static str, sql: &str) -> Result<(), Error> {
    conn.execute_batch(sql)
        .map_err(|source| Error::Setting { setting, source })
}

fn quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "''"))
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
    let sql = format!("SELECT count(*) FROM read_text({})", quote(probe));
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

    fn settings(data: &Path, temp: &Path) -> EngineSettings {
        EngineSettings {
            data_dir: data.to_owned(),
            temp_dir: temp.join("worker-0"),
            memory_limit_bytes: 256 << 20,
            threads: 1,
            ..EngineSettings::default()
        }
    }

    fn write_parquet(dir: &Path, name: &str) {
        let conn = Connection::open_in_memory().expect("duckdb");
        let path = dir.join(format!("{name}.parquet"));
        conn.execute_batch(&format!(
            "COPY (SELECT range AS id, range * 2 AS twice FROM range(10)) TO {} (FORMAT parquet)",
            quote(&path)
        ))
        .expect("copy");
    }

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

        let conn = engine.conn.lock().expect("lock");
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
    }

    /// Counts rows; stops after `stop_after` batches if given.
    struct Count {
        rows: usize,
        stop_after: Option<usize>,
    }

    impl ResultSink for Count {
        fn started(&mut self, _: crate::query::InterruptHandle) {}
        fn schema(&mut self, _: arrow::datatypes::SchemaRef) -> Flow {
            Flow::Continue
        }
        fn batch(&mut self, batch: arrow::record_batch::RecordBatch) -> Flow {
            self.rows += batch.num_rows();
            match &mut self.stop_after {
                Some(0) => Flow::Stop,
                Some(n) => {
                    *n -= 1;
                    Flow::Continue
                }
                None => Flow::Continue,
            }
        }
    }

    #[test]
    fn a_pooled_connection_is_reusable_after_a_result_cut_short() {
        let data = tempfile::tempdir().expect("tempdir");
        let temp = tempfile::tempdir().expect("tempdir");
        let engine = Engine::open(&settings(data.path(), temp.path())).expect("open");
        let params = crate::Params::default();
        let run = |sql: &str, max_rows: u64, stop_after: Option<usize>| {
            let mut sink = Count {
                rows: 0,
                stop_after,
            };
            let spec = QuerySpec {
                sql,
                params: &params,
                max_rows,
                explain: None,
            };
            engine.run(&spec, &mut sink).map(|o| (o, sink.rows))
        };
        let big = "SELECT range FROM range(10000000)";
        // Truncated, stopped by its sink, and read to the end: each time the next statement on
        // the (single, pooled) connection runs, and the same statement again gives its answer.
        for _ in 0..3 {
            let (cut, _) = run(big, 10, None).expect("truncated");
            assert!(cut.truncated);
            let (stopped, _) = run(big, u64::MAX, Some(0)).expect("stopped");
            assert!(stopped.stopped);
            let (whole, rows) =
                run("SELECT range FROM range(5000)", u64::MAX, None).expect("whole");
            assert_eq!((whole.rows, rows), (5000, 5000));
        }
        assert_eq!(engine.pool.idle(), 1, "one connection served every query");
    }

    /// Run `sql` to the end; the rows it answered.
    fn run_sql(engine: &Engine, sql: &str) -> Result<usize, QueryError> {
        let params = crate::Params::default();
        let mut sink = Count {
            rows: 0,
            stop_after: None,
        };
        let spec = QuerySpec {
            sql,
            params: &params,
            max_rows: u64::MAX,
            explain: None,
        };
        engine.run(&spec, &mut sink).map(|_| sink.rows)
    }

    fn refusal(engine: &Engine, sql: &str) -> crate::Refusal {
        match run_sql(engine, sql) {
            Err(QueryError::Refused(refusal)) => refusal,
            other => panic!("{sql} must be refused by the gate: {other:?}"),
        }
    }

    #[test]
    fn the_gate_accepts_queries_over_datasets() {
        let data = tempfile::tempdir().expect("tempdir");
        let temp = tempfile::tempdir().expect("tempdir");
        write_parquet(data.path(), "numbers");
        let engine = Engine::open(&settings(data.path(), temp.path())).expect("open");
        for (sql, rows) in [
            ("SELECT * FROM numbers", 10),
            ("FROM numbers WHERE id < 3", 3),
            ("TABLE numbers", 10),
            ("VALUES (1), (2)", 2),
            ("SELECT 1", 1),
            ("WITH t AS (SELECT * FROM numbers) SELECT * FROM t", 10),
            (
                "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 4) SELECT * FROM r",
                4,
            ),
            (
                "WITH a AS (SELECT 1 AS x), b AS (SELECT x FROM a) SELECT * FROM b",
                1,
            ),
            (
                "SELECT * FROM numbers WHERE id IN (SELECT id FROM numbers WHERE twice > 10)",
                4,
            ),
            ("SELECT count(*) FROM range(5)", 1),
            ("SELECT * FROM generate_series(1, 3)", 3),
            ("SELECT unnest([1, 2, 3])", 3),
            ("DESCRIBE numbers", 2),
            ("SUMMARIZE numbers", 2),
            ("DESCRIBE SELECT id FROM numbers", 1),
            ("SELECT now() IS NOT NULL", 1),
            ("PIVOT numbers ON id IN (1, 2) USING sum(twice)", 1),
            ("SELECT \"numbers\".id FROM main.numbers", 10),
        ] {
            assert_eq!(
                run_sql(&engine, sql).map_err(|e| e.to_string()),
                Ok(rows),
                "{sql}"
            );
        }
    }

    #[test]
    fn the_gate_refuses_writes_files_and_introspection() {
        use crate::Refusal;
        let data = tempfile::tempdir().expect("tempdir");
        let temp = tempfile::tempdir().expect("tempdir");
        write_parquet(data.path(), "numbers");
        let engine = Engine::open(&settings(data.path(), temp.path())).expect("open");
        let out = temp.path().join("out.csv");
        let out = out.display();
        type Expected = fn(&Refusal) -> bool;
        let cases: Vec<(String, Expected)> = vec![
            (format!("COPY numbers TO '{out}'"), |r| {
                matches!(r, Refusal::NotAQuery(_))
            }),
            ("SELECT 1; SELECT 2".into(), |r| {
                *r == Refusal::MultipleStatements(2)
            }),
            ("".into(), |r| *r == Refusal::Empty),
            (
                format!("WITH w AS (COPY numbers TO '{out}') SELECT * FROM w"),
                |r| *r == Refusal::Writes("COPY"),
            ),
            (
                "WITH w AS (DELETE FROM numbers RETURNING *) SELECT * FROM w".into(),
                |r| *r == Refusal::Writes("DELETE"),
            ),
            ("EXPLAIN SELECT 1".into(), |r| {
                matches!(r, Refusal::NotAQuery(_))
            }),
            (
                "SELECT * FROM read_text('/etc/passwd')".into(),
                |r| matches!(r, Refusal::Function { name, .. } if name == "read_text"),
            ),
            ("SELECT * FROM '/etc/passwd'".into(), |r| {
                matches!(r, Refusal::FileAccess(_))
            }),
            ("SELECT * FROM duckdb_settings()".into(), |r| {
                matches!(r, Refusal::Function { .. })
            }),
            ("SELECT * FROM information_schema.tables".into(), |r| {
                matches!(r, Refusal::Catalogue(_))
            }),
            ("SELECT current_setting('temp_directory')".into(), |r| {
                matches!(r, Refusal::Function { .. })
            }),
            (
                "SELECT setseed(0.1)".into(),
                |r| matches!(r, Refusal::Function { reason, .. } if reason.contains("state")),
            ),
            ("SHOW TABLES".into(), |r| matches!(r, Refusal::Catalogue(_))),
            ("SELECT * FROM nope".into(), |r| {
                matches!(r, Refusal::UnknownDataset { .. })
            }),
            (
                "WITH x AS (SELECT * FROM x) SELECT * FROM x".into(),
                |r| matches!(r, Refusal::UnknownDataset { name, .. } if name == "x"),
            ),
        ];
        for (sql, expected) in &cases {
            let refusal = refusal(&engine, sql);
            assert!(expected(&refusal), "{sql}: {refusal:?}");
        }
        assert!(!temp.path().join("out.csv").exists(), "nothing ran");
        // Refused statements left nothing on the pooled connection.
        assert_eq!(
            run_sql(&engine, "SELECT * FROM numbers").map_err(|e| e.to_string()),
            Ok(10)
        );
    }

    #[test]
    fn explain_runs_the_plan_of_an_accepted_query_only() {
        let data = tempfile::tempdir().expect("tempdir");
        let temp = tempfile::tempdir().expect("tempdir");
        write_parquet(data.path(), "numbers");
        let engine = Engine::open(&settings(data.path(), temp.path())).expect("open");
        let params = crate::Params::default();
        for explain in [crate::Explain::Plan, crate::Explain::Analyze] {
            let mut sink = Count {
                rows: 0,
                stop_after: None,
            };
            let spec = QuerySpec {
                sql: "SELECT sum(twice) FROM numbers",
                params: &params,
                max_rows: u64::MAX,
                explain: Some(explain),
            };
            engine.run(&spec, &mut sink).expect("explain");
            assert!(sink.rows >= 1, "{explain:?}");
            let refused = QuerySpec {
                sql: "SELECT * FROM read_text('/etc/passwd')",
                ..spec
            };
            assert!(matches!(
                engine.run(&refused, &mut sink),
                Err(QueryError::Refused(_))
            ));
        }
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
    fn a_bad_file_makes_one_dataset_unavailable() {
        let data = tempfile::tempdir().expect("tempdir");
        let temp = tempfile::tempdir().expect("tempdir");
        write_parquet(data.path(), "numbers");
        std::fs::write(data.path().join("broken.parquet"), b"not parquet").expect("write");
        let engine = Engine::open(&settings(data.path(), temp.path())).expect("open");
        let catalog = engine.catalog();
        let broken = catalog
            .iter()
            .find(|d| d.dataset.name == "broken")
            .expect("listed");
        assert!(broken.error.is_some());
        assert!(matches!(
            refusal(&engine, "SELECT * FROM broken"),
            crate::Refusal::DatasetUnavailable { .. }
        ));
        assert_eq!(
            run_sql(&engine, "SELECT * FROM numbers").map_err(|e| e.to_string()),
            Ok(10)
        );
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
        let conn = engine.conn.lock().expect("lock");
        let limit: String = conn
            .query_row(
                "SELECT current_setting('max_temp_directory_size')",
                [],
                |r| r.get(0),
            )
            .expect("setting");
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
