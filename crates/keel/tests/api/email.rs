//! E-mail from events: a real SMTP server that is down when the order is confirmed and up later
//! gets exactly one receipt; with no SMTP server, messages are files in the data directory.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::{expect_json, scratch_root, TestApp};
use crate::peers::{free_port, SmtpServer};

#[tokio::test]
async fn a_receipt_sent_while_smtp_is_down_arrives_exactly_once_when_it_is_back() {
    let port = free_port();
    let app = TestApp::spawn_with(|config| config.smtp_url = Some(format!("smtp://127.0.0.1:{port}"))).await;
    let workers = app.start_workers();
    let (_, token) = app.create_user("Rita Receipt").await;
    expect_json(Ok(app.deposit(&token, "d", 10_000).await), 201).await;
    let product = app.create_product("MAIL-1", 1234, 5).await;
    let item = json!({ "quantity": 2 });
    expect_json(app.put(&format!("/v1/cart/items/{product}")).bearer_auth(&token).json(&item).send().await, 200).await;
    let response = app.post("/v1/checkout").bearer_auth(&token).header("idempotency-key", "k").send().await.unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let order = app.wait_for_order(&token, &location).await;
    assert_eq!(order["status"], "confirmed");
    let order_id = order["id"].as_str().unwrap().to_owned();

    // The receipt fails while the server is down, and is retried.
    let started = Instant::now();
    loop {
        let mut failures = 0;
        for i in 0..crate::helpers::SHARDS {
            let shard = app.dbs.shard(i).await;
            let row = shard
                .query_opt("SELECT attempts, last_error FROM keel_jobs WHERE kind = 'order.confirmed'", &[])
                .await
                .unwrap();
            if let Some(row) = row {
                let error: Option<String> = row.get(1);
                if error.is_some_and(|e| e.contains("SMTP")) {
                    failures += row.get::<_, i32>(0);
                }
            }
        }
        if failures >= 1 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "the receipt never failed against a closed port");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let smtp = SmtpServer::start(port, &scratch_root().join(format!("maildir-{port}"))).await;
    let started = Instant::now();
    let receipts = loop {
        let receipts: Vec<String> =
            smtp.messages().into_iter().filter(|m| m.contains(&format!("Receipt for order {order_id}"))).collect();
        if !receipts.is_empty() {
            break receipts;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let mut jobs = Vec::new();
            for i in 0..crate::helpers::SHARDS {
                for row in app
                    .dbs
                    .shard(i)
                    .await
                    .query("SELECT kind, state, attempts, run_at::text, last_error FROM keel_jobs", &[])
                    .await
                    .unwrap()
                {
                    jobs.push(format!(
                        "{} {} {} {} {:?}",
                        row.get::<_, String>(0),
                        row.get::<_, String>(1),
                        row.get::<_, i32>(2),
                        row.get::<_, String>(3),
                        row.get::<_, Option<String>>(4)
                    ));
                }
            }
            panic!("no receipt arrived; messages {:?}; jobs {jobs:#?}", smtp.messages());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    app.check_queues_drained().await;
    workers.stop().await;
    // Whatever was retried, one receipt: and it names the order, its items and total.
    let all = smtp.messages();
    let receipts_now = all.iter().filter(|m| m.contains(&format!("Receipt for order {order_id}"))).count();
    assert_eq!((receipts.len(), receipts_now), (1, 1), "{all:#?}");
    let receipt = &receipts[0];
    assert!(receipt.contains("Product MAIL-1") && receipt.contains("12.34"), "{receipt}");
    assert!(receipt.contains("Total: 24.68"), "{receipt}");
    assert!(receipt.contains("Message-ID: <"), "{receipt}");
    let welcomes = all.iter().filter(|m| m.contains("Subject: Welcome to Keel")).count();
    assert_eq!(welcomes, 1, "the welcome e-mail also waited for the server, and came once");
}

#[tokio::test]
async fn without_smtp_messages_are_files_in_the_data_directory() {
    let app = TestApp::spawn().await;
    let workers = app.start_workers();
    let (_, token) = app.create_user("Frida File").await;
    let product = app.create_product("MAIL-2", 500, 5).await;
    let item = json!({ "quantity": 1 });
    expect_json(app.put(&format!("/v1/cart/items/{product}")).bearer_auth(&token).json(&item).send().await, 200).await;
    let response = app.post("/v1/checkout").bearer_auth(&token).header("idempotency-key", "k").send().await.unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let order = app.wait_for_order(&token, &location).await;
    assert_eq!(
        (order["status"].as_str(), order["failure_reason"].as_str()),
        (Some("failed"), Some("insufficient_funds"))
    );
    app.check_queues_drained().await;
    workers.stop().await;
    let dir = app.config.data_dir.join("mail");
    // Names, addresses and orders: readable by Keel's user only.
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "the mail directory");
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        assert_eq!(mode(&entry.path()), 0o600, "{}", entry.path().display());
    }
    let mut files: Vec<String> =
        std::fs::read_dir(&dir).unwrap().flatten().map(|e| std::fs::read_to_string(e.path()).unwrap()).collect();
    files.sort();
    assert_eq!(files.len(), 2, "a welcome and a failure notice: {files:#?}");
    assert!(files.iter().any(|m| m.contains("Subject: Welcome to Keel") && m.contains("Frida File")));
    let notice = files.iter().find(|m| m.contains("was not placed")).expect("a failure notice");
    assert!(notice.contains("wallet balance"), "{notice}");
}

