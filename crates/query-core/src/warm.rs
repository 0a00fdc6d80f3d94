//! Warming a worker's instance before it serves, so that a successor's first requests are as fast
//! as its predecessor's last.
//!
//! A fresh instance has attached its snapshots but loaded nothing from them: each sort-key index
//! is read and built in memory on its first use, and the buffer pool is empty. For each available
//! dataset the worker runs, before it reports ready, the dataset's configured `warmup` queries —
//! or by default, for a snapshot with a sort key, one point lookup through the index (which loads
//! it) and, for every dataset, its first rows. Warm-up queries go through the same gate and
//! pipeline as requests; one that fails is logged and the worker serves anyway (it is slower
//! for a moment, never wrong).

use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use crate::catalog::{Storage, sql_ident, sql_string};
use crate::engine::Engine;
use crate::query::{Flow, InterruptHandle, Params, QueryError, QuerySpec, ResultSink};

/// What warming one dataset did.
#[derive(Debug)]
pub struct Warmed {
    pub dataset: String,
    /// Queries run.
    pub queries: usize,
    pub elapsed: Duration,
    /// The first failure, if one failed.
    pub error: Option<QueryError>,
}

impl Engine {
    /// Warm every available dataset (see the module documentation). Blocks: call it from a thread
    /// that may block, before the worker serves.
    pub fn warm_up(&self) -> Vec<Warmed> {
        let catalog = self.catalog();
        catalog
            .iter()
            .filter(|info| info.error.is_none())
            .map(|info| {
                let name = &info.dataset.name;
                let started = Instant::now();
                let configured = self.warmup_queries(name);
                let queries = if configured.is_empty() {
                    self.default_warmup(name, matches!(info.storage, Storage::Snapshot { .. }))
                } else {
                    Ok(configured.to_vec())
                };
                let mut warmed = Warmed {
                    dataset: name.clone(),
                    queries: 0,
                    elapsed: Duration::ZERO,
                    error: None,
                };
                match queries {
                    Ok(queries) => {
                        for sql in &queries {
                            warmed.queries += 1;
                            if let Err(e) = self.run_discarding(sql) {
                                warmed.error.get_or_insert(e);
                            }
                        }
                    }
                    Err(e) => warmed.error = Some(e),
                }
                warmed.elapsed = started.elapsed();
                warmed
            })
            .collect()
    }

    /// A lookup of the smallest key through the sort-key index (snapshots with a sort key), and
    /// the first rows.
    fn default_warmup(&self, name: &str, snapshot: bool) -> Result<Vec<String>, QueryError> {
        let table = sql_ident(name);
        let mut queries = Vec::new();
        if let Some(key) = self.sort_key(name).filter(|_| snapshot) {
            let key = sql_ident(key);
            // The index is used for an equality with a constant: fetch a key, then look it up.
            let literal = self.first_value(&format!(
                "SELECT min({key})::VARCHAR, typeof(min({key})) FROM {table}"
            ))?;
            if let Some([value, sql_type]) = literal {
                queries.push(format!(
                    "SELECT * FROM {table} WHERE {key} = CAST({} AS {sql_type})",
                    sql_string(&value)
                ));
            }
        }
        queries.push(format!("SELECT * FROM {table} LIMIT 1"));
        Ok(queries)
    }

    /// The two text columns of the first row of `sql`'s result, if it has a row without NULLs.
    fn first_value(&self, sql: &str) -> Result<Option<[String; 2]>, QueryError> {
        let mut sink = FirstRow(None);
        self.run(&spec(sql, &Params::default()), &mut sink)?;
        Ok(sink.0)
    }

    fn run_discarding(&self, sql: &str) -> Result<(), QueryError> {
        self.run(&spec(sql, &Params::default()), &mut Discard)
            .map(|_| ())
    }
}

fn spec<'a>(sql: &'a str, params: &'a Params) -> QuerySpec<'a> {
    QuerySpec {
        sql,
        params,
        max_rows: 1_000_000,
        explain: None,
    }
}

/// Drops every batch.
struct Discard;

impl ResultSink for Discard {
    fn started(&mut self, _: InterruptHandle) {}
    fn schema(&mut self, _: SchemaRef) -> Flow {
        Flow::Continue
    }
    fn batch(&mut self, _: RecordBatch) -> Flow {
        Flow::Continue
    }
}

/// Keeps the first row's two columns as text.
struct FirstRow(Option<[String; 2]>);

