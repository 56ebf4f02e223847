//! Follows and the feed: both sides of a follow agree, activities reach followers' feeds within the
//! feed's 30 s budget and leave them again, large accounts are merged in at read time, pages never
//! skip or repeat, and a feed read's queries do not grow with the users followed.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{db_queries, expect_json, expect_problem, TestApp, SHARDS};

/// The feed's budget: an activity must be in followers' feeds within it.
const BUDGET: Duration = Duration::from_secs(30);

/// Every item of a paged list, page after page (`limit` per page), as `token` (or anonymously).
async fn all_pages(app: &TestApp, path: &str, limit: usize, token: Option<&str>) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{path}?limit={limit}");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let request = app.get(&url);
        let request = match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let page = expect_json(request.send().await, 200).await;
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return items,
        }
    }
}

/// Every item of `token`'s feed.
async fn whole_feed(app: &TestApp, token: &str, limit: usize) -> Vec<Value> {
    all_pages(app, "/v1/feed", limit, Some(token)).await
}

/// Every user id of a followers or following list.
async fn whole_list(app: &TestApp, path: &str) -> Vec<String> {
    let items = all_pages(app, path, 100, None).await;
    items.iter().map(|i| i["id"].as_str().unwrap().to_owned()).collect()
}

/// Waits until `check` holds, up to `within`; returns how long that took.
async fn within<F, Fut>(within: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

fn has_activity(feed: &[Value], actor: &str, verb: &str, object: &str) -> bool {
    feed.iter().any(|i| i["actor"]["id"] == actor && i["verb"] == verb && i["object"]["id"] == object)
}

#[tokio::test]
async fn follows_are_idempotent_checked_and_listed_on_both_sides() {
    let app = TestApp::spawn().await;
    let workers = app.start_workers();
    let (a, a_token) = app.create_user("Ann").await;
    let (b, b_token) = app.create_user("Bob").await;
    let (c, c_token) = app.create_user("Cid").await;
    let follow = |user: &str| format!("/v1/users/{user}/follow");
    for _ in 0..2 {
        assert_eq!(app.put(&follow(&b)).bearer_auth(&a_token).send().await.unwrap().status(), 204);
    }
    assert_eq!(app.put(&follow(&b)).bearer_auth(&c_token).send().await.unwrap().status(), 204);
    assert_eq!(app.put(&follow(&a)).bearer_auth(&c_token).send().await.unwrap().status(), 204);
    expect_problem(app.put(&follow(&a)).bearer_auth(&a_token).send().await, 422, "themselves").await;
    expect_problem(app.delete(&follow(&a)).bearer_auth(&a_token).send().await, 422, "themselves").await;
    let unknown = uuid::Uuid::now_v7().to_string();
    expect_problem(app.put(&follow(&unknown)).bearer_auth(&a_token).send().await, 404, "user").await;
    expect_problem(app.delete(&follow(&unknown)).bearer_auth(&a_token).send().await, 404, "user").await;
    expect_problem(app.put(&follow("nope")).bearer_auth(&a_token).send().await, 404, "user").await;
    expect_problem(app.put(&follow(&b)).send().await, 401, "token").await;
    expect_problem(app.get(&format!("/v1/users/{unknown}/followers")).send().await, 404, "user").await;
    expect_problem(app.get(&format!("/v1/users/{b}/followers?limit=0")).send().await, 422, "limit").await;
    expect_problem(app.get(&format!("/v1/users/{b}/followers?cursor=xyz")).send().await, 400, "cursor").await;
    expect_problem(app.get(&format!("/v1/users/{b}/following?limit=many")).send().await, 400, "limit").await;
    expect_problem(app.get("/v1/feed?limit=many").bearer_auth(&a_token).send().await, 400, "limit").await;
    expect_problem(app.get("/v1/feed?cursor=xyz").bearer_auth(&a_token).send().await, 400, "cursor").await;
    expect_problem(app.get("/v1/feed").send().await, 401, "token").await;

    // The follower's side at once; the followed user's once the queue ran. Newest first, one a page.
    assert_eq!(whole_list(&app, &format!("/v1/users/{c}/following")).await, vec![a.clone(), b.clone()]);
    let page = expect_json(app.get(&format!("/v1/users/{c}/following?limit=1")).send().await, 200).await;
    assert_eq!(page["items"][0]["id"], a.as_str());
    assert_eq!(page["items"][0]["name"], "Ann");
    let b_followers = format!("/v1/users/{b}/followers");
    within(BUDGET, "B's followers list has A and C", || async {
        whole_list(&app, &b_followers).await == vec![c.clone(), a.clone()]
    })
    .await;
    // Others may see the counts up to the profile budget (5 min) late, through the cache; the owner
    // reads around it.
    let profile = expect_json(app.get(&format!("/v1/users/{b}")).bearer_auth(&b_token).send().await, 200).await;
    assert_eq!((profile["followers_count"].as_i64(), profile["following_count"].as_i64()), (Some(2), Some(0)));

    // Unfollowing twice is one unfollow; the other side follows.
    for _ in 0..2 {
        assert_eq!(app.delete(&follow(&b)).bearer_auth(&a_token).send().await.unwrap().status(), 204);
    }
    assert_eq!(whole_list(&app, &format!("/v1/users/{a}/following")).await, Vec::<String>::new());
    within(BUDGET, "A left B's followers", || async { whole_list(&app, &b_followers).await == vec![c.clone()] }).await;
    app.check_queues_drained().await;
    assert_counts_agree(&app).await;
    workers.stop().await;
}

/// Every user's counts are what the two sides of their follows say, on every shard.
async fn assert_counts_agree(app: &TestApp) {
    let mut following: HashMap<uuid::Uuid, HashSet<uuid::Uuid>> = HashMap::new();
    let mut followers: HashMap<uuid::Uuid, HashSet<uuid::Uuid>> = HashMap::new();
    let mut counts: HashMap<uuid::Uuid, (i64, i64)> = HashMap::new();
    for i in 0..SHARDS {
        let shard = app.dbs.shard(i).await;
        for row in shard.query("SELECT user_id, followee_id FROM follows WHERE active", &[]).await.unwrap() {
            following.entry(row.get(0)).or_default().insert(row.get(1));
        }
        for row in shard.query("SELECT user_id, follower_id FROM followers WHERE active", &[]).await.unwrap() {
            followers.entry(row.get(0)).or_default().insert(row.get(1));
        }
        for row in shard.query("SELECT id, followers_count, following_count FROM users", &[]).await.unwrap() {
            counts.insert(row.get(0), (row.get(1), row.get(2)));
        }
    }
    let mut mirrored: HashMap<uuid::Uuid, HashSet<uuid::Uuid>> = HashMap::new();
    for (follower, followees) in &following {
        for followee in followees {
            mirrored.entry(*followee).or_default().insert(*follower);
        }
    }
    assert_eq!(mirrored, followers, "every follow is on both sides, and nothing else is");
    for (user, (followers_count, following_count)) in counts {
        assert_eq!(followers_count, followers.get(&user).map_or(0, |s| s.len()) as i64, "followers_count of {user}");
        assert_eq!(following_count, following.get(&user).map_or(0, |s| s.len()) as i64, "following_count of {user}");
    }
}

/// A follows B; B likes a product: "B liked it" is in A's feed within the budget (the lag is
/// printed). B unlikes: gone. B likes again, then A unfollows: gone, at once for A.
#[tokio::test]
async fn a_like_reaches_followers_within_the_budget_and_an_unlike_or_unfollow_takes_it_out() {
    let app = TestApp::spawn().await;
    let workers = app.start_workers();
    let (_, a_token) = app.create_user("Ann").await;
    let (b, b_token) = app.create_user("Bob").await;
    let (c, c_token) = app.create_user("Cid").await;
    let product = app.create_product("FEED-1", 100, 1).await;
    assert_eq!(app.put(&format!("/v1/users/{b}/follow")).bearer_auth(&a_token).send().await.unwrap().status(), 204);
    let like = format!("/v1/products/{product}/like");
    let liked_at = Instant::now();
    assert_eq!(app.put(&like).bearer_auth(&b_token).send().await.unwrap().status(), 204);
    let lag = within(BUDGET, "B's like in A's feed", || async {
        has_activity(&whole_feed(&app, &a_token, 20).await, &b, "liked", &product)
    })
    .await;
    eprintln!(
        "like → in the follower's feed: {lag:?} (polled every 20 ms; {:?} since the like was sent)",
        liked_at.elapsed()
    );
    let feed = whole_feed(&app, &a_token, 20).await;
    let item = feed.iter().find(|i| i["verb"] == "liked").unwrap();
    assert_eq!(item["actor"]["name"], "Bob");
    assert_eq!(item["object"]["type"], "product");
    assert!(item["created_at"].as_str().is_some() && item["id"].as_str().is_some(), "{item}");
    assert!(whole_feed(&app, &c_token, 20).await.is_empty(), "C follows nobody");

    assert_eq!(app.delete(&like).bearer_auth(&b_token).send().await.unwrap().status(), 204);
    let lag = within(BUDGET, "the unliked item leaves A's feed", || async {
        !has_activity(&whole_feed(&app, &a_token, 20).await, &b, "liked", &product)
    })
    .await;
    eprintln!("unlike → out of the follower's feed: {lag:?}");

    assert_eq!(app.put(&like).bearer_auth(&b_token).send().await.unwrap().status(), 204);
    within(BUDGET, "B's second like in A's feed", || async {
        has_activity(&whole_feed(&app, &a_token, 20).await, &b, "liked", &product)
    })
    .await;
    assert_eq!(app.delete(&format!("/v1/users/{b}/follow")).bearer_auth(&a_token).send().await.unwrap().status(), 204);
    assert!(whole_feed(&app, &a_token, 20).await.is_empty(), "an unfollow empties the reader's feed of B at once");
    // B's follow of C is an activity too: A no longer follows B, so never sees it.
    assert_eq!(app.put(&format!("/v1/users/{c}/follow")).bearer_auth(&b_token).send().await.unwrap().status(), 204);
    app.check_queues_drained().await;
    assert!(whole_feed(&app, &a_token, 20).await.is_empty());
    // ...but C's own follower does.
    let (_, d_token) = app.create_user("Dee").await;
    assert_eq!(app.put(&format!("/v1/users/{b}/follow")).bearer_auth(&d_token).send().await.unwrap().status(), 204);
    within(BUDGET, "a new follower gets B's recent activities", || async {
        let feed = whole_feed(&app, &d_token, 20).await;
        has_activity(&feed, &b, "followed", &c) && has_activity(&feed, &b, "liked", &product)
    })
    .await;
    app.check_queues_drained().await;
    assert_counts_agree(&app).await;
    workers.stop().await;
}

/// Reads' queries do not grow with the users followed: one query for a page of the stored feed.
#[tokio::test]
async fn a_feed_read_takes_the_same_queries_however_many_users_are_followed() {
    let app = TestApp::spawn().await;
    let workers = app.start_workers();
    let (_, reader) = app.create_user("Reader").await;
    let product = app.create_product("FEED-Q", 100, 1).await;
    let mut counts = Vec::new();
    let mut followed = 0;
    for target in [1, 5, 25] {
        while followed < target {
            let (id, token) = app.create_user(&format!("Actor{followed}")).await;
            assert_eq!(
                app.put(&format!("/v1/users/{id}/follow")).bearer_auth(&reader).send().await.unwrap().status(),
                204
            );
            assert_eq!(
                app.put(&format!("/v1/products/{product}/like")).bearer_auth(&token).send().await.unwrap().status(),
                204
            );
            followed += 1;
        }
        within(BUDGET, "every followed user's like in the feed", || async {
            whole_feed(&app, &reader, 100).await.iter().filter(|i| i["verb"] == "liked").count() == followed
        })
        .await;
        let response = app.get("/v1/feed?limit=100").bearer_auth(&reader).send().await.unwrap();
        counts.push((followed, db_queries(&response)));
    }
    eprintln!("(users followed, queries per feed read): {counts:?}");
    assert!(counts.iter().all(|(_, q)| *q == counts[0].1), "queries per read: {counts:?}");
    assert!(counts[0].1 <= 2, "{counts:?}");
    workers.stop().await;
}

/// 2,000 items in a feed, paged 50 at a time while a followed user keeps liking and unliking and
/// another, newly followed, has their older activities copied in among the existing ones: every item
/// that was there at the start is seen exactly once, and no item twice.
#[tokio::test]
async fn paging_a_feed_of_2000_items_under_new_activity_skips_and_repeats_nothing() {
    let _heavy = crate::helpers::heavy_load().await;
    let app = TestApp::spawn_with(|config| config.feed_length = 10_000).await;
    let workers = app.start_workers();
    let (_, reader) = app.create_user("Reader").await;
    let mut products = Vec::new();
    for i in 0..100 {
        products.push(app.create_product(&format!("PAGE-{i}"), 100, 1).await);
    }
    let mut actors = Vec::new();
    for i in 0..22 {
        let (id, token) = app.create_user(&format!("Actor{i}")).await;
        actors.push((id, token));
    }
    // The reader follows 20 of them now, and the 21st while paging; the 22nd acts while the reader pages.
    for (id, _) in actors.iter().take(20) {
        assert_eq!(app.put(&format!("/v1/users/{id}/follow")).bearer_auth(&reader).send().await.unwrap().status(), 204);
    }
    // 20 followed actors × 100 likes = 2,000 items; the 21st's 100 likes, made among them, come
    // into the feed (with their own, older times) when the reader follows them while paging.
    let mut likes = tokio::task::JoinSet::new();
    for product in &products {
        for (_, token) in actors.iter().take(21) {
            let request = app.put(&format!("/v1/products/{product}/like")).bearer_auth(token);
            likes.spawn(async move { request.send().await.unwrap().status() });
            if likes.len() >= 16 {
                assert_eq!(likes.join_next().await.unwrap().unwrap(), 204);
            }
        }
    }
    while let Some(status) = likes.join_next().await {
        assert_eq!(status.unwrap(), 204);
    }
    within(Duration::from_secs(120), "2,000 items in the reader's feed", || async {
        whole_feed(&app, &reader, 100).await.len() == 2000
    })
    .await;
    let before: HashSet<String> =
        whole_feed(&app, &reader, 100).await.iter().map(|i| i["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(before.len(), 2000);

    let busy = actors[21].1.clone();
    let (client, base, acting_products) = (app.client.clone(), app.address.clone(), products.clone());
    assert_eq!(
        app.put(&format!("/v1/users/{}/follow", actors[21].0)).bearer_auth(&reader).send().await.unwrap().status(),
        204
    );
    let acting = tokio::spawn(async move {
        for (i, product) in acting_products.iter().cycle().take(300).enumerate() {
            let url = format!("{base}/v1/products/{product}/like");
            let request = if (i / 100) % 2 == 0 { client.put(url) } else { client.delete(url) };
            assert_eq!(request.bearer_auth(&busy).send().await.unwrap().status(), 204);
        }
    });
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    for page in 0.. {
        if page == 10 {
            // A quarter in: the reader follows the 21st actor, and waits for their older likes to
            // be copied in, most of them behind the cursor.
            let late = &actors[20].0;
            assert_eq!(
                app.put(&format!("/v1/users/{late}/follow")).bearer_auth(&reader).send().await.unwrap().status(),
                204
            );
            let shard = app.shard_of(&crate::helpers::user_of(&reader)).await;
            within(BUDGET, "the newly followed user's likes in the feed", || async {
                let copied: i64 = shard
                    .query_one("SELECT count(*) FROM feed_items WHERE actor_id = $1::text::uuid", &[late])
                    .await
                    .unwrap()
                    .get(0);
                copied == 100
            })
            .await;
        }
        let path = match &cursor {
            Some(c) => format!("/v1/feed?limit=50&cursor={c}"),
            None => "/v1/feed?limit=50".to_owned(),
        };
        let body = expect_json(app.get(&path).bearer_auth(&reader).send().await, 200).await;
        paged.extend(body["items"].as_array().unwrap().iter().cloned());
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    acting.await.unwrap();
    let mut seen = HashSet::new();
    for item in &paged {
        assert!(seen.insert(item["id"].as_str().unwrap().to_owned()), "{item} returned twice");
    }
    let missed: Vec<&String> = before.iter().filter(|id| !seen.contains(*id)).collect();
    assert!(missed.is_empty(), "{} of the 2,000 items skipped", missed.len());
    let new = paged.len() - 2000;
    eprintln!("paged {} items in pages of 50 ({new} new ones among them)", paged.len());
    assert!(new > 0, "the newly followed user's older likes should have come into the pages still to read");
    workers.stop().await;
}

/// An account with 50,000 followers (made in bulk, behind the API) likes a product: the like answers
/// as any like does, nothing is written to feeds (it is over `KEEL_FEED_FANOUT_LIMIT`), and its
/// followers see it within the budget, merged in when they read.
#[tokio::test]
async fn an_account_with_50000_followers_is_merged_in_at_read_time() {
    let _heavy = crate::helpers::heavy_load().await;
    let app = TestApp::spawn_with(|config| config.feed_fanout_limit = 10_000).await;
    let workers = app.start_workers();
    let (star, star_token) = app.create_user("Star").await;
    let mut readers = Vec::new();
    for i in 0..5 {
        let (_, token) = app.create_user(&format!("Fan{i}")).await;
        assert_eq!(
            app.put(&format!("/v1/users/{star}/follow")).bearer_auth(&token).send().await.unwrap().status(),
            204
        );
        readers.push(token);
    }
    app.check_queues_drained().await;
    // 49,995 more, straight into the shards: users, both sides of each follow, and the counts.
    let star_id = uuid::Uuid::parse_str(&star).unwrap();
    let bulk: Vec<uuid::Uuid> = (0..49_995).map(|_| uuid::Uuid::now_v7()).collect();
    let mut by_shard: HashMap<String, Vec<uuid::Uuid>> = HashMap::new();
    for id in &bulk {
        let shard = app.databases.shard_of(keel::ids::UserId::from_uuid(*id));
        by_shard.entry(shard.name().to_owned()).or_default().push(*id);
    }
    for i in 0..SHARDS {
        let shard = app.dbs.shard(i).await;
        let name = keel::db::database_label(i);
        let ids = by_shard.remove(&name).unwrap_or_default();
        shard
            .execute(
                "WITH new AS (
                     INSERT INTO users (id, bucket, name, email, following_count)
                     SELECT id, keel_bucket(id), 'Bulk fan', id::text || '@bulk.example.org', 1 FROM unnest($1::uuid[]) id
                     RETURNING id
                 )
                 INSERT INTO follows (user_id, followee_id, followee_name, active, version)
                 SELECT id, $2, 'Star', true, 1 FROM new",
                &[&ids, &star_id],
            )
            .await
            .unwrap();
    }
    let star_shard = app.shard_of(&star).await;
    star_shard
        .execute(
            "INSERT INTO followers (user_id, follower_id, follower_name, active, version, changed_at)
             SELECT $1, id, 'Bulk fan', true, 1, now() FROM unnest($2::uuid[]) id",
            &[&star_id, &bulk],
        )
        .await
        .unwrap();
    star_shard
        .execute(
            "UPDATE users SET followers_count = followers_count + $2 WHERE id = $1",
            &[&star_id, &(bulk.len() as i64)],
        )
        .await
        .unwrap();

    let product = app.create_product("STAR", 100, 1).await;
    let (_, nobody) = app.create_user("Nobody").await;
    let like = format!("/v1/products/{product}/like");
    let started = Instant::now();
    assert_eq!(app.put(&like).bearer_auth(&nobody).send().await.unwrap().status(), 204);
    let plain = started.elapsed();
    let started = Instant::now();
    assert_eq!(app.put(&like).bearer_auth(&star_token).send().await.unwrap().status(), 204);
    let starred = started.elapsed();
    eprintln!("a like by an account with no followers took {plain:?}; by one with 50,000, {starred:?}");
    assert!(starred < Duration::from_secs(2), "the like waited for its fan-out: {starred:?}");
    let lag = within(BUDGET, "the star's like in every sampled fan's feed", || async {
        let mut all = true;
        for token in &readers {
            all &= has_activity(&whole_feed(&app, token, 20).await, &star, "liked", &product);
        }
        all
    })
    .await;
    eprintln!("like by a 50,000-follower account → in its followers' feeds: {lag:?}");
    // The consistency table's feed row counts the merged reads: the star's activities loaded once
    // into the cache, then served from it; every feed page read from a shard.
    let table = expect_json(app.admin(app.get("/v1/admin/consistency")).send().await, 200).await;
    let feed = table["kinds"].as_array().unwrap().iter().find(|k| k["kind"] == "feed").unwrap().clone();
    assert_eq!((feed["budget_s"].as_f64(), feed["policy"].as_str()), (Some(30.0), Some("derived")), "{feed}");
    assert!(feed["misses"].as_u64().unwrap() >= 1 && feed["hits"].as_u64().unwrap() >= 1, "{feed}");
    assert!(feed["primary_reads"].as_u64().unwrap() >= readers.len() as u64, "{feed}");
    app.check_queues_drained().await;
    for i in 0..SHARDS {
        let shard = app.dbs.shard(i).await;
        let copied: i64 =
            shard.query_one("SELECT count(*) FROM feed_items WHERE actor_id = $1", &[&star_id]).await.unwrap().get(0);
        assert_eq!(copied, 0, "shard {i} has feed rows of an account over the fan-out limit");
    }
    workers.stop().await;
}

/// Follow and unfollow storms across both shards, handled by a `keel worker` process SIGKILLed
/// midway and a second one started after it: once the queues drain, every user's followers list is
/// exactly the users whose following list names them, and every count is exact.
#[tokio::test]
async fn follow_storms_with_a_killed_worker_end_with_both_sides_agreeing() {
    let _heavy = crate::helpers::heavy_load().await;
    let app = TestApp::spawn().await;
    let scratch = crate::processes::scratch_dir("follow-storm");
    let env = vec![
        ("KEEL_CATALOG_URL", app.dbs.catalog_url.clone()),
        ("KEEL_SHARD_URLS", app.dbs.shard_urls.join(",")),
        ("KEEL_ADMIN_TOKEN", crate::helpers::ADMIN_TOKEN.to_owned()),
        // A killed worker's jobs are claimed again 3 s after they started.
        ("KEEL_JOB_TIMEOUT", "2s".to_owned()),
    ];
    let mut users = Vec::new();
    for i in 0..30 {
        users.push(app.create_user(&format!("Stormer{i}")).await);
    }
    let mut worker = crate::processes::Keel::start(&["worker"], &env, &scratch.join("worker1.log"));
    let mut requests = tokio::task::JoinSet::new();
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut killed_after = None;
    for n in 0..3000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let (from, to) = ((seed % 30) as usize, ((seed >> 8) % 30) as usize);
        if from == to {
            continue;
        }
        let path = format!("/v1/users/{}/follow", users[to].0);
        // More follows than unfollows, so the graph fills up as it churns.
        let request = if (seed >> 16).is_multiple_of(3) { app.delete(&path) } else { app.put(&path) };
        let request = request.bearer_auth(&users[from].1);
        requests.spawn(async move { request.send().await.unwrap().status() });
        if requests.len() >= 32 {
            assert_eq!(requests.join_next().await.unwrap().unwrap(), 204);
        }
        if n == 1000 {
            worker.signal(libc::SIGKILL);
            worker.wait_exit(Duration::from_secs(10)).await;
            killed_after = Some(n);
        }
        if n == 1300 {
            worker = crate::processes::Keel::start(&["worker"], &env, &scratch.join("worker2.log"));
        }
    }
    while let Some(status) = requests.join_next().await {
        assert_eq!(status.unwrap(), 204);
    }
    eprintln!("3,000 follows and unfollows; the first worker SIGKILLed after {killed_after:?}");
    app.check_queues_drained().await;
    assert_counts_agree(&app).await;
    // The same, through the API: lists (paged) and the owners' counts.
    let mut following: HashMap<String, HashSet<String>> = HashMap::new();
    for (id, _) in &users {
        let list = whole_list(&app, &format!("/v1/users/{id}/following")).await;
        following.insert(id.clone(), list.into_iter().collect());
    }
    let mut edges = 0;
    for (id, token) in &users {
        let followers: HashSet<String> =
            whole_list(&app, &format!("/v1/users/{id}/followers")).await.into_iter().collect();
        let expected: HashSet<String> =
            following.iter().filter(|(_, followees)| followees.contains(id)).map(|(f, _)| f.clone()).collect();
        assert_eq!(followers, expected, "followers of {id}");
        let profile = expect_json(app.get(&format!("/v1/users/{id}")).bearer_auth(token).send().await, 200).await;
        assert_eq!(profile["followers_count"].as_u64(), Some(expected.len() as u64), "{profile}");
        assert_eq!(profile["following_count"].as_u64(), Some(following[id].len() as u64), "{profile}");
        edges += expected.len();
    }
    eprintln!("{edges} follows stand; both sides and every count agree");
    worker.signal(libc::SIGTERM);
    assert!(worker.wait_exit(Duration::from_secs(30)).await.success());
}

/// Housekeeping keeps each stored feed to its newest `KEEL_FEED_LENGTH` items, and leaves shorter
/// feeds alone.
#[tokio::test]
async fn housekeeping_keeps_each_feed_to_its_newest_items() {
    let app = TestApp::spawn().await;
    let (long_reader, _) = app.create_user("Long").await;
    let (short_reader, _) = app.create_user("Short").await;
    let (actor, _) = app.create_user("Actor").await;
    let mut newest: HashMap<String, Vec<uuid::Uuid>> = HashMap::new();
    for (reader, items) in [(&long_reader, 30i32), (&short_reader, 5)] {
        let shard = app.shard_of(reader).await;
        let ids: Vec<uuid::Uuid> = (0..items).map(|_| uuid::Uuid::now_v7()).collect();
        // One second apart, the newest last.
        shard
            .execute(
                "INSERT INTO feed_items (user_id, activity_id, actor_id, actor_name, verb, object_type, object_id, created_at)
                 SELECT $1::text::uuid, id, $3::text::uuid, 'Actor', 'followed', 'user', $3::text::uuid,
                        now() - (($4::int - n) * interval '1 second')
                 FROM unnest($2::uuid[]) WITH ORDINALITY AS a(id, n)",
                &[reader, &ids, &actor, &items],
            )
            .await
            .unwrap();
        newest.insert(reader.clone(), ids.iter().rev().take(10).copied().collect());
    }
    for i in 0..SHARDS {
        let shard = app.databases.shard(i as u16).unwrap();
        keel::feed::fanout::trim(&shard, 10).await.unwrap();
    }
    for (reader, kept) in [(&long_reader, 10), (&short_reader, 5)] {
        let shard = app.shard_of(reader).await;
        let rows =
            shard.query("SELECT activity_id FROM feed_items WHERE user_id = $1::text::uuid", &[reader]).await.unwrap();
        let left: HashSet<uuid::Uuid> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(left.len(), kept, "{reader}");
        let expected: HashSet<uuid::Uuid> = newest[reader].iter().take(kept).copied().collect();
        assert_eq!(left, expected, "the newest stay");
    }
}
