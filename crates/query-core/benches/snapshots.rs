//! Snapshots against Parquet views, and what building them costs.
//!
//! ```text
//! scripts/gen_tpch.sh 1
//! cargo bench --workspace --profile dev --bench snapshots -- [TPCH_DIR] [ITERATIONS]
//! ```
//!
//! Both engines are what a worker opens: one DuckDB thread, 512 MiB (a 2 GB pool's share for
//! four workers). One serves every table through views over its Parquet file, the other from
//! snapshots built here first (`orders` sorted by `o_orderkey`, `lineitem` by `l_orderkey`).
//! Each query goes through [`Engine::run`] and is encoded (JSON, Arrow for the export), as a
//! request would be, after one untimed pass that warms the caches. Blocks of ten iterations
//! alternate between the two engines so that machine noise hits both alike; the report gives
//! medians and the speed-up.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{median, run};
use duckdb::Connection;
use ferrocorn_query_core::snapshot::SnapshotDir;
use ferrocorn_query_core::{
    DatasetOptions, Engine, EngineSettings, Format, ParamValue, Params, Storage, StorageMode,
    StorageSettings,
};

const MEMORY: u64 = 512 << 20;
const BLOCK: usize = 10;
const SORT_KEYS: [(&str, &str); 2] = [("orders", "o_orderkey"), ("lineitem", "l_orderkey")];

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn settings(data: &Path, temp: &Path, snapshots: Option<&Path>) -> EngineSettings {
    let datasets: BTreeMap<String, DatasetOptions> = SORT_KEYS
        .iter()
        .map(|(table, key)| {
            (
                (*table).to_owned(),
                DatasetOptions {
                    storage: None,
                    sort_key: Some((*key).to_owned()),
                    ..DatasetOptions::default()
                },
            )
        })
        .collect();
    EngineSettings {
        data_dir: data.to_owned(),
        temp_dir: temp.to_owned(),
        memory_limit_bytes: MEMORY,
        threads: 1,
        max_temp_bytes: None,
        storage: StorageSettings {
            snapshot_dir: snapshots.map(Path::to_owned),
            default_mode: StorageMode::Snapshot,
            datasets,
            auto_max_bytes: u64::MAX,
        },
        ..EngineSettings::default()
    }
}

