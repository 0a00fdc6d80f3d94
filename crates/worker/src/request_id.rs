//! Request ids: the one of the request being handled (a task-local, so that error documents can
//! name it wherever they are built) and how a request gets one.
//!
//! A request keeps the id its caller gave (`X-Request-Id`), or else the trace id of its W3C
//! `traceparent`, so that a proxy's or a tracer's id flows through the logs. Otherwise it gets a
//! UUIDv7: the time in milliseconds and 74 random bits drawn from the operating system for each
//! id (`getrandom`), so ids are unique across workers, restarts and hosts — no generator state
//! is inherited from the master through the fork.

use http::{HeaderMap, HeaderValue};

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being handled, if any.
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// Run `work` as the handling of request `id`.
pub async fn scope<F: std::future::Future>(id: String, work: F) -> F::Output {
    REQUEST_ID.scope(id, work).await
}

/// The id of a new request with these `headers`.
pub fn assign(headers: &HeaderMap) -> String {
    if let Some(id) = headers.get("x-request-id").and_then(given_id) {
        return id.to_owned();
    }
    if let Some(trace) = headers.get("traceparent").and_then(trace_id) {
        return trace.to_owned();
    }
    uuid::Uuid::now_v7().hyphenated().to_string()
}

/// A caller's id, if it is short and printable.
fn given_id(value: &HeaderValue) -> Option<&str> {
    let id = value.to_str().ok()?;
    (!id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())).then_some(id)
}

/// The trace id of a W3C `traceparent` (`version-traceid-parentid-flags`, lower-case hex; a
/// trace or parent id of zeros is invalid, and version `ff` is forbidden).
fn trace_id(value: &HeaderValue) -> Option<&str> {
    let text = value.to_str().ok()?;
    let mut parts = text.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    // Version 00 has exactly four fields; a later version may add fields after them.
    let valid = hex(version, 2)
        && version != "ff"
        && (version != "00" || parts.next().is_none())
        && hex(trace, 32)
        && nonzero(trace)
        && hex(parent, 16)
        && nonzero(parent)
        && hex(flags, 2);
    valid.then_some(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).expect("value"));
        }
        map
    }

    #[test]
    fn a_callers_id_then_a_trace_id_then_a_uuid_v7() {
        let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(assign(&headers(&[("x-request-id", "abc-1")])), "abc-1");
        assert_eq!(
            assign(&headers(&[("x-request-id", "a b"), ("traceparent", trace)])),
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "an unprintable caller's id gives way to the trace"
        );
        let generated = assign(&HeaderMap::new());
        let uuid = uuid::Uuid::parse_str(&generated).expect("a UUID");
        assert_eq!(uuid.get_version_num(), 7);
        assert_ne!(assign(&HeaderMap::new()), generated);
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "garbage",
        ] {
            let value = HeaderValue::from_str(bad).expect("value");
            assert_eq!(trace_id(&value), None, "{bad}");
        }
        let later = HeaderValue::from_static(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future",
        );
        assert_eq!(trace_id(&later), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    }

    #[test]
    fn ids_of_one_millisecond_differ_in_their_random_bits() {
        let a = uuid::Uuid::parse_str(&assign(&HeaderMap::new())).expect("uuid");
        let b = uuid::Uuid::parse_str(&assign(&HeaderMap::new())).expect("uuid");
        assert_ne!(a.as_bytes()[8..], b.as_bytes()[8..]);
    }
}
