//! The dataset catalogue: what the data directory offers, registered as DuckDB views.
//!
//! Scanning is done in two phases: [`scan`] only looks at directory entries and decides which are
//! datasets (a `NAME.parquet` regular file, or a `NAME/` folder holding Parquet files, hive
//! partitions included); registration ([`Dataset::view_sql`]) then turns each one into a view.
//! Nothing else is ever opened: dot-files and files of other types are skipped, entries whose
//! name is not a plain identifier are skipped with a warning rather than quoted into SQL, and a
//! `NAME.parquet` that is not a readable regular file (a FIFO, a dangling link) is a dataset with
//! a [`Dataset::problem`], which the engine reports instead of opening.

use std::path::{Path, PathBuf};

use crate::Error;

/// One dataset of the data directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    /// The view name: the file name without `.parquet`, or the folder name.
    pub name: String,
    /// The file, or the folder of files.
    pub path: PathBuf,
    /// Whether `path` is a folder of Parquet files.
    pub is_folder: bool,
    /// Its Parquet files, relative to `path`'s parent, sorted.
    pub files: Vec<String>,
    /// Their total size in bytes.
    pub bytes: u64,
    /// Changes whenever a file is added, removed, replaced or modified: a hash of every file's
    /// name, size and modification time.
    pub version: String,
    /// Why the dataset cannot be opened at all, found by the scan; `None` for a dataset to
    /// register.
    pub problem: Option<String>,
}

impl Dataset {
    /// The file or glob the dataset reads, as a SQL string literal.
    pub fn source_pattern(&self) -> String {
        if self.is_folder {
            sql_string(&format!("{}/**/*.parquet", self.path.display()))
        } else {
            sql_string(&self.path.display().to_string())
        }
    }

    /// The table expression that reads the dataset's Parquet files.
    pub fn source_sql(&self) -> String {
        if self.is_folder {
            format!(
                "read_parquet({}, hive_partitioning = true, union_by_name = true)",
                self.source_pattern()
            )
        } else {
            format!("read_parquet({})", self.source_pattern())
        }
    }

    /// The `CREATE VIEW` statement that registers this dataset over its Parquet files.
    pub fn view_sql(&self) -> String {
        format!(
            "CREATE OR REPLACE VIEW \"{}\" AS SELECT * FROM {}",
            self.name,
            self.source_sql()
        )
    }
}

/// A column of a dataset.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Column {
    pub name: String,
    /// DuckDB's type name, e.g. `DECIMAL(12,2)`.
    #[serde(rename = "type")]
    pub sql_type: String,
}

/// What a dataset is served from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Storage {
    /// A view over the Parquet files.
    Parquet,
    /// A snapshot file attached read-only.
    Snapshot { file: PathBuf, bytes: u64 },
}

/// A registered dataset with what DuckDB knows of it.
#[derive(Clone, Debug)]
pub struct DatasetInfo {
    /// The dataset as served: its version is the one queries see.
    pub dataset: Dataset,
    pub columns: Vec<Column>,
    /// Rows according to the Parquet footers (or the snapshot).
    pub row_estimate: Option<u64>,
    pub storage: Storage,
    /// The version of the files whose snapshot is being built, when it is not the one served.
    pub pending: Option<String>,
    /// Why the dataset cannot be queried (its files are not valid Parquet, say); `None` when
    /// it can. Queries naming an unavailable dataset are refused; the others serve on.
    pub error: Option<String>,
    /// Why its snapshot could not be built (a sort key that is not a column, say): it is served
    /// from Parquet, and the build is not tried again until the files or the options change.
    pub snapshot_error: Option<String>,
}

/// A double-quoted SQL identifier.
pub fn sql_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A single-quoted SQL string literal.
pub fn sql_string(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A path as a single-quoted SQL string literal.
pub fn sql_path(path: &Path) -> String {
    sql_string(&path.display().to_string())
}

/// Whether `name` can be a dataset (and view) name: an ASCII identifier.
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 64
}

