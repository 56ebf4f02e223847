use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{expect_json, expect_problem, TestApp};

/// Places an order for what is in the user's cart; returns the Location and the 202 body.
async fn checkout(app: &TestApp, token: &str, key: &str) -> (String, Value) {
    let response = app.post("/v1/checkout").bearer_auth(token).header("idempotency-key", key).send().await.unwrap();
    let location = response.headers().get("location").map(|l| l.to_str().unwrap().to_owned());
    let body = expect_json(Ok(response), 202).await;
    (location.expect("a 202 names where to look"), body)
}

async fn add_to_cart(app: &TestApp, token: &str, product: &str, quantity: i64) {
    let put = app.put(&format!("/v1/cart/items/{product}")).bearer_auth(token).json(&json!({ "quantity": quantity }));
    expect_json(put.send().await, 200).await;
}

/// What a new order can take of `product`, once no order holds any: a failed order's release and a
/// confirmed one's sale follow its decision, in a transaction of their own.
async fn stock(app: &TestApp, product: &str) -> i64 {
    app.settled_inventory(product).await["stock"].as_i64().unwrap()
}

#[tokio::test]
async fn a_checkout_is_accepted_then_confirmed_by_the_saga() {
    let app = TestApp::spawn().await;
    let workers = app.start_workers();
    let (_, token) = app.create_user("Buyer").await;
    expect_json(Ok(app.deposit(&token, "d1", 10_000).await), 201).await;
    let anchor = app.create_product("ANCHOR", 1250, 5).await;
    add_to_cart(&app, &token, &anchor, 2).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = app
        .post("/v1/checkout")
        .bearer_auth(&token)
        .header("idempotency-key", "order-1")
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let accepted = expect_json(Ok(response), 202).await;
    assert_eq!(accepted["status"], "pending");
    assert_eq!(location, format!("/v1/orders/{}", accepted["id"].as_str().unwrap()));
    // The same key names the same order, Location and all.
    let (again_location, again) = checkout(&app, &token, "order-1").await;
    assert_eq!((again_location, again), (location.clone(), accepted.clone()));

    let order = app.wait_for_order(&token, &location).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(order["total_cents"], 2500);
    assert_eq!(order["items"], json!([{ "product_id": anchor, "quantity": 2, "price_cents": 1250 }]));
    assert!(order["failure_reason"].is_null());
    assert_eq!(expect_json(app.get("/v1/wallet").bearer_auth(&token).send().await, 200).await["balance_cents"], 7500);
    assert_eq!(stock(&app, &anchor).await, 3);
    let cart = expect_json(app.get("/v1/cart").bearer_auth(&token).send().await, 200).await;
    assert_eq!(cart["items"], json!([]), "a confirmed order clears its items from the cart");

    // The event the request caused, and the one its saga emitted, carry the request's trace.
    let mut traced = Vec::new();
    for i in 0..crate::helpers::SHARDS {
        let shard = app.dbs.shard(i).await;
        let orders = shard.query("SELECT kind, traceparent FROM keel_jobs WHERE kind LIKE 'order.%' ORDER BY id", &[]);
        for row in orders.await.unwrap() {
            traced.push((row.get::<_, String>(0), row.get::<_, Option<String>>(1).unwrap_or_default()));
        }
    }
    let kinds: Vec<&str> = traced.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["order.placed", "order.confirmed"]);
    assert!(traced.iter().all(|(_, t)| t.starts_with(&format!("00-{trace_id}-"))), "{traced:?}");

    let listed = expect_json(app.get("/v1/orders").bearer_auth(&token).send().await, 200).await;
    assert_eq!(listed["items"][0]["id"], accepted["id"]);
    // Another user cannot see it.
    let (_, other) = app.create_user("Other").await;
    expect_problem(app.get(&location).bearer_auth(&other).send().await, 404, "order").await;
    app.check_queues_drained().await;
    workers.stop().await;
    app.check_invariants().await;
}

