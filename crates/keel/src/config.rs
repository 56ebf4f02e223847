//! Typed configuration: defaults, overridden by an optional `keel.toml`, overridden by `KEEL_*`
//! environment variables, overridden by command-line flags. Every error names the setting it is about
//! and where the bad value came from, so a bad setting stops start-up with a message a person can act on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::consistency::DataKind;
use crate::http::auth::tokens::TokenKey;
use crate::webhooks::signing::SigningKey;

#[derive(Clone, Debug)]
pub struct Config {
    /// `KEEL_DATA_DIR` / `data_dir`: where `keel up` keeps its cluster, admin token and logs.
    pub data_dir: PathBuf,
    /// `KEEL_LISTEN` / `listen`: the HTTP address.
    pub listen: SocketAddr,
    /// `KEEL_ADMIN_TOKEN` / `admin_token`: the bearer token of the administrator.
    pub admin_token: Option<String>,
    /// `KEEL_CATALOG_URL` / `catalog_url`: the catalogue database (`keel serve`, `keel migrate`).
    pub catalog_url: Option<String>,
    /// `KEEL_SHARD_URLS` / `shard_urls`: the user-shard databases; position = shard number.
    pub shard_urls: Vec<String>,
    /// `KEEL_CATALOG_REPLICA_URLS` / `catalog_replica_urls`: streaming replicas of the catalogue,
    /// comma-separated. Reads that may be a little stale go to one whose lag is within their budget.
    pub catalog_replica_urls: Vec<String>,
    /// `KEEL_SHARD_REPLICA_URLS` / `shard_replica_urls`: streaming replicas of each shard, shards
    /// separated by `;` in shard order, each a comma-separated list (`a0,b0;a1`); an empty entry is a
    /// shard without replicas. In `keel.toml`, also a list with one string per shard.
    pub shard_replica_urls: Vec<Vec<String>>,
    /// `KEEL_REPLICAS` / `replicas`: `keel up` only: hot-standby clusters streaming from its own,
    /// kept in the data directory and routed to as replicas of every database (0 to 8; default 0).
    pub replicas: usize,
    /// `KEEL_SHARDS` / `shards`: `keel up` only: the user-shard databases it creates in a new data
    /// directory (1 to 100; default 2). `None` when not set, so that `keel up` can tell a count asked
    /// for from the default: an existing data directory keeps the shards it has, and one asked for
    /// that differs is warned about.
    pub shards: Option<usize>,
    /// `KEEL_LOG` / `log`: a tracing filter such as `info` or `keel=debug,tower_http=info`.
    pub log: String,
    /// `KEEL_LOG_FORMAT` / `log_format`: `json` (one object a line) or `text` (a line a person reads).
    /// Unset: `text` when standard error is a terminal, `json` otherwise.
    pub log_format: Option<crate::telemetry::LogFormat>,
    /// `KEEL_DB_POOL_SIZE` / `db_pool_size`: the API's connections per database per process.
    pub db_pool_size: usize,
    /// `KEEL_WORKER_POOL_SIZE` / `worker_pool_size`: the background workers' connections per database
    /// per process, a pool of their own, so that a backlog of jobs never takes the API's connections.
    pub worker_pool_size: usize,
    /// `KEEL_SHUTDOWN_TIMEOUT` / `shutdown_timeout`: how long in-flight requests may drain on stop.
    pub shutdown_timeout: Duration,
    /// `KEEL_REQUEST_TIMEOUT` / `request_timeout`: the longest a request may take before a 503.
    pub request_timeout: Duration,
    /// `KEEL_HEADER_READ_TIMEOUT` / `header_read_timeout`: the longest a client may take to send a
    /// request's headers, counted from when the connection is ready for the request (so it also
    /// bounds a keep-alive connection waiting for its next one). A slowloris client is dropped then.
    pub header_read_timeout: Duration,
    /// `KEEL_IDLE_TIMEOUT` / `idle_timeout`: a connection on which no request is being handled and no
    /// byte has moved for this long is closed (a silent client, one that stopped reading its answer).
    pub idle_timeout: Duration,
    /// `KEEL_MAX_CONNECTIONS` / `max_connections`: open client connections per process (lowered at
    /// start to what the process's file limit allows). At the cap, the connection idle the longest
    /// is closed to make room; when none is idle, new connections wait in the listen backlog.
    pub max_connections: usize,
    /// `KEEL_RATE_LIMIT` / `rate_limit`: `on` (default) or `off`, which turns every rate limit off
    /// (benchmarks, tests that seed data).
    pub rate_limit: bool,
    /// `KEEL_RATE_LIMIT_PER_ADDRESS` / `rate_limit_per_address`: requests per client address, as
    /// `REQUESTS/WINDOW` (a burst of REQUESTS, refilled evenly over WINDOW); `/healthz` is exempt.
    pub rate_limit_per_address: crate::http::rate_limit::RateQuota,
    /// `KEEL_RATE_LIMIT_PER_TOKEN` / `rate_limit_per_token`: requests per bearer token.
    pub rate_limit_per_token: crate::http::rate_limit::RateQuota,
    /// `KEEL_RATE_LIMIT_MAIL` / `rate_limit_mail`: requests to routes that send e-mail (sign-up per
    /// address, checkout per token), on top of the limits above.
    pub rate_limit_mail: crate::http::rate_limit::RateQuota,
    /// `KEEL_RATE_LIMIT_SIGN_IN` / `rate_limit_sign_in`: requests per client address to the routes that
    /// take a password or a code (signing in, confirming a password reset, verifying an address).
    pub rate_limit_sign_in: crate::http::rate_limit::RateQuota,
    /// `KEEL_TRUST_FORWARDED_FOR` / `trust_forwarded_for`: rate-limit by the last `X-Forwarded-For`
    /// address instead of the TCP peer's. Only behind a proxy that sets it: else any client can
    /// choose its address. Default off.
    pub trust_forwarded_for: bool,
    /// `KEEL_STATEMENT_TIMEOUT` / `statement_timeout`: the longest one SQL statement may run on any
    /// pooled connection (requests and background jobs) before PostgreSQL cancels it, so that a query
    /// whose request already answered 503 does not keep running; `0` for no limit. Unset: the longer of
    /// the request and job timeouts (see [`Config::statement_timeout`]). Migrations are exempt.
    pub statement_timeout: Option<Duration>,
    /// `KEEL_JOB_TIMEOUT` / `job_timeout`: the longest a background job may run; a job whose worker
    /// died is picked up again one and a half times this after it started.
    pub job_timeout: Duration,
    /// `KEEL_SAGA_BACKOFF_MAX` / `saga_backoff_max`: the longest wait between two runs of a checkout
    /// saga that failed (a database away). The saga is retried forever, waiting from 100 ms doubling
    /// up to this, so an order is decided at most this long after its databases are back.
    pub saga_backoff_max: Duration,
    /// `KEEL_SAGA_LOCK_TIMEOUT` / `saga_lock_timeout`: the longest a checkout saga waits for a row
    /// lock (a stock, order or wallet row another transaction holds) before its run fails and is
    /// retried later, giving its connection and worker slot back meanwhile.
    pub saga_lock_timeout: Duration,
    /// `KEEL_ORDER_RECONCILE_AFTER` / `order_reconcile_after`: an order still pending this long after
    /// it was placed, or a stock reservation still held this long, is taken up by the reconciler,
    /// which finishes the saga itself (confirms or fails the order, sells or releases its stock).
    pub order_reconcile_after: Duration,
    /// `KEEL_ORDER_RECONCILE_EVERY` / `order_reconcile_every`: how often the reconciler looks (once per
    /// period across all workers).
    pub order_reconcile_every: Duration,
    /// `KEEL_JOB_RETENTION` / `job_retention`: how long finished jobs are kept, for inspection.
    pub job_retention: Duration,
    /// `KEEL_RECORD_RETENTION` / `record_retention`: how long dead jobs (replayable until then) and
    /// the records that make a repeated event harmless (processed events, sent e-mails, finished
    /// webhook deliveries) are kept. Longer than any redelivery of an event may come.
    pub record_retention: Duration,
    /// `KEEL_DEBUG_HEADERS` / `debug_headers`: add `keel-db-queries` to every response (tests, tuning).
    pub debug_headers: bool,
    /// `KEEL_SMTP_URL` / `smtp_url`: where e-mail goes, e.g. `smtp://127.0.0.1:2525` or
    /// `smtps://user:pass@mail.example.org`; unset, messages are written to `DATA_DIR/mail/*.eml`.
    pub smtp_url: Option<String>,
    /// `KEEL_MAIL_FROM` / `mail_from`: the sender of Keel's e-mail.
    pub mail_from: String,
    /// `KEEL_MAIL_CONCURRENCY` / `mail_concurrency`: e-mails one process hands to the mail server at
    /// once. Every exchange in flight when a process dies may be repeated (see `email`), and a mail
    /// server with many exchanges queued answers each later, so this bounds what a crash can repeat.
    pub mail_concurrency: usize,
    /// `KEEL_FEED_FANOUT_LIMIT` / `feed_fanout_limit`: an actor with more followers than this is not
    /// copied into their feeds (fan-out on write); readers merge its recent activities in when they
    /// read (fan-out on read). See `crate::feed`.
    pub feed_fanout_limit: usize,
    /// `KEEL_FEED_LENGTH` / `feed_length`: the items each user's stored feed keeps (the newest);
    /// housekeeping deletes older ones.
    pub feed_length: usize,
    /// `KEEL_WEBHOOK_RETRY_SCHEDULE` / `webhook_retry_schedule`: the waits before each retry of a
    /// failed webhook delivery (each jittered by up to 10%); after the last one it is dead.
    pub webhook_retry_schedule: Vec<Duration>,
    /// `KEEL_WEBHOOK_ALLOW_LOOPBACK` / `webhook_allow_loopback`: may webhooks call 127.0.0.1 and ::1?
    /// Unset: yes under `keel up` (to try webhooks locally), no otherwise.
    pub webhook_allow_loopback: Option<bool>,
    /// `KEEL_WEBHOOK_ALLOW_PRIVATE` / `webhook_allow_private`: may webhooks call private and
    /// link-local addresses (10/8, 192.168/16, 169.254/16, fc00::/7, …)? Default no: an integrator's
    /// URL must not reach the inside of the network (SSRF).
    pub webhook_allow_private: bool,
    /// `KEEL_NATS_URL` / `nats_url`: NATS with JetStream, e.g. `nats://127.0.0.1:4222`. Set, events
    /// travel from the outbox through JetStream to the workers; unset, the Postgres queue carries them.
    pub nats_url: Option<String>,
    /// `KEEL_NATS_PREFIX` / `nats_prefix`: the subject prefix (`<prefix>.events.<type>`) and stream
    /// name (`<PREFIX>_EVENTS`), so several deployments can share a NATS server.
    pub nats_prefix: String,
    /// `KEEL_REDIS_URL` / `redis_url`: Redis shared by all nodes, e.g. `redis://127.0.0.1:6379`, as
    /// the second cache tier and the channel of cross-node invalidations. Optional: unset or down,
    /// each node caches in its own memory within the budgets.
    pub redis_url: Option<String>,
    /// `KEEL_REDIS_NAMESPACE` / `redis_namespace`: the prefix of Keel's keys and channel in Redis.
    pub redis_namespace: String,
    /// `KEEL_CONSISTENCY_BUDGETS` / `consistency_budgets`: staleness budgets that differ from the
    /// consistency table's defaults, e.g. `profile=60s,product=10s`.
    pub consistency_budgets: Vec<(DataKind, Duration)>,
    /// `KEEL_PAYMENT_WEBHOOK_SECRET` / `payment_webhook_secret`: the `whsec_…` secret a payment
    /// provider signs its events with (Standard Webhooks). Unset, `POST /v1/payments/events` answers
    /// 503: no event is accepted unverified.
    pub payment_webhook_secret: Option<SigningKey>,
    /// `KEEL_TOKEN_KEYS` / `token_keys`: the keys that sign access and refresh tokens, as
    /// `id:secret` items (the secret 32 or more random bytes in URL-safe base64), comma-separated.
    /// The first signs; the others are still accepted, so a new key is put first and an old one
    /// removed once the tokens it signed have expired. Required by `keel serve` (every node the
    /// same); `keel up` makes one and keeps it in `DATA_DIR/token-keys`.
    pub token_keys: Vec<TokenKey>,
    /// `KEEL_ACCESS_TOKEN_TTL` / `access_token_ttl`: how long an access token is valid.
    pub access_token_ttl: Duration,
    /// `KEEL_REFRESH_TOKEN_TTL` / `refresh_token_ttl`: how long a session lasts unused; each refresh
    /// starts it again.
    pub refresh_token_ttl: Duration,
    /// `KEEL_REFRESH_REUSE_WINDOW` / `refresh_reuse_window`: a refresh token presented again this soon
    /// after it was exchanged gets the same answer (a client whose answer was lost retries); later,
    /// it ends the whole session (a stolen token replayed).
    pub refresh_reuse_window: Duration,
    /// `KEEL_PASSWORD_HASH_CONCURRENCY` / `password_hash_concurrency`: password hashes computed at once
    /// per process, on threads of their own at a lower priority (default: the number of cores); more
    /// wait their turn, so a burst of sign-ins cannot take the cores from the requests being served.
    pub password_hash_concurrency: usize,
    /// `KEEL_RECENT_SIGN_IN` / `recent_sign_in`: how recent a sign-in must be for what needs one
    /// (deleting one's account).
    pub recent_sign_in: Duration,
    /// `KEEL_CHECKOUT_REQUIRES_VERIFIED_EMAIL` / `checkout_requires_verified_email`: refuse a checkout
    /// until the buyer has verified their e-mail address (default on).
    pub checkout_requires_verified_email: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            data_dir: PathBuf::from(".keel"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_token: None,
            catalog_url: None,
            shard_urls: Vec::new(),
            catalog_replica_urls: Vec::new(),
            shard_replica_urls: Vec::new(),
            replicas: 0,
            shards: None,
            log: "info".to_owned(),
            log_format: None,
            db_pool_size: 16,
            worker_pool_size: 16,
            shutdown_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            rate_limit: true,
            rate_limit_per_address: quota(1200, 60),
            rate_limit_per_token: quota(600, 60),
            rate_limit_mail: quota(20, 3600),
            rate_limit_sign_in: quota(20, 60),
            trust_forwarded_for: false,
            statement_timeout: None,
            job_timeout: Duration::from_secs(60),
            job_retention: Duration::from_secs(24 * 3600),
            record_retention: Duration::from_secs(30 * 24 * 3600),
            saga_backoff_max: Duration::from_secs(30),
            saga_lock_timeout: Duration::from_secs(5),
            order_reconcile_after: Duration::from_secs(600),
            order_reconcile_every: Duration::from_secs(60),
            debug_headers: false,
            smtp_url: None,
            mail_from: "Keel <no-reply@keel.localhost>".to_owned(),
            mail_concurrency: 4,
            feed_fanout_limit: 10_000,
            feed_length: 1000,
            webhook_retry_schedule: [5, 300, 1800, 7200, 18000, 36000, 36000].map(Duration::from_secs).to_vec(),
            webhook_allow_loopback: None,
            webhook_allow_private: false,
            nats_url: None,
            nats_prefix: "keel".to_owned(),
            redis_url: None,
            redis_namespace: "keel".to_owned(),
            consistency_budgets: Vec::new(),
            payment_webhook_secret: None,
            token_keys: Vec::new(),
            access_token_ttl: Duration::from_secs(15 * 60),
            refresh_token_ttl: Duration::from_secs(30 * 24 * 3600),
            refresh_reuse_window: Duration::from_secs(10),
            password_hash_concurrency: crate::accounts::password::default_concurrency(),
            recent_sign_in: Duration::from_secs(10 * 60),
            checkout_requires_verified_email: true,
        }
    }
}

