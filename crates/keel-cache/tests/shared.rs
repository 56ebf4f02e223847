//! The shared tier against a real redis-server (started here on a private port), with two caches
//! standing for two nodes.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_cache::{Cache, Served, Shared, Tiers};

struct Redis {
    port: u16,
    child: Child,
}

impl Redis {
    fn start_on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (make deps)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { port, child }
    }

    fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Redis::start_on(port)
    }

    fn url(&self) -> String {
        redis_url(self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn node(redis: &Redis, namespace: &str, tiers: Tiers) -> Cache<String, u32> {
    let shared = Shared::connect(&redis.url(), namespace).await.unwrap();
    Cache::new("thing", Duration::from_secs(60), 1000).tiers(tiers).shared(&shared)
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while !check().await {
        assert!(Instant::now() < deadline, "not within 1 s: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_write_on_one_node_reaches_the_other_within_a_second() {
    let redis = Redis::start();
    let (a, b) = (node(&redis, "t1", Tiers::Both).await, node(&redis, "t1", Tiers::Both).await);
    let key = "k".to_owned();
    // Both nodes hold v1 in memory.
    assert_eq!(b.get_or_load(&key, || async { Ok::<_, ()>(1) }).await.unwrap(), (1, Served::Miss));
    let (v, served) = a.get_or_load(&key, || async { Ok::<_, ()>(99) }).await.unwrap();
    assert_eq!(v, 1, "node A found node B's load in the shared tier");
    assert!(matches!(served, Served::Hit { shared: true, .. }), "{served:?}");

    a.put(key.clone(), 2).await;
    eventually("node B serves the write-through value", async || {
        b.get_or_load(&key, || async { Ok::<_, ()>(0) }).await.unwrap().0 == 2
    })
    .await;

    a.invalidate(&key).await;
    eventually("node B reloads after a cache-aside invalidation", async || {
        b.get_or_load(&key, || async { Ok::<_, ()>(3) }).await.unwrap().0 == 3
    })
    .await;
}

/// The stale-install race across nodes, forced: B misses and reads v1 from the source; A commits v2
/// and invalidates; then B's load finishes. Neither B's memory nor the shared tier may keep v1.
#[tokio::test]
async fn a_load_older_than_another_nodes_write_is_not_installed_anywhere() {
    let redis = Redis::start();
    let (a, b) = (node(&redis, "t2", Tiers::Both).await, Arc::new(node(&redis, "t2", Tiers::Both).await));
    let key = "race".to_owned();
    let (read_tx, read_rx) = tokio::sync::oneshot::channel();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = {
        let (b, key) = (b.clone(), key.clone());
        tokio::spawn(async move {
            b.get_or_load(&key, || async move {
                read_tx.send(()).unwrap();
                release_rx.await.unwrap();
                Ok::<_, ()>(1)
            })
            .await
            .unwrap()
        })
    };
    // A probe B holds in memory: once B has dropped it, B has heard A's invalidation of `key` too,
    // which A announced first on the same channel (a fixed sleep here failed under load).
    let probe = "race-probe".to_owned();
    b.get_or_load(&probe, || async { Ok::<_, ()>(10) }).await.unwrap();
    read_rx.await.unwrap();
    a.invalidate(&key).await; // v2 committed at the source
    a.invalidate(&probe).await;
    eventually("node B hears the invalidations", async || {
        b.get_or_load(&probe, || async { Ok::<_, ()>(11) }).await.unwrap().0 == 11
    })
    .await;
    release_tx.send(()).unwrap();
    assert_eq!(reader.await.unwrap(), (1, Served::Miss), "the reader itself gets what it read");
    let fresh = node(&redis, "t2", Tiers::Both).await;
    assert_eq!(fresh.get_or_load(&key, || async { Ok::<_, ()>(2) }).await.unwrap(), (2, Served::Miss));
    assert_eq!(b.get_or_load(&key, || async { Ok::<_, ()>(2) }).await.unwrap().0, 2);
}

/// Redis dies: reads go on (from memory and the source), shared-only kinds read the source; Redis
/// comes back on the same port: the shared tier is used again.
#[tokio::test]
async fn without_redis_reads_go_on_and_resume_the_shared_tier_when_it_is_back() {
    let mut redis = Redis::start();
    let port = redis.port;
    let shared = Shared::connect(&redis.url(), "t3").await.unwrap();
    let both: Cache<String, u32> = Cache::new("both", Duration::from_secs(60), 100).shared(&shared);
    let shared_only: Cache<String, u32> =
        Cache::new("only", Duration::from_secs(60), 100).tiers(Tiers::SharedOnly).shared(&shared);
    let loads = AtomicUsize::new(0);
    let load = || async {
        loads.fetch_add(1, Ordering::SeqCst);
        Ok::<_, ()>(7)
    };
    let key = "k".to_owned();
    assert_eq!(shared_only.get_or_load(&key, load).await.unwrap(), (7, Served::Miss));
    assert!(matches!(shared_only.get_or_load(&key, load).await.unwrap().1, Served::Hit { shared: true, .. }));

    redis.kill();
    for i in 0..20 {
        let key = format!("k{i}");
        assert_eq!(both.get_or_load(&key, load).await.unwrap().0, 7);
        assert_eq!(shared_only.get_or_load(&key, load).await.unwrap().0, 7);
    }
    assert!(!shared.stats().up, "the outage was noticed");
    assert!(shared.stats().errors >= 1);
    let (_, served) = shared_only.get_or_load(&key, load).await.unwrap();
    assert_eq!(served, Served::Bypass, "a shared-only kind reads the source while the tier is down");

    let _redis = Redis::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        shared_only.put("probe".to_owned(), 1).await;
        if shared.stats().up {
            break;
        }
        assert!(Instant::now() < deadline, "the shared tier did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (v, served) = shared_only.get_or_load(&"probe".to_owned(), load).await.unwrap();
    assert_eq!(v, 1);
    assert!(matches!(served, Served::Hit { shared: true, .. }), "{served:?}");

    // Invalidations flow again: another node's writes reach this node's memory.
    let other: Cache<String, u32> = Cache::new("both", Duration::from_secs(60), 100)
        .shared(&Shared::connect(&redis_url(port), "t3").await.unwrap());
    let key = "after".to_owned();
    assert_eq!(both.get_or_load(&key, load).await.unwrap().0, 7);
    let deadline = Instant::now() + Duration::from_secs(5);
    for version in 100.. {
        other.put(key.clone(), version).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        if both.get_or_load(&key, load).await.unwrap().0 == version {
            break;
        }
        assert!(Instant::now() < deadline, "the node did not hear from Redis again");
    }
    other.put(key.clone(), 1).await;
    let deadline = Instant::now() + Duration::from_secs(1);
    while both.get_or_load(&key, load).await.unwrap().0 != 1 {
        assert!(Instant::now() < deadline, "invalidations did not resume after Redis came back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn redis_url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

/// Two nodes write one key at once and finish in the other order than they committed: the shared
/// tier keeps the newer version, and a reader's load of an older row does not replace it.
#[tokio::test]
async fn the_shared_tier_never_takes_an_older_version() {
    let redis = Redis::start();
    let node = async || {
        let shared = Shared::connect(&redis.url(), "versions").await.unwrap();
        Cache::<String, (u64, u32)>::new("thing", Duration::from_secs(60), 1000)
            .versioned(|v: &(u64, u32)| v.0)
            .shared(&shared)
    };
    let (a, b, c) = (node().await, node().await, node().await);
    let key = "k".to_owned();
    a.put(key.clone(), (7, 70)).await;
    b.put(key.clone(), (6, 60)).await; // committed before A's, written after
    let on_b = b.get_or_load(&key, || async { Ok::<_, ()>((0, 0)) }).await.unwrap();
    assert_eq!(on_b.0, (7, 70), "the writing node kept its older value: {:?}", on_b.1);
    let (v, served) = c.get_or_load(&key, || async { Ok::<_, ()>((0, 0)) }).await.unwrap();
    assert_eq!(v, (7, 70), "{served:?}");
    assert!(matches!(served, Served::Hit { shared: true, .. }), "{served:?}");
    // An owner who knows version 8 committed is never served 7, and their load is stored.
    let (v, served) = b.get_at_least(&key, 8, || async { Ok::<_, ()>((8, 80)) }).await.unwrap();
    assert_eq!((v, served), ((8, 80), Served::Miss));
    let fresh = node().await;
    assert_eq!(fresh.get_or_load(&key, || async { Ok::<_, ()>((0, 0)) }).await.unwrap().0, (8, 80));
}
