//! Result encoders: Arrow record batches in, response bytes out.
//!
//! An [`Encoder`] is fed the result's batches as DuckDB produces them and returns the bytes to
//! send after each, so a large result streams with bounded memory. JSON, NDJSON and CSV cells are
//! written straight from the Arrow arrays into the output buffer: numbers, booleans and strings by
//! hand, everything else (dates, timestamps, decimals, intervals) through arrow's
//! `ArrayFormatter`, which writes into the buffer without an intermediate value.
//!
//! JSON is exact: integers outside ±2^53 (JavaScript's safe range), 128-bit integers and decimals
//! are strings; dates and timestamps are ISO 8601.

use std::io::Write;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, FixedSizeListArray, GenericListArray, MapArray,
    OffsetSizeTrait, StructArray,
};
use arrow::datatypes::{
    DataType, Float16Type, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type,
    SchemaRef, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow::error::ArrowError;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use parquet::arrow::ArrowWriter;

/// The result formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    Json,
    Ndjson,
    Csv,
    Arrow,
    Parquet,
}

impl Format {
    pub const ALL: [Format; 5] = [
        Format::Json,
        Format::Ndjson,
        Format::Csv,
        Format::Arrow,
        Format::Parquet,
    ];

    /// The `format` parameter's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Ndjson => "ndjson",
            Self::Csv => "csv",
            Self::Arrow => "arrow",
            Self::Parquet => "parquet",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(name))
    }

    /// The media type of the response.
    pub fn media_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Ndjson => "application/x-ndjson",
            Self::Csv => "text/csv; charset=utf-8; header=present",
            Self::Arrow => "application/vnd.apache.arrow.stream",
            Self::Parquet => "application/vnd.apache.parquet",
        }
    }

    /// Media types that select this format in an `Accept` header.
    pub fn accepted_media_types(self) -> &'static [&'static str] {
        match self {
            Self::Json => &["application/json"],
            Self::Ndjson => &[
                "application/x-ndjson",
                "application/jsonl",
                "application/ndjson",
            ],
            Self::Csv => &["text/csv"],
            Self::Arrow => &[
                "application/vnd.apache.arrow.stream",
                "application/vnd.apache.arrow",
            ],
            Self::Parquet => &["application/vnd.apache.parquet", "application/x-parquet"],
        }
    }
}

/// Why a result could not be encoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("cannot encode the result as Arrow data")]
    Arrow(#[from] ArrowError),
    #[error("cannot write the result as Parquet")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("cannot write the result")]
    Write(#[from] std::io::Error),
    #[error("the result ended before its schema")]
    NoSchema,
}

/// The end of a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub rows: u64,
    pub truncated: bool,
}

/// Encodes one result.
pub struct Encoder {
    format: Format,
    schema: SchemaRef,
    state: State,
    rows: u64,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("format", &self.format)
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

enum State {
    Text,
    Arrow(StreamWriter<Vec<u8>>),
    Parquet(ArrowWriter<Vec<u8>>),
}

/// A timestamp column whose zone is a name (DuckDB's `TIMESTAMP WITH TIME ZONE` is labelled with
/// its `TimeZone` setting, e.g. `UTC`) relabelled `+00:00`: Arrow's formatter only knows offsets
/// without a zone database, and the values are UTC instants whatever the label, so this prints the
/// same instant. Other columns are returned as they are.
fn offset_timezone(column: &ArrayRef) -> ArrayRef {
    match column.data_type() {
        DataType::Timestamp(unit, Some(tz)) if !tz.starts_with(['+', '-']) => {
            let relabelled = column
                .to_data()
                .into_builder()
                .data_type(DataType::Timestamp(*unit, Some("+00:00".into())))
                .build();
            match relabelled {
                Ok(data) => arrow::array::make_array(data),
                Err(_) => column.clone(),
            }
        }
        _ => column.clone(),
    }
}

fn options() -> FormatOptions<'static> {
    FormatOptions::new().with_display_error(false).with_null("")
}

