//! Running one query: parameters, streaming Arrow batches with a row cap, classifying errors.
//!
//! [`Engine::run`](crate::Engine::run) drives a [`ResultSink`]: it hands over the interrupt
//! handle first (so the caller can enforce a deadline or cancel on disconnect from another
//! thread), then the schema, then the batches. The sink may stop the query at any point.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use crate::capi::{ConnInterrupt, Value};
use crate::gate::Refusal;

/// Interrupts one run of a query, from any thread.
///
/// A run is several DuckDB statements on one connection (the gate's parse, the prepare, the
/// execution), and DuckDB forgets an interrupt when a statement ends; so the handle remembers
/// that it fired, and the run checks it between its statements and asserts it again once the
/// execution has started ([`Runner::run`](crate::Engine::run)). The run disarms the handle when
/// it ends, before its connection goes back to the pool: a late interrupt (a deadline or a
/// disconnect racing the end of the query) must never reach the connection's next query.
#[derive(Clone, Debug)]
pub struct InterruptHandle(Arc<Interrupt>);

#[derive(Debug)]
struct Interrupt {
    conn: Mutex<Option<ConnInterrupt>>,
    fired: AtomicBool,
}

impl InterruptHandle {
    pub(crate) fn arm(conn: ConnInterrupt) -> (Self, Disarm) {
        let handle = Self(Arc::new(Interrupt {
            conn: Mutex::new(Some(conn)),
            fired: AtomicBool::new(false),
        }));
        (handle.clone(), Disarm(handle))
    }

    /// Ask DuckDB to stop the query; it fails with [`QueryError::Interrupted`]. Does nothing once
    /// the run has ended.
    pub fn interrupt(&self) {
        self.0.fired.store(true, Ordering::Release);
        self.send();
    }

    fn send(&self) {
        if let Some(conn) = lock(&self.0.conn).as_ref() {
            conn.interrupt();
        }
    }

    /// Between two of the run's statements: [`QueryError::Interrupted`] if the handle fired.
    pub(crate) fn check(&self) -> Result<(), QueryError> {
        if self.0.fired.load(Ordering::Acquire) {
            Err(QueryError::Interrupted)
        } else {
            Ok(())
        }
    }

