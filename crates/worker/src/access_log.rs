//! The access log: one line per request, in the combined log format Gunicorn writes by default,
//! followed by the duration and the request id.
//!
//! ```text
//! 127.0.0.1 - - [28/Nov/2026:05:53:34 +0000] "GET /v1/datasets HTTP/1.1" 200 512 "-" "curl/8.5.0" 3ms 1a2b-7
//! ```
//!
//! With `log_format = "json"` each line is one JSON object with the same fields instead.
//!
//! Each worker opens the file itself after the fork (`O_APPEND`, so lines from several workers
//! never interleave) and reopens it on SIGUSR1, after logrotate has moved it.

use std::io::{self, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName};

use crate::logfile::LogFile;
use crate::settings::{AccessLogTarget, LogFormat};

/// An open access log.
#[derive(Debug)]
pub struct AccessLog {
    sink: Sink,
    format: LogFormat,
    /// The text lines' format: the operator's `access_log_format`, else [`AccessFormat::combined`].
    text: AccessFormat,
}

#[derive(Debug)]
enum Sink {
    Stdout,
    File(LogFile),
}

impl AccessLog {
    pub fn open(
        target: AccessLogTarget,
        format: LogFormat,
        custom: Option<&str>,
    ) -> io::Result<Self> {
        let custom = custom
            .map(AccessFormat::parse)
            .transpose()
            .map_err(|m| io::Error::new(io::ErrorKind::InvalidInput, m))?;
        let sink = match target {
            AccessLogTarget::Stdout => Sink::Stdout,
            AccessLogTarget::File(path) => Sink::File(LogFile::open(&path)?),
        };
        Ok(Self {
            sink,
            format,
            text: custom.unwrap_or_else(AccessFormat::combined),
        })
    }

    /// The custom format's request and response header names (to keep from each request).
    pub fn headers_wanted(&self) -> (&[HeaderName], &[HeaderName]) {
        (&self.text.request_headers, &self.text.response_headers)
    }

    /// Reopen the file at its path (after logrotate moved it).
    pub fn reopen(&self) {
        if let Sink::File(file) = &self.sink
            && let Err(e) = file.reopen()
        {
            tracing::error!(path = %file.path().display(), error = %e, "cannot reopen the access log");
        }
    }

    /// Write the line of `entry`, at time `now`, in the log's format.
    pub fn write_entry(&self, entry: &AccessEntry<'_>, now: SystemTime) {
        match self.format {
            LogFormat::Json => self.write(&entry.format_json(now)),
            LogFormat::Text => self.write(&self.text.render(entry, now)),
        }
    }

    /// Write one line.
    fn write(&self, line: &str) {
        let mut record = Vec::with_capacity(line.len() + 1);
        record.extend_from_slice(line.as_bytes());
        record.push(b'\n');
        // A full disk must not fail the request: the line is lost, the answer is not.
        let _ = match &self.sink {
            Sink::File(file) => file.append(&record),
            Sink::Stdout => io::stdout().lock().write_all(&record),
        };
    }
}

/// What one access line says.
#[derive(Debug)]
pub struct AccessEntry<'a> {
    pub peer: Option<std::net::IpAddr>,
    pub method: &'a str,
    pub target: &'a str,
    pub version: &'a str,
    pub status: u16,
    pub bytes: Option<u64>,
    pub referer: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub duration: Duration,
    pub request_id: &'a str,
    /// Who sent it (the credential's subject), when it carried one.
    pub user: Option<&'a str>,
    pub pid: u32,
    /// The values of the custom format's request and response headers, in its order.
    pub request_headers: &'a [Option<String>],
    pub response_headers: &'a [Option<String>],
}

/// One piece of an `access_log_format`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Atom(char),
    RequestHeader(usize),
    ResponseHeader(usize),
    /// The request id (no Gunicorn atom; the built-in format ends with it).
    RequestId,
}

/// Gunicorn's `access_log_format`: text with `%(x)s` atoms.
///
/// | atom | value |
/// | --- | --- |
/// | `h` | client address | `l` | `-` | `u` | user (the credential's subject) |
/// | `t` | `[28/Nov/2026:05:53:34 +0000]` | `r` | request line | `m` `U` `q` `H` | method, path, query, protocol |
/// | `s` | status | `B` | body bytes sent | `b` | the same, `-` for none |
/// | `f` | referer | `a` | user agent | `T` `M` `D` `L` | duration in s, ms, µs, decimal s |
/// | `p` | worker pid | `{name}i` | a request header | `{name}o` | a response header |
///
/// `%%` is a literal `%`. An unknown atom is a configuration error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessFormat {
    pieces: Vec<Piece>,
    request_headers: Vec<HeaderName>,
    response_headers: Vec<HeaderName>,
}

