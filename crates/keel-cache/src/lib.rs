//! An in-process cache that honours a staleness budget, with no knowledge of what it caches.
//!
//! - **Cache-aside without the stale-install race.** A reader that missed loads from the source and
//!   installs what it read. If a writer committed and invalidated the key *while* that load was in
//!   flight, the loaded value may predate the write; installing it would serve stale data for a whole
//!   TTL. Every load takes a ticket (a global generation) before it reads, every invalidation records
//!   a newer generation for its key, and a load whose ticket is older than the key's last
//!   invalidation is returned to its caller but never installed — the leases of Facebook's memcache
//!   paper, in one process.
//! - **Write-through**: [`Cache::put`] installs the committed value at once (and counts as an
//!   invalidation for loads in flight, which might hold an older value).
//! - **Single-flight**: concurrent misses of one key share one load.
//! - **Jittered TTLs** (90–100% of the budget), so keys cached together do not expire together.
//! - **Early refresh of hot keys (XFetch)**: a hit close to expiry is, with a probability that grows
//!   as expiry nears and with the cost of the last load, treated as a miss by one caller, so a hot
//!   key is reloaded before it expires instead of by a burst of callers after.
//! - Per-cache counters (hits, misses, coalesced, evictions) and the age of what was served, also
//!   exported as metrics labelled with the cache's kind.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

/// How a value was served.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Served {
    /// From the cache: how old the value is and how long it may still be served.
    Hit { age: Duration, ttl_left: Duration },
    /// Loaded from the source by this caller.
    Miss,
    /// Loaded from the source by a concurrent caller this one waited for.
    Coalesced,
}

#[derive(Debug, Clone)]
struct Entry<V> {
    value: V,
    stored_at: Instant,
    expires_at: Instant,
    /// How long the load that produced it took (XFetch's cost estimate).
    load_time: Duration,
}

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    pub hits: u64,
    pub misses: u64,
    pub coalesced: u64,
    pub evictions: u64,
    /// The 99th percentile age of values served from the cache recently, in milliseconds.
    pub served_age_p99_ms: f64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    evictions: Arc<AtomicU64>,
    /// The ages of the last served hits, in milliseconds (a ring).
    ages: Mutex<Vec<u64>>,
    next_age: AtomicU64,
}

const AGE_SAMPLES: usize = 1024;
/// XFetch's β: above 1 favours refreshing earlier.
const XFETCH_BETA: f64 = 1.0;

type Flight<V> = Arc<OnceCell<(V, Duration)>>;

pub struct Cache<K, V> {
    kind: &'static str,
    ttl: Duration,
    entries: moka::sync::Cache<K, Entry<V>>,
    /// The generation of each key's last invalidation, kept longer than any load may take.
    invalidated: moka::sync::Cache<K, u64>,
    generation: AtomicU64,
    flights: Mutex<HashMap<K, Flight<V>>>,
    counters: Counters,
}

