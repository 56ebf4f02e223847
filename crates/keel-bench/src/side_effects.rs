//! Side effects, measured end to end: webhook deliveries per second to a fast local receiver, the
//! search index lag (event committed → searchable), and events per second through NATS JetStream.
//! Printed with the scenarios and kept in the report; they have no targets of their own but the
//! index lag's (p99 under 2 s).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::scenarios::{connect, Plan};
use crate::setup::{free_port, Keel, Process, Seed, ADMIN_TOKEN};

#[derive(Debug, Clone, Serialize, Default)]
pub struct SideEffects {
    pub webhook_deliveries: u64,
    pub webhook_deliveries_per_second: f64,
    pub index_lag_samples: i64,
    pub index_lag_p50_ms: f64,
    pub index_lag_p99_ms: f64,
    pub jetstream_events: u64,
    /// None when no nats-server was found.
    pub jetstream_events_per_second: Option<f64>,
    pub commands: Vec<String>,
}

/// A receiver that answers 200 at once and counts.
async fn fast_receiver() -> (String, Arc<AtomicU64>) {
    let count = Arc::new(AtomicU64::new(0));
    let counter = count.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::Relaxed);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, count)
}

async fn rename(client: &reqwest::Client, base: &str, product: &str, name: String) {
    let response = client
        .patch(format!("{base}/v1/products/{product}"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "name": name }))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "renaming a product: {}", response.status());
}

pub async fn measure(keel: &Keel, seed: &Seed, plan: &Plan, keel_binary: &Path, work: &Path) -> SideEffects {
    let mut result = SideEffects::default();
    let client = reqwest::Client::new();
    let catalog = connect(&keel.db_url("keel_catalog")).await;

    // Index lag at a steady, modest rate: each product renamed once, 50 renames a second.
    let paced: Vec<&String> = seed.products.iter().take(if plan.smoke { 20 } else { 500 }).collect();
    let since = std::time::SystemTime::now();
    let start = tokio::time::Instant::now();
    for (i, product) in paced.iter().enumerate() {
        tokio::time::sleep_until(start + Duration::from_millis(20 * i as u64)).await;
        rename(&client, &keel.base, product, format!("Paced {i}")).await;
    }
    let ids: Vec<uuid::Uuid> = paced.iter().map(|p| p.parse().unwrap()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let row = loop {
        let row = catalog
            .query_one(
                "SELECT count(*), coalesce(percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY
                     extract(epoch FROM s.indexed_at - j.created_at)), ARRAY[0, 0]::float8[])
                 FROM keel_jobs j JOIN product_search s ON s.product_id::text = j.aggregate_id
                 WHERE j.kind = 'product.updated' AND j.created_at >= $1 AND s.product_id = ANY($2)
                   AND s.name LIKE 'Paced %'",
                &[&since, &ids],
            )
            .await
            .unwrap();
        if row.get::<_, i64>(0) >= ids.len() as i64 || Instant::now() > deadline {
            break row;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let quantiles: Vec<f64> = row.get(1);
    (result.index_lag_samples, result.index_lag_p50_ms, result.index_lag_p99_ms) =
        (row.get(0), quantiles[0] * 1000.0, quantiles[1] * 1000.0);
    result.commands.push(format!(
        "index lag: {} products renamed at 50/s (PATCH /v1/products/{{id}}); lag = search document's indexed_at − event's created_at",
        ids.len()
    ));

    // Webhook deliveries: a burst of renames (32 at a time), every one delivered to a fast receiver.
    let (url, received) = fast_receiver().await;
    let subscription = json!({ "url": url, "events": ["product.updated"] });
    let created =
        client.post(format!("{}/v1/webhooks", keel.base)).bearer_auth(ADMIN_TOKEN).json(&subscription).send().await;
    assert_eq!(created.unwrap().status(), 201, "subscribing the receiver");
    let n = if plan.smoke { 100 } else { 5_000 }.min(seed.products.len() * 10);
    let started = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for i in 0..n {
        if running.len() >= 32 {
            running.join_next().await;
        }
        let (client, base, product) =
            (client.clone(), keel.base.clone(), seed.products[i % seed.products.len()].clone());
        running.spawn(async move { rename(&client, &base, &product, format!("Burst {i}")).await });
    }
    while running.join_next().await.is_some() {}
    while received.load(Ordering::Relaxed) < n as u64 {
        assert!(started.elapsed() < Duration::from_secs(300), "webhooks were not all delivered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    result.webhook_deliveries = n as u64;
    result.webhook_deliveries_per_second = n as f64 / started.elapsed().as_secs_f64();
    result.commands.push(format!(
        "webhooks: {n} renames, 32 at a time, each delivered to a local receiver answering 200; first rename to last delivery"
    ));

    result.jetstream_events_per_second = jetstream(keel_binary, work, plan, &mut result).await;
    result
}

fn nats_server() -> Option<&'static str> {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

/// No-op events (`keel.ping`) inserted at once into a shard's outbox of a second `keel up` with
/// `KEEL_NATS_URL`: relayed to JetStream, consumed, acknowledged. Timed until the outbox rows are
/// relayed and the stream is empty (work-queue retention: an acknowledged event leaves it).
async fn jetstream(keel_binary: &Path, work: &Path, plan: &Plan, result: &mut SideEffects) -> Option<f64> {
    let binary = nats_server()?;
    let port = free_port();
    let store = work.join("nats");
    let nats = Process(
        std::process::Command::new(binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&store)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?,
    );
    let url = format!("nats://127.0.0.1:{port}");
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(20), "nats-server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let keel = Keel::start_with(keel_binary, &work.join("nats-keel"), &[("KEEL_NATS_URL", url.clone())]).await;
    let stream = keel_outbox::JetStream::connect(&url, "keel").await.expect("connecting to JetStream");
    let shard = connect(&keel.db_url("keel_shard_0")).await;
    let n = plan.jobs as i64;
    let started = Instant::now();
    shard
        .execute(
            "INSERT INTO keel_jobs (id, kind, aggregate_id, payload)
             SELECT gen_random_uuid(), 'keel.ping', 'js', '{}' FROM generate_series(1, $1::bigint)",
            &[&n],
        )
        .await
        .unwrap();
    loop {
        let relayed: i64 = shard
            .query_one("SELECT count(*) FROM keel_jobs WHERE kind = 'keel.ping' AND state = 'done'", &[])
            .await
            .unwrap()
            .get(0);
        if relayed >= n && stream.backlog().await.unwrap() == 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            let states = shard
                .query("SELECT state, count(*) FROM keel_jobs WHERE kind = 'keel.ping' GROUP BY 1", &[])
                .await
                .map(|rows| rows.iter().map(|r| format!("{} {}", r.get::<_, String>(0), r.get::<_, i64>(1))).collect())
                .unwrap_or_else(|e| vec![e.to_string()]);
            let log = std::fs::read_to_string(keel.data_dir.join("keel.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!(
                "JetStream events did not finish in 300 s: rows {}; {:?} in the stream; keel's last log lines:\n{}",
                states.join(", "),
                stream.backlog().await,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let per_second = n as f64 / started.elapsed().as_secs_f64();
    result.jetstream_events = n as u64;
    result.commands.push(format!(
        "JetStream: {n} keel.ping events inserted at once into shard 0's outbox of `keel up` with KEEL_NATS_URL (nats-server {} -js); timed until relayed and consumed",
        binary
    ));
    drop(keel);
    drop(nats);
    Some(per_second)
}