/// Two handlers given the same event at once (a broker's redelivery, a lease that lapsed under a
/// slow worker) send one e-mail: ten handlers, each with a `Sender` of its own as separate worker
/// processes would have, run the sign-up's `user.registered` job at the same moment. One message
/// with the event's `Message-ID` arrives; the others are told to retry (or that it was sent); and a
/// handler that runs the job afterwards finds it sent and sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_handlers_given_the_same_event_at_once_send_one_email() {
    const HANDLERS: usize = 10;
    let port = free_port();
    let smtp = SmtpServer::start(port, &scratch_root().join(format!("maildir-{port}"))).await;
    // No workers are started: the sign-up's job waits in the queue for this test to run it.
    let app = TestApp::spawn_with(|config| config.smtp_url = Some(format!("smtp://127.0.0.1:{port}"))).await;
    let (user_id, _) = app.create_user("Olga Once").await;

    let mut jobs = Vec::new();
    for i in 0..crate::helpers::SHARDS {
        let rows = app
            .dbs
            .shard(i)
            .await
            .query(
                "SELECT id, kind, aggregate_id, payload, traceparent, attempts, created_at, run_at
                 FROM keel_jobs WHERE kind = 'user.registered'",
                &[],
            )
            .await
            .unwrap();
        jobs.extend(rows.iter().map(|row| keel_outbox::Job {
            id: row.get("id"),
            kind: row.get("kind"),
            aggregate_id: row.get("aggregate_id"),
            payload: row.get("payload"),
            traceparent: row.get("traceparent"),
            attempt: row.get::<_, i32>("attempts").max(1),
            created_at: row.get("created_at"),
            ready_at: row.get("run_at"),
            // A sign-up's job, never dead, so never replayed.
            replays: 0,
        }));
    }
    assert_eq!(jobs.len(), 1, "one user.registered job for the one sign-up: {jobs:#?}");
    let job = jobs.pop().unwrap();
    assert!(job.payload.to_string().contains(&user_id), "the job is the sign-up's: {job:?}");
    let message_id = format!("<{}@keel>", job.id);

    let start = std::sync::Arc::new(tokio::sync::Barrier::new(HANDLERS));
    let mut handlers = tokio::task::JoinSet::new();
    for _ in 0..HANDLERS {
        let sender = keel::email::Sender::from_config(&app.config).unwrap();
        let (databases, job, start) = (app.databases.clone(), job.clone(), start.clone());
        handlers.spawn(async move {
            start.wait().await;
            keel::email::send_for(&databases, &sender, &job).await
        });
    }
    let (mut ok, mut told_to_retry, mut other_errors) = (0, 0, Vec::new());
    while let Some(outcome) = handlers.join_next().await {
        match outcome.unwrap() {
            Ok(()) => ok += 1,
            Err(error) if error.retry_in.is_some() => told_to_retry += 1,
            Err(error) => other_errors.push(error),
        }
    }
    // A message accepted by the server is in the maildir before the server answers; a moment more
    // lets anything still in flight land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = smtp.message_id_counts().get(&message_id).copied().unwrap_or(0);
    eprintln!(
        "{HANDLERS} handlers at once: {ok} Ok, {told_to_retry} told to retry, {} failed; {sent} message(s) with {message_id}",
        other_errors.len()
    );
    assert!(other_errors.is_empty(), "handlers failed other than by being told to retry: {other_errors:#?}");
    assert_eq!(sent, 1, "messages with the event's Message-ID: {:#?}", smtp.messages());
    assert!(ok >= 1, "the handler that sent it returned Ok");

    // Run again once every handler has finished, by a handler with no memory of the others.
    let late = keel::email::Sender::from_config(&app.config).unwrap();
    let again = keel::email::send_for(&app.databases, &late, &job).await;
    assert!(again.is_ok(), "the e-mail was sent already: {again:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let total = smtp.messages().len();
    eprintln!("after a later run: {total} message(s) in all");
    assert_eq!(total, 1, "nothing more is sent: {:#?}", smtp.messages());
    let mut recorded = Vec::new();
    for i in 0..crate::helpers::SHARDS {
        let rows = app
            .dbs
            .shard(i)
            .await
            .query("SELECT sent_at IS NOT NULL, attempts FROM email_deliveries WHERE event_id = $1", &[&job.id])
            .await
            .unwrap();
        recorded.extend(rows.iter().map(|r| (r.get::<_, bool>(0), r.get::<_, i32>(1))));
    }
    assert_eq!(recorded, vec![(true, 1)], "one delivery, recorded as sent, claimed once");
}

