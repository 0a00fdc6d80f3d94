//! Command-line flags (Gunicorn's names where the concept is the same) and how they become the
//! top configuration layer.

use std::path::PathBuf;

use clap::{CommandFactory, Parser};

use crate::config::{ConfigError, Env};
use crate::keys::{KeyFlags, Origin, Origins, RawConfig};

/// ferrocorn: a pre-fork HTTP server for analytics over Parquet with DuckDB.
#[derive(Clone, Debug, Parser)]
#[command(name = "ferrocorn", version, about)]
pub struct Cli {
    /// Configuration file (TOML). Without the flag, config/ferrocorn.toml is read if it exists.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Validate the configuration and exit: 0 when valid, 64 when not.
    #[arg(long)]
    pub check_config: bool,
    /// Print the effective configuration, with each value's origin, and exit.
    #[arg(long)]
    pub print_config: bool,

    /// Every configuration key as a flag.
    #[command(flatten)]
    pub keys: KeyFlags,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What `ferrocorn` does instead of serving.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Command {
    /// Accounts of the users file.
    #[command(subcommand)]
    User(UserCommand),
    /// API keys of the users file.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Ask the pool of this configuration for /readyz on its first address: exit 0 when a
    /// worker whose DuckDB answers says 200 within the timeout, 1 otherwise (a container's
    /// HEALTHCHECK; no curl needed).
    Healthcheck {
        /// Seconds to wait for the answer.
        #[arg(long, value_name = "SECONDS", default_value_t = 3)]
        timeout: u64,
    },
    /// List the running pool's workers (slot, pid, state, age, requests, in flight, RSS,
    /// generation), through its control socket (cache_dir/control.sock).
    Status,
    /// Reload the running pool (what HUP does) and wait until the roll is complete; a
    /// configuration that does not validate is reported, and the old pool keeps serving.
    Reload {
        /// Seconds to wait for the roll to complete.
        #[arg(long, value_name = "SECONDS", default_value_t = 300)]
        timeout: u64,
    },
    /// Resize the running pool to N workers (what TTIN and TTOU do, as many times as needed).
    Scale {
        /// Workers to run.
        workers: usize,
    },
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum UserCommand {
    /// Add an account: asks for its password twice (from the terminal, or as two lines on
    /// standard input when that is not a terminal) and writes its argon2id hash.
    Add(EntryArgs),
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum KeyCommand {
    /// Add an API key: prints the new key once and writes only its SHA-256 digest.
    Add(EntryArgs),
}

/// An entry of the users file.
#[derive(Clone, Debug, clap::Args)]
pub struct EntryArgs {
    /// The account's or key's name (A-Z a-z 0-9 . _ - @).
    pub name: String,
    /// A scope it gets: query, datasets, metrics or admin (repeat the flag for several).
    #[arg(long = "scope", value_name = "SCOPE", required = true)]
    pub scopes: Vec<String>,
    /// A dataset it may read (repeat the flag for several); every dataset when not given.
    #[arg(long = "dataset", value_name = "NAME")]
    pub datasets: Vec<String>,
    /// The users file to add it to (created, mode 0600, if missing).
    #[arg(long = "users-file", value_name = "FILE")]
    pub users_file: PathBuf,
}

/// The default configuration file, read when it exists and `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "config/ferrocorn.toml";

impl Cli {
    /// The flags as configuration layers, one per flag given, each with its flag as origin.
    fn layers(&self) -> Vec<(RawConfig, Origin)> {
        let command = Self::command();
        self.keys
            .layers()
            .into_iter()
            .map(|(layer, key)| {
                let long = command
                    .get_arguments()
                    .find(|arg| arg.get_id() == key)
                    .and_then(|arg| arg.get_long())
                    .unwrap_or(key);
                (layer, Origin::Flag(format!("--{long}")))
            })
            .collect()
    }

    /// Assemble every layer: defaults < file < environment < flags. Called at start and on HUP.
    pub fn load(&self, env: &dyn Env) -> Result<(RawConfig, Origins), ConfigError> {
        let mut raw = RawConfig::defaults();
        let mut origins = Origins::default();
        let file = match &self.config {
            Some(path) => Some(path.clone()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()),
        };
        if let Some(path) = file {
            let layer = RawConfig::from_file(&path)?;
            raw.overlay(layer, &Origin::File(path), &mut origins);
        }
        for (layer, origin) in RawConfig::from_env(env)? {
            raw.overlay(layer, &origin, &mut origins);
        }
        for (layer, origin) in self.layers() {
            raw.overlay(layer, &origin, &mut origins);
        }
        Ok((raw, origins))
    }
}
