//! Result caching and conditional requests for `/v1/query`.
//!
//! A statement the gate finds deterministic and that reads datasets gets a result key and an
//! `ETag` made of its exact text, its parameters, format, content coding, row limit and the versions of the
//! datasets it reads ([`RequestShape::key`]): `If-None-Match` with it is answered 304 without
//! running anything, and a result that fits the first buffer is kept in the pool's result cache
//! ([`crate::result_cache`]). Each worker remembers the key of each request shape per catalogue
//! ([`KeyMemos`]), so a repeated request costs neither the gate nor hashing. The request's
//! `Cache-Control: no-cache` skips the cache lookup (the fresh result is still stored);
//! `no-store` skips both.

use std::sync::{Arc, Mutex, MutexGuard};

use ferrocorn_query_core::{Analysis, DatasetInfo, Format};
use hashlink::LruCache;
use http::{HeaderMap, HeaderValue, header};

use crate::api::QueryBody;
use crate::compress::Coding;
use crate::result_cache::CacheKey;

/// Request shapes whose result key a worker remembers, and the longest statement remembered.
const REMEMBERED_SHAPES: usize = 1024;
const MAX_REMEMBERED_STATEMENT: usize = 16 << 10;

/// The result keys a worker remembers, by request shape.
#[derive(Debug)]
pub struct KeyMemos(Mutex<LruCache<u64, KeyMemo>>);

impl Default for KeyMemos {
    fn default() -> Self {
        Self(Mutex::new(LruCache::new(REMEMBERED_SHAPES)))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The headers of a 200 answer before its result's own: media type, download name, and what
/// caches may do with it (`hit`: it comes from the result cache).
pub fn answer_headers(
    format: Format,
    coding: Coding,
    cache: Option<&Caching>,
    hit: bool,
) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.media_type()),
    );
    insert_vary(&mut headers);
    if let Some(token) = coding.token() {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(token));
    }
    if format == Format::Parquet {
        headers.insert(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_static("attachment; filename=\"result.parquet\""),
        );
    }
    match cache {
        Some(cache) => {
            cache.insert_headers(&mut headers);
            let status = match (hit, cache.read) {
                (true, _) => "hit",
                (false, true) => "miss",
                (false, false) => "bypass",
            };
            headers.insert("x-cache", HeaderValue::from_static(status));
        }
        None => {
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
    }
    headers
}

/// One URL answers in five formats and three codings, chosen by the request's headers: every
/// negotiated answer (a 304 too) says which headers chose it.
pub fn insert_vary(headers: &mut HeaderMap) {
    headers.insert(
        header::VARY,
        HeaderValue::from_static("Accept, Accept-Encoding"),
    );
}

/// Statements this worker has seen compute faster than `result_cache_min_ms`, by their text:
/// their results are neither looked up on disk nor stored there (a miss in memory runs them at
/// once). Storing a result on disk (a file written, renamed and counted under the directory's
/// lock, on the blocking pool) and reading it back cost more than running a point lookup on an
/// indexed snapshot again.
#[derive(Debug)]
pub struct CheapStatements {
    seen: Mutex<LruCache<u64, bool>>,
    below: std::time::Duration,
}

impl CheapStatements {
    pub fn new(below: std::time::Duration) -> Self {
        Self {
            seen: Mutex::new(LruCache::new(REMEMBERED_SHAPES)),
            below,
        }
    }

    fn hash(sql: &str) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        sql.hash(&mut hasher);
        hasher.finish()
    }

    /// Whether `sql` last computed in under the threshold.
    pub fn is_cheap(&self, sql: &str) -> bool {
        lock(&self.seen)
            .get(&Self::hash(sql))
            .copied()
            .unwrap_or(false)
    }

    /// Remember how long `sql` took; returns whether it is cheap.
    pub fn record(&self, sql: &str, took: std::time::Duration) -> bool {
        let cheap = took < self.below;
        lock(&self.seen).insert(Self::hash(sql), cheap);
        cheap
    }
}

/// How one request may use the result cache and conditional requests.
#[derive(Debug)]
pub struct Caching {
    pub key: CacheKey,
    etag: HeaderValue,
    /// Look the result up (the request did not say `no-cache` or `no-store`).
    pub read: bool,
    /// Store a fresh result (the request did not say `no-store`).
    pub write: bool,
}

impl Caching {
    /// How a request with `headers` may use the cache (`enabled`: the result cache is on) for the
    /// result `key`.
    pub fn new(enabled: bool, headers: &HeaderMap, key: CacheKey, etag: HeaderValue) -> Self {
        let (mut no_store, mut no_cache) = (false, false);
        for directive in headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .chain(headers.get_all(header::PRAGMA).iter())
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
        {
            no_store |= directive.eq_ignore_ascii_case("no-store");
            no_cache |= directive.eq_ignore_ascii_case("no-cache")
                || directive.eq_ignore_ascii_case("max-age=0");
        }
        Self {
            key,
            etag,
            read: enabled && !no_store && !no_cache,
            write: enabled && !no_store,
        }
    }

