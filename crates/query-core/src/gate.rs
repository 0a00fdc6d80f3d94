//! The statement gate: which SQL a request may run, decided from DuckDB's own parse.
//!
//! Nothing here tokenises SQL. DuckDB decides what a text is, in three steps that all use its
//! parser:
//!
//! 1. **How many statements.** The C API's statement extraction ([`crate::capi::Conn::extract`])
//!    splits the text; exactly one is accepted.
//! 2. **What it reads and calls.** DuckDB's `json_serialize_sql` gives the statement's parse tree,
//!    which [`analyze`] walks: every query node must be a query (not the INSERT, UPDATE, DELETE,
//!    MERGE or COPY that DuckDB 2.0 also accepts inside a `WITH`), every table a dataset or a CTE
//!    in scope, every table function a pure generator, every function one that changes no state
//!    and does not expose the server. A text that is not a SELECT has no tree: DuckDB refuses to
//!    serialise it.
//! 3. **What it is.** The one extracted statement is prepared (bound and planned, never
//!    executed) and its type must be SELECT. Only that prepared statement is ever executed.
//!
//! The walk fails closed: a node it does not know is refused.
//!
//! # What SQL can reach
//!
//! Datasets by name (and `DESCRIBE`/`SUMMARIZE` of them or of a query), CTEs, subqueries,
//! `VALUES`, and the table functions in [`TABLE_FUNCTIONS`]. Not: files by path (`read_*`, `glob`,
//! a quoted path as a table), DuckDB's catalogue and introspection (`duckdb_*()`,
//! `information_schema`, `pg_catalog`, `SHOW`, `current_setting()`: they name the server's
//! directories, its other connections' prepared statements and its settings), functions
//! that change state (`setseed`, `nextval`, `write_log`), and functions that run SQL held in a
//! string (`query`, `json_execute_serialized_sql`, …), which would escape this walk and, for the
//! latter, run on an internal connection that no deadline interrupts. `/v1/datasets` is the
//! catalogue.

use std::collections::HashMap;

use serde_json::Value;

use crate::catalog::DatasetInfo;

/// Table functions a query may call: each computes rows from its arguments alone.
pub const TABLE_FUNCTIONS: &[&str] = &[
    "range",
    "generate_series",
    "unnest",
    "json_each",
    "json_tree",
];

/// Scalar functions (and DuckDB's built-in macros) that expose the server rather than the data:
/// settings with its directories, view definitions with file paths, database sizes.
const INTROSPECTION: &[&str] = &[
    "current_setting",
    "pg_get_viewdef",
    "pg_get_constraintdef",
    "get_block_size",
];

/// Functions that change the state of the connection or the instance. (DuckDB's
/// `has_side_effects` only says "volatile": `random()` has it as much as `setseed()`.)
const STATEFUL: &[&str] = &["setseed", "nextval", "setval", "currval", "write_log"];

/// Scalar functions whose argument is SQL text, which this gate would not see.
const SQL_IN_A_STRING: &[&str] = &[
    "json_serialize_plan",
    "json_execute_serialized_sql",
    "query",
    "query_table",
];

