//! A cache that honours a staleness budget — in process, optionally shared by all nodes through
//! Redis — with no knowledge of what it caches.
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
//! - **A shared tier** ([`Shared`], Redis, optional): values every node can read, and the channel
//!   on which a node's writes invalidate the others' memory. See `shared.rs`.
//! - **Write-back** ([`WriteBack`]): changes kept in memory and written in batches at most one
//!   interval later and at shutdown; the interval is the declared loss window of a crash.

mod shared;
mod write_back;

pub use shared::{Shared, SharedStats};
pub use write_back::WriteBack;

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::hash::Hash;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::OnceCell;

use shared::Stored;

/// How a value was served.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Served {
    /// From a cache: how old the value is, how long it may still be served, and whether it came
    /// from the shared tier (this node did not have it).
    Hit { age: Duration, ttl_left: Duration, shared: bool },
    /// Loaded from the source by this caller.
    Miss,
    /// Loaded from the source (or the shared tier) by a concurrent caller this one waited for.
    Coalesced,
    /// Read from the source around the cache: the kind is kept only in the shared tier, which is
    /// absent or down (a stronger source, never a staler one).
    Bypass,
}

#[derive(Debug, Clone)]
struct Entry<V> {
    value: V,
    /// When the value was read from the source (or written).
    stored_at: Instant,
    expires_at: Instant,
    /// How long the load that produced it took (XFetch's cost estimate).
    load_time: Duration,
}

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Served from this node's memory.
    pub hits: u64,
    /// Served from the shared tier (Redis).
    pub shared_hits: u64,
    pub misses: u64,
    pub coalesced: u64,
    pub evictions: u64,
    /// The 99th percentile age of values served from the cache recently, in milliseconds.
    pub served_age_p99_ms: f64,
}

/// One outcome of a read, counted here (for [`Cache::stats`]) and as a metric.
struct Tally {
    count: AtomicU64,
    metric: metrics::Counter,
}

impl Tally {
    fn new(kind: &'static str, result: &'static str) -> Tally {
        Tally {
            count: AtomicU64::new(0),
            metric: metrics::counter!("keel_cache_requests_total", "kind" => kind, "result" => result),
        }
    }

    fn add(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.metric.increment(1);
    }

    fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Every read updates these, so they hold their metric handles (looked up once, at construction:
/// the metrics recorder must be installed before a cache is made) and no lock.
struct Counters {
    hits: Tally,
    shared_hits: Tally,
    misses: Tally,
    /// Reads of a shared-only kind while the shared tier is absent or down (reported as misses).
    bypassed: Tally,
    coalesced: Tally,
    evictions: Arc<AtomicU64>,
    served_age: metrics::Histogram,
    /// The ages of the last served hits, in milliseconds (a ring written at `next_age`).
    ages: Box<[AtomicU64]>,
    next_age: AtomicU64,
}

impl Counters {
    fn new(kind: &'static str) -> Counters {
        Counters {
            hits: Tally::new(kind, "hit"),
            shared_hits: Tally::new(kind, "shared_hit"),
            misses: Tally::new(kind, "miss"),
            bypassed: Tally::new(kind, "bypass"),
            coalesced: Tally::new(kind, "coalesced"),
            evictions: Arc::default(),
            served_age: metrics::histogram!("keel_cache_served_age_seconds", "kind" => kind),
            ages: (0..AGE_SAMPLES).map(|_| AtomicU64::new(0)).collect(),
            next_age: AtomicU64::new(0),
        }
    }
}

const AGE_SAMPLES: usize = 1024;
/// XFetch's β: above 1 favours refreshing earlier.
const XFETCH_BETA: f64 = 1.0;

/// What a load produced: the value, when it was read from the source, how long that took.
#[derive(Clone)]
struct Loaded<V> {
    value: V,
    loaded_at: Instant,
    load_time: Duration,
    from_shared: bool,
}

type Flight<V> = Arc<OnceCell<Loaded<V>>>;

/// This node's memory of one kind: shared with the invalidation listener of the shared tier.
struct Local<K, V> {
    entries: moka::sync::Cache<K, Entry<V>>,
    /// The generation of each key's last invalidation, kept longer than any load may take.
    invalidated: moka::sync::Cache<K, u64>,
    /// The generation at which every key was invalidated (a reconnect to the shared tier).
    cleared: AtomicU64,
    generation: AtomicU64,
    flights: Mutex<HashMap<K, Flight<V>>>,
}

impl<K, V> Local<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn invalidate(&self, key: &K) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.invalidated.insert(key.clone(), generation);
        // Callers from now on must not join a load that began before the write.
        self.flights.lock().unwrap().remove(key);
        self.entries.invalidate(key);
        generation
    }

    fn clear(&self) {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.cleared.store(generation, Ordering::SeqCst);
        self.flights.lock().unwrap().clear();
        self.entries.invalidate_all();
    }

