//! Deleting an account (the right to erasure): the owner asks, with a recent sign-in, and an erasure
//! job removes their personal data from everywhere Keel put it.
//!
//! **Asking** (`DELETE /v1/users/{id}`) marks the user, locks the account (sign-in and refresh
//! refuse it) and ends every session, in one transaction with the erasure job (the outbox): the
//! account is gone for its owner once the 202 is sent, and the erasure exists exactly when that
//! committed.
//!
//! **The job** ([`erase`]) runs these steps in order, each safe to repeat: a run after a crash finds
//! part of the work done and does the rest.
//!
//! 1. Refuses (a retry, logged) while a table holds user ids that this module does not list as
//!    erased or kept, and waits until none of the user's orders is pending: the saga needs them.
//! 2. Withdraws their likes in batches, each like counted as an unlike in the statement that deletes
//!    it, as an unlike is ([`crate::likes`]): like counts stay exact, and a batch is done or not.
//!    Then everyone who followed them stops following them, on each follower's shard
//!    ([`crate::feed::follows::erased_user_is_unfollowed`]).
//! 3. In the catalogue: deletes webhook deliveries and queued jobs that name them (by id or by
//!    address), re-points their stock reservations.
//! 4. On their shard, in one transaction: their sessions, one-time codes, cart, idempotency records,
//!    the jobs that name them (with their e-mail delivery records), their follows, activities and feed
//!    (with the events that end each follow's other side and take each activity out of every feed,
//!    carrying their id only) and the user row go; the kept rows
//!    are re-pointed; the `user.deleted` event is written for webhooks. It waits while a job that
//!    names them is being handled (its handler may still read their row).
//! 5. Frees their e-mail claims (the address can sign up again: only now, so that nothing of a new
//!    account's is taken for theirs by address), sweeps the catalogue once more for a delivery a
//!    handler made meanwhile, and drops their profile and cart from every node's memory and from
//!    Redis. A run that finds no user row (a repeat after step 4) does only this.
//!
//! **Kept, anonymised**: orders and their items, the wallet, its deposits and debits, and payments:
//! the shop's accounts, which it must keep (GDPR art. 17(3)(b): a legal obligation, tax law). They
//! carry no name or e-mail; their `user_id` is re-pointed to a pseudonym (`users.erased_as`), a
//! random id that nothing in Keel links to the person, so they no longer name them, while one
//! customer's rows still add up (a wallet is still the sum of its ledger). The pseudonym falls in
//! the user's bucket, so the rows stay where their id routes (the reconciler finds a reservation's
//! order through it). A payment keeps the provider's payment id: the provider's records are matched
//! by it.
//!
//! The search index holds products only: nothing there to erase. What names the user's id
//! afterwards is the erasure's own record: its job, the `user.deleted` event and that event's
//! webhook deliveries, which carry the id and nothing else, until retention prunes them.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use keel_outbox::{Job, JobError, KindOptions};
use serde::{Deserialize, Serialize};

use super::sessions;
use super::AccountsState;
use crate::carts::CartCache;
use crate::db::{bucket_of, Databases, Db, DbError, PgError, Sql};
use crate::events::{self, Event};
use crate::http::auth::AuthSession;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{parse_id, Path};
use crate::http::trace::TraceContext;
use crate::ids::UserId;
use crate::users::ProfileCache;

/// The job that erases a user's personal data (not subscribable: an internal step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Erasure {
    pub user_id: UserId,
}

impl Event for Erasure {
    const NAME: &'static str = "user.erasure";
}

/// A user's account was deleted at their request and their personal data erased. Carries the id
/// only: what it was is what the subscribers must forget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserDeleted {
    pub user_id: UserId,
}

impl Event for UserDeleted {
    const NAME: &'static str = "user.deleted";
}

/// Likes withdrawn per statement: a user with very many holds no lock long, and a run cut off keeps
/// the batches it finished.
const LIKES_PER_BATCH: i64 = 500;

