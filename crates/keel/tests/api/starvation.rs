//! Workers must not starve the API (issue 22, item 13): `keel up` runs the API and the job workers in
//! one process, and a backlog of jobs whose handlers hold their database connection a while must not
//! take the connections requests need. The workers have pools of their own (`KEEL_WORKER_POOL_SIZE`);
//! on the pools they used to share with the API, requests waited 5 s for a connection and got a 503.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::{connect, expect_json, ADMIN_TOKEN};
use crate::processes::{scratch_dir, Keel};

const BACKLOG: i64 = 3_000;

/// A backlog of 3,000 product events under `keel up` with its default pools, every one of whose
/// handlers blocks on a row lock the test holds (the search row it indexes), so that each running
/// handler holds a catalogue connection for as long as the lock is held: the product event kinds have
/// 48 slots, more than the workers' 16 connections, so every worker connection is busy (the test
/// sees 16 of them waiting on the lock). Meanwhile requests that need the catalogue (reads, a
/// sign-up, a stock change) answer at once, none with a 503.
#[tokio::test]
async fn a_worker_backlog_holding_every_worker_connection_leaves_the_api_its_connections() {
    // The workers' connections per database under `keel up`: the default of `KEEL_WORKER_POOL_SIZE`.
    let worker_pool = keel::config::Config::default().worker_pool_size as i64;
    let scratch = scratch_dir("starvation");
    let data_dir = scratch.join("data");
    let data_arg = data_dir.to_str().unwrap().to_owned();
    let env = [("KEEL_ADMIN_TOKEN", ADMIN_TOKEN.to_owned())];
    let mut keel = Keel::start(&["up", "--data-dir", &data_arg], &env, &scratch.join("keel.log"));
    keel.wait_ready(Duration::from_secs(60)).await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let base = keel.address.clone();
    let create = |sku: &'static str| {
        let request = client.post(format!("{base}/v1/products")).bearer_auth(ADMIN_TOKEN);
        request.json(&json!({ "sku": sku, "name": sku, "description": "A thing", "price_cents": 100, "stock": 5 }))
    };
    let locked = expect_json(create("LOCKED").send().await, 201).await["id"].as_str().unwrap().to_owned();
    let probe = expect_json(create("PROBE").send().await, 201).await["id"].as_str().unwrap().to_owned();
    let locked_id: uuid::Uuid = locked.parse().unwrap();

    let socket_dir = keel_pg::socket_dir_for(&data_dir.join("run"), 5432);
    let catalog_url = format!("host={} port=5432 user=keel dbname=keel_catalog", socket_dir.display());
    let mut holder = connect(&catalog_url).await;
    let observer = connect(&catalog_url).await;
    // The product's search row, once the worker has indexed it; then held, so that every later
    // indexing of the product waits.
    let started = Instant::now();
    let lock = holder.transaction().await.unwrap();
    while lock
        .query_opt("SELECT 1 FROM product_search WHERE product_id = $1 FOR UPDATE", &[&locked_id])
        .await
        .unwrap()
        .is_none()
    {
        assert!(started.elapsed() < Duration::from_secs(20), "the product was never indexed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    observer
        .execute(
            "INSERT INTO keel_jobs (id, kind, aggregate_id, payload)
             SELECT gen_random_uuid(),
                    (ARRAY['product.created', 'product.updated', 'product.stock_changed'])[1 + n % 3], $1, '{}'
             FROM generate_series(1, $2::bigint) n",
            &[&locked, &BACKLOG],
        )
        .await
        .unwrap();
    // Woken as Keel's enqueuers wake them, once committed.
    observer.batch_execute("NOTIFY keel_jobs").await.unwrap();
    let waiting_on_the_lock = || async {
        let sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = 'keel_catalog' AND wait_event_type = 'Lock'";
        observer.query_one(sql, &[]).await.unwrap().get::<_, i64>(0)
    };
    let started = Instant::now();
    while waiting_on_the_lock().await < worker_pool {
        assert!(started.elapsed() < Duration::from_secs(20), "the backlog never held every worker connection");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("every worker connection held by the backlog {:?} after it was written", started.elapsed());

    // What the API does meanwhile, one request after another: reads and writes of the catalogue.
    let mut answers = Vec::new();
    for i in 0..24 {
        let request = match i % 4 {
            0 => client.get(format!("{base}/v1/products/{probe}/inventory")),
            1 => client.get(format!("{base}/v1/products?limit=5")),
            2 => client
                .post(format!("{base}/v1/users"))
                .json(&json!({ "name": "S", "email": format!("starved{i}@example.org") })),
            _ => client
                .put(format!("{base}/v1/products/{probe}/inventory"))
                .bearer_auth(ADMIN_TOKEN)
                .json(&json!({ "on_hand": 10 + i })),
        };
        let sent = Instant::now();
        let status = request.send().await.unwrap().status().as_u16();
        answers.push((i, status, sent.elapsed()));
        if !(200..300).contains(&status) {
            break; // the rest would wait as long again
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let still_waiting = waiting_on_the_lock().await;
    let slowest = answers.iter().map(|(_, _, took)| *took).max().unwrap();
    eprintln!(
        "{} requests during the backlog, slowest {slowest:?}, {still_waiting} worker connections still waiting on \
         the lock; answers: {answers:?}",
        answers.len()
    );
    // Every worker connection, and no more: the workers' pool is the most they can hold.
    assert_eq!(still_waiting, worker_pool, "connections held by the backlog at the end");
    let failed: Vec<_> = answers.iter().filter(|(_, status, _)| !(200..300).contains(status)).collect();
    assert!(failed.is_empty(), "requests failed while the workers were busy: {failed:?}");
    assert_eq!(answers.len(), 24);
    // Well below the 5 s a request waited for a pooled connection before its 503: a loaded 2-core
    // machine answers these in milliseconds.
    assert!(slowest < Duration::from_secs(2), "a request waited {slowest:?} while the workers were busy");

    // The lock released, the backlog drains.
    lock.commit().await.unwrap();
    let started = Instant::now();
    loop {
        let sql = "SELECT count(*) FROM keel_jobs WHERE kind LIKE 'product.%' AND state IN ('pending', 'running')";
        let left: i64 = observer.query_one(sql, &[]).await.unwrap().get(0);
        if left == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{left} product events left after the lock went");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("the backlog drained {:?} after the lock was released", started.elapsed());
    drop((holder, observer));
    keel.signal(libc::SIGTERM);
    assert!(keel.wait_exit(Duration::from_secs(60)).await.success(), "log:\n{}", keel.log_text());
}