/// A setting that could not be used, named as the user wrote it.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting} (from {source_name}): {message}")]
pub struct ConfigError {
    pub setting: String,
    pub source_name: String,
    pub message: String,
}

/// Where one layer of settings came from, for error messages.
struct Layer<'a> {
    name: String,
    values: HashMap<String, String>,
    /// How a setting is spelled in this layer: `KEEL_LISTEN` in the environment, `listen` in a file.
    spell: &'a dyn Fn(&str) -> String,
}

const SETTINGS: &[&str] = &[
    "data_dir",
    "listen",
    "admin_token",
    "catalog_url",
    "shard_urls",
    "catalog_replica_urls",
    "shard_replica_urls",
    "replicas",
    "shards",
    "log",
    "log_format",
    "db_pool_size",
    "worker_pool_size",
    "shutdown_timeout",
    "request_timeout",
    "header_read_timeout",
    "idle_timeout",
    "max_connections",
    "rate_limit",
    "rate_limit_per_address",
    "rate_limit_per_token",
    "rate_limit_mail",
    "rate_limit_sign_in",
    "trust_forwarded_for",
    "statement_timeout",
    "debug_headers",
    "job_timeout",
    "job_retention",
    "record_retention",
    "saga_backoff_max",
    "saga_lock_timeout",
    "order_reconcile_after",
    "order_reconcile_every",
    "smtp_url",
    "mail_from",
    "mail_concurrency",
    "feed_fanout_limit",
    "feed_length",
    "webhook_retry_schedule",
    "webhook_allow_loopback",
    "webhook_allow_private",
    "nats_url",
    "nats_prefix",
    "redis_url",
    "redis_namespace",
    "consistency_budgets",
    "payment_webhook_secret",
    "token_keys",
    "access_token_ttl",
    "refresh_token_ttl",
    "refresh_reuse_window",
    "password_hash_concurrency",
    "recent_sign_in",
    "checkout_requires_verified_email",
];