    /// Once the execution has started: send a fired interrupt again, in case it reached DuckDB
    /// between the last check and the start.
    pub(crate) fn reassert(&self) {
        if self.0.fired.load(Ordering::Acquire) {
            self.send();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Disarms its run's [`InterruptHandle`] when dropped.
#[derive(Debug)]
pub(crate) struct Disarm(InterruptHandle);

impl Disarm {
    pub(crate) fn handle(&self) -> &InterruptHandle {
        &self.0
    }
}

impl Drop for Disarm {
    fn drop(&mut self) {
        lock(&self.0.0.conn).take();
    }
}

/// A query parameter's value, from typed JSON.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamValue {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Text(String),
    /// `{"type": "date", "value": "2024-01-31"}`: a value given as text with its SQL type.
    Typed {
        sql_type: String,
        value: String,
    },
}

/// The SQL types a typed parameter may name.
pub const TYPED_PARAMETER_TYPES: &[&str] = &[
    "date",
    "time",
    "timestamp",
    "timestamptz",
    "decimal",
    "bigint",
    "ubigint",
    "hugeint",
    "uuid",
    "interval",
    "varchar",
    "double",
];

/// The parameters of a query: positional (`$1`, `?`) or named (`$min`).
#[derive(Clone, Debug, PartialEq)]
pub enum Params {
    Positional(Vec<ParamValue>),
    Named(BTreeMap<String, ParamValue>),
}

impl Default for Params {
    fn default() -> Self {
        Self::Positional(Vec::new())
    }
}

/// A parameter that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParamError {
    #[error("params must be an array (positional) or an object (named)")]
    NotACollection,
    #[error("parameter {name}: {message}")]
    BadValue { name: String, message: String },
    #[error("the statement has {expected} parameter(s) but {given} were given")]
    Count { expected: usize, given: usize },
    #[error("parameter ${0} is used by the statement but was not given")]
    Missing(String),
    #[error("parameter {0} was given but the statement does not use it")]
    Unused(String),
    #[error("the statement uses positional parameters; give params as an array")]
    NeedPositional,
}

impl ParamValue {
    /// Read one JSON value.
    pub fn from_json(name: &str, value: &serde_json::Value) -> Result<Self, ParamError> {
        let bad = |message: &str| ParamError::BadValue {
            name: name.to_owned(),
            message: message.to_owned(),
        };
        Ok(match value {
            serde_json::Value::Null => Self::Null,
            serde_json::Value::Bool(b) => Self::Bool(*b),
            serde_json::Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Self::Int(i)
                } else if let Some(u) = n.as_u64() {
                    Self::UInt(u)
                } else {
                    Self::Float(n.as_f64().ok_or_else(|| bad("not a finite number"))?)
                }
            }
            serde_json::Value::String(s) => Self::Text(s.clone()),
            serde_json::Value::Object(map) => {
                let sql_type = map
                    .get("type")
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| bad("an object parameter needs {\"type\", \"value\"}"))?
                    .to_ascii_lowercase();
                if !TYPED_PARAMETER_TYPES.contains(&sql_type.as_str()) {
                    return Err(bad(&format!(
                        "unknown type {sql_type:?}; one of {}",
                        TYPED_PARAMETER_TYPES.join(", ")
                    )));
                }
                if map.keys().any(|k| k != "type" && k != "value") {
                    return Err(bad("a typed parameter has only \"type\" and \"value\""));
                }
                let value = match map.get("value") {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(serde_json::Value::Number(n)) => n.to_string(),
                    Some(serde_json::Value::Null) => return Ok(Self::Null),
                    _ => return Err(bad("\"value\" must be a string or a number")),
                };
                Self::Typed { sql_type, value }
            }
            serde_json::Value::Array(_) => return Err(bad("arrays are not supported as values")),
        })
    }

    fn to_duckdb(&self, name: &str) -> Result<Value, ParamError> {
        let bad = |message: String| ParamError::BadValue {
            name: name.to_owned(),
            message,
        };
        Ok(match self {
            Self::Null => Value::Null,
            Self::Bool(b) => Value::Bool(*b),
            Self::Int(i) => Value::BigInt(*i),
            Self::UInt(u) => Value::UBigInt(*u),
            Self::Float(f) => Value::Double(*f),
            Self::Text(s) => Value::Text(s.clone()),
            Self::Typed { sql_type, value } => match sql_type.as_str() {
                "bigint" => Value::BigInt(
                    value
                        .trim()
                        .parse()
                        .map_err(|_| bad(format!("{value:?} is not a BIGINT")))?,
                ),
                "ubigint" => Value::UBigInt(
                    value
                        .trim()
                        .parse()
                        .map_err(|_| bad(format!("{value:?} is not a UBIGINT")))?,
                ),
                "hugeint" => Value::HugeInt(
                    value
                        .trim()
                        .parse()
                        .map_err(|_| bad(format!("{value:?} is not a HUGEINT")))?,
                ),
                "double" => Value::Double(
                    value
                        .trim()
                        .parse()
                        .map_err(|_| bad(format!("{value:?} is not a DOUBLE")))?,
                ),
                "date" => Value::Date(
                    parse_date(value)
                        .ok_or_else(|| bad(format!("{value:?} is not a date (YYYY-MM-DD)")))?,
                ),
                // DuckDB casts the text to the parameter's type when it binds it, exactly
                // (decimals keep every digit).
                _ => Value::Text(value.clone()),
            },
        })
    }
}