const ATOMS: &str = "hlutrmUqHsBbfaTMDLp";

impl AccessFormat {
    /// The built-in line: Gunicorn's default (the combined log format) with the duration and
    /// the request id after it.
    pub fn combined() -> Self {
        let mut format =
            Self::parse(r#"%(h)s - - %(t)s "%(r)s" %(s)s %(B)s "%(f)s" "%(a)s" %(M)sms "#)
                .unwrap_or_else(|e| unreachable!("the built-in access format parses: {e}"));
        format.pieces.push(Piece::RequestId);
        format
    }

    pub fn parse(format: &str) -> Result<Self, String> {
        let mut parsed = Self {
            pieces: Vec::new(),
            request_headers: Vec::new(),
            response_headers: Vec::new(),
        };
        let mut text = String::new();
        let mut rest = format;
        while let Some(at) = rest.find('%') {
            text.push_str(&rest[..at]);
            rest = &rest[at + 1..];
            if let Some(after) = rest.strip_prefix('%') {
                text.push('%');
                rest = after;
                continue;
            }
            let inner = rest
                .strip_prefix('(')
                .and_then(|r| r.split_once(")s"))
                .ok_or_else(|| format!("a % not followed by (atom)s at {:?}", truncate(rest)))?;
            let (atom, after) = inner;
            rest = after;
            if !text.is_empty() {
                parsed.pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            let piece = parsed.atom(atom)?;
            parsed.pieces.push(piece);
        }
        text.push_str(rest);
        if !text.is_empty() {
            parsed.pieces.push(Piece::Text(text));
        }
        Ok(parsed)
    }

    fn atom(&mut self, atom: &str) -> Result<Piece, String> {
        let header = |name: &str| {
            HeaderName::try_from(name).map_err(|_| format!("{name:?} is not a header name"))
        };
        if let Some(name) = atom.strip_prefix('{') {
            let (name, kind) = name
                .split_once('}')
                .ok_or_else(|| format!("%({atom})s: an unclosed {{"))?;
            return match kind {
                "i" => {
                    self.request_headers.push(header(name)?);
                    Ok(Piece::RequestHeader(self.request_headers.len() - 1))
                }
                "o" => {
                    self.response_headers.push(header(name)?);
                    Ok(Piece::ResponseHeader(self.response_headers.len() - 1))
                }
                _ => Err(format!(
                    "%({atom})s: only request ({{name}}i) and response ({{name}}o) headers are known"
                )),
            };
        }
        let mut chars = atom.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) if ATOMS.contains(c) => Ok(Piece::Atom(c)),
            _ => Err(format!(
                "%({atom})s is not one of Gunicorn's atoms ({ATOMS}, {{header}}i, {{header}}o)"
            )),
        }
    }

    /// The line of `entry` at `now`.
    pub fn render(&self, entry: &AccessEntry<'_>, now: SystemTime) -> String {
        let mut out = String::with_capacity(256);
        let dash = |v: Option<&str>| v.map_or_else(|| "-".to_owned(), escape);
        let (path, query) = entry.target.split_once('?').unwrap_or((entry.target, ""));
        for piece in &self.pieces {
            let value = match piece {
                Piece::Text(text) => {
                    out.push_str(text);
                    continue;
                }
                Piece::RequestId => entry.request_id.to_owned(),
                Piece::RequestHeader(i) => {
                    dash(entry.request_headers.get(*i).and_then(Option::as_deref))
                }
                Piece::ResponseHeader(i) => {
                    dash(entry.response_headers.get(*i).and_then(Option::as_deref))
                }
                Piece::Atom(atom) => match atom {
                    'h' => entry
                        .peer
                        .map_or_else(|| "-".to_owned(), |ip| ip.to_string()),
                    'l' => "-".to_owned(),
                    'u' => dash(entry.user),
                    't' => format!("[{}]", clf_time(now)),
                    'r' => format!(
                        "{} {} {}",
                        entry.method,
                        escape(entry.target),
                        entry.version
                    ),
                    'm' => entry.method.to_owned(),
                    'U' => escape(path),
                    'q' => escape(query),
                    'H' => entry.version.to_owned(),
                    's' => entry.status.to_string(),
                    'B' => entry.bytes.unwrap_or(0).to_string(),
                    'b' => entry
                        .bytes
                        .filter(|&b| b > 0)
                        .map_or_else(|| "-".to_owned(), |b| b.to_string()),
                    'f' => dash(entry.referer),
                    'a' => dash(entry.user_agent),
                    'T' => entry.duration.as_secs().to_string(),
                    'M' => entry.duration.as_millis().to_string(),
                    'D' => entry.duration.as_micros().to_string(),
                    'L' => format!("{:.6}", entry.duration.as_secs_f64()),
                    'p' => format!("<{}>", entry.pid),
                    _ => String::new(),
                },
            };
            out.push_str(&value);
        }
        out
    }
}

