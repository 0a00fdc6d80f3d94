//! What the benchmarks share: running a query as a request would, through [`Engine::run`] into
//! an encoder, and medians.

use std::time::{Duration, Instant};

use ferrocorn_query_core::arrow::datatypes::SchemaRef;
use ferrocorn_query_core::arrow::record_batch::RecordBatch;
use ferrocorn_query_core::{
    Encoder, Engine, Flow, Format, InterruptHandle, Params, QuerySpec, ResultSink, Summary,
};

/// Encodes a result and counts its bytes.
struct Encode {
    format: Format,
    encoder: Option<Encoder>,
    bytes: usize,
}

impl ResultSink for Encode {
    fn started(&mut self, _: InterruptHandle) {}
    fn schema(&mut self, schema: SchemaRef) -> Flow {
        match Encoder::new(self.format, schema) {
            Ok((encoder, head)) => {
                self.bytes += head.len();
                self.encoder = Some(encoder);
                Flow::Continue
            }
            Err(_) => Flow::Stop,
        }
    }
    fn batch(&mut self, batch: RecordBatch) -> Flow {
        match self.encoder.as_mut().map(|e| e.batch(&batch)) {
            Some(Ok(bytes)) => {
                self.bytes += bytes.len();
                Flow::Continue
            }
            _ => Flow::Stop,
        }
    }
}

/// Run `sql` and encode its whole result in `format`; returns how long that took.
pub fn run(engine: &Engine, sql: &str, params: &Params, format: Format) -> Duration {
    let started = Instant::now();
    let mut sink = Encode {
        format,
        encoder: None,
        bytes: 0,
    };
    let outcome = engine
        .run(
            &QuerySpec {
                sql,
                params,
                max_rows: u64::MAX,
                explain: None,
            },
            &mut sink,
        )
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    if let Some(encoder) = sink.encoder.take() {
        let tail = encoder
            .finish(Summary {
                rows: outcome.rows,
                truncated: outcome.truncated,
            })
            .expect("finish");
        std::hint::black_box((tail, sink.bytes));
    }
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