/// A mail server that refuses every recipient for good (`550`), as one does an address it has no
/// mailbox for; it speaks just enough SMTP for a client to get there. Counts the refusals.
async fn refusing_smtp_server() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = refused.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(b"220 refuser ready\r\n").await?;
                while let Some(line) = lines.next_line().await? {
                    let verb = line.split_whitespace().next().unwrap_or_default().to_ascii_uppercase();
                    let answer: &[u8] = match verb.as_str() {
                        "EHLO" | "HELO" => b"250 refuser\r\n",
                        "RCPT" => {
                            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            b"550 5.1.1 no such mailbox here\r\n"
                        }
                        "QUIT" => {
                            write.write_all(b"221 bye\r\n").await?;
                            break;
                        }
                        _ => b"250 ok\r\n",
                    };
                    write.write_all(answer).await?;
                }
                Ok::<(), std::io::Error>(())
            });
        }
    });
    (port, refused)
}

/// A recipient the mail server refuses for good (a 5xx answer) sends the e-mail's job to the dead
/// letters at once, with the server's reason, instead of retrying it for hours.
#[tokio::test]
async fn an_e_mail_the_server_refuses_for_good_is_dead_at_once_with_the_reason() {
    let (port, refused) = refusing_smtp_server().await;
    let app = TestApp::spawn_with(|config| config.smtp_url = Some(format!("smtp://127.0.0.1:{port}"))).await;
    let workers = app.start_workers();
    let (user, _) = app.create_user("Nobody Here").await;
    let started = Instant::now();
    let (state, attempts, error) = loop {
        let mut found = None;
        for i in 0..crate::helpers::SHARDS {
            let shard = app.dbs.shard(i).await;
            let sql = "SELECT state, attempts, last_error FROM keel_jobs WHERE kind = 'user.registered' AND aggregate_id = $1";
            if let Some(row) = shard.query_opt(sql, &[&user]).await.unwrap() {
                found = Some((row.get::<_, String>(0), row.get::<_, i32>(1), row.get::<_, Option<String>>(2)));
            }
        }
        if let Some(dead) = found.clone().filter(|(state, ..)| state == "dead") {
            break dead;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "the refused welcome is not dead: {found:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((state.as_str(), attempts), ("dead", 1), "dead after its first attempt");
    let error = error.unwrap_or_default();
    assert!(error.contains("refused") && error.contains("no such mailbox"), "the reason is kept: {error}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(refused.load(std::sync::atomic::Ordering::SeqCst), 1, "not tried again");
    drop(workers);
}