#[tokio::test]
async fn refusals_fail_the_order_with_a_reason_and_give_the_stock_back() {
    let app = TestApp::spawn().await;
    let workers = app.start_workers();
    let (_, poor) = app.create_user("Poor").await;
    expect_json(Ok(app.deposit(&poor, "d", 100).await), 201).await;
    let boat = app.create_product("BOAT", 5_000, 3).await;
    add_to_cart(&app, &poor, &boat, 1).await;
    let (location, _) = checkout(&app, &poor, "k").await;
    let order = app.wait_for_order(&poor, &location).await;
    assert_eq!(
        (order["status"].as_str(), order["failure_reason"].as_str()),
        (Some("failed"), Some("insufficient_funds"))
    );
    assert_eq!(stock(&app, &boat).await, 3, "the reservation was released");
    assert_eq!(expect_json(app.get("/v1/wallet").bearer_auth(&poor).send().await, 200).await["balance_cents"], 100);

    let (_, rich) = app.create_user("Rich").await;
    expect_json(Ok(app.deposit(&rich, "d", 1_000_000).await), 201).await;
    add_to_cart(&app, &rich, &boat, 4).await;
    let (location, _) = checkout(&app, &rich, "k").await;
    let order = app.wait_for_order(&rich, &location).await;
    assert_eq!(order["failure_reason"], "out_of_stock");
    assert_eq!(stock(&app, &boat).await, 3);

    let (_, empty) = app.create_user("Empty").await;
    let response = app.post("/v1/checkout").bearer_auth(&empty).header("idempotency-key", "k").send().await;
    expect_problem(response, 422, "cart is empty").await;
    let no_key = app.post("/v1/checkout").bearer_auth(&rich).send().await;
    expect_problem(no_key, 400, "Idempotency-Key").await;
    app.check_queues_drained().await;
    workers.stop().await;
    app.check_invariants().await;
}

#[tokio::test]
async fn with_the_workers_paused_a_checkout_is_still_accepted_and_pending() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Patient").await;
    expect_json(Ok(app.deposit(&token, "d", 10_000).await), 201).await;
    let product = app.create_product("P", 100, 10).await;
    add_to_cart(&app, &token, &product, 1).await;
    let (location, _) = checkout(&app, &token, "k").await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let order = expect_json(app.get(&location).bearer_auth(&token).send().await, 200).await;
    assert_eq!(order["status"], "pending");
    assert_eq!(stock(&app, &product).await, 10, "nothing happens until a worker runs");

    let workers = app.start_workers();
    assert_eq!(app.wait_for_order(&token, &location).await["status"], "confirmed");
    app.check_queues_drained().await;
    workers.stop().await;
    app.check_invariants().await;
}

/// 40 users who can all pay race for the last 10 units, with two sets of workers competing.
#[tokio::test]
async fn no_oversell_when_forty_buyers_race_for_ten_units() {
    let app = TestApp::spawn().await;
    let product = app.create_product("LAST-TEN", 700, 10).await;
    let mut buyers = Vec::new();
    for i in 0..40 {
        let (_, token) = app.create_user(&format!("buyer{i}")).await;
        expect_json(Ok(app.deposit(&token, "d", 1_000).await), 201).await;
        add_to_cart(&app, &token, &product, 1).await;
        buyers.push(token);
    }
    let workers = [app.start_workers(), app.start_workers()];
    let mut placed = tokio::task::JoinSet::new();
    for token in buyers.clone() {
        let request = app.post("/v1/checkout").bearer_auth(&token).header("idempotency-key", "race");
        placed.spawn(async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 202);
            (token, response.headers()["location"].to_str().unwrap().to_owned())
        });
    }
    let mut outcomes = std::collections::HashMap::new();
    while let Some(result) = placed.join_next().await {
        let (token, location) = result.unwrap();
        let order = app.wait_for_order(&token, &location).await;
        let balance =
            expect_json(app.get("/v1/wallet").bearer_auth(&token).send().await, 200).await["balance_cents"].as_i64();
        let outcome = order["failure_reason"].as_str().unwrap_or("confirmed").to_owned();
        let expected_balance = if outcome == "confirmed" { 300 } else { 1_000 };
        assert_eq!(balance, Some(expected_balance), "{outcome}: wallet agrees with the order");
        *outcomes.entry(outcome).or_insert(0) += 1;
    }
    assert_eq!(outcomes.get("confirmed"), Some(&10), "{outcomes:?}");
    assert_eq!(outcomes.get("out_of_stock"), Some(&30), "{outcomes:?}");
    assert_eq!(stock(&app, &product).await, 0);
    app.check_queues_drained().await;
    for w in workers {
        w.stop().await;
    }
    app.check_invariants().await;
}