/// How soon a run that has to wait (pending orders, a job about the user being handled) looks again.
const WAIT: Duration = Duration::from_secs(1);

#[utoipa::path(delete, path = "/v1/users/{id}", tag = "users",
    params(("id" = String, Path, description = "The user's id")),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Deleted: signed out everywhere and no sign-in any more; the personal data \
            is erased shortly after (orders and ledger rows are kept, anonymised), and `user.deleted` is sent to \
            webhooks"),
        (status = 401, description = "No valid token, or its session has ended", body = Problem),
        (status = 403, description = "Not the owner, the admin token, or a session signed in too long ago \
            (`recent_sign_in`): sign in again", body = Problem),
        (status = 404, description = "No such user", body = Problem),
    ))]
pub async fn delete_user(
    State(state): State<AccountsState>,
    caller: AuthSession,
    trace: TraceContext,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let user = parse_id::<UserId>("user", &id)?;
    if caller.user != user {
        return Err(ApiError::Forbidden("only the owner may delete an account".into()));
    }
    let shard = state.db.shard_of(user);
    let mut client = shard.client().await?;
    let tx = client.transaction().await?;
    // The sign-in is the session's creation: `issued_at` moves with every refresh, so a stolen
    // refresh token would otherwise count as a recent sign-in.
    let session = tx
        .maybe_row(
            "SELECT s.created_at > now() - make_interval(secs => $3) AS recent
             FROM sessions s JOIN users u ON u.id = s.user_id
             WHERE s.id = $1 AND s.user_id = $2 AND s.revoked_at IS NULL FOR UPDATE OF u",
            &[&caller.session, &user, &state.config.recent_sign_in.as_secs_f64()],
        )
        .await?
        .ok_or_else(|| ApiError::Unauthorized("the session has ended: sign in again".into()))?;
    if !session.get::<_, bool>("recent") {
        return Err(ApiError::Forbidden(format!(
            "deleting the account needs a sign-in within the last {} seconds: sign in again, then delete",
            state.config.recent_sign_in.as_secs()
        )));
    }
    // Locked as well, so sign-in and refresh refuse the account until its row is gone.
    tx.exec(
        "UPDATE users SET erasure_requested_at = now(), erased_as = $2, locked_at = coalesce(locked_at, now())
         WHERE id = $1",
        &[&user, &pseudonym_for(user)],
    )
    .await?;
    let revoked = sessions::revoke(&tx, user, None, "account deleted").await?;
    let job = events::event(&Erasure { user_id: user }, user, Some(trace.traceparent()));
    keel_outbox::enqueue(&tx, &job).await?;
    shard.commit_jobs(tx).await?;
    state.auth.revocations.revoked(&revoked).await;
    tracing::info!(%user, "account deleted at its owner's request; erasure queued");
    Ok(StatusCode::ACCEPTED)
}

/// A random id in `user`'s bucket (so on the shard `user`'s rows are on), linked to `user` by
/// nothing but the row it is written to until the erasure removes that row. One in 1,024 random ids
/// falls in a given bucket: a thousand tries, on average, of a hash of 36 bytes.
fn pseudonym_for(user: UserId) -> UserId {
    let bucket = bucket_of(user);
    loop {
        let mut bytes = [0u8; 16];
        keel_random::secure_bytes(&mut bytes);
        let candidate = UserId::from_uuid(uuid::Builder::from_random_bytes(bytes).into_uuid());
        if bucket_of(candidate) == bucket {
            return candidate;
        }
    }
}

/// How erasure jobs run: never given up (an accepted erasure must finish), retried quickly while
/// they wait for something, a few at once.
pub fn options(timeout: Duration) -> KindOptions {
    KindOptions {
        timeout,
        concurrency: 4,
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_secs(60),
        ..KindOptions::default()
    }
    .retry_forever()
}

/// What the erasure needs to know of a user marked for it, read from their row while it exists.
struct Marked {
    /// The texts that name them in a payload or body: their id, and every address they used (their
    /// own, and one a code was sent to), lower-cased.
    needles: Vec<String>,
    erased_as: UserId,
}

