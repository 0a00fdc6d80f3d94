//! Running a query on the blocking pool and moving its encoded bytes to hyper.
//!
//! The query runs through the query core's one pipeline ([`Engine::run_encoded`]) and hands its
//! encoded chunks back through a small channel: a slow client slows the query down instead of
//! growing memory. The first MiB is buffered before the headers go out, so that an error up to
//! then is a problem document and a small result goes out whole with its length, row count and
//! truncation flag; a larger one streams, and ends with the same fields (and the full
//! `Server-Timing`) as HTTP trailers. After the first byte an error can never pass for a complete
//! result: NDJSON ends with an `{"error": …}` line, other formats abort the body.
//!
//! A query ends early when its deadline passes (DuckDB is interrupted: 504 `query_timeout`) or
//! when the client goes away (the response future or body is dropped: DuckDB is interrupted).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use ferrocorn_query_core::{
    ChunkSink, Encoded, Engine, Explain, Flow, Format, InterruptHandle, Params, QueryError,
    QuerySpec, Summary,
};
use ferrocorn_scoreboard::{PoolCounters, Scoreboard};
use http::{HeaderMap, HeaderValue, header};
use http_body_util::StreamBody;
use hyper::body::Frame;
use tokio::sync::mpsc;

use crate::admission::Permit;
use crate::compress::{Coding, Compressor};
use crate::problem::ApiError;

/// Bytes buffered before the response headers go out: a result that fits is sent with its
/// length and an exact `X-Result-Truncated` header.
const BUFFER_BEFORE_HEADERS: usize = 1 << 20;

/// What a query asks of the engine, owned (it moves to the blocking pool).
#[derive(Debug)]
pub struct Job {
    pub sql: String,
    pub params: Params,
    pub max_rows: u64,
    pub explain: Option<Explain>,
    pub format: Format,
    /// The response's content coding: the query thread compresses as it encodes.
    pub coding: Coding,
}

/// Chunks from the query thread to the response.
enum Chunk {
    Data(Vec<u8>),
    End { summary: Summary, encode: Duration },
    Failed(QueryError),
}

/// Cancels the query when dropped before it finished (client gone) and on deadline.
#[derive(Default)]
struct Cancel {
    handle: Mutex<Option<InterruptHandle>>,
    fired: AtomicBool,
    timed_out: AtomicBool,
    done: AtomicBool,
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancel")
            .field("fired", &self.fired)
            .field("timed_out", &self.timed_out)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Cancel {
    fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        if let Some(handle) = self
            .handle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            handle.interrupt();
        }
    }
}

/// What a query holds while it runs: its admission slot, its deadline timer and its
/// cancellation. Finishing it disarms the timer; dropping it unfinished (the response future or
/// body was dropped: the client went away) interrupts the query.
struct Running {
    cancel: Arc<Cancel>,
    timer: tokio::task::JoinHandle<()>,
    scoreboard: &'static Scoreboard,
    _permit: Permit,
}

impl Running {
    fn start(permit: Permit, deadline: Duration, scoreboard: &'static Scoreboard) -> Self {
        let cancel = Arc::new(Cancel::default());
        let timer = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(deadline).await;
                cancel.timed_out.store(true, Ordering::Release);
                cancel.fire();
            })
        };
        Self {
            cancel,
            timer,
            scoreboard,
            _permit: permit,
        }
    }

    /// The query is over: nothing is left to cancel.
    fn finish(self) {
        self.cancel.done.store(true, Ordering::Release);
    }

    /// The query succeeded after `queued`, `exec` and `encode`: into the pool's histograms.
    fn succeed(self, queued: Duration, exec: Duration, encode: Duration) {
        let [queue, execution, encoding] = self.scoreboard.query_histograms();
        queue.observe(queued);
        execution.observe(exec);
        encoding.observe(encode);
        self.finish();
    }

    /// The query failed: the error to answer (a timeout if the deadline interrupted it).
    fn fail(self, error: QueryError) -> ApiError {
        let answer = if matches!(error, QueryError::Interrupted)
            && self.cancel.timed_out.load(Ordering::Acquire)
        {
            ApiError::QueryTimeout
        } else {
            if matches!(error, QueryError::OutOfMemory(_)) {
                PoolCounters::add(&self.scoreboard.pool().memory_errors, 1);
            }
            ApiError::Query(error)
        };
        self.finish();
        answer
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.timer.abort();
        if !self.cancel.done.load(Ordering::Acquire) {
            self.cancel.fire();
        }
    }
}

