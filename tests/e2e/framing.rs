//! HTTP/1.1 framing against the real binary (RFC 9112): a corpus of malformed and edge-case
//! requests sent as raw bytes, each with the answer the RFC calls for, and idle slow-loris
//! connections that neither starve the health probe nor stay open past the header timeout.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::support::{Response, Setup, get, poll_until, read_body, read_head};

/// How long any read of an answer may wait: a case that hangs fails instead of blocking.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// In a case's statuses: the server closes the connection without answering.
const CLOSED: u16 = 0;

/// The query every body carries; a 200 from `/v1/query` must answer 42, which shows the body
/// was framed as the case intends.
const QUERY: &str = r#"{"sql":"SELECT 42 AS answer"}"#;

/// A request that follows a case's bytes on the same connection: it must never be answered
/// when the case is one the server must close after (a smuggled request).
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

/// What the connection does after the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    /// Either way.
    Any,
    /// It stays usable: a next request on it is answered 200, so the case's bytes were consumed
    /// exactly.
    Serves,
    /// The server closes it, and nothing sent after the case's request is answered.
    Closes,
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    /// The acceptable statuses ([`CLOSED`]: no answer, the connection closed).
    statuses: &'static [u16],
    after: After,
    /// The problem `code` of the answer, when the server's own front line gives it.
    code: Option<&'static str>,
    /// The client closes its sending side after the bytes (a truncated request).
    eof: bool,
    /// Requests the bytes hold (pipelined), each answered with one of the statuses.
    requests: usize,
}

fn case(name: &'static str, bytes: impl Into<Vec<u8>>, statuses: &'static [u16]) -> Case {
    Case {
        name,
        bytes: bytes.into(),
        statuses,
        after: After::Any,
        code: None,
        eof: false,
        requests: 1,
    }
}

impl Case {
    fn serves(mut self) -> Self {
        self.after = After::Serves;
        self
    }

