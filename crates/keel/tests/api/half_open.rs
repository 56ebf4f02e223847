//! A database that stops answering (issue 22, item 14): the backends of one shard's database are
//! stopped with SIGSTOP (their kernel still acknowledges every packet, so TCP keepalives see nothing
//! wrong: a frozen server, as seen from Keel). Within seconds, requests for the other shard keep
//! answering at once, and requests for the stopped shard answer at once with a 503 and `Retry-After`
//! (not after the 30 s request timeout); after SIGCONT they are served again.
//!
//! Every client backend of that database is stopped, including the ones that connect later (the
//! watchdog's fresh probe connections), until SIGCONT: the whole database is frozen, not just the
//! connections open at the time. Only idle backends are stopped (one caught active is let go and
//! stopped when idle): a backend stopped inside the server's shared-memory locks would stall the other
//! databases of the cluster, which the whole test binary shares.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel::db::health::{PROBE_EVERY, PROBE_TIMEOUT};
use keel::ids::UserId;

use crate::helpers::{cluster, connect, TestApp};

/// The backends this test stopped; all are continued when it is dropped, whatever the test's outcome
/// (the cluster is shared by every test of the binary).
#[derive(Clone, Default)]
struct Stopped {
    pids: Arc<Mutex<HashSet<i32>>>,
    resumed: Arc<AtomicBool>,
}

impl Stopped {
    /// Stops `pid` unless everything was resumed already; true if stopped.
    fn stop(&self, pid: i32) -> bool {
        let mut pids = self.pids.lock().unwrap_or_else(|e| e.into_inner());
        if self.resumed.load(Ordering::SeqCst) || pids.contains(&pid) {
            return false;
        }
        // SAFETY: kill has no memory-safety preconditions; pid is a PostgreSQL backend of this binary's cluster.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        pids.insert(pid);
        true
    }

    /// Lets one go again (it was caught active).
    fn release(&self, pid: i32) {
        let mut pids = self.pids.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        pids.remove(&pid);
    }

    fn resume_all(&self) {
        let pids = self.pids.lock().unwrap_or_else(|e| e.into_inner());
        self.resumed.store(true, Ordering::SeqCst);
        for &pid in pids.iter() {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }

    fn count(&self) -> usize {
        self.pids.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // Idempotent: any copy dropped (the test's, or the freezer's if it failed) lets them all go.
        self.resume_all();
    }
}

/// Keeps every idle client backend of `datname` stopped until `stopped` is resumed.
async fn freeze(datname: String, stopped: Stopped) {
    let admin = connect(&cluster().maintenance_url()).await;
    let idle = "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend' \
                AND state IN ('idle', 'idle in transaction')";
    while !stopped.resumed.load(Ordering::SeqCst) {
        for row in admin.query(idle, &[&datname]).await.unwrap() {
            let pid: i32 = row.get(0);
            if !stopped.stop(pid) {
                continue;
            }
            // It may have taken a query between the two: if it is not idle now, it may hold a shared
            // lock of the server's; let it go, and take it when it is idle again.
            let state: Option<String> = admin
                .query_opt("SELECT state FROM pg_stat_activity WHERE pid = $1", &[&pid])
                .await
                .unwrap()
                .and_then(|r| r.get(0));
            if !matches!(state.as_deref(), Some("idle" | "idle in transaction")) {
                stopped.release(pid);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How a request ended: how long it took, its status (0: no response) and its `Retry-After`.
type Outcome = (Duration, u16, Option<String>);

/// One request of the load: when it started, and how it ended (`None`: not yet).
struct Sent {
    started: Instant,
    outcome: Arc<Mutex<Option<Outcome>>>,
}

/// Sends `GET /v1/wallet` as `token` every 50 ms, each in a task of its own (a request stuck on a
/// stopped backend holds up no other), until `until`.
fn load(
    app: &TestApp,
    token: &str,
    sent: Arc<Mutex<Vec<Sent>>>,
    until: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let (client, url, token) = (app.client.clone(), app.url("/v1/wallet"), token.to_owned());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        while !until.load(Ordering::SeqCst) {
            tick.tick().await;
            let outcome = Arc::new(Mutex::new(None));
            sent.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Sent { started: Instant::now(), outcome: outcome.clone() });
            let request = client.get(&url).bearer_auth(&token).timeout(Duration::from_secs(60)).send();
            tokio::spawn(async move {
                let started = Instant::now();
                let (status, retry_after) = match request.await {
                    Ok(response) => (
                        response.status().as_u16(),
                        response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned()),
                    ),
                    Err(_) => (0, None),
                };
                *outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some((started.elapsed(), status, retry_after));
            });
        }
    })
}

/// The outcomes of the requests started in `[from, to)`; panics naming any that took longer than
/// `within` (or has not ended `within` after it started).
fn answered_within(
    sent: &Mutex<Vec<Sent>>,
    from: Instant,
    to: Instant,
    within: Duration,
    what: &str,
) -> Vec<(u16, Option<String>)> {
    let sent = sent.lock().unwrap_or_else(|e| e.into_inner());
    let mut outcomes = Vec::new();
    for request in sent.iter().filter(|s| s.started >= from && s.started < to) {
        let at = request.started - from;
        match request.outcome.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            Some((took, status, retry_after)) => {
                assert!(took < within, "{what}: a request started {at:?} into the window took {took:?} ({status})");
                outcomes.push((status, retry_after));
            }
            None => panic!("{what}: a request started {at:?} into the window has not answered"),
        }
    }
    outcomes
}