impl ResultSink for FirstRow {
    fn started(&mut self, _: InterruptHandle) {}
    fn schema(&mut self, _: SchemaRef) -> Flow {
        Flow::Continue
    }
    fn batch(&mut self, batch: RecordBatch) -> Flow {
        if self.0.is_none() && batch.num_rows() > 0 && batch.num_columns() == 2 {
            let text = |i: usize| {
                let column = batch.column(i);
                (!column.is_null(0))
                    .then(|| arrow::util::display::array_value_to_string(column, 0).ok())
                    .flatten()
            };
            if let (Some(value), Some(sql_type)) = (text(0), text(1)) {
                self.0 = Some([value, sql_type]);
            }
        }
        Flow::Stop
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use duckdb::Connection;

    use super::*;
    use crate::catalog::sql_path;
    use crate::snapshot::{DatasetOptions, StorageMode, StorageSettings};
    use crate::testing::settings;

    fn write_keys(dir: &Path, rows: u64) {
        let conn = Connection::open_in_memory().expect("duckdb");
        conn.execute_batch(&format!(
            "COPY (SELECT range AS id, range % 7 AS bucket FROM range({rows})) TO {} (FORMAT parquet)",
            sql_path(&dir.join("keys.parquet"))
        ))
        .expect("copy");
    }

    /// An engine serving `keys` from a snapshot sorted and indexed by `id`, with `warmup`.
    fn open(data: &Path, temp: &Path, name: &str, warmup: &[&str]) -> Engine {
        let mut settings = settings(data, &temp.join(name));
        settings.storage = StorageSettings {
            snapshot_dir: Some(temp.join("snapshots")),
            default_mode: StorageMode::Snapshot,
            datasets: BTreeMap::from([(
                "keys".to_owned(),
                DatasetOptions {
                    sort_key: Some("id".to_owned()),
                    warmup: warmup.iter().map(|s| (*s).to_owned()).collect(),
                    ..DatasetOptions::default()
                },
            )]),
            auto_max_bytes: 0,
        };
        Engine::open(&settings).expect("open")
    }

    fn served_from_snapshot(engine: &Engine) -> bool {
        matches!(engine.catalog()[0].storage, Storage::Snapshot { .. })
    }

    /// Bytes DuckDB holds for ART indexes.
    fn index_bytes(engine: &Engine) -> i64 {
        engine.with_catalogue_connection(|conn| {
            conn.query_row(
                "SELECT coalesce(sum(memory_usage_bytes), 0)::BIGINT FROM duckdb_memory() \
                 WHERE tag = 'ART_INDEX'",
                [],
                |r| r.get(0),
            )
            .expect("duckdb_memory")
        })
    }

    #[test]
    fn a_successor_loads_the_sort_key_index_before_it_serves() {
        let data = tempfile::tempdir().expect("tempdir");
        let temp = tempfile::tempdir().expect("tempdir");
        write_keys(data.path(), 300_000);
        // The first worker builds the snapshot.
        let first = open(data.path(), temp.path(), "w0", &[]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !served_from_snapshot(&first) {
            assert!(Instant::now() < deadline, "snapshot not built in time");
            std::thread::sleep(Duration::from_millis(20));
            first.refresh_if_due(Duration::ZERO);
        }
        // A successor attaches it at once, cold.
        let successor = open(data.path(), temp.path(), "w1", &[]);
        assert!(served_from_snapshot(&successor));
        assert_eq!(
            index_bytes(&successor),
            0,
            "a fresh instance has loaded no index"
        );
        let warmed = successor.warm_up();
        assert_eq!(warmed.len(), 1);
        assert_eq!(warmed[0].dataset, "keys");
        assert_eq!(
            warmed[0].queries, 2,
            "a lookup through the index and the first rows"
        );
        assert!(warmed[0].error.is_none(), "{:?}", warmed[0].error);
        assert!(index_bytes(&successor) > 0, "the warm-up loaded the index");
    }

    #[test]
    fn configured_warmup_queries_replace_the_default_and_pass_the_gate() {
        let data = tempfile::tempdir().expect("tempdir");
        let temp = tempfile::tempdir().expect("tempdir");
        write_keys(data.path(), 1000);
        let engine = open(
            data.path(),
            temp.path(),
            "w0",
            &[
                "SELECT bucket, count(*) FROM keys GROUP BY 1",
                "COPY keys TO '/tmp/x.csv'",
            ],
        );
        let warmed = engine.warm_up();
        assert_eq!(warmed[0].queries, 2);
        assert!(
            matches!(warmed[0].error, Some(QueryError::Refused(_))),
            "a write is refused even as a warm-up: {:?}",
            warmed[0].error
        );
    }
}
