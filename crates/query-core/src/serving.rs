//! What serves each dataset: its view over the Parquet files or over an attached snapshot, kept
//! in step with the data directory.
//!
//! [`Serving`] owns the instance's catalogue connection (the one that changes views and
//! attachments) and the catalogue as queries see it. A rescan ([`Serving::refresh_if_due`])
//! registers new datasets, re-registers changed ones, drops removed ones, attaches finished
//! snapshots and detaches drained ones. A dataset that cannot be registered is listed as
//! unavailable with the reason; the others serve on.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use duckdb::Connection;

use crate::Error;
use crate::builder::{BuildJob, Builder, BuilderContext};
use crate::catalog::{self, Column, Dataset, DatasetInfo, Storage, sql_ident, sql_path};
use crate::snapshot::{Held, SnapshotPolicy};
use crate::sync::lock;

/// The datasets an instance serves, and how.
#[derive(Debug)]
pub(crate) struct Serving {
    /// The connection that changes the catalogue (views, attachments).
    conn: Mutex<Connection>,
    catalog: RwLock<Arc<Vec<DatasetInfo>>>,
    snapshots: Snapshots,
    last_scan: Mutex<Instant>,
    data_dir: PathBuf,
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
    /// The search path queries resolve names through: every attached snapshot, then the views.
    search_path: Mutex<Arc<SearchPath>>,
    /// Snapshot files whose build failed, with why: their dataset is served from Parquet
    /// instead. (The snapshot directory keeps the same record for the rest of the pool.)
    failed: Arc<Mutex<HashMap<PathBuf, String>>>,
    builder: Option<Builder>,
    aliases: AtomicU64,
}

/// The `SET search_path` statement a query connection runs before its next query when its
/// `epoch` is not the current one.
///
/// A dataset served from a snapshot is read straight from the attached table (named after the
/// dataset) rather than through its view in `memory.main`: DuckDB resolves the statement's bare
/// name to the first catalogue on the path that has it, and a view costs a fifth of a point
/// lookup (docs/benchmarks.md). The views stay, pointing at the same tables, for names
/// qualified with `main` and for connections that have not yet followed a change.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct SearchPath {
    pub epoch: u64,
    pub statement: String,
}

#[derive(Debug)]
struct Attachment {
    alias: String,
    _held: Held,
}

impl Serving {
    /// Serve `datasets` through `conn`; snapshots (when `policy` is given) are built on
    /// `builder_conn`, another connection to the same instance.
    pub fn start(
        conn: Connection,
        builder_conn: Option<Connection>,
        policy: Option<Arc<SnapshotPolicy>>,
        data_dir: PathBuf,
        datasets: Vec<Dataset>,
    ) -> Self {
        let failed = Arc::new(Mutex::new(HashMap::new()));
        let builder = match (&policy, builder_conn) {
            (Some(policy), Some(conn)) => Some(Builder::start(
                conn,
                BuilderContext {
                    policy: policy.clone(),
                    data_dir: data_dir.clone(),
                    failed: failed.clone(),
                },
            )),
            _ => None,
        };
        let serving = Self {
            conn: Mutex::new(conn),
            catalog: RwLock::new(Arc::new(Vec::new())),
            snapshots: Snapshots {
                policy,
                attached: Mutex::new(HashMap::new()),
                retired: Mutex::new(Vec::new()),
                generation: Mutex::new(Arc::new(())),
                search_path: Mutex::new(Arc::new(search_path(0, &HashMap::new()))),
                failed,
                builder,
                aliases: AtomicU64::new(0),
            },
            last_scan: Mutex::new(Instant::now()),
            data_dir,
        };
        {
            let conn = lock(&serving.conn);
            let catalog = datasets
                .into_iter()
                .map(|dataset| serving.serve_or_report(&conn, dataset, None))
                .collect();
            *serving.catalog.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(catalog);
        }
        serving
    }

    /// Run `f` on the catalogue connection.
    pub fn with_conn<R>(&self, f: impl FnOnce(&Connection) -> R) -> R {
        f(&lock(&self.conn))
    }