impl Encoder {
    /// Start encoding a result with `schema`; returns the encoder and the first bytes.
    pub fn new(format: Format, schema: SchemaRef) -> Result<(Self, Vec<u8>), EncodeError> {
        let mut head = Vec::new();
        let state = match format {
            Format::Json => {
                head.extend_from_slice(b"{\"columns\":[");
                for (i, field) in schema.fields().iter().enumerate() {
                    if i > 0 {
                        head.push(b',');
                    }
                    head.extend_from_slice(b"{\"name\":");
                    write_json_string(&mut head, field.name());
                    head.extend_from_slice(b",\"type\":");
                    write_json_string(&mut head, &sql_type_name(field.data_type()));
                    head.push(b'}');
                }
                head.extend_from_slice(b"],\"rows\":[");
                State::Text
            }
            Format::Ndjson => State::Text,
            Format::Csv => {
                for (i, field) in schema.fields().iter().enumerate() {
                    if i > 0 {
                        head.push(b',');
                    }
                    write_csv_field(&mut head, field.name());
                }
                head.extend_from_slice(b"\r\n");
                State::Text
            }
            Format::Arrow => {
                let mut writer = StreamWriter::try_new(Vec::new(), &schema)?;
                writer.flush()?;
                head = std::mem::take(writer.get_mut());
                State::Arrow(writer)
            }
            Format::Parquet => {
                let props = parquet::file::properties::WriterProperties::builder()
                    .set_compression(parquet::basic::Compression::SNAPPY)
                    .build();
                let writer = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props))?;
                State::Parquet(writer)
            }
        };
        Ok((
            Self {
                format,
                schema,
                state,
                rows: 0,
            },
            head,
        ))
    }

    /// Encode one batch; returns the bytes ready to send (possibly none).
    pub fn batch(&mut self, batch: &RecordBatch) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::new();
        match &mut self.state {
            State::Text => {
                let columns: Vec<ArrayRef> = batch.columns().iter().map(offset_timezone).collect();
                let columns = columns.as_slice();
                let formatters: Vec<ArrayFormatter<'_>> = columns
                    .iter()
                    .map(|c| ArrayFormatter::try_new(c.as_ref(), &options()))
                    .collect::<Result<_, _>>()?;
                let names: Vec<&str> = self
                    .schema
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect();
                for row in 0..batch.num_rows() {
                    match self.format {
                        Format::Json => {
                            if self.rows > 0 {
                                out.push(b',');
                            }
                            out.push(b'[');
                            for (i, column) in columns.iter().enumerate() {
                                if i > 0 {
                                    out.push(b',');
                                }
                                write_json_value(&mut out, column, &formatters[i], row)?;
                            }
                            out.push(b']');
                        }
                        Format::Ndjson => {
                            out.push(b'{');
                            for (i, column) in columns.iter().enumerate() {
                                if i > 0 {
                                    out.push(b',');
                                }
                                write_json_string(&mut out, names[i]);
                                out.push(b':');
                                write_json_value(&mut out, column, &formatters[i], row)?;
                            }
                            out.extend_from_slice(b"}\n");
                        }
                        _ => {
                            for (i, column) in columns.iter().enumerate() {
                                if i > 0 {
                                    out.push(b',');
                                }
                                write_csv_value(&mut out, column, &formatters[i], row)?;
                            }
                            out.extend_from_slice(b"\r\n");
                        }
                    }
                    self.rows += 1;
                }
            }
            State::Arrow(writer) => {
                writer.write(batch)?;
                writer.flush()?;
                out = std::mem::take(writer.get_mut());
                self.rows += batch.num_rows() as u64;
            }
            State::Parquet(writer) => {
                writer.write(batch)?;
                self.rows += batch.num_rows() as u64;
                if writer.in_progress_size() >= 8 << 20 {
                    writer.flush()?;
                }
                out = std::mem::take(writer.inner_mut());
            }
        }
        Ok(out)
    }

    /// Finish the result; returns the last bytes.
    pub fn finish(self, summary: Summary) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::new();
        match self.state {
            State::Text => {
                if self.format == Format::Json {
                    write!(
                        out,
                        "],\"row_count\":{},\"truncated\":{}}}",
                        summary.rows, summary.truncated
                    )
                    .map_err(ArrowError::from)?;
                }
            }
            State::Arrow(mut writer) => {
                writer.finish()?;
                out = std::mem::take(writer.get_mut());
            }
            State::Parquet(mut writer) => {
                writer.append_key_value_metadata(parquet::file::metadata::KeyValue::new(
                    "ferrocorn.truncated".to_owned(),
                    summary.truncated.to_string(),
                ));
                out = writer.into_inner()?;
            }
        }
        Ok(out)
    }
}

