//! DuckDB's C API, for what duckdb-rs does not offer: the one module of query-core allowed
//! `unsafe`.
//!
//! duckdb-rs's `Connection::prepare` executes every statement of a text but the last, and gives
//! no access to DuckDB's statement extraction or to a raw prepared statement. The query path
//! therefore talks to DuckDB through these few wrappers:
//!
//! - [`Database`]: an in-memory instance opened with its configuration; duckdb-rs connections to
//!   it serve the engine's own catalogue work ([`Database::rust_connection`]).
//! - [`Conn`]: a raw connection, with an [`ConnInterrupt`] any thread may fire.
//! - [`Conn::extract`]: DuckDB's own parser splits a text into statements ([`Extracted`]); one of
//!   them is prepared (bound, planned, never executed) into a [`Prepared`], whose
//!   [`Prepared::statement_type`] is DuckDB's classification.
//! - [`Prepared::execute`]: run it with bound parameters; its [`Stream`] yields Arrow batches.
//!
//! Every handle is destroyed exactly once, by its owner's `Drop`.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char};
use std::ptr;
use std::sync::{Arc, Mutex};

use arrow::array::StructArray;
use arrow::datatypes::{Schema, SchemaRef};
use arrow::ffi::{FFI_ArrowArray, FFI_ArrowSchema, from_ffi};
use arrow::record_batch::RecordBatch;
use duckdb::ffi;

/// A DuckDB error message, as DuckDB wrote it (`Binder Error: …`).
pub type Message = String;

/// Copy a C string DuckDB owns; `fallback` when it gave none.
///
/// # Safety
///
/// `text` is null or points to a NUL-terminated string that lives for the duration of the call.
unsafe fn message(text: *const c_char, fallback: &str) -> Message {
    if text.is_null() {
        return fallback.to_owned();
    }
    // SAFETY: non-null, and NUL-terminated and alive per this function's contract.
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}

fn c_string(text: &str) -> Result<CString, Message> {
    CString::new(text).map_err(|_| "Parser Error: the text contains a NUL byte".to_owned())
}

/// An in-memory DuckDB instance.
#[derive(Debug)]
pub struct Database {
    raw: ffi::duckdb_database,
}

// SAFETY: a DuckDB database handle is a pointer to a shared `DuckDB` instance, which DuckDB
// documents as safe to use from many threads at once (each thread through its own connection).
unsafe impl Send for Database {}
// SAFETY: as above; `&Database` only hands out new connections.
unsafe impl Sync for Database {}

impl Database {
    /// Open an in-memory instance with the given configuration options (`threads`,
    /// `max_memory`, …), each applied before the instance starts.
    pub fn open_in_memory(options: &[(&str, String)]) -> Result<Arc<Self>, Message> {
        let mut config: ffi::duckdb_config = ptr::null_mut();
        // SAFETY: `config` is a valid out-pointer; on success DuckDB allocated a config we
        // destroy below on every path.
        if unsafe { ffi::duckdb_create_config(&mut config) } != ffi::DuckDBSuccess {
            return Err("cannot allocate a DuckDB configuration".into());
        }
        let result = (|| {
            for (name, value) in options {
                let (c_name, c_value) = (c_string(name)?, c_string(value)?);
                // SAFETY: `config` is live; both strings are NUL-terminated and outlive the call
                // (DuckDB copies them).
                let state =
                    unsafe { ffi::duckdb_set_config(config, c_name.as_ptr(), c_value.as_ptr()) };
                if state != ffi::DuckDBSuccess {
                    return Err(format!("invalid DuckDB option {name} = {value}"));
                }
            }
            let mut raw: ffi::duckdb_database = ptr::null_mut();
            let mut error: *mut c_char = ptr::null_mut();
            // SAFETY: a null path opens an in-memory database; `raw` and `error` are valid
            // out-pointers and `config` is live.
            let state = unsafe { ffi::duckdb_open_ext(ptr::null(), &mut raw, config, &mut error) };
            if state != ffi::DuckDBSuccess {
                // SAFETY: on failure `error` is null or a string DuckDB allocated for us to free.
                let text = unsafe { message(error, "cannot open DuckDB") };
                if !error.is_null() {
                    // SAFETY: allocated by DuckDB, freed once.
                    unsafe { ffi::duckdb_free(error.cast()) };
                }
                return Err(text);
            }
            Ok(Arc::new(Self { raw }))
        })();
        // SAFETY: created above, destroyed once; DuckDB copied what it needs at open.
        unsafe { ffi::duckdb_destroy_config(&mut config) };
        result
    }

