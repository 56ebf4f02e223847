//! The shared tier (L2): one Redis seen by every node, and the channel their invalidations travel on.
//!
//! - **Values** live under `<namespace>:<kind>:v:<key>`, stamped with the time they were read from
//!   the source, and expire when their budget runs out (so a node installing one in its L1 keeps the
//!   original age).
//! - **The stale-install race across nodes** is closed the same way as in one process: every write
//!   bumps a per-key invalidation counter (`<namespace>:<kind>:i:<key>`) in the same script that
//!   changes the value; a reader notes the counter when it misses and installs what it loaded only if
//!   the counter has not moved since.
//! - **Versions** (versioned caches): a value's version lives beside it (`<namespace>:<kind>:n:<key>`),
//!   and both scripts that store a value refuse one older than the version stored: a compare-and-set,
//!   so writers and readers finishing out of order never put an older value back.
//! - **Cross-node invalidation**: the write's script also publishes `<node> <kind> <key>` on
//!   `<namespace>:invalidate`; every other node drops the key from its L1. A node that was cut off
//!   from the channel clears its shared kinds' L1 when it reconnects, since it may have missed some.
//! - **Redis is optional and may fail.** Every call has a short timeout; the first failure opens a
//!   breaker (a log line, `keel_cache_l2_up` 0, `keel_cache_l2_errors_total`) and calls skip Redis
//!   (reads fall back to L1 and the source) until one probe a second succeeds again. Writes are
//!   always tried: one that is skipped would leave an older value in Redis for other nodes to find
//!   when it answers again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;

/// How long one Redis call may take before the tier is considered down.
const CALL_TIMEOUT: Duration = Duration::from_millis(250);
/// How often a down tier is probed.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How long an invalidation counter outlives its last write: longer than any load may take.
const COUNTER_TTL_MS: u64 = 120_000;

/// Reads a value and its key's invalidation counter in one round trip.
const LOOKUP: &str = "return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2]) or '0'}";
/// Installs a loaded value unless the key was written since the reader noted the counter (ARGV[1])
/// or, for a versioned value (ARGV[4] not empty), a newer version is stored; the version is kept for
/// ARGV[5] ms.
const INSTALL: &str = "if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 0 end \
    if ARGV[4] ~= '' then \
        if tonumber(ARGV[4]) < tonumber(redis.call('GET', KEYS[3]) or '-1') then return 0 end \
        redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5]) end \
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1";
/// A write: unless a newer version is stored (ARGV[6] not empty: versioned), bump the counter, set
/// (ARGV[3] non-empty) or drop the value, keep its version for ARGV[7] ms, tell the other nodes.
const WRITE: &str = "if ARGV[6] ~= '' then \
        if tonumber(ARGV[6]) < tonumber(redis.call('GET', KEYS[3]) or '-1') then return 0 end \
        redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[7]) end \
    redis.call('INCR', KEYS[2]) redis.call('PEXPIRE', KEYS[2], ARGV[1]) \
    if ARGV[3] ~= '' then redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4]) else redis.call('DEL', KEYS[1]) end \
    redis.call('PUBLISH', ARGV[2], ARGV[5]) return 1";

/// Raises a floor (16 hex digits, so that comparing the text compares the numbers) to ARGV[1], and
/// keeps it ARGV[2] ms from now either way.
const RAISE: &str = "local v = redis.call('GET', KEYS[1]) \
    if not v or ARGV[1] > v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) \
    else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 1";

/// What the shared tier did with a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Taken,
    /// A newer version was already stored: nothing changed.
    Superseded,
    /// Redis did not answer (in time).
    Failed,
}

/// What a node does when another node says a key changed (`None`: any key may have).
pub(crate) type OnRemoteWrite = Arc<dyn Fn(Option<&str>) + Send + Sync>;

/// A value as stored in Redis.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stored {
    /// When it was read from the source (Unix microseconds: the age of a value read from Redis must
    /// not round down, or a node could keep it a little past its budget).
    pub loaded_at_us: u64,
    /// How long that read took, for early refresh.
    pub load_time: Duration,
    pub bytes: Vec<u8>,
}