impl Config {
    /// The staleness budget of a kind of data ([`crate::consistency`]) after configuration.
    pub fn budget(&self, kind: DataKind) -> Duration {
        self.consistency_budgets.iter().find(|(k, _)| *k == kind).map_or(kind.row().budget, |(_, b)| *b)
    }

    /// The longest staleness budget of any kind: how long what a read may still depend on is kept
    /// (the primary's recent WAL positions, read-your-writes floors), with a second to spare.
    pub fn longest_budget(&self) -> Duration {
        let longest = crate::consistency::KINDS.iter().map(|k| self.budget(k.kind)).max().unwrap_or_default();
        longest + Duration::from_secs(1)
    }

    /// The statement timeout of every pooled connection ([`crate::db::PoolOptions`]); zero for none.
    /// Unset, the longer of the request and job timeouts: the pools serve both requests and jobs, so
    /// no statement a request or a job is still waiting for is cut, and none outlives the 503 of its
    /// request (or its job's timeout) by more than that again.
    pub fn statement_timeout(&self) -> Duration {
        self.statement_timeout.unwrap_or(self.request_timeout.max(self.job_timeout))
    }

    /// Defaults ← `keel.toml` (the file named by `KEEL_CONFIG`, else `./keel.toml` if present) ← `KEEL_*`.
    pub fn load() -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().filter(|(k, _)| k.starts_with("KEEL_")).collect();
        let file = match env.get("KEEL_CONFIG") {
            Some(path) => Some(PathBuf::from(path)),
            None => Some(PathBuf::from("keel.toml")).filter(|p| p.exists()),
        };
        let mut config = Config::default();
        if let Some(path) = file {
            config.apply(&file_layer(&path)?)?;
        }
        config.apply(&env_layer(env))?;
        Ok(config)
    }

    fn apply(&mut self, layer: &Layer<'_>) -> Result<(), ConfigError> {
        let fail = |key: &str, message: String| ConfigError {
            setting: (layer.spell)(key),
            source_name: layer.name.clone(),
            message,
        };
        for key in SETTINGS {
            let Some(raw) = layer.values.get(*key) else { continue };
            let raw = raw.trim();
            match *key {
                "data_dir" => self.data_dir = non_empty(raw).map_err(|m| fail(key, m))?.into(),
                "listen" => self.listen = parse_listen(raw).map_err(|m| fail(key, m))?,
                "admin_token" => self.admin_token = Some(parse_token(raw).map_err(|m| fail(key, m))?),
                "catalog_url" => self.catalog_url = Some(non_empty(raw).map_err(|m| fail(key, m))?),
                "shard_urls" => self.shard_urls = parse_list(raw).map_err(|m| fail(key, m))?,
                "catalog_replica_urls" => self.catalog_replica_urls = parse_list(raw).map_err(|m| fail(key, m))?,
                "shard_replica_urls" => self.shard_replica_urls = parse_shard_lists(raw).map_err(|m| fail(key, m))?,
                "replicas" => self.replicas = parse_range(raw, 0, MAX_REPLICAS).map_err(|m| fail(key, m))?,
                "shards" => self.shards = Some(parse_range(raw, 1, MAX_SHARDS).map_err(|m| fail(key, m))?),
                "log" => self.log = non_empty(raw).map_err(|m| fail(key, m))?,
                "log_format" => {
                    self.log_format = Some(crate::telemetry::LogFormat::parse(raw).map_err(|m| fail(key, m))?)
                }
                "db_pool_size" => self.db_pool_size = parse_range(raw, 1, 1000).map_err(|m| fail(key, m))?,
                "worker_pool_size" => self.worker_pool_size = parse_range(raw, 1, 1000).map_err(|m| fail(key, m))?,
                "shutdown_timeout" => self.shutdown_timeout = parse_duration(raw).map_err(|m| fail(key, m))?,
                "request_timeout" => self.request_timeout = parse_duration(raw).map_err(|m| fail(key, m))?,
                "header_read_timeout" => {
                    self.header_read_timeout = parse_connection_timeout(raw).map_err(|m| fail(key, m))?
                }
                "idle_timeout" => self.idle_timeout = parse_connection_timeout(raw).map_err(|m| fail(key, m))?,
                "max_connections" => self.max_connections = parse_range(raw, 1, 1_000_000).map_err(|m| fail(key, m))?,
                "rate_limit" => self.rate_limit = parse_bool(raw).map_err(|m| fail(key, m))?,
                "rate_limit_per_address" => self.rate_limit_per_address = parse_quota(raw).map_err(|m| fail(key, m))?,
                "rate_limit_per_token" => self.rate_limit_per_token = parse_quota(raw).map_err(|m| fail(key, m))?,
                "rate_limit_mail" => self.rate_limit_mail = parse_quota(raw).map_err(|m| fail(key, m))?,
                "rate_limit_sign_in" => self.rate_limit_sign_in = parse_quota(raw).map_err(|m| fail(key, m))?,
                "trust_forwarded_for" => self.trust_forwarded_for = parse_bool(raw).map_err(|m| fail(key, m))?,
                "statement_timeout" => {
                    self.statement_timeout = Some(parse_statement_timeout(raw).map_err(|m| fail(key, m))?)
                }
                "debug_headers" => self.debug_headers = parse_bool(raw).map_err(|m| fail(key, m))?,
                "job_timeout" => self.job_timeout = parse_duration(raw).map_err(|m| fail(key, m))?,
                "job_retention" => self.job_retention = parse_duration(raw).map_err(|m| fail(key, m))?,
                "record_retention" => self.record_retention = parse_record_retention(raw).map_err(|m| fail(key, m))?,
                "saga_backoff_max" => self.saga_backoff_max = parse_positive(raw).map_err(|m| fail(key, m))?,
                "saga_lock_timeout" => self.saga_lock_timeout = parse_positive(raw).map_err(|m| fail(key, m))?,
                "order_reconcile_after" => {
                    self.order_reconcile_after = parse_positive(raw).map_err(|m| fail(key, m))?
                }
                "order_reconcile_every" => {
                    self.order_reconcile_every = parse_positive(raw).map_err(|m| fail(key, m))?
                }
                "smtp_url" => self.smtp_url = Some(parse_smtp_url(raw).map_err(|m| fail(key, m))?),
                "mail_from" => self.mail_from = parse_mailbox(raw).map_err(|m| fail(key, m))?,
                "mail_concurrency" => self.mail_concurrency = parse_range(raw, 1, 1000).map_err(|m| fail(key, m))?,
                "feed_fanout_limit" => {
                    self.feed_fanout_limit = parse_range(raw, 0, 100_000_000).map_err(|m| fail(key, m))?
                }
                "feed_length" => self.feed_length = parse_range(raw, 10, 1_000_000).map_err(|m| fail(key, m))?,
                "webhook_retry_schedule" => {
                    self.webhook_retry_schedule = parse_schedule(raw).map_err(|m| fail(key, m))?
                }
                "webhook_allow_loopback" => {
                    self.webhook_allow_loopback = Some(parse_bool(raw).map_err(|m| fail(key, m))?)
                }
                "webhook_allow_private" => self.webhook_allow_private = parse_bool(raw).map_err(|m| fail(key, m))?,
                "nats_url" => self.nats_url = Some(non_empty(raw).map_err(|m| fail(key, m))?),
                "nats_prefix" => self.nats_prefix = parse_prefix(raw).map_err(|m| fail(key, m))?,
                "redis_url" => self.redis_url = Some(parse_redis_url(raw).map_err(|m| fail(key, m))?),
                "redis_namespace" => self.redis_namespace = parse_prefix(raw).map_err(|m| fail(key, m))?,
                "consistency_budgets" => self.consistency_budgets = parse_budgets(raw).map_err(|m| fail(key, m))?,
                "payment_webhook_secret" => {
                    self.payment_webhook_secret = Some(parse_webhook_secret(raw).map_err(|m| fail(key, m))?)
                }
                "token_keys" => self.token_keys = parse_token_keys(raw).map_err(|m| fail(key, m))?,
                "access_token_ttl" => self.access_token_ttl = parse_lifetime(raw).map_err(|m| fail(key, m))?,
                "refresh_token_ttl" => self.refresh_token_ttl = parse_lifetime(raw).map_err(|m| fail(key, m))?,
                "refresh_reuse_window" => self.refresh_reuse_window = parse_duration(raw).map_err(|m| fail(key, m))?,
                "password_hash_concurrency" => {
                    self.password_hash_concurrency = parse_range(raw, 1, 256).map_err(|m| fail(key, m))?
                }
                "recent_sign_in" => self.recent_sign_in = parse_lifetime(raw).map_err(|m| fail(key, m))?,
                "checkout_requires_verified_email" => {
                    self.checkout_requires_verified_email = parse_bool(raw).map_err(|m| fail(key, m))?
                }
                _ => unreachable!("every name in SETTINGS is handled"),
            }
        }
        Ok(())
    }
}