/// `column` (text) contains one of the needles (`$1`). A substring test, not `LIKE`: an address's
/// `_` would be a wildcard there.
fn names_them(column: &str) -> String {
    format!("EXISTS (SELECT 1 FROM unnest($1::text[]) AS n WHERE strpos(lower({column}), n) > 0)")
}

/// The caches that hold a user's data, to drop an erased user's from (the workers' own, which tell
/// every node through the shared tier).
pub struct Caches<'a> {
    pub profiles: &'a ProfileCache,
    pub carts: &'a CartCache,
}

/// Runs (or resumes) the erasure of one user (see the module's comment for the steps).
pub async fn erase(db: &Databases, caches: Caches<'_>, job: &Job) -> Result<(), JobError> {
    let Erasure { user_id: user } = Erasure::from_job(job)?;
    let shard = &*db.shard_of(user);
    if let Some(marked) = marked(shard, user).await? {
        refuse_unknown_tables(&shard.client().await?, &[&["likes"], ERASED, KEPT].concat()).await?;
        refuse_unknown_tables(&db.catalog.client().await?, CATALOG_TABLES).await?;
        if has_pending_orders(shard, user).await? {
            return Err(JobError::retry_in("waiting for the user's pending orders to be decided", WAIT));
        }
        withdraw_likes(shard, user).await?;
        crate::feed::follows::erased_user_is_unfollowed(db, user).await?;
        erase_in_catalog(&db.catalog, user, &marked).await?;
        erase_on_shard(shard, job, user, &marked).await?;
        tracing::info!(%user, "erased the user's data on their shard and in the catalogue");
    }
    sweep(&db.catalog, caches, user).await
}

/// The user's row, if it is still there and marked for erasure. A row that is not marked is an
/// error: nobody asked to erase that user.
async fn marked(shard: &Db, user: UserId) -> Result<Option<Marked>, JobError> {
    let client = shard.client().await?;
    let Some(row) = client
        .maybe_row(
            "SELECT u.erasure_requested_at IS NOT NULL AS asked, u.erased_as,
                    array(SELECT lower(u.email) UNION SELECT lower(c.email) FROM one_time_codes c WHERE c.user_id = u.id)
                        AS emails
             FROM users u WHERE u.id = $1",
            &[&user],
        )
        .await
        .map_err(DbError::from)?
    else {
        return Ok(None);
    };
    let (Some(erased_as), true) = (row.get::<_, Option<UserId>>("erased_as"), row.get::<_, bool>("asked")) else {
        return Err(JobError::permanent(format!("user {user} is not marked for erasure: nothing was erased")));
    };
    let mut needles = vec![user.to_string()];
    needles.extend(row.get::<_, Vec<String>>("emails"));
    Ok(Some(Marked { needles, erased_as }))
}

async fn has_pending_orders(shard: &Db, user: UserId) -> Result<bool, DbError> {
    let client = shard.client().await?;
    let row =
        client.row("SELECT EXISTS (SELECT 1 FROM orders WHERE user_id = $1 AND status = 'pending')", &[&user]).await?;
    Ok(row.get(0))
}

/// Deletes up to `limit` of the user's likes (`None`: all) and counts each as an unlike in the same
/// statement, as `DELETE /v1/products/{id}/like` does: the counts can never drift from the rows. A
/// user likes a product once, so the rows of one statement touch distinct tallies.
async fn withdraw(sql: &impl Sql, user: UserId, limit: Option<i64>) -> Result<u64, PgError> {
    let stripe = (keel_random::u64() % crate::likes::counter::STRIPES as u64) as i16;
    sql.exec(
        "WITH gone AS (
             DELETE FROM likes WHERE user_id = $1
                 AND product_id IN (SELECT product_id FROM likes WHERE user_id = $1 LIMIT $2)
             RETURNING product_id
         )
         INSERT INTO like_tallies (product_id, stripe, unlikes) SELECT product_id, $3, 1 FROM gone
         ON CONFLICT (product_id, stripe) DO UPDATE SET unlikes = like_tallies.unlikes + 1, updated_at = now()",
        &[&user, &limit, &stripe],
    )
    .await
}

