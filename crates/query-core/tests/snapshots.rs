//! Snapshots against Parquet views, on real DuckDB and real files.
//!
//! The TPC-H test reads the tables `scripts/test.sh` generates with `scripts/gen_tpch.sh 0.01`
//! (or the directory in `FERROCORN_TPCH_DIR`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use ferrocorn_query_core::snapshot::SnapshotDir;
use ferrocorn_query_core::{
    DatasetOptions, Engine, EngineSettings, Flow, InterruptHandle, Params, QuerySpec, ResultSink,
    Storage, StorageMode, StorageSettings,
};

/// Collects a result as sorted text lines, one per row.
#[derive(Default)]
struct Lines(Vec<String>);

impl ResultSink for Lines {
    fn started(&mut self, _: InterruptHandle) {}
    fn schema(&mut self, _: SchemaRef) -> Flow {
        Flow::Continue
    }
    fn batch(&mut self, batch: RecordBatch) -> Flow {
        let options = FormatOptions::default().with_null("NULL");
        let formatters: Vec<_> = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).expect("formatter"))
            .collect();
        for row in 0..batch.num_rows() {
            let cells: Vec<String> = formatters
                .iter()
                .map(|f| f.value(row).to_string())
                .collect();
            self.0.push(cells.join("|"));
        }
        Flow::Continue
    }
}

fn run(engine: &Engine, sql: &str) -> Vec<String> {
    let mut lines = Lines::default();
    let params = Params::default();
    engine
        .run(
            &QuerySpec {
                sql,
                params: &params,
                max_rows: u64::MAX,
                explain: None,
            },
            &mut lines,
        )
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    lines.0.sort();
    lines.0
}

fn settings(data: &Path, temp: &Path, snapshots: Option<&Path>) -> EngineSettings {
    let mut datasets = std::collections::BTreeMap::new();
    for (name, key) in [("orders", "o_orderkey"), ("lineitem", "l_orderkey")] {
        datasets.insert(
            name.to_owned(),
            DatasetOptions {
                sort_key: Some(key.to_owned()),
                ..DatasetOptions::default()
            },
        );
    }
    EngineSettings {
        data_dir: data.to_owned(),
        temp_dir: temp.to_owned(),
        memory_limit_bytes: 512 << 20,
        threads: 1,
        max_temp_bytes: None,
        storage: StorageSettings {
            snapshot_dir: snapshots.map(Path::to_owned),
            default_mode: StorageMode::Snapshot,
            datasets,
            auto_max_bytes: 0,
        },
        ..EngineSettings::default()
    }
}

/// Refresh until every dataset is served from a snapshot of its current files.
fn wait_for_snapshots(engine: &Engine) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        engine.refresh_if_due(Duration::ZERO);
        let catalog = engine.catalog();
        if catalog
            .iter()
            .all(|d| matches!(d.storage, Storage::Snapshot { .. }) && d.pending.is_none())
        {
            return;
        }
        assert!(Instant::now() < deadline, "snapshots not built in time");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn snapshot_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "duckdb" || e == "tmp"));
    files.sort();
    files
}

fn tpch_dir() -> PathBuf {
    let dir = std::env::var_os("FERROCORN_TPCH_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/tpch-sf0.01"),
        PathBuf::from,
    );
    assert!(
        dir.join("lineitem.parquet").exists(),
        "TPC-H tables missing in {}: run scripts/gen_tpch.sh 0.01 (scripts/test.sh does)",
        dir.display()
    );
    dir
}

