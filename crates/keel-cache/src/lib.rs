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
//! - **Versions that only grow** ([`Cache::versioned`]): when the source gives every value a
//!   version bumped by each write (a counter column, never a timestamp), no older value is ever
//!   installed over a newer one — here or in the shared tier (a compare-and-set there) — whatever
//!   order concurrent writers and readers finish in; and a reader that knows the newest version it
//!   must see ([`Cache::get_at_least`]: an owner reading their own writes) is never served an older one.
//! - **Single-flight**: concurrent misses of one key share one load. A caller that gives up
//!   (cancelled) takes its flight with it, and no caller ever joins a flight that has finished; a
//!   caller that joined is told the true age and source of the value it was given.
//! - **Jittered TTLs** (90–100% of the budget), so keys cached together do not expire together.
//! - **Early refresh of hot keys (XFetch)**: a hit close to expiry is, with a probability that grows
//!   as expiry nears and with the cost of the last load, treated as a miss by one caller, so a hot
//!   key is reloaded before it expires instead of by a burst of callers after.
//! - Per-cache counters (hits, misses, coalesced, evictions) and the age of what was served, also
//!   exported as metrics labelled with the cache's kind.
//! - **A shared tier** ([`Shared`], Redis, optional): values every node can read, and the channel
//!   on which a node's writes invalidate the others' memory. See `shared.rs`.

mod shared;

pub use shared::{Shared, SharedStats, Written};

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
    /// Loaded from the source (or the shared tier, `shared`) by a concurrent caller this one waited
    /// for: how old that value is, and how long it may still be served.
    Coalesced { age: Duration, ttl_left: Duration, shared: bool },
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
    /// Loads under way now (one per key, however many callers wait on it). Returns to zero when
    /// the loads end, their callers gone or not: a number that only grows is a leak.
    pub loads_in_flight: usize,
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
    /// Also the lock under which a versioned value is admitted and installed, so two installs of
    /// one key cannot finish in the other order than they were admitted.
    flights: Mutex<HashMap<K, Flight<V>>>,
    /// The newest version installed per key (versioned caches), kept longer than any value lives:
    /// an older value is never installed after it.
    newest: moka::sync::Cache<K, u64>,
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

    /// Installs `entry` if its version (`None`: unversioned) is not older than the newest installed,
    /// and `also` holds, atomically with respect to every other install of a versioned value.
    fn install(&self, key: &K, entry: Entry<V>, version: Option<u64>, also: impl FnOnce() -> bool) -> bool {
        let _admitting = self.flights.lock().unwrap();
        if let Some(version) = version {
            if self.newest.get(key).is_some_and(|newest| newest > version) || !also() {
                return false;
            }
            self.newest.insert(key.clone(), version);
        } else if !also() {
            return false;
        }
        self.entries.insert(key.clone(), entry);
        true
    }

    /// Whether a write of `version` is older than one this node already installed.
    fn superseded(&self, key: &K, version: Option<u64>) -> bool {
        version.is_some_and(|v| self.newest.get(key).is_some_and(|newest| newest > v))
    }
}

/// Removes a flight from the map when its leader finishes *or is dropped mid-way* (a client that
/// disconnected, a timeout): otherwise later callers would join a flight nobody drives, or one
/// already finished, and be served its value as new.
struct FlightGuard<'a, K: Hash + Eq, V> {
    flights: &'a Mutex<HashMap<K, Flight<V>>>,
    key: &'a K,
    flight: Flight<V>,
}

