//! What the crate's unit tests share: an engine's settings, a small Parquet file, a counting
//! sink.

use std::path::Path;

use duckdb::Connection;

use crate::catalog::sql_path;
use crate::query::{Flow, QueryError, QuerySpec, ResultSink};
use crate::{Engine, EngineSettings, InterruptHandle};

pub fn settings(data: &Path, temp: &Path) -> EngineSettings {
    EngineSettings {
        data_dir: data.to_owned(),
        temp_dir: temp.join("worker-0"),
        memory_limit_bytes: 256 << 20,
        threads: 1,
        ..EngineSettings::default()
    }
}

pub fn write_parquet(dir: &Path, name: &str) {
    let conn = Connection::open_in_memory().expect("duckdb");
    let path = dir.join(format!("{name}.parquet"));
    conn.execute_batch(&format!(
        "COPY (SELECT range AS id, range * 2 AS twice FROM range(10)) TO {} (FORMAT parquet)",
        sql_path(&path)
    ))
    .expect("copy");
}

/// Counts rows; stops after `stop_after` batches if given.
pub struct Count {
    pub rows: usize,
    pub stop_after: Option<usize>,
}

impl ResultSink for Count {
    fn started(&mut self, _: InterruptHandle) {}
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

/// Run `sql` to the end; the rows it answered.
pub fn run_sql(engine: &Engine, sql: &str) -> Result<usize, QueryError> {
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

pub fn refusal(engine: &Engine, sql: &str) -> crate::Refusal {
    match run_sql(engine, sql) {
        Err(QueryError::Refused(refusal)) => refusal,
        other => panic!("{sql} must be refused by the gate: {other:?}"),
    }
}