/// List the datasets of `data_dir`, sorted by name.
pub fn scan(data_dir: &Path) -> Result<Vec<Dataset>, Error> {
    let io_err = |source| Error::DataDir {
        path: data_dir.to_owned(),
        source,
    };
    let mut datasets = Vec::new();
    for entry in std::fs::read_dir(data_dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(io_err)?;
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if file_name.starts_with('.') {
            continue;
        }
        let mut problem = None;
        let (name, is_folder, found) = if file_type.is_dir() {
            let found = parquet_files_under(&path);
            if found.is_empty() {
                continue;
            }
            (file_name.to_owned(), true, found)
        } else if let Some(stem) = file_name.strip_suffix(".parquet") {
            // Only a regular file is opened (a FIFO would block whoever reads it).
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => problem = Some("not a regular file".to_owned()),
                Err(e) => problem = Some(format!("cannot read it: {e}")),
            }
            (stem.to_owned(), false, vec![path.clone()])
        } else {
            continue;
        };
        if !is_valid_name(&name) {
            tracing::warn!(path = %path.display(), "skipping dataset: name is not an identifier");
            continue;
        }
        let (files, bytes, version) = fingerprint(data_dir, found);
        datasets.push(Dataset {
            name,
            path,
            is_folder,
            files,
            bytes,
            version,
            problem,
        });
    }
    datasets.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(datasets)
}

/// The `.parquet` files at any depth under `dir`.
fn parquet_files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            // As DuckDB's glob, which the dataset's view reads through: every regular
            // `*.parquet` file below the folder, hidden or not, and nothing else.
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_dir() => pending.push(path),
                Ok(meta) if meta.is_file() && path.extension().is_some_and(|e| e == "parquet") => {
                    found.push(path)
                }
                _ => {}
            }
        }
    }
    found
}

/// A dataset's files relative to the data directory, their total size, and the version hash.
fn fingerprint(data_dir: &Path, found: Vec<PathBuf>) -> (Vec<String>, u64, String) {
    use std::hash::{Hash, Hasher};
    let mut files: Vec<(String, u64, i128)> = found
        .into_iter()
        .filter_map(|p| {
            let meta = std::fs::metadata(&p).ok()?;
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as i128);
            let relative = p.strip_prefix(data_dir).unwrap_or(&p).display().to_string();
            Some((relative, meta.len(), modified))
        })
        .collect();
    files.sort();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    files.hash(&mut hasher);
    let bytes = files.iter().map(|(_, size, _)| size).sum();
    let version = format!("{:016x}", hasher.finish());
    (
        files.into_iter().map(|(name, _, _)| name).collect(),
        bytes,
        version,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_identifiers() {
        assert!(is_valid_name("orders"));
        assert!(is_valid_name("_x1"));
        assert!(!is_valid_name("1x"));
        assert!(!is_valid_name("a-b"));
        assert!(!is_valid_name("a\"; DROP"));
        assert!(!is_valid_name(""));
    }

    #[test]
    fn scan_finds_files_and_folders_and_skips_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("orders.parquet"), b"").expect("write");
        std::fs::write(dir.path().join("notes.txt"), b"").expect("write");
        std::fs::write(dir.path().join("bad-name.parquet"), b"").expect("write");
        std::fs::create_dir_all(dir.path().join("events/day=1")).expect("mkdir");
        std::fs::write(dir.path().join("events/day=1/part.parquet"), b"").expect("write");
        std::fs::create_dir(dir.path().join("empty")).expect("mkdir");
        let names: Vec<_> = scan(dir.path())
            .expect("scan")
            .into_iter()
            .map(|d| (d.name, d.is_folder))
            .collect();
        assert_eq!(
            names,
            vec![("events".to_owned(), true), ("orders".to_owned(), false)]
        );
    }

    #[test]
    fn version_changes_when_a_file_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.parquet"), b"one").expect("write");
        let before = scan(dir.path()).expect("scan");
        assert_eq!(before[0].bytes, 3);
        assert_eq!(before[0].files, vec!["a.parquet".to_owned()]);
        std::fs::write(dir.path().join("a.parquet"), b"three").expect("write");
        let after = scan(dir.path()).expect("scan");
        assert_ne!(before[0].version, after[0].version);
    }

    #[test]
    fn view_sql_escapes_quotes_in_paths() {
        let d = Dataset {
            name: "o".into(),
            path: "/data/it's.parquet".into(),
            is_folder: false,
            files: vec![],
            bytes: 0,
            version: String::new(),
            problem: None,
        };
        assert!(d.view_sql().contains("'/data/it''s.parquet'"));
    }
}
