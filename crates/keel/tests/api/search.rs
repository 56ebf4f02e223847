//! Product search, kept by the workers from product events: renames, prefixes, typos, stock, paging.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{connect, expect_json, expect_problem, TestApp, TestDatabases};

async fn search(app: &TestApp, query: &str) -> Value {
    expect_json(app.get("/v1/search").query(&[("q", query)]).send().await, 200).await
}

fn ids(page: &Value) -> Vec<String> {
    page["items"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_owned()).collect()
}

/// Polls until `query` does (or does not) find `product`; returns how long that took.
async fn until_found(app: &TestApp, query: &str, product: &str, found: bool) -> Duration {
    let started = Instant::now();
    loop {
        if ids(&search(app, query).await).contains(&product.to_owned()) == found {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{query:?} found={found} never held for {product}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn create(app: &TestApp, sku: &str, name: &str, description: &str) -> String {
    let body = json!({ "sku": sku, "name": name, "description": description, "price_cents": 500, "stock": 3 });
    expect_json(app.admin(app.post("/v1/products")).json(&body).send().await, 201).await["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_renamed_product_is_found_by_its_new_name_and_not_its_old_one() {
    let app = TestApp::spawn().await;
    let workers = app.start_workers();
    let product = create(&app, "LAMP-1", "Quokka Lantern", "A lantern for night walks").await;
    until_found(&app, "quokka", &product, true).await;

    let rename = app.admin(app.patch(&format!("/v1/products/{product}"))).json(&json!({ "name": "Wombat Kettle" }));
    expect_json(rename.send().await, 200).await;
    let lag = until_found(&app, "wombat", &product, true).await;
    assert!(lag < Duration::from_secs(2), "searchable {lag:?} after the rename");
    assert!(!ids(&search(&app, "quokka").await).contains(&product), "the old name no longer finds it");
    // Prefixes, the description, and a one-letter typo all find it.
    for query in ["womb", "kett", "WOMBAT", "night walks", "wonbat", "kettel", "wombat kettle"] {
        assert!(ids(&search(&app, query).await).contains(&product), "{query:?} should find it");
    }
    let hit = &search(&app, "wombat").await["items"][0];
    assert_eq!(
        (hit["name"].as_str(), hit["price_cents"].as_i64(), hit["in_stock"].as_bool()),
        (Some("Wombat Kettle"), Some(500), Some(true))
    );

    // Sold out: search says so.
    let stock = app.admin(app.put(&format!("/v1/products/{product}/inventory"))).json(&json!({ "stock": 0 }));
    expect_json(stock.send().await, 200).await;
    let started = Instant::now();
    while search(&app, "wombat").await["items"][0]["in_stock"] != false {
        assert!(started.elapsed() < Duration::from_secs(10), "in_stock never became false");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let metrics = app.get("/metrics").send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("keel_search_index_lag_seconds_bucket"), "the index lag is measured");
    app.check_queues_drained().await;
    workers.stop().await;
}

#[tokio::test]
async fn results_rank_names_over_descriptions_page_and_fall_back_to_typos() {
    let app = TestApp::spawn().await;
    let workers = app.start_workers();
    let in_name = create(&app, "R-1", "Copper Kettle", "").await;
    let in_description = create(&app, "R-2", "Tea pot", "Pairs well with a copper cup").await;
    let near = create(&app, "R-3", "Coper wire", "").await;
    // Workers index products in parallel, in any order: wait for each of the three.
    until_found(&app, "kettle", &in_name, true).await;
    until_found(&app, "copper", &in_description, true).await;
    until_found(&app, "wire", &near, true).await;
    let page = search(&app, "copper").await;
    assert_eq!(ids(&page), [in_name.clone(), in_description.clone()], "the name's match first; exact matches only");

    let first = expect_json(app.get("/v1/search?q=copper&limit=1").send().await, 200).await;
    assert_eq!(ids(&first), std::slice::from_ref(&in_name));
    let cursor = first["next_cursor"].as_str().unwrap();
    let second = expect_json(app.get(&format!("/v1/search?q=copper&limit=1&cursor={cursor}")).send().await, 200).await;
    assert_eq!(ids(&second), [in_description]);
    assert!(second["next_cursor"].is_null());
    // Nothing matches "coppr" exactly: the names most like it do.
    let typos = ids(&search(&app, "coppr").await);
    assert!(typos.contains(&in_name) && typos.contains(&near), "{typos:?}");
    assert!(ids(&search(&app, "zebra").await).is_empty());
    workers.stop().await;
}

#[tokio::test]
async fn bad_search_queries_are_4xx() {
    let app = TestApp::spawn().await;
    expect_problem(app.get("/v1/search").send().await, 422, "q").await;
    expect_problem(app.get("/v1/search?q=%26%7C%21").send().await, 422, "at least one word").await;
    expect_problem(app.get(&format!("/v1/search?q={}", "a".repeat(201))).send().await, 422, "200").await;
    expect_problem(app.get("/v1/search?q=").send().await, 422, "q").await;
    // Values out of range: 422. What cannot be read at all (not a number, a cursor not ours): 400.
    expect_problem(app.get("/v1/search?q=x&limit=0").send().await, 422, "limit").await;
    expect_problem(app.get("/v1/search?q=x&limit=1000").send().await, 422, "limit").await;
    expect_problem(app.get("/v1/search?q=x&cursor=abc").send().await, 400, "cursor").await;
    expect_problem(app.get("/v1/search?q=x&cursor=20").send().await, 400, "cursor").await;
    expect_problem(app.get("/v1/search?q=x&limit=many").send().await, 400, "limit").await;
    // Text search syntax in a query is only text. (Its words have two letters: a query of one-letter
    // words only is a 422, see `one_letter_queries_and_too_many_words_are_422`.)
    for hostile in ["ab:* | cd", "!xy & (yz", "'quoted'", "ab\\cd", "日本語"] {
        let response = app.get("/v1/search").query(&[("q", hostile)]).send().await.unwrap();
        assert_eq!(response.status(), 200, "{hostile:?}");
    }
}

/// Pages through `q` `limit` hits at a time; `between` runs after each page with its number.
async fn page_through(app: &TestApp, q: &str, limit: usize, mut between: impl AsyncFnMut(usize)) -> Vec<String> {
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for page_number in 1.. {
        let limit = limit.to_string();
        let mut request = app.get("/v1/search").query(&[("q", q), ("limit", &limit)]);
        if let Some(cursor) = &cursor {
            request = request.query(&[("cursor", cursor)]);
        }
        let page = expect_json(request.send().await, 200).await;
        seen.extend(ids(&page));
        between(page_number).await;
        match page["next_cursor"].as_str() {
            Some(next) => {
                assert!(!next.contains(seen.last().unwrap().as_str()), "the cursor is opaque: {next}");
                cursor = Some(next.to_owned());
            }
            None => break,
        }
        assert!(page_number < 50, "paging {q:?} does not end");
    }
    seen
}

#[tokio::test]
async fn paging_returns_every_hit_once_even_as_products_are_added() {
    let app = TestApp::spawn().await;
    let workers = app.start_workers();
    // Ranked: the name said twice and the description once first, then five ties on the name (in id
    // order), then three with it in the description only.
    let top = create(&app, "MX", "Marmot marmot", "marmot").await;
    let mut created = vec![top.clone()];
    for i in 0..5 {
        created.push(create(&app, &format!("MP-{i}"), "Marmot plush", "").await);
    }
    for i in 0..3 {
        created.push(create(&app, &format!("MD-{i}"), &format!("Gift {i}"), "With a marmot on it").await);
    }
    for id in &created {
        until_found(&app, "marmot", id, true).await;
    }
    let ranked = ids(&search(&app, "marmot").await);
    assert_eq!(ranked.len(), created.len());
    assert_eq!(ranked[0], top);
    assert_eq!(ranked[1..6], created[1..6], "ties in id order");

    // Two at a time, adding products after two pages: one ranked before the pages read (as good as
    // the first, newer, so second), which an offset would turn into a repeat; one after them.
    let mut added = Vec::new();
    let seen = page_through(&app, "marmot", 2, async |page| {
        if page == 2 {
            let before = create(&app, "MX-2", "Marmot marmot", "marmot").await;
            let after = create(&app, "MP-5", "Marmot plush", "").await;
            until_found(&app, "marmot", &before, true).await;
            until_found(&app, "marmot", &after, true).await;
            added = vec![before, after];
        }
    })
    .await;
    let originals: Vec<String> = seen.iter().filter(|id| ranked.contains(id)).cloned().collect();
    assert_eq!(originals, ranked, "every product once, in rank order");
    assert!(!seen.contains(&added[0]), "ranked before the pages already read: {seen:?}");
    assert!(seen.contains(&added[1]), "ranked after the pages already read: {seen:?}");
    assert_eq!(seen.len(), ranked.len() + 1, "nothing twice: {seen:?}");

    // One at a time, nothing changing: the same as one page. Typo matches page the same way.
    assert_eq!(page_through(&app, "marmot", 1, async |_| {}).await, ids(&search(&app, "marmot").await));
    let typos = ids(&search(&app, "marmut").await);
    assert!(typos.len() >= 8, "{typos:?}");
    assert_eq!(page_through(&app, "marmut", 1, async |_| {}).await, typos);

    // A cursor belongs to its query.
    let first = expect_json(app.get("/v1/search?q=marmot&limit=1").send().await, 200).await;
    let cursor = first["next_cursor"].as_str().unwrap();
    let other = app.get("/v1/search").query(&[("q", "plush"), ("cursor", cursor)]).send().await;
    expect_problem(other, 400, "cursor").await;
    let list = expect_json(app.get("/v1/products?limit=1").send().await, 200).await;
    let list_cursor = list["next_cursor"].as_str().unwrap();
    let mixed = app.get("/v1/search").query(&[("q", "marmot"), ("cursor", list_cursor)]).send().await;
    expect_problem(mixed, 400, "cursor").await;
    workers.stop().await;
}

/// Limits on what a query may ask: a one-character prefix (`a:*`) matches most of the catalogue, so a
/// query of only such words is refused, and beside longer words they are left out; more words than
/// count are refused rather than cut; typos are looked for only in words of four characters or more.
#[tokio::test]
async fn one_letter_queries_and_too_many_words_are_422() {
    let app = TestApp::spawn().await;
    let workers = app.start_workers();
    for one_letter in ["a", "a:*", "a:* | b", "!x & (y", "a\\b", "a b c d e f g h i j"] {
        let response = app.get("/v1/search").query(&[("q", one_letter)]).send().await;
        let problem = expect_problem(response, 422, "at least 2 characters").await;
        assert!(problem["detail"].as_str().unwrap().starts_with("q:"), "{problem}");
    }
    let nine = "alpha bravo charlie delta echo foxtrot golf hotel india";
    expect_problem(app.get("/v1/search").query(&[("q", nine)]).send().await, 422, "at most 8 words").await;
    // Eight words count; one-letter words beside them do not count, and are left out of the search.
    let product = create(&app, "LIM-1", "Narwhal Teapot", "A teapot shaped like a narwhal").await;
    until_found(&app, "narwhal", &product, true).await;
    for query in ["narwhal a", "a narwhal x", "narwhal teapot a b c d e f g h i j", "te na"] {
        assert_eq!(ids(&search(&app, query).await), std::slice::from_ref(&product), "{query:?}");
    }
    assert!(search(&app, "alpha bravo charlie delta echo foxtrot golf hotel").await["items"].is_array());
    // A typo in a word of four characters or more is still found; words shorter than that are only
    // prefixes: "tep" is no typo of "teapot" (though trigrams would call it similar enough).
    assert_eq!(ids(&search(&app, "narwhol").await), std::slice::from_ref(&product));
    assert!(ids(&search(&app, "tep").await).is_empty());
    assert!(ids(&search(&app, "nar tep").await).is_empty());
    workers.stop().await;
}

// The statement timeout of every pool (`KEEL_STATEMENT_TIMEOUT`), beside the search limits: both bound
// what one request can cost the database, and a search is the statement most likely to run long.

/// `SHOW statement_timeout` on a connection of `db`'s pool.
async fn statement_timeout(db: &keel::db::Db) -> String {
    db.client().await.unwrap().query_one("SHOW statement_timeout", &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn every_pooled_connection_has_the_statement_timeout() {
    let app = TestApp::spawn().await;
    // The default: the longer of the request (30 s) and job (60 s) timeouts, on every pool, on every
    // connection of it.
    assert_eq!(app.config.statement_timeout(), Duration::from_secs(60));
    for db in app.databases.all() {
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(db.client().await.unwrap());
        }
        for client in &clients {
            let shown: String = client.query_one("SHOW statement_timeout", &[]).await.unwrap().get(0);
            assert_eq!(shown, "1min", "{}", db.name());
        }
        // The catalogue's own settings are kept beside it.
        if db.name() == "catalog" {
            let threshold: String =
                clients[0].query_one("SHOW pg_trgm.word_similarity_threshold", &[]).await.unwrap().get(0);
            assert_eq!(threshold, "0.3");
        }
    }
}

#[tokio::test]
async fn a_statement_longer_than_the_statement_timeout_is_cancelled_on_the_server() {
    let app = TestApp::spawn_with(|config| config.statement_timeout = Some(Duration::from_millis(200))).await;
    // The pools as `keel serve` opens them from this configuration.
    let databases = keel::db::Databases::open(&app.dbs.catalog_url, &app.dbs.shard_urls, &*app.config).await.unwrap();
    let observer = app.dbs.catalog().await;
    for db in databases.all() {
        assert_eq!(statement_timeout(&db).await, "200ms", "{}", db.name());
        let client = db.client().await.unwrap();
        let started = Instant::now();
        let err = client.query_one("SELECT pg_sleep(1) AS statement_timeout_probe", &[]).await.unwrap_err();
        let took = started.elapsed();
        assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "{}: {err}", db.name());
        assert!(took < Duration::from_millis(900), "{}: cancelled after {took:?}", db.name());
        // The limit is per statement: the connection still serves.
        client.query_one("SELECT pg_sleep(0.05)", &[]).await.unwrap();

        // A handler dropped at its deadline (the 503) drops its query's future, not the statement:
        // the server runs it on, and cancels it at the timeout rather than when it would have ended.
        let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
        let started = Instant::now();
        let abandoned =
            tokio::spawn(async move { client.query_one("SELECT pg_sleep(1) AS abandoned_probe", &[]).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        abandoned.abort();
        let mut seen = false;
        loop {
            let row = observer.query_one("SELECT state, query FROM pg_stat_activity WHERE pid = $1", &[&pid]).await;
            let (state, query): (Option<String>, Option<String>) = row.map(|r| (r.get(0), r.get(1))).unwrap();
            let running = state.as_deref() == Some("active") && query.is_some_and(|q| q.contains("abandoned_probe"));
            if !running {
                break;
            }
            seen = true;
            assert!(started.elapsed() < Duration::from_millis(900), "{}: the abandoned statement runs on", db.name());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(seen, "{}: the abandoned statement was running on the server after its future was dropped", db.name());
    }
}

/// Migrations run with no statement timeout, even on a database (or role) whose default has one.
#[tokio::test]
async fn migrations_are_not_cut_by_a_statement_timeout() {
    let dbs = TestDatabases::create(false).await;
    let urls: Vec<&String> = std::iter::once(&dbs.catalog_url).chain(&dbs.shard_urls).collect();
    for url in &urls {
        let set =
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET statement_timeout = 1', current_database()); END $$";
        connect(url).await.batch_execute(set).await.unwrap();
        let err = connect(url).await.query_one("SELECT pg_sleep(0.05)", &[]).await.unwrap_err();
        assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "the default holds: {err}");
    }
    keel::db::migrate_all(&dbs.catalog_url, &dbs.shard_urls).await.unwrap();
    let catalog = connect(&dbs.catalog_url).await;
    catalog.batch_execute("SET statement_timeout = 0").await.unwrap();
    let version: i32 = catalog.query_one("SELECT max(version) FROM keel_migrations", &[]).await.unwrap().get(0);
    assert_eq!(version, keel::db::migrations::Schema::Catalog.latest());
}