impl<K: Hash + Eq, V> Drop for FlightGuard<'_, K, V> {
    fn drop(&mut self) {
        let mut flights = self.flights.lock().unwrap();
        if flights.get(self.key).is_some_and(|f| Arc::ptr_eq(f, &self.flight)) {
            flights.remove(self.key);
        }
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
    /// The version of a value, for caches whose source versions them ([`Cache::versioned`]).
    version_of: Option<fn(&V) -> u64>,
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
        let newest =
            moka::sync::Cache::builder().max_capacity(capacity).time_to_live(ttl.max(Duration::from_secs(120))).build();
        let local = Local {
            entries,
            invalidated,
            cleared: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            flights: Mutex::default(),
            newest,
        };
        Cache { kind, ttl, local: Arc::new(local), keep_local: true, tier2: None, version_of: None, counters }
    }

    /// Values carry a version that every write at the source bumps: from now on an older value is
    /// never installed over a newer one, in this node's memory or in the shared tier.
    pub fn versioned(mut self, version_of: fn(&V) -> u64) -> Cache<K, V> {
        self.version_of = Some(version_of);
        self
    }

    fn version(&self, value: &V) -> Option<u64> {
        self.version_of.map(|version_of| version_of(value))
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
        self.fetch(key, 0, || async move { load().await.map(|value| (value, Duration::ZERO)) }).await
    }

    /// Like [`Cache::get_or_load`], for a source that may itself be behind (a read replica): `load`
    /// also returns how old its value already was when read. That age counts against the budget like
    /// time spent in the cache: the value is kept, here and in the shared tier, only for what is left
    /// of the budget, and is served with its full age; a value read already as old as the budget is
    /// returned to its caller but not kept.
    pub async fn get_or_load_aged<F, Fut, E>(&self, key: &K, load: F) -> Result<(V, Served), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(V, Duration), E>>,
    {
        self.fetch(key, 0, load).await
    }

    /// Like [`Cache::get_or_load`], for a caller who knows that the value's version is at least
    /// `min_version` (an owner who just wrote it): a cached value older than that is not served, in
    /// either tier, whatever happened to the invalidations meant to remove it. Versioned caches only.
    pub async fn get_at_least<F, Fut, E>(&self, key: &K, min_version: u64, load: F) -> Result<(V, Served), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        debug_assert!(self.version_of.is_some(), "get_at_least on a cache without versions");
        self.fetch(key, min_version, || async move { load().await.map(|value| (value, Duration::ZERO)) }).await
    }

    /// Whether `value` may be served to a caller who must see at least `min_version`.
    fn new_enough(&self, value: &V, min_version: u64) -> bool {
        self.version(value).is_none_or(|v| v >= min_version)
    }

    async fn fetch<F, Fut, E>(&self, key: &K, min_version: u64, load: F) -> Result<(V, Served), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(V, Duration), E>>,
    {
        let now = Instant::now();
        // When refreshing a held value early, the shared tier's copy is worth taking only if it is
        // newer than this one (it is often the very same value, loaded by another node).
        let mut refreshing_age = None;
        if self.keep_local {
            if let Some(entry) = self.local.entries.get(key).filter(|e| self.new_enough(&e.value, min_version)) {
                let age = now - entry.stored_at;
                if now < entry.expires_at && !refresh_early(&entry, now) {
                    self.hit(age, false);
                    return Ok((entry.value, Served::Hit { age, ttl_left: entry.expires_at - now, shared: false }));
                }
                refreshing_age = Some(age);
            }
        } else if !self.tier2.as_ref().is_some_and(|t| t.shared.is_up()) {
            let (value, _) = load().await?;
            self.counters.bypassed.add();
            return Ok((value, Served::Bypass));
        }
        let (flight, _guard) = {
            let mut flights = self.local.flights.lock().unwrap();
            match flights.get(key) {
                // A finished flight is never joined: its value is as old as its load.
                Some(flight) if !flight.initialized() => (flight.clone(), None),
                _ => {
                    let flight: Flight<V> = Arc::default();
                    flights.insert(key.clone(), flight.clone());
                    let guard = FlightGuard { flights: &self.local.flights, key, flight: flight.clone() };
                    (flight, Some(guard))
                }
            }
        };
        let ticket = self.local.generation.load(Ordering::SeqCst);
        let mut load = Some(load);
        let mut loaded_here = false;
        let result = flight
            .get_or_try_init(|| {
                loaded_here = true;
                let load = load.take().expect("a flight is initialised once");
                self.load_through_tiers(key, load, refreshing_age.unwrap_or(self.ttl), min_version)
            })
            .await
            .cloned();
        let loaded = match result {
            Ok(loaded) if !loaded_here && !self.new_enough(&loaded.value, min_version) => {
                // Joined a load older than this caller may see: read for itself.
                let load = load.take().expect("not loaded by this caller");
                self.load_through_tiers(key, load, Duration::ZERO, min_version).await?
            }
            Ok(loaded) if !loaded_here => {
                self.counters.coalesced.add();
                let age = loaded.loaded_at.elapsed();
                let ttl_left = self.ttl.saturating_sub(age);
                return Ok((loaded.value, Served::Coalesced { age, ttl_left, shared: loaded.from_shared }));
            }
            other => other?,
        };
        let expires_at = loaded.loaded_at + self.jittered_ttl();
        if self.keep_local && Instant::now() < expires_at {
            let entry = Entry {
                value: loaded.value.clone(),
                stored_at: loaded.loaded_at,
                expires_at,
                load_time: loaded.load_time,
            };
            self.local.install(key, entry, self.version(&loaded.value), || self.local.still_current(key, ticket));
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
    async fn load_through_tiers<F, Fut, E>(
        &self,
        key: &K,
        load: F,
        younger_than: Duration,
        min_version: u64,
    ) -> Result<Loaded<V>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(V, Duration), E>>,
    {
        let mut install_with = None;
        if let Some(tier2) = &self.tier2 {
            let text = (tier2.key_text)(key);
            if let Some((stored, counter)) = tier2.shared.lookup(self.kind, &text).await {
                let found = stored.and_then(|s| Some((s.age(), s.load_time, (tier2.decode)(&s.bytes)?)));
                let usable = |(age, _, value): &(Duration, Duration, V)| {
                    *age < younger_than.min(self.ttl) && self.new_enough(value, min_version)
                };
                if let Some((age, load_time, value)) = found.filter(usable) {
                    let loaded_at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                    return Ok(Loaded { value, loaded_at, load_time, from_shared: true });
                }
                install_with = Some((text, counter));
            }
        }
        let (started, started_us) = (Instant::now(), shared::unix_us());
        let (value, age) = load().await?;
        let load_time = started.elapsed();
        // The value was as old as its source was behind when the load started.
        let loaded_at = started.checked_sub(age).unwrap_or(started);
        let ttl = self.jittered_ttl().saturating_sub(load_time + age);
        if let (Some(tier2), Some((text, counter)), false) = (&self.tier2, install_with, ttl.is_zero()) {
            if let Some(bytes) = (tier2.encode)(&value) {
                let loaded_at_us = started_us.saturating_sub(age.as_micros() as u64);
                let stored = Stored { loaded_at_us, load_time, bytes };
                tier2.shared.install(self.kind, &text, &counter, &stored, ttl, self.version(&value)).await;
            }
        }
        Ok(Loaded { value, loaded_at, load_time, from_shared: false })
    }

    /// Write-through: installs a value just committed, here and in the shared tier (telling the
    /// other nodes). Loads in flight may hold an older value, so this also invalidates them. In a
    /// versioned cache a value older than one already installed changes nothing, in either tier.
    /// Returns what the shared tier did with it ([`Written::Taken`] without one): when it
    /// [`Written::Failed`], Redis may still hold an older value for the other nodes.
    pub async fn put(&self, key: K, value: V) -> Written {
        let version = self.version(&value);
        if self.local.superseded(&key, version) {
            return Written::Superseded;
        }
        self.local.invalidate(&key);
        if self.keep_local {
            let now = Instant::now();
            let entry = Entry {
                value: value.clone(),
                stored_at: now,
                expires_at: now + self.jittered_ttl(),
                load_time: Duration::ZERO,
            };
            self.local.install(&key, entry, version, || true);
        }
        if let Some(tier2) = &self.tier2 {
            let bytes = (tier2.encode)(&value);
            let ttl = self.jittered_ttl();
            let text = (tier2.key_text)(&key);
            let written = tier2.shared.write(self.kind, &text, bytes.as_deref().map(|b| (b, ttl)), version).await;
            if written == Written::Superseded {
                // Another node installed a newer version (its invalidation may have reached this
                // node before this write was installed here): this node must not keep the older.
                self.local.invalidate(&key);
            }
            return written;
        }
        Written::Taken
    }

    /// Cache-aside: drops the key after its source changed, here, in the shared tier and on the
    /// other nodes. A load already in flight will not install what it read. Returns what the shared
    /// tier did ([`Written::Taken`] without one).
    pub async fn invalidate(&self, key: &K) -> Written {
        self.local.invalidate(key);
        match &self.tier2 {
            Some(tier2) => tier2.shared.write(self.kind, &(tier2.key_text)(key), None, None).await,
            None => Written::Taken,
        }
    }

    /// How long a value is kept (the kind's budget).
    pub fn ttl(&self) -> Duration {
        self.ttl
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
            loads_in_flight: self.local.flights.lock().unwrap().len(),
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
    async fn a_value_read_from_a_source_behind_is_kept_only_for_what_is_left_of_the_budget() {
        let cache = cache();
        let key = "k".to_owned();
        let behind = Duration::from_secs(50);
        let (v, served) = cache.get_or_load_aged(&key, || async { Ok::<_, ()>((1, behind)) }).await.unwrap();
        assert_eq!((v, served), (1, Served::Miss));
        let Served::Hit { age, ttl_left, .. } = cache.get_or_load(&key, || async { Ok::<_, ()>(2) }).await.unwrap().1
        else {
            panic!("the value is kept")
        };
        assert!(age >= behind, "served with the age it had when read: {age:?}");
        assert!(ttl_left <= Duration::from_secs(10), "only what is left of the 60 s budget: {ttl_left:?}");
        // Read already as old as the budget: returned, not kept.
        let old = "old".to_owned();
        let too_old = Duration::from_secs(60);
        assert_eq!(cache.get_or_load_aged(&old, || async { Ok::<_, ()>((1, too_old)) }).await.unwrap().0, 1);
        assert_eq!(cache.get_or_load(&old, || async { Ok::<_, ()>(2) }).await.unwrap(), (2, Served::Miss));
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

    /// Values are (version, payload) pairs in these tests.
    fn versioned() -> Cache<String, (u64, u32)> {
        Cache::new("test", Duration::from_secs(60), 1000).versioned(|v: &(u64, u32)| v.0)
    }

    #[tokio::test]
    async fn an_older_version_never_replaces_a_newer_one() {
        let cache = versioned();
        let key = "p".to_owned();
        cache.put(key.clone(), (3, 30)).await;
        cache.put(key.clone(), (2, 20)).await; // a writer that committed earlier, finishing later
        let (v, _) = cache.get_or_load(&key, || async { Ok::<_, ()>((1, 10)) }).await.unwrap();
        assert_eq!(v, (3, 30));
        // A load that read an older row is served to its caller but not installed.
        cache.local.entries.invalidate(&key);
        let (v, served) = cache.get_or_load(&key, || async { Ok::<_, ()>((2, 20)) }).await.unwrap();
        assert_eq!((v, served), ((2, 20), Served::Miss));
        assert!(cache.local.entries.get(&key).is_none(), "version 2 was installed after version 3");
        cache.put(key.clone(), (4, 40)).await;
        assert_eq!(cache.get_or_load(&key, || async { Ok::<_, ()>((0, 0)) }).await.unwrap().0, (4, 40));
    }

    #[tokio::test]
    async fn a_caller_who_must_see_a_version_is_never_served_an_older_one() {
        let cache = versioned();
        let key = "cart".to_owned();
        cache.put(key.clone(), (5, 50)).await;
        let (v, served) = cache.get_at_least(&key, 5, || async { Ok::<_, ()>((6, 60)) }).await.unwrap();
        assert_eq!(v, (5, 50));
        assert!(matches!(served, Served::Hit { .. }));
        // The write of version 6 committed, but its cache update never happened.
        let (v, served) = cache.get_at_least(&key, 6, || async { Ok::<_, ()>((6, 60)) }).await.unwrap();
        assert_eq!((v, served), ((6, 60), Served::Miss));
        assert_eq!(cache.get_or_load(&key, || async { Ok::<_, ()>((0, 0)) }).await.unwrap().0, (6, 60));
    }

    #[tokio::test]
    async fn a_cancelled_leader_leaves_no_flight_behind() {
        let cache = Arc::new(cache());
        let key = "k".to_owned();
        let leader = {
            let (cache, key) = (cache.clone(), key.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load(&key, || async {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        Ok::<_, ()>(1)
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(cache.local.flights.lock().unwrap().len(), 1);
        leader.abort(); // a client that went away
        let _ = leader.await;
        assert!(cache.local.flights.lock().unwrap().is_empty(), "the cancelled flight stayed in the map");
        assert_eq!(cache.get_or_load(&key, || async { Ok::<_, ()>(2) }).await.unwrap(), (2, Served::Miss));
    }

    #[tokio::test]
    async fn followers_are_told_the_age_of_what_they_were_given() {
        let cache = Arc::new(cache());
        let key = "slow".to_owned();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let (cache, key) = (cache.clone(), key.clone());
            tasks.spawn(async move {
                cache
                    .get_or_load(&key, || async {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Ok::<_, ()>(1)
                    })
                    .await
                    .unwrap()
                    .1
            });
        }
        let mut followers = 0;
        while let Some(served) = tasks.join_next().await {
            if let Served::Coalesced { age, shared, .. } = served.unwrap() {
                followers += 1;
                assert!(age >= Duration::from_millis(300) && !shared, "{age:?}");
            }
        }
        assert_eq!(followers, 9);
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
