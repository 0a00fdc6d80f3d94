//! Raw DuckDB's point lookups on a snapshot, in-process: the ceiling the server's bound-key
//! lookups are measured against.
//!
//! ```text
//! cargo bench --workspace --profile dev --bench point_lookup -- SNAPSHOT_FILE [SECONDS] [THREADS] [KEY] [MAX_KEY] [separate] [view]
//! ```
//!
//! With `separate`, each thread has its own one-thread instance instead, as each worker of the
//! pool does (its own copy of the index and the blocks it reads); with `view`, the lookup names a
//! view over the attached table, as a request names a dataset.
//!
//! One DuckDB instance with `threads` threads attaches the snapshot read-only, as a worker does;
//! each of `THREADS` threads (default 2: the machine's cores) has its own connection and a
//! statement prepared once, and looks up random keys in `1..=MAX_KEY` (default 6,000,000: TPC-H
//! SF1's order keys) for `SECONDS` (default 10), materialising each result as Arrow. Prints the
//! lookups per second of all threads together.

use std::time::{Duration, Instant};

use duckdb::Connection;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let Some(snapshot) = args.first() else {
        eprintln!("usage: point_lookup SNAPSHOT_FILE [SECONDS] [THREADS] [KEY] [MAX_KEY]");
        return;
    };
    let seconds: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let threads: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(2);
    let key = args.get(3).map_or("o_orderkey", String::as_str).to_owned();
    let max_key: u64 = args
        .get(4)
        .and_then(|a| a.parse().ok())
        .unwrap_or(6_000_000);
    let separate = args.iter().skip(5).any(|a| a == "separate");
    // Through a view over the attached table, as the server names a dataset.
    let view = args.iter().skip(5).any(|a| a == "view");
    // By the bare table name, resolved through the connection's search path.
    let search = args.iter().skip(5).any(|a| a == "search");
    let open = |threads: usize| {
        let conn = Connection::open_in_memory().expect("duckdb");
        conn.execute_batch(&format!(
            "SET threads = {threads}; ATTACH '{}' AS snap (READ_ONLY)",
            snapshot.replace('\'', "''")
        ))
        .expect("attach the snapshot");
        // A snapshot holds one table, named after its dataset.
        let table: String = conn
            .query_row(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = 'snap'",
                [],
                |row| row.get(0),
            )
            .expect("the snapshot's table");
        conn.execute_batch(&format!(
            "CREATE VIEW dataset AS SELECT * FROM snap.main.\"{table}\""
        ))
        .expect("view");
        (conn, table)
    };
    let (conn, table) = open(if separate { 1 } else { threads });
    let table = if view {
        "dataset".to_owned()
    } else if search {
        format!("\"{table}\"")
    } else {
        format!("snap.main.\"{table}\"")
    };
    let sql = format!("SELECT * FROM {table} WHERE \"{key}\" = ?");
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let total: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let conn = if separate {
                    open(1).0
                } else {
                    conn.try_clone().expect("connection")
                };
                let sql = &sql;
                if search {
                    conn.execute_batch("SET search_path = 'snap.main'")
                        .expect("search path");
                }
                scope.spawn(move || {
                    let mut statement = conn.prepare(sql).expect("prepare");
                    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        // xorshift64: a spread of keys without a dependency.
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        let key = (state % max_key + 1) as i64;
                        let batches: Vec<_> =
                            statement.query_arrow([key]).expect("lookup").collect();
                        std::hint::black_box(batches);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("thread")).sum()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let layout = if separate {
        "separate one-thread instances"
    } else {
        "threads of one instance"
    };
    println!(
        "raw DuckDB point lookups: {total} in {elapsed:.1} s on {threads} {layout} = {:.0}/s",
        total as f64 / elapsed
    );
}