    /// A token every running query holds: snapshots retired while it is held stay attached.
    pub fn generation(&self) -> Arc<()> {
        lock(&self.snapshots.generation).clone()
    }

    /// The search path a query must run with. Read it after [`Serving::generation`]: every
    /// catalogue it names stays attached while that generation is held.
    pub fn search_path(&self) -> Arc<SearchPath> {
        lock(&self.snapshots.search_path).clone()
    }

    /// Publish the search path of what is attached now. Called after every change to the
    /// attachments and before the generation that retires one is replaced, so that a query
    /// holding the new generation never reads a path naming a retired catalogue.
    fn publish_search_path(&self, attached: &HashMap<String, Attachment>) {
        let mut current = lock(&self.snapshots.search_path);
        *current = Arc::new(search_path(current.epoch + 1, attached));
    }

    /// Stop the snapshot builder (interrupting a build in progress) and wait for it.
    pub fn stop_builder(&mut self) {
        if let Some(builder) = self.snapshots.builder.take() {
            builder.stop();
        }
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
                        snapshot_error: None,
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
        // A build that failed is not tried again (by this worker, the pool or the next start)
        // until the files or the options change, which names another target.
        let failure = lock(&snapshots.failed)
            .get(&target.path)
            .cloned()
            .or_else(|| policy.dir.failure(&target.path));
        if let Some(reason) = failure {
            let info = self.serve_parquet(conn, dataset, old, None)?;
            return Ok(DatasetInfo {
                snapshot_error: Some(reason),
                ..info
            });
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
            sql_path(&held.path)
        ))
        .map_err(failed)?;
        // Everything that can fail is read from the attached table before the view moves to it,
        // so a failure leaves the view on what it served.
        let table = format!("\"{alias}\".main.{}", sql_ident(&dataset.name));
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
            snapshot_error: None,
        };
        let previous = {
            let mut attached = lock(&self.snapshots.attached);
            let previous =
                attached.insert(info.dataset.name.clone(), Attachment { alias, _held: held });
            self.publish_search_path(&attached);
            previous
        };
        if let Some(previous) = previous {
            self.retire_attachment(previous);
        }
        Ok(info)
    }

    /// The dataset no longer reads its attachment (if it had one): detach it once drained.
    fn retire(&self, name: &str) {
        let previous = {
            let mut attached = lock(&self.snapshots.attached);
            let previous = attached.remove(name);
            if previous.is_some() {
                self.publish_search_path(&attached);
            }
            previous
        };
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

    /// Bytes DuckDB's buffer manager holds now (`duckdb_memory()`, all tags).
    pub fn memory_in_use(&self) -> Result<u64, Error> {
        let conn = lock(&self.conn);
        let bytes: i64 = conn
            .query_row(
                "SELECT coalesce(sum(memory_usage_bytes), 0)::BIGINT FROM duckdb_memory()",
                [],
                |row| row.get(0),
            )
            .map_err(Error::Query)?;
        Ok(u64::try_from(bytes).unwrap_or(0))
    }
}

/// The search path of `attached`: each snapshot's catalogue (in the order of their datasets'
/// names, so the path is the same whatever order they were attached in), then the views.
fn search_path(epoch: u64, attached: &HashMap<String, Attachment>) -> SearchPath {
    let mut datasets: Vec<(&String, &Attachment)> = attached.iter().collect();
    datasets.sort_by(|a, b| a.0.cmp(b.0));
    let mut path: Vec<String> = datasets
        .iter()
        .map(|(_, attachment)| format!("{}.main", attachment.alias))
        .collect();
    path.push("memory.main".to_owned());
    SearchPath {
        epoch,
        statement: format!("SET search_path = '{}'", path.join(",")),
    }
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
        snapshot_error: None,
    })
}

#[cfg(test)]
mod tests {
    use crate::Engine;
    use crate::testing::{refusal, run_sql, settings, write_parquet};

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
}