/// Days since 1970-01-01 of an ISO date `YYYY-MM-DD`.
fn parse_date(text: &str) -> Option<i32> {
    let mut parts = text.trim().splitn(3, '-');
    let year: i64 = parts.next()?.parse().ok()?;
    let month: i64 = parts.next()?.parse().ok()?;
    let day: i64 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if day > month_days[(month - 1) as usize] {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    i32::try_from(era * 146_097 + doe - 719_468).ok()
}

impl Params {
    /// Read `params` from a JSON body: an array, an object, or absent/null.
    pub fn from_json(value: Option<&serde_json::Value>) -> Result<Self, ParamError> {
        match value {
            None | Some(serde_json::Value::Null) => Ok(Self::default()),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| ParamValue::from_json(&format!("${}", i + 1), v))
                .collect::<Result<_, _>>()
                .map(Self::Positional),
            Some(serde_json::Value::Object(map)) => map
                .iter()
                .map(|(k, v)| {
                    let name = k.trim_start_matches('$').to_owned();
                    ParamValue::from_json(&format!("${name}"), v).map(|p| (name, p))
                })
                .collect::<Result<_, _>>()
                .map(Self::Named),
            Some(_) => Err(ParamError::NotACollection),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Positional(v) => v.len(),
            Self::Named(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values in the statement's parameter order, given the statement's parameter names.
    pub(crate) fn bind_order(&self, names: &[String]) -> Result<Vec<Value>, ParamError> {
        match self {
            Self::Positional(values) => {
                if values.len() != names.len() {
                    return Err(ParamError::Count {
                        expected: names.len(),
                        given: values.len(),
                    });
                }
                values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v.to_duckdb(&format!("${}", i + 1)))
                    .collect()
            }
            Self::Named(map) => {
                if names.iter().all(|n| n.parse::<usize>().is_ok()) && !names.is_empty() {
                    return Err(ParamError::NeedPositional);
                }
                let mut values = Vec::with_capacity(names.len());
                for name in names {
                    let value = map
                        .get(name)
                        .ok_or_else(|| ParamError::Missing(name.clone()))?;
                    values.push(value.to_duckdb(&format!("${name}"))?);
                }
                if let Some(unused) = map.keys().find(|k| !names.contains(k)) {
                    return Err(ParamError::Unused(format!("${unused}")));
                }
                Ok(values)
            }
        }
    }
}

/// `EXPLAIN` of a query instead of its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Explain {
    /// The plan DuckDB would run (nothing executes).
    Plan,
    /// The plan with the time and rows of each operator: the query runs, its rows are dropped.
    Analyze,
}

impl Explain {
    pub const ALL: [Explain; 2] = [Explain::Plan, Explain::Analyze];

    /// The `explain` parameter's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Plan => "plan",
            Self::Analyze => "analyze",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|e| e.name().eq_ignore_ascii_case(name))
    }

    /// The text DuckDB runs for a statement that the gate accepted as one SELECT. The option
    /// list is written out in full so that no prefix of the statement can be read as options:
    /// what follows it is parsed exactly as the statement alone was.
    pub(crate) fn wrap(self, sql: &str) -> String {
        match self {
            Self::Plan => format!("EXPLAIN (FORMAT text) {sql}"),
            Self::Analyze => format!("EXPLAIN (ANALYZE, FORMAT text) {sql}"),
        }
    }
}

/// What one query asks for.
#[derive(Clone, Debug)]
pub struct QuerySpec<'a> {
    pub sql: &'a str,
    pub params: &'a Params,
    /// Rows delivered at most; more makes the result `truncated`.
    pub max_rows: u64,
    /// Its plan instead of its result.
    pub explain: Option<Explain>,
}

/// Whether the sink wants more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Receives a query's result as it is produced.
pub trait ResultSink {
    /// Called once, before execution starts: the handle interrupts the query from any thread.
    fn started(&mut self, interrupt: InterruptHandle);
    /// The result's schema, before any batch.
    fn schema(&mut self, schema: SchemaRef) -> Flow;
    fn batch(&mut self, batch: RecordBatch) -> Flow;
}