    /// A raw connection to this instance.
    pub fn connect(self: &Arc<Self>) -> Result<Conn, Message> {
        let mut raw: ffi::duckdb_connection = ptr::null_mut();
        // SAFETY: `self.raw` is open until `self` drops, and `Conn` keeps `self` alive.
        if unsafe { ffi::duckdb_connect(self.raw, &mut raw) } != ffi::DuckDBSuccess {
            return Err("Connection Error: cannot connect to DuckDB".into());
        }
        Ok(Conn {
            raw,
            interrupt: ConnInterrupt(Arc::new(Mutex::new(Interruptible(raw)))),
            _database: self.clone(),
        })
    }

    /// A duckdb-rs connection to this instance, for the engine's own statements.
    ///
    /// The caller keeps the `Database` alive at least as long as the connection (duckdb-rs does
    /// not own the handle it is given).
    pub fn rust_connection(&self) -> duckdb::Result<duckdb::Connection> {
        // SAFETY: `self.raw` is a valid, open database handle; duckdb-rs connects to it without
        // taking ownership (it will not close it), and the engine drops its duckdb-rs connections
        // before its `Database`.
        unsafe { duckdb::Connection::open_from_raw(self.raw) }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        // SAFETY: opened in `open_in_memory`, closed once. Connections still open keep DuckDB's
        // instance alive on their own (each holds a reference to it).
        unsafe { ffi::duckdb_close(&mut self.raw) };
    }
}

/// Interrupts what a connection is running, from any thread; a no-op once the connection has
/// closed.
#[derive(Clone, Debug)]
pub struct ConnInterrupt(Arc<Mutex<Interruptible>>);

/// A connection as the interrupt handle sees it: null once the connection has closed.
#[derive(Debug)]
struct Interruptible(ffi::duckdb_connection);

// SAFETY: the pointer is only used under the handle's mutex, and only for `duckdb_interrupt`,
// which sets an atomic flag in DuckDB and may be called from any thread while another one runs a
// query on the connection.
unsafe impl Send for Interruptible {}

impl ConnInterrupt {
    /// Ask DuckDB to stop the running query; it fails with an interrupt error.
    pub fn interrupt(&self) {
        let raw = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !raw.0.is_null() {
            // SAFETY: non-null means the connection has not been disconnected: `Conn::drop`
            // nulls it under this same lock before disconnecting.
            unsafe { ffi::duckdb_interrupt(raw.0) };
        }
    }
}

/// A raw connection. Not `Sync`: DuckDB runs one statement at a time per connection.
#[derive(Debug)]
pub struct Conn {
    raw: ffi::duckdb_connection,
    interrupt: ConnInterrupt,
    _database: Arc<Database>,
}

// SAFETY: a DuckDB connection may move between threads; it is used by one thread at a time
// (`Conn` is not `Sync`, and every method takes `&self` on the thread that owns it).
unsafe impl Send for Conn {}

impl Conn {
    /// The handle that interrupts this connection's running query.
    pub fn interrupt_handle(&self) -> ConnInterrupt {
        self.interrupt.clone()
    }

    /// Split `sql` into statements with DuckDB's parser. Nothing is bound or executed.
    pub fn extract(&self, sql: &str) -> Result<Extracted<'_>, Message> {
        let text = c_string(sql)?;
        let mut raw: ffi::duckdb_extracted_statements = ptr::null_mut();
        // SAFETY: `self.raw` is a live connection used by this thread only; `text` is
        // NUL-terminated and outlives the call; `raw` is a valid out-pointer.
        let count = unsafe { ffi::duckdb_extract_statements(self.raw, text.as_ptr(), &mut raw) };
        let extracted = Extracted {
            raw,
            count,
            conn: self,
        };
        if count == 0 {
            // SAFETY: `raw` is the live wrapper DuckDB returned; its error string is owned by it.
            let error = unsafe { ffi::duckdb_extract_statements_error(extracted.raw) };
            if !error.is_null() {
                // SAFETY: non-null, NUL-terminated, alive until `extracted` drops.
                return Err(unsafe { message(error, "") });
            }
        }
        Ok(extracted)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let mut guard = self.interrupt.0.lock().unwrap_or_else(|e| e.into_inner());
        guard.0 = ptr::null_mut();
        // SAFETY: connected in `Database::connect`, disconnected once, after the interrupt handle
        // can no longer reach it (it was nulled under the handle's lock, still held).
        unsafe { ffi::duckdb_disconnect(&mut self.raw) };
    }
}

