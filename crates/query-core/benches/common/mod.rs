//! What the benchmarks share: running a query as a request would, through
//! [`Engine::run_encoded`], and medians.

use std::time::{Duration, Instant};

use ferrocorn_query_core::{ChunkSink, Engine, Flow, Format, InterruptHandle, Params, QuerySpec};

/// Counts a result's encoded bytes.
struct Count(usize);

impl ChunkSink for Count {
    fn started(&mut self, _: InterruptHandle) {}
    fn chunk(&mut self, bytes: Vec<u8>) -> Flow {
        self.0 += bytes.len();
        Flow::Continue
    }
}

/// Run `sql` and encode its whole result in `format`, as a request would (the query core's one
/// pipeline, [`Engine::run_encoded`]); returns how long that took.
pub fn run(engine: &Engine, sql: &str, params: &Params, format: Format) -> Duration {
    let started = Instant::now();
    let mut bytes = Count(0);
    let spec = QuerySpec {
        sql,
        params,
        max_rows: u64::MAX,
        explain: None,
    };
    let encoded = engine
        .run_encoded(&spec, format, &mut bytes)
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    std::hint::black_box((encoded, bytes.0));
    started.elapsed()
}

pub fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// The command line, `[TPCH_DIR] [ITERATIONS]`: the TPC-H directory (default: the workspace's
/// `data/tpch-sf1`; cargo runs benchmarks in the package directory) and the iterations (default
/// 200). `None`, with a message, when the directory holds no TPC-H tables.
pub fn args() -> Option<(std::path::PathBuf, usize)> {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let dir = args.next().map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/tpch-sf1"),
        std::path::PathBuf::from,
    );
    let iterations = args.next().and_then(|n| n.parse().ok()).unwrap_or(200);
    if !dir.join("lineitem.parquet").exists() {
        eprintln!(
            "no TPC-H data in {}: run scripts/gen_tpch.sh 1 first",
            dir.display()
        );
        return None;
    }
    Some((dir, iterations))
}