fn dbname(url: &str) -> String {
    url.split_whitespace().find_map(|pair| pair.strip_prefix("dbname=")).expect("a dbname in the test URL").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_database_fails_fast_and_others_are_unaffected() {
    let app = TestApp::spawn().await;
    // A user on each shard.
    let mut tokens: [Option<String>; 2] = [None, None];
    while tokens.iter().any(Option::is_none) {
        let (id, token) = app.create_user("Half Open").await;
        let shard = app.databases.shard_of(id.parse::<UserId>().unwrap()).name().to_owned();
        let index: usize = shard.trim_start_matches("shard").parse().unwrap();
        tokens[index].get_or_insert(token);
    }
    let [frozen_token, live_token] = tokens.map(Option::unwrap);
    let frozen_db = dbname(&app.dbs.shard_urls[0]);

    let (frozen_sent, live_sent) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
    let until = Arc::new(AtomicBool::new(false));
    let loads = [
        load(&app, &frozen_token, frozen_sent.clone(), until.clone()),
        load(&app, &live_token, live_sent.clone(), until.clone()),
    ];
    // Under load, both shards answer.
    let warm = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let answered = Duration::from_millis(500);
    for sent in [&frozen_sent, &live_sent] {
        let outcomes = answered_within(sent, warm, warm + answered, Duration::from_secs(1), "before the stop");
        assert!(!outcomes.is_empty() && outcomes.iter().all(|(status, _)| *status == 200), "{outcomes:?}");
    }

    // Stop shard 0's database. Within PROBE_EVERY + PROBE_TIMEOUT the watchdog finds it not answering;
    // requests sent before that may be stuck on its connections (until the request timeout).
    let stopped = Stopped::default();
    let frozen_at = Instant::now();
    let freezer = tokio::spawn(freeze(frozen_db.clone(), stopped.clone()));
    let detected = frozen_at + PROBE_EVERY + PROBE_TIMEOUT + Duration::from_secs(1);
    assert!(detected - frozen_at <= Duration::from_secs(4), "the watchdog's timings leave no window within 10 s");
    let window_end = frozen_at + Duration::from_secs(9);
    tokio::time::sleep_until((window_end + Duration::from_secs(2)).into()).await;
    assert!(stopped.count() > 0, "no backend of {frozen_db} was stopped");

    // Within 10 s of the stop: the other shard's requests answer at once, with 200 …
    let fast = Duration::from_secs(2);
    let live = answered_within(&live_sent, detected, window_end, fast, "the live shard while the other is stopped");
    assert!(live.len() >= 50, "too few requests in the window: {}", live.len());
    assert!(live.iter().all(|(status, _)| *status == 200), "the live shard: {live:?}");
    // … and the stopped shard's at once too, with a 503 and Retry-After.
    let frozen = answered_within(&frozen_sent, detected, window_end, fast, "the stopped shard");
    assert!(frozen.len() >= 50, "too few requests in the window: {}", frozen.len());
    for (status, retry_after) in &frozen {
        assert_eq!(*status, 503, "the stopped shard: {frozen:?}");
        assert_eq!(retry_after.as_deref(), Some("1"), "a 503 says when to try again");
    }

    // The fall is counted (the counter only grows: other tests' apps also have a `shard0`).
    let metrics = app.get("/metrics").send().await.unwrap().text().await.unwrap();
    let downs = metrics.lines().find_map(|l| l.strip_prefix(r#"keel_db_down_total{db="shard0"} "#));
    assert!(downs.and_then(|n| n.trim().parse::<f64>().ok()).is_some_and(|n| n >= 1.0), "{metrics}");

    // SIGCONT: the stopped shard is served again within seconds.
    stopped.resume_all();
    freezer.await.unwrap();
    let resumed = Instant::now();
    let recovered = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ok =
            frozen_sent.lock().unwrap_or_else(|e| e.into_inner()).iter().rev().filter(|s| s.started >= resumed).any(
                |s| {
                    s.outcome
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                        .is_some_and(|(_, status, _)| *status == 200)
                },
            );
        if ok {
            break resumed.elapsed();
        }
        assert!(resumed.elapsed() < Duration::from_secs(10), "the stopped shard did not recover after SIGCONT");
    };
    // From then on, both shards answer at once with 200.
    let from = Instant::now() + Duration::from_millis(500);
    tokio::time::sleep_until((from + Duration::from_secs(2) + fast).into()).await;
    until.store(true, Ordering::SeqCst);
    for (sent, what) in [(&frozen_sent, "the resumed shard"), (&live_sent, "the live shard after")] {
        let outcomes = answered_within(sent, from, from + Duration::from_secs(2), fast, what);
        assert!(outcomes.len() >= 20 && outcomes.iter().all(|(s, _)| *s == 200), "{what}: {outcomes:?}");
    }
    for load in loads {
        load.await.unwrap();
    }
    eprintln!("recovered {recovered:?} after SIGCONT; {} backends had been stopped", stopped.count());
}