impl<K, V> Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// A cache of at most `capacity` entries whose values are served for at most `ttl` (the kind's
    /// staleness budget). `kind` labels its metrics.
    pub fn new(kind: &'static str, ttl: Duration, capacity: u64) -> Cache<K, V> {
        let counters = Counters::default();
        let evictions = counters.evictions.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(capacity)
            // An upper bound; each entry's own, jittered expiry is checked on every read.
            .time_to_live(ttl.max(Duration::from_millis(1)))
            .eviction_listener(move |_, _, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    evictions.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("keel_cache_evictions_total", "kind" => kind).increment(1);
                }
            })
            .build();
        let invalidated =
            moka::sync::Cache::builder().max_capacity(capacity).time_to_live(Duration::from_secs(120)).build();
        Cache { kind, ttl, entries, invalidated, generation: AtomicU64::new(0), flights: Mutex::default(), counters }
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The cached value, or the one `load` returns (shared with concurrent callers of the same key).
    /// Errors are not cached.
    pub async fn get_or_load<F, Fut, E>(&self, key: &K, load: F) -> Result<(V, Served), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let now = Instant::now();
        if let Some(entry) = self.entries.get(key) {
            if now < entry.expires_at && !refresh_early(&entry, now) {
                let age = now - entry.stored_at;
                self.hit(age);
                return Ok((entry.value, Served::Hit { age, ttl_left: entry.expires_at - now }));
            }
        }
        let (flight, leader) = {
            let mut flights = self.flights.lock().unwrap();
            match flights.get(key) {
                Some(flight) => (flight.clone(), false),
                None => {
                    let flight: Flight<V> = Arc::default();
                    flights.insert(key.clone(), flight.clone());
                    (flight, true)
                }
            }
        };
        let ticket = self.generation.load(Ordering::SeqCst);
        let mut loaded_here = false;
        let result = flight
            .get_or_try_init(|| async {
                loaded_here = true;
                let started = Instant::now();
                let value = load().await?;
                Ok::<_, E>((value, started.elapsed()))
            })
            .await
            .cloned();
        if leader {
            let mut flights = self.flights.lock().unwrap();
            if flights.get(key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
                flights.remove(key);
            }
        }
        let (value, load_time) = result?;
        if loaded_here {
            self.install(key, value.clone(), load_time, ticket);
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("keel_cache_requests_total", "kind" => self.kind, "result" => "miss").increment(1);
            Ok((value, Served::Miss))
        } else {
            self.counters.coalesced.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("keel_cache_requests_total", "kind" => self.kind, "result" => "coalesced").increment(1);
            Ok((value, Served::Coalesced))
        }
    }

    /// Write-through: installs a value just committed. Loads in flight may hold an older one, so
    /// this also invalidates them.
    pub fn put(&self, key: K, value: V) {
        let generation = self.invalidate_generation(&key);
        self.install(&key, value, Duration::ZERO, generation);
    }

    /// Cache-aside: drops the key after its source changed. A load already in flight will not
    /// install what it read.
    pub fn invalidate(&self, key: &K) {
        self.invalidate_generation(key);
        self.entries.invalidate(key);
    }

    fn invalidate_generation(&self, key: &K) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.invalidated.insert(key.clone(), generation);
        // Callers from now on must not join a load that began before the write.
        self.flights.lock().unwrap().remove(key);
        generation
    }

    fn install(&self, key: &K, value: V, load_time: Duration, ticket: u64) {
        if self.invalidated.get(key).is_some_and(|invalidated| invalidated > ticket) {
            // Read before a write that was acknowledged since: serve it once, never cache it.
            return;
        }
        let now = Instant::now();
        let ttl = self.ttl.mul_f64(0.9 + 0.1 * random_fraction());
        self.entries.insert(key.clone(), Entry { value, stored_at: now, expires_at: now + ttl, load_time });
    }

    fn hit(&self, age: Duration) {
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("keel_cache_requests_total", "kind" => self.kind, "result" => "hit").increment(1);
        metrics::histogram!("keel_cache_served_age_seconds", "kind" => self.kind).record(age.as_secs_f64());
        let slot = self.counters.next_age.fetch_add(1, Ordering::Relaxed) as usize % AGE_SAMPLES;
        let mut ages = self.counters.ages.lock().unwrap();
        let millis = age.as_millis() as u64;
        if ages.len() < AGE_SAMPLES {
            ages.push(millis);
        } else {
            ages[slot] = millis;
        }
    }

    pub fn stats(&self) -> Stats {
        let mut ages = self.counters.ages.lock().unwrap().clone();
        ages.sort_unstable();
        let p99 = ages.get((ages.len() * 99 / 100).min(ages.len().saturating_sub(1))).copied().unwrap_or(0);
        Stats {
            hits: self.counters.hits.load(Ordering::Relaxed),
            misses: self.counters.misses.load(Ordering::Relaxed),
            coalesced: self.counters.coalesced.load(Ordering::Relaxed),
            evictions: self.counters.evictions.load(Ordering::Relaxed),
            served_age_p99_ms: p99 as f64,
        }
    }
}

/// XFetch: refresh when `now − load_time · β · ln(u) ≥ expiry`, u uniform in (0, 1]. Far from
/// expiry almost never; in the last moments (scaled by how long a load takes) almost surely.
fn refresh_early<V>(entry: &Entry<V>, now: Instant) -> bool {
    let u = random_fraction().max(f64::MIN_POSITIVE);
    let head_start = entry.load_time.mul_f64(XFETCH_BETA * -u.ln());
    now + head_start >= entry.expires_at
}

