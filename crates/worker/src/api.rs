//! The API's bodies: what requests send and responses carry, with the schemas `/openapi.json`
//! publishes (derived from these same structs, so the contract cannot drift from the code).

use ferrocorn_query_core::{Explain, Format};
use serde::{Deserialize, Serialize};
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaFormat, SchemaType, Type};
use utoipa::{IntoResponses, PartialSchema, ToResponse, ToSchema};

use crate::problem::Problem;

/// The JSON body of `POST /v1/query`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueryBody {
    /// One read-only SQL statement.
    #[schema(min_length = 1, example = "SELECT 42 AS answer")]
    pub sql: String,
    /// The statement's parameters, as [`params_schema`] describes them.
    #[serde(default)]
    #[schema(schema_with = params_schema)]
    pub params: Option<serde_json::Value>,
    /// json, ndjson, csv, arrow or parquet; overrides `Accept`.
    #[serde(default)]
    #[schema(value_type = Option<FormatName>)]
    pub format: Option<String>,
    /// Rows at most (below the server's maximum).
    #[serde(default)]
    #[schema(value_type = Option<UInt64>)]
    pub limit: Option<u64>,
    /// Deadline in milliseconds (below the server's maximum).
    #[serde(default)]
    #[schema(value_type = Option<UInt64>)]
    pub timeout_ms: Option<u64>,
    /// `plan` answers the query's plan instead of its result (nothing runs); `analyze` runs it
    /// and answers the plan with each operator's time and rows.
    #[serde(default)]
    #[schema(value_type = Option<ExplainName>)]
    pub explain: Option<String>,
}

/// `params`: an array (positional), an object (named) or null; its values are checked when they
/// are bound. (utoipa has no type for "array or object"; the description is the contract's.)
fn params_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([
            Type::Array,
            Type::Object,
            Type::Null,
        ]))
        .description(Some(
            "Positional (array, for `$1` or `?`) or named (object, for `$name`) parameters: JSON \
             scalars, or `{\"type\": \"date\", \"value\": \"2024-01-31\"}` for typed values.",
        ))
        .into()
}

/// A string that is one of `names`.
fn one_of_names(names: impl IntoIterator<Item = &'static str>, description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(names))
        .description(Some(description))
        .into()
}

/// The names `format` takes: query-core's own list, so that the contract cannot name another.
#[derive(Debug)]
pub struct FormatName;

impl PartialSchema for FormatName {
    fn schema() -> RefOr<Schema> {
        one_of_names(
            Format::ALL.map(Format::name),
            "A result format (case does not matter).",
        )
    }
}

impl ToSchema for FormatName {}

/// The names `explain` takes: query-core's own list.
#[derive(Debug)]
pub struct ExplainName;

impl PartialSchema for ExplainName {
    fn schema() -> RefOr<Schema> {
        one_of_names(
            Explain::ALL.map(Explain::name),
            "What to explain instead of answering the result (case does not matter).",
        )
    }
}

impl ToSchema for ExplainName {}

/// A count the server caps at its own maximum (`limit`, `timeout_ms`): any integer a `u64`
/// holds. (utoipa's `u64` says `int64`, whose range stops at 2^63 - 1.)
#[derive(Debug)]
pub struct UInt64;

impl PartialSchema for UInt64 {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(0))
            .maximum(Some(u64::MAX))
            .into()
    }
}

impl ToSchema for UInt64 {}

/// The bytes of a binary result (Arrow IPC stream, Parquet file).
#[derive(Debug)]
pub struct Binary;

impl PartialSchema for Binary {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::Binary,
            )))
            .into()
    }
}

impl ToSchema for Binary {}

/// `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: &'static str,
    /// The worker's slot.
    pub slot: usize,
    /// The worker's process id.
    pub pid: u32,
}

/// `GET /readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    /// Always `ready`.
    pub status: &'static str,
    pub slot: usize,
    pub pid: u32,
    /// DuckDB's version.
    pub duckdb: String,
    /// Registered datasets.
    pub datasets: usize,
    /// What enforces the worker's file-system boundary: `landlock (ABI 7) and duckdb`, or
    /// `duckdb only: <why>` where the kernel has no Landlock.
    pub sandbox: String,
}

/// A column: its name and DuckDB type.
#[derive(Debug, Serialize, ToSchema)]
pub struct ColumnDoc {
    pub name: String,
    /// DuckDB's type name, e.g. `DECIMAL(12,2)`.
    #[serde(rename = "type")]
    pub sql_type: String,
}

