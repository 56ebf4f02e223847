//! `keel up --shards N`: a new data directory gets N user shards and users are spread over all of
//! them; an existing one keeps the shards it has whatever is asked, and says so.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{connect, expect_json};
use crate::processes::{scratch_dir, Keel};

const PASSWORD: &str = "correct horse battery staple";
const USERS: usize = 40;

/// The `keel_shard_<i>` databases of the cluster, in order.
async fn shard_databases(maintenance: &str) -> Vec<String> {
    let client = connect(maintenance).await;
    let rows = client
        .query("SELECT datname::text FROM pg_database WHERE datname LIKE 'keel\\_shard\\_%' ORDER BY 1", &[])
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// One keel up for both checks: the first start is the expensive part (initdb, five databases
/// migrated), so the restart reuses its data directory.
#[tokio::test]
async fn keel_up_creates_the_shards_asked_for_and_an_existing_directory_keeps_its_own() {
    let started = Instant::now();
    let scratch = scratch_dir("up-shards");
    let data_dir = scratch.join("data");
    let data_arg = data_dir.to_str().unwrap().to_owned();
    let log = scratch.join("keel.log");
    let client = reqwest::Client::new();
    // keel up's sockets are in DATA_DIR/run (or a shorter path if that is too long for a socket).
    let socket_dir = keel_pg::socket_dir_for(&data_dir.join("run"), 5432);
    let url = |db: &str| format!("host={} port=5432 user=keel dbname={db}", socket_dir.display());

    let mut keel = Keel::start(&["up", "--data-dir", &data_arg, "--shards", "4"], &[], &log);
    let first_start = keel.wait_ready(Duration::from_secs(60)).await;
    let shards: Vec<String> = (0..4).map(|i| format!("keel_shard_{i}")).collect();
    assert_eq!(shard_databases(&url("postgres")).await, shards);

    // Sign-ups at once; the first with a password, to sign in with after the restart.
    let mut signups = tokio::task::JoinSet::new();
    for i in 0..USERS {
        let (client, base) = (client.clone(), keel.address.clone());
        signups.spawn(async move {
            let email = format!("spread{i}@example.org");
            let mut body = json!({ "name": format!("S{i}"), "email": email });
            if i == 0 {
                body["password"] = json!(PASSWORD);
            }
            expect_json(client.post(format!("{base}/v1/users")).json(&body).send().await, 201).await
        });
    }
    let mut users: Vec<Value> = Vec::new();
    while let Some(user) = signups.join_next().await {
        users.push(user.unwrap());
    }

    // Each user is on the shard the initial, uniform map gives its bucket, and every shard has some.
    let mut per_shard = [0i64; 4];
    for (i, db) in shards.iter().enumerate() {
        let shard = connect(&url(db)).await;
        per_shard[i] = shard.query_one("SELECT count(*) FROM users", &[]).await.unwrap().get(0);
        for user in &users {
            let id = user["id"].as_str().unwrap();
            if usize::from(keel_shard::Bucket::of(id.as_bytes()).index()) % 4 == i {
                let uuid = uuid::Uuid::parse_str(id).unwrap();
                let found = shard.query_opt("SELECT 1 FROM users WHERE id = $1", &[&uuid]).await.unwrap();
                assert!(found.is_some(), "user {id} is not on {db}");
            }
        }
    }
    assert!(per_shard.iter().all(|n| *n >= 1), "every shard holds users: {per_shard:?}");
    assert_eq!(per_shard.iter().sum::<i64>(), USERS as i64, "{per_shard:?}");

    keel.signal(libc::SIGTERM);
    assert!(keel.wait_exit(Duration::from_secs(60)).await.success(), "log:\n{}", keel.log_text());

    // Asked for 3 on a directory with 4: it starts with its 4, and says why the 3 was not applied.
    let before_restart = keel.log_text().len();
    let mut keel = Keel::start(&["up", "--data-dir", &data_arg, "--shards", "3"], &[], &log);
    let restart = keel.wait_ready(Duration::from_secs(60)).await;
    let restart_log = keel.log_text()[before_restart..].to_owned();
    assert!(
        restart_log.contains("this data directory has 4 shards; --shards 3")
            && restart_log.contains("applies only to a new data directory")
            && restart_log.contains("POST /v1/admin/shards"),
        "no warning that --shards 3 was not applied; log:\n{restart_log}"
    );
    assert_eq!(shard_databases(&url("postgres")).await, shards);

    // Every user is still served, wherever they live, and the one with a password can sign in.
    for user in &users {
        let (id, token) = (user["id"].as_str().unwrap(), user["access_token"].as_str().unwrap());
        let profile = client.get(format!("{}/v1/users/{id}", keel.address)).bearer_auth(token).send().await;
        let profile = expect_json(profile, 200).await;
        assert_eq!(profile["id"], id);
    }
    let credentials = json!({ "email": "spread0@example.org", "password": PASSWORD });
    let session = client.post(format!("{}/v1/sessions", keel.address)).json(&credentials).send().await;
    expect_json(session, 201).await;

    keel.signal(libc::SIGTERM);
    assert!(keel.wait_exit(Duration::from_secs(60)).await.success(), "log:\n{}", keel.log_text());
    eprintln!(
        "keel up --shards 4: first start ready in {first_start:?}, restart with --shards 3 in {restart:?}; \
         {per_shard:?} users per shard; {:?} in all",
        started.elapsed()
    );
}

/// PostgreSQL's default `max_connections`: the most connections the `keel up` process may hold to
/// its cluster at any moment, with 100 shards.
const HELD_AT_MOST: i64 = 100;

/// The session and like count budgets (`crate::consistency`): how soon a revocation, or a like,
/// made elsewhere must be known here.
const SESSION_BUDGET: Duration = Duration::from_secs(5);
const LIKES_BUDGET: Duration = Duration::from_secs(2);

/// How often [`ConnectionSampler`] looks at `pg_stat_activity`.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// What the test is doing, for the sampler to say when each peak was seen.
const PHASES: [&str; 5] = ["starting", "sign-ups", "stats", "idle", "stopping"];

/// The test's own connections, left out of the counts.
const TEST_APPLICATION: &str = "keel-test";

/// What the `keel up` process's backends were doing: `(database, state, what, count)`, `what`
/// being `probe` (a health watchdog's: its last statement was `SELECT 1`), `listen`, `mover lock`
/// or `pooled` (any other).
type Breakdown = Vec<(String, String, String, i64)>;

/// The highest count of the `keel up` process's backends seen in one phase, and what they were then.
#[derive(Debug, Default, Clone)]
struct Peak {
    connections: i64,
    breakdown: Breakdown,
    /// Connections opened to the cluster in the phase (`pg_stat_database.sessions`), per second.
    opened_per_second: f64,
}

/// The cluster's count of connections ever opened, when a phase was first and last sampled.
#[derive(Clone, Copy)]
struct Opened {
    first: (i64, Instant),
    last: (i64, Instant),
}

/// Counts the `keel up` process's backends in `pg_stat_activity` every [`SAMPLE_EVERY`], from the
/// moment its cluster accepts connections until stopped: every client backend of the cluster but
/// the test's own (`application_name` [`TEST_APPLICATION`]) is the process's.
struct ConnectionSampler {
    phase: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<(Vec<Peak>, usize)>,
}

impl ConnectionSampler {
    fn start(maintenance: String) -> ConnectionSampler {
        let phase = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let seen_phase = phase.clone();
        let task = tokio::spawn(async move {
            let mut peaks = vec![Peak::default(); PHASES.len()];
            let mut samples = 0;
            let mut opened: Vec<Option<Opened>> = vec![None; PHASES.len()];
            let mut client: Option<tokio_postgres::Client> = None;
            while !*stopped.borrow() {
                if client.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
                    client = match tokio_postgres::connect(&maintenance, tokio_postgres::NoTls).await {
                        Ok((c, connection)) => {
                            tokio::spawn(connection);
                            Some(c)
                        }
                        Err(_) => None,
                    };
                }
                if let Some(c) = &client {
                    let rows = c
                        .query(
                            "SELECT CASE WHEN datname LIKE 'keel\\_shard\\_%' THEN 'shard' ELSE coalesce(datname, '?') END,
                                    coalesce(state, 'starting'),
                                    CASE WHEN query = 'SELECT 1' THEN 'probe'
                                         WHEN query LIKE 'LISTEN%' THEN 'listen'
                                         WHEN query LIKE '%pg_try_advisory_lock%' THEN 'mover lock'
                                         ELSE 'pooled' END,
                                    count(*)
                             FROM pg_stat_activity
                             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
                               AND application_name <> $1
                             GROUP BY 1, 2, 3 ORDER BY 4 DESC",
                            &[&TEST_APPLICATION],
                        )
                        .await;
                    if let Ok(rows) = rows {
                        samples += 1;
                        let breakdown: Breakdown =
                            rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
                        let connections = breakdown.iter().map(|b| b.3).sum();
                        let phase = seen_phase.load(std::sync::atomic::Ordering::Relaxed);
                        let peak = &mut peaks[phase];
                        if connections > peak.connections {
                            *peak = Peak { connections, breakdown, ..Peak::default() };
                        }
                        let sessions = c.query_one("SELECT sum(sessions)::int8 FROM pg_stat_database", &[]).await;
                        if let Ok(sessions) = sessions {
                            let now = (sessions.get::<_, i64>(0), Instant::now());
                            opened[phase].get_or_insert(Opened { first: now, last: now }).last = now;
                        }
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(SAMPLE_EVERY) => {}
                    _ = stopped.changed() => {}
                }
            }
            for (peak, opened) in peaks.iter_mut().zip(&opened) {
                if let Some(Opened { first: (first, at), last: (last, until) }) = opened {
                    let seconds = until.duration_since(*at).as_secs_f64().max(0.001);
                    peak.opened_per_second = (last - first) as f64 / seconds;
                }
            }
            (peaks, samples)
        });
        ConnectionSampler { phase, stop, task }
    }

    fn enter(&self, phase: &str) {
        let index = PHASES.iter().position(|p| *p == phase).expect("a known phase");
        self.phase.store(index, std::sync::atomic::Ordering::Relaxed);
    }

    /// The peak of each phase, and how many samples were taken.
    async fn finish(self) -> (Vec<Peak>, usize) {
        let _ = self.stop.send(true);
        self.task.await.unwrap()
    }
}

/// `keel up --shards 100` on this machine: starts, serves a sign-up on every shard, answers the
/// stats of all 100, and the process never holds more connections to its cluster than PostgreSQL's
/// default `max_connections` (100): sampled throughout, starting, signing up and asking for stats.
#[tokio::test]
async fn keel_up_with_100_shards_serves_every_shard_within_a_connection_budget() {
    let _heavy = crate::helpers::heavy_load().await;
    const SHARDS: usize = 100;
    let started = Instant::now();
    let scratch = scratch_dir("up-100-shards");
    let data_dir = scratch.join("data");
    let data_arg = data_dir.to_str().unwrap().to_owned();
    let log = scratch.join("keel.log");
    let client = reqwest::Client::new();
    let socket_dir = keel_pg::socket_dir_for(&data_dir.join("run"), 5432);
    let maintenance = format!(
        "host={} port=5432 user=keel dbname=postgres application_name={TEST_APPLICATION}",
        socket_dir.display()
    );
    let admin = "test-admin-token-100-shards".to_owned();

    let mut keel =
        Keel::start(&["up", "--data-dir", &data_arg, "--shards", "100"], &[("KEEL_ADMIN_TOKEN", admin.clone())], &log);
    let sampler = ConnectionSampler::start(maintenance.clone());
    let ready = keel.wait_ready(Duration::from_secs(120)).await;
    assert_eq!(shard_databases(&maintenance).await.len(), SHARDS);

    // Sign up, 16 at a time, until every shard holds a user (about 500 with 1024 buckets on 100).
    sampler.enter("sign-ups");
    let per_shard = |client: reqwest::Client, base: String, admin: String| async move {
        let shards = client.get(format!("{base}/v1/admin/shards")).bearer_auth(&admin).send().await;
        let shards = expect_json(shards, 200).await;
        shards["shards"].as_array().unwrap().iter().map(|s| s["users"].as_i64().unwrap_or(0)).collect::<Vec<_>>()
    };
    let signing_up = Instant::now();
    let mut signed_up = 0usize;
    let counts = loop {
        let mut signups = tokio::task::JoinSet::new();
        for i in signed_up..signed_up + 160 {
            let (client, base) = (client.clone(), keel.address.clone());
            signups.spawn(async move {
                let body = json!({ "name": format!("H{i}"), "email": format!("hundred{i}@example.org") });
                expect_json(client.post(format!("{base}/v1/users")).json(&body).send().await, 201).await
            });
            if signups.len() >= 16 {
                signups.join_next().await.unwrap().unwrap();
            }
        }
        while let Some(user) = signups.join_next().await {
            user.unwrap();
        }
        signed_up += 160;
        let counts = per_shard(client.clone(), keel.address.clone(), admin.clone()).await;
        if counts.iter().all(|n| *n >= 1) || signed_up >= 2000 {
            break counts;
        }
    };
    let signing_up = signing_up.elapsed();
    assert_eq!(counts.len(), SHARDS);
    assert!(counts.iter().all(|n| *n >= 1), "a shard has no user after {signed_up} sign-ups: {counts:?}");
    assert_eq!(counts.iter().sum::<i64>(), signed_up as i64);

    // The stats of every shard, the first time and twice more, while the sign-ups' jobs may still
    // run on every shard.
    sampler.enter("stats");
    let mut latencies = Vec::new();
    for _ in 0..3 {
        let asked = Instant::now();
        let stats = client.get(format!("{}/v1/admin/stats", keel.address)).bearer_auth(&admin).send().await;
        let stats = expect_json(stats, 200).await;
        latencies.push(asked.elapsed());
        assert_eq!(stats["partial"], false, "{stats}");
        assert_eq!(stats["missing_shards"], json!([]), "{stats}");
        assert_eq!(stats["users"], signed_up, "{stats}");
    }

    // Idle: the background readers (revoked sessions and like tallies, queue checks and gauges) go
    // on visiting every shard in turn, and keep their promises at 100 shards.
    sampler.enter("idle");
    let idle_since = Instant::now();
    let shard_url = |shard: usize| {
        format!(
            "host={} port=5432 user=keel dbname=keel_shard_{shard} application_name={TEST_APPLICATION}",
            socket_dir.display()
        )
    };
    // A session revoked on its shard by someone else (another node, say): refused here within the
    // session budget (5 s), which this node learns only by polling that shard.
    let late = json!({ "name": "Late", "email": "hundred-late@example.org" });
    let late = expect_json(client.post(format!("{}/v1/users", keel.address)).json(&late).send().await, 201).await;
    let (late_id, late_token) = (late["id"].as_str().unwrap(), late["access_token"].as_str().unwrap());
    let late_shard = usize::from(keel_shard::Bucket::of(late_id.as_bytes()).index()) % SHARDS;
    let profile = format!("{}/v1/users/{late_id}", keel.address);
    assert_eq!(client.get(&profile).bearer_auth(late_token).send().await.unwrap().status(), 200);
    connect(&shard_url(late_shard))
        .await
        .execute(
            "UPDATE sessions SET revoked_at = now(), revoked_why = 'test' WHERE user_id = $1",
            &[&uuid::Uuid::parse_str(late_id).unwrap()],
        )
        .await
        .unwrap();
    let revoked = Instant::now();
    loop {
        let status = client.get(&profile).bearer_auth(late_token).send().await.unwrap().status();
        if status == 401 {
            break;
        }
        assert_eq!(status, 200, "neither accepted nor refused");
        assert!(revoked.elapsed() < SESSION_BUDGET, "a revoked session still accepted after {SESSION_BUDGET:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused_after = revoked.elapsed();
    // A like counted on a shard by someone else: in this node's count within the like count's
    // budget (2 s), which it learns only by merging that shard's tallies.
    let product = json!({ "sku": "HUNDRED", "name": "Hundred", "price_cents": 100, "stock": 1 });
    let product = client.post(format!("{}/v1/products", keel.address)).bearer_auth(&admin).json(&product).send().await;
    let product_id = expect_json(product, 201).await["id"].as_str().unwrap().to_owned();
    let product_url = format!("{}/v1/products/{product_id}", keel.address);
    connect(&shard_url(SHARDS - 1))
        .await
        .execute(
            "INSERT INTO like_tallies (product_id, stripe, likes) VALUES ($1, 0, 1)",
            &[&uuid::Uuid::parse_str(&product_id).unwrap()],
        )
        .await
        .unwrap();
    let liked = Instant::now();
    while expect_json(client.get(&product_url).send().await, 200).await["like_count"] != 1 {
        assert!(liked.elapsed() < LIKES_BUDGET, "a like on a shard not counted after {LIKES_BUDGET:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let counted_after = liked.elapsed();
    // Long enough for each background reader to go round the shards several times.
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(idle_since.elapsed())).await;
    // The stats once more, the sign-ups' jobs done.
    let asked = Instant::now();
    let stats = client.get(format!("{}/v1/admin/stats", keel.address)).bearer_auth(&admin).send().await;
    let stats = expect_json(stats, 200).await;
    latencies.push(asked.elapsed());
    assert_eq!(stats["missing_shards"], json!([]), "{stats}");
    assert_eq!(stats["users"], signed_up + 1, "{stats}");

    sampler.enter("stopping");
    keel.signal(libc::SIGTERM);
    assert!(keel.wait_exit(Duration::from_secs(60)).await.success(), "log:\n{}", keel.log_text());
    let (peaks, samples) = sampler.finish().await;
    let highest = peaks.iter().map(|p| p.connections).max().unwrap_or(0);
    let report: Vec<String> = PHASES
        .iter()
        .zip(&peaks)
        .map(|(phase, peak)| {
            format!("{phase}: {} ({:.0} opened/s) {:?}", peak.connections, peak.opened_per_second, peak.breakdown)
        })
        .collect();
    eprintln!(
        "keel up --shards 100: ready in {ready:?}; {signed_up} sign-ups in {signing_up:?}, every shard has a user \
         ({}..={} per shard); /v1/admin/stats answered in {latencies:?} (3 after the sign-ups, 1 once idle); \
         a session revoked on its shard refused after {refused_after:?}, a like on a shard counted after \
         {counted_after:?}; connections held by keel up at most {highest} ({samples} samples, every \
         {SAMPLE_EVERY:?}); peaks by phase:\n  {}\n{:?} in all",
        counts.iter().min().unwrap(),
        counts.iter().max().unwrap(),
        report.join("\n  "),
        started.elapsed()
    );
    assert!(samples > 100, "pg_stat_activity was sampled only {samples} times");
    assert!(highest <= HELD_AT_MOST, "keel up held {highest} connections; peaks by phase:\n  {}", report.join("\n  "));
}