async fn withdraw_likes(shard: &Db, user: UserId) -> Result<(), DbError> {
    loop {
        let client = shard.client().await?;
        if withdraw(&client, user, Some(LIKES_PER_BATCH)).await? < LIKES_PER_BATCH as u64 {
            return Ok(());
        }
    }
}

/// The catalogue's tables with a `user_id`: the claims are erased (last, in [`sweep`]), the
/// reservations kept.
const CATALOG_TABLES: &[&str] = &["user_emails", "stock_reservations"];

/// Step 3: the catalogue, in one transaction.
async fn erase_in_catalog(catalog: &Db, user: UserId, marked: &Marked) -> Result<(), JobError> {
    let mut client = catalog.client().await?;
    let tx = client.transaction().await.map_err(DbError::from)?;
    let erasing = async {
        tx.exec(
            &format!("DELETE FROM webhook_deliveries WHERE event_type <> $2 AND {}", names_them("body")),
            &[&marked.needles, &UserDeleted::NAME],
        )
        .await?;
        // A delivery's job finds no delivery and does nothing; the other jobs here are about products.
        tx.exec(
            &format!(
                "DELETE FROM keel_jobs WHERE state IN ('pending', 'done', 'dead') AND kind <> $2 AND {}",
                names_them("payload::text")
            ),
            &[&marked.needles, &UserDeleted::NAME],
        )
        .await?;
        tx.exec("UPDATE stock_reservations SET user_id = $2 WHERE user_id = $1", &[&user, &marked.erased_as]).await?;
        Ok::<(), PgError>(())
    };
    erasing.await.map_err(DbError::from)?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(())
}

/// Fails (a retry, logged) if a table with a `user_id` column is not in `known`: a table added later
/// stops erasures, before they change anything, until it is put in the list of what is erased or
/// kept, rather than keep a user's rows unnoticed.
async fn refuse_unknown_tables(sql: &impl Sql, known: &[&str]) -> Result<(), JobError> {
    let unknown: Vec<String> = sql
        .rows(
            "SELECT table_name::text FROM information_schema.columns
             WHERE table_schema = current_schema() AND column_name = 'user_id' AND NOT table_name = ANY($1)
             ORDER BY 1",
            &[&known],
        )
        .await
        .map_err(DbError::from)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    Err(JobError::retry_in(
        format!("tables {unknown:?} hold user ids and erasure does not know them: list them in accounts::erasure"),
        Duration::from_secs(60),
    ))
}

/// The shard's tables with a `user_id` (besides `likes`, withdrawn with their counts): the rows
/// erased, and the rows kept for the accounts, re-pointed to the pseudonym.
const ERASED: &[&str] = &[
    "sessions",
    "one_time_codes",
    "cart_items",
    "idempotency_keys",
    // Ended and withdrawn first, with events for the other side of each (`crate::feed::follows`).
    "follows",
    "followers",
    "activities",
    "feed_items",
];
const KEPT: &[&str] = &["orders", "wallets", "wallet_deposits", "wallet_debits", "payments"];

