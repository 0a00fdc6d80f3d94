//! Raw DuckDB running a workload's queries in-process on a pool's snapshot files: the ceiling
//! the server's query throughput is measured against (`scripts/capacity.sh` runs it).
//!
//! ```text
//! cargo bench --workspace --profile dev --bench raw_queries -- [OPTIONS] SNAPSHOT_FILE...
//!   --query SQL        a statement, with positional parameters ($1 or ?); repeat for a mix
//!   --params GEN       the parameters of the --query before it (default: none)
//!   --weight N         the share of the --query before it in the mix (default 1)
//!   --seconds N        how long to run (default 10)
//!   --instances N      DuckDB instances, each driven by its own thread (default 2)
//!   --threads N        DuckDB threads of each instance (default 1)
//!   --memory-limit S   DuckDB's memory_limit of each instance, e.g. 768MiB (default DuckDB's)
//!   --json             print one JSON object instead of a sentence
//! ```
//!
//! As a pool's worker does, each instance attaches every snapshot file read-only and puts their
//! catalogues on its search path (a snapshot holds one table named after its dataset, so a query
//! names datasets as a request does), prepares each statement once, and materialises each result
//! as Arrow. With the defaults, two one-thread instances: the pool's two workers of one DuckDB
//! thread each in a 2-CPU container. Each instance runs every statement once before the clock
//! starts (its buffer pool warmed as the server's is by the workload's warm-up).
//!
//! GEN is a comma-separated list, one generator per parameter:
//!
//! - `int:LO:HI`: a uniform integer in `LO..=HI`;
//! - `orderkey:N`: an existing TPC-H order key, `floor(n / 8) * 32 + n % 8` for a uniform `n`
//!   in `1..=N` (the generator keeps the first 8 of every 32 keys: 1–7, 32–39, 64–71, …; SF1
//!   has N = 1,500,000 orders);
//! - `const:V`: the integer V.
//!
//! `scripts/wrk/query.lua` understands the same generators, so that wrk and this bench draw from
//! the same distributions. Prints the queries per second of all instances together, and how
//! many results were empty.

use std::time::{Duration, Instant};

use duckdb::{Connection, params_from_iter};

/// One parameter generator of a `--params` list.
#[derive(Clone, Debug)]
enum Gen {
    Int { lo: i64, hi: i64 },
    OrderKey { orders: i64 },
    Const(i64),
}

impl Gen {
    fn parse(spec: &str) -> Result<Vec<Self>, String> {
        if spec.is_empty() || spec == "none" || spec == "-" {
            return Ok(Vec::new());
        }
        spec.split(',')
            .map(|one| {
                let parts: Vec<&str> = one.split(':').collect();
                let int = |s: &str| {
                    s.parse::<i64>()
                        .map_err(|_| format!("not an integer in {one:?}: {s:?}"))
                };
                match parts.as_slice() {
                    ["int", lo, hi] => {
                        let (lo, hi) = (int(lo)?, int(hi)?);
                        if lo > hi {
                            return Err(format!("empty range in {one:?}"));
                        }
                        Ok(Self::Int { lo, hi })
                    }
                    ["orderkey", n] => {
                        let orders = int(n)?;
                        if orders < 1 {
                            return Err(format!("no orders in {one:?}"));
                        }
                        Ok(Self::OrderKey { orders })
                    }
                    ["const", v] => Ok(Self::Const(int(v)?)),
                    _ => Err(format!(
                        "unknown generator {one:?} (int:LO:HI, orderkey:N, const:V)"
                    )),
                }
            })
            .collect()
    }

    fn draw(&self, rng: &mut Rng) -> i64 {
        match *self {
            Self::Int { lo, hi } => lo + rng.below((hi - lo) as u64 + 1) as i64,
            Self::OrderKey { orders } => {
                let n = 1 + rng.below(orders as u64) as i64;
                n / 8 * 32 + n % 8
            }
            Self::Const(v) => v,
        }
    }
}

/// xorshift64*: a spread of parameters without a dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Query {
    sql: String,
    params: Vec<Gen>,
    weight: u64,
}

struct Options {
    snapshots: Vec<String>,
    queries: Vec<Query>,
    seconds: f64,
    instances: usize,
    threads: usize,
    memory_limit: Option<String>,
    json: bool,
}

