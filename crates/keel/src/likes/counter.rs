//! This node's like counts: its own component of every product's PN-counter, written back to the
//! catalogue's `like_counts` at most [`FLUSH_INTERVAL`] after a like, and a copy of the other nodes'
//! components merged in every [`MERGE_INTERVAL`], so that a count is read from memory.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use keel_cache::WriteBack;
use keel_crdt::PnCounter;
use uuid::Uuid;

use crate::db::{Db, DbError, Sql};
use crate::ids::ProductId;

/// How long a counted like may wait in memory: the loss window of a crash.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// How often a node merges the components the other nodes flushed.
pub const MERGE_INTERVAL: Duration = Duration::from_millis(250);
/// A flush stamps its rows with its transaction's start (`now()`), so a row may become visible after
/// one stamped later; each merge re-reads this far behind the newest stamp it has seen. Merging a
/// component twice changes nothing (the CRDT merge is a maximum).
const MERGE_OVERLAP: &str = "10 seconds";

/// This node's component of every product's like counter, written back to `like_counts`.
pub struct LikeCounter {
    /// A fresh name per process: a component only ever grows, so a restarted node must not reuse
    /// its old name and start again from zero.
    node: String,
    /// Per product, a PN-counter holding this node's component: the likes and unlikes it accepted.
    counts: WriteBack<ProductId, PnCounter<String>>,
    /// Per product, the other nodes' components as last merged from the catalogue.
    others: RwLock<Others>,
    /// Counts read since start (the consistency table's "hits": every read is served from memory).
    reads: AtomicU64,
}

#[derive(Default)]
struct Others {
    counters: HashMap<ProductId, PnCounter<String>>,
    /// The newest `updated_at` merged so far (the catalogue's clock).
    seen_until: Option<SystemTime>,
    merged_at: Option<Instant>,
}

impl Default for LikeCounter {
    fn default() -> Self {
        LikeCounter::new()
    }
}

impl LikeCounter {
    pub fn new() -> LikeCounter {
        LikeCounter {
            node: Uuid::now_v7().to_string(),
            counts: WriteBack::new("like_count", FLUSH_INTERVAL),
            others: RwLock::default(),
            reads: AtomicU64::new(0),
        }
    }

    /// How much a crash of this node can lose.
    pub fn loss_window(&self) -> Duration {
        self.counts.loss_window()
    }

    pub fn record(&self, product: ProductId, like: bool) {
        self.counts.update(product, |counter| {
            if like {
                counter.increment(&self.node, 1);
            } else {
                counter.decrement(&self.node, 1);
            }
        });
    }

    /// This node's net contribution to `product`'s count, flushed or not.
    fn local_net(&self, product: ProductId) -> i64 {
        self.counts.read(&product, |counter| counter.map_or(0, PnCounter::value))
    }

    /// `product`'s like count as this node sees it: the other nodes' components as last merged, and
    /// its own.
    pub fn count(&self, product: ProductId) -> i64 {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let others = self.others.read().unwrap().counters.get(&product).map_or(0, PnCounter::value);
        others + self.local_net(product)
    }

    /// Reads since start, and how long ago the other nodes' components were last merged.
    pub fn read_stats(&self) -> (u64, Option<Duration>) {
        (self.reads.load(Ordering::Relaxed), self.others.read().unwrap().merged_at.map(|at| at.elapsed()))
    }

    /// Merges the components the other nodes flushed since the last merge (all of them the first
    /// time). Returns how many rows were read.
    pub async fn merge_others(&self, catalog: &Db) -> Result<usize, DbError> {
        let since = self.others.read().unwrap().seen_until;
        let client = catalog.client().await?;
        let rows = match since {
            None => {
                client
                    .rows(
                        "SELECT product_id, node, likes, unlikes, updated_at FROM like_counts WHERE node <> $1",
                        &[&self.node],
                    )
                    .await?
            }
            Some(since) => {
                client
                    .rows(
                        &format!(
                            "SELECT product_id, node, likes, unlikes, updated_at FROM like_counts
                             WHERE updated_at >= $2::timestamptz - interval '{MERGE_OVERLAP}' AND node <> $1"
                        ),
                        &[&self.node, &since],
                    )
                    .await?
            }
        };
        drop(client);
        let mut others = self.others.write().unwrap();
        for row in &rows {
            let (node, likes, unlikes): (String, i64, i64) = (row.get(1), row.get(2), row.get(3));
            let component = PnCounter::from_components([(node, likes as u64, unlikes as u64)]);
            others.counters.entry(row.get(0)).or_default().merge(&component);
            let stamped: SystemTime = row.get(4);
            others.seen_until = Some(others.seen_until.map_or(stamped, |seen| seen.max(stamped)));
        }
        others.merged_at = Some(Instant::now());
        Ok(rows.len())
    }

    /// Merges every [`MERGE_INTERVAL`] until `stop` completes.
    pub async fn run_merger(self: Arc<Self>, catalog: Db, stop: impl Future<Output = ()> + Send) {
        let mut stop = std::pin::pin!(stop);
        loop {
            tokio::select! {
                () = tokio::time::sleep(MERGE_INTERVAL) => {}
                () = &mut stop => return,
            }
            if let Err(e) = self.merge_others(&catalog).await {
                tracing::warn!(error = %e, "could not merge the other nodes' like counts; counts may lag");
            }
        }
    }

    /// Writes the changed components. Components are cumulative, so a write is idempotent and an
    /// older one never lowers a newer (`greatest`): the merge of a G-counter, in SQL.
    async fn write(&self, catalog: &Db, batch: Vec<(ProductId, PnCounter<String>)>) -> Result<(), DbError> {
        let mut columns: (Vec<ProductId>, Vec<i64>, Vec<i64>) = Default::default();
        for (product, counter) in batch {
            let (likes, unlikes) = counter.component(&self.node);
            columns.0.push(product);
            columns.1.push(likes as i64);
            columns.2.push(unlikes as i64);
        }
        catalog
            .client()
            .await?
            .exec(
                "INSERT INTO like_counts (product_id, node, likes, unlikes)
                 SELECT p, $2, l, u FROM unnest($1::uuid[], $3::bigint[], $4::bigint[]) AS c(p, l, u)
                 ON CONFLICT (product_id, node) DO UPDATE
                 SET likes = greatest(like_counts.likes, EXCLUDED.likes),
                     unlikes = greatest(like_counts.unlikes, EXCLUDED.unlikes), updated_at = now()",
                &[&columns.0, &self.node, &columns.1, &columns.2],
            )
            .await?;
        Ok(())
    }

    /// Flushes every interval until `stop` completes, then once more.
    pub async fn run_flusher(self: Arc<Self>, catalog: Db, stop: impl Future<Output = ()> + Send) {
        self.counts.run(|batch| self.write(&catalog, batch), stop).await;
    }
}
