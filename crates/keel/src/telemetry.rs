//! Logs and metrics for the whole process: log lines filtered by `KEEL_LOG` (JSON, or text a person
//! reads at a terminal: `KEEL_LOG_FORMAT`), and a Prometheus registry rendered at `/metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object a line: for log collectors (the default when standard error is not a terminal).
    Json,
    /// A short line a person reads, coloured: the default at a terminal.
    Text,
}

impl LogFormat {
    pub fn parse(raw: &str) -> Result<LogFormat, String> {
        match raw {
            "json" => Ok(LogFormat::Json),
            "text" => Ok(LogFormat::Text),
            other => Err(format!("{other:?} is not a log format: json or text")),
        }
    }

    /// `chosen`, or else text at a terminal and JSON otherwise.
    pub fn or_by_terminal(chosen: Option<LogFormat>) -> LogFormat {
        use std::io::IsTerminal;
        chosen.unwrap_or(if std::io::stderr().is_terminal() { LogFormat::Text } else { LogFormat::Json })
    }
}

/// Sends log lines to standard error. Every line inside a request carries that request's span (its
/// `request_id`, method and route). Later calls do nothing, so tests may call it freely.
pub fn init_logging(filter: &str, format: LogFormat) -> Result<(), String> {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| format!("invalid setting KEEL_LOG: {e}"))?;
    let _ = match format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_current_span(true)
            .with_span_list(false)
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .try_init(),
        LogFormat::Text => tracing_subscriber::fmt()
            .compact()
            .with_env_filter(filter)
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .try_init(),
    };
    Ok(())
}

/// Latency buckets from 100 µs to 10 s: a cached read and a slow checkout both land in a real bucket.
const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const COUNT_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 50.0];

fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_per_request".into()), COUNT_BUCKETS))
            .expect("bucket lists are non-empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may be installed already (tests build many apps in one process): keep it.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Installs the process-wide metrics recorder, once.
pub fn init_metrics() {
    handle();
}

pub fn render_metrics() -> String {
    handle().render()
}

/// Connection-pool gauges for one database, refreshed at every scrape.
pub fn record_pool(db: &str, status: deadpool_postgres::Status) {
    let in_use = status.size.saturating_sub(status.available);
    metrics::gauge!("keel_db_pool_connections", "db" => db.to_owned(), "state" => "in_use").set(in_use as f64);
    metrics::gauge!("keel_db_pool_connections", "db" => db.to_owned(), "state" => "idle").set(status.available as f64);
    metrics::gauge!("keel_db_pool_max_connections", "db" => db.to_owned()).set(status.max_size as f64);
    metrics::gauge!("keel_db_pool_waiting", "db" => db.to_owned()).set(status.waiting as f64);
}
