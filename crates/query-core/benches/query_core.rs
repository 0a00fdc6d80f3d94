//! query-core against raw DuckDB, and each encoder's rows per second.
//!
//! ```text
//! scripts/gen_tpch.sh 1
//! cargo bench --workspace --profile dev --bench query_core -- [TPCH_DIR] [ITERATIONS]
//! ```
//!
//! Both sides use one DuckDB thread and views over the same Parquet files. "raw" prepares the
//! statement and materialises the Arrow result through duckdb-rs; "query-core" does what a worker
//! does per request: the statement check, a fresh connection, prepare, bind, stream, and encode
//! to JSON. Iterations alternate between the two so that machine noise hits both alike; the
//! report gives medians and the ratio of throughputs.

mod common;

use std::path::Path;
use std::time::Instant;

use common::{median, run};
use duckdb::Connection;
use ferrocorn_query_core::arrow::record_batch::RecordBatch;
use ferrocorn_query_core::{Encoder, Engine, EngineSettings, Format, ParamValue, Params, Summary};

fn view_sql(dir: &Path, table: &str) -> String {
    format!(
        "CREATE VIEW {table} AS SELECT * FROM read_parquet('{}')",
        dir.join(format!("{table}.parquet")).display()
    )
}

fn main() {
    let Some((dir, iterations)) = common::args() else {
        return;
    };
    let temp = std::env::temp_dir().join(format!("ferrocorn-bench-{}", std::process::id()));
    let engine = Engine::open(&EngineSettings {
        data_dir: dir.clone(),
        temp_dir: temp,
        memory_limit_bytes: 2 << 30,
        threads: 1,
        ..EngineSettings::default()
    })
    .expect("engine");
    let raw = Connection::open_in_memory().expect("duckdb");
    raw.execute_batch("SET threads = 1; SET memory_limit = '2GiB'")
        .expect("settings");
    for table in ["orders", "lineitem"] {
        raw.execute_batch(&view_sql(&dir, table)).expect("view");
    }
    let keys: Vec<i64> = raw
        .prepare("SELECT o_orderkey FROM orders USING SAMPLE 1000 ROWS")
        .and_then(|mut s| {
            s.query_map([], |r| r.get(0))
                .and_then(|rows| rows.collect::<Result<Vec<i64>, _>>())
        })
        .expect("sample keys");

    println!("# query-core vs raw DuckDB ({iterations} iterations each, medians, 1 thread)");
    println!("| query | raw DuckDB | query-core | query-core / raw throughput |");
    println!("| --- | --- | --- | --- |");
    let cases: [(&str, &str, bool); 2] = [
        (
            "point lookup",
            "SELECT * FROM orders WHERE o_orderkey = $1",
            true,
        ),
        (
            "small aggregate",
            "SELECT o_orderstatus, count(*) AS n, sum(o_totalprice) AS total FROM orders GROUP BY 1 ORDER BY 1",
            false,
        ),
    ];
    for (name, sql, keyed) in cases {
        let mut raw_times = Vec::with_capacity(iterations);
        let mut ours_times = Vec::with_capacity(iterations);
        for i in 0..iterations {
            let key = keys[i % keys.len()];
            let started = Instant::now();
            let mut statement = raw.prepare(sql).expect("prepare");
            let batches: Vec<RecordBatch> = if keyed {
                statement.query_arrow([key]).expect("query").collect()
            } else {
                statement.query_arrow([]).expect("query").collect()
            };
            std::hint::black_box(batches);
            raw_times.push(started.elapsed());

            let params = if keyed {
                Params::Positional(vec![ParamValue::Int(key)])
            } else {
                Params::default()
            };
            ours_times.push(run(&engine, sql, &params, Format::Json));
        }
        let raw_median = median(&mut raw_times);
        let ours_median = median(&mut ours_times);
        println!(
            "| {name} | {:.3} ms | {:.3} ms | {:.1} % |",
            raw_median.as_secs_f64() * 1e3,
            ours_median.as_secs_f64() * 1e3,
            100.0 * raw_median.as_secs_f64() / ours_median.as_secs_f64()
        );
    }

    let batches: Vec<RecordBatch> = raw
        .prepare("SELECT * FROM lineitem LIMIT 1000000")
        .expect("prepare")
        .query_arrow([])
        .expect("query")
        .collect();
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let schema = batches[0].schema();
    println!();
    println!("# encoders on a {rows}-row lineitem result (median of 5)");
    println!("| format | time | rows/s | bytes |");
    println!("| --- | --- | --- | --- |");
    for format in Format::ALL {
        let mut times = Vec::new();
        let mut size = 0;
        for _ in 0..5 {
            let started = Instant::now();
            let (mut encoder, head) = Encoder::new(format, schema.clone()).expect("encoder");
            size = head.len();
            for batch in &batches {
                size += encoder.batch(batch).expect("batch").len();
            }
            size += encoder
                .finish(Summary {
                    rows: rows as u64,
                    truncated: false,
                })
                .expect("finish")
                .len();
            times.push(started.elapsed());
        }
        let t = median(&mut times);
        println!(
            "| {} | {:.0} ms | {:.2} M | {:.1} MB |",
            format.name(),
            t.as_secs_f64() * 1e3,
            rows as f64 / t.as_secs_f64() / 1e6,
            size as f64 / 1e6
        );
    }
}