fn env_layer(env: HashMap<String, String>) -> Layer<'static> {
    let values =
        SETTINGS.iter().filter_map(|key| env.get(&env_name(key)).map(|v| (key.to_string(), v.clone()))).collect();
    Layer { name: "the environment".to_owned(), values, spell: &env_name }
}

fn env_name(key: &str) -> String {
    format!("KEEL_{}", key.to_ascii_uppercase())
}

fn file_layer(path: &Path) -> Result<Layer<'static>, ConfigError> {
    let source_name = path.display().to_string();
    let fail = |setting: &str, message: String| ConfigError {
        setting: setting.to_owned(),
        source_name: source_name.clone(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail("KEEL_CONFIG", format!("cannot read it: {e}")))?;
    let table: toml::Table = text.parse().map_err(|e| fail("(file)", format!("not valid TOML: {e}")))?;
    let mut values = HashMap::new();
    for (key, value) in table {
        if !SETTINGS.contains(&key.as_str()) {
            return Err(fail(&key, format!("unknown setting; known settings are {}", SETTINGS.join(", "))));
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| fail(&key, "expected a list of strings".into())))
                .collect::<Result<Vec<_>, _>>()?
                // One string per shard, each a comma-separated list of its replicas.
                .join(if key == "shard_replica_urls" { ";" } else { "," }),
            other => {
                return Err(fail(&key, format!("expected a string, number or boolean, found {}", other.type_str())))
            }
        };
        values.insert(key, text);
    }
    Ok(Layer { name: source_name, values, spell: &|k| k.to_owned() })
}

