//! The worker's lifecycle and its accept loop.
//!
//! A worker goes through the states of its scoreboard record ([`RecordState`]) in order: it boots
//! (runtime, heartbeat, DuckDB), becomes ready (publishes it and starts accepting), drains when
//! told (SIGTERM), and exits. Each transition is logged with the slot and pid and published in
//! the scoreboard (the master reaps the record once the worker has exited).
//!
//! Connections: each listener has an accept task; a semaphore of `worker_connections` permits caps
//! the connections served at once (the rest wait in the kernel's queue). Per-connection errors are
//! skipped; running out of file descriptors backs off instead of spinning. Draining stops the
//! accept tasks after they have taken what the kernel already queued (so a slot being removed does
//! not reset it), marks every further response `Connection: close`, and waits for the connections
//! to finish: in-flight requests complete, idle keep-alive connections close at their keep-alive
//! deadline, and `graceful_timeout` bounds the whole.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ferrocorn_query_core::{Engine, Instance};
use futures_util::future::Either;
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, Semaphore, watch};
use tower::ServiceExt;

use crate::access_log::AccessLog;
use crate::http::{PeerAddr, fast_health, router};
use crate::settings::{Listener, WorkerArgs, WorkerSettings};
use crate::state::{AppState, StateParts, refresh_catalog};
use ferrocorn_query_core::error::chain as error_chain;
use ferrocorn_scoreboard::{RecordState, WorkerRecord, monotonic_ms};

/// Exit code of a worker that could not boot (Gunicorn's `WORKER_BOOT_ERROR`).
pub const EXIT_BOOT_FAILED: i32 = 3;

/// Publishes a worker's transitions.
struct Phase<'a> {
    slot: usize,
    pid: u32,
    record: &'a WorkerRecord,
}

impl Phase<'_> {
    fn enter(&self, state: RecordState) {
        tracing::info!(slot = self.slot, pid = self.pid, phase = ?state, "worker phase");
        self.record.set_state(state);
    }

    /// The last transition: the record stays as it was (draining) until the master reaps it.
    fn exited(&self) {
        tracing::info!(
            slot = self.slot,
            pid = self.pid,
            phase = "Exited",
            "worker phase"
        );
    }
}

/// Run a worker to completion; returns its exit code. Called in the child right after the fork.
pub fn run(mut args: WorkerArgs) -> i32 {
    let early_failure = |args: WorkerArgs, reason: String| {
        tracing::error!(
            slot = args.slot,
            pid = std::process::id(),
            reason,
            "worker failed to boot"
        );
        args.record.set_message(&reason);
        args.record.set_state(RecordState::BootFailed);
        let _ = (&std::fs::File::from(args.notify)).write(&[1]);
        EXIT_BOOT_FAILED
    };
    #[cfg(feature = "test-hooks")]
    if let Some(reason) = std::env::var_os(FAIL_BOOT_FOR_TESTS) {
        return early_failure(args, reason.to_string_lossy().into_owned());
    }
    // DuckDB's instance, then the kernel's sandbox, while this process has one thread (see
    // `crate::sandbox`).
    let instance = match Instance::open(&args.engine) {
        Ok(instance) => instance,
        Err(e) => return early_failure(args, error_chain(&e)),
    };
    // The users file is read before the sandbox closes the file system (it may live anywhere).
    let auth = crate::auth::Auth::new(&args.settings.auth);
    if args.settings.auth.required {
        // Production: error bodies name no directory of the server (as configured, or as the
        // kernel resolves it).
        let engine = &args.engine;
        let mut directories = Vec::new();
        let mut add = |path: &std::path::Path, placeholder: &'static str| {
            directories.push((path.display().to_string(), placeholder));
            if let Ok(real) = path.canonicalize() {
                directories.push((real.display().to_string(), placeholder));
            }
        };
        add(&engine.data_dir, "<data_dir>");
        add(&engine.temp_dir, "<temp_dir>");
        if let Some(snapshots) = &engine.storage.snapshot_dir {
            add(snapshots, "<snapshots>");
        }
        crate::problem::redact_paths(directories);
    }
    let paths = sandbox_paths(&args);
    let sandbox = match crate::sandbox::restrict(&paths, args.settings.sandbox) {
        Ok(status) => status,
        Err(e) => return early_failure(args, error_chain(&e)),
    };
    match &sandbox {
        crate::sandbox::SandboxStatus::DuckDbOnly { reason } => tracing::warn!(
            slot = args.slot,
            pid = std::process::id(),
            reason,
            "no kernel sandbox: only DuckDB's settings confine queries"
        ),
        kernel => tracing::info!(
            slot = args.slot,
            pid = std::process::id(),
            sandbox = %kernel.describe(),
            "worker sandboxed"
        ),
    }
    args.engine.sandbox_probe = Some(paths.probe);
    #[cfg(feature = "test-hooks")]
    {
        args.engine.unlocked_for_tests = std::env::var_os(UNLOCK_FOR_TESTS).is_some();
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("ferrocorn-worker")
        // Enough for DuckDB calls (each holds a blocking thread for its duration) without
        // unbounded growth.
        .max_blocking_threads(64)
        // DuckDB's parser and the gate's walk of its parse tree recurse with the nesting of a
        // statement.
        .thread_stack_size(BLOCKING_STACK)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            args.record
                .set_message(&format!("cannot build the tokio runtime: {e}"));
            args.record.set_state(RecordState::BootFailed);
            return EXIT_BOOT_FAILED;
        }
    };
    runtime.block_on(serve(args, instance, sandbox, auth))
}

