//! Statement checking: exactly one read-only statement, decided before anything executes.
//!
//! duckdb-rs's `prepare` runs every statement of a multi-statement string but the last, so the
//! text is checked here first, lexically: [`check`] splits it into statements (respecting
//! string literals, quoted identifiers, dollar-quoted strings and comments), requires exactly
//! one, and requires that statement to be a query: `SELECT`, `WITH … SELECT`, `VALUES`, `FROM`
//! (DuckDB's FROM-first syntax), `TABLE`, `DESCRIBE`, `SUMMARIZE`, `EXPLAIN [ANALYZE] <query>`,
//! or a parenthesised query. A statement keyword such as `INSERT` or `COPY` right after any
//! opening parenthesis is refused too, so no data-modifying CTE or subquery gets through.
//!
//! This is the first of two walls: the DuckDB instance itself is sandboxed (external access off,
//! configuration locked; see [`crate::engine`]).

/// Why a text was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SqlCheckError {
    #[error("the query is empty")]
    Empty,
    #[error("exactly one statement is allowed; found {0}")]
    MultipleStatements(usize),
    #[error("unterminated {0}")]
    Unterminated(&'static str),
    #[error(
        "only read-only queries (SELECT, WITH, VALUES, FROM, TABLE, DESCRIBE, SUMMARIZE, EXPLAIN) are allowed; found {0}"
    )]
    NotAllowed(String),
    /// The statement starts with a word that is no statement keyword this checker knows: most
    /// likely a typo, which DuckDB's parser should report (the caller prepares the single
    /// statement, which executes nothing, to get that message, and refuses it either way).
    #[error("only read-only queries are allowed; {0} is not a statement this server runs")]
    Unrecognized(String),
}