fn numbers(inventory: &Value, fields: &[&str]) -> Vec<i64> {
    fields.iter().map(|f| inventory[*f].as_i64().unwrap_or_else(|| panic!("{f} in {inventory}"))).collect()
}

/// Must show: the admin sets the stock again and again while 40 checkouts race for it (a quarter of
/// the buyers cannot pay, so their reservations are released meanwhile). Never oversold (reserved
/// never above on hand, and every unit sold was on hand); on hand + sold changes only by the admin's
/// writes: at the end it is what the last write set plus what had been sold when it did.
#[tokio::test]
async fn inventory_set_by_the_admin_while_forty_checkouts_race_never_oversells() {
    let app = TestApp::spawn_with(|config| {
        config.saga_backoff_max = Duration::from_millis(10);
        config.saga_lock_timeout = Duration::from_millis(20);
    })
    .await;
    let product = app.create_product("CONTESTED", 700, 20).await;
    let mut buyers = Vec::new();
    let mut slow = Vec::new();
    for i in 0..40 {
        let (id, token) = app.create_user(&format!("racer{i}")).await;
        let amount = if i % 4 == 0 { 100 } else { 1_000 };
        expect_json(Ok(app.deposit(&token, "d", amount).await), 201).await;
        add_to_cart(&app, &token, &product, 1).await;
        buyers.push((token, amount));
        if i % 4 == 1 {
            slow.push(uuid::Uuid::parse_str(&id).unwrap());
        }
    }
    // A quarter of the payers' wallets are busy for the first second: their sagas hold their units
    // meanwhile (retrying the debit), so the admin's writes meet reservations outstanding.
    let mut busy = Vec::new();
    for i in 0..crate::helpers::SHARDS {
        let shard = app.dbs.shard(i).await;
        shard.batch_execute("BEGIN").await.unwrap();
        shard.execute("SELECT 1 FROM wallets WHERE user_id = ANY($1) FOR UPDATE", &[&slow]).await.unwrap();
        busy.push(shard);
    }
    let workers = [app.start_workers(), app.start_workers()];
    let decided = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The admin: a stock count every few milliseconds until every order is decided.
    let admin = {
        let (client, url, decided) =
            (app.client.clone(), app.url(&format!("/v1/products/{product}/inventory")), decided.clone());
        tokio::spawn(async move {
            let (mut writes, mut conflicts) = (Vec::new(), 0);
            let mut n = 0i64;
            // Until every order is decided, and at least one write went through.
            while !decided.load(std::sync::atomic::Ordering::SeqCst) || writes.is_empty() {
                let on_hand = 8 + n % 15;
                n += 1;
                let response = client
                    .put(&url)
                    .bearer_auth(crate::helpers::ADMIN_TOKEN)
                    .json(&json!({ "on_hand": on_hand }))
                    .send()
                    .await
                    .unwrap();
                match response.status().as_u16() {
                    200 => writes.push(response.json::<Value>().await.unwrap()),
                    409 => conflicts += 1,
                    other => panic!("PUT inventory answered {other}: {}", response.text().await.unwrap()),
                }
                tokio::task::yield_now().await;
            }
            (writes, conflicts)
        })
    };
    // Anyone reading meanwhile sees stock that adds up.
    let reader = {
        let (client, url, decided) =
            (app.client.clone(), app.url(&format!("/v1/products/{product}/inventory")), decided.clone());
        tokio::spawn(async move {
            let mut reads = 0;
            while !decided.load(std::sync::atomic::Ordering::SeqCst) {
                let seen: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
                let [on_hand, reserved, stock] = numbers(&seen, &["on_hand", "reserved", "stock"])[..] else {
                    unreachable!()
                };
                assert!(0 <= reserved && reserved <= on_hand && stock == on_hand - reserved, "{seen}");
                reads += 1;
            }
            reads
        })
    };
    let freed = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for shard in busy {
            shard.batch_execute("COMMIT").await.unwrap();
        }
    });
    let mut placed = tokio::task::JoinSet::new();
    for (token, amount) in buyers {
        let request = app.post("/v1/checkout").bearer_auth(&token).header("idempotency-key", "race");
        placed.spawn(async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 202);
            (token, amount, response.headers()["location"].to_str().unwrap().to_owned())
        });
    }
    let mut outcomes = std::collections::HashMap::new();
    let mut sold = 0;
    while let Some(result) = placed.join_next().await {
        let (token, amount, location) = result.unwrap();
        let order = app.wait_for_order(&token, &location).await;
        let balance =
            expect_json(app.get("/v1/wallet").bearer_auth(&token).send().await, 200).await["balance_cents"].as_i64();
        let outcome = order["failure_reason"].as_str().unwrap_or("confirmed").to_owned();
        if outcome == "confirmed" {
            sold += 1;
        }
        let expected_balance = if outcome == "confirmed" { amount - 700 } else { amount };
        assert_eq!(balance, Some(expected_balance), "{outcome}: wallet agrees with the order");
        *outcomes.entry(outcome).or_insert(0) += 1;
    }
    decided.store(true, std::sync::atomic::Ordering::SeqCst);
    freed.await.unwrap();
    let (writes, conflicts) = admin.await.unwrap();
    let reads = reader.await.unwrap();
    let amid = writes.iter().filter(|w| w["reserved"].as_i64() > Some(0)).count();
    eprintln!(
        "{outcomes:?}; the admin set the stock {} times, {amid} of them while orders held some ({conflicts} refused); \
         {reads} reads",
        writes.len()
    );
    assert!(outcomes.get("confirmed").is_some_and(|n| *n > 0), "{outcomes:?}");
    assert!(amid > 0, "no write met a reservation outstanding");
    let last = writes.last().expect("the admin set the stock at least once");

    let end = app.settled_inventory(&product).await;
    let [on_hand, reserved, sold_count, stock] = numbers(&end, &["on_hand", "reserved", "sold", "stock"])[..] else {
        unreachable!()
    };
    assert_eq!((reserved, stock), (0, on_hand), "nothing held once every order is decided: {end}");
    assert_eq!(sold_count, sold, "the units sold are those of the confirmed orders: {end}");
    let [last_on_hand, last_sold] = numbers(last, &["on_hand", "sold"])[..] else { unreachable!() };
    assert_eq!(
        on_hand + sold_count,
        last_on_hand + last_sold,
        "on hand + sold moved only by the admin: {end} after {last}"
    );
    assert!(on_hand >= 0 && sold_count - last_sold <= last_on_hand, "never oversold: {end} after {last}");
    for write in &writes {
        let [on_hand, reserved, stock] = numbers(write, &["on_hand", "reserved", "stock"])[..] else { unreachable!() };
        assert!(reserved <= on_hand && stock == on_hand - reserved, "{write}");
    }
    // Between two writes (one task made them, so in commit order), no more was sold than the first
    // had set on hand; before the first, no more than the product started with.
    let first_sold = numbers(&writes[0], &["sold"])[0];
    assert!(first_sold <= 20, "{}", writes[0]);
    for pair in writes.windows(2) {
        let [set, sold_then] = numbers(&pair[0], &["on_hand", "sold"])[..] else { unreachable!() };
        let sold_next = numbers(&pair[1], &["sold"])[0];
        assert!(sold_next - sold_then <= set, "oversold between {} and {}", pair[0], pair[1]);
    }
    app.check_queues_drained().await;
    for w in workers {
        w.stop().await;
    }
    app.check_invariants().await;
}

