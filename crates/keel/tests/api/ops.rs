use std::time::{Duration, Instant};

use keel_outbox::NewJob;
use serde_json::{json, Value};

use crate::helpers::{connect, expect_json, expect_problem, TestApp};

#[tokio::test]
async fn health_and_readiness() {
    let app = TestApp::spawn().await;
    assert_eq!(expect_json(app.get("/healthz").send().await, 200).await["status"], "alive");
    assert_eq!(expect_json(app.get("/readyz").send().await, 200).await["status"], "ready");

    // A shard whose schema is behind this binary makes the node unready, and says which and why.
    let shard = app.dbs.shard(1).await;
    shard.execute("DELETE FROM keel_migrations", &[]).await.unwrap();
    expect_problem(app.get("/readyz").send().await, 503, "shard1 is at schema version 0").await;
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_show_the_pools() {
    let app = TestApp::spawn().await;
    let (id, _) = app.create_user("Metered").await;
    expect_json(app.get(&format!("/v1/users/{id}")).send().await, 200).await;
    let response = app.get("/metrics").send().await.unwrap();
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = response.text().await.unwrap();
    let has = |needle: &str| text.lines().any(|l| l.contains(needle));
    assert!(has(r#"keel_http_requests_total{method="GET",route="/v1/users/{id}",status="200"}"#), "{text}");
    assert!(has(r#"keel_http_request_duration_seconds_bucket{method="POST",route="/v1/users",status="201""#));
    assert!(has("keel_http_db_queries_per_request_bucket"));
    for db in ["catalog", "shard0", "shard1"] {
        assert!(has(&format!(r#"keel_db_pool_connections{{db="{db}",state="idle"}}"#)), "pool gauge for {db}");
        assert!(has(&format!(r#"keel_db_pool_max_connections{{db="{db}"}} 8"#)), "pool size for {db}");
    }
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = TestApp::spawn().await;
    let given = app.get("/healthz").header("x-request-id", "trace-me-42").send().await.unwrap();
    assert_eq!(given.headers()["x-request-id"], "trace-me-42");
    let made = app.get("/v1/nothing").send().await.unwrap();
    assert_eq!(made.headers()["x-request-id"].len(), 32);
}

#[tokio::test]
async fn the_openapi_document_describes_every_route() {
    let app = TestApp::spawn().await;
    let doc = expect_json(app.get("/openapi.json").send().await, 200).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
    let paths = doc["paths"].as_object().unwrap();
    let expected: &[(&str, &[&str])] = &[
        ("/v1/users", &["post"]),
        ("/v1/users/{id}", &["get", "patch"]),
        ("/v1/products", &["get", "post"]),
        ("/v1/products/{id}", &["get", "patch"]),
        ("/v1/products/{id}/inventory", &["get", "put"]),
        ("/v1/cart", &["get"]),
        ("/v1/cart/items/{product_id}", &["put", "delete"]),
        ("/v1/wallet", &["get"]),
        ("/v1/wallet/deposits", &["post"]),
    ];
    for (path, methods) in expected {
        let item = paths.get(*path).unwrap_or_else(|| panic!("{path} is not documented"));
        for method in *methods {
            assert!(item.get(*method).is_some(), "{method} {path} is not documented");
        }
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for schema in ["Problem", "Profile", "CreatedUser", "Product", "Cart", "DepositMade"] {
        assert!(schemas.contains_key(schema), "schema {schema} is missing");
    }
    let product: &Value = &schemas["Product"]["properties"];
    assert_eq!(product["price_cents"]["type"], "integer");
}

/// The routes answered and the routes documented are the same: each route of the authorization
/// table (`authorization::TABLE`, the one list of the routes the tests know) is in the document, and
/// each operation of the document is answered (not "no such route", not 405).
#[tokio::test]
async fn every_route_the_server_answers_is_in_the_openapi_document() {
    let app = TestApp::spawn().await;
    let doc = expect_json(app.get("/openapi.json").send().await, 200).await;
    let paths = doc["paths"].as_object().unwrap();
    for access in crate::authorization::TABLE {
        let (method, path) = (access.method().to_lowercase(), access.template());
        let item = paths.get(path).unwrap_or_else(|| panic!("{path} is not documented"));
        assert!(item.get(&method).is_some(), "{method} {path} is not documented");
    }
    // The operational routes say what they answer.
    let responses = |path: &str| doc["paths"][path]["get"]["responses"].clone();
    assert!(responses("/healthz")["200"]["content"]["application/json"].is_object());
    assert!(responses("/readyz")["200"].is_object() && responses("/readyz")["503"].is_object());
    let metrics = responses("/metrics")["200"]["content"].as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert!(metrics.iter().all(|t| t.starts_with("text/plain")) && !metrics.is_empty(), "{metrics:?}");
    assert!(responses("/openapi.json")["200"]["content"]["application/json"].is_object());

    let id = uuid::Uuid::now_v7().to_string();
    for (path, item) in paths {
        let concrete: String =
            path.split('/').map(|s| if s.starts_with('{') { id.as_str() } else { s }).collect::<Vec<_>>().join("/");
        for method in item.as_object().unwrap().keys() {
            if !["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                continue;
            }
            // Unauthenticated, without a body: nothing is changed.
            let request = app.client.request(method.to_uppercase().parse().unwrap(), app.url(&concrete));
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            assert_ne!(status, 405, "{method} {path} is documented, not answered: {body}");
            assert!(!(status == 404 && body.contains("no such route")), "{method} {path} is documented, not answered");
        }
    }
}

/// Scans of `keel_jobs` counted by each of `app`'s databases (catalogue, then shards), once every
/// connection the app had to it has published its counts. A PostgreSQL backend keeps its table
/// statistics to itself for up to 10 s while idle, and publishes them when it exits: so the app's
/// connections are ended first (its pools open new ones when next needed).
async fn job_table_scans(app: &TestApp) -> Vec<i64> {
    let mut scans = Vec::new();
    for url in std::iter::once(&app.dbs.catalog_url).chain(&app.dbs.shard_urls) {
        let client = connect(url).await;
        let others = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()";
        let ended: Vec<i32> = client.query(others, &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        client.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int4[]) AS pid", &[&ended]).await.unwrap();
        let started = Instant::now();
        loop {
            let left: i64 = client
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)", &[&ended])
                .await
                .unwrap()
                .get(0);
            if left == 0 {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "the app's connections did not end");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        client.batch_execute("SELECT pg_stat_clear_snapshot()").await.unwrap();
        let row = client
            .query_one(
                "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'keel_jobs'",
                &[],
            )
            .await
            .unwrap();
        scans.push(row.get(0));
    }
    scans
}

/// `/metrics` answers anyone, so a scrape must not make the databases count their queues: 50
/// scrapes leave each database's job table scanned no more than the gauges' timer did (every 5 s),
/// not once per scrape. The gauges are still there at every scrape, and follow the queue within
/// the timer's period.
#[tokio::test]
async fn scrapes_do_not_query_the_job_tables_and_the_queue_gauges_still_follow_the_queues() {
    const SCRAPES: usize = 50;
    /// `QUEUE_GAUGES_REFRESH` in `app/ops.rs`.
    const REFRESH: Duration = Duration::from_secs(5);
    let app = TestApp::spawn().await;
    let every_kind = r#"keel_queue_depth{kind="order.placed",state="pending"}"#;

    let before = job_table_scans(&app).await;
    let started = Instant::now();
    for _ in 0..SCRAPES {
        let response = app.get("/metrics").send().await.unwrap();
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        assert!(sample(&text, every_kind).is_some(), "{every_kind} missing from\n{text}");
    }
    let after = job_table_scans(&app).await;
    // The timer's counts in that time, one more in case one was under way, and one to spare.
    let allowed = (started.elapsed().as_secs_f64() / REFRESH.as_secs_f64()).ceil() as i64 + 2;
    eprintln!("keel_jobs scans before {before:?}, after {after:?}, in {:?}", started.elapsed());
    for ((db, before), after) in ["catalog", "shard0", "shard1"].iter().zip(&before).zip(&after) {
        assert!(
            after - before <= allowed,
            "{db}: keel_jobs scanned {} times over {SCRAPES} scrapes in {:?} (at most {allowed} expected)",
            after - before,
            started.elapsed()
        );
    }

    // Jobs of a kind of this test's own: their gauge shows them within the refresh period. (The
    // recorder is the process's: another test's app may set this kind back to zero between its own
    // counts, so the test looks often.)
    let kind = "test.ops_refreshed";
    let series = format!(r#"keel_queue_depth{{kind="{kind}",state="pending"}}"#);
    let client = app.databases.shard(0).unwrap().client().await.unwrap();
    let enqueued = Instant::now();
    for _ in 0..3 {
        keel_outbox::enqueue(&client, &NewJob::new(kind, "test", json!({}))).await.unwrap();
    }
    loop {
        let text = app.get("/metrics").send().await.unwrap().text().await.unwrap();
        if sample(&text, &series) == Some(3.0) {
            eprintln!("{series} at 3 after {:?}", enqueued.elapsed());
            let age = format!(r#"keel_queue_oldest_pending_seconds{{kind="{kind}"}}"#);
            assert!(sample(&text, &age).is_some(), "{age} missing from\n{text}");
            break;
        }
        assert!(
            enqueued.elapsed() < REFRESH + Duration::from_secs(3),
            "{series} is not 3 within {REFRESH:?} of the enqueue: {:?}",
            sample(&text, &series)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the sample `series` (name and labels, as rendered) in a `/metrics` text.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `/readyz` answers anyone: a database it cannot reach is named, and why is logged, not answered
/// (the driver's message names hosts, databases and roles).
#[tokio::test]
async fn readiness_names_an_unreachable_database_without_the_drivers_message() {
    let app = TestApp::spawn().await;
    assert_eq!(expect_json(app.get("/readyz").send().await, 200).await["status"], "ready");

    // shard1 refuses new connections, and the app's connections to it are ended.
    let maintenance = connect(&crate::helpers::cluster().maintenance_url()).await;
    let name: String = app.dbs.shard(1).await.query_one("SELECT current_database()", &[]).await.unwrap().get(0);
    let database = |allowed: bool| format!(r#"ALTER DATABASE "{name}" ALLOW_CONNECTIONS {allowed}"#);
    maintenance.batch_execute(&database(false)).await.unwrap();
    maintenance
        .execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", &[&name])
        .await
        .unwrap();

    let unready = app.get("/readyz").send().await.unwrap();
    assert_eq!(
        unready.headers().get("retry-after").map(|v| v.to_str().unwrap()),
        Some("1"),
        "every 503 says when to retry"
    );
    let problem = expect_problem(Ok(unready), 503, "shard1 is not reachable").await;
    let detail = problem["detail"].as_str().unwrap();
    for words in [name.as_str(), "accepting connections", "terminating", "db error", "FATAL", "error", "connection"] {
        assert!(!detail.to_lowercase().contains(&words.to_lowercase()), "{detail:?} repeats {words:?}");
    }

    // Reachable again: ready again.
    maintenance.batch_execute(&database(true)).await.unwrap();
    let started = Instant::now();
    while app.get("/readyz").send().await.unwrap().status() != 200 {
        assert!(started.elapsed() < Duration::from_secs(10), "not ready again once shard1 is reachable");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Query insight: the admin sees the statements that took the most time on a database, from
/// `pg_stat_statements` (loaded in the test cluster as in `keel up`'s).
#[tokio::test]
async fn the_admin_sees_the_statements_that_took_the_most_time() {
    let app = TestApp::spawn().await;
    for i in 0..5 {
        app.create_user(&format!("Busy{i}")).await;
    }
    let mut databases = vec!["catalog".to_owned()];
    databases.extend((0..crate::helpers::SHARDS).map(|i| format!("shard_{i}")));
    let mut sign_ups = 0;
    for database in &databases {
        let path = format!("/v1/admin/queries?database={database}&limit=50");
        let body = expect_json(app.admin(app.get(&path)).send().await, 200).await;
        assert_eq!(body["database"], database.as_str());
        let items = body["items"].as_array().unwrap();
        assert!(!items.is_empty(), "{database}: {body}");
        let totals: Vec<f64> = items.iter().map(|i| i["total_ms"].as_f64().unwrap()).collect();
        assert!(totals.windows(2).all(|w| w[0] >= w[1]), "the most time first: {totals:?}");
        for item in items {
            assert!(item["query"].as_str().is_some_and(|q| !q.is_empty()), "{item}");
            assert!(item["calls"].as_i64().unwrap() >= 1 && item["rows"].as_i64().is_some(), "{item}");
            assert!(item["mean_ms"].as_f64().unwrap() <= item["total_ms"].as_f64().unwrap(), "{item}");
            assert!(
                item["hit_ratio"].is_null() || (0.0..=1.0).contains(&item["hit_ratio"].as_f64().unwrap()),
                "{item}"
            );
        }
        // The sign-ups' user rows went to the shards, and only there.
        sign_ups += items
            .iter()
            .filter(|i| i["query"].as_str().unwrap().contains("INSERT INTO users"))
            .map(|i| i["calls"].as_i64().unwrap())
            .sum::<i64>();
    }
    assert_eq!(sign_ups, 5, "each sign-up's INSERT counted once, on its shard");
    expect_problem(app.admin(app.get("/v1/admin/queries?database=nope")).send().await, 422, "catalog").await;
    expect_problem(app.admin(app.get("/v1/admin/queries")).send().await, 400, "database").await;
    expect_problem(app.admin(app.get("/v1/admin/queries?database=catalog&limit=0")).send().await, 422, "limit").await;
}