/// The [`ChunkSink`] of a query thread: chunks into the channel, the interrupt handle into the
/// query's [`Cancel`].
struct ChannelSink {
    tx: mpsc::Sender<Chunk>,
    cancel: Arc<Cancel>,
    /// Compresses the encoded bytes, when the response has a content coding.
    compressor: Option<Compressor>,
}

impl Drop for ChannelSink {
    /// The query thread is done with the query: nothing is left to interrupt.
    fn drop(&mut self) {
        self.cancel.done.store(true, Ordering::Release);
    }
}

impl ChannelSink {
    fn send(&self, chunk: Chunk) -> Flow {
        match self.tx.blocking_send(chunk) {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop,
        }
    }
}

impl ChunkSink for ChannelSink {
    fn started(&mut self, interrupt: InterruptHandle) {
        let mut slot = self.cancel.handle.lock().unwrap_or_else(|e| e.into_inner());
        if self.cancel.fired.load(Ordering::Acquire) {
            interrupt.interrupt();
        }
        *slot = Some(interrupt);
    }

    fn chunk(&mut self, bytes: Vec<u8>) -> Flow {
        let Some(compressor) = &mut self.compressor else {
            return self.send(Chunk::Data(bytes));
        };
        match compressor.push(&bytes) {
            Ok(compressed) if compressed.is_empty() => Flow::Continue,
            Ok(compressed) => self.send(Chunk::Data(compressed)),
            Err(e) => {
                tracing::warn!(error = %e, "compressing a result failed");
                Flow::Stop
            }
        }
    }
}

impl ChannelSink {
    /// The end of a successful result: the compressor's last bytes, then `end`.
    fn end(&mut self, end: Chunk) {
        if let Some(compressor) = self.compressor.take() {
            match compressor.finish() {
                Ok(rest) if rest.is_empty() => {}
                Ok(rest) => {
                    if self.send(Chunk::Data(rest)) == Flow::Stop {
                        return;
                    }
                }
                Err(e) => {
                    let _ = self.send(Chunk::Failed(QueryError::from_message(format!(
                        "compressing the result failed: {e}"
                    ))));
                    return;
                }
            }
        }
        let _ = self.send(end);
    }
}

/// A result that fit the first buffer, whole.
#[derive(Debug)]
pub struct Whole {
    pub summary: Summary,
    pub body: Bytes,
    /// How long DuckDB and the encoder took.
    pub took: Duration,
}

