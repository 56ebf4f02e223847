//! Like counts, read from memory: every product's PN-counter, merged from the tallies the shards
//! keep (see [`crate::likes`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use keel_crdt::PnCounter;

use crate::db::{Databases, Db, DbError, Sql};
use crate::ids::ProductId;

/// How often a node merges the tallies the shards changed.
pub const MERGE_INTERVAL: Duration = Duration::from_millis(250);
/// How often, at least, each shard's tallies are merged under a connection budget (many shards,
/// [`crate::db::budget`]): on the API's visit of the shard for its revoked sessions
/// ([`crate::http::auth::revocations`]), every quarter of the session budget (1.25 s by default)
/// or this, whichever is shorter. Three quarters of the like counts' 2 s budget, leaving a visit
/// half a second to be late. Every 250 ms, 100 shards would need 400 visits a second, and with
/// fewer connections than shards most visits open one.
pub const MERGE_INTERVAL_MANY_SHARDS: Duration = Duration::from_millis(1500);
/// Rows of one product's tally per shard: a like updates one, chosen at random, so likes of one hot
/// product rarely wait for each other's row lock.
pub const STRIPES: i16 = 16;
/// A tally row is stamped with its transaction's start (`now()`), so a row may become visible after
/// one stamped later; each merge re-reads this far behind the newest stamp it has seen. Merging a
/// component twice changes nothing (the CRDT merge is a maximum).
const MERGE_OVERLAP: &str = "10 seconds";

/// One component of a product's counter as a shard holds it: cumulative likes and unlikes of one
/// stripe, named `<shard>.<stripe>`.
pub struct Tally {
    pub shard: String,
    pub stripe: i16,
    pub likes: i64,
    pub unlikes: i64,
}

/// Every product's like counter as this node last merged it.
#[derive(Default)]
pub struct LikeCounter {
    counters: RwLock<HashMap<ProductId, PnCounter<String>>>,
    /// Per shard (by name), the newest `updated_at` merged so far (that shard's clock).
    seen_until: Mutex<HashMap<String, SystemTime>>,
    /// Per shard (by name), when its tallies were last merged.
    merged_at: Mutex<HashMap<String, Instant>>,
    /// Counts served since start (the consistency table's "hits": every read is served from memory).
    reads: AtomicU64,
}

impl LikeCounter {
    pub fn new() -> LikeCounter {
        LikeCounter::default()
    }

    /// Merges one component, as a like's own statement returned it: the node that took the like
    /// counts it at once, without waiting for the next merge.
    pub fn merge(&self, product: ProductId, tally: &Tally) {
        let name = format!("{}.{}", tally.shard, tally.stripe);
        let component = PnCounter::from_components([(name, tally.likes as u64, tally.unlikes as u64)]);
        self.counters.write().unwrap().entry(product).or_default().merge(&component);
    }

    /// `product`'s like count, for a response: counted as a read in the consistency table.
    pub fn count(&self, product: ProductId) -> i64 {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.current(product)
    }

    /// `product`'s like count as merged so far, not counted as a read (events, cached copies).
    pub fn current(&self, product: ProductId) -> i64 {
        self.counters.read().unwrap().get(&product).map_or(0, PnCounter::value)
    }

    /// Reads since start, and how long ago the tallies were last merged (those of the shard merged
    /// least recently).
    pub fn read_stats(&self) -> (u64, Option<Duration>) {
        let oldest = self.merged_at.lock().unwrap().values().min().map(|at| at.elapsed());
        (self.reads.load(Ordering::Relaxed), oldest)
    }

    /// Merges the tallies every shard changed since the last merge (all of them the first time).
    /// Returns how many rows were read.
    pub async fn merge_shards(&self, db: &Databases) -> Result<usize, DbError> {
        let mut read = 0;
        let shards = db.shards();
        for (_, shard) in shards.all() {
            read += self.merge_shard(shard).await?;
        }
        let now = Instant::now();
        let mut merged_at = self.merged_at.lock().unwrap();
        for (_, shard) in shards.all() {
            merged_at.insert(shard.name().to_owned(), now);
        }
        Ok(read)
    }

    /// Merges the tallies one shard changed since its last merge: under a connection budget, on the
    /// API's visit of the shard for its revoked sessions, on the connection that visit just used
    /// (see [`MERGE_INTERVAL_MANY_SHARDS`]).
    pub async fn merge_one_shard(&self, shard: &Db) {
        match self.merge_shard(shard).await {
            Ok(_) => {
                self.merged_at.lock().unwrap().insert(shard.name().to_owned(), Instant::now());
            }
            Err(e) => {
                tracing::warn!(db = shard.name(), error = %e, "could not merge the shard's like tallies; counts may lag")
            }
        }
    }

    async fn merge_shard(&self, shard: &Db) -> Result<usize, DbError> {
        let since = self.seen_until.lock().unwrap().get(shard.name()).copied();
        let client = shard.client().await?;
        let columns = "product_id, stripe, likes, unlikes, updated_at";
        let rows = match since {
            None => client.rows(&format!("SELECT {columns} FROM like_tallies"), &[]).await?,
            // A range scan of the index on updated_at.
            Some(since) => {
                let changed = format!(
                    "SELECT {columns} FROM like_tallies WHERE updated_at >= $1::timestamptz - interval '{MERGE_OVERLAP}'"
                );
                client.rows(&changed, &[&since]).await?
            }
        };
        drop(client);
        let mut newest = since;
        for row in &rows {
            let tally =
                Tally { shard: shard.name().to_owned(), stripe: row.get(1), likes: row.get(2), unlikes: row.get(3) };
            self.merge(row.get(0), &tally);
            let stamped: SystemTime = row.get(4);
            newest = Some(newest.map_or(stamped, |seen| seen.max(stamped)));
        }
        if let Some(newest) = newest {
            self.seen_until.lock().unwrap().insert(shard.name().to_owned(), newest);
        }
        Ok(rows.len())
    }

    /// Merges every [`MERGE_INTERVAL`] until `stop` completes.
    pub async fn run_merger(self: Arc<Self>, db: Arc<Databases>, stop: impl Future<Output = ()> + Send) {
        let mut stop = std::pin::pin!(stop);
        loop {
            tokio::select! {
                () = tokio::time::sleep(MERGE_INTERVAL) => {}
                () = &mut stop => return,
            }
            if let Err(e) = self.merge_shards(&db).await {
                tracing::warn!(error = %e, "could not merge the shards' like tallies; counts may lag");
            }
        }
    }
}
