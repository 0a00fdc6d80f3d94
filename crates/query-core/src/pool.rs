//! Query connections: raw DuckDB connections to the worker's instance, each with its own cache of
//! prepared statements, lent to one query at a time.
//!
//! A statement enters a connection's cache only through [`QueryConn::prepare`], which extracts
//! it with DuckDB's parser, requires exactly one statement and prepares that one (never the text
//! as a whole, so nothing of a multi-statement text can run). A cached statement is found again by
//! its exact text. DuckDB re-binds a cached statement by itself when a view it reads changes.

use std::sync::{Arc, Mutex, MutexGuard};

use hashlink::LruCache;

use crate::capi::{self, Database, Prepared, StatementType};
use crate::gate::Refusal;
use crate::query::QueryError;

/// Prepared statements each connection keeps, by text.
const STATEMENT_CACHE: usize = 128;
/// Idle connections kept for reuse.
const POOL_SIZE: usize = 16;

/// What a cached statement is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Purpose {
    /// A request's statement, as sent.
    Query,
    /// `EXPLAIN` of it, as the engine wrote it around the request's statement.
    Explain,
    /// The engine's own `json_serialize_sql` call.
    Serialize,
}

/// One raw connection and its prepared statements.
#[derive(Debug)]
pub(crate) struct QueryConn {
    conn: capi::Conn,
    statements: LruCache<(Purpose, String), Prepared>,
    /// The epoch of the search path the connection runs with (`None`: DuckDB's default).
    search_path: Option<u64>,
}

impl QueryConn {
    /// Run with the search path `statement` of `epoch` (a `SET search_path`), unless the
    /// connection already does. Its cached statements are dropped then: they were bound to
    /// what the old path resolved to.
    pub fn follow_search_path(&mut self, epoch: u64, statement: &str) -> Result<(), QueryError> {
        if self.search_path == Some(epoch) {
            return Ok(());
        }
        self.statements.clear();
        self.search_path = None;
        {
            let extracted = self
                .conn
                .extract(statement)
                .map_err(QueryError::from_message)?;
            let mut prepared = extracted.prepare(0).map_err(QueryError::from_message)?;
            prepared.execute().map_err(QueryError::from_message)?;
        }
        self.search_path = Some(epoch);
        Ok(())
    }

    pub fn interrupt_handle(&self) -> capi::ConnInterrupt {
        self.conn.interrupt_handle()
    }

    /// Split `text` into statements with DuckDB's parser (nothing is bound or executed).
    pub fn extract(&self, text: &str) -> Result<capi::Extracted<'_>, QueryError> {
        self.conn.extract(text).map_err(QueryError::from_message)
    }

    /// The prepared statement for `text`: from the cache, or extracted and prepared now. It must
    /// be one statement of type `expected`.
    pub fn prepare(
        &mut self,
        purpose: Purpose,
        text: &str,
        expected: StatementType,
    ) -> Result<&mut Prepared, QueryError> {
        let key = (purpose, text.to_owned());
        if !self.statements.contains_key(&key) {
            let prepared = {
                let extracted = self.conn.extract(text).map_err(QueryError::from_message)?;
                match extracted.count() {
                    0 => return Err(Refusal::Empty.into()),
                    1 => {}
                    n => return Err(Refusal::MultipleStatements(n).into()),
                }
                let prepared = extracted.prepare(0).map_err(QueryError::from_message)?;
                match prepared.statement_type() {
                    kind if kind == expected => prepared,
                    StatementType::Explain => {
                        return Err(Refusal::NotAQuery("an EXPLAIN".into()).into());
                    }
                    StatementType::Select => {
                        return Err(Refusal::NotAQuery(
                            "a SELECT where the engine expected an EXPLAIN".into(),
                        )
                        .into());
                    }
                    StatementType::Other(n) => {
                        return Err(
                            Refusal::NotAQuery(format!("a {} statement", type_name(n))).into()
                        );
                    }
                }
            };
            self.statements.insert(key.clone(), prepared);
        }
        self.statements
            .get_mut(&key)
            .ok_or_else(|| QueryError::Internal("prepared statement cache".into()))
    }
}

/// DuckDB's name for a statement type number (`duckdb_statement_type`).
fn type_name(kind: u32) -> &'static str {
    const NAMES: &[&str] = &[
        "INVALID",
        "SELECT",
        "INSERT",
        "UPDATE",
        "EXPLAIN",
        "DELETE",
        "PREPARE",
        "CREATE",
        "EXECUTE",
        "ALTER",
        "TRANSACTION",
        "COPY",
        "ANALYZE",
        "VARIABLE_SET",
        "CREATE_FUNC",
        "DROP",
        "EXPORT",
        "PRAGMA",
        "VACUUM",
        "CALL",
        "SET",
        "LOAD",
        "RELATION",
        "EXTENSION",
        "LOGICAL_PLAN",
        "ATTACH",
        "DETACH",
        "MULTI",
        "COPY_DATABASE",
        "UPDATE_EXTENSIONS",
        "MERGE_INTO",
    ];
    NAMES.get(kind as usize).copied().unwrap_or("UNKNOWN")
}

/// The idle connections of one instance.
#[derive(Debug)]
pub(crate) struct Pool {
    database: Arc<Database>,
    idle: Mutex<Vec<QueryConn>>,
}

impl Pool {
    pub fn new(database: Arc<Database>) -> Self {
        Self {
            database,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// A connection for one query: an idle one (with its prepared statements) or a new one.
    pub fn checkout(&self) -> Result<Pooled<'_>, QueryError> {
        let idle = lock(&self.idle).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => QueryConn {
                conn: self.database.connect().map_err(QueryError::from_message)?,
                statements: LruCache::new(STATEMENT_CACHE),
                search_path: None,
            },
        };
        Ok(Pooled {
            conn: Some(conn),
            pool: self,
        })
    }

    #[cfg(test)]
    pub fn idle(&self) -> usize {
        lock(&self.idle).len()
    }
}

/// A connection lent to one query; back to the pool when dropped.
#[derive(Debug)]
pub(crate) struct Pooled<'a> {
    conn: Option<QueryConn>,
    pool: &'a Pool,
}

impl std::ops::Deref for Pooled<'_> {
    type Target = QueryConn;

    fn deref(&self) -> &QueryConn {
        self.conn.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut QueryConn {
        self.conn.as_mut().expect("present until dropped")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        let mut idle = lock(&self.pool.idle);
        if idle.len() < POOL_SIZE
            && let Some(conn) = self.conn.take()
        {
            idle.push(conn);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