    /// Whether `If-None-Match` names this result.
    pub fn matches(&self, if_none_match: Option<&HeaderValue>) -> bool {
        let Some(value) = if_none_match.and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let ours = self.etag.to_str().unwrap_or_default();
        value
            .split(',')
            .map(str::trim)
            .any(|tag| tag == "*" || tag == ours || tag.strip_prefix("W/") == Some(ours))
    }

    /// `ETag`, and `Cache-Control` telling clients to revalidate before reuse (the data may
    /// change at any time; revalidation costs them a 304).
    pub fn insert_headers(&self, headers: &mut HeaderMap) {
        headers.insert(header::ETAG, self.etag.clone());
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, no-cache"),
        );
    }
}

/// A result's key and `ETag`, remembered by each worker for each request shape and catalogue.
#[derive(Debug)]
struct KeyMemo {
    sql: String,
    params: Vec<u8>,
    format: Format,
    coding: Coding,
    max_rows: u64,
    /// The catalogue the key was computed from; held, so that no later catalogue can have its
    /// address.
    catalog: Arc<Vec<DatasetInfo>>,
    key: CacheKey,
    etag: HeaderValue,
}

/// What a request's result depends on besides its datasets: statement, parameters, format, row
/// limit, and the catalogue it is answered against.
pub struct RequestShape<'b> {
    body: &'b QueryBody,
    params: Vec<u8>,
    format: Format,
    coding: Coding,
    max_rows: u64,
    catalog: Arc<Vec<DatasetInfo>>,
    fingerprint: u64,
}

impl<'b> RequestShape<'b> {
    pub fn of(
        catalog: Arc<Vec<DatasetInfo>>,
        body: &'b QueryBody,
        format: Format,
        coding: Coding,
        max_rows: u64,
    ) -> Self {
        use std::hash::{Hash, Hasher};
        let params = body
            .params
            .as_ref()
            .map(|p| serde_json::to_vec(p).unwrap_or_default())
            .unwrap_or_default();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (&body.sql, &params, format.name(), coding, max_rows).hash(&mut hasher);
        Self {
            body,
            params,
            format,
            coding,
            max_rows,
            catalog,
            fingerprint: hasher.finish(),
        }
    }

    /// The key and `ETag` this worker computed for the same shape and catalogue.
    pub fn remembered(&self, memos: &KeyMemos) -> Option<(CacheKey, HeaderValue)> {
        let mut memos = lock(&memos.0);
        let memo = memos.get(&self.fingerprint)?;
        (Arc::ptr_eq(&memo.catalog, &self.catalog)
            && memo.sql == self.body.sql
            && memo.params == self.params
            && memo.format == self.format
            && memo.coding == self.coding
            && memo.max_rows == self.max_rows)
            .then(|| (memo.key.clone(), memo.etag.clone()))
    }

    /// The result key and its `ETag`, or `None` when the result may not be reused: the gate
    /// found the statement not deterministic, or it reads no dataset (only datasets have
    /// versions to key a result by). The key is the statement's exact text (two texts share an
    /// entry only if they are the same text, whatever DuckDB would make of their differences),
    /// the parameters, the format, the row limit, DuckDB's version and the served version of every
    /// dataset the statement reads.
    pub fn key(
        self,
        memos: &KeyMemos,
        duckdb_version: &str,
        analysis: &Analysis,
    ) -> Option<(CacheKey, HeaderValue)> {
        let datasets = analysis.datasets(&self.catalog);
        if !analysis.is_deterministic() || datasets.is_empty() {
            return None;
        }
        let max_rows_bytes = self.max_rows.to_le_bytes();
        let mut parts: Vec<&[u8]> = vec![
            duckdb_version.as_bytes(),
            self.body.sql.as_bytes(),
            &self.params,
            self.format.name().as_bytes(),
            self.coding.token().unwrap_or("identity").as_bytes(),
            &max_rows_bytes,
        ];
        for info in &datasets {
            parts.push(info.dataset.name.as_bytes());
            parts.push(info.dataset.version.as_bytes());
        }
        let key = CacheKey::new(parts);
        let etag = HeaderValue::from_str(&format!("\"{}\"", key.as_str())).ok()?;
        if self.body.sql.len() <= MAX_REMEMBERED_STATEMENT {
            lock(&memos.0).insert(
                self.fingerprint,
                KeyMemo {
                    sql: self.body.sql.clone(),
                    params: self.params,
                    format: self.format,
                    coding: self.coding,
                    max_rows: self.max_rows,
                    catalog: self.catalog.clone(),
                    key: key.clone(),
                    etag: etag.clone(),
                },
            );
        }
        Some((key, etag))
    }
}