/// Step 4: the user's shard, in one transaction, ending with the user row. Waits (a retry) while a
/// job that names them is being handled: its handler may still read their row.
async fn erase_on_shard(shard: &Db, job: &Job, user: UserId, marked: &Marked) -> Result<(), JobError> {
    let mut client = shard.client().await?;
    let tx = client.transaction().await.map_err(DbError::from)?;
    let erasing = async {
        // Locked first: a request still holding a valid token (for up to the session budget) that
        // writes for this user waits, then fails on the missing row.
        if tx.maybe_row("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", &[&user]).await?.is_none() {
            return Ok(false); // another run finished meanwhile
        }
        let in_flight: i64 = tx
            .row(
                &format!(
                    "SELECT count(*) FROM keel_jobs WHERE state IN ('running', 'relayed') AND kind <> $2 AND id <> $3
                     AND {}",
                    names_them("payload::text")
                ),
                &[&marked.needles, &Erasure::NAME, &job.id],
            )
            .await?
            .get(0);
        if in_flight > 0 {
            return Ok(true);
        }
        // A like taken since step 2 (a token still valid for the session budget).
        withdraw(&tx, user, None).await?;
        let leaving = crate::feed::follows::erased_user_leaves(&tx, user).await?;
        for table in ERASED {
            tx.exec(&format!("DELETE FROM {table} WHERE user_id = $1"), &[&user]).await?;
        }
        tx.exec(
            &format!(
                "WITH gone AS (
                     DELETE FROM keel_jobs WHERE state IN ('pending', 'done', 'dead') AND id <> $2 AND {}
                     RETURNING id
                 )
                 DELETE FROM email_deliveries WHERE event_id IN (SELECT id FROM gone)",
                names_them("payload::text")
            ),
            &[&marked.needles, &job.id],
        )
        .await?;
        for table in KEPT {
            tx.exec(&format!("UPDATE {table} SET user_id = $2 WHERE user_id = $1"), &[&user, &marked.erased_as])
                .await?;
        }
        tx.exec("DELETE FROM users WHERE id = $1", &[&user]).await?;
        for job in &leaving {
            keel_outbox::enqueue(&tx, job).await?;
        }
        let deleted = events::event(&UserDeleted { user_id: user }, user, job.traceparent.clone());
        keel_outbox::enqueue(&tx, &deleted).await?;
        Ok::<bool, PgError>(false)
    };
    let wait = erasing.await.map_err(DbError::from)?;
    if wait {
        // Dropped without a commit: nothing of this step was done.
        return Err(JobError::retry_in("waiting for a job about the user to finish", WAIT));
    }
    shard.commit_jobs(tx).await.map_err(DbError::from)?;
    Ok(())
}

/// Step 5, by id alone (the row with the addresses is gone): the e-mail claims, a delivery of one of
/// their events fanned out meanwhile, and the caches.
async fn sweep(catalog: &Db, caches: Caches<'_>, user: UserId) -> Result<(), JobError> {
    let client = catalog.client().await?;
    client.exec("DELETE FROM user_emails WHERE user_id = $1", &[&user]).await.map_err(DbError::from)?;
    client
        .exec(
            &format!("DELETE FROM webhook_deliveries WHERE event_type <> $2 AND {}", names_them("body")),
            &[&vec![user.to_string()], &UserDeleted::NAME],
        )
        .await
        .map_err(DbError::from)?;
    drop(client);
    // Their row is gone, so a load can no longer bring the profile or cart back. A node's memory
    // hears this on the invalidation channel; without Redis, each node's copy lasts its budget.
    let profile = caches.profiles.invalidate(&user).await;
    let cart = caches.carts.invalidate(&user).await;
    if [profile, cart].contains(&keel_cache::Written::Failed) {
        return Err(JobError::retry_in("could not drop the user's cached profile or cart from Redis", WAIT * 5));
    }
    Ok(())
}

/// `user.deleted`: the webhook deliveries to its subscribers.
pub async fn tell_subscribers(catalog: &Db, job: &Job) -> Result<(), JobError> {
    let mut client = catalog.client().await?;
    let tx = client.transaction().await.map_err(DbError::from)?;
    crate::webhooks::fan_out(&tx, job).await?;
    catalog.commit_jobs(tx).await.map_err(DbError::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pseudonym_is_random_and_in_the_users_bucket() {
        let user = UserId::new();
        let (a, b) = (pseudonym_for(user), pseudonym_for(user));
        assert_ne!(a, b);
        assert_ne!(a, user);
        assert_eq!(bucket_of(a), bucket_of(user));
        assert_eq!(bucket_of(b), bucket_of(user));
    }
}
