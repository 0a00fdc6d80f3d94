//! Opening a worker's DuckDB instance and serving the datasets from it.
//!
//! [`Engine::open`] builds an in-memory database and then locks it down, in the order DuckDB
//! requires (settings that are frozen later must be set first):
//!
//! 1. at open: `threads`, `memory_limit`, extension autoload/autoinstall off;
//! 2. `temp_directory` (the worker's own spill directory), `max_temp_directory_size` and
//!    `parquet_metadata_cache`;
//! 3. datasets registered (this reads Parquet footers and attaches snapshots, so it precedes the
//!    lock-down);
//! 4. `allowed_directories` = the data, temp and snapshot directories;
//! 5. `enable_external_access = false` (only the allowed directories stay readable);
//! 6. `lock_configuration = true` (no statement can undo 1–5).
//!
//! Then it proves the sandbox: reading a file outside the data directory must fail, or the
//! engine refuses to open. A worker never reports ready with an open sandbox.
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
//! # Connections
//!
//! Queries run on pooled connections to the instance, each with its own cache of prepared
//! statements keyed by statement text, so a repeated statement is parsed, bound and planned once
//! per connection (DuckDB re-binds it by itself when a view it reads changes).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, mpsc};
use std::time::{Duration, Instant};

use duckdb::Connection;

use crate::Error;
use crate::catalog::{self, Dataset};
use crate::query::{Flow, Outcome, QueryError, QuerySpec, ResultSink};
use crate::snapshot::{BuildError, Held, SnapshotDir, SnapshotPolicy, StorageSettings, Target};
use crate::sql::SqlCheckError;

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
}

/// Prepared statements each pooled connection keeps, by statement text.
const STATEMENT_CACHE: usize = 128;
/// Idle connections kept for reuse.
const POOL_SIZE: usize = 16;
/// How often the builder thread looks for snapshot files no worker holds any more, besides after
/// each build and each detach: this catches files released by workers that exited.
const GC_INTERVAL: Duration = Duration::from_secs(60);

/// One worker's DuckDB instance.
#[derive(Debug)]
pub struct Engine {
    /// The connection that changes the catalogue (views, attachments).
    conn: Mutex<Connection>,
    /// Idle query connections.
    pool: Mutex<Vec<Connection>>,
    catalog: RwLock<Arc<Vec<DatasetInfo>>>,
    snapshots: Snapshots,
    last_scan: Mutex<Instant>,
    data_dir: PathBuf,
    temp_dir: PathBuf,
    version: String,
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

        let memory_limit = format!("{}MiB", (settings.memory_limit_bytes >> 20).max(16));
        let config = duckdb::Config::default()
            .threads(i64::from(settings.threads.max(1)))
            .and_then(|c| c.max_memory(&memory_limit))
            .and_then(|c| c.enable_autoload_extension(false))
            .and_then(|c| c.with("autoinstall_known_extensions", "false"))
            .map_err(Error::Open)?;
        let conn = Connection::open_in_memory_with_flags(config).map_err(Error::Open)?;

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
                conn.try_clone().map_err(Error::Open)?,
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
            pool: Mutex::new(Vec::new()),
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
        };
        {
            let conn = lock(&engine.conn);
            let mut catalog = Vec::with_capacity(datasets.len());
            for dataset in datasets {
                catalog.push(engine.serve(&conn, dataset, None)?);
            }
            *engine.catalog.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(catalog);
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
            prove_sandbox(&conn, &engine.data_dir)?;
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
            match self.serve(&conn, dataset, old) {
                Ok(info) => next.push(info),
                Err(e) => {
                    tracing::warn!(error = %crate::error::chain(&e), "dataset not refreshed");
                    if let Some(old) = old {
                        next.push(old.clone());
                    }
                }
            }
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

    /// A connection for one query: an idle pooled one (with its prepared statements) or a new
    /// one.
    fn checkout(&self) -> Result<Pooled<'_>, QueryError> {
        let idle = lock(&self.pool).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let conn = lock(&self.conn)
                    .try_clone()
                    .map_err(QueryError::from_duckdb)?;
                conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
                conn
            }
        };
        Ok(Pooled {
            conn: Some(conn),
            pool: &self.pool,
        })
    }

    /// Run one query, streaming its result into `sink`. Blocks: call it from a thread that may
    /// block (a worker's blocking pool).
    ///
    /// The text is checked ([`crate::sql::check`]) before DuckDB sees it. Each query runs on its
    /// own connection to the instance, so it can be interrupted alone.
    pub fn run(
        &self,
        spec: &QuerySpec<'_>,
        sink: &mut dyn ResultSink,
    ) -> Result<Outcome, QueryError> {
        let sql = match crate::sql::check(spec.sql) {
            Ok(sql) => sql,
            Err(SqlCheckError::Unrecognized(word)) => {
                return Err(self.refuse_unrecognized(spec.sql, word));
            }
            Err(other) => return Err(other.into()),
        };
        // Snapshots this query may read stay attached until it ends.
        let _generation = lock(&self.snapshots.generation).clone();
        let pooled = self.checkout()?;
        let conn = pooled.conn();
        sink.started(conn.interrupt_handle());
        let mut statement = conn.prepare_cached(sql).map_err(QueryError::from_duckdb)?;
        let names: Vec<String> = (1..=statement.parameter_count())
            .map(|i| {
                statement
                    .parameter_name(i)
                    .unwrap_or_else(|_| i.to_string())
            })
            .collect();
        let values = spec.params.bind_order(&names)?;
        let streamed = stream_into(&mut statement, values, spec.max_rows, sink);
        // A result that was not read to its end stays open inside the statement, and DuckDB
        // refuses any other statement on the connection while it is: such a statement is
        // dropped (closing its result) instead of going back to the cache.
        if !matches!(streamed, Ok((_, true))) {
            statement.discard();
        }
        streamed.map(|(outcome, _)| outcome)
    }

    /// The answer to one statement of a kind the check does not know: DuckDB's parser says what
    /// is wrong with it if it can (preparing a single statement executes nothing); it is refused
    /// either way.
    fn refuse_unrecognized(&self, sql: &str, word: String) -> QueryError {
        let parsed = self.checkout().and_then(|pooled| {
            pooled
                .conn()
                .prepare(sql.trim())
                .map(drop)
                .map_err(QueryError::from_duckdb)
        });
        match parsed {
            Err(e) => e,
            Ok(()) => SqlCheckError::NotAllowed(word).into(),
        }
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
        if let Err(e) = std::fs::remove_dir_all(&self.temp_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.temp_dir.display(), error = %e, "cannot remove temp directory");
        }
    }
}

