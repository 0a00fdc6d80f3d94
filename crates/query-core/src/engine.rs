//! Opening a worker's DuckDB instance.
//!
//! [`Engine::open`] builds an in-memory database and then locks it down, in the order DuckDB
//! requires (settings that are frozen later must be set first):
//!
//! 1. at open: `threads`, `memory_limit`, extension autoload/autoinstall off;
//! 2. `temp_directory` (the worker's own spill directory) and `parquet_metadata_cache`;
//! 3. datasets registered as views (this reads Parquet footers, so it precedes the lock-down);
//! 4. `allowed_directories` = the data directory and the temp directory;
//! 5. `enable_external_access = false` (only the allowed directories stay readable);
//! 6. `lock_configuration = true` (no statement can undo 1–5).
//!
//! Then it proves the sandbox: reading a file outside the data directory must fail, or the
//! engine refuses to open. A worker never reports ready with an open sandbox.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use duckdb::Connection;

use crate::Error;
use crate::catalog::{self, Dataset};
use crate::query::{Flow, Outcome, QueryError, QuerySpec, ResultSink};
use crate::sql::SqlCheckError;

/// What a worker's DuckDB instance is given.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// The Parquet data directory; the only directory queries may read.
    pub data_dir: PathBuf,
    /// This worker's own spill directory; created on open, removed when the engine drops.
    pub temp_dir: PathBuf,
    /// DuckDB's `memory_limit` for this worker, in bytes.
    pub memory_limit_bytes: u64,
    /// DuckDB's `threads` for this worker.
    pub threads: u32,
}

/// A column of a dataset.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Column {
    pub name: String,
    /// DuckDB's type name, e.g. `DECIMAL(12,2)`.
    #[serde(rename = "type")]
    pub sql_type: String,
}

/// A registered dataset with what DuckDB knows of it.
#[derive(Clone, Debug)]
pub struct DatasetInfo {
    pub dataset: Dataset,
    pub columns: Vec<Column>,
    /// Rows according to the Parquet footers.
    pub row_estimate: Option<u64>,
}

/// One worker's DuckDB instance.
#[derive(Debug)]
pub struct Engine {
    conn: Mutex<Connection>,
    catalog: RwLock<Arc<Vec<DatasetInfo>>>,
    last_scan: Mutex<Instant>,
    data_dir: PathBuf,
    temp_dir: PathBuf,
    version: String,
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
        // Parquet footers are parsed once per file version, not once per query. DuckDB validates
        // each entry against the file's modification time (and distrusts times under ten seconds
        // old), so a replaced file is never read through stale metadata.
        set(
            &conn,
            "parquet_metadata_cache",
            "SET parquet_metadata_cache = true",
        )?;
        let mut catalog = Vec::with_capacity(datasets.len());
        for dataset in datasets {
            catalog.push(register(&conn, dataset)?);
        }
        set(
            &conn,
            "allowed_directories",
            &format!(
                "SET allowed_directories = [{}, {}]",
                quote_dir(&data_dir),
                quote_dir(&temp_dir)
            ),
        )?;
        set(
            &conn,
            "enable_external_access",
            "SET enable_external_access = false",
        )?;
        set(&conn, "lock_configuration", "SET lock_configuration = true")?;

        prove_sandbox(&conn, &data_dir)?;
        let version = conn
            .query_row("SELECT version()", [], |row| row.get::<_, String>(0))
            .map_err(Error::Query)?;
        Ok(Self {
            conn: Mutex::new(conn),
            catalog: RwLock::new(Arc::new(catalog)),
            last_scan: Mutex::new(Instant::now()),
            data_dir,
            temp_dir,
            version,
        })
    }

    /// The registered datasets.
    pub fn catalog(&self) -> Arc<Vec<DatasetInfo>> {
        self.catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Rescan the data directory if the last scan is older than `interval`: new datasets are
    /// registered, changed ones re-registered, removed ones dropped. A dataset that cannot be
    /// registered keeps its previous view and is logged. Returns whether anything changed.
    pub fn refresh_if_due(&self, interval: Duration) -> bool {
        {
            let mut last = self.last_scan.lock().unwrap_or_else(|e| e.into_inner());
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
        let current = self.catalog();
        let unchanged = datasets.len() == current.len()
            && datasets.iter().zip(current.iter()).all(|(new, old)| {
                new.name == old.dataset.name && new.version == old.dataset.version
            });
        if unchanged {
            return false;
        }
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = Vec::with_capacity(datasets.len());
        for dataset in datasets {
            let old = current.iter().find(|d| d.dataset.name == dataset.name);
            if let Some(old) = old.filter(|o| o.dataset.version == dataset.version) {
                next.push(old.clone());
                continue;
            }
            match register(&conn, dataset) {
                Ok(info) => {
                    tracing::info!(dataset = %info.dataset.name, version = %info.dataset.version, "dataset registered");
                    next.push(info);
                }
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
                tracing::info!(dataset = %gone.dataset.name, "dataset removed");
            }
        }
        *self.catalog.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        true
    }

    /// Ask DuckDB to answer `SELECT 1` (readiness).
    pub fn ping(&self) -> Result<(), Error> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let one: i32 = conn
            .query_row("SELECT 1", [], |row| row.get(0))
            .map_err(Error::Query)?;
        debug_assert_eq!(one, 1);
        Ok(())
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
        let checked = crate::sql::check(spec.sql);
        let conn = self
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_clone()
            .map_err(QueryError::from_duckdb)?;
        let sql = match checked {
            Ok(sql) => sql,
            Err(SqlCheckError::Unrecognized(word)) => {
                // One statement of an unknown kind: DuckDB's parser says what is wrong with it
                // (preparing a single statement executes nothing); it is refused either way.
                conn.prepare(spec.sql.trim())
                    .map_err(QueryError::from_duckdb)?;
                return Err(SqlCheckError::NotAllowed(word).into());
            }
            Err(other) => return Err(other.into()),
        };
        sink.started(conn.interrupt_handle());
        let mut statement = conn.prepare(sql).map_err(QueryError::from_duckdb)?;
        let names: Vec<String> = (1..=statement.parameter_count())
            .map(|i| {
                statement
                    .parameter_name(i)
                    .unwrap_or_else(|_| i.to_string())
            })
            .collect();
        let values = spec.params.bind_order(&names)?;
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
            return Ok(outcome);
        }
        for batch in stream.by_ref() {
            let batch = batch.map_err(QueryError::from_duckdb)?;
            if batch.num_rows() == 0 {
                continue;
            }
            let remaining = spec.max_rows.saturating_sub(outcome.rows);
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
        Ok(outcome)
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
        if let Err(e) = std::fs::remove_dir_all(&self.temp_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.temp_dir.display(), error = %e, "cannot remove temp directory");
        }
    }
}

/// Create (or replace) a dataset's view and read its columns and row estimate.
fn register(conn: &Connection, dataset: Dataset) -> Result<DatasetInfo, Error> {
    let failed = |source| Error::Dataset {
        dataset: dataset.name.clone(),
        path: dataset.path.clone(),
        source,
    };
    conn.execute_batch(&dataset.view_sql()).map_err(failed)?;
    let mut statement = conn
        .prepare(&format!(
            "SELECT column_name, column_type FROM (DESCRIBE \"{}\")",
            dataset.name
        ))
        .map_err(failed)?;
    let columns = statement
        .query_map([], |row| {
            Ok(Column {
                name: row.get(0)?,
                sql_type: row.get(1)?,
            })
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(failed)?;
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
