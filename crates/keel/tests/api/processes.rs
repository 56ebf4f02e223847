//! `keel` run as a real process: `keel up` over its own cluster, and `keel migrate` with two
//! `keel serve` nodes sharing external databases.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{expect_json, TestDatabases, ADMIN_TOKEN};

struct Keel {
    child: Child,
    address: String,
    log: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn keel_command(args: &[&str], env: &[(&str, String)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
    command.args(args);
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEEL_")) {
        command.env_remove(key);
    }
    command.env("KEEL_LOG", "info");
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

impl Keel {
    fn start(args: &[&str], env: &[(&str, String)], log: &Path) -> Keel {
        let port = free_port();
        let mut env = env.to_vec();
        env.push(("KEEL_LISTEN", format!("127.0.0.1:{port}")));
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = keel_command(args, &env).stdout(Stdio::null()).stderr(log_file).spawn().unwrap();
        Keel { child, address: format!("http://127.0.0.1:{port}"), log: log.to_owned() }
    }

    /// Polls `/readyz` until 200; returns how long that took.
    async fn wait_ready(&mut self, within: Duration) -> Duration {
        let started = Instant::now();
        let client = reqwest::Client::new();
        loop {
            if let Ok(response) = client.get(format!("{}/readyz", self.address)).send().await {
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

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < within, "keel did not exit within {within:?}; log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Keel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keel-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
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

    let before_restart = postgres_log(&data_dir).len();
    let mut keel = Keel::start(&["up", "--data-dir", &data_arg], &[], &log);
    keel.wait_ready(Duration::from_secs(30)).await;
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
    let _ = std::fs::remove_dir_all(&scratch);
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
    let _ = std::fs::remove_dir_all(&scratch);
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
    let _ = std::fs::remove_dir_all(&scratch);
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
    let _ = std::fs::remove_dir_all(&scratch);
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
    let _ = std::fs::remove_dir_all(&scratch);
}
