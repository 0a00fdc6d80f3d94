//! Running a request's statement: the gate, then the one prepared statement DuckDB extracted,
//! streamed as Arrow batches (into a [`ResultSink`]) or as encoded bytes (into a [`ChunkSink`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use duckdb::Connection;
use hashlink::LruCache;

use crate::Error;
use crate::capi::{self, Database, StatementType};
use crate::encode::{EncodeError, Encoder, Format, Summary};
use crate::gate::{Analysis, FunctionPolicy, Refusal};
use crate::pool::{Pool, Purpose, QueryConn};
use crate::query::{Flow, InterruptHandle, Outcome, QueryError, QuerySpec, ResultSink};
use crate::serving::Serving;
use crate::sync::lock;

/// Statement analyses a worker remembers, by text, and the longest text remembered.
const ANALYSES: usize = 1024;
const MAX_ANALYSED_TEXT: usize = 16 << 10;
/// The engine's own call for a statement's parse tree (see [`crate::gate`]).
const SERIALIZE_SQL: &str = "SELECT json_serialize_sql($1::VARCHAR)";

/// The query connections of an instance and the gate's memory.
#[derive(Debug)]
pub(crate) struct Runner {
    pool: Pool,
    /// The functions of the instance, for the gate.
    functions: FunctionPolicy,
    /// Gate analyses of recent statements, by text.
    analyses: Mutex<LruCache<String, Arc<Analysis>>>,
    /// Test builds only: the gate is off.
    unlocked: bool,
}

impl Runner {
    /// `conn` reads the instance's functions for the gate.
    pub fn new(database: Arc<Database>, conn: &Connection, unlocked: bool) -> Result<Self, Error> {
        Ok(Self {
            pool: Pool::new(database),
            functions: function_policy(conn)?,
            analyses: Mutex::new(LruCache::new(ANALYSES)),
            unlocked,
        })
    }

    /// The gate's analysis of `sql`, if it is remembered (no DuckDB call).
    pub fn cached_analysis(&self, sql: &str) -> Option<Arc<Analysis>> {
        #[cfg(feature = "test-hooks")]
        if self.unlocked {
            return Some(Arc::new(Analysis::unchecked()));
        }
        lock(&self.analyses).get(sql).cloned()
    }

    /// The gate's analysis of `sql` (see [`crate::gate`]): DuckDB parses it, nothing is bound or
    /// executed. Blocks on a miss: call it from a thread that may block.
    pub fn analyze(&self, sql: &str) -> Result<Arc<Analysis>, QueryError> {
        if let Some(known) = self.cached_analysis(sql) {
            return Ok(known);
        }
        let mut conn = self.pool.checkout()?;
        self.analyze_on(&mut conn, sql)
    }

    fn analyze_on(&self, conn: &mut QueryConn, sql: &str) -> Result<Arc<Analysis>, QueryError> {
        if let Some(known) = self.cached_analysis(sql) {
            return Ok(known);
        }
        // DuckDB's parser first: a syntax error is reported as DuckDB words it, and the number
        // of statements is DuckDB's.
        {
            let extracted = conn.extract(sql)?;
            match extracted.count() {
                0 => return Err(Refusal::Empty.into()),
                1 => {}
                n => return Err(Refusal::MultipleStatements(n).into()),
            }
        }
        let serialized = {
            let prepared =
                conn.prepare(Purpose::Serialize, SERIALIZE_SQL, StatementType::Select)?;
            prepared
                .bind(&[capi::Value::Text(sql.to_owned())])
                .map_err(QueryError::from_message)?;
            let mut stream = prepared.execute().map_err(QueryError::from_message)?;
            let batch = stream
                .next_batch()
                .map_err(QueryError::from_message)?
                .ok_or_else(|| {
                    QueryError::Internal("json_serialize_sql returned nothing".into())
                })?;
            first_text(&batch)
                .ok_or_else(|| QueryError::Internal("json_serialize_sql returned no text".into()))?
        };
        let analysis = Arc::new(crate::gate::analyze(sql, &serialized, &self.functions)?);
        if sql.len() <= MAX_ANALYSED_TEXT {
            lock(&self.analyses).insert(sql.to_owned(), analysis.clone());
        }
        Ok(analysis)
    }