/// Why a statement is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    #[error("the query is empty")]
    Empty,
    #[error("exactly one statement is allowed; DuckDB found {0}")]
    MultipleStatements(u64),
    #[error(
        "only read-only queries (SELECT, WITH, VALUES, FROM, TABLE, DESCRIBE, SUMMARIZE, PIVOT) are allowed; DuckDB parsed {0}, not a query (for a query's plan, send the query with \"explain\": \"plan\" or \"analyze\")"
    )]
    NotAQuery(String),
    #[error("the statement writes: {0} inside a query is not allowed")]
    Writes(&'static str),
    #[error("{name}() is not allowed: {reason}")]
    Function { name: String, reason: &'static str },
    #[error("{0} is not allowed: only datasets can be read, by name")]
    Catalogue(String),
    #[error("{0:?} is not a dataset name: files cannot be read by path, only datasets by name")]
    FileAccess(String),
    #[error("no dataset named {name:?}{} (see /v1/datasets)", suggestion.as_ref().map(|s| format!("; did you mean {s:?}?")).unwrap_or_default())]
    UnknownDataset {
        name: String,
        /// The dataset whose name is closest, if one is close.
        suggestion: Option<String>,
    },
    #[error("dataset {name:?} is unavailable: {reason}")]
    DatasetUnavailable { name: String, reason: String },
    #[error("the statement is nested too deeply to be checked")]
    TooDeep,
}

impl Refusal {
    /// Whether this refuses what the statement does (403) rather than its form (400).
    pub fn is_forbidden(&self) -> bool {
        matches!(
            self,
            Self::NotAQuery(_)
                | Self::Writes(_)
                | Self::Function { .. }
                | Self::Catalogue(_)
                | Self::FileAccess(_)
        )
    }
}

/// What DuckDB knows of a function, by name (every overload together).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FunctionFacts {
    /// Not `CONSISTENT`: the result may change between calls (`random`) or queries (`now`).
    pub volatile: bool,
}

/// The functions of the instance, read from `duckdb_functions()` when the engine opens.
#[derive(Debug, Default)]
pub(crate) struct FunctionPolicy {
    functions: HashMap<String, FunctionFacts>,
}

impl FunctionPolicy {
    /// Add what `duckdb_functions()` says of one overload.
    pub fn add(&mut self, name: &str, stability: &str) {
        let facts = self.functions.entry(name.to_lowercase()).or_default();
        facts.volatile |= !stability.eq_ignore_ascii_case("consistent");
    }

    fn facts(&self, name: &str) -> Option<FunctionFacts> {
        self.functions.get(name).copied()
    }
}

/// A relation a statement reads that is not one of its own CTEs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Relation {
    catalog: String,
    schema: String,
    name: String,
}

/// What the gate learned of one statement from its parse tree. It does not depend on the
/// catalogue; [`Analysis::check`] applies it to the datasets of the moment.
#[derive(Clone, Debug, Default)]
pub struct Analysis {
    refusal: Option<Refusal>,
    relations: Vec<Relation>,
    deterministic: bool,
}

impl Analysis {
    /// The analysis of a statement that is not checked (test builds with the gate off).
    #[cfg(feature = "test-hooks")]
    pub(crate) fn unchecked() -> Self {
        Self::default()
    }

    /// Refuse the statement, or accept it against `catalog`.
    pub fn check(&self, catalog: &[DatasetInfo]) -> Result<(), Refusal> {
        if let Some(refusal) = &self.refusal {
            return Err(refusal.clone());
        }
        for relation in &self.relations {
            let dataset = dataset_of(relation, catalog)?;
            if let Some(reason) = &dataset.error {
                return Err(Refusal::DatasetUnavailable {
                    name: dataset.dataset.name.clone(),
                    reason: reason.clone(),
                });
            }
        }
        Ok(())
    }

    /// The datasets the statement reads, as named in `catalog` (sorted, without repeats).
    pub fn datasets<'c>(&self, catalog: &'c [DatasetInfo]) -> Vec<&'c DatasetInfo> {
        let mut found: Vec<&DatasetInfo> = self
            .relations
            .iter()
            .filter_map(|r| dataset_of(r, catalog).ok())
            .collect();
        found.sort_by(|a, b| a.dataset.name.cmp(&b.dataset.name));
        found.dedup_by(|a, b| a.dataset.name == b.dataset.name);
        found
    }

    /// Whether the result depends only on the statement, its parameters and the datasets it
    /// reads: no volatile function, no sampling.
    pub fn is_deterministic(&self) -> bool {
        self.deterministic && self.refusal.is_none()
    }
}

