//! `ferrocorn user add` and `ferrocorn key add`: entries of the users file, written by the
//! operator's hand through this command (the file's format is in the worker's `auth` module).
//!
//! The new entry is appended as text, so the file's comments and layout stay; the whole new
//! text is checked with the same parser the workers use before it replaces the file (atomically,
//! mode 0600). A name that exists already is refused.

use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rand::Rng;

use crate::cli::EntryArgs;
use crate::{EXIT_CANTCREAT, EXIT_USAGE};

/// `ferrocorn user add`; returns the process exit code.
pub fn add_user(args: &EntryArgs) -> i32 {
    exit_code(read_password().and_then(|password| {
        let hash = ferrocorn_worker::hash_password(&password).map_err(usage)?;
        add(args, "users", &format!("password_hash = {}", quoted(&hash)))?;
        eprintln!(
            "ferrocorn: user {} added to {}",
            args.name,
            args.users_file.display()
        );
        Ok(())
    }))
}

/// `ferrocorn key add`; returns the process exit code.
pub fn add_key(args: &EntryArgs) -> i32 {
    let key = new_key();
    let digest = ferrocorn_worker::key_digest(&key);
    exit_code(
        add(args, "api_keys", &format!("key_hash = {}", quoted(&digest))).map(|()| {
            eprintln!(
                "ferrocorn: API key {} added to {}; it is shown once:",
                args.name,
                args.users_file.display()
            );
            println!("{key}");
        }),
    )
}

fn exit_code(outcome: Result<(), Failure>) -> i32 {
    match outcome {
        Ok(()) => 0,
        Err((code, message)) => {
            eprintln!("ferrocorn: {message}");
            code
        }
    }
}

type Failure = (i32, String);

fn usage(message: impl Into<String>) -> Failure {
    (EXIT_USAGE, message.into())
}

/// A TOML basic string.
fn quoted(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// 32 random bytes from the OS, as hex with a recognisable prefix.
fn new_key() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    let mut key = String::from("fc_");
    for byte in bytes {
        key.push_str(&format!("{byte:02x}"));
    }
    key
}

/// The password, twice: from the terminal without echo, or two lines of standard input.
fn read_password() -> Result<String, Failure> {
    let (first, second) = if std::io::stdin().is_terminal() {
        let ask = |prompt| rpassword::prompt_password(prompt).map_err(|e| usage(e.to_string()));
        (ask("Password: ")?, ask("Password again: ")?)
    } else {
        let mut lines = std::io::stdin().lock().lines();
        let mut next = || match lines.next() {
            Some(Ok(line)) => Ok(line),
            _ => Err(usage(
                "expected the password twice, as two lines on standard input",
            )),
        };
        (next()?, next()?)
    };
    if first != second {
        return Err(usage("the two passwords differ"));
    }
    if first.is_empty() {
        return Err(usage("the password is empty"));
    }
    Ok(first)
}

/// Append `[section.NAME]` with `secret_line`, the scopes and the datasets to the users file.
fn add(args: &EntryArgs, section: &str, secret_line: &str) -> Result<(), Failure> {
    let path = &args.users_file;
    let old = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err((
                EXIT_CANTCREAT,
                format!("cannot read {}: {e}", path.display()),
            ));
        }
    };
    let list = |items: &[String]| {
        let quoted: Vec<String> = items.iter().map(|i| quoted(i)).collect();
        format!("[{}]", quoted.join(", "))
    };
    let mut entry = format!(
        "\n[{section}.{}]\n{secret_line}\nscopes = {}\n",
        quoted(&args.name),
        list(&args.scopes)
    );
    if !args.datasets.is_empty() {
        entry.push_str(&format!("datasets = {}\n", list(&args.datasets)));
    }
    let new = format!("{old}{entry}");
    let before = ferrocorn_worker::check_users_file(&old).unwrap_or_default();
    let after = ferrocorn_worker::check_users_file(&new).map_err(|e| {
        if e.contains("duplicate") {
            usage(format!(
                "{} already has {section}.{}",
                path.display(),
                args.name
            ))
        } else {
            usage(format!("{}: {e}", path.display()))
        }
    })?;
    if let Some(problem) = after.iter().find(|p| !before.contains(p)) {
        return Err(usage(problem.clone()));
    }
    write_private(path, &new).map_err(|e| {
        (
            EXIT_CANTCREAT,
            format!("cannot write {}: {e}", path.display()),
        )
    })
}

/// Replace `path` with `text` atomically, readable by its owner only.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(text.as_bytes())?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}