/// The values of `names` in `headers` (printable text only).
pub fn header_values(headers: &HeaderMap, names: &[HeaderName]) -> Vec<Option<String>> {
    names
        .iter()
        .map(|n| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .collect()
}

fn truncate(text: &str) -> &str {
    let end = text.char_indices().nth(12).map_or(text.len(), |(i, _)| i);
    &text[..end]
}

impl AccessEntry<'_> {
    /// The entry as one JSON object (serde_json escapes every string).
    pub fn format_json(&self, now: SystemTime) -> String {
        serde_json::json!({
            "time": clf_time(now),
            "remote_addr": self.peer.map(|ip| ip.to_string()),
            "method": self.method,
            "target": self.target,
            "protocol": self.version,
            "status": self.status,
            "bytes": self.bytes,
            "referer": self.referer,
            "user_agent": self.user_agent,
            "duration_ms": self.duration.as_secs_f64() * 1000.0,
            "request_id": self.request_id,
            "user": self.user,
            "pid": self.pid,
        })
        .to_string()
    }
}

/// Escape what would break the line apart or its quoting.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// `28/Nov/2026:05:53:34 +0000`, in UTC.
fn clf_time(now: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let seconds = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rest) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{day:02}/{}/{year}:{:02}:{:02}:{:02} +0000",
        MONTHS[(month - 1) as usize],
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_is_common_log_format() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_845_214); // 2026-11-28T05:53:34Z
        assert_eq!(clf_time(t), "28/Nov/2026:05:53:34 +0000");
        assert_eq!(clf_time(UNIX_EPOCH), "01/Jan/1970:00:00:00 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(clf_time(leap), "29/Feb/2000:00:00:00 +0000");
    }

    #[test]
    fn lines_are_combined_format_with_duration_and_id() {
        let entry = AccessEntry {
            peer: Some(std::net::Ipv4Addr::LOCALHOST.into()),
            method: "GET",
            target: "/x?q=\"a\"",
            version: "HTTP/1.1",
            status: 200,
            bytes: Some(12),
            referer: None,
            user_agent: Some("curl/8"),
            duration: Duration::from_millis(3),
            request_id: "ab-1",
            user: Some("alice"),
            pid: 42,
            request_headers: &[Some("fr".to_owned())],
            response_headers: &[None],
        };
        let line = AccessFormat::combined().render(&entry, UNIX_EPOCH);
        assert_eq!(
            line,
            "127.0.0.1 - - [01/Jan/1970:00:00:00 +0000] \"GET /x?q=\\\"a\\\" HTTP/1.1\" 200 12 \"-\" \"curl/8\" 3ms ab-1"
        );
        let json: serde_json::Value =
            serde_json::from_str(&entry.format_json(UNIX_EPOCH)).expect("one JSON object");
        assert_eq!(json["target"], "/x?q=\"a\"");
        assert_eq!(json["status"], 200);
        assert_eq!(json["bytes"], 12);
        assert_eq!(json["referer"], serde_json::Value::Null);
        assert_eq!(json["request_id"], "ab-1");
    }

    #[test]
    fn gunicorns_atoms_render_and_unknown_ones_are_refused() {
        let format = AccessFormat::parse(
            r#"%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s %(U)s?%(q)s %(M)sms %(p)s %({accept-language}i)s %({x-cache}o)s 100%%"#,
        )
        .expect("parses");
        assert_eq!(format.request_headers, ["accept-language"]);
        let entry = AccessEntry {
            peer: Some(std::net::Ipv4Addr::LOCALHOST.into()),
            method: "GET",
            target: "/v1/datasets?x=1",
            version: "HTTP/1.1",
            status: 200,
            bytes: Some(0),
            referer: None,
            user_agent: None,
            duration: Duration::from_millis(12),
            request_id: "id",
            user: Some("alice"),
            pid: 42,
            request_headers: &[Some("fr".to_owned())],
            response_headers: &[None],
        };
        assert_eq!(
            format.render(&entry, UNIX_EPOCH),
            r#"127.0.0.1 - alice [01/Jan/1970:00:00:00 +0000] "GET /v1/datasets?x=1 HTTP/1.1" 200 - /v1/datasets?x=1 12ms <42> fr - 100%"#
        );
        for bad in ["%(z)s", "%(hh)s", "%h", "%({x}e)s", "%({a b}i)s", "%(h"] {
            assert!(AccessFormat::parse(bad).is_err(), "{bad}");
        }
    }
}