/// The statements DuckDB's parser found in one text.
#[derive(Debug)]
pub struct Extracted<'c> {
    raw: ffi::duckdb_extracted_statements,
    count: u64,
    conn: &'c Conn,
}

impl Extracted<'_> {
    /// How many statements the text holds.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Bind and plan statement `index` (executes nothing).
    pub fn prepare(&self, index: u64) -> Result<Prepared, Message> {
        if index >= self.count {
            return Err("Internal Error: no such statement".into());
        }
        let mut raw: ffi::duckdb_prepared_statement = ptr::null_mut();
        // SAFETY: the connection and the extracted statements are live; `index` is in range; the
        // prepared statement DuckDB writes to `raw` is owned by the `Prepared` built below, even
        // when preparing failed (DuckDB then still allocates one holding the error).
        let state = unsafe {
            ffi::duckdb_prepare_extracted_statement(self.conn.raw, self.raw, index, &mut raw)
        };
        let prepared = Prepared { raw };
        if state != ffi::DuckDBSuccess {
            // SAFETY: `raw` is null or live; DuckDB returns null for a null statement.
            let error = unsafe { ffi::duckdb_prepare_error(prepared.raw) };
            // SAFETY: null or a NUL-terminated string owned by the prepared statement.
            return Err(unsafe { message(error, "Internal Error: cannot prepare the statement") });
        }
        Ok(prepared)
    }
}

impl Drop for Extracted<'_> {
    fn drop(&mut self) {
        // SAFETY: returned by `duckdb_extract_statements`, destroyed once (DuckDB requires it
        // even when extraction failed).
        unsafe { ffi::duckdb_destroy_extracted(&mut self.raw) };
    }
}

/// What DuckDB says a prepared statement is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatementType {
    Select,
    Explain,
    /// Anything else, with DuckDB's type number.
    Other(u32),
}

/// A value to bind to a parameter.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    BigInt(i64),
    UBigInt(u64),
    HugeInt(i128),
    Double(f64),
    Text(String),
    /// Days since 1970-01-01.
    Date(i32),
}

/// A prepared statement: bound and planned, ready to execute with parameters. It belongs to
/// the connection that prepared it and is only used on that connection's thread.
#[derive(Debug)]
pub struct Prepared {
    raw: ffi::duckdb_prepared_statement,
}

// SAFETY: the prepared statement moves with its connection (it is kept in the connection's own
// cache) and is used by one thread at a time.
unsafe impl Send for Prepared {}

impl Prepared {
    /// DuckDB's classification of the statement.
    pub fn statement_type(&self) -> StatementType {
        // SAFETY: `self.raw` is a live, successfully prepared statement.
        let kind = unsafe { ffi::duckdb_prepared_statement_type(self.raw) };
        match kind {
            ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_SELECT => StatementType::Select,
            ffi::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_EXPLAIN => StatementType::Explain,
            other => StatementType::Other(other),
        }
    }

    /// The parameters' names in binding order: `"1"`, `"2"`… for positional ones.
    pub fn parameter_names(&self) -> Vec<String> {
        // SAFETY: live statement.
        let count = unsafe { ffi::duckdb_nparams(self.raw) };
        (1..=count)
            .map(|index| {
                // SAFETY: live statement, index in 1..=count; DuckDB returns a string we own and
                // free below, or null.
                let name = unsafe { ffi::duckdb_parameter_name(self.raw, index) };
                if name.is_null() {
                    return index.to_string();
                }
                // SAFETY: non-null and NUL-terminated.
                let text = unsafe { message(name, "") };
                // SAFETY: allocated by DuckDB for the caller, freed once.
                unsafe { ffi::duckdb_free(name.cast_mut().cast()) };
                text
            })
            .collect()
    }