impl Stored {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.bytes.len());
        out.extend_from_slice(&self.loaded_at_us.to_le_bytes());
        out.extend_from_slice(&(self.load_time.as_micros() as u64).to_le_bytes());
        out.extend_from_slice(&self.bytes);
        out
    }

    fn decode(raw: &[u8]) -> Option<Stored> {
        let loaded_at_us = u64::from_le_bytes(raw.get(..8)?.try_into().ok()?);
        let load_time = Duration::from_micros(u64::from_le_bytes(raw.get(8..16)?.try_into().ok()?));
        Some(Stored { loaded_at_us, load_time, bytes: raw[16..].to_vec() })
    }

    /// How old the value is now.
    pub fn age(&self) -> Duration {
        Duration::from_micros(unix_us().saturating_sub(self.loaded_at_us))
    }
}

pub(crate) fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

#[derive(Debug)]
struct Health {
    up: bool,
    /// While down: when the next call may probe Redis.
    retry_at: Instant,
}

/// The shared tier, one per process; caches opt in with [`crate::Cache::shared`].
pub struct Shared {
    client: redis::Client,
    namespace: String,
    /// This process's name on the invalidation channel (its own messages are ignored).
    node: String,
    connection: Mutex<Option<MultiplexedConnection>>,
    health: Mutex<Health>,
    errors: AtomicU64,
    listeners: Mutex<HashMap<&'static str, OnRemoteWrite>>,
    subscriber: Mutex<Option<tokio::task::JoinHandle<()>>>,
    lookup: redis::Script,
    install: redis::Script,
    write: redis::Script,
    raise: redis::Script,
}

/// The state of the shared tier, for reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharedStats {
    pub up: bool,
    /// Failed or timed-out calls since start.
    pub errors: u64,
}