/// Stack of the threads that call DuckDB.
const BLOCKING_STACK: usize = 16 << 20;

/// Test builds only: with this variable set, the worker's DuckDB runs without its own sandbox and
/// without the statement gate, so a test can show what the kernel's sandbox alone stops.
#[cfg(feature = "test-hooks")]
pub const UNLOCK_FOR_TESTS: &str = "FERROCORN_TEST_UNLOCK_DUCKDB";

/// Test builds only: with this variable set, every worker fails to boot with its value as the
/// reason (how the master handles a pool that cannot boot is tested with it).
#[cfg(feature = "test-hooks")]
pub const FAIL_BOOT_FOR_TESTS: &str = "FERROCORN_TEST_FAIL_BOOT";

/// The probe file of a worker whose spill directory is `spill_dir` (see [`crate::sandbox`]): next
/// to it, outside every directory the worker may use. The master removes both when it reaps the
/// worker.
pub fn sandbox_probe(spill_dir: &std::path::Path) -> std::path::PathBuf {
    let mut name = spill_dir.as_os_str().to_owned();
    name.push(".probe");
    name.into()
}

fn sandbox_paths(args: &WorkerArgs) -> crate::sandbox::SandboxPaths {
    let engine = &args.engine;
    let mut writable = vec![engine.temp_dir.clone()];
    writable.extend(engine.storage.snapshot_dir.clone());
    writable.extend(args.settings.result_cache.as_ref().map(|c| c.dir.clone()));
    crate::sandbox::SandboxPaths {
        data_dir: engine.data_dir.clone(),
        writable,
        log_files: args.settings.log_files.clone(),
        probe: sandbox_probe(&engine.temp_dir),
    }
}