fn non_empty(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(raw.to_owned())
}

pub fn parse_listen(raw: &str) -> Result<SocketAddr, String> {
    raw.parse().map_err(|_| format!("{raw:?} is not an address such as 127.0.0.1:8080"))
}

fn parse_token(raw: &str) -> Result<String, String> {
    if raw.len() < 16 || !raw.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be at least 16 printable characters with no spaces".into());
    }
    Ok(raw.to_owned())
}

fn parse_list(raw: &str) -> Result<Vec<String>, String> {
    let items: Vec<String> = raw.split(',').map(|s| s.trim().to_owned()).collect();
    if items.iter().any(String::is_empty) {
        return Err("must be a comma-separated list with no empty entries".into());
    }
    Ok(items)
}

/// `KEEL_SHARD_REPLICA_URLS`: `;` between shards, `,` between a shard's replicas; an entry may be
/// empty (that shard has none), a replica's URL may not.
fn parse_shard_lists(raw: &str) -> Result<Vec<Vec<String>>, String> {
    raw.split(';')
        .map(|shard| match shard.trim() {
            "" => Ok(Vec::new()),
            urls => parse_list(urls).map_err(|m| format!("{m} (shards are separated by ';')")),
        })
        .collect()
}

/// The most hot standbys `keel up --replicas` starts.
pub const MAX_REPLICAS: usize = 8;

/// The user shards `keel up` creates in a new data directory unless told otherwise: more than one, so
/// that sharding is exercised from the first run.
pub const DEFAULT_SHARDS: usize = 2;
/// The most user shards `keel up --shards` creates.
pub const MAX_SHARDS: usize = 100;

fn parse_range(raw: &str, min: usize, max: usize) -> Result<usize, String> {
    match raw.parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("{raw:?} is not a whole number from {min} to {max}")),
    }
}

fn parse_duration(raw: &str) -> Result<Duration, String> {
    humantime::parse_duration(raw).map_err(|e| format!("{raw:?} is not a duration such as 10s or 500ms: {e}"))
}