/// The dataset `relation` names, if it names one.
fn dataset_of<'c>(
    relation: &Relation,
    catalog: &'c [DatasetInfo],
) -> Result<&'c DatasetInfo, Refusal> {
    let Relation {
        catalog: db,
        schema,
        name,
    } = relation;
    let in_main = (db.is_empty() || db.eq_ignore_ascii_case("memory"))
        && (schema.is_empty() || schema.eq_ignore_ascii_case("main"));
    let system = ["information_schema", "pg_catalog", "system", "temp"];
    if system
        .iter()
        .any(|s| db.eq_ignore_ascii_case(s) || schema.eq_ignore_ascii_case(s))
        || name.starts_with("duckdb_")
        || name.starts_with("pragma_")
        || name.starts_with("sqlite_")
    {
        return Err(Refusal::Catalogue(qualified(relation)));
    }
    if !crate::catalog::is_valid_name(name) {
        return Err(Refusal::FileAccess(name.clone()));
    }
    if !in_main {
        return Err(Refusal::Catalogue(qualified(relation)));
    }
    catalog
        .iter()
        .find(|d| d.dataset.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| Refusal::UnknownDataset {
            name: name.clone(),
            suggestion: closest(name, catalog),
        })
}

/// The dataset name nearest to `name`, when it is near enough to be a typo of it.
fn closest(name: &str, catalog: &[DatasetInfo]) -> Option<String> {
    catalog
        .iter()
        .map(|d| {
            let distance = strsim::levenshtein(&d.dataset.name, &name.to_lowercase());
            (distance, &d.dataset.name)
        })
        .filter(|(distance, candidate)| *distance <= 2.max(candidate.len() / 4))
        .min()
        .map(|(_, candidate)| candidate.clone())
}