async fn serve(
    args: WorkerArgs,
    instance: Instance,
    sandbox: crate::sandbox::SandboxStatus,
    auth: crate::auth::Auth,
) -> i32 {
    let WorkerArgs {
        slot,
        listeners,
        record,
        scoreboard,
        notify,
        settings,
        engine: engine_settings,
        reopen_logs,
    } = args;
    let pid = std::process::id();
    record.set_pid(pid as i32);
    let phase = Phase { slot, pid, record };
    phase.enter(RecordState::Booting);
    let notify = Arc::new(std::fs::File::from(notify));
    let wake_master = {
        let notify = notify.clone();
        move || {
            // A full pipe already means "look at the scoreboard"; nothing is lost.
            let _ = (&*notify).write(&[1]);
        }
    };

    // Signals first, so that a TERM during boot drains instead of killing mid-write.
    let (Ok(mut term), Ok(mut quit), Ok(mut int), Ok(mut usr1)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::quit()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined1()),
    ) else {
        return boot_failed(record, "cannot install signal handlers", &wake_master);
    };

    let heartbeat = tokio::spawn(heartbeat(record, settings.heartbeat_interval));

    let engine = match tokio::task::spawn_blocking(move || {
        Engine::start(&engine_settings, instance)
    })
    .await
    {
        Ok(Ok(engine)) => Arc::new(engine),
        Ok(Err(e)) => return boot_failed(record, &error_chain(&e), &wake_master),
        Err(e) => return boot_failed(record, &format!("DuckDB open panicked: {e}"), &wake_master),
    };
    // Warm before ready: the master promotes this worker only once its indexes and first blocks
    // are loaded, so the first requests it takes are as fast as its predecessor's last.
    let warming = engine.clone();
    let started = std::time::Instant::now();
    let warmed = tokio::task::spawn_blocking(move || warming.warm_up())
        .await
        .unwrap_or_default();
    for failed in warmed.iter().filter(|w| w.error.is_some()) {
        tracing::warn!(
            slot,
            pid,
            dataset = %failed.dataset,
            error = %failed.error.as_ref().map(ToString::to_string).unwrap_or_default(),
            "warm-up query failed; serving anyway"
        );
    }
    tracing::info!(
        slot,
        pid,
        datasets = warmed.len(),
        queries = warmed.iter().map(|w| w.queries).sum::<usize>(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "worker warmed"
    );
    let mut tokio_listeners = Vec::with_capacity(listeners.len());
    for listener in listeners {
        match into_tokio(listener) {
            Ok(l) => tokio_listeners.push(l),
            Err(e) => {
                return boot_failed(
                    record,
                    &format!("cannot use inherited listener: {e}"),
                    &wake_master,
                );
            }
        }
    }

    let access_log = match settings
        .accesslog
        .clone()
        .map(|target| {
            AccessLog::open(
                target,
                settings.log_format,
                settings.access_log_format.as_deref(),
            )
        })
        .transpose()
    {
        Ok(log) => log,
        Err(e) => {
            return boot_failed(
                record,
                &format!("cannot open the access log: {e}"),
                &wake_master,
            );
        }
    };
    let state = Arc::new(AppState::new(StateParts {
        slot,
        engine: engine.clone(),
        record,
        scoreboard,
        settings: settings.clone(),
        on_budget_spent: Box::new(wake_master.clone()),
        access_log,
        sandbox,
        auth,
    }));
    let connections = Arc::new(Connections::new(state.record));
    let cap = Arc::new(Semaphore::new(settings.worker_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let app = match router(state.clone()) {
        Ok(app) => app,
        Err(e) => {
            return boot_failed(
                record,
                &format!("cannot serialise the API contract: {e}"),
                &wake_master,
            );
        }
    };
    let mut accept_tasks = Vec::new();
    for listener in tokio_listeners {
        accept_tasks.push(tokio::spawn(accept_loop(
            listener,
            app.clone(),
            state.clone(),
            cap.clone(),
            connections.clone(),
            stop_rx.clone(),
        )));
    }
    // Requests rescan the data directory when they need to; this also does it when none come,
    // so that a changed dataset's snapshot is rebuilt (and a finished one attached) even on an
    // idle pool, before the first request after a data load.
    let rescan = tokio::spawn(rescan(state.clone()));
    let memory = tokio::spawn(sample_duckdb_memory(engine.clone(), record));
    phase.enter(RecordState::Ready);
    wake_master();

    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = quit.recv() => return quick_exit(&phase),
            _ = int.recv() => return quick_exit(&phase),
            _ = usr1.recv() => {
                reopen_logs();
                if let Some(log) = &state.access_log {
                    log.reopen();
                }
                tracing::info!(slot, pid, "worker reopened log files");
            }
        }
    }

    phase.enter(RecordState::Draining);
    state.draining.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for task in accept_tasks {
        let _ = task.await;
    }
    let drained = tokio::select! {
        _ = connections.all_closed() => true,
        _ = tokio::time::sleep(settings.graceful_timeout) => false,
        _ = quit.recv() => false,
        _ = int.recv() => false,
    };
    if !drained {
        tracing::warn!(
            slot,
            pid,
            open = connections.open(),
            "worker drain cut short"
        );
    }
    heartbeat.abort();
    rescan.abort();
    memory.abort();
    phase.exited();
    0
}