/// A dataset of the data directory.
#[derive(Debug, Serialize, ToSchema)]
pub struct DatasetDoc {
    pub name: String,
    pub columns: Vec<ColumnDoc>,
    /// Parquet files, relative to the data directory.
    pub files: Vec<String>,
    /// Total size of the files in bytes.
    pub bytes: u64,
    /// Rows according to the Parquet footers.
    pub row_estimate: Option<u64>,
    /// The version being served: changes whenever any file of the dataset changes (for a
    /// snapshot, once the snapshot of the new files is built).
    pub dataset_version: String,
    /// `parquet` (views over the files) or `snapshot` (a DuckDB file built from them).
    pub storage: &'static str,
    /// The snapshot file's size in bytes, when served from a snapshot.
    pub snapshot_bytes: Option<u64>,
    /// The version of the files whose snapshot is being built, while it is not served yet.
    pub pending_version: Option<String>,
    /// Whether queries can read it; when not, `error` says why (its files are not valid
    /// Parquet, say) and queries naming it are answered 503 `dataset_unavailable`.
    pub available: bool,
    pub error: Option<String>,
    /// Why its snapshot could not be built (a `sort_key` that is not one of its columns, say):
    /// it is served from Parquet, and the build is not tried again until its files or options
    /// change.
    pub snapshot_error: Option<String>,
}

/// `GET /v1/datasets`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DatasetList {
    pub datasets: Vec<DatasetDoc>,
}

/// A result in the `json` format. Integers outside ±2^53, HUGEINT and DECIMAL values are
/// strings, so that no digit is lost; dates and timestamps are ISO 8601 strings.
#[derive(Debug, Serialize, ToSchema)]
pub struct JsonResult {
    pub columns: Vec<ColumnDoc>,
    /// One array per row, cells in column order.
    pub rows: Vec<Vec<serde_json::Value>>,
    pub row_count: u64,
    /// Whether more rows existed than were returned (the `limit` or the server maximum).
    pub truncated: bool,
}

/// The result of a query, in the format chosen by `format` or `Accept`. `X-Result-Truncated` and
/// `X-Result-Rows` are headers when the result fits in the first MiB and trailers otherwise (sent
/// to clients that ask with `TE: trailers`); `Server-Timing` gives queue, execution and encoding
/// times (for a streamed result: the queue time as a header, all three as a trailer).
// Only the description is used: the encoders write the bytes, so no variant is ever built.
#[allow(dead_code)]
#[derive(Debug, ToResponse)]
pub enum QueryResult {
    Json(#[content("application/json")] JsonResult),
    Ndjson(#[content("application/x-ndjson")] String),
    Csv(#[content("text/csv")] String),
    Arrow(#[content("application/vnd.apache.arrow.stream")] Binary),
    Parquet(#[content("application/vnd.apache.parquet")] Binary),
}

/// The errors both forms of `/v1/query` can answer.
// Only the description is used: errors are built as `ApiError`s.
#[allow(dead_code)]
#[derive(Debug, IntoResponses)]
pub enum QueryErrors {
    /// SQL error (`sql_syntax`, `sql_binder`, `sql_error`), several statements
    /// (`multiple_statements`), bad parameters (`invalid_parameter`) or request.
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem),
    /// Not a read-only query (`statement_not_allowed`) or outside the sandbox (`access_denied`).
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(Problem),
    /// No acceptable format (`not_acceptable`).
    #[response(status = 406, content_type = "application/problem+json")]
    NotAcceptable(Problem),
    /// `overloaded` (with `Retry-After`) or `out_of_memory`.
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
    /// `query_timeout`: the deadline passed and DuckDB was interrupted.
    #[response(status = 504, content_type = "application/problem+json")]
    Timeout(Problem),
}

/// The errors `POST /v1/auth/token` can answer.
// Only the description is used: errors are built as `ApiError`s.
#[allow(dead_code)]
#[derive(Debug, IntoResponses)]
pub enum TokenErrors {
    /// The body is not credentials (`invalid_body`).
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem),
    /// Wrong username or password (`invalid_credentials`), with `WWW-Authenticate`.
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    /// This pool issues no tokens: it has no `secret_key` (`tokens_unavailable`).
    #[response(status = 404, content_type = "application/problem+json")]
    NoTokens(Problem),
    /// Too many logins a minute from this client address (`rate_limited`), with `Retry-After`,
    /// `RateLimit` and `RateLimit-Policy`.
    #[response(status = 429, content_type = "application/problem+json")]
    RateLimited(Problem),
}

/// What an operation that takes a credential can answer besides its own responses (the front
/// line's check, `login::check`, answers them before any handler runs).
// Only the description is used: errors are built as `ApiError`s.
#[allow(dead_code)]
#[derive(Debug, IntoResponses)]
pub enum CredentialErrors {
    /// No credential where one is needed (`unauthorized`), or one that is not valid
    /// (`invalid_token`, `token_expired`); with `WWW-Authenticate`.
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    /// The credential lacks the operation's scope (`insufficient_scope`) or may not read the
    /// dataset (`dataset_forbidden`).
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(Problem),
    /// More requests a minute than the credential's limit (`rate_limited`), with `Retry-After`,
    /// `RateLimit` and `RateLimit-Policy`.
    #[response(status = 429, content_type = "application/problem+json")]
    RateLimited(Problem),
}