#[test]
fn a_snapshot_answers_every_tpch_query_like_the_parquet_views() {
    let data = tpch_dir();
    let temp = tempfile::tempdir().expect("tempdir");
    let views = Engine::open(&settings(&data, &temp.path().join("views"), None)).expect("open");
    let snapshots = temp.path().join("snapshots");
    let snapped = Engine::open(&settings(
        &data,
        &temp.path().join("snap"),
        Some(&snapshots),
    ))
    .expect("open");
    wait_for_snapshots(&snapped);
    assert_eq!(snapped.catalog().len(), 8);
    assert!(
        views
            .catalog()
            .iter()
            .all(|d| d.storage == Storage::Parquet)
    );

    let queries = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/tpch");
    for n in 1..=22 {
        let path = queries.join(format!("q{n:02}.sql"));
        let sql = std::fs::read_to_string(&path).expect("query file");
        let expected = run(&views, &sql);
        let got = run(&snapped, &sql);
        assert_eq!(
            got, expected,
            "Q{n} differs between snapshot and Parquet views"
        );
        // Each query returns rows on this data, so the comparison compares something.
        assert!(!expected.is_empty(), "Q{n} returned no rows");
    }
    // A point lookup on the sort key reads the sorted snapshot.
    assert_eq!(
        run(
            &snapped,
            "SELECT o_custkey FROM orders WHERE o_orderkey = 32"
        ),
        run(&views, "SELECT o_custkey FROM orders WHERE o_orderkey = 32"),
    );
}

fn write_numbers(path: &Path, n: u64, factor: u64) {
    let conn = duckdb::Connection::open_in_memory().expect("duckdb");
    let staging = path.with_extension("staging");
    conn.execute_batch(&format!(
        "COPY (SELECT range AS id, range * {factor} AS v FROM range({n})) TO '{}' (FORMAT parquet)",
        staging.display()
    ))
    .expect("copy");
    std::fs::rename(&staging, path).expect("publish");
}

/// A data directory with one dataset, `numbers` (1000 rows of `id` and `v = 2 * id`), and the
/// settings of an engine that snapshots it. Bind `dir` (as `_dir`) for as long as it is used.
struct Numbers {
    dir: tempfile::TempDir,
    data: PathBuf,
    snapshots: PathBuf,
    settings: EngineSettings,
}

fn numbers() -> Numbers {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    write_numbers(&data.join("numbers.parquet"), 1000, 2);
    let snapshots = dir.path().join("snapshots");
    let settings = settings(&data, &dir.path().join("tmp"), Some(&snapshots));
    Numbers {
        dir,
        data,
        snapshots,
        settings,
    }
}

#[test]
fn a_restart_with_unchanged_files_rebuilds_nothing() {
    let Numbers {
        dir: _dir,
        snapshots,
        settings: s,
        ..
    } = numbers();

    let engine = Engine::open(&s).expect("open");
    wait_for_snapshots(&engine);
    let files = snapshot_files(&snapshots);
    assert_eq!(files.len(), 1, "{files:?}");
    let built = std::fs::metadata(&files[0])
        .expect("meta")
        .modified()
        .expect("mtime");
    drop(engine);

    // Served from the existing snapshot as soon as it opens: nothing was built.
    let engine = Engine::open(&s).expect("reopen");
    let catalog = engine.catalog();
    assert!(
        matches!(&catalog[0].storage, Storage::Snapshot { file, .. } if *file == files[0]),
        "{:?}",
        catalog[0].storage
    );
    assert_eq!(snapshot_files(&snapshots), files);
    assert_eq!(
        std::fs::metadata(&files[0])
            .expect("meta")
            .modified()
            .expect("mtime"),
        built
    );
    assert_eq!(run(&engine, "SELECT sum(v) FROM numbers"), ["999000"]);
}