/// Must show (item 11): two checkouts of one cart with different Idempotency-Keys charge it once.
/// While the first is pending the cart's items are taken: another checkout is refused (409), racing
/// or not; once the first is confirmed they have left the cart (422: empty).
#[tokio::test]
async fn two_checkouts_with_different_keys_charge_one_cart_once() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Double clicker").await;
    expect_json(Ok(app.deposit(&token, "d", 10_000).await), 201).await;
    let product = app.create_product("ONCE", 1_000, 10).await;
    add_to_cart(&app, &token, &product, 2).await;

    // Six checkouts at once, each with its own key: one order.
    let mut racing = tokio::task::JoinSet::new();
    for i in 0..6 {
        let request = app.post("/v1/checkout").bearer_auth(&token).header("idempotency-key", format!("click-{i}"));
        racing.spawn(async move { request.send().await.unwrap() });
    }
    let (mut accepted, mut refused) = (Vec::new(), 0);
    while let Some(response) = racing.join_next().await {
        let response = response.unwrap();
        match response.status().as_u16() {
            202 => accepted.push(response.headers()["location"].to_str().unwrap().to_owned()),
            409 => {
                expect_problem(Ok(response), 409, "already being checked out").await;
                refused += 1;
            }
            other => panic!("checkout answered {other}: {}", response.text().await.unwrap()),
        }
    }
    assert_eq!((accepted.len(), refused), (1, 5), "{accepted:?}");
    let location = accepted.remove(0);
    // One more, later, with yet another key: still refused while the order is pending, and naming it.
    let again = app.post("/v1/checkout").bearer_auth(&token).header("idempotency-key", "later").send().await;
    expect_problem(again, 409, &location).await;

    let workers = app.start_workers();
    let order = app.wait_for_order(&token, &location).await;
    assert_eq!((order["status"].as_str(), order["total_cents"].as_i64()), (Some("confirmed"), Some(2_000)));
    assert_eq!(expect_json(app.get("/v1/wallet").bearer_auth(&token).send().await, 200).await["balance_cents"], 8_000);
    // The refused keys were not spent on the refusal: with the cart now empty, they say so.
    let after = app.post("/v1/checkout").bearer_auth(&token).header("idempotency-key", "later").send().await;
    expect_problem(after, 422, "cart is empty").await;
    assert_eq!(numbers(&app.settled_inventory(&product).await, &["on_hand", "sold"]), [8, 2]);
    app.check_queues_drained().await;
    workers.stop().await;
    app.check_invariants().await;
}

