//! Starting what the scenarios measure: `keel up` from a given binary over a fresh data directory,
//! the baseline service, and the seed data (users with money and carts, products with stock).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";

/// A child process killed when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; SIGTERM lets keel stop its cluster.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Keel {
    /// Held so that dropping the `Keel` stops it.
    _process: Process,
    pub base: String,
    pub data_dir: PathBuf,
}

impl Keel {
    pub async fn start(binary: &Path, data_dir: &Path) -> Keel {
        Keel::start_with(binary, data_dir, &[]).await
    }

    /// With extra environment, e.g. `KEEL_NATS_URL`.
    pub async fn start_with(binary: &Path, data_dir: &Path, env: &[(&str, String)]) -> Keel {
        let _ = std::fs::remove_dir_all(data_dir);
        std::fs::create_dir_all(data_dir).unwrap();
        let port = free_port();
        let child = Command::new(binary)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(["up", "--data-dir"])
            .arg(data_dir.join("data"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("KEEL_LOG", "warn")
            // A benchmark is one client sending as fast as it can: what it measures is not the limits.
            .env("KEEL_RATE_LIMIT", "off")
            .env("KEEL_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("KEEL_DB_POOL_SIZE", "32")
            // The scenarios read and drain keel_shard_0 and keel_shard_1: not a count from the
            // caller's environment or keel.toml.
            .env("KEEL_SHARDS", "2")
            // The scenarios use the access tokens the seed's sign-ups answered, up to the end of the
            // run: a whole `make bench` takes longer than the default lifetime (15 min).
            .env("KEEL_ACCESS_TOKEN_TTL", "4h")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(data_dir.join("keel.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let keel =
            Keel { _process: Process(child), base: format!("http://127.0.0.1:{port}"), data_dir: data_dir.to_owned() };
        wait_ready(&format!("{}/readyz", keel.base)).await;
        keel
    }

    /// A libpq connection string for one of keel up's databases.
    pub fn db_url(&self, database: &str) -> String {
        format!("host={} port=5432 user=keel dbname={database}", self.data_dir.join("data/run").display())
    }
}

pub async fn wait_ready(url: &str) {
    let client = reqwest::Client::new();
    let started = Instant::now();
    while !client.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
        assert!(started.elapsed() < Duration::from_secs(60), "{url} not ready within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the scenarios read and write.
pub struct Seed {
    pub users: Vec<(String, String)>, // (id, access token)
    pub products: Vec<String>,
    /// (e-mail, password) of the users that have a password: the first ones of `users`.
    pub accounts: Vec<(String, String)>,
}

/// The password of the `i`th seeded user: long, and not made of their name or address alone, so
/// that Keel's policy (8 characters or more, not guessable) accepts it.
pub fn password(i: usize) -> String {
    format!("bench-{i}-correct-horse-battery")
}

/// Creates `n` products and `n` users, each with money and, in the cart, one unit of a product that
/// is sold out: every checkout is accepted and its saga ends `out_of_stock`, so the cart stays full
/// and each user can check out again and again. The first `with_password` users sign up with a
/// password ([`password`]); the others without (a password costs a hash at sign-up: tens of
/// milliseconds of CPU each).
/// Creates a product as the admin; returns its id.
pub async fn create_product(client: &reqwest::Client, base: &str, body: &Value) -> String {
    let created: Value = client
        .post(format!("{base}/v1/products"))
        .bearer_auth(ADMIN_TOKEN)
        .json(body)
        .send()
        .await
        .expect("creating a product")
        .json()
        .await
        .expect("a created product is JSON");
    created["id"].as_str().unwrap_or_else(|| panic!("creating a product answered {created}")).to_owned()
}

pub async fn seed(base: &str, n: usize, with_password: usize) -> Seed {
    let client = reqwest::Client::new();
    let sold_out = json!({ "sku": "SOLD-OUT", "name": "Sold out", "price_cents": 100, "stock": 0 });
    let sold_out = create_product(&client, base, &sold_out).await;
    let products = run_many(n, 32, |i| {
        let (client, base) = (client.clone(), base.to_owned());
        async move {
            let body = json!({ "sku": format!("SKU-{i}"), "name": format!("Product {i}"),
                "description": "A product used by the benchmark", "price_cents": 100 + i as i64, "stock": 1_000_000_000 });
            create_product(&client, &base, &body).await
        }
    })
    .await;
    let users = run_many(n, 32, |i| {
        let (client, base, product) = (client.clone(), base.to_owned(), sold_out.clone());
        async move {
            let mut body = json!({ "name": format!("User {i}"), "email": email(i), "bio": "benchmark" });
            if i < with_password {
                body["password"] = json!(password(i));
            }
            let response = client.post(format!("{base}/v1/users")).json(&body).send().await.unwrap();
            let status = response.status();
            let user: Value = response.json().await.unwrap_or_default();
            assert!(status.is_success(), "signing up seeded user {i}: {status} {user}");
            // `token` is the deprecated name of `access_token`, kept for Keel builds from before sessions.
            let token = user["access_token"].as_str().or(user["token"].as_str()).expect("an access token");
            let (id, token) = (user["id"].as_str().unwrap().to_owned(), token.to_owned());
            // Enough for every checkout the benchmark can make (credited by the admin: users cannot),
            // and one item in the cart.
            client
                .post(format!("{base}/v1/admin/users/{id}/deposits"))
                .bearer_auth(ADMIN_TOKEN)
                .header("idempotency-key", "seed")
                .json(&json!({ "amount_cents": 10_000_000_000_i64 }))
                .send()
                .await
                .unwrap();
            client
                .put(format!("{base}/v1/cart/items/{product}"))
                .bearer_auth(&token)
                .json(&json!({ "quantity": 1 }))
                .send()
                .await
                .unwrap();
            (id, token)
        }
    })
    .await;
    let accounts = (0..with_password.min(n)).map(|i| (email(i), password(i))).collect();
    Seed { users, products, accounts }
}

fn email(i: usize) -> String {
    format!("user{i}@bench.example")
}

/// Marks every user's e-mail address verified, as entering the code e-mailed to it would: a checkout
/// needs a verified address (`KEEL_CHECKOUT_REQUIRES_VERIFIED_EMAIL`, on by default), and fetching
/// codes from mail is no part of what the scenarios measure. Checkouts still make the check: the
/// flag is read with the owner's row they lock anyway.
pub async fn verify_emails(keel: &Keel) {
    for database in ["keel_shard_0", "keel_shard_1"] {
        let client = crate::scenarios::connect(&keel.db_url(database)).await;
        client
            .execute("UPDATE users SET email_verified_at = now() WHERE email_verified_at IS NULL", &[])
            .await
            .unwrap_or_else(|e| panic!("marking the seeded users' addresses verified in {database}: {e}"));
    }
}

/// Runs `make(i)` for every `i` in `0..n`, `concurrency` at a time; their values in order.
pub async fn run_many<T: Send + 'static, F, Fut>(n: usize, concurrency: usize, make: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let mut results: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let mut running = tokio::task::JoinSet::new();
    for i in 0..n {
        if running.len() >= concurrency {
            let (j, value) = running.join_next().await.unwrap().unwrap();
            results[j] = Some(value);
        }
        let work = make(i);
        running.spawn(async move { (i, work.await) });
    }
    while let Some(done) = running.join_next().await {
        let (j, value) = done.unwrap();
        results[j] = Some(value);
    }
    results.into_iter().map(Option::unwrap).collect()
}