fn main() {
    let Some((dir, iterations)) = common::args() else {
        return;
    };
    let work = tempfile::tempdir().expect("tempdir");
    let snapshots = SnapshotDir::open(&work.path().join("snapshots")).expect("snapshot dir");

    // Build every table's snapshot as a worker's builder does, with a worker's share.
    let builder = Connection::open_in_memory().expect("duckdb");
    builder
        .execute_batch(&format!(
            "SET threads = 1; SET memory_limit = '{}MiB'; SET temp_directory = '{}'",
            MEMORY >> 20,
            work.path().join("spill").display()
        ))
        .expect("settings");
    let version: String = builder
        .query_row("SELECT version()", [], |r| r.get(0))
        .expect("version");
    println!("# snapshot builds (1 thread, {} MiB)", MEMORY >> 20);
    println!("| table | rows | Parquet | build | snapshot |");
    println!("| --- | --- | --- | --- | --- |");
    for dataset in ferrocorn_query_core::catalog::scan(&dir).expect("scan") {
        let sort_key = SORT_KEYS
            .iter()
            .find(|(t, _)| *t == dataset.name)
            .map(|(_, k)| *k);
        let target = snapshots.target(&dataset, sort_key, &version);
        let started = Instant::now();
        snapshots
            .build(&builder, &dir, &dataset, sort_key, &target)
            .expect("build");
        let took = started.elapsed();
        let rows: i64 = builder
            .query_row(
                &format!("SELECT count(*) FROM {}", dataset.source_sql()),
                [],
                |r| r.get(0),
            )
            .expect("rows");
        let size = std::fs::metadata(&target).expect("snapshot").len();
        println!(
            "| {}{} | {rows} | {:.1} MB | {:.2} s | {:.1} MB |",
            dataset.name,
            sort_key.map_or(String::new(), |k| format!(" (by {k})")),
            dataset.bytes as f64 / 1e6,
            took.as_secs_f64(),
            size as f64 / 1e6
        );
    }
    drop(builder);

    let views = Engine::open(&settings(&dir, &work.path().join("views"), None)).expect("views");
    let snapped = Engine::open(&settings(
        &dir,
        &work.path().join("snap"),
        Some(snapshots.path()),
    ))
    .expect("snapshots");
    assert!(
        snapped
            .catalog()
            .iter()
            .all(|d| matches!(d.storage, Storage::Snapshot { .. })),
        "every table is served from its snapshot"
    );
    let keys: Vec<i64> = {
        let conn = Connection::open_in_memory().expect("duckdb");
        conn.prepare(&format!(
            "SELECT o_orderkey FROM read_parquet('{}') USING SAMPLE 1000 ROWS (reservoir, 7)",
            dir.join("orders.parquet").display()
        ))
        .and_then(|mut s| {
            s.query_map([], |r| r.get(0))
                .and_then(|rows| rows.collect::<Result<Vec<i64>, _>>())
        })
        .expect("sample keys")
    };
    let q1 = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/tpch/q01.sql"),
    )
    .expect("Q1");

    println!();
    println!(
        "# Parquet views vs snapshots (medians, 1 thread, through Engine::run and an encoder)"
    );
    println!("| query | iterations | Parquet views | snapshot | speed-up |");
    println!("| --- | --- | --- | --- | --- |");
    let cases: [(&str, &str, bool, Format, usize); 5] = [
        (
            "point lookup on orders by o_orderkey, all 9 columns",
            "SELECT * FROM orders WHERE o_orderkey = $1",
            true,
            Format::Json,
            iterations,
        ),
        (
            "point lookup on orders by o_orderkey, 3 columns",
            "SELECT o_custkey, o_orderstatus, o_totalprice FROM orders WHERE o_orderkey = $1",
            true,
            Format::Json,
            iterations,
        ),
        (
            "dashboard aggregate (orders by status)",
            "SELECT o_orderstatus, count(*) AS n, sum(o_totalprice) AS total FROM orders GROUP BY 1 ORDER BY 1",
            false,
            Format::Json,
            iterations / 4,
        ),
        ("TPC-H Q1", &q1, false, Format::Json, iterations / 20),
        (
            "10,000-row export as Arrow",
            "SELECT * FROM lineitem LIMIT 10000",
            false,
            Format::Arrow,
            iterations / 4,
        ),
    ];
    for (name, sql, keyed, format, n) in cases {
        let n = n.max(5);
        // Steady state, as in a running server: one untimed pass warms the caches (Parquet
        // metadata, the snapshot's blocks in the buffer pool, the prepared statements).
        for &key in keys.iter().take(if keyed { n } else { 1 }) {
            let params = if keyed {
                Params::Positional(vec![ParamValue::Int(key)])
            } else {
                Params::default()
            };
            run(&views, sql, &params, format);
            run(&snapped, sql, &params, format);
        }
        let mut view_times = Vec::with_capacity(n);
        let mut snap_times = Vec::with_capacity(n);
        let params = |i: usize| {
            if keyed {
                Params::Positional(vec![ParamValue::Int(keys[i % keys.len()])])
            } else {
                Params::default()
            }
        };
        // Blocks of BLOCK iterations alternate between the engines: machine noise hits both
        // alike, and neither runs right after the other has filled the CPU caches with its data.
        for block in (0..n).step_by(BLOCK) {
            let block = block..(block + BLOCK).min(n);
            for i in block.clone() {
                view_times.push(run(&views, sql, &params(i), format));
            }
            for i in block {
                snap_times.push(run(&snapped, sql, &params(i), format));
            }
        }
        let v = median(&mut view_times);
        let s = median(&mut snap_times);
        println!(
            "| {name} | {n} | {} | {} | {:.1}× |",
            ms(v),
            ms(s),
            v.as_secs_f64() / s.as_secs_f64()
        );
    }
}