/// The SQL name of an Arrow type as DuckDB exports it.
pub fn sql_type_name(data_type: &DataType) -> String {
    match data_type {
        DataType::Null => "NULL".into(),
        DataType::Boolean => "BOOLEAN".into(),
        DataType::Int8 => "TINYINT".into(),
        DataType::Int16 => "SMALLINT".into(),
        DataType::Int32 => "INTEGER".into(),
        DataType::Int64 => "BIGINT".into(),
        DataType::UInt8 => "UTINYINT".into(),
        DataType::UInt16 => "USMALLINT".into(),
        DataType::UInt32 => "UINTEGER".into(),
        DataType::UInt64 => "UBIGINT".into(),
        DataType::Float16 | DataType::Float32 => "FLOAT".into(),
        DataType::Float64 => "DOUBLE".into(),
        DataType::Decimal128(38, 0) => "HUGEINT".into(),
        DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => format!("DECIMAL({p},{s})"),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "VARCHAR".into(),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => "BLOB".into(),
        DataType::FixedSizeBinary(16) => "UUID".into(),
        DataType::FixedSizeBinary(_) => "BLOB".into(),
        DataType::Date32 | DataType::Date64 => "DATE".into(),
        DataType::Time32(_) | DataType::Time64(_) => "TIME".into(),
        DataType::Timestamp(_, Some(_)) => "TIMESTAMP WITH TIME ZONE".into(),
        DataType::Timestamp(_, None) => "TIMESTAMP".into(),
        DataType::Interval(_) | DataType::Duration(_) => "INTERVAL".into(),
        DataType::List(f) | DataType::LargeList(f) | DataType::ListView(f) => {
            format!("{}[]", sql_type_name(f.data_type()))
        }
        DataType::FixedSizeList(f, n) => format!("{}[{n}]", sql_type_name(f.data_type())),
        DataType::Struct(fields) => {
            let inner: Vec<String> = fields
                .iter()
                .map(|f| format!("{} {}", f.name(), sql_type_name(f.data_type())))
                .collect();
            format!("STRUCT({})", inner.join(", "))
        }
        DataType::Map(entries, _) => match entries.data_type() {
            DataType::Struct(kv) if kv.len() == 2 => format!(
                "MAP({}, {})",
                sql_type_name(kv[0].data_type()),
                sql_type_name(kv[1].data_type())
            ),
            _ => "MAP".into(),
        },
        DataType::Dictionary(_, value) => sql_type_name(value),
        other => other.to_string(),
    }
}

/// JavaScript's largest exactly representable integer.
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