#[test]
fn a_changed_dataset_moves_to_its_new_snapshot_and_the_old_file_goes() {
    let Numbers {
        dir: _dir,
        data,
        snapshots,
        settings: s,
    } = numbers();
    let file = data.join("numbers.parquet");
    let engine = Engine::open(&s).expect("open");
    wait_for_snapshots(&engine);
    let old = snapshot_files(&snapshots);
    assert_eq!(run(&engine, "SELECT sum(v) FROM numbers"), ["999000"]);

    write_numbers(&file, 1000, 3);
    wait_for_snapshots(&engine);
    assert_eq!(run(&engine, "SELECT sum(v) FROM numbers"), ["1498500"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // The old snapshot is detached once drained (at a refresh), then collected.
        engine.refresh_if_due(Duration::ZERO);
        let now = snapshot_files(&snapshots);
        if now.len() == 1 && now != old {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "old snapshot not collected: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Holds its query at the schema until told to go on, so the snapshot it reads stays attached.
struct Held {
    reached: std::sync::mpsc::Sender<()>,
    release: std::sync::mpsc::Receiver<()>,
}

impl ResultSink for Held {
    fn started(&mut self, _: InterruptHandle) {}
    fn schema(&mut self, _: SchemaRef) -> Flow {
        let _ = self.reached.send(());
        let _ = self.release.recv_timeout(Duration::from_secs(60));
        Flow::Continue
    }
    fn batch(&mut self, _: RecordBatch) -> Flow {
        Flow::Continue
    }
}

#[test]
fn a_statement_cached_before_a_change_reads_the_new_snapshot_while_the_old_is_still_attached() {
    let Numbers {
        dir: _dir,
        data,
        snapshots,
        settings: s,
    } = numbers();
    let engine = Engine::open(&s).expect("open");
    wait_for_snapshots(&engine);
    let old = snapshot_files(&snapshots);
    let (reached_tx, reached) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        // Owned here, so that a failing assertion drops it and lets the holder go.
        let release = release;
        // A query in flight on one connection holds the old snapshot attached...
        let engine = &engine;
        let holder = scope.spawn(move || {
            let params = Params::default();
            let spec = QuerySpec {
                sql: "SELECT count(*) FROM numbers",
                params: &params,
                max_rows: u64::MAX,
                explain: None,
            };
            let mut sink = Held {
                reached: reached_tx,
                release: release_rx,
            };
            engine.run(&spec, &mut sink).map(|o| o.rows)
        });
        reached
            .recv_timeout(Duration::from_secs(30))
            .expect("the holding query started");
        // ...while another connection prepares and caches this statement against it.
        assert_eq!(run(engine, "SELECT sum(v) FROM numbers"), ["999000"]);
        write_numbers(&data.join("numbers.parquet"), 1000, 3);
        wait_for_snapshots(engine);
        engine.refresh_if_due(Duration::ZERO);
        assert!(
            old.iter().all(|f| f.exists()),
            "the old snapshot must still be there for the test to mean anything"
        );
        assert_eq!(run(engine, "SELECT sum(v) FROM numbers"), ["1498500"]);
        release.send(()).expect("release");
        assert_eq!(holder.join().expect("holder").expect("count"), 1);
    });
}

#[test]
fn a_half_written_snapshot_is_never_attached_and_is_cleaned_up() {
    let Numbers {
        dir: _dir,
        data,
        snapshots,
        settings: s,
    } = numbers();
    // What a builder killed mid-write leaves: a partial temporary file next to the target.
    let dataset = ferrocorn_query_core::catalog::scan(&data)
        .expect("scan")
        .remove(0);
    let dir_handle = SnapshotDir::open(&snapshots).expect("dir");
    let version = duckdb::Connection::open_in_memory()
        .and_then(|c| c.query_row("SELECT version()", [], |r| r.get::<_, String>(0)))
        .expect("version");
    let target = dir_handle.target(&dataset, None, &version);
    let mut temp = target.clone().into_os_string();
    temp.push(".tmp");
    std::fs::write(&temp, b"half a database").expect("write");

    let engine = Engine::open(&s).expect("open");
    // Until the real snapshot exists, the Parquet files serve.
    assert_eq!(run(&engine, "SELECT count(*) FROM numbers"), ["1000"]);
    wait_for_snapshots(&engine);
    assert_eq!(run(&engine, "SELECT sum(v) FROM numbers"), ["999000"]);
    assert_eq!(snapshot_files(&snapshots), [target]);
}

#[test]
fn an_unusable_snapshot_directory_leaves_the_parquet_files_serving() {
    let Numbers {
        dir, mut settings, ..
    } = numbers();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"").expect("write");
    settings.storage.snapshot_dir = Some(not_a_dir);
    let engine = Engine::open(&settings).expect("open without snapshots");
    engine.refresh_if_due(Duration::ZERO);
    assert_eq!(engine.catalog()[0].storage, Storage::Parquet);
    assert_eq!(engine.catalog()[0].pending, None);
    assert_eq!(run(&engine, "SELECT sum(v) FROM numbers"), ["999000"]);
}