    fn closes(mut self) -> Self {
        self.after = After::Closes;
        self
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn eof(mut self) -> Self {
        self.eof = true;
        self
    }

    fn pipelined(mut self, requests: usize) -> Self {
        self.requests = requests;
        self
    }
}

/// `GET /healthz` with these header lines (each ending in CRLF) and version.
fn health(version: &str, fields: &str) -> String {
    format!("GET /healthz {version}\r\n{fields}\r\n")
}

/// `POST /v1/query` with these header lines (each ending in CRLF) and this body.
fn post(fields: &str, body: &str) -> String {
    format!(
        "POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{fields}\r\n{body}"
    )
}

/// [`QUERY`] framed by its `Content-Length`.
fn post_sized(extra_fields: &str) -> String {
    post(
        &format!("Content-Length: {}\r\n{extra_fields}", QUERY.len()),
        QUERY,
    )
}

/// [`QUERY`] as one chunk with `size_suffix` after its size, and the last chunk.
fn chunks(size_suffix: &str) -> String {
    format!("{:x}{size_suffix}\r\n{QUERY}\r\n0\r\n\r\n", QUERY.len())
}

/// The corpus. Each status set is what RFC 9112 (and RFC 9110 where named) allows; where the
/// RFC leaves a choice, the comment says which one the server makes.
fn corpus() -> Vec<Case> {
    let te = "Transfer-Encoding: chunked\r\n";
    vec![
        // --- Request line (RFC 9112 §3) -----------------------------------------------------
        case("baseline", health("HTTP/1.1", "Host: x\r\n"), &[200]).serves(),
        // §2.2: a server SHOULD ignore at least one empty line before the request line.
        case(
            "empty line before the request line",
            format!("\r\n{}", health("HTTP/1.1", "Host: x\r\n")),
            &[200],
        )
        .serves(),
        // §3: one SP between the parts; the RFC lets a server split on any whitespace, this
        // one is strict.
        case(
            "two spaces after the method",
            "GET  /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            &[400],
        ),
        case(
            "tabs between the parts",
            "GET\t/healthz\tHTTP/1.1\r\nHost: x\r\n\r\n",
            &[400],
        ),
        case(
            "space after the version",
            "GET /healthz HTTP/1.1 \r\nHost: x\r\n\r\n",
            &[400],
        ),
        case("no version (HTTP/0.9)", "GET /healthz\r\n\r\n", &[400]),
        case("no target", "GET HTTP/1.1\r\nHost: x\r\n\r\n", &[400]),
        // §2.3: the protocol name is case-sensitive.
        case(
            "lowercase protocol name",
            health("http/1.1", "Host: x\r\n"),
            &[400],
        ),
        case("version without minor", health("HTTP/1", "Host: x\r\n"), &[400]),
        case("two-digit minor", health("HTTP/1.10", "Host: x\r\n"), &[400]),
        // RFC 9110 §2.5 suggests serving a higher minor version as 1.1; hyper refuses a version
        // that does not exist (400), the strict reading.
        case(
            "HTTP/1.2",
            health("HTTP/1.2", "Host: x\r\n"),
            &[200, 400, 505],
        ),
        // 505 would be the precise answer; hyper's parser says 400.
        case(
            "HTTP/2.0 in an HTTP/1 request line",
            health("HTTP/2.0", "Host: x\r\n"),
            &[400, 505],
        ),
        // An HTTP/2 prior-knowledge preface on an HTTP/1-only server: hyper closes at once.
        case(
            "HTTP/2 connection preface",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            &[CLOSED, 400, 505],
        ),
        // RFC 9110 §9.1: methods are case-sensitive, so `get` is an unknown method. §15.6.2
        // suggests 501 for one; the router answers 405 (not a method of this resource).
        case(
            "lowercase method",
            "get /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            &[405, 501],
        ),
        case(
            "unknown method",
            "BREW /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            &[405, 501],
        ),
        case(
            "method with a non-token character",
            "GE(T /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            &[400],
        ),
        case(
            "empty method",
            " /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            &[400],
        ),
        case(
            "HEAD",
            "HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            &[200],
        )
        .serves(),
        // §3.2: the target is a URI reference without spaces, controls or raw non-ASCII.
        case(
            "space in the target",
            "GET /health z HTTP/1.1\r\nHost: x\r\n\r\n",
            &[400],
        ),
        case(
            "NUL in the target",
            "GET /health\0z HTTP/1.1\r\nHost: x\r\n\r\n",
            &[400],
        ),
        case(
            "raw non-ASCII in the target",
            &b"GET /h\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            &[400],
        )
        .code("invalid_target"),
        // §3.2.1: absolute-form is legal, and its authority wins over Host (§3.2.2).
        case(
            "absolute-form",
            "GET http://x/healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            &[200],
        )
        .serves(),
        case(
            "absolute-form whose Host differs",
            "GET http://example.com/healthz HTTP/1.1\r\nHost: other.example\r\n\r\n",
            &[200],
        )
        .serves(),
        // §3.2: the Host rule holds for absolute-form too.
        case(
            "absolute-form without Host",
            "GET http://x/healthz HTTP/1.1\r\n\r\n",
            &[400],
        )
        .code("invalid_host"),
        // RFC 9110 §4.2.4: userinfo in an http(s) URI is treated as an error.
        case(
            "absolute-form with userinfo",
            "GET http://user:pass@x/healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            &[400],
        )
        .code("invalid_target"),
        // §3.2.4: asterisk-form is OPTIONS only. The server implements no OPTIONS and answers
        // 404, as for any target it does not serve.
        case(
            "asterisk-form OPTIONS",
            "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            &[200, 204, 404, 405, 501],
        ),
        case(
            "asterisk-form with GET",
            "GET * HTTP/1.1\r\nHost: x\r\n\r\n",
            &[400],
        )
        .code("invalid_target"),
        // §3.2.3: authority-form is for CONNECT to a proxy; this server tunnels nothing and
        // answers 404 (never a 2xx, which would turn the connection into a tunnel).
        case(
            "authority-form CONNECT",
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            &[400, 404, 405, 501],
        ),
        case(
            "authority-form with GET",
            "GET example.com:80 HTTP/1.1\r\nHost: example.com\r\n\r\n",
            &[400],
        )
        .code("invalid_target"),
        // The worker's limit_request_line (4094 by default) answers 414, and so does hyper past
        // its read buffer.
        case(
            "request line over limit_request_line",
            format!("GET /healthz?{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(5000)),
            &[414],
        )
        .code("request_line_too_long"),
        case(
            "request line over the read buffer",
            format!(
                "GET /healthz?{} HTTP/1.1\r\nHost: x\r\n\r\n",
                "a".repeat(100_000)
            ),
            &[414],
        ),
        // --- Host (§3.2) ------------------------------------------------------------------
        case("HTTP/1.1 without Host", "GET /healthz HTTP/1.1\r\n\r\n", &[400])
            .code("invalid_host"),
        case(
            "two Host fields",
            health("HTTP/1.1", "Host: a\r\nHost: b\r\n"),
            &[400],
        )
        .code("invalid_host"),
        case(
            "two equal Host fields",
            health("HTTP/1.1", "Host: a\r\nHost: a\r\n"),
            &[400],
        )
        .code("invalid_host"),
        case(
            "Host with a space",
            health("HTTP/1.1", "Host: a b\r\n"),
            &[400],
        )
        .code("invalid_host"),
        case(
            "Host with a path",
            health("HTTP/1.1", "Host: x/healthz\r\n"),
            &[400],
        )
        .code("invalid_host"),
        case(
            "Host with userinfo",
            health("HTTP/1.1", "Host: user@x\r\n"),
            &[400],
        )
        .code("invalid_host"),
        case(
            "Host with a non-numeric port",
            health("HTTP/1.1", "Host: x:http\r\n"),
            &[400],
        )
        .code("invalid_host"),
        case(
            "Host with two ports",
            health("HTTP/1.1", "Host: x:1:2\r\n"),
            &[400],
        )
        .code("invalid_host"),
        case(
            "Host with a broken IPv6 literal",
            health("HTTP/1.1", "Host: [::1\r\n"),
            &[400],
        )
        .code("invalid_host"),
        // RFC 9110 §4.2.1: an http URI with an empty host is invalid, so is an empty Host.
        case("empty Host", health("HTTP/1.1", "Host:\r\n"), &[400]).code("invalid_host"),
        case(
            "Host as an IPv6 literal with a port",
            health("HTTP/1.1", "Host: [::1]:8080\r\n"),
            &[200],
        )
        .serves(),
        case(
            "Host as an IPv4 address with a port",
            health("HTTP/1.1", "Host: 127.0.0.1:80\r\n"),
            &[200],
        )
        .serves(),
        case(
            "Host with surrounding whitespace",
            health("HTTP/1.1", "Host: \t my_host.example. \t\r\n"),
            &[200],
        )
        .serves(),
        // Host is required of HTTP/1.1 only, but a Host that is sent must be valid.
        case("HTTP/1.0 without Host", health("HTTP/1.0", ""), &[200]),
        case(
            "HTTP/1.0 with two Host fields",
            health("HTTP/1.0", "Host: a\r\nHost: b\r\n"),
            &[400],
        )
        .code("invalid_host"),
        case(
            "HTTP/1.0 with an invalid Host",
            health("HTTP/1.0", "Host: a b\r\n"),
            &[400],
        )
        .code("invalid_host"),
        // --- Header fields (§5) -------------------------------------------------------------
        // §5.1: whitespace between name and colon MUST be answered 400.
        case(
            "space before the colon",
            health("HTTP/1.1", "Host : x\r\n"),
            &[400],
        ),
        case(
            "tab before the colon",
            health("HTTP/1.1", "Host: x\r\nX-A\t: b\r\n"),
            &[400],
        ),
        // §5.2: obs-fold is refused (or replaced by spaces; this server refuses).
        case(
            "obsolete line folding",
            health("HTTP/1.1", "Host: x\r\nX-A: a\r\n b\r\n"),
            &[400],
        ),
        // §2.2: whitespace between the request line and the first field.
        case(
            "whitespace before the first field",
            health("HTTP/1.1", " X-A: b\r\nHost: x\r\n"),
            &[400],
        ),
        case(
            "field without a colon",
            health("HTTP/1.1", "Host: x\r\nX-A b\r\n"),
            &[400],
        ),
        case(
            "empty field name",
            health("HTTP/1.1", "Host: x\r\n: b\r\n"),
            &[400],
        ),
        case(
            "non-token character in a field name",
            health("HTTP/1.1", "Host: x\r\nX(A): b\r\n"),
            &[400],
        ),
        case(
            "NUL in a field value",
            health("HTTP/1.1", "Host: x\r\nX-A: a\0b\r\n"),
            &[400],
        ),
        // §2.2: a bare CR is invalid (or replaced by SP; this server refuses).
        case(
            "bare CR in a field value",
            health("HTTP/1.1", "Host: x\r\nX-A: a\rb\r\n"),
            &[400],
        ),
        case(
            "vertical tab in a field value",
            health("HTTP/1.1", "Host: x\r\nX-A: a\x0bb\r\n"),
            &[400],
        ),
        case(
            "DEL in a field value",
            health("HTTP/1.1", "Host: x\r\nX-A: a\x7fb\r\n"),
            &[400],
        ),
        // RFC 9110 §5.5: obs-text (bytes 0x80-0xFF) is a legal field value.
        case(
            "obs-text in a field value",
            &b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: caf\xe9\r\n\r\n"[..],
            &[200],
        )
        .serves(),
        // §2.2: a recipient MAY accept a bare LF as the line terminator; this one does.
        case(
            "bare LF line endings",
            "GET /healthz HTTP/1.1\nHost: x\n\n",
            &[200],
        )
        .serves(),
        case(
            "bare CR line endings",
            "GET /healthz HTTP/1.1\rHost: x\r\r",
            &[400],
        ),
        case(
            "field over limit_request_field_size",
            health(
                "HTTP/1.1",
                &format!("Host: x\r\nX-A: {}\r\n", "b".repeat(9000)),
            ),
            &[431],
        )
        .code("header_too_large"),
        case(
            "field name over limit_request_field_size",
            health(
                "HTTP/1.1",
                &format!("Host: x\r\nX-{}: b\r\n", "a".repeat(9000)),
            ),
            &[431],
        )
        .code("header_too_large"),
        case(
            "more fields than limit_request_fields",
            health(
                "HTTP/1.1",
                &format!(
                    "Host: x\r\n{}",
                    (0..101).map(|i| format!("X-{i}: v\r\n")).collect::<String>()
                ),
            ),
            &[431],
        ),
        case(
            "header section over the read buffer",
            health(
                "HTTP/1.1",
                &format!(
                    "Host: x\r\n{}",
                    (0..40)
                        .map(|i| format!("X-{i}: {}\r\n", "v".repeat(4000)))
                        .collect::<String>()
                ),
            ),
            &[431],
        ),
        // --- Content-Length (§6.2, §6.3) -----------------------------------------------------
        case("a sized body", post_sized(""), &[200]).serves(),
        // §6.3: a GET's body is framed like any other and skipped, not read as a request.
        case(
            "GET with a body",
            health("HTTP/1.1", "Host: x\r\nContent-Length: 13\r\n") + "GET / HTTP/1.",
            &[200],
        )
        .serves(),
        // RFC 9110 §8.6: equal duplicates may be accepted as one (this server does), or refused.
        case(
            "two equal Content-Length fields",
            post_sized(&format!("Content-Length: {}\r\n", QUERY.len())),
            &[200],
        )
        .serves(),
        case(
            "two different Content-Length fields",
            post(
                &format!("Content-Length: {}\r\nContent-Length: 3\r\n", QUERY.len()),
                QUERY,
            ) + SMUGGLED,
            &[400],
        )
        .closes(),
        // The same for a list of equal values (this server refuses: one value per field).
        case(
            "Content-Length as a list",
            post(
                &format!("Content-Length: {0}, {0}\r\n", QUERY.len()),
                QUERY,
            ) + SMUGGLED,
            &[400],
        )
        .closes(),
        case(
            "negative Content-Length",
            post("Content-Length: -1\r\n", QUERY),
            &[400],
        )
        .closes(),
        case(
            "Content-Length with a plus sign",
            post(&format!("Content-Length: +{}\r\n", QUERY.len()), QUERY),
            &[400],
        )
        .closes(),
        case(
            "hexadecimal Content-Length",
            post(&format!("Content-Length: {:#x}\r\n", QUERY.len()), QUERY),
            &[400],
        )
        .closes(),
        case(
            "Content-Length with a space inside",
            post("Content-Length: 2 8\r\n", QUERY),
            &[400],
        )
        .closes(),
        case("empty Content-Length", post("Content-Length:\r\n", QUERY), &[400]).closes(),
        case(
            "Content-Length past 2^64",
            post("Content-Length: 99999999999999999999999\r\n", QUERY),
            &[400],
        )
        .closes(),
        // hyper's length type keeps the top values for itself and answers 431 (400 or 413 would
        // say it better); the connection closes either way.
        case(
            "Content-Length of 2^64-1",
            post("Content-Length: 18446744073709551615\r\n", QUERY),
            &[400, 413, 431],
        )
        .closes(),
        // A terabyte announced: refused by the body limit, not awaited.
        case(
            "Content-Length over max_body_size",
            post("Content-Length: 1000000000000\r\n", QUERY) + SMUGGLED,
            &[413],
        )
        .code("payload_too_large")
        .closes(),
        case(
            "sized body cut short",
            post(&format!("Content-Length: {}\r\n", QUERY.len() + 10), QUERY),
            &[400],
        )
        .code("invalid_body")
        .eof(),
        // --- Transfer-Encoding and chunked (§6.1, §7.1) ---------------------------------------
        case("a chunked body", post(te, &chunks("")), &[200]).serves(),
        // §7.1.1: chunk extensions are legal and ignored.
        case(
            "chunk extension",
            post(te, &chunks(";name=value")),
            &[200],
        )
        .serves(),
        case(
            "quoted chunk extension",
            post(te, &chunks(";name=\"a value; with \\\" quotes\"")),
            &[200],
        )
        .serves(),
        case(
            "chunk extension with whitespace",
            post(te, &chunks(" ; name = value")),
            &[200],
        )
        .serves(),
        case(
            "chunk extensions over 16 KiB",
            post(te, &chunks(&format!(";x={}", "y".repeat(20_000)))),
            &[400],
        )
        .code("invalid_body"),
        // §7.1.2: trailer fields after the last chunk.
        case(
            "trailer fields",
            post(
                te,
                &format!("{:x}\r\n{QUERY}\r\n0\r\nX-Checksum: 1\r\n\r\n", QUERY.len()),
            ),
            &[200],
        )
        .serves(),
        case(
            "body in many small chunks",
            post(
                te,
                &(QUERY
                    .as_bytes()
                    .chunks(3)
                    .map(|c| format!("{:x}\r\n{}\r\n", c.len(), String::from_utf8_lossy(c)))
                    .collect::<String>()
                    + "0\r\n\r\n"),
            ),
            &[200],
        )
        .serves(),
        case(
            "chunk size not hexadecimal",
            post(te, &format!("zz\r\n{QUERY}\r\n0\r\n\r\n")),
            &[400],
        )
        .code("invalid_body"),
        case(
            "chunk size with 0x",
            post(te, &format!("0x{:x}\r\n{QUERY}\r\n0\r\n\r\n", QUERY.len())),
            &[400],
        )
        .code("invalid_body"),
        case(
            "negative chunk size",
            post(te, &format!("-{:x}\r\n{QUERY}\r\n0\r\n\r\n", QUERY.len())),
            &[400],
        )
        .code("invalid_body"),
        case(
            "chunk size past 2^64",
            post(te, &format!("1{:x}\r\n{QUERY}\r\n0\r\n\r\n", u64::MAX)),
            &[400],
        )
        .code("invalid_body"),
        case(
            "chunk longer than its size",
            post(te, &format!("3\r\n{QUERY}\r\n0\r\n\r\n")),
            &[400],
        )
        .code("invalid_body"),
        // Chunked framing wants CRLF (§7.1); an LF-only chunk line is a known desync between
        // parsers, and refused.
        case(
            "chunk size line ending in a bare LF",
            post(te, &format!("{:x}\n{QUERY}\r\n0\r\n\r\n", QUERY.len())),
            &[400],
        )
        .code("invalid_body"),
        case(
            "chunked body without its last chunk",
            post(te, &format!("{:x}\r\n{QUERY}\r\n", QUERY.len())),
            &[400],
        )
        .code("invalid_body")
        .eof(),
        // §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing.
        case(
            "Transfer-Encoding in HTTP/1.0",
            format!(
                "POST /v1/query HTTP/1.0\r\nContent-Type: application/json\r\n{te}\r\n{}{SMUGGLED}",
                chunks("")
            ),
            &[400],
        )
        .closes(),
        // §6.3: chunked not last means the length cannot be known: 400 and close.
        case(
            "Transfer-Encoding gzip",
            post("Transfer-Encoding: gzip\r\n", QUERY) + SMUGGLED,
            &[400],
        )
        .closes(),
        case(
            "Transfer-Encoding chunked, then gzip",
            post("Transfer-Encoding: chunked, gzip\r\n", &chunks("")) + SMUGGLED,
            &[400],
        )
        .closes(),
        // §6.1 / RFC 9110 §10.1.4: a coding the server does not implement is 501.
        case(
            "Transfer-Encoding gzip, then chunked",
            post("Transfer-Encoding: gzip, chunked\r\n", &chunks("")) + SMUGGLED,
            &[501],
        )
        .code("unsupported_transfer_coding")
        .closes(),
        // §7: chunked applied twice would need decoding twice.
        case(
            "Transfer-Encoding chunked twice",
            post("Transfer-Encoding: chunked, chunked\r\n", &chunks("")) + SMUGGLED,
            &[501],
        )
        .code("unsupported_transfer_coding")
        .closes(),
        case(
            "two Transfer-Encoding fields of chunked",
            post(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                &chunks(""),
            ) + SMUGGLED,
            &[501],
        )
        .code("unsupported_transfer_coding")
        .closes(),
        // Codings are case-insensitive, and OWS around the value is not part of it.
        case(
            "Transfer-Encoding Chunked with tabs",
            post("Transfer-Encoding:\t Chunked\t\r\n", &chunks("")),
            &[200],
        )
        .serves(),
        // --- Request smuggling: Content-Length against Transfer-Encoding -----------------------
        // §6.1: with both, Transfer-Encoding frames the body or the request is refused, and the
        // connection closes after the answer either way. This server frames by Transfer-Encoding
        // (the query's answer, 42, shows it) and closes.
        case(
            "CL.TE: Content-Length shorter than the chunked body",
            post(&format!("Content-Length: 4\r\n{te}"), &chunks("")) + SMUGGLED,
            &[200],
        )
        .closes(),
        case(
            "TE.CL: Content-Length longer than the chunked body",
            post(&format!("{te}Content-Length: 200\r\n"), &chunks("")) + SMUGGLED,
            &[200],
        )
        .closes(),
        case(
            "CL.TE: chunked body hides a request",
            post(
                &format!("Content-Length: {}\r\n{te}", 5 + SMUGGLED.len()),
                &format!("0\r\n\r\n{SMUGGLED}"),
            ),
            &[400],
        )
        .closes(),
        // TE.TE: the second field obfuscates the first; chunked is then not the final coding.
        case(
            "TE.TE: chunked, then an unknown coding",
            post(
                &format!("Content-Length: 4\r\n{te}Transfer-Encoding: cow\r\n"),
                &chunks(""),
            ) + SMUGGLED,
            &[400],
        )
        .closes(),
        case(
            "TE.TE: an unknown coding, then chunked",
            post(
                &format!("Content-Length: 4\r\nTransfer-Encoding: cow\r\n{te}"),
                &chunks(""),
            ) + SMUGGLED,
            &[501],
        )
        .code("unsupported_transfer_coding")
        .closes(),
        case(
            "TE.TE: xchunked",
            post(
                "Content-Length: 4\r\nTransfer-Encoding: xchunked\r\n",
                &chunks(""),
            ) + SMUGGLED,
            &[400],
        )
        .closes(),
        case(
            "TE.TE: quoted chunked",
            post(
                "Content-Length: 4\r\nTransfer-Encoding: \"chunked\"\r\n",
                &chunks(""),
            ) + SMUGGLED,
            &[400],
        )
        .closes(),
        case(
            "TE.TE: space before the colon",
            post(
                "Content-Length: 4\r\nTransfer-Encoding : chunked\r\n",
                &chunks(""),
            ) + SMUGGLED,
            &[400],
        )
        .closes(),
        case(
            "TE.TE: vertical tab before chunked",
            post(
                "Content-Length: 4\r\nTransfer-Encoding:\x0bchunked\r\n",
                &chunks(""),
            ) + SMUGGLED,
            &[400],
        )
        .closes(),
        case(
            "TE.TE: chunked on a folded line",
            post(
                "Content-Length: 4\r\nTransfer-Encoding:\r\n chunked\r\n",
                &chunks(""),
            ) + SMUGGLED,
            &[400],
        )
        .closes(),
        case(
            "TE.TE: identity",
            post(
                "Content-Length: 4\r\nTransfer-Encoding: identity\r\n",
                &chunks(""),
            ) + SMUGGLED,
            &[400],
        )
        .closes(),
        case(
            "Content-Length and Transfer-Encoding in HTTP/1.0",
            format!(
                "POST /v1/query HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: 4\r\n{te}\r\n{}{SMUGGLED}",
                chunks("")
            ),
            &[400],
        )
        .closes(),
        // --- Expectations (RFC 9110 §10.1.1) --------------------------------------------------
        case(
            "Expect: 100-continue",
            post_sized("Expect: 100-continue\r\n"),
            &[200],
        )
        .serves(),
        // Pipelining (§9.3.2): requests in one write, answered in order.
        case(
            "three pipelined requests",
            health("HTTP/1.1", "Host: x\r\n").repeat(3),
            &[200],
        )
        .pipelined(3)
        .serves(),
    ]
}

/// Read one final answer (skipping 100 Continue); `None` when the connection closes first.
fn read_answer(reader: &mut impl BufRead, head: bool) -> io::Result<Option<Response>> {
    loop {
        let Some(mut response) = read_head(reader)? else {
            return Ok(None);
        };
        if (100..200).contains(&response.status) {
            continue;
        }
        if !head {
            read_body(reader, &mut response, false)?;
        }
        return Ok(Some(response));
    }
}

/// Send one case on a fresh connection and check what comes back; `Err` says what was wrong.
fn run(addr: SocketAddr, case: &Case) -> Result<(), String> {
    let stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut writer = stream;
    // The server may refuse before reading everything; a write error then is its answer.
    let _ = writer.write_all(&case.bytes);
    if case.eof {
        let _ = writer.shutdown(Shutdown::Write);
    }
    let head = case.bytes.starts_with(b"HEAD ");
    let answer = match read_answer(&mut reader, head) {
        Ok(answer) => answer,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => None,
        Err(e) => return Err(format!("no answer: {e}")),
    };
    let Some(response) = answer else {
        return if case.statuses.contains(&CLOSED) {
            Ok(())
        } else {
            Err("closed without an answer".to_owned())
        };
    };
    let body = String::from_utf8_lossy(&response.body).into_owned();
    if !case.statuses.contains(&response.status) {
        return Err(format!("answered {} {body}", response.status));
    }
    if let Some(code) = case.code {
        let problem: serde_json::Value = serde_json::from_slice(&response.body).map_err(|e| {
            format!(
                "{} is not a problem document ({e}): {body}",
                response.status
            )
        })?;
        if problem["code"] != code {
            return Err(format!("code {} instead of {code}", problem["code"]));
        }
    }
    let is_query = case.bytes.starts_with(b"POST /v1/query ");
    if is_query && response.status == 200 && response.json()["rows"][0][0] != 42 {
        return Err(format!("the query answered {body}"));
    }
    if head && !body.is_empty() {
        return Err("HEAD answered with a body".to_owned());
    }
    for request in 1..case.requests {
        match read_answer(&mut reader, false) {
            Ok(Some(r)) if case.statuses.contains(&r.status) => {}
            Ok(Some(r)) => return Err(format!("request {request} answered {}", r.status)),
            Ok(None) => return Err(format!("closed before answering request {request}")),
            Err(e) => return Err(format!("no answer to request {request}: {e}")),
        }
    }
    match case.after {
        After::Any => Ok(()),
        After::Serves => {
            writer
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .map_err(|e| format!("connection unusable after the answer: {e}"))?;
            match read_answer(&mut reader, false) {
                Ok(Some(r)) if r.status == 200 => Ok(()),
                Ok(Some(r)) => Err(format!("next request on the connection: {}", r.status)),
                Ok(None) => Err("closed after the answer".to_owned()),
                Err(e) => Err(format!("next request on the connection: {e}")),
            }
        }
        After::Closes => {
            let mut rest = Vec::new();
            match reader.read_to_end(&mut rest) {
                Ok(_) if rest.is_empty() => Ok(()),
                Ok(_) => Err(format!(
                    "answered after the request: {}",
                    String::from_utf8_lossy(&rest)
                )),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset && rest.is_empty() => Ok(()),
                Err(e) => Err(format!("connection not closed after the answer: {e}")),
            }
        }
    }
}

#[test]
fn framing_corpus_gets_the_rfc_9112_answers_and_no_worker_is_lost() {
    let server = Setup::new().key("workers", "4").start();
    let workers = server.workers();
    assert_eq!(workers.len(), 4);
    let corpus = corpus();
    assert!(corpus.len() >= 60, "{} cases", corpus.len());
    let wrong: Vec<String> = corpus
        .iter()
        .filter_map(|case| {
            run(server.addr(), case)
                .err()
                .map(|e| format!("{}: {e}", case.name))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} cases:\n{}",
        wrong.len(),
        corpus.len(),
        wrong.join("\n")
    );
    assert_eq!(server.workers(), workers, "no worker was lost");
    assert_eq!(get(server.addr(), "/healthz").expect("healthz").status, 200);
}

/// Slow-loris clients held open at once.
const LORIS: usize = 2_000;

/// What slow-loris clients send before they fall silent: part of a request line, part of the
/// header section, one byte.
const PARTIALS: [&[u8]; 3] = [
    b"GET /healthz HT",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ",
    b"G",
];

/// Let this process (and the server it starts, which inherits the limit) hold `needed` files.
fn raise_open_files(needed: u64) {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(
        hard >= needed,
        "RLIMIT_NOFILE's hard limit {hard} is below the {needed} files this test needs"
    );
    if soft < needed {
        setrlimit(Resource::RLIMIT_NOFILE, needed, hard).expect("setrlimit");
    }
}

/// Whether the server has closed `stream` (EOF or reset); reads and drops anything it sent.
fn closed_by_server(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 512];
    match (&*stream).read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}

#[test]
fn framing_slow_loris_connections_neither_starve_health_nor_outlive_the_header_timeout() {
    raise_open_files(LORIS as u64 + 1024);
    // The worker's header read timeout is its keep-alive (`keepalive`, 5 s by default); a longer
    // one leaves ample time to open every connection before the first is cut off.
    let header_timeout = Duration::from_secs(15);
    let server = Setup::new()
        .key("workers", "4")
        .key("keepalive", &header_timeout.as_secs().to_string())
        .start();
    let workers = server.workers();
    let addr = server.addr();

    let loris: Vec<TcpStream> = (0..LORIS)
        .map(|i| {
            let mut stream = TcpStream::connect(addr).expect("slow-loris connect");
            stream
                .write_all(PARTIALS[i % PARTIALS.len()])
                .expect("partial request");
            stream.set_nonblocking(true).expect("nonblocking");
            stream
        })
        .collect();
    // Each probe is a fresh connection, which the kernel hands to one of the workers: enough of
    // them to reach every worker in all likelihood. `get` reads with a bounded timeout.
    for probe in 0..40 {
        let response = get(addr, "/healthz").unwrap_or_else(|e| panic!("probe {probe}: {e}"));
        assert_eq!(response.status, 200, "probe {probe}");
    }
    let cut_early = loris.iter().filter(|s| closed_by_server(s)).count();
    assert_eq!(
        cut_early, 0,
        "slow-loris connections closed before the header timeout"
    );

    let mut open = loris;
    poll_until(
        "the server to close every slow-loris connection",
        header_timeout + Duration::from_secs(45),
        || {
            open.retain(|s| !closed_by_server(s));
            open.is_empty().then_some(())
        },
    );
    assert_eq!(server.workers(), workers, "no worker was lost");
    assert_eq!(get(addr, "/healthz").expect("healthz").status, 200);
}

#[test]
fn framing_a_body_that_does_not_arrive_in_time_is_408_and_frees_the_handler() {
    let server = Setup::new().key("keepalive", "1").start();
    for path in ["/v1/query", "/v1/auth/token"] {
        let mut stream = TcpStream::connect(server.addr()).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        // Headers promise 100 bytes; 10 arrive, then nothing.
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"sql\": \"S"
        );
        stream.write_all(head.as_bytes()).expect("write");
        let mut reader = BufReader::new(stream);
        let response = crate::support::read_response(&mut reader).expect("an answer, not a hang");
        assert_eq!(response.status, 408, "{path}");
        assert_eq!(response.json()["code"], "body_timeout", "{path}");
    }
    assert_eq!(get(server.addr(), "/healthz").expect("healthz").status, 200);
}