    /// Whether a load that took `ticket` before reading may be installed.
    fn still_current(&self, key: &K, ticket: u64) -> bool {
        self.cleared.load(Ordering::SeqCst) <= ticket && self.invalidated.get(key).is_none_or(|g| g <= ticket)
    }
}

/// The shared tier as one cache uses it.
struct Tier2<K, V> {
    shared: Arc<Shared>,
    key_text: fn(&K) -> String,
    encode: fn(&V) -> Option<Vec<u8>>,
    decode: fn(&[u8]) -> Option<V>,
}

/// Where a kind's values are kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Tiers {
    /// In this node's memory and in the shared tier.
    Both,
    /// Only in the shared tier: for data whose reader may come back through any node and must see
    /// its own writes at once (a node's memory could be a write behind).
    SharedOnly,
}

pub struct Cache<K, V> {
    kind: &'static str,
    ttl: Duration,
    local: Arc<Local<K, V>>,
    keep_local: bool,
    tier2: Option<Tier2<K, V>>,
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
        let counters = Counters::new(kind);
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
        let local = Local {
            entries,
            invalidated,
            cleared: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            flights: Mutex::default(),
        };
        Cache { kind, ttl, local: Arc::new(local), keep_local: true, tier2: None, counters }
    }

    /// Where values are kept (default [`Tiers::Both`]). A [`Tiers::SharedOnly`] cache without a
    /// shared tier, or while it is down, reads every value from the source.
    pub fn tiers(mut self, tiers: Tiers) -> Cache<K, V> {
        self.keep_local = tiers == Tiers::Both;
        self
    }

    /// The cached value, or the one `load` returns (shared with concurrent callers of the same key).
    /// Errors are not cached.
    pub async fn get_or_load<F, Fut, E>(&self, key: &K, load: F) -> Result<(V, Served), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let now = Instant::now();
        // When refreshing a held value early, the shared tier's copy is worth taking only if it is
        // newer than this one (it is often the very same value, loaded by another node).
        let mut refreshing_age = None;
        if self.keep_local {
            if let Some(entry) = self.local.entries.get(key) {
                let age = now - entry.stored_at;
                if now < entry.expires_at && !refresh_early(&entry, now) {
                    self.hit(age, false);
                    return Ok((entry.value, Served::Hit { age, ttl_left: entry.expires_at - now, shared: false }));
                }
                refreshing_age = Some(age);
            }
        } else if !self.tier2.as_ref().is_some_and(|t| t.shared.is_up()) {
            let value = load().await?;
            self.counters.bypassed.add();
            return Ok((value, Served::Bypass));
        }
        let (flight, leader) = {
            let mut flights = self.local.flights.lock().unwrap();
            match flights.get(key) {
                Some(flight) => (flight.clone(), false),
                None => {
                    let flight: Flight<V> = Arc::default();
                    flights.insert(key.clone(), flight.clone());
                    (flight, true)
                }
            }
        };
        let ticket = self.local.generation.load(Ordering::SeqCst);
        let mut loaded_here = false;
        let result = flight
            .get_or_try_init(|| {
                loaded_here = true;
                self.load_through_tiers(key, load, refreshing_age.unwrap_or(self.ttl))
            })
            .await
            .cloned();
        if leader {
            let mut flights = self.local.flights.lock().unwrap();
            if flights.get(key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
                flights.remove(key);
            }
        }
        let loaded = result?;
        if !loaded_here {
            self.counters.coalesced.add();
            return Ok((loaded.value, Served::Coalesced));
        }
        let expires_at = loaded.loaded_at + self.jittered_ttl();
        if self.keep_local && self.local.still_current(key, ticket) && Instant::now() < expires_at {
            let entry = Entry {
                value: loaded.value.clone(),
                stored_at: loaded.loaded_at,
                expires_at,
                load_time: loaded.load_time,
            };
            self.local.entries.insert(key.clone(), entry);
        }
        if loaded.from_shared {
            let now = Instant::now();
            let age = now.saturating_duration_since(loaded.loaded_at);
            self.hit(age, true);
            Ok((loaded.value, Served::Hit { age, ttl_left: self.ttl.saturating_sub(age), shared: true }))
        } else {
            self.counters.misses.add();
            Ok((loaded.value, Served::Miss))
        }
    }

    /// A miss of this node: the shared tier if it has the key younger than `younger_than`, else the
    /// source (and then the shared tier is given what was read, unless the key was written meanwhile).
    async fn load_through_tiers<F, Fut, E>(&self, key: &K, load: F, younger_than: Duration) -> Result<Loaded<V>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let mut install_with = None;
        if let Some(tier2) = &self.tier2 {
            let text = (tier2.key_text)(key);
            if let Some((stored, counter)) = tier2.shared.lookup(self.kind, &text).await {
                let found = stored.and_then(|s| Some((s.age(), s.load_time, (tier2.decode)(&s.bytes)?)));
                if let Some((age, load_time, value)) = found.filter(|(age, ..)| *age < younger_than.min(self.ttl)) {
                    let loaded_at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                    return Ok(Loaded { value, loaded_at, load_time, from_shared: true });
                }
                install_with = Some((text, counter));
            }
        }
        let (started, started_us) = (Instant::now(), shared::unix_us());
        let value = load().await?;
        let load_time = started.elapsed();
        if let (Some(tier2), Some((text, counter))) = (&self.tier2, install_with) {
            if let Some(bytes) = (tier2.encode)(&value) {
                let stored = Stored { loaded_at_us: started_us, load_time, bytes };
                let ttl = self.jittered_ttl().saturating_sub(load_time);
                tier2.shared.install(self.kind, &text, &counter, &stored, ttl).await;
            }
        }
        Ok(Loaded { value, loaded_at: started, load_time, from_shared: false })
    }

    /// Write-through: installs a value just committed, here and in the shared tier (telling the
    /// other nodes). Loads in flight may hold an older value, so this also invalidates them.
    pub async fn put(&self, key: K, value: V) {
        self.local.invalidate(&key);
        if self.keep_local {
            let now = Instant::now();
            let entry = Entry {
                value: value.clone(),
                stored_at: now,
                expires_at: now + self.jittered_ttl(),
                load_time: Duration::ZERO,
            };
            self.local.entries.insert(key.clone(), entry);
        }
        if let Some(tier2) = &self.tier2 {
            let bytes = (tier2.encode)(&value);
            let ttl = self.jittered_ttl();
            tier2.shared.write(self.kind, &(tier2.key_text)(&key), bytes.as_deref().map(|b| (b, ttl))).await;
        }
    }

    /// Cache-aside: drops the key after its source changed, here, in the shared tier and on the
    /// other nodes. A load already in flight will not install what it read.
    pub async fn invalidate(&self, key: &K) {
        self.local.invalidate(key);
        if let Some(tier2) = &self.tier2 {
            tier2.shared.write(self.kind, &(tier2.key_text)(key), None).await;
        }
    }

    /// Between 90% and 100% of the TTL, so that entries written together do not expire together.
    fn jittered_ttl(&self) -> Duration {
        self.ttl - keel_random::up_to(self.ttl / 10)
    }

    fn hit(&self, age: Duration, shared: bool) {
        let counters = &self.counters;
        if shared { &counters.shared_hits } else { &counters.hits }.add();
        counters.served_age.record(age.as_secs_f64());
        let slot = counters.next_age.fetch_add(1, Ordering::Relaxed) as usize % AGE_SAMPLES;
        counters.ages[slot].store(age.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn stats(&self) -> Stats {
        let counters = &self.counters;
        let filled = (counters.next_age.load(Ordering::Relaxed) as usize).min(AGE_SAMPLES);
        let mut ages: Vec<u64> = counters.ages[..filled].iter().map(|a| a.load(Ordering::Relaxed)).collect();
        ages.sort_unstable();
        let p99 = ages.get((ages.len() * 99 / 100).min(ages.len().saturating_sub(1))).copied().unwrap_or(0);
        Stats {
            hits: counters.hits.get(),
            shared_hits: counters.shared_hits.get(),
            misses: counters.misses.get() + counters.bypassed.get(),
            coalesced: counters.coalesced.get(),
            evictions: counters.evictions.load(Ordering::Relaxed),
            served_age_p99_ms: p99 as f64,
        }
    }
}

impl<K, V> Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + Display + FromStr + 'static,
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
{
    /// Keeps this kind in the shared tier too (values as JSON), and applies the other nodes'
    /// invalidations to this node's memory.
    pub fn shared(mut self, shared: &Arc<Shared>) -> Cache<K, V> {
        let local = self.local.clone();
        shared.listen(
            self.kind,
            Arc::new(move |key: Option<&str>| match key {
                Some(key) => {
                    if let Ok(key) = key.parse::<K>() {
                        local.invalidate(&key);
                    }
                }
                None => local.clear(),
            }),
        );
        self.tier2 = Some(Tier2 {
            shared: shared.clone(),
            key_text: |k| k.to_string(),
            encode: |v| serde_json::to_vec(v).ok(),
            decode: |b| serde_json::from_slice(b).ok(),
        });
        self
    }
}

/// XFetch: refresh when `now − load_time · β · ln(u) ≥ expiry`, u uniform in (0, 1]. Far from
/// expiry almost never; in the last moments (scaled by how long a load takes) almost surely.
fn refresh_early<V>(entry: &Entry<V>, now: Instant) -> bool {
    let u = 1.0 - keel_random::fraction();
    let head_start = entry.load_time.mul_f64(XFETCH_BETA * -u.ln());
    now + head_start >= entry.expires_at
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
        cache.invalidate(&key).await;
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
        cache.put(key.clone(), 5).await;
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
