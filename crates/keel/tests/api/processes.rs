//! `keel` run as a real process: `keel up` over its own cluster, and `keel migrate` with two
//! `keel serve` nodes sharing external databases.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{expect_json, TestDatabases, ADMIN_TOKEN};

pub(crate) struct Keel {
    child: Child,
    /// `http://127.0.0.1:PORT`, known once [`Keel::wait_ready`] has read it from the log.
    pub(crate) address: String,
    log: PathBuf,
    /// Where this process's lines begin in a log file that earlier processes may have written to.
    log_start: usize,
}

fn keel_command(args: &[&str], env: &[(&str, String)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
    command.args(args);
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEEL_")) {
        command.env_remove(key);
    }
    command.env("KEEL_LOG", "info");
    // These tests seed data and load keel from one address: no rate limits (a test may turn them on).
    command.env("KEEL_RATE_LIMIT", "off");
    command.env("KEEL_TOKEN_KEYS", crate::helpers::TOKEN_KEYS);
    command.env("KEEL_CHECKOUT_REQUIRES_VERIFIED_EMAIL", "off");
    // E-mail is written under the data directory when no SMTP server is set: keep it out of the tree.
    command.env("KEEL_DATA_DIR", crate::helpers::scratch_root().join("keel-data"));
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

impl Keel {
    /// Starts `keel` listening on a port the kernel picks (port 0), so that no other process can take
    /// the port between its choice and keel's bind; keel logs the address it got.
    pub(crate) fn start(args: &[&str], env: &[(&str, String)], log: &Path) -> Keel {
        Keel::spawn(keel_command(args, env).env("KEEL_LISTEN", "127.0.0.1:0"), log)
    }

    fn spawn(command: &mut Command, log: &Path) -> Keel {
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let log_start = log_file.metadata().unwrap().len() as usize;
        let child = command.stdout(Stdio::null()).stderr(log_file).spawn().unwrap();
        Keel { child, address: String::new(), log: log.to_owned(), log_start }
    }

    /// The address from this process's "serving" or "keel is up" log line, once written.
    fn logged_address(&self) -> Option<String> {
        let text = self.log_text();
        text.get(self.log_start..)?.lines().find_map(|line| {
            // `keel up`'s line for people, whatever the log format.
            if let Some(rest) = line.strip_prefix("keel is up: ") {
                return rest.split_whitespace().next().map(str::to_owned);
            }
            let line: Value = serde_json::from_str(line).ok()?;
            let message = line["fields"]["message"].as_str().or(line["message"].as_str())?;
            let address = line["fields"]["address"].as_str().or(line["address"].as_str())?;
            ["serving", "keel is up"].contains(&message).then(|| format!("http://{address}"))
        })
    }

    /// Polls `/readyz` until 200; returns how long that took.
    pub(crate) async fn wait_ready(&mut self, within: Duration) -> Duration {
        let started = Instant::now();
        let client = reqwest::Client::new();
        loop {
            if self.address.is_empty() {
                self.address = self.logged_address().unwrap_or_default();
            }
            if self.address.is_empty() {
                // Not listening yet.
            } else if let Ok(response) = client.get(format!("{}/readyz", self.address)).send().await {
                if response.status() == 200 {
                    return started.elapsed();
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("keel exited with {status} before it was ready; log:\n{}", self.log_text());
            }
            assert!(started.elapsed() < within, "not ready within {within:?}; log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The process's resident memory, in bytes.
    pub(crate) fn resident_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/PID/status");
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    pub(crate) fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    pub(crate) async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < within, "keel did not exit within {within:?}; log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Keel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory of one test's own under the binary's scratch root, removed when the test ends,
/// passing or failing (the root itself goes when the binary exits).
pub(crate) struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn scratch_dir(name: &str) -> Scratch {
    let dir = crate::helpers::scratch_root().join(format!("process-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // As root, `keel up` runs PostgreSQL as an unprivileged user, who must be able to reach it.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    Scratch(dir)
}

fn postgres_log(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join("postgres.log")).unwrap_or_default()
}

#[tokio::test]
async fn keel_up_keeps_its_data_across_a_clean_restart() {
    let scratch = scratch_dir("up");
    let data_dir = scratch.join("data");
    let data_arg = data_dir.to_str().unwrap().to_owned();
    let log = scratch.join("keel.log");
    let client = reqwest::Client::new();

    let mut keel = Keel::start(&["up", "--data-dir", &data_arg], &[], &log);
    let first_start = keel.wait_ready(Duration::from_secs(30)).await;
    eprintln!("keel up: first start ready in {first_start:?}");
    let admin = std::fs::read_to_string(data_dir.join("admin-token")).unwrap().trim().to_owned();
    assert!(keel.log_text().contains(&admin), "the generated admin token is printed once");

    let user = client
        .post(format!("{}/v1/users", keel.address))
        .header("x-request-id", "up-test-request")
        .json(&json!({ "name": "Persistent", "email": "persistent@example.org" }))
        .send()
        .await;
    let user = expect_json(user, 201).await;
    let product = client
        .post(format!("{}/v1/products", keel.address))
        .bearer_auth(&admin)
        .json(&json!({ "sku": "KEEP", "name": "Kept", "price_cents": 1, "stock": 2 }))
        .send()
        .await;
    let product = expect_json(product, 201).await;
    // The first lines say where the API and the admin token are.
    let printed = keel.log_text();
    assert!(printed.contains(&format!("API: {}/v1/", keel.address)), "{printed}");
    assert!(printed.contains(&format!("admin token: {}", data_dir.join("admin-token").display())), "{printed}");
    // Query insight: keel up's cluster keeps every statement's statistics.
    let statements = client.get(format!("{}/v1/admin/queries?database=catalog", keel.address)).bearer_auth(&admin);
    let statements = expect_json(statements.send().await, 200).await;
    assert!(statements["items"].as_array().is_some_and(|items| !items.is_empty()), "{statements}");

    keel.signal(libc::SIGTERM);
    assert!(keel.wait_exit(Duration::from_secs(60)).await.success(), "log:\n{}", keel.log_text());
    assert!(postgres_log(&data_dir).contains("database system is shut down"));

    // Every log line of the request carries its request id.
    let request_lines: Vec<Value> = keel
        .log_text()
        .lines()
        .filter(|l| l.contains("up-test-request"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .collect();
    assert!(!request_lines.is_empty());
    assert!(request_lines.iter().all(|l| l["span"]["request_id"] == "up-test-request"), "{request_lines:?}");

    // Restarted with log lines for a person (the default at a terminal; a file is not one).
    let before_restart = postgres_log(&data_dir).len();
    let text_log = scratch.join("keel-text.log");
    let mut keel = Keel::start(&["up", "--data-dir", &data_arg], &[("KEEL_LOG_FORMAT", "text".to_owned())], &text_log);
    keel.wait_ready(Duration::from_secs(30)).await;
    let text = keel.log_text();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("INFO")).collect();
    assert!(!lines.is_empty() && lines.iter().all(|l| serde_json::from_str::<Value>(l).is_err()), "{text}");
    let restart_log = postgres_log(&data_dir)[before_restart..].to_owned();
    assert!(!restart_log.contains("not properly shut down"), "crash recovery after a clean stop:\n{restart_log}");
    assert!(!restart_log.contains("automatic recovery"), "{restart_log}");

    let id = user["id"].as_str().unwrap();
    let token = user["token"].as_str().unwrap();
    let read =
        expect_json(client.get(format!("{}/v1/users/{id}", keel.address)).bearer_auth(token).send().await, 200).await;
    assert_eq!(read["email"], "persistent@example.org");
    let pid = product["id"].as_str().unwrap();
    let stock = client.get(format!("{}/v1/products/{pid}/inventory", keel.address)).send().await;
    assert_eq!(expect_json(stock, 200).await["stock"], 2);
    assert_eq!(std::fs::read_to_string(data_dir.join("admin-token")).unwrap().trim(), admin, "same admin token");

    // Ctrl-C stops it as cleanly as SIGTERM.
    keel.signal(libc::SIGINT);
    assert!(keel.wait_exit(Duration::from_secs(60)).await.success());
}

#[tokio::test]
async fn keel_up_recovers_from_being_killed() {
    let scratch = scratch_dir("killed");
    let data_dir = scratch.join("data");
    let data_arg = data_dir.to_str().unwrap().to_owned();
    let log = scratch.join("keel.log");
    let env = [("KEEL_ADMIN_TOKEN", ADMIN_TOKEN.to_owned())];

    let mut keel = Keel::start(&["up", "--data-dir", &data_arg], &env, &log);
    keel.wait_ready(Duration::from_secs(30)).await;
    let pid_file = data_dir.join("postgres/postmaster.pid");
    let postgres_pid: i32 = std::fs::read_to_string(&pid_file).unwrap().lines().next().unwrap().parse().unwrap();
    keel.signal(libc::SIGKILL);
    keel.wait_exit(Duration::from_secs(10)).await;

    // The kernel tells the orphaned server to shut down; it must not outlive its owner.
    let started = Instant::now();
    while Path::new(&format!("/proc/{postgres_pid}")).exists() {
        assert!(started.elapsed() < Duration::from_secs(30), "PostgreSQL outlived keel");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A crash can leave a pid file naming a pid that now belongs to another process.
    std::fs::write(&pid_file, format!("{}\n{}\n", std::process::id(), data_dir.display())).unwrap();

    let mut keel = Keel::start(&["up", "--data-dir", &data_arg], &env, &log);
    keel.wait_ready(Duration::from_secs(30)).await;
    keel.signal(libc::SIGTERM);
    assert!(keel.wait_exit(Duration::from_secs(60)).await.success());
}

#[tokio::test]
async fn migrate_then_two_serve_nodes_share_the_databases() {
    let dbs = TestDatabases::create(false).await;
    let scratch = scratch_dir("serve");
    let env = vec![
        ("KEEL_CATALOG_URL", dbs.catalog_url.clone()),
        ("KEEL_SHARD_URLS", dbs.shard_urls.join(",")),
        ("KEEL_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
    ];

    // Serving unmigrated databases is refused with what to do.
    let mut early = Keel::start(&["serve"], &env, &scratch.join("early.log"));
    assert!(!early.wait_exit(Duration::from_secs(30)).await.success());
    assert!(early.log_text().contains("keel migrate"), "{}", early.log_text());

    // Two migrations at once: both succeed, the schema is applied once.
    let mut migrations: Vec<Child> =
        (0..2).map(|_| keel_command(&["migrate"], &env).stderr(Stdio::null()).spawn().unwrap()).collect();
    for migration in &mut migrations {
        assert!(migration.wait().unwrap().success());
    }

    let mut a = Keel::start(&["serve"], &env, &scratch.join("a.log"));
    let mut b = Keel::start(&["serve"], &env, &scratch.join("b.log"));
    a.wait_ready(Duration::from_secs(30)).await;
    b.wait_ready(Duration::from_secs(30)).await;
    let client = reqwest::Client::new();
    let created = client
        .post(format!("{}/v1/users", a.address))
        .json(&json!({ "name": "Roamer", "email": "roamer@example.org" }))
        .send()
        .await;
    let user = expect_json(created, 201).await;
    let path = format!("{}/v1/users/{}", b.address, user["id"].as_str().unwrap());
    let read = expect_json(client.get(path).bearer_auth(user["token"].as_str().unwrap()).send().await, 200).await;
    assert_eq!(read["email"], "roamer@example.org");
    let duplicate = client
        .post(format!("{}/v1/users", b.address))
        .json(&json!({ "name": "Copy", "email": "roamer@example.org" }))
        .send()
        .await;
    assert_eq!(duplicate.unwrap().status(), 409);

    for node in [&mut a, &mut b] {
        node.signal(libc::SIGTERM);
        assert!(node.wait_exit(Duration::from_secs(30)).await.success());
    }
}

#[tokio::test]
async fn a_bad_setting_stops_start_up_and_is_named() {
    let output = keel_command(&["up"], &[("KEEL_LISTEN", "localhost".into())]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("KEEL_LISTEN"));

    let scratch = scratch_dir("config");
    let file = scratch.join("keel.toml");
    std::fs::write(&file, "db_pool_size = \"many\"\n").unwrap();
    let output = keel_command(&["serve"], &[("KEEL_CONFIG", file.display().to_string())]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("db_pool_size") && stderr.contains("keel.toml"), "{stderr}");

    let output = keel_command(&["serve"], &[]).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("KEEL_CATALOG_URL"));
}

/// As root, the cluster runs as an unprivileged user, who must be able to reach the data directory.
/// Where it cannot, keel says which folder is in the way and what to run.
#[tokio::test]
async fn an_unreachable_data_directory_is_named_with_the_fix() {
    let scratch = scratch_dir("locked");
    let locked = scratch.join("locked");
    std::fs::create_dir_all(&locked).unwrap();
    std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let data_dir = locked.join("data");
    let log = scratch.join("keel.log");
    let mut keel = Keel::start(&["up", "--data-dir", data_dir.to_str().unwrap()], &[], &log);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert!(!keel.wait_exit(Duration::from_secs(30)).await.success());
        let text = keel.log_text();
        assert!(text.contains(&format!("chmod o+x {}", locked.display())), "{text}");
    } else {
        // Not root: the server runs as this user, who owns the folder, so there is nothing to fix.
        keel.wait_ready(Duration::from_secs(30)).await;
        keel.signal(libc::SIGTERM);
        assert!(keel.wait_exit(Duration::from_secs(60)).await.success());
    }
}

/// A `keel worker` process killed with SIGKILL in the middle of sagas loses nothing: after another
/// worker takes over, every accepted order ends confirmed or failed exactly once, with one debit per
/// confirmed order and no stock left reserved by a failed one.
#[tokio::test]
async fn no_order_is_lost_when_a_worker_process_is_killed() {
    let dbs = TestDatabases::create(true).await;
    let scratch = scratch_dir("killed-worker");
    let env = vec![
        ("KEEL_CATALOG_URL", dbs.catalog_url.clone()),
        ("KEEL_SHARD_URLS", dbs.shard_urls.join(",")),
        ("KEEL_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        // A killed worker's jobs are claimed again 3 s after they started.
        ("KEEL_JOB_TIMEOUT", "2s".to_owned()),
    ];
    let mut api = Keel::start(&["serve"], &env, &scratch.join("api.log"));
    api.wait_ready(Duration::from_secs(30)).await;
    let client = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", api.address);
    let product = client
        .post(url("/v1/products"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "sku": "SAGA", "name": "Saga", "price_cents": 100, "stock": 150 }))
        .send()
        .await;
    let product = expect_json(product, 201).await["id"].as_str().unwrap().to_owned();

    // 200 orders for 150 units, from buyers of whom every fifth cannot pay.
    let mut orders = Vec::new();
    for i in 0..200 {
        let email = format!("buyer{i}@example.org");
        let user =
            expect_json(client.post(url("/v1/users")).json(&json!({ "name": "B", "email": email })).send().await, 201)
                .await;
        let token = user["token"].as_str().unwrap().to_owned();
        let amount = if i % 5 == 0 { 50 } else { 1_000 };
        let user = user["id"].as_str().unwrap();
        let deposit = client.post(url(&format!("/v1/admin/users/{user}/deposits"))).bearer_auth(ADMIN_TOKEN);
        let deposit = deposit.header("idempotency-key", "d");
        expect_json(deposit.json(&json!({ "amount_cents": amount })).send().await, 201).await;
        let cart = client.put(url(&format!("/v1/cart/items/{product}"))).bearer_auth(&token);
        expect_json(cart.json(&json!({ "quantity": 1 })).send().await, 200).await;
        let placed = client.post(url("/v1/checkout")).bearer_auth(&token).header("idempotency-key", "c").send().await;
        orders.push((token, expect_json(placed, 202).await["id"].as_str().unwrap().to_owned()));
    }

    let decided = || async {
        let mut n = 0i64;
        for url in &dbs.shard_urls {
            let shard = crate::helpers::connect(url).await;
            n += shard
                .query_one("SELECT count(*) FROM orders WHERE status <> 'pending'", &[])
                .await
                .unwrap()
                .get::<_, i64>(0);
        }
        n
    };
    let mut first = Keel::start(&["worker"], &env, &scratch.join("worker1.log"));
    let started = Instant::now();
    while decided().await == 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "the first worker decided nothing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.signal(libc::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).await;
    let at_kill = decided().await;
    eprintln!("worker killed after deciding {at_kill} of 200 orders");
    assert!(at_kill < 200, "the kill came too late to interrupt anything");

    let mut second = Keel::start(&["worker"], &env, &scratch.join("worker2.log"));
    let mut confirmed = 0;
    for (token, id) in &orders {
        let started = Instant::now();
        let order = loop {
            let order =
                expect_json(client.get(url(&format!("/v1/orders/{id}"))).bearer_auth(token).send().await, 200).await;
            if order["status"] != "pending" {
                break order;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "order {id} still pending");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let balance = expect_json(client.get(url("/v1/wallet")).bearer_auth(token).send().await, 200).await;
        match order["status"].as_str().unwrap() {
            "confirmed" => confirmed += 1,
            "failed" => {
                assert!(["out_of_stock", "insufficient_funds"].contains(&order["failure_reason"].as_str().unwrap()))
            }
            other => panic!("status {other}"),
        }
        let paid = if order["status"] == "confirmed" { 100 } else { 0 };
        let deposited = balance["balance_cents"].as_i64().unwrap() + paid;
        assert!(deposited == 50 || deposited == 1_000, "charged at most once: {order} {balance}");
    }
    // 160 buyers can pay for 150 units. A buyer who cannot pay holds stock until the saga releases
    // it, so a payer may be refused meanwhile: what matters is that every unit is either sold to a
    // confirmed order or back in stock.
    let stock = expect_json(client.get(url(&format!("/v1/products/{product}/inventory"))).send().await, 200).await;
    assert!(confirmed > 100, "{confirmed} confirmed");
    assert_eq!(stock["stock"].as_i64().unwrap() + confirmed, 150, "units sold or back in stock");
    let catalog = crate::helpers::connect(&dbs.catalog_url).await;
    let held: i64 = catalog
        .query_one("SELECT coalesce(sum(quantity), 0) FROM stock_reservations WHERE NOT released", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, confirmed, "exactly the confirmed orders hold stock");
    for url in &dbs.shard_urls {
        let shard = crate::helpers::connect(url).await;
        let debits: i64 = shard.query_one("SELECT count(*) FROM wallet_debits", &[]).await.unwrap().get(0);
        let confirmed_here: i64 =
            shard.query_one("SELECT count(*) FROM orders WHERE status = 'confirmed'", &[]).await.unwrap().get(0);
        assert_eq!(debits, confirmed_here, "one debit per confirmed order");
    }
    for node in [&mut api, &mut second] {
        node.signal(libc::SIGTERM);
        assert!(node.wait_exit(Duration::from_secs(30)).await.success());
    }
}

/// The trace of a request follows its event into a separate `keel worker` process: every log line
/// the worker writes while handling the event or its webhook delivery carries the request's trace id.
#[tokio::test]
async fn a_request_trace_id_is_on_every_worker_log_line_for_its_events() {
    let dbs = TestDatabases::create(true).await;
    let scratch = scratch_dir("traced-worker");
    let env = vec![
        ("KEEL_CATALOG_URL", dbs.catalog_url.clone()),
        ("KEEL_SHARD_URLS", dbs.shard_urls.join(",")),
        ("KEEL_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ("KEEL_WEBHOOK_ALLOW_LOOPBACK", "true".to_owned()),
        ("KEEL_WEBHOOK_RETRY_SCHEDULE", "100ms".to_owned()),
    ];
    let mut api = Keel::start(&["serve"], &env, &scratch.join("api.log"));
    api.wait_ready(Duration::from_secs(30)).await;
    let mut worker = Keel::start(&["worker"], &env, &scratch.join("worker.log"));
    let receiver =
        crate::peers::Receiver::start(vec![crate::peers::Reply::status(503)], crate::peers::Reply::status(200)).await;
    let client = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", api.address);
    let subscription = json!({ "url": receiver.url, "events": ["product.created"] });
    expect_json(client.post(url("/v1/webhooks")).bearer_auth(ADMIN_TOKEN).json(&subscription).send().await, 201).await;

    let trace_id = "5e1b1c2d3e4f50617283940a1b2c3d4e";
    let created = client
        .post(url("/v1/products"))
        .bearer_auth(ADMIN_TOKEN)
        .header("traceparent", format!("00-{trace_id}-1a2b3c4d5e6f7081-01"))
        .json(&json!({ "sku": "TRACED", "name": "Traced", "price_cents": 1, "stock": 1 }))
        .send()
        .await;
    expect_json(created, 201).await;
    // A failed attempt, then the delivery: both are logged by the worker.
    receiver.wait_for(2, Duration::from_secs(30)).await;
    worker.signal(libc::SIGTERM);
    assert!(worker.wait_exit(Duration::from_secs(30)).await.success());

    let log = worker.log_text();
    let for_the_event: Vec<Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| matches!(line["span"]["kind"].as_str(), Some("product.created" | "webhook.deliver")))
        .collect();
    let messages: Vec<&str> = for_the_event.iter().filter_map(|l| l["message"].as_str()).collect();
    assert!(messages.contains(&"webhook delivery failed") && messages.contains(&"webhook delivered"), "{log}");
    for line in &for_the_event {
        assert_eq!(line["span"]["trace_id"], trace_id, "a worker line without the request's trace: {line}");
    }
}

/// A like is counted in the statement that records it: SIGKILL of the `keel serve` node that took
/// the likes loses no count. (When counts were written back from memory, a kill lost the last
/// second's counts of the killed node.)
#[tokio::test]
async fn a_killed_node_loses_no_like_count() {
    let app = crate::helpers::TestApp::spawn().await;
    let env = [
        ("KEEL_CATALOG_URL", app.dbs.catalog_url.clone()),
        ("KEEL_SHARD_URLS", app.dbs.shard_urls.join(",")),
        ("KEEL_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
    ];
    let scratch = scratch_dir("likes-kill");
    let mut b = Keel::start(&["serve"], &env, &scratch.join("b.log"));
    b.wait_ready(Duration::from_secs(30)).await;
    let mut users = Vec::new();
    for i in 0..100 {
        users.push(app.create_user(&format!("kill{i}")).await.1);
    }
    let mut products = Vec::new();
    for i in 0..10 {
        products.push(app.create_product(&format!("KILL-{i}"), 100, 1).await);
    }
    // Likes through node B, each a new (user, product) pair, four at a time, paced, for 4 s.
    let client = reqwest::Client::new();
    let pairs: Vec<(String, String)> =
        users.iter().flat_map(|u| products.iter().map(move |p| (u.clone(), p.clone()))).collect();
    let pairs = std::sync::Arc::new(std::sync::Mutex::new(pairs.into_iter()));
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut likers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (client, pairs, base) = (client.clone(), pairs.clone(), b.address.clone());
        likers.spawn(async move {
            let mut acknowledged = Vec::new();
            while Instant::now() < deadline {
                let Some((user, product)) = pairs.lock().unwrap().next() else { break };
                let like = client.put(format!("{base}/v1/products/{product}/like")).bearer_auth(&user);
                assert_eq!(like.send().await.unwrap().status(), 204);
                acknowledged.push(Instant::now());
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            acknowledged
        });
    }
    let mut acknowledged = Vec::new();
    while let Some(done) = likers.join_next().await {
        acknowledged.extend(done.unwrap());
    }
    b.signal(libc::SIGKILL);
    let killed = Instant::now();
    assert!(!b.wait_exit(Duration::from_secs(10)).await.success());

    let mut in_database = 0;
    for i in 0..crate::helpers::SHARDS {
        in_database +=
            app.dbs.shard(i).await.query_one("SELECT count(*) FROM likes", &[]).await.unwrap().get::<_, i64>(0);
    }
    assert_eq!(in_database, acknowledged.len() as i64, "every acknowledged like is recorded");
    // Node A's view: the shards' tallies, merged every 250 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut counted = 0;
    for product in &products {
        counted += expect_json(app.get(&format!("/v1/products/{product}")).send().await, 200).await["like_count"]
            .as_i64()
            .unwrap();
    }
    let last_second = acknowledged.iter().filter(|at| killed.duration_since(**at) <= Duration::from_secs(1)).count();
    eprintln!("likes: {in_database} acknowledged, {counted} counted after SIGKILL; {last_second} in the last second");
    assert_eq!(counted, in_database, "the kill lost like counts");
    assert!(last_second > 0, "likes were still being taken when the node was killed");
}

/// A terminal's Ctrl-C sends SIGINT to the whole foreground process group. Only `keel up` may act
/// on it: it drains its requests (and the writes of clients that left) and workers, and then
/// stops PostgreSQL, which must not have started shutting down under it (no connection cut while in
/// use, no `FATAL` in PostgreSQL's log), and exits 0.
#[tokio::test]
async fn ctrl_c_to_the_process_group_reaches_keel_up_only() {
    let scratch = scratch_dir("ctrl-c");
    let data_dir = scratch.join("data");
    let data_arg = data_dir.to_str().unwrap().to_owned();
    let log = scratch.join("keel.log");
    let env = [("KEEL_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()), ("KEEL_LISTEN", "127.0.0.1:0".to_owned())];
    let mut command = keel_command(&["up", "--data-dir", &data_arg], &env);
    // A group of its own, as a shell makes for a foreground job.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut keel = Keel::spawn(&mut command, &log);
    keel.wait_ready(Duration::from_secs(60)).await;
    let client = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", keel.address);

    let postgres_pid: i32 = std::fs::read_to_string(data_dir.join("postgres/postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let keel_group = process_group(keel.child.id() as i32);
    assert_eq!(keel_group, keel.child.id() as i32);
    assert_ne!(process_group(postgres_pid), keel_group, "PostgreSQL shares keel's process group");

    let product = client
        .post(url("/v1/products"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "sku": "CTRL-C", "name": "Interrupted", "price_cents": 1, "stock": 1 }))
        .send()
        .await;
    let product = expect_json(product, 201).await["id"].as_str().unwrap().to_owned();
    let mut tokens = Vec::new();
    for i in 0..5 {
        let user = client.post(url("/v1/users")).json(&json!({ "name": "C", "email": format!("ctrl{i}@example.org") }));
        let token = expect_json(user.send().await, 201).await["token"].as_str().unwrap().to_owned();
        let like = client.put(url(&format!("/v1/products/{product}/like"))).bearer_auth(&token).send().await;
        assert_eq!(like.unwrap().status(), 204);
        tokens.push(token);
    }

    // Requests that use the database are in flight when the signal comes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = tokio::task::JoinSet::new();
    for token in tokens.clone() {
        let (client, stop, base) = (client.clone(), stop.clone(), keel.address.clone());
        readers.spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match client.get(format!("{base}/v1/wallet")).bearer_auth(&token).send().await {
                    Ok(response) => statuses.push(response.status().as_u16()),
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
            statuses
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SAFETY: kill has no memory-safety preconditions; a negative pid names a process group.
    unsafe { libc::kill(-keel_group, libc::SIGINT) };
    let status = keel.wait_exit(Duration::from_secs(60)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut statuses = Vec::new();
    while let Some(done) = readers.join_next().await {
        statuses.extend(done.unwrap());
    }
    let text = keel.log_text();
    assert_eq!(status.code(), Some(0), "log:\n{text}");
    assert!(statuses.iter().all(|s| *s == 200), "reads answered during the stop: {statuses:?}");
    assert!(!statuses.is_empty());
    for bad in ["db error", "Connection error", "\"level\":\"ERROR\""] {
        assert!(!text.contains(bad), "keel logged {bad:?} while stopping:\n{text}");
    }
    let postgres = postgres_log(&data_dir);
    assert!(!postgres.contains("FATAL"), "PostgreSQL log:\n{postgres}");
    assert!(postgres.contains("database system is shut down"), "{postgres}");
    // PostgreSQL was asked to stop by keel, after keel was done with it.
    let stopping = text.find("stopping PostgreSQL").expect("keel stops PostgreSQL itself");
    let drained = text.find("draining in-flight requests").expect("keel drains on Ctrl-C");
    assert!(drained < stopping, "{text}");

    // The five likes were counted with their rows: a restart counts them.
    let mut keel = Keel::start(&["up", "--data-dir", &data_arg], &[("KEEL_ADMIN_TOKEN", ADMIN_TOKEN.to_owned())], &log);
    keel.wait_ready(Duration::from_secs(60)).await;
    let read = client.get(format!("{}/v1/products/{product}", keel.address)).send().await;
    assert_eq!(expect_json(read, 200).await["like_count"], 5);
    keel.signal(libc::SIGTERM);
    assert!(keel.wait_exit(Duration::from_secs(60)).await.success());
}

/// The process group of `pid`: the fifth field of `/proc/PID/stat`, after the command in parentheses.
fn process_group(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_command = &stat[stat.rfind(')').unwrap() + 2..];
    after_command.split(' ').nth(2).unwrap().parse().unwrap()
}

/// The cluster of a `keel up` data directory, restarted by `pg_ctl` behind keel's back: the server
/// `pg_ctl` starts is no child of keel's and does not stop with it, so this stops it when dropped.
struct RestartedPostgres {
    pgdata: PathBuf,
    log: PathBuf,
}

impl RestartedPostgres {
    /// `pg_ctl restart -m fast -w`, as the cluster's owner (PostgreSQL refuses to run as root; as
    /// root, `keel up` runs it as an unprivileged user). Blocks until the server is back.
    fn restart(pgdata: &Path, log: &Path) -> RestartedPostgres {
        let restarted = RestartedPostgres { pgdata: pgdata.to_owned(), log: log.to_owned() };
        let (uid, gid) = {
            let meta = std::fs::metadata(pgdata).unwrap();
            (std::os::unix::fs::MetadataExt::uid(&meta), std::os::unix::fs::MetadataExt::gid(&meta))
        };
        // The owner must be able to write the new server's log.
        std::fs::File::create(log).unwrap();
        std::os::unix::fs::chown(log, Some(uid), Some(gid)).unwrap();
        let output = restarted.pg_ctl(&["restart", "-m", "fast", "-w", "-t", "30", "-l"], Some(log)).output().unwrap();
        assert!(
            output.status.success(),
            "pg_ctl restart: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        restarted
    }

    fn pg_ctl(&self, args: &[&str], log: Option<&Path>) -> Command {
        let pg_ctl = keel_pg::Binaries::find().unwrap().path("pg_ctl");
        let mut command = Command::new(pg_ctl);
        command.args(args);
        if let Some(log) = log {
            command.arg(log);
        }
        command.arg("-D").arg(&self.pgdata).current_dir("/").stdin(Stdio::null());
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let meta = std::fs::metadata(&self.pgdata).unwrap();
            std::os::unix::process::CommandExt::uid(&mut command, std::os::unix::fs::MetadataExt::uid(&meta));
            std::os::unix::process::CommandExt::gid(&mut command, std::os::unix::fs::MetadataExt::gid(&meta));
        }
        command
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RestartedPostgres {
    fn drop(&mut self) {
        let _ =
            self.pg_ctl(&["stop", "-m", "immediate", "-w"], None).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

/// The postmaster's pid, from the first line of `postmaster.pid`.
fn postmaster_pid(pgdata: &Path) -> Option<i32> {
    std::fs::read_to_string(pgdata.join("postmaster.pid")).ok()?.lines().next()?.trim().parse().ok()
}

/// PostgreSQL restarted (`pg_ctl restart -m fast`) under `keel up` while users sign up at a steady
/// pace: every sign-up that was acknowledged gets exactly one welcome e-mail, none twice. The e-mail
/// is claimed and its sending recorded in the database that restarts: a record the database cannot
/// take is retried, never answered by sending again.
#[tokio::test]
async fn a_postgres_restart_during_sign_ups_loses_and_repeats_no_welcome_email() {
    let _quiet = crate::helpers::timing_sensitive().await;
    let scratch = scratch_dir("pg-restart-mail");
    let data_dir = scratch.join("data");
    let data_arg = data_dir.to_str().unwrap().to_owned();
    let pgdata = data_dir.join("postgres");
    let port = crate::peers::free_port();
    let smtp = crate::peers::SmtpServer::start(port, &scratch.join("maildir")).await;
    let env = [
        ("KEEL_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ("KEEL_SMTP_URL", format!("smtp://127.0.0.1:{port}")),
        // A job whose outcome could not be written while the server was down runs again once its
        // lease lapses: 15 s, not the default 90 s, so that the test can wait for it.
        ("KEEL_JOB_TIMEOUT", "10s".to_owned()),
    ];
    let mut keel = Keel::start(&["up", "--data-dir", &data_arg], &env, &scratch.join("keel.log"));
    keel.wait_ready(Duration::from_secs(60)).await;
    let first_postmaster = postmaster_pid(&pgdata).expect("keel up's PostgreSQL is running");

    // One sign-up every 25 ms for 8 s, each on its own task so that a stalled one does not hold up
    // the pace; PostgreSQL is restarted 3 s in.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let load_started = Instant::now();
    let mut signups = tokio::task::JoinSet::new();
    let mut restart = None;
    let mut pace = tokio::time::interval(Duration::from_millis(25));
    let mut i = 0;
    while load_started.elapsed() < Duration::from_secs(8) {
        pace.tick().await;
        if restart.is_none() && load_started.elapsed() >= Duration::from_secs(3) {
            let (pgdata, log) = (pgdata.clone(), scratch.join("postgres-restarted.log"));
            restart = Some(tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let restarted = RestartedPostgres::restart(&pgdata, &log);
                (restarted, started.elapsed())
            }));
        }
        let email = format!("restart{i}@example.org");
        let (client, url) = (client.clone(), format!("{}/v1/users", keel.address));
        signups.spawn(async move {
            let response = client.post(url).json(&json!({ "name": "R", "email": email })).send().await;
            let status = response.as_ref().map(|r| r.status().as_u16()).ok();
            (email, status)
        });
        i += 1;
    }
    let (restarted, restart_took) = restart.expect("the restart was started").await.unwrap();
    let (mut acknowledged, mut refused, mut unanswered) = (Vec::new(), Vec::new(), 0);
    while let Some(done) = signups.join_next().await {
        match done.unwrap() {
            (email, Some(201)) => acknowledged.push(email),
            (_, Some(status)) => refused.push(status),
            (_, None) => unanswered += 1,
        }
    }
    let second_postmaster = postmaster_pid(&pgdata);
    eprintln!(
        "{i} sign-ups in {:?}: {} acknowledged, {} refused {:?}, {unanswered} unanswered; PostgreSQL restart took {restart_took:?}",
        load_started.elapsed(),
        acknowledged.len(),
        refused.len(),
        refused.iter().collect::<std::collections::BTreeSet<_>>()
    );
    assert!(
        second_postmaster.is_some_and(|pid| pid != first_postmaster),
        "PostgreSQL was restarted: {second_postmaster:?}, was {first_postmaster}; log:\n{}",
        restarted.log_text()
    );
    assert!(refused.iter().all(|s| *s >= 500), "a sign-up was refused other than by the outage: {refused:?}");
    // Enough taken for the count below to mean something; how many the outage refused depends on how
    // long the restart takes on a loaded machine (0.5–3.5 s seen).
    assert!(acknowledged.len() >= 100, "too few sign-ups were taken: {} of {i}", acknowledged.len());

    // Wait until every acknowledged user's welcome arrived and the database has recorded every
    // e-mail it claimed as sent (none can then be sent again), with no sign-up's job left to run.
    let socket_dir = keel_pg::socket_dir_for(&data_dir.join("run"), 5432);
    let shard_url = |i: usize| format!("host={} port=5432 user=keel dbname=keel_shard_{i}", socket_dir.display());
    let waited = Instant::now();
    let (missing, unrecorded, unfinished) = loop {
        let messages = smtp.messages();
        let welcomed: std::collections::HashSet<&str> = messages
            .iter()
            .filter(|m| m.contains("Subject: Welcome to Keel"))
            .flat_map(|m| acknowledged.iter().filter(|a| m.contains(&format!("<{a}>"))).map(String::as_str))
            .collect();
        let missing = acknowledged.iter().filter(|a| !welcomed.contains(a.as_str())).count();
        let (mut unrecorded, mut unfinished) = (0, 0);
        for shard in 0..crate::helpers::SHARDS {
            let shard = crate::helpers::connect(&shard_url(shard)).await;
            let count = |sql: &'static str| {
                let shard = &shard;
                async move { shard.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
            };
            unrecorded += count("SELECT count(*) FROM email_deliveries WHERE sent_at IS NULL").await;
            unfinished += count(
                "SELECT count(*) FROM keel_jobs WHERE kind = 'user.registered' AND state IN ('pending', 'running')",
            )
            .await;
        }
        if (missing, unrecorded, unfinished) == (0, 0, 0) || waited.elapsed() > Duration::from_secs(45) {
            break (missing, unrecorded, unfinished);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let counts = smtp.message_id_counts();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    let welcomes = smtp.messages().iter().filter(|m| m.contains("Subject: Welcome to Keel")).count();
    let record_retries = keel.log_text().matches("could not record a sent e-mail").count();
    eprintln!(
        "after {:?}: {welcomes} welcome e-mails for {} acknowledged sign-ups; {missing} missing, {duplicates} \
         duplicate(s) by Message-ID; {unrecorded} claimed e-mails not recorded as sent, {unfinished} sign-up jobs \
         unfinished; {record_retries} record(s) retried in the background",
        waited.elapsed(),
        acknowledged.len()
    );
    assert_eq!(missing, 0, "acknowledged sign-ups without a welcome e-mail");
    assert_eq!(duplicates, 0, "e-mails sent twice: {:?}", counts.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>());
    assert_eq!((unrecorded, unfinished), (0, 0), "e-mails still claimed but unrecorded, sign-up jobs unfinished");
    drop(keel);
    drop(restarted);
}

/// One customer of the load in [`a_worker_killed_every_few_seconds_loses_no_email`]: signs up and,
/// if `buys`, deposits (enough, or not for every fifth), fills the cart and checks out.
async fn sign_up_and_buy(client: &reqwest::Client, base: &str, i: usize, product: &str, buys: bool) -> Customer {
    let email = format!("killed{i}@example.org");
    let user = client.post(format!("{base}/v1/users")).json(&json!({ "name": format!("K{i}"), "email": email }));
    let user = expect_json(user.send().await, 201).await;
    let order = if buys {
        let token = user["token"].as_str().unwrap();
        let amount = if i.is_multiple_of(5) { 50 } else { 1_000 };
        let deposit = client.post(format!("{base}/v1/admin/users/{}/deposits", user["id"].as_str().unwrap()));
        let deposit = deposit.bearer_auth(ADMIN_TOKEN);
        let deposit = deposit.header("idempotency-key", "d").json(&json!({ "amount_cents": amount }));
        expect_json(deposit.send().await, 201).await;
        let cart = client.put(format!("{base}/v1/cart/items/{product}")).bearer_auth(token);
        expect_json(cart.json(&json!({ "quantity": 1 })).send().await, 200).await;
        let placed = client.post(format!("{base}/v1/checkout")).bearer_auth(token).header("idempotency-key", "c");
        Some(expect_json(placed.send().await, 202).await["id"].as_str().unwrap().to_owned())
    } else {
        None
    };
    Customer { email, order }
}

struct Customer {
    email: String,
    order: Option<String>,
}

/// A `keel worker` process SIGKILLed every 1–3 s while 300 users sign up and 200 of them check out,
/// and started again at once each time: every user gets a welcome e-mail and every order its
/// receipt or failure notice. What may repeat is only what no sender can know: an e-mail whose SMTP
/// exchange was under way at the kill (the server stored it; the worker died before its answer).
/// So every message sent twice had its first copy stored within moments of a kill — none from a
/// lease that lapsed or a record that waited — and there are no more than the e-mails a worker
/// sends at once, per kill.
#[tokio::test]
async fn a_worker_killed_every_few_seconds_loses_no_email() {
    let _quiet = crate::helpers::timing_sensitive().await;
    const USERS: usize = 300;
    const ORDERS: usize = 200;
    const MAIL_CONCURRENCY: usize = 2;
    let port = crate::peers::free_port();
    let scratch = scratch_dir("killed-worker-mail");
    let smtp = crate::peers::SmtpServer::start(port, &scratch.join("maildir")).await;
    // The app's databases, with their jobs run by the worker processes only (never over NATS).
    let app = crate::helpers::TestApp::spawn_with(|config| config.nats_url = None).await;
    let env = vec![
        ("KEEL_CATALOG_URL", app.dbs.catalog_url.clone()),
        ("KEEL_SHARD_URLS", app.dbs.shard_urls.join(",")),
        ("KEEL_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ("KEEL_SMTP_URL", format!("smtp://127.0.0.1:{port}")),
        // A killed worker's jobs are claimed again 4.5 s after they started.
        ("KEEL_JOB_TIMEOUT", "3s".to_owned()),
        // At most this many SMTP exchanges in flight per worker: what one kill can repeat.
        ("KEEL_MAIL_CONCURRENCY", MAIL_CONCURRENCY.to_string()),
    ];
    let mut api = Keel::start(&["serve"], &env, &scratch.join("api.log"));
    api.wait_ready(Duration::from_secs(30)).await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let product = client
        .post(format!("{}/v1/products", api.address))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "sku": "MAILKILL", "name": "Mail kill", "price_cents": 100, "stock": 1_000 }))
        .send()
        .await;
    let product = expect_json(product, 201).await["id"].as_str().unwrap().to_owned();

    // Four customers at a time, each pausing 200 ms between customers; two of every three users buy.
    let worker_log = scratch.join("worker.log");
    let mut worker = Keel::start(&["worker"], &env, &worker_log);
    let load_started = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (client, base, product, next) = (client.clone(), api.address.clone(), product.clone(), next.clone());
        load.spawn(async move {
            let mut customers = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= USERS {
                    break customers;
                }
                customers.push(sign_up_and_buy(&client, &base, i, &product, i % 3 != 2).await);
                // Paced: the load lasts long enough (about 15 s) for several kills.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
    let load = tokio::spawn(async move {
        let mut customers = Vec::new();
        while let Some(done) = load.join_next().await {
            customers.extend(done.unwrap());
        }
        customers
    });
    let mut kills = Vec::new();
    while !load.is_finished() {
        tokio::time::sleep(Duration::from_secs(1) + keel_random::up_to(Duration::from_secs(2))).await;
        worker.signal(libc::SIGKILL);
        kills.push(std::time::SystemTime::now());
        assert!(!worker.wait_exit(Duration::from_secs(10)).await.success());
        worker = Keel::start(&["worker"], &env, &worker_log);
    }
    let customers = load.await.unwrap();
    let load_took = load_started.elapsed();
    let orders: Vec<&str> = customers.iter().filter_map(|c| c.order.as_deref()).collect();
    assert_eq!((customers.len(), orders.len()), (USERS, ORDERS));
    eprintln!("{USERS} sign-ups and {ORDERS} checkouts in {load_took:?}, the worker SIGKILLed {} times", kills.len());
    assert!(kills.len() >= 5, "the worker was killed during the load {} times", kills.len());

    // The last worker runs on. Wait for every e-mail and for every job to be done: a worker killed
    // holding an e-mail's claim leaves it to lapse (30 s) before another may send it, and only then
    // is an e-mail that a killed worker sent but did not record sent again.
    let waited = Instant::now();
    let (missing_welcomes, missing_order_mails, unfinished) = loop {
        let messages = smtp.messages();
        let mut welcomed = std::collections::HashSet::new();
        let mut told = std::collections::HashSet::new();
        for message in &messages {
            let Some(at) = message.find("<killed") else { continue };
            let address = &message[at + 1..at + message[at..].find('>').unwrap_or(1)];
            if message.contains("Subject: Welcome to Keel") {
                welcomed.insert(address.to_owned());
            } else if let Some(order) = orders.iter().find(|o| message.contains(**o)) {
                told.insert(*order);
            }
        }
        let missing_welcomes = customers.iter().filter(|c| !welcomed.contains(&c.email)).count();
        let missing_order_mails = orders.iter().filter(|o| !told.contains(*o)).count();
        let mut unfinished = 0;
        for url in std::iter::once(&app.dbs.catalog_url).chain(&app.dbs.shard_urls) {
            let db = crate::helpers::connect(url).await;
            let sql = "SELECT count(*) FROM keel_jobs WHERE state IN ('pending', 'running')";
            unfinished += db.query_one(sql, &[]).await.unwrap().get::<_, i64>(0);
        }
        let done = (missing_welcomes, missing_order_mails, unfinished) == (0, 0, 0);
        if done || waited.elapsed() > Duration::from_secs(80) {
            break (missing_welcomes, missing_order_mails, unfinished);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let drained_in = waited.elapsed();
    let (mut pending, mut unrecorded) = (0, 0);
    for i in 0..crate::helpers::SHARDS {
        let shard = app.dbs.shard(i).await;
        let count = |sql: &'static str| {
            let shard = &shard;
            async move { shard.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
        };
        pending += count("SELECT count(*) FROM orders WHERE status = 'pending'").await;
        unrecorded += count("SELECT count(*) FROM email_deliveries WHERE sent_at IS NULL").await;
    }
    let arrivals = smtp.messages_with_arrival();
    let counts = smtp.message_id_counts();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    let receipts = arrivals.iter().filter(|(_, m)| m.contains("Subject: Receipt for order")).count();
    eprintln!(
        "drained {drained_in:?} after the load: {} messages ({receipts} receipts), {} distinct; {missing_welcomes} \
         welcomes and {missing_order_mails} order e-mails missing; {duplicates} duplicate(s); {unfinished} jobs \
         unfinished; {unrecorded} e-mails claimed but not recorded as sent; {pending} orders pending",
        arrivals.len(),
        counts.len()
    );
    // For each message sent twice: when its first copy reached the server, from the nearest kill.
    let mut first_copies: Vec<(String, std::time::SystemTime)> = Vec::new();
    let mut repeated_per_kill = vec![0; kills.len()];
    for (id, _) in counts.iter().filter(|(_, n)| **n > 1) {
        let first = arrivals.iter().filter(|(_, m)| m.contains(id.as_str())).map(|(at, _)| *at).min().unwrap();
        first_copies.push((id.clone(), first));
    }
    first_copies.sort_by_key(|(_, at)| *at);
    for (id, first) in &first_copies {
        let (nearest, from_kill) = kills
            .iter()
            .map(|kill| match first.duration_since(*kill) {
                Ok(after) => after.as_secs_f64() * 1000.0,
                Err(before) => -before.duration().as_secs_f64() * 1000.0,
            })
            .enumerate()
            .min_by(|(_, a), (_, b)| a.abs().total_cmp(&b.abs()))
            .unwrap();
        repeated_per_kill[nearest] += 1;
        eprintln!("  sent twice: {id}, first copy stored {from_kill:+.0} ms from the nearest kill");
        // Stored before the kill: the worker had the server's answer and died before its record
        // committed. On a loaded machine (a whole `make test` beside it) that commit has trailed the
        // answer by 133 ms, so the window reaches 250 ms back: still a small part of the seconds
        // between kills, so a copy from a lapsed lease or a record that waited longer falls outside.
        assert!(
            (-250.0..=500.0).contains(&from_kill),
            "{id} was sent twice, its first copy stored {from_kill:+.0} ms from the nearest kill: not in flight at a kill"
        );
    }
    assert_eq!((missing_welcomes, missing_order_mails), (0, 0), "e-mails lost: (welcomes, order e-mails)");
    assert_eq!(pending, 0, "orders left pending");
    app.check_queues_drained().await;
    assert_eq!(unrecorded, 0, "e-mails claimed but never recorded as sent");
    assert_eq!(counts.len(), USERS + ORDERS, "one distinct message per event");
    // No kill repeats more e-mails than the worker hands to the mail server at once.
    eprintln!("e-mails repeated per kill: {repeated_per_kill:?}");
    assert!(
        repeated_per_kill.iter().all(|n| *n <= MAIL_CONCURRENCY),
        "a kill repeated more than the {MAIL_CONCURRENCY} e-mails in flight: {repeated_per_kill:?}"
    );
    app.check_invariants().await;
    for node in [&mut api, &mut worker] {
        node.signal(libc::SIGTERM);
        assert!(node.wait_exit(Duration::from_secs(30)).await.success());
    }
}

/// One answer a client of [`a_postgres_restart_under_load_loses_no_accepted_write_and_reads_see_a_brief_burst`]
/// got: when it came, from the start of the load, its status (`None`: no answer at all) and its
/// `Retry-After`.
#[derive(Debug)]
struct Answer {
    at: Duration,
    status: Option<u16>,
    retry_after: Option<String>,
}

impl Answer {
    fn of(started: Instant, response: &reqwest::Result<reqwest::Response>) -> Answer {
        let status = response.as_ref().ok().map(|r| r.status().as_u16());
        let retry_after = response.as_ref().ok().and_then(|r| r.headers().get("retry-after")?.to_str().ok());
        Answer { at: started.elapsed(), status, retry_after: retry_after.map(str::to_owned) }
    }

    /// How long a well-behaved client waits before trying again after this answer.
    fn wait(&self) -> Duration {
        let seconds = self.retry_after.as_deref().and_then(|s| s.parse().ok()).unwrap_or(0);
        Duration::from_secs(seconds).max(Duration::from_millis(50))
    }
}

/// PostgreSQL restarted (`pg_ctl restart -m fast`) under `keel up` while clients write and read:
///
/// - every write acknowledged (2xx) is there afterwards: deposits made with an `Idempotency-Key` by a
///   client that retries each on a 503 with the same key after its `Retry-After` (so each ends
///   acknowledged, and each is credited once), and sign-ups that are not retried;
/// - every 503 carries `Retry-After: 1`, and every 503 any client sees falls within the restart;
/// - a read client that honours `Retry-After` sees at most one 503 per second of the restart, plus one
///   (measured: 1 in a 0.4–0.5 s restart; without `Retry-After` such a client saw 12 in 0.8 s); one that
///   ignores it, reading as fast as it can, sees a burst of 40–80 in the restart's 0.3 s (each answered
///   at once: the pool cannot make a connection while the server is away). A read whose connection
///   died under it is run once more (`keel_http_reads_retried_total`, printed); during a restart that
///   is rare, since the pool drops the connections the server closed before a request can use them.
#[tokio::test]
async fn a_postgres_restart_under_load_loses_no_accepted_write_and_reads_see_a_brief_burst() {
    let _quiet = crate::helpers::timing_sensitive().await;
    const LOAD: Duration = Duration::from_secs(8);
    const RESTART_AT: Duration = Duration::from_secs(3);
    let scratch = scratch_dir("pg-restart-load");
    let data_dir = scratch.join("data");
    let data_arg = data_dir.to_str().unwrap().to_owned();
    let pgdata = data_dir.join("postgres");
    let env = [("KEEL_ADMIN_TOKEN", ADMIN_TOKEN.to_owned())];
    let mut keel = Keel::start(&["up", "--data-dir", &data_arg], &env, &scratch.join("keel.log"));
    keel.wait_ready(Duration::from_secs(60)).await;
    let first_postmaster = postmaster_pid(&pgdata).expect("keel up's PostgreSQL is running");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let base = keel.address.clone();
    let product = client.post(format!("{base}/v1/products")).bearer_auth(ADMIN_TOKEN);
    let product = product.json(&json!({ "sku": "RESTART", "name": "Restart", "price_cents": 100, "stock": 10 }));
    let product = expect_json(product.send().await, 201).await["id"].as_str().unwrap().to_owned();
    let user = client.post(format!("{base}/v1/users")).json(&json!({ "name": "D", "email": "depositor@example.org" }));
    let user = expect_json(user.send().await, 201).await;
    let (user_id, token) = (user["id"].as_str().unwrap().to_owned(), user["token"].as_str().unwrap().to_owned());

    let started = Instant::now();
    // Deposits, one after another, each retried with its key after a 503 until it is acknowledged.
    let deposits = {
        let (client, url) = (client.clone(), format!("{base}/v1/admin/users/{user_id}/deposits"));
        tokio::spawn(async move {
            let (mut acknowledged, mut answers) = (Vec::new(), Vec::new());
            let mut i = 0i64;
            while started.elapsed() < LOAD {
                let (key, amount) = (format!("restart-{i}"), i + 1);
                let mut tries = 0;
                let deposit_id = loop {
                    tries += 1;
                    assert!(tries <= 30, "deposit {key} still not acknowledged after {tries} tries: {answers:?}");
                    let request = client.post(&url).bearer_auth(ADMIN_TOKEN).header("idempotency-key", &key);
                    let response = request.json(&json!({ "amount_cents": amount })).send().await;
                    let answer = Answer::of(started, &response);
                    match response {
                        Ok(r) if r.status() == 201 => break r.json::<Value>().await.unwrap()["deposit_id"].clone(),
                        Ok(r) if r.status() != 503 => {
                            panic!("deposit {key}: {} {}", r.status(), r.text().await.unwrap())
                        }
                        _ => {}
                    }
                    let wait = answer.wait();
                    answers.push(answer);
                    tokio::time::sleep(wait).await;
                };
                acknowledged.push((deposit_id.as_str().unwrap().parse::<uuid::Uuid>().unwrap(), amount));
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (acknowledged, answers)
        })
    };
    // Sign-ups, one every 25 ms on a task of its own, not retried.
    let signups = {
        let (client, url) = (client.clone(), format!("{base}/v1/users"));
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            let mut pace = tokio::time::interval(Duration::from_millis(25));
            let mut i = 0;
            while started.elapsed() < LOAD {
                pace.tick().await;
                let (client, url) = (client.clone(), url.clone());
                tasks.spawn(async move {
                    let body = json!({ "name": "R", "email": format!("load{i}@example.org") });
                    let response = client.post(url).json(&body).send().await;
                    let answer = Answer::of(started, &response);
                    let id = match response {
                        Ok(r) if r.status() == 201 => {
                            Some(r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned())
                        }
                        _ => None,
                    };
                    (answer, id)
                });
                i += 1;
            }
            tasks.join_all().await
        })
    };
    // One read client that honours Retry-After, and one that does not: the catalogue and a shard.
    let reader = |honours_retry_after: bool| {
        let (client, token) = (client.clone(), token.clone());
        let urls = [format!("{base}/v1/products/{product}/inventory"), format!("{base}/v1/wallet")];
        tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut i = 0;
            while started.elapsed() < LOAD {
                let response = client.get(&urls[i % 2]).bearer_auth(&token).send().await;
                let answer = Answer::of(started, &response);
                let wait = if answer.status == Some(503) && honours_retry_after {
                    answer.wait()
                } else {
                    Duration::from_millis(2)
                };
                answers.push(answer);
                tokio::time::sleep(wait).await;
                i += 1;
            }
            answers
        })
    };
    let (polite, impatient) = (reader(true), reader(false));
    tokio::time::sleep(RESTART_AT).await;
    let restart = {
        let (pgdata, log) = (pgdata.clone(), scratch.join("postgres-restarted.log"));
        tokio::task::spawn_blocking(move || {
            let from = started.elapsed();
            let restarted = RestartedPostgres::restart(&pgdata, &log);
            (restarted, from, started.elapsed())
        })
    };
    let (restarted, restart_from, restart_to) = restart.await.unwrap();
    let (acknowledged, deposit_answers) = deposits.await.unwrap();
    let signups = signups.await.unwrap();
    let (polite, impatient) = (polite.await.unwrap(), impatient.await.unwrap());
    let second_postmaster = postmaster_pid(&pgdata);
    assert!(
        second_postmaster.is_some_and(|pid| pid != first_postmaster),
        "PostgreSQL was restarted: {second_postmaster:?}, was {first_postmaster}; log:\n{}",
        restarted.log_text()
    );

    // What each client saw.
    let unavailable = |answers: &[&Answer]| -> Vec<Duration> {
        answers.iter().filter(|a| a.status == Some(503)).map(|a| a.at).collect()
    };
    let window = |at: &[Duration]| match (at.first(), at.last()) {
        (Some(first), Some(last)) => format!("{} in {:?}..{:?}", at.len(), first, last),
        _ => "none".to_owned(),
    };
    let polite_503 = unavailable(&polite.iter().collect::<Vec<_>>());
    let impatient_503 = unavailable(&impatient.iter().collect::<Vec<_>>());
    let signup_answers: Vec<&Answer> = signups.iter().map(|(a, _)| a).collect();
    let signup_503 = unavailable(&signup_answers);
    let log = keel.log_text();
    let retried_reads = log.matches("a read lost its database connection").count();
    // Why the 503s were answered: no connection could be made (the server away), or one died mid-request.
    let (refused, lost) =
        (log.matches("database unavailable").count(), log.matches("database connection lost").count());
    let metrics = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let retried_metric: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keel_http_reads_retried_total")?.trim().rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    eprintln!(
        "PostgreSQL restarted from {restart_from:?} to {restart_to:?} ({:?}); 503s seen: polite reader {} of {} \
         reads, impatient reader {} of {}, depositor {} ({} deposits acknowledged), sign-ups {} of {} ({} \
         acknowledged); reads run once more: {retried_reads} (metric {retried_metric}); 503s for want of a new \
         connection {refused}, for a connection that died {lost}",
        restart_to - restart_from,
        window(&polite_503),
        polite.len(),
        window(&impatient_503),
        impatient.len(),
        deposit_answers.len(),
        acknowledged.len(),
        window(&signup_503),
        signups.len(),
        signups.iter().filter(|(_, id)| id.is_some()).count(),
    );

    // Nothing but the restart refused anything, and every refusal said when to come back.
    let every: Vec<&Answer> =
        polite.iter().chain(&impatient).chain(&deposit_answers).chain(signup_answers.iter().copied()).collect();
    let odd: Vec<&&Answer> = every.iter().filter(|a| a.status.is_some_and(|s| s >= 300 && s != 503)).collect();
    assert!(odd.is_empty(), "answers other than a success or a 503: {odd:?}");
    let unanswered = every.iter().filter(|a| a.status.is_none()).count();
    assert_eq!(unanswered, 0, "requests not answered at all");
    let without_retry_after: Vec<&&Answer> =
        every.iter().filter(|a| a.status == Some(503) && a.retry_after.as_deref() != Some("1")).collect();
    assert!(
        without_retry_after.is_empty(),
        "{} 503s without Retry-After: 1, the first {:?}",
        without_retry_after.len(),
        without_retry_after.first()
    );
    // Every 503 falls within the restart: from when it began to just after pg_ctl saw the server
    // back (an answer on its way then, or a request that had found every connection dead).
    let slack = Duration::from_millis(500);
    let outside: Vec<&&Answer> =
        every.iter().filter(|a| a.status == Some(503) && (a.at < restart_from || a.at > restart_to + slack)).collect();
    assert!(
        outside.is_empty(),
        "{} 503s outside the restart ({restart_from:?}..{restart_to:?}), the first {:?}",
        outside.len(),
        outside.first()
    );
    // A client that honours Retry-After sees at most one 503 per second of the restart, and one more:
    // a brief burst, not one per request it can make while the server is away.
    let bound = (restart_to - restart_from).as_secs() as usize + 2;
    assert!(
        polite_503.len() <= bound,
        "a read client honouring Retry-After saw {} 503s during a restart of {:?}",
        polite_503.len(),
        restart_to - restart_from
    );
    // The load went on around the restart: answers before and after it, for every client.
    for (name, answers) in [("polite", &polite), ("impatient", &impatient)] {
        assert!(answers.iter().any(|a| a.status == Some(200) && a.at < restart_from), "{name}: no read before");
        assert!(answers.iter().any(|a| a.status == Some(200) && a.at > restart_to + slack), "{name}: none after");
    }
    assert!(acknowledged.len() >= 50, "too few deposits were made: {}", acknowledged.len());

    // Zero accepted writes lost: every acknowledged deposit is on the user's shard, once, and nothing
    // else is; every acknowledged sign-up's user exists.
    let socket_dir = keel_pg::socket_dir_for(&data_dir.join("run"), 5432);
    let shard_url = |i: usize| format!("host={} port=5432 user=keel dbname=keel_shard_{i}", socket_dir.display());
    let user_uuid: uuid::Uuid = user_id.parse().unwrap();
    let (mut stored, mut balance, mut users) = (Vec::new(), 0i64, std::collections::HashSet::new());
    for i in 0..crate::helpers::SHARDS {
        let shard = crate::helpers::connect(&shard_url(i)).await;
        let rows = shard.query("SELECT id, amount_cents FROM wallet_deposits WHERE user_id = $1", &[&user_uuid]).await;
        stored.extend(rows.unwrap().iter().map(|r| (r.get::<_, uuid::Uuid>(0), r.get::<_, i64>(1))));
        let wallet = shard.query_opt("SELECT balance_cents FROM wallets WHERE user_id = $1", &[&user_uuid]).await;
        balance += wallet.unwrap().map_or(0, |r| r.get::<_, i64>(0));
        let rows = shard.query("SELECT id::text FROM users", &[]).await.unwrap();
        users.extend(rows.iter().map(|r| r.get::<_, String>(0)));
    }
    stored.sort();
    let mut expected = acknowledged.clone();
    expected.sort();
    assert_eq!(stored, expected, "the deposits stored are exactly those acknowledged, once each");
    assert_eq!(balance, acknowledged.iter().map(|(_, amount)| amount).sum::<i64>(), "the balance is their sum");
    let lost: Vec<&String> =
        signups.iter().filter_map(|(_, id)| id.as_ref()).filter(|id| !users.contains(*id)).collect();
    assert!(lost.is_empty(), "acknowledged sign-ups lost: {lost:?}");
    drop(keel);
    drop(restarted);
}
