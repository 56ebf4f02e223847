//! Product search, kept by the workers from product events: renames, prefixes, typos, stock, paging.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{expect_json, expect_problem, TestApp};

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
    // Text search syntax in a query is only text.
    for hostile in ["a:* | b", "!x & (y", "'quoted'", "a\\b", "日本語"] {
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