/// Execute a prepared statement and pass its batches to `sink`, cutting the result at
/// `max_rows`. Returns how it ended and whether the result was read to its end.
fn stream_into(
    statement: &mut duckdb::Statement<'_>,
    values: Vec<duckdb::types::Value>,
    max_rows: u64,
    sink: &mut dyn ResultSink,
) -> Result<(Outcome, bool), QueryError> {
    let mut stream = statement
        .stream_arrow(duckdb::params_from_iter(values))
        .map_err(QueryError::from_duckdb)?;
    let mut outcome = Outcome {
        rows: 0,
        truncated: false,
        stopped: false,
    };
    if sink.schema(stream.get_schema()) == Flow::Stop {
        outcome.stopped = true;
        return Ok((outcome, false));
    }
    let mut drained = true;
    for batch in stream.by_ref() {
        let batch = batch.map_err(QueryError::from_duckdb)?;
        if batch.num_rows() == 0 {
            continue;
        }
        let remaining = max_rows.saturating_sub(outcome.rows);
        if remaining == 0 {
            // One more row exists beyond the cap: the result is cut, and says so.
            outcome.truncated = true;
            drained = false;
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
            drained = false;
            break;
        }
        if outcome.truncated {
            drained = false;
            break;
        }
    }
    Ok((outcome, drained))
}

/// A pooled connection, back to the pool when dropped.
struct Pooled<'a> {
    conn: Option<Connection>,
    pool: &'a Mutex<Vec<Connection>>,
}

impl Pooled<'_> {
    fn conn(&self) -> &Connection {
        self.conn.as_ref().expect("present until dropped")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        let mut pool = lock(self.pool);
        if pool.len() < POOL_SIZE
            && let Some(conn) = self.conn.take()
        {
            pool.push(conn);
        }
    }
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

/// Reading a file outside the data directory must fail once the sandbox is locked.
fn prove_sandbox(conn: &Connection, data_dir: &Path) -> Result<(), Error> {
    let probe = Path::new("/etc/passwd");
    if probe.starts_with(data_dir) || !probe.exists() {
        return Ok(());
    }
    let sql = format!("SELECT count(*) FROM read_text({})", quote(probe));
    match conn.query_row(&sql, [], |row| row.get::<_, i64>(0)) {
        Ok(_) => Err(Error::SandboxLeak {
            path: probe.to_owned(),
        }),
        Err(_) => Ok(()),
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
        fn started(&mut self, _: Arc<duckdb::InterruptHandle>) {}
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
        assert_eq!(
            lock(&engine.pool).len(),
            1,
            "one connection served every query"
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