    /// Run one query, streaming its result into `sink`. Blocks: call it from a thread that may
    /// block (a worker's blocking pool).
    ///
    /// The statement passes the gate first ([`crate::gate`]): one statement by DuckDB's parser,
    /// a query by its parse tree and by its prepared type, reading only datasets that are
    /// available. Each query runs on its own connection to the instance, so it can be interrupted
    /// alone.
    pub fn run(
        &self,
        serving: &Serving,
        spec: &QuerySpec<'_>,
        sink: &mut dyn ResultSink,
    ) -> Result<Outcome, QueryError> {
        // Snapshots this query may read stay attached until it ends.
        let _generation = serving.generation();
        let mut conn = self.pool.checkout()?;
        let path = serving.search_path();
        conn.follow_search_path(path.epoch, &path.statement)?;
        // Dropped before `conn` goes back to the pool.
        let (interrupt, armed) = InterruptHandle::arm(conn.interrupt_handle());
        sink.started(interrupt);
        let interrupt = armed.handle();
        let (purpose, text, expected) = match spec.explain {
            None => (Purpose::Query, spec.sql.to_owned(), StatementType::Select),
            Some(explain) => (
                Purpose::Explain,
                explain.wrap(spec.sql),
                StatementType::Explain,
            ),
        };
        if self.unlocked {
            // Test builds only: run whatever the text is, on purpose.
            return run_unchecked(&mut conn, &text, spec, sink);
        }
        let analysis = self.analyze_on(&mut conn, spec.sql)?;
        analysis.check(&serving.catalog())?;
        interrupt.check()?;
        let prepared = conn.prepare(purpose, &text, expected)?;
        let values = spec.params.bind_order(&prepared.parameter_names())?;
        prepared.bind(&values).map_err(QueryError::from_message)?;
        interrupt.check()?;
        let mut stream = prepared.execute().map_err(QueryError::from_message)?;
        interrupt.reassert();
        stream_into(&mut stream, spec.max_rows, sink)
    }

    /// [`Runner::run`], encoding the result in `format` and handing the bytes to `sink` as they
    /// are produced: the head, a chunk per batch that yields bytes, the tail.
    pub fn run_encoded(
        &self,
        serving: &Serving,
        spec: &QuerySpec<'_>,
        format: Format,
        sink: &mut dyn ChunkSink,
    ) -> Result<Encoded, QueryError> {
        let mut encoding = Encoding {
            format,
            encoder: None,
            sink,
            failed: None,
            encode: Duration::ZERO,
        };
        let outcome = self.run(serving, spec, &mut encoding);
        if let Some(error) = encoding.failed.take() {
            return Err(error.into());
        }
        let outcome = outcome?;
        let summary = Summary {
            rows: outcome.rows,
            truncated: outcome.truncated,
        };
        if outcome.stopped {
            return Ok(Encoded {
                summary,
                stopped: true,
                encode: encoding.encode,
            });
        }
        let encoder = encoding.encoder.take().ok_or(EncodeError::NoSchema)?;
        let started = Instant::now();
        let tail = encoder.finish(summary)?;
        encoding.encode += started.elapsed();
        let stopped = !tail.is_empty() && encoding.sink.chunk(tail) == Flow::Stop;
        Ok(Encoded {
            summary,
            stopped,
            encode: encoding.encode,
        })
    }

    #[cfg(test)]
    pub fn idle_connections(&self) -> usize {
        self.pool.idle()
    }
}

/// Receives a query's encoded result.
pub trait ChunkSink {
    /// Called once, before execution starts: the handle interrupts the query from any thread.
    fn started(&mut self, interrupt: InterruptHandle);
    /// The next bytes of the result; [`Flow::Stop`] ends the query (the client went away).
    fn chunk(&mut self, bytes: Vec<u8>) -> Flow;
}