const USAGE: &str = "usage: raw_queries --query SQL [--params GEN] [--weight N] ... \
[--seconds N] [--instances N] [--threads N] [--memory-limit SIZE] [--json] SNAPSHOT_FILE...";

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        snapshots: Vec::new(),
        queries: Vec::new(),
        seconds: 10.0,
        instances: 2,
        threads: 1,
        memory_limit: None,
        json: false,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let number = |name: &str, v: String| {
            v.parse::<f64>()
                .ok()
                .filter(|n| *n > 0.0)
                .ok_or_else(|| format!("{name}: not a positive number: {v:?}"))
        };
        match arg.as_str() {
            "--query" => options.queries.push(Query {
                sql: value("--query")?,
                params: Vec::new(),
                weight: 1,
            }),
            "--params" | "--weight" => {
                let v = value(arg)?;
                let query = options
                    .queries
                    .last_mut()
                    .ok_or_else(|| format!("{arg} before any --query"))?;
                if arg == "--params" {
                    query.params = Gen::parse(&v)?;
                } else {
                    query.weight = v
                        .parse()
                        .map_err(|_| format!("--weight: not an integer: {v:?}"))?;
                }
            }
            "--seconds" => options.seconds = number(arg, value(arg)?)?,
            "--instances" => options.instances = number(arg, value(arg)?)? as usize,
            "--threads" => options.threads = number(arg, value(arg)?)? as usize,
            "--memory-limit" => options.memory_limit = Some(value(arg)?),
            "--json" => options.json = true,
            // What `cargo bench` adds.
            "--bench" => {}
            flag if flag.starts_with("--") => return Err(format!("unknown option {flag}")),
            file => options.snapshots.push(file.to_owned()),
        }
    }
    if options.queries.is_empty() || options.snapshots.is_empty() {
        return Err("needs at least one --query and one snapshot file".to_owned());
    }
    if options.queries.iter().all(|q| q.weight == 0) {
        return Err("every --weight is 0".to_owned());
    }
    Ok(options)
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// An instance as a worker has it: every snapshot attached read-only, their catalogues on the
/// search path.
fn open(options: &Options) -> Connection {
    let conn = Connection::open_in_memory().expect("duckdb");
    let mut setup = format!("SET threads = {};", options.threads);
    if let Some(limit) = &options.memory_limit {
        setup.push_str(&format!("SET memory_limit = {};", quote(limit)));
    }
    let mut path = Vec::new();
    for (i, file) in options.snapshots.iter().enumerate() {
        setup.push_str(&format!(
            "ATTACH {} AS snapshot_{i} (READ_ONLY);",
            quote(file)
        ));
        path.push(format!("snapshot_{i}.main"));
    }
    setup.push_str(&format!("SET search_path = {};", quote(&path.join(","))));
    conn.execute_batch(&setup)
        .expect("attach the snapshot files");
    conn
}

/// What one instance did: queries run, and of them with an empty result.
#[derive(Default)]
struct Tally {
    queries: u64,
    empty: u64,
    per_query: Vec<u64>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse_args(&args) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("raw_queries: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let total_weight: u64 = options.queries.iter().map(|q| q.weight).sum();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    // Every instance opens and warms up before the clock starts.
    let barrier = std::sync::Barrier::new(options.instances + 1);
    let mut started = Instant::now();
    let tallies: Vec<Tally> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..options.instances)
            .map(|t| {
                let options = &options;
                let barrier = &barrier;
                scope.spawn(move || {
                    let conn = open(options);
                    let mut rng = Rng::new(seed ^ (t as u64 + 1));
                    let mut statements: Vec<_> = options
                        .queries
                        .iter()
                        .map(|q| conn.prepare(&q.sql).expect("prepare"))
                        .collect();
                    let mut run = |i: usize, rng: &mut Rng| {
                        let values: Vec<i64> = options.queries[i]
                            .params
                            .iter()
                            .map(|g| g.draw(rng))
                            .collect();
                        let batches: Vec<_> = statements[i]
                            .query_arrow(params_from_iter(values))
                            .expect("query")
                            .collect();
                        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
                        std::hint::black_box(batches);
                        rows
                    };
                    for i in 0..options.queries.len() {
                        run(i, &mut rng);
                    }
                    barrier.wait();
                    let deadline = Instant::now() + Duration::from_secs_f64(options.seconds);
                    let mut tally = Tally {
                        per_query: vec![0; options.queries.len()],
                        ..Tally::default()
                    };
                    while Instant::now() < deadline {
                        let mut pick = rng.below(total_weight);
                        let i = options
                            .queries
                            .iter()
                            .position(|q| {
                                if pick < q.weight {
                                    true
                                } else {
                                    pick -= q.weight;
                                    false
                                }
                            })
                            .unwrap_or(0);
                        if run(i, &mut rng) == 0 {
                            tally.empty += 1;
                        }
                        tally.queries += 1;
                        tally.per_query[i] += 1;
                    }
                    tally
                })
            })
            .collect();
        barrier.wait();
        started = Instant::now();
        workers
            .into_iter()
            .map(|w| w.join().expect("instance"))
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let queries: u64 = tallies.iter().map(|t| t.queries).sum();
    let empty: u64 = tallies.iter().map(|t| t.empty).sum();
    let per_query: Vec<u64> = (0..options.queries.len())
        .map(|i| tallies.iter().map(|t| t.per_query[i]).sum())
        .collect();
    let rate = queries as f64 / elapsed;
    if options.json {
        let per_query: Vec<String> = per_query.iter().map(u64::to_string).collect();
        let fields = [
            format!("\"queries\": {queries}"),
            format!("\"seconds\": {elapsed:.3}"),
            format!("\"queries_per_second\": {rate:.2}"),
            format!("\"empty_results\": {empty}"),
            format!("\"instances\": {}", options.instances),
            format!("\"threads\": {}", options.threads),
            format!("\"per_query\": [{}]", per_query.join(", ")),
        ];
        println!("{{{}}}", fields.join(", "));
    } else {
        println!(
            "raw DuckDB: {queries} queries ({empty} empty) in {elapsed:.1} s on {} instances of {} \
             thread(s) = {rate:.1}/s",
            options.instances, options.threads
        );
    }
}