fn boot_failed(record: &WorkerRecord, reason: &str, wake_master: &impl Fn()) -> i32 {
    tracing::error!(pid = std::process::id(), reason, "worker failed to boot");
    record.set_message(reason);
    record.set_state(RecordState::BootFailed);
    wake_master();
    EXIT_BOOT_FAILED
}

fn quick_exit(phase: &Phase<'_>) -> i32 {
    phase.exited();
    0
}

async fn heartbeat(record: &'static WorkerRecord, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        record.beat(monotonic_ms());
    }
}

/// How often a worker measures DuckDB's memory for `/metrics`.
const MEMORY_SAMPLE: Duration = Duration::from_secs(2);

/// Publish DuckDB's memory in use in the worker's record, off the event loop.
async fn sample_duckdb_memory(engine: Arc<Engine>, record: &'static WorkerRecord) {
    let mut ticker = tokio::time::interval(MEMORY_SAMPLE);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let engine = engine.clone();
        if let Ok(Ok(bytes)) = tokio::task::spawn_blocking(move || engine.memory_in_use()).await {
            record.set_duckdb_bytes(bytes);
        }
    }
}

/// How often an idle worker rescans the data directory (a busy one does it at most every
/// [`crate::http::RESCAN_INTERVAL`], on requests).
const IDLE_RESCAN: Duration = Duration::from_secs(2);

async fn rescan(state: Arc<AppState>) {
    let mut ticker = tokio::time::interval(IDLE_RESCAN);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        refresh_catalog(&state).await;
    }
}

enum TokioListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

fn into_tokio(listener: Listener) -> std::io::Result<TokioListener> {
    Ok(match listener {
        Listener::Tcp(l) => {
            l.set_nonblocking(true)?;
            TokioListener::Tcp(TcpListener::from_std(l)?)
        }
        Listener::Unix(l) => {
            l.set_nonblocking(true)?;
            TokioListener::Unix(UnixListener::from_std(l)?)
        }
    })
}

/// Counts open connections in the worker's record (which `/metrics` reads) and wakes the drain
/// when the last one closes.
#[derive(Debug)]
struct Connections {
    closed: Notify,
    record: &'static WorkerRecord,
}

impl Connections {
    fn new(record: &'static WorkerRecord) -> Self {
        Self {
            closed: Notify::new(),
            record,
        }
    }

    fn open(&self) -> u32 {
        self.record.connections()
    }

    fn track(self: &Arc<Self>) -> ConnectionGuard {
        self.record.connection_opened();
        ConnectionGuard(self.clone())
    }

    async fn all_closed(&self) {
        loop {
            let notified = self.closed.notified();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

struct ConnectionGuard(Arc<Connections>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.record.connection_closed() == 0 {
            self.0.closed.notify_waiters();
        }
    }
}

async fn accept_loop(
    listener: TokioListener,
    app: axum::Router,
    state: Arc<AppState>,
    cap: Arc<Semaphore>,
    connections: Arc<Connections>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let permit = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            permit = cap.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            accepted = accept(&listener) => accepted,
        };
        match accepted {
            Ok(stream) => {
                let guard = connections.track();
                tokio::spawn(serve_connection(
                    stream,
                    app.clone(),
                    state.clone(),
                    (permit, guard),
                ));
            }
            Err(e) => {
                if is_fd_exhaustion(&e) {
                    tracing::warn!(slot = state.slot, error = %e, "accept: out of file descriptors; backing off");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                } else {
                    tracing::debug!(slot = state.slot, error = %e, "accept error");
                }
            }
        }
    }
    // Take what the kernel has already queued for this listener, so that closing it (a removed
    // slot, or a stop, whose master has let go of its own copy) resets nothing, and close it the
    // moment the queue is empty: a client whose handshake completes between the last accept and
    // the close is the only one a close can reset, so nothing stands between the two.
    match listener.into_std() {
        Ok(QueuedListener::Tcp(l)) => drain_queue(
            || l.accept(),
            |(stream, _)| {
                // Accepted sockets do not inherit the listener's non-blocking mode.
                stream.set_nonblocking(true)?;
                let _ = stream.set_nodelay(true);
                tokio::net::TcpStream::from_std(stream).map(Stream::Tcp)
            },
            |stream| {
                let guard = connections.track();
                tokio::spawn(serve_connection(stream, app.clone(), state.clone(), guard));
            },
        ),
        Ok(QueuedListener::Unix(l)) => drain_queue(
            || l.accept(),
            |(stream, _)| {
                stream.set_nonblocking(true)?;
                tokio::net::UnixStream::from_std(stream).map(Stream::Unix)
            },
            |stream| {
                let guard = connections.track();
                tokio::spawn(serve_connection(stream, app.clone(), state.clone(), guard));
            },
        ),
        Err(e) => {
            tracing::warn!(slot = state.slot, error = %e, "cannot take the queued connections")
        }
    }
}

