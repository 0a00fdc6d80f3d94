//! The query core's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the query core, with the path or dataset it concerns.
///
/// Each variant carries its cause as a `source`; the message never repeats it, so a caller that
/// prints the chain prints every cause once.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot read data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create temp directory {path}")]
    TempDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open DuckDB: {0}")]
    Open(String),
    #[error("cannot connect to DuckDB")]
    Connect(#[source] duckdb::Error),
    #[error("cannot apply DuckDB setting {setting}")]
    Setting {
        setting: &'static str,
        #[source]
        source: duckdb::Error,
    },
    #[error("cannot register dataset {dataset} from {path}")]
    Dataset {
        dataset: String,
        path: PathBuf,
        #[source]
        source: duckdb::Error,
    },
    #[error(
        "sandbox check failed: DuckDB did not refuse to read {path}, outside its allowed directories"
    )]
    SandboxLeak { path: PathBuf },
    #[error("sandbox check failed: the probe file {path} is missing")]
    SandboxProbe { path: PathBuf },
    #[error("DuckDB query failed")]
    Query(#[source] duckdb::Error),
}

/// An error and its causes on one line. DuckDB's C status under its message (always "Error code
/// 1: Unknown error code", whatever went wrong) says nothing and is left out.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        if cause.downcast_ref::<duckdb::ffi::Error>().is_some() {
            break;
        }
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::chain;

    #[test]
    fn a_duckdb_error_on_one_line_without_its_meaningless_status() {
        let conn = duckdb::Connection::open_in_memory().expect("duckdb");
        let error = conn
            .execute_batch("SELECT * FROM no_such_table")
            .expect_err("an unknown table");
        let text = chain(&error);
        assert!(text.contains("no_such_table"), "{text}");
        assert!(!text.contains("Unknown error code"), "{text}");
    }
}