/// How an encoded query ended (when it did not fail).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub summary: Summary,
    /// The sink stopped the query before its end.
    pub stopped: bool,
    /// Time spent encoding.
    pub encode: Duration,
}

/// The [`ResultSink`] behind [`Runner::run_encoded`]: batches into an [`Encoder`], bytes into a
/// [`ChunkSink`].
struct Encoding<'s> {
    format: Format,
    encoder: Option<Encoder>,
    sink: &'s mut dyn ChunkSink,
    failed: Option<EncodeError>,
    encode: Duration,
}

impl Encoding<'_> {
    /// Hand over what an encoder step produced, or remember why it failed (and stop).
    fn emit(&mut self, started: Instant, produced: Result<Vec<u8>, EncodeError>) -> Flow {
        self.encode += started.elapsed();
        match produced {
            Ok(bytes) if bytes.is_empty() => Flow::Continue,
            Ok(bytes) => self.sink.chunk(bytes),
            Err(e) => {
                self.failed = Some(e);
                Flow::Stop
            }
        }
    }
}

impl ResultSink for Encoding<'_> {
    fn started(&mut self, interrupt: InterruptHandle) {
        self.sink.started(interrupt);
    }

    fn schema(&mut self, schema: arrow::datatypes::SchemaRef) -> Flow {
        let started = Instant::now();
        let head = Encoder::new(self.format, schema).map(|(encoder, head)| {
            self.encoder = Some(encoder);
            head
        });
        self.emit(started, head)
    }

    fn batch(&mut self, batch: arrow::record_batch::RecordBatch) -> Flow {
        let started = Instant::now();
        let Some(encoder) = self.encoder.as_mut() else {
            return Flow::Stop;
        };
        let bytes = encoder.batch(&batch);
        self.emit(started, bytes)
    }
}

