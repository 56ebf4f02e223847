//! Read-your-writes across nodes: after a user's write is acknowledged, that user's reads see it on
//! every node, even while replicas lag by minutes, without sending all their reads to the primary.
//!
//! A write notes the primary's WAL position just after its commit, as the user's *floor* for that
//! database, in the shared tier (Redis) before the answer goes out; a read of that user's picks only a
//! replica that has replayed past the floor ([`Floor::AtLeast`]), else the primary. A floor is kept
//! as long as the longest budget: after that, every replica a read may use is past it anyway (a
//! replica within a budget has every commit older than the budget).
//!
//! Without a shared tier, or while it does not answer, no node can know another's floors: the user's
//! reads of their own data go to the primary ([`Floor::Primary`]). A database without replicas needs
//! none of this and costs nothing. One gap is left, and said: a floor that Redis did not take (it
//! failed just then) is lost; the user's reads on other nodes may then come from a replica still
//! within the budget but before the write (`keel_read_floor_errors_total` counts these).

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::GenericClient;
use keel_cache::Shared;
use tokio_postgres::types::PgLsn;

use super::replicas::{Floor, Lsn};
use super::Db;
use crate::ids::UserId;

/// The name floors are kept under in the shared tier.
const FLOORS: &str = "floor";

/// The floors of this process's users, in the shared tier.
#[derive(Clone)]
pub struct Floors {
    shared: Option<Arc<Shared>>,
    /// How long a floor is kept: the longest budget.
    keep: Duration,
}

impl Floors {
    pub fn new(shared: Option<Arc<Shared>>, keep: Duration) -> Floors {
        Floors { shared, keep }
    }

    /// Records that `user`'s write to `db` committed, on `client` (the connection that committed
    /// it): call before answering. Costs a query and a Redis call only when `db` has replicas and
    /// there is a shared tier. A floor that cannot be kept is counted and logged, not an error: the
    /// write is committed, and failing its request would only have the client repeat it.
    pub async fn wrote(&self, db: &Db, client: &impl GenericClient, user: UserId) {
        let Some(routing) = db.routing().filter(|r| r.has_replicas()) else { return };
        let Some(shared) = &self.shared else { return };
        let kept = match client.query_one("SELECT pg_current_wal_insert_lsn()", &[]).await {
            Ok(row) => {
                let Lsn(position) = routing.end_of_record(Lsn::from(row.get::<_, PgLsn>(0)));
                shared.raise_floor(FLOORS, &key(routing.database(), user), position, self.keep).await
            }
            Err(_) => false,
        };
        if !kept {
            metrics::counter!("keel_read_floor_errors_total").increment(1);
            tracing::warn!(%user, database = routing.database(),
                "could not keep a read-your-writes floor: this user's reads on other nodes may miss the write for up \
                 to the budget");
        }
    }

    /// What `user`'s read of their own data on `db` must see.
    pub async fn of(&self, db: &Db, user: UserId) -> Floor {
        let Some(routing) = db.routing().filter(|r| r.has_replicas()) else { return Floor::Any };
        let Some(shared) = &self.shared else { return Floor::Primary };
        match shared.floor(FLOORS, &key(routing.database(), user)).await {
            Some(Some(position)) => Floor::AtLeast(Lsn(position)),
            Some(None) => Floor::Any,
            None => Floor::Primary,
        }
    }
}

fn key(database: &str, user: UserId) -> String {
    format!("{database}:{user}")
}
