//! The `keel` command line: `up`, `serve`, `migrate` and `worker` here, `shards` in [`shards`].

mod shards;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::app::Application;
use crate::config::{parse_listen, Config};
use crate::db::{self, Databases};
use crate::shutdown::shutdown_signal;
use crate::Fatal;

#[derive(Parser)]
#[command(name = "keel", version, about = "A high-throughput commerce backend on sharded PostgreSQL")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything in one process over a private PostgreSQL cluster in the data directory.
    Up {
        /// Where the cluster, the admin token and logs live (KEEL_DATA_DIR; default ./.keel).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The HTTP address (KEEL_LISTEN; default 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<String>,
        /// Hot-standby clusters streaming from the primary, routed to as read replicas (KEEL_REPLICAS;
        /// default 0, at most 8).
        #[arg(long)]
        replicas: Option<usize>,
        /// User-shard databases to create in a new data directory (KEEL_SHARDS; default 2, from 1 to
        /// 100). An existing data directory keeps the shards it has.
        #[arg(long)]
        shards: Option<usize>,
    },
    /// Serve the API against external databases (KEEL_CATALOG_URL, KEEL_SHARD_URLS).
    Serve,
    /// Apply pending migrations to external databases, then exit.
    Migrate,
    /// Run only the background workers (the checkout saga, e-mail, the search index, webhook
    /// deliveries and scheduled maintenance) against external databases.
    Worker,
    /// See the user shards, add one, move buckets, even out the users, against external databases
    /// (KEEL_CATALOG_URL, KEEL_SHARD_URLS, as for `keel migrate`). Exit status: 0 done, 1 failed,
    /// 2 bad usage.
    Shards {
        #[command(subcommand)]
        command: shards::ShardsCommand,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Shards { command } = cli.command {
        return shards::main(command);
    }
    let config = match load_config(&cli.command) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("keel: {message}");
            return ExitCode::from(2);
        }
    };
    let format = crate::telemetry::LogFormat::or_by_terminal(config.log_format);
    if let Err(message) = crate::telemetry::init_logging(&config.log, format) {
        eprintln!("keel: {message}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("keel: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!(error = %message, "keel stopped with an error");
            eprintln!("keel: {message}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(command: &Command) -> Result<Config, Fatal> {
    let mut config = Config::load()?;
    if let Command::Up { data_dir, listen, replicas, shards } = command {
        if let Some(n) = replicas {
            if *n > crate::config::MAX_REPLICAS {
                return Err(format!("invalid option --replicas: at most {}", crate::config::MAX_REPLICAS).into());
            }
            config.replicas = *n;
        }
        if let Some(n) = shards {
            if !(1..=crate::config::MAX_SHARDS).contains(n) {
                return Err(format!("invalid option --shards: from 1 to {}", crate::config::MAX_SHARDS).into());
            }
            config.shards = Some(*n);
        }
        if let Some(dir) = data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(listen) = listen {
            config.listen = parse_listen(listen).map_err(|m| format!("invalid option --listen: {m}"))?;
        }
    }
    Ok(config)
}

async fn run(command: Command, config: Config) -> Result<(), Fatal> {
    match command {
        Command::Up { .. } => crate::embedded::up(config).await,
        Command::Migrate => {
            let (catalog, shards) = external_databases(&config)?;
            db::migrate_all(catalog, shards).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Serve => {
            let (catalog, shards) = external_databases(&config)?;
            let admin_token = config
                .admin_token
                .clone()
                .ok_or("KEEL_ADMIN_TOKEN is not set: `keel serve` needs the admin token from configuration")?;
            let databases = Databases::open(catalog, shards, &config).await?;
            let app = Application::build(config.clone(), databases, &admin_token).await?;
            tracing::info!(address = %app.local_addr(), "serving");
            Ok(app.run_until_stopped(shutdown_signal()).await?)
        }
        Command::Worker => {
            let (catalog, shards) = external_databases(&config)?;
            let databases = crate::jobs::open_databases(catalog, shards, &config).await?;
            crate::telemetry::init_metrics();
            let config = std::sync::Arc::new(config);
            Ok(crate::jobs::run_workers(std::sync::Arc::new(databases), config, shutdown_signal()).await?)
        }
        Command::Shards { .. } => unreachable!("`keel shards` runs from shards::main"),
    }
}

pub(crate) fn external_databases(config: &Config) -> Result<(&str, &[String]), Fatal> {
    let catalog = config.catalog_url.as_deref().ok_or("KEEL_CATALOG_URL is not set")?;
    if config.shard_urls.is_empty() {
        return Err("KEEL_SHARD_URLS is not set: give the shard databases, comma-separated".into());
    }
    Ok((catalog, &config.shard_urls))
}