fn qualified(relation: &Relation) -> String {
    [&relation.catalog, &relation.schema, &relation.name]
        .into_iter()
        .filter(|p| !p.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join(".")
}

/// How deep the walk goes before it gives up: well past what DuckDB parses (its expression depth
/// limit is 1000, a few levels of the tree each), well within the stack of a worker's DuckDB thread.
const MAX_DEPTH: usize = 8_000;

/// Analyse the output of DuckDB's `json_serialize_sql` for one text.
pub(crate) fn analyze(
    sql: &str,
    serialized: &str,
    policy: &FunctionPolicy,
) -> Result<Analysis, Refusal> {
    // DuckDB bounds the nesting of what it parses (`max_expression_depth`), and the walk runs on
    // threads with a large stack: the tree is read to whatever depth DuckDB produced.
    let mut deserializer = serde_json::Deserializer::from_str(serialized);
    deserializer.disable_recursion_limit();
    let tree = <Value as serde::Deserialize>::deserialize(&mut deserializer)
        .map_err(|_| Refusal::TooDeep)?;
    if tree["error"].as_bool() == Some(true) {
        // DuckDB parsed one statement (the caller extracted it) but would not serialise it: it
        // is not a SELECT. The message quotes the statement's beginning so that its author
        // recognises it.
        return Err(Refusal::NotAQuery(format!(
            "{:?} as something else",
            beginning(sql)
        )));
    }
    let statements = tree["statements"].as_array().map_or(&[][..], Vec::as_slice);
    let [statement] = statements else {
        return Err(Refusal::MultipleStatements(statements.len() as u64));
    };
    let mut walk = Walk {
        policy,
        analysis: Analysis {
            deterministic: true,
            ..Analysis::default()
        },
        depth: 0,
    };
    if let Err(refusal) = walk.node(&statement["node"], &Scope::default()) {
        walk.analysis.refusal = Some(refusal);
    }
    Ok(walk.analysis)
}

/// The first characters of a statement, for a message.
fn beginning(sql: &str) -> String {
    let text = sql.trim();
    match text.char_indices().nth(40) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// The CTE names visible at a point of the tree, lower-cased.
#[derive(Clone, Debug, Default)]
struct Scope {
    names: Vec<String>,
}

impl Scope {
    fn with(&self, name: &str) -> Self {
        let mut names = self.names.clone();
        names.push(name.to_lowercase());
        Self { names }
    }

    fn contains(&self, name: &str) -> bool {
        self.names.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

struct Walk<'p> {
    policy: &'p FunctionPolicy,
    analysis: Analysis,
    depth: usize,
}

const QUERY_NODES: &[&str] = &[
    "SELECT_NODE",
    "SET_OPERATION_NODE",
    "RECURSIVE_CTE_NODE",
    "CTE_NODE",
];
const WRITING_NODES: &[(&str, &str)] = &[
    ("INSERT_QUERY_NODE", "INSERT"),
    ("UPDATE_QUERY_NODE", "UPDATE"),
    ("DELETE_QUERY_NODE", "DELETE"),
    ("MERGE_QUERY_NODE", "MERGE INTO"),
    ("COPY_QUERY_NODE", "COPY"),
];
const TABLE_REFS: &[&str] = &[
    "BASE_TABLE",
    "SUBQUERY",
    "JOIN",
    "TABLE_FUNCTION",
    "EXPRESSION_LIST",
    "EMPTY",
    "EMPTY_FROM",
    "PIVOT",
    "SHOW_REF",
];

fn text<'v>(value: &'v Value, key: &str) -> &'v str {
    value[key].as_str().unwrap_or("")
}

impl Walk<'_> {
    /// Any value of the tree: dispatch on what it is, recurse into everything.
    fn node(&mut self, value: &Value, scope: &Scope) -> Result<(), Refusal> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(Refusal::TooDeep);
        }
        let result = match value {
            Value::Array(items) => items.iter().try_for_each(|item| self.node(item, scope)),
            Value::Object(map) if map.contains_key("class") => self.expression(value, scope),
            Value::Object(map)
                if map.contains_key("cte_map") || text(value, "type").ends_with("_NODE") =>
            {
                self.query_node(value, scope)
            }
            Value::Object(map)
                if map.contains_key("type")
                    && map.contains_key("alias")
                    && !text(value, "type").is_empty() =>
            {
                self.table_ref(value, scope)
            }
            Value::Object(map) => map.values().try_for_each(|v| self.node(v, scope)),
            _ => Ok(()),
        };
        self.depth -= 1;
        result
    }

    /// Everything of `value` but the keys in `skip`.
    fn children(&mut self, value: &Value, skip: &[&str], scope: &Scope) -> Result<(), Refusal> {
        match value.as_object() {
            Some(map) => map
                .iter()
                .filter(|(k, _)| !skip.contains(&k.as_str()))
                .try_for_each(|(_, v)| self.node(v, scope)),
            None => self.node(value, scope),
        }
    }

    fn query_node(&mut self, node: &Value, scope: &Scope) -> Result<(), Refusal> {
        let kind = text(node, "type");
        if let Some((_, what)) = WRITING_NODES.iter().find(|(k, _)| *k == kind) {
            return Err(Refusal::Writes(what));
        }
        if !QUERY_NODES.contains(&kind) {
            return Err(Refusal::NotAQuery(format!("a {kind}")));
        }
        // A WITH clause: each CTE sees the ones before it (and itself, if it is recursive); the
        // rest of the node sees them all.
        let mut inner = scope.clone();
        for entry in node["cte_map"]["map"]
            .as_array()
            .map_or(&[][..], Vec::as_slice)
        {
            let name = text(entry, "key");
            let info = &entry["value"];
            let recursive = self.is_recursive(info, name);
            let own = if recursive {
                inner.with(name)
            } else {
                inner.clone()
            };
            self.children(info, &[], &own)?;
            inner = inner.with(name);
        }
        match kind {
            "RECURSIVE_CTE_NODE" | "CTE_NODE" => {
                let name = text(node, "cte_name");
                let own = inner.with(name);
                self.children(node, &["cte_map"], &own)
            }
            _ => self.children(node, &["cte_map"], &inner),
        }
    }

    /// Whether a CTE definition refers to itself (its query is a recursive CTE node of that name).
    fn is_recursive(&self, info: &Value, name: &str) -> bool {
        let query = if info["query_node"].is_object() {
            &info["query_node"]
        } else {
            &info["query"]["node"]
        };
        text(query, "type") == "RECURSIVE_CTE_NODE"
            && text(query, "cte_name").eq_ignore_ascii_case(name)
    }

    fn table_ref(&mut self, table: &Value, scope: &Scope) -> Result<(), Refusal> {
        let kind = text(table, "type");
        if !TABLE_REFS.contains(&kind) {
            return Err(Refusal::NotAQuery(format!("a {kind} table reference")));
        }
        if !table["sample"].is_null() {
            self.analysis.deterministic = false;
        }
        match kind {
            "BASE_TABLE" => {
                self.named_table(table, scope);
                self.children(table, &[], scope)
            }
            "TABLE_FUNCTION" => {
                let function = &table["function"];
                let name = text(function, "function_name").to_lowercase();
                if !TABLE_FUNCTIONS.contains(&name.as_str()) {
                    let reason = if name.starts_with("read_")
                        || name == "glob"
                        || name.starts_with("parquet_")
                        || name.starts_with("sniff_")
                    {
                        "it reads files"
                    } else if SQL_IN_A_STRING.contains(&name.as_str()) {
                        "it runs SQL from a string"
                    } else if name.starts_with("duckdb_") || name.starts_with("pragma_") {
                        "it shows the server's catalogue and settings"
                    } else {
                        "only range, generate_series, unnest, json_each and json_tree are"
                    };
                    return Err(Refusal::Function { name, reason });
                }
                // The arguments are expressions like any other; the function itself is checked.
                self.children(function, &["function_name"], scope)?;
                self.children(table, &["function"], scope)
            }
            "SHOW_REF" => {
                let show = text(table, "show_type");
                if show != "DESCRIBE" && show != "SUMMARY" {
                    return Err(Refusal::Catalogue(
                        format!("SHOW {}", text(table, "table_name"))
                            .trim()
                            .to_owned(),
                    ));
                }
                if table["query"].is_object() {
                    self.children(table, &[], scope)
                } else {
                    self.named_table(table, scope);
                    Ok(())
                }
            }
            _ => self.children(table, &[], scope),
        }
    }

    /// A table the tree names (a `BASE_TABLE`, or what a `DESCRIBE` describes): a relation the
    /// statement reads, unless it is a CTE in scope.
    fn named_table(&mut self, table: &Value, scope: &Scope) {
        let relation = Relation {
            catalog: text(table, "catalog_name").to_owned(),
            schema: text(table, "schema_name").to_owned(),
            name: text(table, "table_name").to_owned(),
        };
        let cte = relation.catalog.is_empty()
            && relation.schema.is_empty()
            && scope.contains(&relation.name);
        if !cte && !self.analysis.relations.contains(&relation) {
            self.analysis.relations.push(relation);
        }
    }

    fn expression(&mut self, expression: &Value, scope: &Scope) -> Result<(), Refusal> {
        let class = text(expression, "class");
        if class == "FUNCTION" || class == "WINDOW" || class == "AGGREGATE" {
            let name = text(expression, "function_name").to_lowercase();
            self.function(&name)?;
        }
        self.children(expression, &[], scope)
    }

    fn function(&mut self, name: &str) -> Result<(), Refusal> {
        let refuse = |reason| {
            Err(Refusal::Function {
                name: name.to_owned(),
                reason,
            })
        };
        if SQL_IN_A_STRING.contains(&name) {
            return refuse("it runs SQL from a string");
        }
        if INTROSPECTION.contains(&name)
            || name.starts_with("duckdb_")
            || name.starts_with("pragma_")
        {
            return refuse("it shows the server's configuration");
        }
        if STATEFUL.contains(&name) {
            return refuse("it changes the connection's state");
        }
        match self.policy.facts(name) {
            Some(facts) => {
                if facts.volatile {
                    self.analysis.deterministic = false;
                }
                Ok(())
            }
            // Unknown to DuckDB: binding will say so. It cannot be cached meanwhile.
            None => {
                self.analysis.deterministic = false;
                Ok(())
            }
        }
    }
}