impl SqlCheckError {
    /// Whether this is a refusal of what the statement does (403) rather than of its form (400).
    pub fn is_forbidden(&self) -> bool {
        matches!(self, Self::NotAllowed(_) | Self::Unrecognized(_))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    /// A bare word (keyword or identifier), upper-cased.
    Word(String),
    Open,
    Close,
    Semicolon,
    Comma,
    /// Anything else: literals, quoted identifiers, operators, parameters.
    Other,
}

/// Split `sql` into tokens, skipping comments and the contents of literals. Each token comes
/// with the byte offsets where it starts and ends.
fn tokenize(sql: &str) -> Result<Vec<(Token, usize, usize)>, SqlCheckError> {
    let indexed: Vec<(usize, char)> = sql.char_indices().collect();
    let chars: Vec<char> = indexed.iter().map(|&(_, c)| c).collect();
    let offset = |i: usize| indexed.get(i).map_or(sql.len(), |&(o, _)| o);
    let mut tokens: Vec<(Token, usize, usize)> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let pushed = tokens.len();
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            _ if c.is_whitespace() => i += 1,
            '-' if next == Some('-') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if next == Some('*') => {
                // Block comments nest, as in PostgreSQL's grammar that DuckDB uses.
                let mut depth = 0usize;
                loop {
                    if i + 1 >= chars.len() {
                        return Err(SqlCheckError::Unterminated("comment"));
                    }
                    if chars[i] == '/' && chars[i + 1] == '*' {
                        depth += 1;
                        i += 2;
                    } else if chars[i] == '*' && chars[i + 1] == '/' {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            '\'' | '"' => {
                let escapes = c == '\''
                    && i > 0
                    && matches!(chars[i - 1], 'e' | 'E')
                    && (i < 2 || !is_word_char(chars[i - 2]));
                tokens.push((Token::Other, offset(i), 0));
                i = skip_quoted(&chars, i, c, escapes)?;
            }
            '$' => {
                tokens.push((Token::Other, offset(i), 0));
                if let Some(end) = dollar_quote_end(&chars, i)? {
                    i = end;
                } else {
                    // A parameter: $1 or $name.
                    i += 1;
                    while i < chars.len() && is_word_char(chars[i]) {
                        i += 1;
                    }
                }
            }
            '(' => {
                tokens.push((Token::Open, offset(i), 0));
                i += 1;
            }
            ')' => {
                tokens.push((Token::Close, offset(i), 0));
                i += 1;
            }
            ';' => {
                tokens.push((Token::Semicolon, offset(i), 0));
                i += 1;
            }
            ',' => {
                tokens.push((Token::Comma, offset(i), 0));
                i += 1;
            }
            _ if is_word_start(c) => {
                let start = i;
                while i < chars.len() && is_word_char(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                if word.eq_ignore_ascii_case("e") && chars.get(i) == Some(&'\'') {
                    // The E of an escape string; the literal follows.
                    continue;
                }
                tokens.push((Token::Word(word.to_ascii_uppercase()), offset(start), 0));
            }
            _ => {
                tokens.push((Token::Other, offset(i), 0));
                i += 1;
            }
        }
        if tokens.len() > pushed
            && let Some(last) = tokens.last_mut()
        {
            last.2 = offset(i);
        }
    }
    Ok(tokens)
}

fn is_word_start(c: char) -> bool {
    c.is_alphabetic() || c == '_'
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Index just past the literal that starts at `start`.
fn skip_quoted(
    chars: &[char],
    start: usize,
    quote: char,
    backslash_escapes: bool,
) -> Result<usize, SqlCheckError> {
    let mut i = start + 1;
    while i < chars.len() {
        if backslash_escapes && chars[i] == '\\' {
            i += 2;
            continue;
        }
        if chars[i] == quote {
            if chars.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return Ok(i + 1);
        }
        i += 1;
    }
    Err(SqlCheckError::Unterminated(if quote == '"' {
        "quoted identifier"
    } else {
        "string literal"
    }))
}

/// If a dollar-quoted string (`$$…$$`, `$tag$…$tag$`) starts at `start`, the index past it.
fn dollar_quote_end(chars: &[char], start: usize) -> Result<Option<usize>, SqlCheckError> {
    let mut i = start + 1;
    while i < chars.len()
        && is_word_char(chars[i])
        && !(i == start + 1 && chars[i].is_ascii_digit())
    {
        i += 1;
    }
    if chars.get(i) != Some(&'$') {
        return Ok(None);
    }
    let tag: Vec<char> = chars[start..=i].to_vec();
    let mut j = i + 1;
    while j + tag.len() <= chars.len() {
        if chars[j..j + tag.len()] == tag[..] {
            return Ok(Some(j + tag.len()));
        }
        j += 1;
    }
    Err(SqlCheckError::Unterminated("dollar-quoted string"))
}

/// Statement keywords that never start a read-only query.
const FORBIDDEN: &[&str] = &[
    "ABORT",
    "ALTER",
    "ANALYZE",
    "ATTACH",
    "BEGIN",
    "CALL",
    "CHECKPOINT",
    "COMMENT",
    "COMMIT",
    "COPY",
    "CREATE",
    "DEALLOCATE",
    "DELETE",
    "DETACH",
    "DROP",
    "EXECUTE",
    "EXPORT",
    "FORCE",
    "GRANT",
    "IMPORT",
    "INSERT",
    "INSTALL",
    "LOAD",
    "MERGE",
    "PRAGMA",
    "PREPARE",
    "RESET",
    "REVOKE",
    "ROLLBACK",
    "SET",
    "START",
    "TRUNCATE",
    "UPDATE",
    "USE",
    "VACUUM",
];

/// Other statement keywords of DuckDB's grammar: known, and never queries.
const OTHER_STATEMENTS: &[&str] = &[
    "SHOW",
    "PIVOT",
    "UNPIVOT",
    "DECLARE",
    "LISTEN",
    "NOTIFY",
    "UPDATE_EXTENSIONS",
];

/// Keywords that start a query.
const QUERY_START: &[&str] = &["SELECT", "VALUES", "FROM", "TABLE", "WITH"];

/// Check that `sql` is exactly one read-only statement; returns it without a trailing `;`.
pub fn check(sql: &str) -> Result<&str, SqlCheckError> {
    let spanned = tokenize(sql)?;
    let tokens: Vec<Token> = spanned.iter().map(|(t, _, _)| t.clone()).collect();
    let statements: Vec<&[Token]> = tokens
        .split(|t| *t == Token::Semicolon)
        .filter(|s| !s.is_empty())
        .collect();
    match statements.len() {
        0 => return Err(SqlCheckError::Empty),
        1 => {}
        n => return Err(SqlCheckError::MultipleStatements(n)),
    }
    let statement = statements[0];
    check_statement(statement)?;
    // No keyword that starts a statement may follow an opening parenthesis anywhere.
    for pair in statement.windows(2) {
        if let [Token::Open, Token::Word(word)] = pair
            && FORBIDDEN.contains(&word.as_str())
        {
            return Err(SqlCheckError::NotAllowed(word.clone()));
        }
    }
    // The statement's text runs from its first token to the first semicolon after its last.
    let start = spanned
        .iter()
        .find(|(t, _, _)| *t != Token::Semicolon)
        .map_or(0, |&(_, o, _)| o);
    let last = spanned
        .iter()
        .rposition(|(t, _, _)| *t != Token::Semicolon)
        .unwrap_or(0);
    let end = spanned[last..]
        .iter()
        .find(|(t, _, _)| *t == Token::Semicolon)
        .map_or(sql.len(), |&(_, o, _)| o);
    Ok(sql[start..end].trim_end())
}

fn check_statement(tokens: &[Token]) -> Result<(), SqlCheckError> {
    let mut rest = tokens;
    // A parenthesised query: ((SELECT 1)).
    while let Some(Token::Open) = rest.first() {
        rest = &rest[1..];
    }
    match rest.first() {
        Some(Token::Word(word)) => match word.as_str() {
            "SELECT" | "VALUES" | "FROM" | "TABLE" => Ok(()),
            "WITH" => check_with(&rest[1..]),
            "DESCRIBE" | "SUMMARIZE" => match rest.get(1) {
                Some(Token::Word(next)) if FORBIDDEN.contains(&next.as_str()) => {
                    Err(SqlCheckError::NotAllowed(format!("{word} {next}")))
                }
                Some(_) => Ok(()),
                None => Err(SqlCheckError::NotAllowed(word.clone())),
            },
            "EXPLAIN" => {
                let mut inner = &rest[1..];
                if let Some(Token::Word(w)) = inner.first()
                    && w == "ANALYZE"
                {
                    inner = &inner[1..];
                }
                match inner.first() {
                    Some(Token::Word(w)) if QUERY_START.contains(&w.as_str()) => {
                        check_statement(inner)
                    }
                    Some(Token::Open) => check_statement(inner),
                    _ => Err(SqlCheckError::NotAllowed("EXPLAIN of a non-query".into())),
                }
            }
            other if FORBIDDEN.contains(&other) || OTHER_STATEMENTS.contains(&other) => {
                Err(SqlCheckError::NotAllowed(other.to_owned()))
            }
            other => Err(SqlCheckError::Unrecognized(other.to_owned())),
        },
        Some(_) => Err(SqlCheckError::NotAllowed(
            "a statement that is not a query".into(),
        )),
        None => Err(SqlCheckError::Empty),
    }
}

/// After `WITH`: skip the CTE definitions; the statement they feed must be a query.
fn check_with(tokens: &[Token]) -> Result<(), SqlCheckError> {
    let mut i = 0;
    if matches!(tokens.first(), Some(Token::Word(w)) if w == "RECURSIVE") {
        i += 1;
    }
    loop {
        // Name, optional column list, optional USING KEY (...), up to AS.
        let mut seen_as = false;
        while i < tokens.len() {
            match &tokens[i] {
                Token::Word(w) if w == "AS" => {
                    seen_as = true;
                    i += 1;
                    break;
                }
                Token::Open => i = skip_group(tokens, i)?,
                _ => i += 1,
            }
        }
        if !seen_as {
            return Err(SqlCheckError::NotAllowed("a malformed WITH clause".into()));
        }
        while matches!(tokens.get(i), Some(Token::Word(w)) if w == "NOT" || w == "MATERIALIZED") {
            i += 1;
        }
        if tokens.get(i) != Some(&Token::Open) {
            return Err(SqlCheckError::NotAllowed("a malformed WITH clause".into()));
        }
        i = skip_group(tokens, i)?;
        if tokens.get(i) == Some(&Token::Comma) {
            i += 1;
            continue;
        }
        break;
    }
    check_statement(&tokens[i..])
}

/// Index past the parenthesised group opening at `open`.
fn skip_group(tokens: &[Token], open: usize) -> Result<usize, SqlCheckError> {
    let mut depth = 0usize;
    for (j, token) in tokens.iter().enumerate().skip(open) {
        match token {
            Token::Open => depth += 1,
            Token::Close => {
                depth -= 1;
                if depth == 0 {
                    return Ok(j + 1);
                }
            }
            _ => {}
        }
    }
    Err(SqlCheckError::Unterminated("parenthesis"))
}

/// What the result cache needs to know of a statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheProfile {
    /// The statement with comments and runs of white space collapsed to one space: two texts
    /// with the same normal form are the same statement to DuckDB.
    pub normalised: String,
    /// Every bare word and quoted identifier, lower-cased: the datasets it may read are among
    /// them.
    pub names: Vec<String>,
}

/// Functions whose result changes from one call to the next, or that read something other than
/// the datasets (files, the catalogue, settings): a statement that names one is never cached.
const UNCACHEABLE_WORDS: &[&str] = &[
    "random",
    "setseed",
    "uuid",
    "gen_random_uuid",
    "uuidv4",
    "uuidv7",
    "now",
    "today",
    "current_date",
    "current_time",
    "current_timestamp",
    "current_localtime",
    "current_localtimestamp",
    "get_current_time",
    "get_current_timestamp",
    "localtime",
    "localtimestamp",
    "transaction_timestamp",
    "nextval",
    "currval",
    "getvariable",
    "sample",
    "tablesample",
    "glob",
    "query",
    "query_table",
    "information_schema",
    "pg_catalog",
    "sqlite_master",
];
const UNCACHEABLE_PREFIXES: &[&str] = &[
    "read_",
    "parquet_",
    "sniff_",
    "duckdb_",
    "pragma_",
    "ferrocorn_",
];

/// The cache profile of a statement that passed [`check`], or `None` when its result must not be
/// cached: it calls something volatile (`random()`, `now()`, sampling) or reads anything other
/// than tables by name (a file path in a string literal, `read_parquet`, the catalogue). The
/// caller also refuses a statement none of whose [`CacheProfile::names`] is a dataset: only
/// datasets have versions to put in a key.
pub fn cache_profile(sql: &str) -> Option<CacheProfile> {
    let tokens = tokenize(sql).ok()?;
    let mut normalised = String::with_capacity(sql.len());
    let mut names = Vec::new();
    let mut previous_end = None;
    for (token, start, end) in &tokens {
        let text = &sql[*start..*end];
        if let Some(previous_end) = previous_end
            && previous_end != *start
        {
            normalised.push(' ');
        }
        normalised.push_str(text);
        previous_end = Some(*end);
        let name = match token {
            Token::Word(_) => text.to_lowercase(),
            Token::Other if text.len() >= 2 && text.starts_with('"') => {
                text[1..text.len() - 1].replace("\"\"", "\"").to_lowercase()
            }
            Token::Other if text.starts_with('\'') || text.starts_with('$') => {
                // A string that could be a file path (read as a table by a replacement scan).
                if text.contains(['/', '.']) {
                    return None;
                }
                continue;
            }
            _ => continue,
        };
        if UNCACHEABLE_WORDS.contains(&name.as_str())
            || UNCACHEABLE_PREFIXES.iter().any(|p| name.starts_with(p))
        {
            return None;
        }
        names.push(name);
    }
    names.sort();
    names.dedup();
    Some(CacheProfile { normalised, names })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(sql: &str) {
        assert!(
            check(sql).is_ok(),
            "should be allowed: {sql}: {:?}",
            check(sql)
        );
    }

    fn refused(sql: &str) -> SqlCheckError {
        check(sql).expect_err(sql)
    }

    #[test]
    fn queries_are_allowed() {
        for sql in [
            "SELECT 1",
            "select * from orders where id = $1;",
            "  -- comment\n SELECT 'a;b' AS \"x;y\" /* ; */",
            "WITH t AS (SELECT 1 AS x) SELECT * FROM t",
            "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 3), u AS NOT MATERIALIZED (SELECT 2) SELECT * FROM t, u",
            "VALUES (1), (2)",
            "FROM orders LIMIT 3",
            "TABLE orders",
            "DESCRIBE orders",
            "DESCRIBE SELECT 1",
            "SUMMARIZE orders",
            "EXPLAIN SELECT 1",
            "EXPLAIN ANALYZE SELECT 1",
            "((SELECT 1))",
            "SELECT $$it's; fine$$, $tag$ ; $tag$",
            "SELECT E'\\'; DROP TABLE x; --'",
            "SELECT load, copy, \"set\" FROM t",
            "SELECT $min::INT",
        ] {
            allowed(sql);
        }
    }

    #[test]
    fn writes_and_settings_are_refused() {
        for sql in [
            "COPY orders TO 'x.csv'",
            "ATTACH 'x.db'",
            "INSTALL httpfs",
            "LOAD httpfs",
            "SET memory_limit = '1GB'",
            "RESET memory_limit",
            "PRAGMA version",
            "CREATE TABLE t AS SELECT 1",
            "INSERT INTO t VALUES (1)",
            "DROP VIEW orders",
            "CALL dbgen(sf = 1)",
            "EXPORT DATABASE 'x'",
            "WITH t AS (SELECT 1) INSERT INTO x SELECT * FROM t",
            "WITH t AS (DELETE FROM x RETURNING *) SELECT * FROM t",
            "SELECT * FROM (COPY x TO 'y')",
            "EXPLAIN ANALYZE COPY (SELECT 1) TO 'x'",
            "EXPLAIN CREATE TABLE t (x INT)",
            "DESCRIBE DROP TABLE x",
            "USE other",
            "DETACH db",
            "CHECKPOINT",
            "UPDATE t SET x = 1",
        ] {
            assert!(refused(sql).is_forbidden(), "{sql}");
        }
    }

    #[test]
    fn unknown_leading_words_are_unrecognized() {
        assert_eq!(
            refused("SELEC 1"),
            SqlCheckError::Unrecognized("SELEC".into())
        );
        assert!(refused("SELEC 1").is_forbidden());
    }

    #[test]
    fn more_than_one_statement_is_refused() {
        assert_eq!(
            refused("SELECT 1; SELECT 2"),
            SqlCheckError::MultipleStatements(2)
        );
        assert_eq!(
            refused("SELECT 1; ATTACH 'x'"),
            SqlCheckError::MultipleStatements(2)
        );
        assert_eq!(check("SELECT 1;;  ; -- trailing"), Ok("SELECT 1"));
    }

    #[test]
    fn malformed_text_is_refused() {
        assert_eq!(refused(""), SqlCheckError::Empty);
        assert_eq!(refused(" -- only a comment"), SqlCheckError::Empty);
        assert_eq!(
            refused("SELECT 'x"),
            SqlCheckError::Unterminated("string literal")
        );
        assert_eq!(
            refused("SELECT /* x"),
            SqlCheckError::Unterminated("comment")
        );
        assert_eq!(
            refused("SELECT $a$ x"),
            SqlCheckError::Unterminated("dollar-quoted string")
        );
    }

    #[test]
    fn trailing_semicolons_are_trimmed() {
        assert_eq!(check("SELECT 1 ;  "), Ok("SELECT 1"));
        assert_eq!(check(";; SELECT 1"), Ok("SELECT 1"));
        assert_eq!(check("SELECT ';' -- c\n;"), Ok("SELECT ';' -- c"));
    }

    #[test]
    fn cache_profile_normalises_and_names_datasets() {
        let a = cache_profile("SELECT  count(*)\n  FROM Orders -- all\n").expect("cacheable");
        let b = cache_profile("SELECT count(*) FROM Orders").expect("cacheable");
        assert_eq!(a, b);
        assert!(a.names.contains(&"orders".to_owned()));
        // Adjacency is kept: `1.5` and `1 .5` are different statements.
        let c = cache_profile("SELECT 1.5 FROM orders").expect("cacheable");
        let d = cache_profile("SELECT 1 .5 FROM orders").expect("cacheable");
        assert_ne!(c.normalised, d.normalised);
        // Case is kept: it names the result's columns.
        let e = cache_profile("SELECT 1 AS X FROM orders").expect("cacheable");
        let f = cache_profile("SELECT 1 AS x FROM orders").expect("cacheable");
        assert_ne!(e.normalised, f.normalised);
        assert!(cache_profile("SELECT * FROM \"orders\"").is_some());
    }

    #[test]
    fn volatile_or_file_reading_statements_are_not_cached() {
        for sql in [
            "SELECT random() FROM orders",
            "SELECT now(), * FROM orders",
            "SELECT * FROM orders USING SAMPLE 10",
            "SELECT * FROM read_parquet('data/orders.parquet')",
            "SELECT * FROM 'data/orders.parquet'",
            "SELECT * FROM orders, query_table('orders')",
            "SELECT * FROM orders, duckdb_databases()",
        ] {
            assert_eq!(cache_profile(sql), None, "{sql}");
        }
    }
}