/// Accept until the queue is empty (`WouldBlock`), handing each connection to `serve`. A
/// connection that died in the queue is skipped; any other error (out of descriptors, say)
/// ends the loop rather than spin.
fn drain_queue<A, S>(
    mut accept: impl FnMut() -> std::io::Result<A>,
    into_stream: impl Fn(A) -> std::io::Result<S>,
    mut serve: impl FnMut(S),
) {
    loop {
        match accept() {
            Ok(accepted) => {
                if let Ok(stream) = into_stream(accepted) {
                    serve(stream);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

/// A listener out of tokio's reactor, non-blocking, for the last accepts before it closes.
enum QueuedListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl TokioListener {
    fn into_std(self) -> std::io::Result<QueuedListener> {
        Ok(match self {
            Self::Tcp(l) => QueuedListener::Tcp(l.into_std()?),
            Self::Unix(l) => QueuedListener::Unix(l.into_std()?),
        })
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &TokioListener) -> std::io::Result<Stream> {
    Ok(match listener {
        TokioListener::Tcp(l) => {
            let (stream, _) = l.accept().await?;
            let _ = stream.set_nodelay(true);
            Stream::Tcp(stream)
        }
        TokioListener::Unix(l) => Stream::Unix(l.accept().await?.0),
    })
}

fn is_fd_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == nix::libc::EMFILE || code == nix::libc::ENFILE
            || code == nix::libc::ENOBUFS || code == nix::libc::ENOMEM
    )
}

fn http1(settings: &WorkerSettings) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    let header_timeout = if settings.keepalive.is_zero() {
        DEFAULT_HEADER_TIMEOUT
    } else {
        settings.keepalive
    };
    builder
        .timer(TokioTimer::new())
        .keep_alive(!settings.keepalive.is_zero())
        // Starts when the connection waits for a request head (new or idle), so it is both the
        // keep-alive idle timeout and the slow-loris bound.
        .header_read_timeout(header_timeout)
        .max_headers(settings.limit_request_fields)
        .max_buf_size((settings.limit_request_line + 64 * 1024).max(8192));
    builder
}

/// Header timeout when keep-alive is off (there is then no idle wait to bound).
const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

async fn serve_connection<G: Send + 'static>(
    stream: Stream,
    app: axum::Router,
    state: Arc<AppState>,
    guard: G,
) {
    let builder = http1(&state.settings);
    // The peer's address: the access log's and the rate limits' client (unless a trusted proxy
    // names another).
    let peer = match &stream {
        Stream::Tcp(s) => s.peer_addr().ok().map(|a| PeerAddr(a.ip())),
        Stream::Unix(_) => None,
    };
    let slot = state.slot;
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        if let Some(peer) = peer {
            request.extensions_mut().insert(peer);
        }
        match fast_health(&state, &request) {
            Some(response) => Either::Left(std::future::ready(Ok(response))),
            None => Either::Right(app.clone().oneshot(request)),
        }
    });
    let result = match stream {
        Stream::Tcp(s) => builder.serve_connection(TokioIo::new(s), service).await,
        Stream::Unix(s) => builder.serve_connection(TokioIo::new(s), service).await,
    };
    if let Err(e) = result {
        tracing::debug!(slot, error = %e, "connection ended with an error");
    }
    drop(guard);
}