/// Run `job` with its admission `permit`, stopped at `deadline`; `queued` is how long it waited.
/// Answers the response to send: `headers` plus the result's own, with the whole result or a
/// streamed body. `on_whole` sees a result that fit the first buffer (to cache it).
#[allow(clippy::too_many_arguments)]
pub async fn respond(
    engine: Arc<Engine>,
    scoreboard: &'static Scoreboard,
    job: Job,
    permit: Permit,
    deadline: Duration,
    queued: Duration,
    mut headers: HeaderMap,
    on_whole: impl FnOnce(&Whole),
) -> Result<(HeaderMap, Body), ApiError> {
    let running = Running::start(permit, deadline, scoreboard);
    let (tx, mut rx) = mpsc::channel::<Chunk>(4);
    // An error line can end a plain NDJSON stream; a compressed one can only be cut short.
    let error_line = job.format == Format::Ndjson && job.coding == Coding::Identity;
    let exec_started = Instant::now();
    {
        let cancel = running.cancel.clone();
        tokio::task::spawn_blocking(move || {
            let mut sink = ChannelSink {
                tx,
                cancel,
                compressor: job.coding.compressor(),
            };
            let spec = QuerySpec {
                sql: &job.sql,
                params: &job.params,
                max_rows: job.max_rows,
                explain: job.explain,
            };
            match engine.run_encoded(&spec, job.format, &mut sink) {
                Ok(Encoded { stopped: true, .. }) => {}
                Ok(Encoded {
                    summary, encode, ..
                }) => sink.end(Chunk::End { summary, encode }),
                Err(e) => {
                    let _ = sink.send(Chunk::Failed(e));
                }
            }
        });
    }

    // Buffer the start of the result: errors before the first byte become problem documents,
    // and a small result goes out whole, with its length and truncation flag in the headers.
    let mut buffered: Vec<u8> = Vec::new();
    let mut end = None;
    while buffered.len() < BUFFER_BEFORE_HEADERS {
        match rx.recv().await {
            Some(Chunk::Data(bytes)) => buffered.extend_from_slice(&bytes),
            Some(Chunk::End { summary, encode }) => {
                end = Some((summary, encode));
                break;
            }
            Some(Chunk::Failed(e)) => return Err(running.fail(e)),
            None => return Err(running.fail(QueryError::Interrupted)),
        }
    }

    if let Some((summary, encode)) = end {
        let exec = exec_started.elapsed().saturating_sub(encode);
        running.succeed(queued, exec, encode);
        insert_result_headers(&mut headers, summary, queued, exec, encode);
        let whole = Whole {
            summary,
            body: Bytes::from(buffered),
            took: exec_started.elapsed(),
        };
        on_whole(&whole);
        return Ok((headers, Body::from(whole.body)));
    }

    // Stream the rest: the running query (its slot, deadline and cancellation) travels with the
    // body and ends with its last item.
    let timing = format!("queue;dur={:.1}", queued.as_secs_f64() * 1000.0);
    if let Ok(value) = HeaderValue::from_str(&timing) {
        headers.insert("server-timing", value);
    }
    // Clients that send `TE: trailers` get the row count, the truncation flag and the full
    // timing at the end.
    headers.insert(
        header::TRAILER,
        HeaderValue::from_static("x-result-truncated, x-result-rows, server-timing"),
    );
    let first = Some(Bytes::from(buffered));
    let stream = futures_util::stream::unfold(
        (rx, first, Some(running)),
        move |(mut rx, mut first, running)| async move {
            type Item = Result<Frame<Bytes>, std::io::Error>;
            if let Some(bytes) = first.take() {
                return Some((
                    Ok::<_, std::io::Error>(Frame::data(bytes)),
                    (rx, None, running),
                ));
            }
            let running = running?;
            let item: Item = match rx.recv().await {
                Some(Chunk::Data(bytes)) => {
                    let frame = Frame::data(Bytes::from(bytes));
                    return Some((Ok(frame), (rx, None, Some(running))));
                }
                Some(Chunk::End { summary, encode }) => {
                    let exec = exec_started.elapsed().saturating_sub(encode);
                    running.succeed(queued, exec, encode);
                    let mut trailers = HeaderMap::new();
                    insert_result_headers(&mut trailers, summary, queued, exec, encode);
                    Ok(Frame::trailers(trailers))
                }
                Some(Chunk::Failed(e)) => {
                    let problem = running.fail(e);
                    tracing::warn!(error = %problem, "query failed after the response started");
                    if error_line {
                        Ok(Frame::data(Bytes::from(problem.ndjson_line())))
                    } else {
                        Err(std::io::Error::other(problem.to_string()))
                    }
                }
                None => {
                    running.finish();
                    Err(std::io::Error::other("query ended early"))
                }
            };
            Some((item, (rx, None, None)))
        },
    );
    Ok((headers, Body::new(StreamBody::new(stream))))
}

/// The result's own headers (or trailers): row count, truncation flag, `Server-Timing`.
pub fn insert_result_headers(
    headers: &mut HeaderMap,
    summary: Summary,
    queued: Duration,
    exec: Duration,
    encode: Duration,
) {
    headers.insert(
        "x-result-truncated",
        HeaderValue::from_static(if summary.truncated { "true" } else { "false" }),
    );
    headers.insert("x-result-rows", HeaderValue::from(summary.rows));
    let timing = format!(
        "queue;dur={:.1}, exec;dur={:.1}, encode;dur={:.1}",
        queued.as_secs_f64() * 1000.0,
        exec.as_secs_f64() * 1000.0,
        encode.as_secs_f64() * 1000.0
    );
    if let Ok(value) = HeaderValue::from_str(&timing) {
        headers.insert("server-timing", value);
    }
}