/// A failed order gives its cart back: the same cart can be checked out again (after a deposit).
#[tokio::test]
async fn a_cart_whose_order_failed_can_be_checked_out_again() {
    let app = TestApp::spawn().await;
    let workers = app.start_workers();
    let (_, token) = app.create_user("Short").await;
    let product = app.create_product("RETRY", 1_000, 10).await;
    add_to_cart(&app, &token, &product, 1).await;
    let (location, _) = checkout(&app, &token, "first").await;
    assert_eq!(app.wait_for_order(&token, &location).await["failure_reason"], "insufficient_funds");
    expect_json(Ok(app.deposit(&token, "d", 1_000).await), 201).await;
    let (location, _) = checkout(&app, &token, "second").await;
    assert_eq!(app.wait_for_order(&token, &location).await["status"], "confirmed");
    app.check_queues_drained().await;
    workers.stop().await;
    app.check_invariants().await;
}

/// Must show (item 11): what is put in the cart after a checkout is not removed by its confirmation:
/// neither a new item nor a new quantity of an item the order bought. The order charges what the
/// cart held when it was placed; the rest stays for the next checkout.
#[tokio::test]
async fn items_put_in_the_cart_after_a_checkout_survive_its_confirmation() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Browser").await;
    expect_json(Ok(app.deposit(&token, "d", 100_000).await), 201).await;
    let anchor = app.create_product("ANCHOR-2", 1_000, 10).await;
    let rope = app.create_product("ROPE-2", 300, 10).await;
    add_to_cart(&app, &token, &anchor, 1).await;
    let (location, _) = checkout(&app, &token, "first").await;
    // Before the saga runs: another anchor wanted (the quantity set anew), and a rope.
    add_to_cart(&app, &token, &anchor, 3).await;
    add_to_cart(&app, &token, &rope, 2).await;

    let workers = app.start_workers();
    let order = app.wait_for_order(&token, &location).await;
    assert_eq!(order["status"], "confirmed");
    assert_eq!(order["items"], json!([{ "product_id": anchor, "quantity": 1, "price_cents": 1_000 }]));
    let cart = expect_json(app.get("/v1/cart").bearer_auth(&token).send().await, 200).await;
    assert_eq!(
        cart["items"],
        json!([
            { "product_id": anchor, "quantity": 3, "price_cents": 1_000 },
            { "product_id": rope, "quantity": 2, "price_cents": 300 },
        ]),
        "the confirmation removed only what the order bought, as it was: {cart}"
    );
    // What stayed is checked out next, once.
    let (next, _) = checkout(&app, &token, "second").await;
    let order = app.wait_for_order(&token, &next).await;
    assert_eq!((order["status"].as_str(), order["total_cents"].as_i64()), (Some("confirmed"), Some(3_600)));
    let cart = expect_json(app.get("/v1/cart").bearer_auth(&token).send().await, 200).await;
    assert_eq!(cart["items"], json!([]));
    assert_eq!(expect_json(app.get("/v1/wallet").bearer_auth(&token).send().await, 200).await["balance_cents"], 95_400);
    app.check_queues_drained().await;
    workers.stop().await;
    app.check_invariants().await;
}