fn random_fraction() -> f64 {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the operating system's random source is available");
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn cache() -> Cache<String, u32> {
        Cache::new("test", Duration::from_secs(60), 1000)
    }

    #[tokio::test]
    async fn a_miss_then_hits() {
        let cache = cache();
        let key = "k".to_owned();
        let (v, served) = cache.get_or_load(&key, || async { Ok::<_, ()>(1) }).await.unwrap();
        assert_eq!((v, served), (1, Served::Miss));
        let (v, served) = cache.get_or_load(&key, || async { Ok::<_, ()>(2) }).await.unwrap();
        assert_eq!(v, 1);
        assert!(matches!(served, Served::Hit { .. }));
        assert_eq!((cache.stats().hits, cache.stats().misses), (1, 1));
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_load() {
        let cache = Arc::new(cache());
        let loads = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let (cache, loads) = (cache.clone(), loads.clone());
            tasks.spawn(async move {
                cache
                    .get_or_load(&"cold".to_owned(), || async {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, ()>(7)
                    })
                    .await
                    .unwrap()
            });
        }
        while let Some(result) = tasks.join_next().await {
            assert_eq!(result.unwrap().0, 7);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(cache.stats().misses + cache.stats().coalesced, 100);
    }

    /// The classic race, forced: a reader loads v1, a writer commits v2 and invalidates, then the
    /// reader finishes. The reader's v1 must not be installed.
    #[tokio::test]
    async fn a_load_older_than_an_invalidation_is_not_installed() {
        let cache = Arc::new(cache());
        let key = "profile".to_owned();
        let (read_done_tx, read_done_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let reader = {
            let (cache, key) = (cache.clone(), key.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load(&key, || async move {
                        let v1 = 1; // read from the source
                        read_done_tx.send(()).unwrap();
                        release_rx.await.unwrap(); // stalls until the writer is done
                        Ok::<_, ()>(v1)
                    })
                    .await
                    .unwrap()
            })
        };
        read_done_rx.await.unwrap();
        // The writer: commits v2 at the source, then invalidates.
        cache.invalidate(&key);
        release_tx.send(()).unwrap();
        let (served, how) = reader.await.unwrap();
        assert_eq!((served, how), (1, Served::Miss), "the reader itself gets what it read");
        let (next, how) = cache.get_or_load(&key, || async { Ok::<_, ()>(2) }).await.unwrap();
        assert_eq!((next, how), (2, Served::Miss), "v1 was never installed");
    }

    #[tokio::test]
    async fn put_installs_and_beats_loads_in_flight() {
        let cache = cache();
        let key = "p".to_owned();
        cache.put(key.clone(), 5);
        let (v, served) = cache.get_or_load(&key, || async { Ok::<_, ()>(0) }).await.unwrap();
        assert_eq!(v, 5);
        assert!(matches!(served, Served::Hit { .. }));
    }

    #[tokio::test]
    async fn errors_are_not_cached_and_expiry_is_jittered_within_the_budget() {
        let cache: Cache<String, u32> = Cache::new("test", Duration::from_millis(200), 10);
        let key = "e".to_owned();
        assert!(cache.get_or_load(&key, || async { Err::<u32, _>("down") }).await.is_err());
        let (v, _) = cache.get_or_load(&key, || async { Ok::<_, &str>(3) }).await.unwrap();
        assert_eq!(v, 3);
        match cache.get_or_load(&key, || async { Ok::<_, &str>(4) }).await.unwrap().1 {
            Served::Hit { ttl_left, .. } => assert!(ttl_left <= Duration::from_millis(200)),
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(210)).await;
        assert_eq!(cache.get_or_load(&key, || async { Ok::<_, &str>(4) }).await.unwrap(), (4, Served::Miss));
    }

    #[test]
    fn xfetch_refreshes_only_near_expiry() {
        let now = Instant::now();
        let far = Entry {
            value: (),
            stored_at: now,
            expires_at: now + Duration::from_secs(60),
            load_time: Duration::from_millis(5),
        };
        assert!((0..1000).all(|_| !refresh_early(&far, now)));
        let near = Entry { expires_at: now + Duration::from_micros(100), ..far.clone() };
        let refreshed = (0..1000).filter(|_| refresh_early(&near, now)).count();
        assert!(refreshed > 900, "{refreshed} of 1000");
    }
}