/// At least an hour: the records it keeps are what make a redelivered event harmless, and a broker's
/// or a lapsed lease's redelivery may come minutes after the first run.
fn parse_record_retention(raw: &str) -> Result<Duration, String> {
    let duration = parse_duration(raw)?;
    if duration < Duration::from_secs(3600) {
        return Err(format!("{raw:?} is shorter than an hour: events may be redelivered after their records are gone"));
    }
    Ok(duration)
}

/// A duration of at least a millisecond (a zero wait or period would spin) and at most 24 days (what
/// PostgreSQL's lock timeout can hold).
fn parse_positive(raw: &str) -> Result<Duration, String> {
    let duration = parse_duration(raw)?;
    if duration < Duration::from_millis(1) || duration.as_millis() > i32::MAX as u128 {
        return Err(format!("{raw:?} is not a duration from 1ms to 24 days"));
    }
    Ok(duration)
}

/// What PostgreSQL's `statement_timeout` can hold: whole milliseconds up to 2^31 - 1 (24 days), or 0.
fn parse_statement_timeout(raw: &str) -> Result<Duration, String> {
    let timeout = parse_duration(raw)?;
    let millis = timeout.as_millis();
    if !timeout.is_zero() && (millis == 0 || millis > i32::MAX as u128) {
        return Err(format!("{raw:?} is not 0 (no limit) or a duration from 1ms to 24 days"));
    }
    Ok(timeout)
}

/// A connection timeout: from 100 ms (a client needs some time) to an hour (else it is no limit).
fn parse_connection_timeout(raw: &str) -> Result<Duration, String> {
    let timeout = parse_duration(raw)?;
    if timeout < Duration::from_millis(100) || timeout > Duration::from_secs(3600) {
        return Err(format!("{raw:?} is not a duration from 100ms to 1h"));
    }
    Ok(timeout)
}

fn parse_quota(raw: &str) -> Result<crate::http::rate_limit::RateQuota, String> {
    crate::http::rate_limit::RateQuota::parse(raw)
}

/// A default rate limit: `requests` per `secs` seconds.
fn quota(requests: u32, secs: u64) -> crate::http::rate_limit::RateQuota {
    let requests = std::num::NonZeroU32::new(requests).expect("defaults are not zero");
    crate::http::rate_limit::RateQuota { requests, window: Duration::from_secs(secs) }
}

fn parse_smtp_url(raw: &str) -> Result<String, String> {
    lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::from_url(raw)
        .map(|_| raw.to_owned())
        .map_err(|e| format!("{raw:?} is not an SMTP URL such as smtp://127.0.0.1:2525: {e}"))
}

fn parse_mailbox(raw: &str) -> Result<String, String> {
    raw.parse::<lettre::message::Mailbox>()
        .map(|_| raw.to_owned())
        .map_err(|e| format!("{raw:?} is not an address such as \"Shop <shop@example.org>\": {e}"))
}

fn parse_schedule(raw: &str) -> Result<Vec<Duration>, String> {
    let schedule = parse_list(raw)?.iter().map(|d| parse_duration(d)).collect::<Result<Vec<_>, _>>()?;
    if schedule.len() > 20 {
        return Err("at most 20 retries".into());
    }
    if schedule.iter().any(|d| *d > Duration::from_secs(7 * 24 * 3600)) {
        return Err("no wait may exceed 7 days".into());
    }
    Ok(schedule)
}

fn parse_budgets(raw: &str) -> Result<Vec<(DataKind, Duration)>, String> {
    parse_list(raw)?
        .iter()
        .map(|item| {
            let (kind, budget) = item.split_once('=').ok_or_else(|| format!("{item:?} is not kind=duration"))?;
            let budget = parse_duration(budget.trim())?;
            Ok((crate::consistency::check_override(kind.trim(), budget)?, budget))
        })
        .collect()
}

fn parse_prefix(raw: &str) -> Result<String, String> {
    if raw.is_empty() || raw.len() > 32 || !raw.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("{raw:?} is not 1 to 32 letters, digits, '-' or '_'"));
    }
    Ok(raw.to_owned())
}

fn parse_redis_url(raw: &str) -> Result<String, String> {
    match raw.strip_prefix("redis://") {
        Some(rest) if !rest.is_empty() => Ok(raw.to_owned()),
        _ => Err(format!("{raw:?} is not a redis://host:port URL")),
    }
}

/// Signing keys: `id:secret` items. The message never repeats a secret.
fn parse_token_keys(raw: &str) -> Result<Vec<TokenKey>, String> {
    let keys = raw.split(',').map(TokenKey::parse).collect::<Result<Vec<_>, _>>()?;
    crate::http::auth::tokens::Keys::new(keys.clone())?;
    Ok(keys)
}

/// A token's or session's lifetime: from a second to a year.
fn parse_lifetime(raw: &str) -> Result<Duration, String> {
    let duration = parse_duration(raw)?;
    if duration < Duration::from_secs(1) || duration > Duration::from_secs(366 * 24 * 3600) {
        return Err(format!("{raw:?} is not a duration from 1s to a year"));
    }
    Ok(duration)
}

/// A Standard Webhooks secret: `whsec_` and base64 of at least 16 bytes. The message never repeats
/// the value: it is a secret.
fn parse_webhook_secret(raw: &str) -> Result<SigningKey, String> {
    const MIN_BYTES: usize = 16;
    match SigningKey::parse(raw) {
        Ok(key) if key.len() >= MIN_BYTES => Ok(key),
        Ok(key) => Err(format!("the secret has {} bytes; at least {MIN_BYTES} are needed", key.len())),
        Err(e) => Err(format!("{e} (expected whsec_ followed by base64, as the payment provider gives it)")),
    }
}

