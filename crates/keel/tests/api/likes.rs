//! Likes: idempotent per user, counted by PN-counters whose per-node components are written back
//! from memory; two nodes converge on the number of likes in the database.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::helpers::{expect_json, expect_problem, TestApp, ADMIN_TOKEN, SHARDS};

async fn like_count(client: &reqwest::Client, base: &str, product: &str) -> i64 {
    let product = expect_json(client.get(format!("{base}/v1/products/{product}")).send().await, 200).await;
    product["like_count"].as_i64().unwrap()
}

/// The likes recorded on every shard, per product.
async fn likes_in_database(app: &TestApp) -> HashMap<String, i64> {
    let mut counts = HashMap::new();
    for i in 0..SHARDS {
        let shard = app.dbs.shard(i).await;
        for row in shard.query("SELECT product_id::text, count(*) FROM likes GROUP BY 1", &[]).await.unwrap() {
            *counts.entry(row.get::<_, String>(0)).or_default() += row.get::<_, i64>(1);
        }
    }
    counts
}

#[tokio::test]
async fn a_like_is_idempotent_per_user_and_checked() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Liker").await;
    let (_, other) = app.create_user("Other").await;
    let product = app.create_product("LIKED", 100, 1).await;
    let like = format!("/v1/products/{product}/like");
    for _ in 0..2 {
        assert_eq!(app.put(&like).bearer_auth(&token).send().await.unwrap().status(), 204);
    }
    assert_eq!(app.put(&like).bearer_auth(&other).send().await.unwrap().status(), 204);
    assert_eq!(like_count(&app.client, &app.address, &product).await, 2, "read your own like at once");
    for _ in 0..2 {
        assert_eq!(app.delete(&like).bearer_auth(&token).send().await.unwrap().status(), 204);
    }
    assert_eq!(like_count(&app.client, &app.address, &product).await, 1);
    expect_problem(app.put(&like).send().await, 401, "token").await;
    expect_problem(app.put(&like).bearer_auth(ADMIN_TOKEN).send().await, 403, "user").await;
    let unknown = format!("/v1/products/{}/like", uuid::Uuid::now_v7());
    expect_problem(app.put(&unknown).bearer_auth(&token).send().await, 404, "product").await;
    expect_problem(app.put("/v1/products/nope/like").bearer_auth(&token).send().await, 404, "product").await;
}

/// 10,000 likes and unlikes from 100 users on 10 products, spread over two nodes at once: within
/// 2 s both nodes count what the database holds; after one node stops gracefully, nothing is lost.
#[tokio::test]
async fn two_nodes_converge_on_the_likes_in_the_database() {
    let app = TestApp::spawn().await;
    let node_b = app.second_node().await;
    let mut users = Vec::new();
    for i in 0..100 {
        users.push(app.create_user(&format!("fan{i}")).await.1);
    }
    let mut products = Vec::new();
    for i in 0..10 {
        products.push(app.create_product(&format!("FAN-{i}"), 100, 1).await);
    }
    let bases = [app.address.clone(), node_b.address.clone()];
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
    let mut running = tokio::task::JoinSet::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for _ in 0..10_000 {
        // xorshift: a fixed, reproducible mix of users, products, nodes and likes/unlikes.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let (user, product) = (&users[(seed % 100) as usize], &products[((seed >> 8) % 10) as usize]);
        let base = &bases[((seed >> 16) % 2) as usize];
        let request = if (seed >> 24).is_multiple_of(3) {
            client.delete(format!("{base}/v1/products/{product}/like"))
        } else {
            client.put(format!("{base}/v1/products/{product}/like"))
        };
        let request = request.bearer_auth(user);
        if running.len() >= 64 {
            running.join_next().await.unwrap().unwrap();
        }
        running.spawn(async move {
            let status = request.send().await.unwrap().status();
            assert_eq!(status, 204);
        });
    }
    while let Some(done) = running.join_next().await {
        done.unwrap();
    }
    let finished = Instant::now();
    let expected = likes_in_database(&app).await;
    assert!(expected.values().sum::<i64>() > 0);
    'converged: loop {
        let mut behind = Vec::new();
        for base in &bases {
            for product in &products {
                let (shown, want) =
                    (like_count(&client, base, product).await, expected.get(product).copied().unwrap_or(0));
                if shown != want {
                    behind.push(format!("{base} {product}: {shown} ≠ {want}"));
                }
            }
        }
        if behind.is_empty() {
            break 'converged;
        }
        assert!(finished.elapsed() < Duration::from_secs(2), "not converged within 2 s: {behind:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A node that stops takes no count with it (each is in its like's transaction): node A counts
    // node B's last changes within the budget.
    let product = &products[0];
    let user = &users[0];
    let url = format!("{}/v1/products/{product}/like", node_b.address);
    client.delete(&url).bearer_auth(user).send().await.unwrap();
    assert_eq!(client.put(&url).bearer_auth(user).send().await.unwrap().status(), 204);
    node_b.stop().await;
    let expected = likes_in_database(&app).await;
    let stopped = Instant::now();
    while like_count(&client, &app.address, product).await != expected[product] {
        assert!(stopped.elapsed() < Duration::from_secs(2), "node A does not count node B's last like");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