    /// Bind `values` to parameters 1, 2, … in order.
    pub fn bind(&mut self, values: &[Value]) -> Result<(), Message> {
        // SAFETY: live statement.
        unsafe { ffi::duckdb_clear_bindings(self.raw) };
        for (index, value) in (1..).zip(values) {
            let mut handle = match value {
                Value::Text(text) => {
                    // SAFETY: the pointer and length describe `text`'s bytes; DuckDB copies them
                    // and validates them as UTF-8 (they are: `text` is a `String`).
                    unsafe {
                        ffi::duckdb_create_varchar_length(text.as_ptr().cast(), text.len() as u64)
                    }
                }
                // SAFETY (all arms below): plain value constructors without preconditions.
                Value::Null => unsafe { ffi::duckdb_create_null_value() },
                Value::Bool(b) => unsafe { ffi::duckdb_create_bool(*b) },
                Value::BigInt(i) => unsafe { ffi::duckdb_create_int64(*i) },
                Value::UBigInt(u) => unsafe { ffi::duckdb_create_uint64(*u) },
                Value::Double(f) => unsafe { ffi::duckdb_create_double(*f) },
                Value::HugeInt(i) => unsafe {
                    ffi::duckdb_create_hugeint(ffi::duckdb_hugeint {
                        lower: *i as u64,
                        upper: (*i >> 64) as i64,
                    })
                },
                Value::Date(days) => unsafe {
                    ffi::duckdb_create_date(ffi::duckdb_date { days: *days })
                },
            };
            // SAFETY: live statement and value; DuckDB copies the value, which we destroy once.
            let state = unsafe { ffi::duckdb_bind_value(self.raw, index, handle) };
            // SAFETY: created above, destroyed once.
            unsafe { ffi::duckdb_destroy_value(&mut handle) };
            if state != ffi::DuckDBSuccess {
                return Err(format!(
                    "Invalid Input Error: cannot bind parameter {index}"
                ));
            }
        }
        Ok(())
    }

    /// Execute with the bound parameters; the result streams.
    pub fn execute(&mut self) -> Result<Stream<'_>, Message> {
        // SAFETY: an all-zero `duckdb_result` is the documented "empty" state the call fills.
        let mut result: ffi::duckdb_result = unsafe { std::mem::zeroed() };
        // SAFETY: live statement; `result` is a valid out-pointer, destroyed by `Stream` (or
        // below) on every path.
        let state = unsafe { ffi::duckdb_execute_prepared_streaming(self.raw, &mut result) };
        let mut stream = Stream {
            result,
            options: ptr::null_mut(),
            ffi_schema: FFI_ArrowSchema::empty(),
            schema: Arc::new(Schema::empty()),
            _prepared: std::marker::PhantomData,
        };
        if state != ffi::DuckDBSuccess {
            return Err(stream.error("Internal Error: the query failed"));
        }
        stream.load_schema()?;
        Ok(stream)
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        // SAFETY: owned, destroyed once (DuckDB accepts a null statement).
        unsafe { ffi::duckdb_destroy_prepare(&mut self.raw) };
    }
}

/// A running query's result, as Arrow record batches. While it lives, its connection runs
/// nothing else; dropping it closes the result.
#[derive(Debug)]
pub struct Stream<'p> {
    result: ffi::duckdb_result,
    options: ffi::duckdb_arrow_options,
    ffi_schema: FFI_ArrowSchema,
    schema: SchemaRef,
    _prepared: std::marker::PhantomData<&'p mut Prepared>,
}