fn write_json_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0..=0x1f => None,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        match escape {
            Some(e) => out.extend_from_slice(e),
            None => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Write a formatted value as a JSON string, escaping as it goes.
fn write_json_formatted(
    out: &mut Vec<u8>,
    formatter: &ArrayFormatter<'_>,
    row: usize,
) -> Result<(), ArrowError> {
    let start = out.len();
    write!(out, "{}", formatter.value(row)).map_err(ArrowError::from)?;
    let needs_escape = out[start..]
        .iter()
        .any(|&b| b == b'"' || b == b'\\' || b < 0x20);
    if needs_escape {
        let raw = out.split_off(start);
        write_json_string(out, &String::from_utf8_lossy(&raw));
    } else {
        out.insert(start, b'"');
        out.push(b'"');
    }
    Ok(())
}

fn write_json_value(
    out: &mut Vec<u8>,
    array: &ArrayRef,
    formatter: &ArrayFormatter<'_>,
    row: usize,
) -> Result<(), ArrowError> {
    if array.is_null(row) {
        out.extend_from_slice(b"null");
        return Ok(());
    }
    macro_rules! int {
        ($t:ty) => {{
            let v = array.as_primitive::<$t>().value(row);
            if (v as i128).unsigned_abs() > MAX_SAFE_INTEGER as u128 {
                write!(out, "\"{v}\"").map_err(ArrowError::from)?;
            } else {
                write!(out, "{v}").map_err(ArrowError::from)?;
            }
        }};
    }
    macro_rules! float {
        ($t:ty) => {{
            let v = f64::from(array.as_primitive::<$t>().value(row));
            if v.is_finite() {
                write!(out, "{v}").map_err(ArrowError::from)?;
            } else {
                // NaN and infinities have no JSON number form.
                write!(out, "\"{v}\"").map_err(ArrowError::from)?;
            }
        }};
    }
    match array.data_type() {
        DataType::Boolean => {
            let v = array
                .as_any()
                .downcast_ref::<BooleanArray>()
                .is_some_and(|a| a.value(row));
            out.extend_from_slice(if v { b"true" } else { b"false" });
        }
        DataType::Int8 => int!(Int8Type),
        DataType::Int16 => int!(Int16Type),
        DataType::Int32 => int!(Int32Type),
        DataType::Int64 => int!(Int64Type),
        DataType::UInt8 => int!(UInt8Type),
        DataType::UInt16 => int!(UInt16Type),
        DataType::UInt32 => int!(UInt32Type),
        DataType::UInt64 => int!(UInt64Type),
        DataType::Float16 => {
            let v = f64::from(array.as_primitive::<Float16Type>().value(row).to_f32());
            write!(out, "{v}").map_err(ArrowError::from)?;
        }
        DataType::Float32 => float!(Float32Type),
        DataType::Float64 => float!(Float64Type),
        DataType::Utf8 => write_json_string(out, array.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => write_json_string(out, array.as_string::<i64>().value(row)),
        DataType::Utf8View => write_json_string(out, array.as_string_view().value(row)),
        DataType::List(_) => write_json_list(out, array.as_list::<i32>(), row)?,
        DataType::LargeList(_) => write_json_list(out, array.as_list::<i64>(), row)?,
        DataType::FixedSizeList(_, _) => {
            let list: &FixedSizeListArray = array.as_fixed_size_list();
            write_json_array(out, &list.value(row))?;
        }
        DataType::Struct(_) => {
            let s: &StructArray = array.as_struct();
            out.push(b'{');
            for (i, (field, column)) in s.fields().iter().zip(s.columns()).enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_string(out, field.name());
                out.push(b':');
                let formatter = ArrayFormatter::try_new(column.as_ref(), &options())?;
                write_json_value(out, column, &formatter, row)?;
            }
            out.push(b'}');
        }
        DataType::Map(_, _) => {
            // A map is an array of {"key", "value"} objects: keys need not be strings.
            let map: &MapArray = array.as_map();
            let entries = map.value(row);
            let entries: ArrayRef = Arc::new(entries);
            write_json_array(out, &entries)?;
        }
        _ => write_json_formatted(out, formatter, row)?,
    }
    Ok(())
}

fn write_json_list<O: OffsetSizeTrait>(
    out: &mut Vec<u8>,
    list: &GenericListArray<O>,
    row: usize,
) -> Result<(), ArrowError> {
    write_json_array(out, &list.value(row))
}

fn write_json_array(out: &mut Vec<u8>, values: &ArrayRef) -> Result<(), ArrowError> {
    let formatter = ArrayFormatter::try_new(values.as_ref(), &options())?;
    out.push(b'[');
    for i in 0..values.len() {
        if i > 0 {
            out.push(b',');
        }
        write_json_value(out, values, &formatter, i)?;
    }
    out.push(b']');
    Ok(())
}

fn write_csv_field(out: &mut Vec<u8>, text: &str) {
    if text
        .bytes()
        .any(|b| matches!(b, b'"' | b',' | b'\n' | b'\r'))
        || text.starts_with(' ')
        || text.ends_with(' ')
    {
        out.push(b'"');
        for b in text.bytes() {
            if b == b'"' {
                out.push(b'"');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        out.extend_from_slice(text.as_bytes());
    }
}

fn write_csv_value(
    out: &mut Vec<u8>,
    array: &ArrayRef,
    formatter: &ArrayFormatter<'_>,
    row: usize,
) -> Result<(), ArrowError> {
    if array.is_null(row) {
        return Ok(());
    }
    match array.data_type() {
        DataType::Utf8 => write_csv_field(out, array.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => write_csv_field(out, array.as_string::<i64>().value(row)),
        DataType::Utf8View => write_csv_field(out, array.as_string_view().value(row)),
        DataType::List(_)
        | DataType::LargeList(_)
        | DataType::FixedSizeList(_, _)
        | DataType::Struct(_)
        | DataType::Map(_, _) => {
            // Nested values are written as their JSON text in one field.
            let mut json = Vec::new();
            write_json_value(&mut json, array, formatter, row)?;
            write_csv_field(out, &String::from_utf8_lossy(&json));
        }
        _ => {
            let start = out.len();
            write!(out, "{}", formatter.value(row)).map_err(ArrowError::from)?;
            if out[start..]
                .iter()
                .any(|b| matches!(b, b'"' | b',' | b'\n' | b'\r'))
            {
                let raw = out.split_off(start);
                write_csv_field(out, &String::from_utf8_lossy(&raw));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Every format round-trips the sample data's types, NULLs included, compared with DuckDB's
    //! own answer.

    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use arrow::record_batch::RecordBatch;
    use duckdb::Connection;

    use super::*;
    use crate::query::{Flow, Params, QuerySpec, ResultSink};
    use crate::{Engine, EngineSettings, InterruptHandle};

    fn sample_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample")
    }

    /// Every column type of the sample data, with NULLs in `discount` and `is_premium`.
    const SQL: &str = "SELECT o.*, c.name, c.country, c.signup_date, c.is_premium \
                       FROM orders o JOIN customers c USING (customer_id) ORDER BY order_id";

    struct Collect {
        encoder: Option<Encoder>,
        format: Format,
        bytes: Vec<u8>,
    }

    impl ResultSink for Collect {
        fn started(&mut self, _: InterruptHandle) {}
        fn schema(&mut self, schema: SchemaRef) -> Flow {
            let (encoder, head) = Encoder::new(self.format, schema).expect("encoder");
            self.bytes.extend(head);
            self.encoder = Some(encoder);
            Flow::Continue
        }
        fn batch(&mut self, batch: RecordBatch) -> Flow {
            let bytes = self
                .encoder
                .as_mut()
                .expect("encoder")
                .batch(&batch)
                .expect("batch");
            self.bytes.extend(bytes);
            Flow::Continue
        }
    }

    fn encode_with(engine: &Engine, format: Format) -> Vec<u8> {
        let mut sink = Collect {
            encoder: None,
            format,
            bytes: Vec::new(),
        };
        let params = Params::default();
        let outcome = engine
            .run(
                &QuerySpec {
                    sql: SQL,
                    params: &params,
                    max_rows: u64::MAX,
                    explain: None,
                },
                &mut sink,
            )
            .expect("run");
        let encoder = sink.encoder.take().expect("schema seen");
        let tail = encoder
            .finish(Summary {
                rows: outcome.rows,
                truncated: outcome.truncated,
            })
            .expect("finish");
        sink.bytes.extend(tail);
        sink.bytes
    }

    fn fixture() -> (Engine, tempfile::TempDir, Connection) {
        let temp = tempfile::tempdir().expect("tempdir");
        let engine = Engine::open(&EngineSettings {
            data_dir: sample_dir(),
            temp_dir: temp.path().join("w"),
            memory_limit_bytes: 256 << 20,
            threads: 1,
            ..EngineSettings::default()
        })
        .expect("engine");
        // A plain DuckDB connection with the same views gives the reference answer.
        let reference = Connection::open_in_memory().expect("duckdb");
        for info in engine.catalog().iter() {
            reference
                .execute_batch(&info.dataset.view_sql())
                .expect("view");
        }
        (engine, temp, reference)
    }

    fn reference_batches(conn: &Connection) -> Vec<RecordBatch> {
        conn.prepare(SQL)
            .expect("prepare")
            .query_arrow([])
            .expect("query")
            .collect()
    }

    fn concat(batches: &[RecordBatch]) -> RecordBatch {
        arrow::compute::concat_batches(&batches[0].schema(), batches).expect("concat")
    }

    #[test]
    fn arrow_round_trips() {
        let (engine, _temp, reference) = fixture();
        let bytes = encode_with(&engine, Format::Arrow);
        let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
            .expect("reader");
        let ours: Vec<RecordBatch> = reader.collect::<Result<_, _>>().expect("batches");
        assert_eq!(concat(&ours), concat(&reference_batches(&reference)));
    }

    #[test]
    fn parquet_round_trips() {
        let (engine, _temp, reference) = fixture();
        let bytes = bytes::Bytes::from(encode_with(&engine, Format::Parquet));
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .expect("parquet")
            .build()
            .expect("reader");
        let ours: Vec<RecordBatch> = reader.collect::<Result<_, _>>().expect("batches");
        let expected = concat(&reference_batches(&reference));
        let ours = concat(&ours);
        assert_eq!(ours.num_rows(), 5000);
        assert_eq!(ours.columns(), expected.columns());
    }

    #[test]
    fn csv_round_trips_through_duckdb() {
        let (engine, temp, reference) = fixture();
        let bytes = encode_with(&engine, Format::Csv);
        let path = temp.path().join("result.csv");
        std::fs::write(&path, bytes).expect("write");
        // Read our CSV back with DuckDB, with the reference's column types, and diff both ways.
        let types: Vec<String> = reference
            .prepare(&format!(
                "SELECT column_name, column_type FROM (DESCRIBE {SQL})"
            ))
            .expect("describe")
            .query_map([], |r| {
                Ok(format!(
                    "'{}': '{}'",
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?
                ))
            })
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("types");
        let read = format!(
            "SELECT * FROM read_csv('{}', header = true, columns = {{{}}})",
            path.display(),
            types.join(", ")
        );
        let diff: i64 = reference
            .query_row(
                &format!("SELECT count(*) FROM (({SQL}) EXCEPT ALL ({read}) UNION ALL (({read}) EXCEPT ALL ({SQL})))"),
                [],
                |r| r.get(0),
            )
            .expect("diff");
        assert_eq!(diff, 0);
    }

    fn reference_text(conn: &Connection) -> Vec<Vec<Option<String>>> {
        let columns: Vec<String> = conn
            .prepare(&format!("SELECT column_name FROM (DESCRIBE {SQL})"))
            .expect("describe")
            .query_map([], |r| r.get(0))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("names");
        let casts: Vec<String> = columns
            .iter()
            .map(|c| format!("CAST(\"{c}\" AS VARCHAR)"))
            .collect();
        let mut statement = conn
            .prepare(&format!("SELECT {} FROM ({SQL})", casts.join(", ")))
            .expect("prepare");
        statement
            .query_map([], |row| {
                (0..columns.len())
                    .map(|i| row.get::<_, Option<String>>(i))
                    .collect::<Result<Vec<_>, _>>()
            })
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    /// A JSON cell and DuckDB's VARCHAR cast of the same cell denote the same value.
    fn same(json: &serde_json::Value, duckdb: &Option<String>) -> bool {
        match (json, duckdb) {
            (serde_json::Value::Null, None) => true,
            (serde_json::Value::Bool(b), Some(s)) => s == &b.to_string(),
            // serde_json's default float parser may land one ulp off the shortest round-trip text
            // Rust wrote; anything closer than that is the same double.
            (serde_json::Value::Number(n), Some(s)) => match (n.as_f64(), s.parse::<f64>()) {
                (Some(a), Ok(b)) => {
                    a == b || (a - b).abs() <= 2.0 * f64::EPSILON * a.abs().max(b.abs())
                }
                _ => false,
            },
            (serde_json::Value::String(j), Some(s)) => {
                j == s
                    || j.replace('T', " ") == *s
                    || j.parse::<f64>().ok() == s.parse::<f64>().ok() && j.parse::<f64>().is_ok()
            }
            _ => false,
        }
    }

    #[test]
    fn json_and_ndjson_match_duckdb_cell_by_cell() {
        let (engine, _temp, reference) = fixture();
        let expected = reference_text(&reference);
        let json: serde_json::Value =
            serde_json::from_slice(&encode_with(&engine, Format::Json)).expect("json");
        let rows = json["rows"].as_array().expect("rows");
        assert_eq!(rows.len(), expected.len());
        for (ours, theirs) in rows.iter().zip(&expected) {
            let ours = ours.as_array().expect("row");
            for (a, b) in ours.iter().zip(theirs) {
                assert!(same(a, b), "{a} vs {b:?}");
            }
        }
        assert_eq!(json["row_count"], 5000);
        assert!(rows.iter().any(|r| r[6].is_null()), "NULLs survive");

        let ndjson = encode_with(&engine, Format::Ndjson);
        let lines: Vec<serde_json::Value> = ndjson
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("line"))
            .collect();
        assert_eq!(lines.len(), expected.len());
        let names: Vec<String> = json["columns"]
            .as_array()
            .expect("columns")
            .iter()
            .map(|c| c["name"].as_str().expect("name").to_owned())
            .collect();
        for (line, theirs) in lines.iter().zip(&expected) {
            for (name, b) in names.iter().zip(theirs) {
                assert!(same(&line[name], b), "{name}: {} vs {b:?}", line[name]);
            }
        }
    }

    #[test]
    fn csv_quotes_per_rfc_4180() {
        let mut out = Vec::new();
        write_csv_field(&mut out, "a,\"b\"\nc");
        assert_eq!(out, b"\"a,\"\"b\"\"\nc\"");
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut out = Vec::new();
        write_json_string(&mut out, "a\"\\\n\u{1}é");
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "\"a\\\"\\\\\\n\\u0001é\""
        );
    }

    #[test]
    fn zoned_timestamps_print_as_utc_instants() {
        let column: ArrayRef = Arc::new(
            arrow::array::TimestampMicrosecondArray::from(vec![1_704_164_645_000_000])
                .with_timezone("UTC"),
        );
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("t", column.data_type().clone(), true),
        ]));
        let batch = RecordBatch::try_new(schema.clone(), vec![column]).expect("batch");
        for format in [Format::Json, Format::Ndjson, Format::Csv] {
            let (mut encoder, _) = Encoder::new(format, schema.clone()).expect("encoder");
            let text = String::from_utf8(encoder.batch(&batch).expect("encode")).expect("utf8");
            assert!(text.contains("2024-01-02T03:04:05Z"), "{format:?}: {text}");
        }
    }
}
