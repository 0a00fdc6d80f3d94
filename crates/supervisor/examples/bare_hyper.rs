//! The ceiling `/healthz` is measured against: N processes, each with its own `SO_REUSEPORT`
//! listener on one port, each a single-threaded tokio runtime serving hyper's HTTP/1.1 with
//! keep-alive, answering every request with the same small JSON body `/healthz` sends. No
//! router, no middleware, no accounting: what the hardware and hyper allow on these listeners.
//!
//! Usage: `bare_hyper [WORKERS] [PORT]` (default 4 processes, port 0 = any free one). Prints
//! `listening address=127.0.0.1:PORT` once every process has bound, then serves until killed
//! (the processes form one process group: `kill -- -PID` stops them all).
//! `scripts/bench_load.sh` starts it next to ferrocorn.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use socket2::{Domain, Socket, Type};

/// The environment variable that makes a process one of the serving children.
const CHILD: &str = "BARE_HYPER_CHILD_PORT";

fn listener(port: u16) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_port(true)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    socket.listen(2048)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn serve(listener: std::net::TcpListener) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|_: Request<hyper::body::Incoming>| async {
                    let mut response = Response::new(Full::new(Bytes::from_static(
                        br#"{"status":"ok","slot":0,"pid":1}"#,
                    )));
                    response.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(response)
                });
                let _ = http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

fn main() -> std::io::Result<()> {
    if let Some(port) = std::env::var_os(CHILD) {
        let port: u16 = port
            .to_string_lossy()
            .parse()
            .map_err(|_| std::io::Error::other("bad port"))?;
        let listener = listener(port)?;
        println!("bound");
        return serve(listener);
    }
    let mut args = std::env::args().skip(1);
    let workers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let mut port: u16 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    if port == 0 {
        // Learn a free port, then let it go: the children's listeners form the group.
        port = listener(0)?.local_addr()?.port();
    }
    let exe = std::env::current_exe()?;
    let mut children: Vec<Child> = (0..workers)
        .map(|_| {
            Command::new(&exe)
                .env(CHILD, port.to_string())
                .stdout(Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    // Ready once every child has bound its listener.
    for child in &mut children {
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        if line.trim() != "bound" {
            return Err(std::io::Error::other("a child could not bind"));
        }
    }
    println!("listening address=127.0.0.1:{port}");
    for mut child in children {
        child.wait()?;
    }
    Ok(())
}
