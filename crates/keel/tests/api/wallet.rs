use serde_json::json;

use crate::helpers::{expect_json, expect_problem, TestApp};

#[tokio::test]
async fn deposits_raise_the_balance() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Saver").await;
    let wallet = expect_json(app.get("/v1/wallet").bearer_auth(&token).send().await, 200).await;
    assert_eq!(wallet, json!({ "balance_cents": 0 }));
    let made = expect_json(Ok(app.deposit(&token, "k1", 500).await), 201).await;
    assert_eq!(made["balance_cents"], 500);
    assert!(made["deposit_id"].is_string());
    let made = expect_json(Ok(app.deposit(&token, "k2", 250).await), 201).await;
    assert_eq!(made["balance_cents"], 750);
    let wallet = expect_json(app.get("/v1/wallet").bearer_auth(&token).send().await, 200).await;
    assert_eq!(wallet["balance_cents"], 750);
    expect_problem(app.get("/v1/wallet").send().await, 401, "token").await;
    app.check_invariants().await;
}

#[tokio::test]
async fn the_same_idempotency_key_deposits_once_and_replays_the_answer() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Saver").await;
    let first = expect_json(Ok(app.deposit(&token, "once", 1000).await), 201).await;
    let again = expect_json(Ok(app.deposit(&token, "once", 1000).await), 201).await;
    assert_eq!(first, again, "a replay returns the first answer, deposit id and all");
    let wallet = expect_json(app.get("/v1/wallet").bearer_auth(&token).send().await, 200).await;
    assert_eq!(wallet["balance_cents"], 1000);

    expect_problem(Ok(app.deposit(&token, "once", 999).await), 422, "different request").await;
    // Keys belong to their user: another user's "once" is a new key.
    let (_, other) = app.create_user("Other").await;
    expect_json(Ok(app.deposit(&other, "once", 5).await), 201).await;
    app.check_invariants().await;
}

#[tokio::test]
async fn deposits_are_checked() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Saver").await;
    let no_key = app.post("/v1/wallet/deposits").bearer_auth(&token).json(&json!({ "amount_cents": 5 })).send().await;
    expect_problem(no_key, 400, "Idempotency-Key").await;
    let long_key = "k".repeat(300);
    expect_problem(Ok(app.deposit(&token, &long_key, 5).await), 400, "Idempotency-Key").await;
    for (i, amount) in [0_i64, -5, 10_000_000_001, i64::MAX].into_iter().enumerate() {
        expect_problem(Ok(app.deposit(&token, &format!("bad{i}"), amount).await), 422, "amount_cents").await;
    }
    let wallet = expect_json(app.get("/v1/wallet").bearer_auth(&token).send().await, 200).await;
    assert_eq!(wallet["balance_cents"], 0);
}

#[tokio::test]
async fn a_hundred_concurrent_deposits_sum_exactly() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Saver").await;
    let mut deposits = tokio::task::JoinSet::new();
    for i in 1..=100_i64 {
        let request = app
            .post("/v1/wallet/deposits")
            .bearer_auth(&token)
            .header("idempotency-key", format!("deposit-{i}"))
            .json(&json!({ "amount_cents": i }));
        deposits.spawn(async move { request.send().await.unwrap().status().as_u16() });
    }
    while let Some(status) = deposits.join_next().await {
        assert_eq!(status.unwrap(), 201);
    }
    let wallet = expect_json(app.get("/v1/wallet").bearer_auth(&token).send().await, 200).await;
    assert_eq!(wallet["balance_cents"], 5050);
    app.check_invariants().await;
}

#[tokio::test]
async fn twenty_racing_requests_with_one_key_move_money_once() {
    let app = TestApp::spawn().await;
    let (_, token) = app.create_user("Saver").await;
    let mut racers = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let request = app
            .post("/v1/wallet/deposits")
            .bearer_auth(&token)
            .header("idempotency-key", "the-one-key")
            .json(&json!({ "amount_cents": 700 }));
        racers.spawn(async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        });
    }
    let mut answers = Vec::new();
    while let Some(answer) = racers.join_next().await {
        answers.push(answer.unwrap());
    }
    assert!(answers.iter().all(|a| a == &answers[0]), "every racer gets the same answer: {answers:?}");
    assert_eq!(answers[0].0, 201);
    let wallet = expect_json(app.get("/v1/wallet").bearer_auth(&token).send().await, 200).await;
    assert_eq!(wallet["balance_cents"], 700);
    let deposits: i64 =
        app.dbs.shard(0).await.query_one("SELECT count(*) FROM wallet_deposits", &[]).await.unwrap().get(0);
    let deposits2: i64 =
        app.dbs.shard(1).await.query_one("SELECT count(*) FROM wallet_deposits", &[]).await.unwrap().get(0);
    assert_eq!(deposits + deposits2, 1);
    app.check_invariants().await;
}