impl Shared {
    /// A shared tier at `url` (`redis://host:port[/db]`), keys under `namespace`. Waits briefly for
    /// the subscription to the invalidation channel (which then runs until the tier is dropped), so
    /// that caches start out listening; Redis may also be down, or come up after the node does.
    pub async fn connect(url: &str, namespace: &str) -> Result<Arc<Shared>, String> {
        let client = redis::Client::open(url).map_err(|e| format!("not a Redis URL: {e}"))?;
        let shared = Arc::new(Shared {
            client,
            namespace: namespace.to_owned(),
            node: keel_random::hex(8),
            connection: Mutex::new(None),
            health: Mutex::new(Health { up: true, retry_at: Instant::now() }),
            errors: AtomicU64::new(0),
            listeners: Mutex::default(),
            subscriber: Mutex::new(None),
            lookup: redis::Script::new(LOOKUP),
            install: redis::Script::new(INSTALL),
            write: redis::Script::new(WRITE),
            raise: redis::Script::new(RAISE),
        });
        let (first_attempt_tx, first_attempt_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(subscribe(Arc::downgrade(&shared), first_attempt_tx));
        *shared.subscriber.lock().unwrap() = Some(task);
        metrics::gauge!("keel_cache_l2_up").set(1.0);
        let _ = first_attempt_rx.await;
        Ok(shared)
    }

    pub fn stats(&self) -> SharedStats {
        SharedStats { up: self.health.lock().unwrap().up, errors: self.errors.load(Ordering::Relaxed) }
    }

    /// Whether a call may go to Redis now: always while up; while down, once per retry interval.
    pub(crate) fn available(&self) -> bool {
        let mut health = self.health.lock().unwrap();
        if health.up {
            return true;
        }
        let now = Instant::now();
        if now < health.retry_at {
            return false;
        }
        health.retry_at = now + RETRY_EVERY;
        true
    }

    /// Whether reads can count on the tier right now (no outage noticed).
    pub fn is_up(&self) -> bool {
        self.health.lock().unwrap().up
    }

    pub(crate) fn listen(&self, kind: &'static str, on_remote_write: OnRemoteWrite) {
        self.listeners.lock().unwrap().insert(kind, on_remote_write);
    }

    /// Hears what other nodes [`Shared::announce`] under `kind` (a name no cache uses): `Some(key)`
    /// for each announcement, `None` after this node was cut off from the channel, when it may have
    /// missed some.
    pub fn on_announcement(&self, kind: &'static str, hear: impl Fn(Option<&str>) + Send + Sync + 'static) {
        self.listen(kind, Arc::new(hear));
    }

    /// Tells every other node listening for `kind` about `key`, on the invalidation channel (at most
    /// once: a node cut off at that moment does not hear it, and is told so with `None`). Whether
    /// Redis took the message.
    pub async fn announce(&self, kind: &'static str, key: &str) -> bool {
        let message = format!("{} {kind} {key}", self.node);
        let channel = self.channel();
        let published: Option<i64> = self
            .call(kind, "announce", true, |mut c| async move {
                redis::cmd("PUBLISH").arg(channel).arg(message).query_async(&mut c).await
            })
            .await;
        published.is_some()
    }

    /// Raises the floor `key` of `kind` to at least `value`, kept `ttl` from now: a number that only
    /// grows while it lives (what a node must have seen before it answers someone). Whether Redis
    /// took it.
    pub async fn raise_floor(&self, kind: &'static str, key: &str, value: u64, ttl: Duration) -> bool {
        let floor_key = format!("{}:{kind}:f:{key}", self.namespace);
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let done: Option<i64> = self
            .call(kind, "raise", true, |mut c| async move {
                self.raise.key(floor_key).arg(format!("{value:016x}")).arg(ttl_ms).invoke_async(&mut c).await
            })
            .await;
        done.is_some()
    }

    /// The floor `key` of `kind`: `Some(None)` when there is none (never raised, or expired),
    /// `None` when Redis cannot say (down, or no answer in time).
    pub async fn floor(&self, kind: &'static str, key: &str) -> Option<Option<u64>> {
        let floor_key = format!("{}:{kind}:f:{key}", self.namespace);
        let raw: Option<String> =
            self.call(kind, "floor", false, |mut c| async move {
                redis::cmd("GET").arg(floor_key).query_async(&mut c).await
            })
            .await?;
        // Anything but what `raise_floor` writes is no floor at all: say "cannot say".
        match raw {
            None => Some(None),
            Some(text) => u64::from_str_radix(&text, 16).ok().map(Some),
        }
    }

    /// The value's key, its invalidation counter's and its version's.
    fn keys(&self, kind: &str, key: &str) -> [String; 3] {
        ["v", "i", "n"].map(|part| format!("{}:{kind}:{part}:{key}", self.namespace))
    }

    /// The stored value of a key, if any, and the key's invalidation counter to install with.
    pub(crate) async fn lookup(&self, kind: &'static str, key: &str) -> Option<(Option<Stored>, String)> {
        let [value_key, counter_key, _] = self.keys(kind, key);
        let (raw, counter): (Option<Vec<u8>>, String) = self
            .call(kind, "lookup", false, |mut c| async move {
                self.lookup.key(value_key).key(counter_key).invoke_async(&mut c).await
            })
            .await?;
        Some((raw.as_deref().and_then(Stored::decode), counter))
    }

    /// Stores what a reader loaded, unless the key was written since `counter` was read or a newer
    /// `version` is stored.
    pub(crate) async fn install(
        &self,
        kind: &'static str,
        key: &str,
        counter: &str,
        value: &Stored,
        ttl: Duration,
        version: Option<u64>,
    ) {
        let [value_key, counter_key, version_key] = self.keys(kind, key);
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let _: Option<i64> = self
            .call(kind, "install", false, |mut c| async move {
                self.install
                    .key(value_key)
                    .key(counter_key)
                    .key(version_key)
                    .arg(counter)
                    .arg(value.encode())
                    .arg(ttl_ms)
                    .arg(version.map(|v| v.to_string()).unwrap_or_default())
                    .arg(ttl_ms.max(COUNTER_TTL_MS))
                    .invoke_async(&mut c)
                    .await
            })
            .await;
    }

    /// A write committed at the source: stores its value (write-through) or drops the key
    /// (cache-aside), and tells the other nodes; a value older than the stored `version` changes
    /// nothing. Returns what Redis did with it.
    pub async fn write(
        &self,
        kind: &'static str,
        key: &str,
        value: Option<(&[u8], Duration)>,
        version: Option<u64>,
    ) -> Written {
        let [value_key, counter_key, version_key] = self.keys(kind, key);
        let (stored, ttl_ms) = match value {
            Some((bytes, ttl)) => (
                Stored { loaded_at_us: unix_us(), load_time: Duration::ZERO, bytes: bytes.to_vec() }.encode(),
                ttl.as_millis().max(1) as u64,
            ),
            None => (Vec::new(), 0),
        };
        let message = format!("{} {kind} {key}", self.node);
        let channel = self.channel();
        let done: Option<i64> = self
            .call(kind, "write", true, |mut c| async move {
                self.write
                    .key(value_key)
                    .key(counter_key)
                    .key(version_key)
                    .arg(COUNTER_TTL_MS)
                    .arg(channel)
                    .arg(stored)
                    .arg(ttl_ms)
                    .arg(message)
                    .arg(version.map(|v| v.to_string()).unwrap_or_default())
                    .arg(ttl_ms.max(COUNTER_TTL_MS))
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        match done {
            Some(1) => Written::Taken,
            Some(_) => Written::Superseded,
            None => Written::Failed,
        }
    }

    fn channel(&self) -> String {
        format!("{}:invalidate", self.namespace)
    }

    /// Runs one call with the timeout, keeping the breaker: `None` when the tier is down (unless
    /// `even_if_down`) or fails.
    async fn call<T, F, Fut>(&self, kind: &'static str, op: &'static str, even_if_down: bool, call: F) -> Option<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if !even_if_down && !self.available() {
            return None;
        }
        let result = tokio::time::timeout(CALL_TIMEOUT, async {
            let connection = self.connection().await?;
            call(connection).await
        })
        .await
        .map_err(|_| format!("no answer within {CALL_TIMEOUT:?}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
        match result {
            Ok(value) => {
                self.mark_up();
                Some(value)
            }
            Err(error) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("keel_cache_l2_errors_total", "kind" => kind, "op" => op).increment(1);
                *self.connection.lock().unwrap() = None;
                self.mark_down(&error);
                None
            }
        }
    }

    async fn connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        if let Some(connection) = self.connection.lock().unwrap().clone() {
            return Ok(connection);
        }
        let connection = self.client.get_multiplexed_async_connection().await?;
        *self.connection.lock().unwrap() = Some(connection.clone());
        Ok(connection)
    }

    fn mark_up(&self) {
        let mut health = self.health.lock().unwrap();
        if !health.up {
            health.up = true;
            metrics::gauge!("keel_cache_l2_up").set(1.0);
            tracing::info!("the shared cache (Redis) answers again: using it");
        }
    }

    fn mark_down(&self, error: &str) {
        let mut health = self.health.lock().unwrap();
        health.retry_at = Instant::now() + RETRY_EVERY;
        if health.up {
            health.up = false;
            metrics::gauge!("keel_cache_l2_up").set(0.0);
            tracing::warn!(%error, "the shared cache (Redis) is unavailable: serving from this node's cache and the database");
        }
    }

    fn remote_write(&self, message: &[u8]) {
        let Ok(message) = std::str::from_utf8(message) else { return };
        let mut parts = message.splitn(3, ' ');
        let (Some(node), Some(kind), Some(key)) = (parts.next(), parts.next(), parts.next()) else { return };
        if node == self.node {
            return;
        }
        let listener = self.listeners.lock().unwrap().get(kind).cloned();
        if let Some(listener) = listener {
            listener(Some(key));
        }
    }

    fn forget_everything(&self) {
        let listeners: Vec<OnRemoteWrite> = self.listeners.lock().unwrap().values().cloned().collect();
        for listener in listeners {
            listener(None);
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(task) = self.subscriber.lock().unwrap().take() {
            task.abort();
        }
    }
}

/// Listens on the invalidation channel for as long as the tier exists, reconnecting after a loss.
/// `first_attempt` hears when the first subscription is made or has failed.
async fn subscribe(shared: Weak<Shared>, first_attempt: tokio::sync::oneshot::Sender<()>) {
    let mut first_attempt = Some(first_attempt);
    let mut connected_before = false;
    loop {
        let Some((client, channel)) = shared.upgrade().map(|s| (s.client.clone(), s.channel())) else { return };
        let subscription = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let subscribed = tokio::time::timeout(CALL_TIMEOUT * 4, subscription).await;
        if let Some(first_attempt) = first_attempt.take() {
            let _ = first_attempt.send(());
        }
        if let Ok(Ok(mut pubsub)) = subscribed {
            if let Some(shared) = shared.upgrade() {
                // Whatever was published while this node was not listening is lost.
                shared.forget_everything();
                if connected_before {
                    tracing::info!("listening to cache invalidations again; this node's shared kinds were cleared");
                }
            }
            connected_before = true;
            let mut messages = pubsub.on_message();
            while let Some(message) = messages.next().await {
                let Some(shared) = shared.upgrade() else { return };
                shared.remote_write(message.get_payload_bytes());
            }
            tracing::warn!(
                "lost the cache invalidation channel: this node's cache may serve values up to their budget old"
            );
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_value_round_trips() {
        let stored = Stored {
            loaded_at_us: 1_700_000_000_123_456,
            load_time: Duration::from_micros(1500),
            bytes: b"{}".to_vec(),
        };
        assert_eq!(Stored::decode(&stored.encode()), Some(stored));
        assert_eq!(Stored::decode(b"short"), None);
    }
}