/// While an order is pending, a checkout with another key charges only what the cart gained since:
/// the pending order's items are its own. Both confirmed, the cart is empty and each item was paid
/// once.
#[tokio::test]
async fn a_checkout_while_another_is_pending_charges_only_what_was_added_since() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Second thoughts").await;
    expect_json(Ok(app.deposit(&token, "d", 100_000).await), 201).await;
    let anchor = app.create_product("ANCHOR-3", 1_000, 10).await;
    let rope = app.create_product("ROPE-3", 300, 10).await;
    add_to_cart(&app, &token, &anchor, 1).await;
    let (first, _) = checkout(&app, &token, "first").await;
    add_to_cart(&app, &token, &rope, 2).await;
    let (second, _) = checkout(&app, &token, "second").await;
    assert_ne!(first, second);

    let workers = app.start_workers();
    let first = app.wait_for_order(&token, &first).await;
    let second = app.wait_for_order(&token, &second).await;
    assert_eq!(first["items"], json!([{ "product_id": anchor, "quantity": 1, "price_cents": 1_000 }]));
    assert_eq!(second["items"], json!([{ "product_id": rope, "quantity": 2, "price_cents": 300 }]));
    assert_eq!((first["status"].as_str(), second["status"].as_str()), (Some("confirmed"), Some("confirmed")));
    assert_eq!(expect_json(app.get("/v1/cart").bearer_auth(&token).send().await, 200).await["items"], json!([]));
    assert_eq!(expect_json(app.get("/v1/wallet").bearer_auth(&token).send().await, 200).await["balance_cents"], 98_400);
    app.check_queues_drained().await;
    workers.stop().await;
    app.check_invariants().await;
}