/// How a query ended (when it did not fail).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub rows: u64,
    pub truncated: bool,
    /// The sink stopped the query early.
    pub stopped: bool,
}

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// The statement gate refused it (see [`crate::gate`]).
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Param(#[from] ParamError),
    /// DuckDB could not parse the statement.
    #[error("{0}")]
    Syntax(String),
    /// DuckDB could not bind it: unknown table or column, type mismatch.
    #[error("{0}")]
    Binder(String),
    /// The sandbox refused a file or setting.
    #[error("{0}")]
    Permission(String),
    #[error("{0}")]
    OutOfMemory(String),
    /// Interrupted (deadline or cancellation).
    #[error("the query was interrupted")]
    Interrupted,
    /// Any other error DuckDB raised while running the statement (conversion, invalid input…).
    #[error("{0}")]
    Execution(String),
    /// The result could not be encoded.
    #[error(transparent)]
    Encode(#[from] crate::encode::EncodeError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl QueryError {
    /// Classify a DuckDB error of duckdb-rs.
    pub fn from_duckdb(error: duckdb::Error) -> Self {
        match error {
            duckdb::Error::DuckDBFailure(_, Some(message)) => Self::from_message(message),
            other => Self::from_message(other.to_string()),
        }
    }

    /// Classify a DuckDB error message by the error class DuckDB prefixes it with.
    pub fn from_message(message: String) -> Self {
        let class = message
            .split_once(" Error:")
            .map(|(c, _)| c.trim().to_ascii_lowercase());
        match class.as_deref() {
            Some("parser") => Self::Syntax(message),
            Some("binder") | Some("catalog") => Self::Binder(message),
            Some("permission") => Self::Permission(message),
            Some("out of memory") => Self::OutOfMemory(message),
            Some("interrupt") => Self::Interrupted,
            Some("internal") | Some("fatal") => Self::Internal(message),
            _ if message.contains("Interrupted") => Self::Interrupted,
            _ => Self::Execution(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dates_parse_to_days_since_epoch() {
        assert_eq!(parse_date("1970-01-01"), Some(0));
        assert_eq!(parse_date("2024-02-29"), Some(19_782));
        assert_eq!(parse_date("1969-12-31"), Some(-1));
        assert_eq!(parse_date("2023-02-29"), None);
        assert_eq!(parse_date("2024-13-01"), None);
        assert_eq!(parse_date("yesterday"), None);
    }

    #[test]
    fn params_from_json() {
        let p = Params::from_json(Some(&json!([
            1,
            "a",
            null,
            1.5,
            true,
            18446744073709551615u64
        ])))
        .expect("positional");
        assert_eq!(
            p,
            Params::Positional(vec![
                ParamValue::Int(1),
                ParamValue::Text("a".into()),
                ParamValue::Null,
                ParamValue::Float(1.5),
                ParamValue::Bool(true),
                ParamValue::UInt(u64::MAX),
            ])
        );
        let p = Params::from_json(Some(
            &json!({"$min": 3, "d": {"type": "date", "value": "2024-01-01"}}),
        ))
        .expect("named");
        let Params::Named(map) = p else {
            panic!("named")
        };
        assert_eq!(map["min"], ParamValue::Int(3));
        assert!(Params::from_json(Some(&json!("x"))).is_err());
        assert!(Params::from_json(Some(&json!([[1]]))).is_err());
        assert!(Params::from_json(Some(&json!([{"type": "nope", "value": "1"}]))).is_err());
    }

    #[test]
    fn bind_order_checks_counts_and_names() {
        let positional = Params::Positional(vec![ParamValue::Int(1)]);
        assert!(positional.bind_order(&["1".into()]).is_ok());
        assert_eq!(
            positional.bind_order(&["1".into(), "2".into()]),
            Err(ParamError::Count {
                expected: 2,
                given: 1
            })
        );
        let named = Params::Named(BTreeMap::from([("min".into(), ParamValue::Int(1))]));
        assert!(named.bind_order(&["min".into()]).is_ok());
        assert_eq!(
            named.bind_order(&["max".into()]),
            Err(ParamError::Missing("max".into()))
        );
        let extra = Params::Named(BTreeMap::from([
            ("min".into(), ParamValue::Int(1)),
            ("x".into(), ParamValue::Int(2)),
        ]));
        assert_eq!(
            extra.bind_order(&["min".into()]),
            Err(ParamError::Unused("$x".into()))
        );
    }
}