fn parse_bool(raw: &str) -> Result<bool, String> {
    match raw.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("{raw:?} is not true or false")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Layer<'static> {
        env_layer(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn environment_overrides_defaults() {
        let mut config = Config::default();
        config
            .apply(&env(&[("KEEL_LISTEN", "0.0.0.0:9000"), ("KEEL_SHARD_URLS", "a, b"), ("KEEL_DB_POOL_SIZE", "4")]))
            .unwrap();
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.shard_urls, ["a", "b"]);
        assert_eq!(config.db_pool_size, 4);
        config
            .apply(&env(&[("KEEL_WEBHOOK_RETRY_SCHEDULE", "1s, 500ms"), ("KEEL_SMTP_URL", "smtp://127.0.0.1:2525")]))
            .unwrap();
        assert_eq!(config.webhook_retry_schedule, [Duration::from_secs(1), Duration::from_millis(500)]);
        assert_eq!(config.smtp_url.as_deref(), Some("smtp://127.0.0.1:2525"));
    }

    #[test]
    fn replicas_are_listed_per_database_and_shards_are_separated_by_semicolons() {
        let mut config = Config::default();
        let replicas = [
            ("KEEL_CATALOG_REPLICA_URLS", "c1, c2"),
            ("KEEL_SHARD_REPLICA_URLS", "a0,b0; ;a2"),
            ("KEEL_REPLICAS", "2"),
        ];
        config.apply(&env(&replicas)).unwrap();
        assert_eq!(config.catalog_replica_urls, ["c1", "c2"]);
        assert_eq!(config.shard_replica_urls, [vec!["a0", "b0"], vec![], vec!["a2"]]);
        assert_eq!(config.replicas, 2);
        let err = Config::default().apply(&env(&[("KEEL_SHARD_REPLICA_URLS", "a0,,b0;a1")])).unwrap_err();
        assert_eq!(err.setting, "KEEL_SHARD_REPLICA_URLS");
        assert!(err.message.contains("';'"), "{err}");
        let err = Config::default().apply(&env(&[("KEEL_REPLICAS", "9")])).unwrap_err();
        assert_eq!(err.setting, "KEEL_REPLICAS");
    }

    #[test]
    fn shards_are_unset_unless_asked_for_and_from_1_to_100() {
        // Unset is not the default count: `keel up` tells a count asked for from none.
        assert_eq!(Config::default().shards, None);
        let mut config = Config::default();
        config.apply(&env(&[("KEEL_SHARDS", "4")])).unwrap();
        assert_eq!(config.shards, Some(4));
        config.apply(&env(&[("KEEL_SHARDS", "100")])).unwrap();
        assert_eq!(config.shards, Some(MAX_SHARDS));
        for bad in ["0", "101", "two", "-1"] {
            let err = Config::default().apply(&env(&[("KEEL_SHARDS", bad)])).unwrap_err();
            assert_eq!(err.setting, "KEEL_SHARDS");
            assert!(err.message.contains("from 1 to 100"), "{err}");
        }
        let dir = std::env::temp_dir().join(format!("keel-config-shards-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keel.toml");
        std::fs::write(&file, "shards = 3\n").unwrap();
        let mut config = Config::default();
        config.apply(&file_layer(&file).unwrap()).unwrap();
        assert_eq!(config.shards, Some(3));
        std::fs::write(&file, "shards = 0\n").unwrap();
        let err = Config::default().apply(&file_layer(&file).unwrap()).unwrap_err();
        assert_eq!(err.setting, "shards");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_workers_have_a_pool_size_of_their_own() {
        let mut config = Config::default();
        assert_eq!((config.db_pool_size, config.worker_pool_size), (16, 16));
        config.apply(&env(&[("KEEL_WORKER_POOL_SIZE", "6")])).unwrap();
        assert_eq!((config.db_pool_size, config.worker_pool_size), (16, 6));
        let err = Config::default().apply(&env(&[("KEEL_WORKER_POOL_SIZE", "0")])).unwrap_err();
        assert_eq!(err.setting, "KEEL_WORKER_POOL_SIZE");
    }

    #[test]
    fn errors_name_the_setting_and_its_source() {
        let err = Config::default().apply(&env(&[("KEEL_LISTEN", "localhost")])).unwrap_err();
        assert_eq!(err.setting, "KEEL_LISTEN");
        assert!(err.to_string().contains("KEEL_LISTEN") && err.to_string().contains("environment"), "{err}");
        let err = Config::default().apply(&env(&[("KEEL_DB_POOL_SIZE", "0")])).unwrap_err();
        assert_eq!(err.setting, "KEEL_DB_POOL_SIZE");
        let err = Config::default().apply(&env(&[("KEEL_SHUTDOWN_TIMEOUT", "soon")])).unwrap_err();
        assert_eq!(err.setting, "KEEL_SHUTDOWN_TIMEOUT");
        for bad in ["soon", "500us", "30d", ""] {
            let err = Config::default().apply(&env(&[("KEEL_STATEMENT_TIMEOUT", bad)])).unwrap_err();
            assert_eq!(err.setting, "KEEL_STATEMENT_TIMEOUT", "{bad:?}");
            assert!(err.to_string().contains("environment"), "{err}");
        }
        for setting in [
            "KEEL_SAGA_BACKOFF_MAX",
            "KEEL_SAGA_LOCK_TIMEOUT",
            "KEEL_ORDER_RECONCILE_AFTER",
            "KEEL_ORDER_RECONCILE_EVERY",
        ] {
            for bad in ["soon", "0s", "30d"] {
                let err = Config::default().apply(&env(&[(setting, bad)])).unwrap_err();
                assert_eq!(err.setting, setting, "{bad:?}");
            }
        }
        let err = Config::default().apply(&env(&[("KEEL_SMTP_URL", "mail.example.org")])).unwrap_err();
        assert_eq!(err.setting, "KEEL_SMTP_URL");
        let err = Config::default().apply(&env(&[("KEEL_WEBHOOK_RETRY_SCHEDULE", "1s,,2s")])).unwrap_err();
        assert_eq!(err.setting, "KEEL_WEBHOOK_RETRY_SCHEDULE");
        let err = Config::default().apply(&env(&[("KEEL_MAIL_FROM", "not an address")])).unwrap_err();
        assert_eq!(err.setting, "KEEL_MAIL_FROM");
        let err = Config::default().apply(&env(&[("KEEL_NATS_PREFIX", "keel.events")])).unwrap_err();
        assert_eq!(err.setting, "KEEL_NATS_PREFIX");
        let err = Config::default().apply(&env(&[("KEEL_REDIS_URL", "127.0.0.1:6379")])).unwrap_err();
        assert_eq!(err.setting, "KEEL_REDIS_URL");
        for bad in ["wallet=5s", "profiles=5s", "profile"] {
            let err = Config::default().apply(&env(&[("KEEL_CONSISTENCY_BUDGETS", bad)])).unwrap_err();
            assert_eq!(err.setting, "KEEL_CONSISTENCY_BUDGETS", "{bad}");
        }
        for bad in ["secret", "whsec_!!!", "whsec_c2hvcnQ="] {
            let err = Config::default().apply(&env(&[("KEEL_PAYMENT_WEBHOOK_SECRET", bad)])).unwrap_err();
            assert_eq!(err.setting, "KEEL_PAYMENT_WEBHOOK_SECRET", "{bad}");
            assert!(bad.len() < 7 || !err.to_string().contains(&bad[6..]), "the secret is not repeated: {err}");
        }
        let mut config = Config::default();
        config.apply(&env(&[("KEEL_PAYMENT_WEBHOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")])).unwrap();
        assert_eq!(config.payment_webhook_secret.map(|k| k.len()), Some(24));
        let mut config = Config::default();
        config.apply(&env(&[("KEEL_CONSISTENCY_BUDGETS", "profile=60s, product=0s")])).unwrap();
        assert_eq!(config.budget(DataKind::Profile), Duration::from_secs(60));
        assert_eq!(config.budget(DataKind::Cart), Duration::from_secs(10));
    }

    #[test]
    fn file_settings_are_checked_and_named() {
        let dir = std::env::temp_dir().join(format!("keel-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "listen = \"127.0.0.1:9001\"\nshard_urls = [\"x\", \"y\"]\ndebug_headers = true\n")
            .unwrap();
        let mut config = Config::default();
        config.apply(&file_layer(&good).unwrap()).unwrap();
        assert_eq!(config.listen.port(), 9001);
        assert_eq!(config.shard_urls, ["x", "y"]);
        assert!(config.debug_headers);

        let unknown = dir.join("unknown.toml");
        std::fs::write(&unknown, "lsten = \"x\"\n").unwrap();
        let err = file_layer(&unknown).err().unwrap();
        assert_eq!(err.setting, "lsten");

        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "db_pool_size = -3\n").unwrap();
        let err = Config::default().apply(&file_layer(&bad).unwrap()).unwrap_err();
        assert_eq!(err.setting, "db_pool_size");
        assert!(err.to_string().contains("bad.toml"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn records_are_kept_at_least_an_hour() {
        let mut config = Config::default();
        config.apply(&env(&[("KEEL_RECORD_RETENTION", "90days")])).unwrap();
        assert_eq!(config.record_retention, Duration::from_secs(90 * 24 * 3600));
        let err = Config::default().apply(&env(&[("KEEL_RECORD_RETENTION", "10m")])).unwrap_err();
        assert_eq!(err.setting, "KEEL_RECORD_RETENTION");
        assert!(err.message.contains("shorter than an hour"), "{}", err.message);
    }

    #[test]
    fn the_statement_timeout_follows_the_request_and_job_timeouts_unless_set() {
        let mut config = Config::default();
        assert_eq!(config.statement_timeout(), config.job_timeout, "the longer of the two by default");
        config.apply(&env(&[("KEEL_REQUEST_TIMEOUT", "5s"), ("KEEL_JOB_TIMEOUT", "2s")])).unwrap();
        assert_eq!(config.statement_timeout(), Duration::from_secs(5));
        config.apply(&env(&[("KEEL_STATEMENT_TIMEOUT", "200ms")])).unwrap();
        assert_eq!(config.statement_timeout(), Duration::from_millis(200));
        config.apply(&env(&[("KEEL_STATEMENT_TIMEOUT", "0")])).unwrap();
        assert_eq!(config.statement_timeout(), Duration::ZERO, "0: no limit");
        config.apply(&env(&[("KEEL_STATEMENT_TIMEOUT", "24days")])).unwrap();
        assert_eq!(config.statement_timeout(), Duration::from_secs(24 * 24 * 3600));
    }

    #[test]
    fn connection_and_rate_limit_settings_are_checked_and_named() {
        let mut config = Config::default();
        assert!(config.rate_limit, "rate limits are on unless turned off");
        assert!(config.header_read_timeout <= Duration::from_secs(30));
        config
            .apply(&env(&[
                ("KEEL_RATE_LIMIT", "off"),
                ("KEEL_RATE_LIMIT_PER_ADDRESS", "50/1s"),
                ("KEEL_RATE_LIMIT_MAIL", "3/1h"),
                ("KEEL_HEADER_READ_TIMEOUT", "5s"),
                ("KEEL_IDLE_TIMEOUT", "500ms"),
                ("KEEL_MAX_CONNECTIONS", "2000"),
                ("KEEL_TRUST_FORWARDED_FOR", "true"),
            ]))
            .unwrap();
        assert!(!config.rate_limit && config.trust_forwarded_for);
        assert_eq!(config.rate_limit_per_address.requests.get(), 50);
        assert_eq!(config.rate_limit_mail.window, Duration::from_secs(3600));
        assert_eq!(
            (config.header_read_timeout, config.idle_timeout),
            (Duration::from_secs(5), Duration::from_millis(500))
        );
        assert_eq!(config.max_connections, 2000);
        for (setting, bad) in [
            ("KEEL_RATE_LIMIT", "sometimes"),
            ("KEEL_RATE_LIMIT_PER_ADDRESS", "50"),
            ("KEEL_RATE_LIMIT_PER_TOKEN", "0/1m"),
            ("KEEL_RATE_LIMIT_MAIL", "3/forever"),
            ("KEEL_HEADER_READ_TIMEOUT", "0s"),
            ("KEEL_IDLE_TIMEOUT", "2h"),
            ("KEEL_MAX_CONNECTIONS", "0"),
            ("KEEL_TRUST_FORWARDED_FOR", "maybe"),
        ] {
            let err = Config::default().apply(&env(&[(setting, bad)])).unwrap_err();
            assert_eq!(err.setting, setting, "{bad:?}");
            assert!(err.to_string().contains("environment"), "{err}");
        }
    }
}