impl Stream<'_> {
    /// The result's schema.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// The result's error message, or `fallback`.
    fn error(&mut self, fallback: &str) -> Message {
        // SAFETY: `self.result` is a result DuckDB filled; the message is owned by it.
        let text = unsafe { ffi::duckdb_result_error(&mut self.result) };
        // SAFETY: null or NUL-terminated, alive while `self.result` is.
        unsafe { message(text, fallback) }
    }

    fn load_schema(&mut self) -> Result<(), Message> {
        // SAFETY: `self.result` is a successful result; the options handle it returns is
        // destroyed in `Drop`.
        self.options = unsafe { ffi::duckdb_result_get_arrow_options(&mut self.result) };
        // SAFETY: successful result.
        let columns = unsafe { ffi::duckdb_column_count(&mut self.result) };
        let mut types = Vec::with_capacity(columns as usize);
        let mut names = Vec::with_capacity(columns as usize);
        for column in 0..columns {
            // SAFETY: successful result, column in range. The logical type is ours to destroy
            // (below); the name is owned by the result.
            unsafe {
                types.push(ffi::duckdb_column_logical_type(&mut self.result, column));
                names.push(ffi::duckdb_column_name(&mut self.result, column));
            }
        }
        let ffi_schema = std::ptr::from_mut(&mut self.ffi_schema).cast::<ffi::ArrowSchema>();
        // SAFETY: `types` and `names` hold `columns` live entries; `ffi_schema` points to an
        // empty `FFI_ArrowSchema`, which has the layout of the C Data Interface's `ArrowSchema`
        // that libduckdb-sys declares (both are `repr(C)` copies of the specification's struct).
        let error = unsafe {
            ffi::duckdb_to_arrow_schema(
                self.options,
                types.as_mut_ptr(),
                names.as_mut_ptr(),
                columns,
                ffi_schema,
            )
        };
        for mut logical_type in types {
            // SAFETY: each was returned by `duckdb_column_logical_type`, destroyed once.
            unsafe { ffi::duckdb_destroy_logical_type(&mut logical_type) };
        }
        // SAFETY: `error` is null or an error-data handle we destroy.
        unsafe { error_data(error) }?;
        self.schema = Arc::new(
            Schema::try_from(&self.ffi_schema)
                .map_err(|e| format!("Internal Error: DuckDB's Arrow schema: {e}"))?,
        );
        Ok(())
    }

    /// The next batch, or `None` at the end.
    pub fn next_batch(&mut self) -> Result<Option<RecordBatch>, Message> {
        // SAFETY: `self.result` is a successful (streaming) result, read by this thread only.
        let mut chunk = unsafe { ffi::duckdb_fetch_chunk(self.result) };
        // SAFETY: `chunk` is null or a live chunk; an empty one also marks the end.
        if !chunk.is_null() && unsafe { ffi::duckdb_data_chunk_get_size(chunk) } == 0 {
            // SAFETY: fetched above, destroyed once.
            unsafe { ffi::duckdb_destroy_data_chunk(&mut chunk) };
        }
        if chunk.is_null() {
            // Either the end or a failure (an interrupt, an error while executing).
            // SAFETY: as above.
            let failed = unsafe { !ffi::duckdb_result_error(&mut self.result).is_null() };
            return if failed {
                Err(self.error("Internal Error: the query failed"))
            } else {
                Ok(None)
            };
        }
        let mut array = FFI_ArrowArray::empty();
        let out = std::ptr::from_mut(&mut array).cast::<ffi::ArrowArray>();
        // SAFETY: `chunk` is live until destroyed below; `out` points to an empty
        // `FFI_ArrowArray`, layout-identical to the C Data Interface's `ArrowArray` (see
        // `load_schema`), which DuckDB fills with arrays it owns and releases through the
        // struct's `release` callback.
        let error = unsafe { ffi::duckdb_data_chunk_to_arrow(self.options, chunk, out) };
        // SAFETY: fetched above, destroyed once; the Arrow array does not borrow from it.
        unsafe { ffi::duckdb_destroy_data_chunk(&mut chunk) };
        // SAFETY: null or an error-data handle we destroy.
        unsafe { error_data(error) }?;
        // SAFETY: `array` was filled by DuckDB to match `ffi_schema`, the schema of this result
        // (DuckDB converts every chunk of a result with the same types and options).
        let data = unsafe { from_ffi(array, &self.ffi_schema) }
            .map_err(|e| format!("Internal Error: DuckDB's Arrow data: {e}"))?;
        let batch = RecordBatch::from(StructArray::from(data));
        Ok(Some(batch))
    }
}

impl Drop for Stream<'_> {
    fn drop(&mut self) {
        // SAFETY: owned handles, each destroyed once (DuckDB accepts a null options handle).
        unsafe {
            ffi::duckdb_destroy_arrow_options(&mut self.options);
            ffi::duckdb_destroy_result(&mut self.result);
        }
    }
}

/// Turn an error-data handle into a result, destroying it.
///
/// # Safety
///
/// `error` is null or a live error-data handle owned by the caller.
unsafe fn error_data(mut error: ffi::duckdb_error_data) -> Result<(), Message> {
    if error.is_null() {
        return Ok(());
    }
    // SAFETY: live handle per the contract.
    let failed = unsafe { ffi::duckdb_error_data_has_error(error) };
    let text = if failed {
        // SAFETY: live handle; the message is owned by it and copied before it is destroyed.
        Some(unsafe { message(ffi::duckdb_error_data_message(error), "Internal Error") })
    } else {
        None
    };
    // SAFETY: owned, destroyed once.
    unsafe { ffi::duckdb_destroy_error_data(&mut error) };
    text.map_or(Ok(()), Err)
}