/// Pass a running query's batches to `sink`, cutting the result at `max_rows`.
fn stream_into(
    stream: &mut capi::Stream<'_>,
    max_rows: u64,
    sink: &mut dyn ResultSink,
) -> Result<Outcome, QueryError> {
    let mut outcome = Outcome {
        rows: 0,
        truncated: false,
        stopped: false,
    };
    if sink.schema(stream.schema()) == Flow::Stop {
        outcome.stopped = true;
        return Ok(outcome);
    }
    while let Some(batch) = stream.next_batch().map_err(QueryError::from_message)? {
        if batch.num_rows() == 0 {
            continue;
        }
        let remaining = max_rows.saturating_sub(outcome.rows);
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
    // Dropping the stream closes the result, so the connection (and its cached statement) can
    // serve the next query even when this one was cut short.
    Ok(outcome)
}

/// Test builds only: the text extracted and prepared as one statement, of any type, and run.
#[cfg(feature = "test-hooks")]
fn run_unchecked(
    conn: &mut QueryConn,
    text: &str,
    spec: &QuerySpec<'_>,
    sink: &mut dyn ResultSink,
) -> Result<Outcome, QueryError> {
    let extracted = conn.extract(text)?;
    let mut prepared = extracted.prepare(0).map_err(QueryError::from_message)?;
    let values = spec.params.bind_order(&prepared.parameter_names())?;
    prepared.bind(&values).map_err(QueryError::from_message)?;
    let mut stream = prepared.execute().map_err(QueryError::from_message)?;
    stream_into(&mut stream, spec.max_rows, sink)
}

#[cfg(not(feature = "test-hooks"))]
fn run_unchecked(
    _: &mut QueryConn,
    _: &str,
    _: &QuerySpec<'_>,
    _: &mut dyn ResultSink,
) -> Result<Outcome, QueryError> {
    Err(QueryError::Internal("the gate cannot be turned off".into()))
}

/// The first value of a one-column text result.
fn first_text(batch: &arrow::record_batch::RecordBatch) -> Option<String> {
    use arrow::array::{Array, LargeStringArray, StringArray, StringViewArray};
    let column = batch.columns().first()?;
    if column.is_empty() || column.is_null(0) {
        return None;
    }
    let any = column.as_any();
    if let Some(a) = any.downcast_ref::<StringArray>() {
        return Some(a.value(0).to_owned());
    }
    if let Some(a) = any.downcast_ref::<LargeStringArray>() {
        return Some(a.value(0).to_owned());
    }
    any.downcast_ref::<StringViewArray>()
        .map(|a| a.value(0).to_owned())
}

/// What `duckdb_functions()` says of every function of the instance, for the gate.
fn function_policy(conn: &Connection) -> Result<FunctionPolicy, Error> {
    let mut policy = FunctionPolicy::default();
    let mut statement = conn
        .prepare("SELECT function_name, stability FROM duckdb_functions()")
        .map_err(Error::Query)?;
    let rows = statement
        .query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, Option<String>>(1)?))
        })
        .map_err(Error::Query)?;
    for row in rows {
        let (name, stability) = row.map_err(Error::Query)?;
        policy.add(&name, stability.as_deref().unwrap_or(""));
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use crate::Engine;
    use crate::query::{QueryError, QuerySpec};
    use crate::testing::{Count, refusal, run_sql, settings, write_parquet};

    /// Keeps the interrupt handle of the run it saw.
    #[derive(Default)]
    struct KeepHandle(Option<crate::InterruptHandle>);

    impl crate::ResultSink for KeepHandle {
        fn started(&mut self, interrupt: crate::InterruptHandle) {
            self.0 = Some(interrupt);
        }
        fn schema(&mut self, _: arrow::datatypes::SchemaRef) -> crate::Flow {
            crate::Flow::Continue
        }
        fn batch(&mut self, _: arrow::record_batch::RecordBatch) -> crate::Flow {
            crate::Flow::Continue
        }
    }

    /// Interrupts its run as soon as it is handed the handle: before the gate has parsed the
    /// statement, long before the execution starts.
    struct InterruptAtOnce;

    impl crate::ResultSink for InterruptAtOnce {
        fn started(&mut self, interrupt: crate::InterruptHandle) {
            interrupt.interrupt();
        }
        fn schema(&mut self, _: arrow::datatypes::SchemaRef) -> crate::Flow {
            crate::Flow::Continue
        }
        fn batch(&mut self, _: arrow::record_batch::RecordBatch) -> crate::Flow {
            crate::Flow::Continue
        }
    }

    #[test]
    fn an_interrupt_before_the_execution_stops_the_query() {
        let data = tempfile::tempdir().expect("tempdir");
        let temp = tempfile::tempdir().expect("tempdir");
        let engine = Engine::open(&settings(data.path(), temp.path())).expect("open");
        let params = crate::Params::default();
        // Minutes of work if the interrupt were lost between the run's statements.
        let spec = QuerySpec {
            sql: "SELECT sum(a.range * b.range) FROM range(1000000) a, range(1000000) b",
            params: &params,
            max_rows: 10,
            explain: None,
        };
        let result = engine.run(&spec, &mut InterruptAtOnce);
        assert!(matches!(result, Err(QueryError::Interrupted)), "{result:?}");
        assert_eq!(
            run_sql(&engine, "SELECT 1").expect("the next query runs"),
            1
        );
    }

    #[test]
    fn an_interrupt_after_its_run_has_ended_never_reaches_the_next_query() {
        let data = tempfile::tempdir().expect("tempdir");
        let temp = tempfile::tempdir().expect("tempdir");
        let engine = Engine::open(&settings(data.path(), temp.path())).expect("open");
        let params = crate::Params::default();
        let spec = QuerySpec {
            sql: "SELECT 42",
            params: &params,
            max_rows: 10,
            explain: None,
        };
        let mut sink = KeepHandle::default();
        engine.run(&spec, &mut sink).expect("first run");
        assert_eq!(
            engine.idle_connections(),
            1,
            "its connection is back in the pool"
        );
        let stale = sink.0.expect("the run handed over its handle");
        // The same pooled connection runs the next query while the first one's deadline or
        // disconnect keeps firing: the next query is not interrupted.
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    stale.interrupt();
                    std::thread::yield_now();
                }
            });
            let next = run_sql(
                &engine,
                "SELECT sum(a.range * b.range) FROM range(3000) a, range(3000) b",
            );
            done.store(true, std::sync::atomic::Ordering::Release);
            assert_eq!(next.expect("not interrupted"), 1);
        });
    }

    #[test]
    fn a_pooled_connection_is_reusable_after_a_result_cut_short() {
        let data = tempfile::tempdir().expect("tempdir");
        let temp = tempfile::tempdir().expect("tempdir");
        let engine = Engine::open(&settings(data.path(), temp.path())).expect("open");
        let params = crate::Params::default();
        let run = |sql: &str, max_rows: u64, stop_after: Option<usize>| {
            let mut sink = Count {
                rows: 0,
                stop_after,
            };
            let spec = QuerySpec {
                sql,
                params: &params,
                max_rows,
                explain: None,
            };
            engine.run(&spec, &mut sink).map(|o| (o, sink.rows))
        };
        let big = "SELECT range FROM range(10000000)";
        // Truncated, stopped by its sink, and read to the end: each time the next statement on
        // the (single, pooled) connection runs, and the same statement again gives its answer.
        for _ in 0..3 {
            let (cut, _) = run(big, 10, None).expect("truncated");
            assert!(cut.truncated);
            let (stopped, _) = run(big, u64::MAX, Some(0)).expect("stopped");
            assert!(stopped.stopped);
            let (whole, rows) =
                run("SELECT range FROM range(5000)", u64::MAX, None).expect("whole");
            assert_eq!((whole.rows, rows), (5000, 5000));
        }
        assert_eq!(
            engine.idle_connections(),
            1,
            "one connection served every query"
        );
    }

    #[test]
    fn the_gate_accepts_queries_over_datasets() {
        let data = tempfile::tempdir().expect("tempdir");
        let temp = tempfile::tempdir().expect("tempdir");
        write_parquet(data.path(), "numbers");
        let engine = Engine::open(&settings(data.path(), temp.path())).expect("open");
        for (sql, rows) in [
            ("SELECT * FROM numbers", 10),
            ("FROM numbers WHERE id < 3", 3),
            ("TABLE numbers", 10),
            ("VALUES (1), (2)", 2),
            ("SELECT 1", 1),
            ("WITH t AS (SELECT * FROM numbers) SELECT * FROM t", 10),
            (
                "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 4) SELECT * FROM r",
                4,
            ),
            (
                "WITH a AS (SELECT 1 AS x), b AS (SELECT x FROM a) SELECT * FROM b",
                1,
            ),
            (
                "SELECT * FROM numbers WHERE id IN (SELECT id FROM numbers WHERE twice > 10)",
                4,
            ),
            ("SELECT count(*) FROM range(5)", 1),
            ("SELECT * FROM generate_series(1, 3)", 3),
            ("SELECT unnest([1, 2, 3])", 3),
            ("DESCRIBE numbers", 2),
            ("SUMMARIZE numbers", 2),
            ("DESCRIBE SELECT id FROM numbers", 1),
            ("SELECT now() IS NOT NULL", 1),
            ("PIVOT numbers ON id IN (1, 2) USING sum(twice)", 1),
            ("SELECT \"numbers\".id FROM main.numbers", 10),
        ] {
            assert_eq!(
                run_sql(&engine, sql).map_err(|e| e.to_string()),
                Ok(rows),
                "{sql}"
            );
        }
    }

    #[test]
    fn the_gate_refuses_writes_files_and_introspection() {
        use crate::Refusal;
        let data = tempfile::tempdir().expect("tempdir");
        let temp = tempfile::tempdir().expect("tempdir");
        write_parquet(data.path(), "numbers");
        let engine = Engine::open(&settings(data.path(), temp.path())).expect("open");
        let out = temp.path().join("out.csv");
        let out = out.display();
        type Expected = fn(&Refusal) -> bool;
        let cases: Vec<(String, Expected)> = vec![
            (format!("COPY numbers TO '{out}'"), |r| {
                matches!(r, Refusal::NotAQuery(_))
            }),
            ("SELECT 1; SELECT 2".into(), |r| {
                *r == Refusal::MultipleStatements(2)
            }),
            ("".into(), |r| *r == Refusal::Empty),
            (
                format!("WITH w AS (COPY numbers TO '{out}') SELECT * FROM w"),
                |r| *r == Refusal::Writes("COPY"),
            ),
            (
                "WITH w AS (DELETE FROM numbers RETURNING *) SELECT * FROM w".into(),
                |r| *r == Refusal::Writes("DELETE"),
            ),
            ("EXPLAIN SELECT 1".into(), |r| {
                matches!(r, Refusal::NotAQuery(_))
            }),
            (
                "SELECT * FROM read_text('/etc/passwd')".into(),
                |r| matches!(r, Refusal::Function { name, .. } if name == "read_text"),
            ),
            ("SELECT * FROM '/etc/passwd'".into(), |r| {
                matches!(r, Refusal::FileAccess(_))
            }),
            ("SELECT * FROM duckdb_settings()".into(), |r| {
                matches!(r, Refusal::Function { .. })
            }),
            ("SELECT * FROM information_schema.tables".into(), |r| {
                matches!(r, Refusal::Catalogue(_))
            }),
            ("SELECT current_setting('temp_directory')".into(), |r| {
                matches!(r, Refusal::Function { .. })
            }),
            (
                "SELECT setseed(0.1)".into(),
                |r| matches!(r, Refusal::Function { reason, .. } if reason.contains("state")),
            ),
            ("SHOW TABLES".into(), |r| matches!(r, Refusal::Catalogue(_))),
            ("SELECT * FROM nope".into(), |r| {
                matches!(r, Refusal::UnknownDataset { .. })
            }),
            (
                "WITH x AS (SELECT * FROM x) SELECT * FROM x".into(),
                |r| matches!(r, Refusal::UnknownDataset { name, .. } if name == "x"),
            ),
        ];
        for (sql, expected) in &cases {
            let refusal = refusal(&engine, sql);
            assert!(expected(&refusal), "{sql}: {refusal:?}");
        }
        assert!(!temp.path().join("out.csv").exists(), "nothing ran");
        // Refused statements left nothing on the pooled connection.
        assert_eq!(
            run_sql(&engine, "SELECT * FROM numbers").map_err(|e| e.to_string()),
            Ok(10)
        );
    }

    #[test]
    fn explain_runs_the_plan_of_an_accepted_query_only() {
        let data = tempfile::tempdir().expect("tempdir");
        let temp = tempfile::tempdir().expect("tempdir");
        write_parquet(data.path(), "numbers");
        let engine = Engine::open(&settings(data.path(), temp.path())).expect("open");
        let params = crate::Params::default();
        for explain in [crate::Explain::Plan, crate::Explain::Analyze] {
            let mut sink = Count {
                rows: 0,
                stop_after: None,
            };
            let spec = QuerySpec {
                sql: "SELECT sum(twice) FROM numbers",
                params: &params,
                max_rows: u64::MAX,
                explain: Some(explain),
            };
            engine.run(&spec, &mut sink).expect("explain");
            assert!(sink.rows >= 1, "{explain:?}");
            let refused = QuerySpec {
                sql: "SELECT * FROM read_text('/etc/passwd')",
                ..spec
            };
            assert!(matches!(
                engine.run(&refused, &mut sink),
                Err(QueryError::Refused(_))
            ));
        }
    }
}
