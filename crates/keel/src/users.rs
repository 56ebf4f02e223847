//! Users and their profiles. A user lives on the shard of its id; its e-mail address is claimed in
//! the catalogue database's lookup table first, which keeps addresses unique across shards.
//!
//! The two databases are written one after the other, never together, so a claim may be left behind
//! by a failure between them: a sign-up whose user row was never written, or an address changed
//! away from whose release failed. A claim is only ever taken over when it is old enough and its
//! holder's row does not have that address ([`claim_email`]): a claim left behind costs an address
//! for a couple of minutes, never its uniqueness.

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use utoipa::ToSchema;

use crate::accounts::codes::{self, Purpose};
use crate::accounts::sessions::{self, SessionTokens};
use crate::accounts::AccountsState;
use crate::consistency::DataKind;
use crate::db::floors::Floors;
use crate::db::replicas::{Floor, Read};
use crate::db::{bucket_of, Databases, Sql};
use crate::email::Email;
use crate::events::{self, UserRegistered};
use crate::http::auth::{AuthUser, Caller};
use crate::http::cache_headers::{bypass_headers, cache_headers};
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{parse_id, Json, Path};
use crate::http::trace::TraceContext;
use crate::http::{text, timestamp};
use crate::ids::UserId;

/// How long an e-mail claim may wait for its user row before another sign-up may take it over.
/// Longer than any request can take, so a claim is only taken over when its request is gone.
const ABANDONED_CLAIM_AFTER: &str = "2 minutes";

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    /// 1 to 100 characters.
    pub name: String,
    /// A valid address; unique across all users (compared case-insensitively).
    pub email: String,
    /// Up to 1,000 characters.
    pub bio: Option<String>,
    /// 8 to 128 characters, not a common or easily guessed one. Optional: without one, the user signs
    /// in with codes sent to their address (`POST /v1/sessions/codes`).
    pub password: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    pub name: Option<String>,
    pub bio: Option<String>,
    /// A new address, taken at once (409 if another user has it) and unverified until the code
    /// e-mailed to it is entered (`POST /v1/users/{id}/email-verification`). Codes and password
    /// reset tokens sent to the old address stop working.
    pub email: Option<String>,
}

/// The answer to a sign-up: the new user, signed in (a session, as `POST /v1/sessions` answers).
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedUser {
    #[schema(value_type = String)]
    pub id: UserId,
    pub name: String,
    pub email: String,
    pub bio: String,
    pub created_at: String,
    #[serde(flatten)]
    pub session: SessionTokens,
    /// Deprecated: the same as `access_token`, for clients written before sessions.
    #[schema(deprecated)]
    pub token: String,
}

/// Public profiles (no e-mail), by user id: cache-aside, invalidated by the owner's changes.
pub type ProfileCache = keel_cache::Cache<UserId, Arc<Profile>>;

/// What the users' handlers reach (a part of [`crate::state::AppState`]).
#[derive(Clone)]
pub struct UsersState {
    pub db: Arc<Databases>,
    pub profiles: Arc<ProfileCache>,
    /// Sign-up signs the new user in.
    pub accounts: AccountsState,
    /// The owner's reads see their own writes through these, even from a replica.
    pub floors: Floors,
}

/// A profile. `email` and `email_verified` are present only when the owner asks.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Profile {
    #[schema(value_type = String)]
    pub id: UserId,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Whether the owner entered the code sent to `email`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_verified: Option<bool>,
    pub bio: String,
    /// Who follow this user: counted exactly on the user's shard as each follow reaches it (through
    /// the queue, usually within a second), shown within the profile budget.
    #[serde(default)]
    pub followers_count: i64,
    /// Whom this user follows, counted with each follow.
    #[serde(default)]
    pub following_count: i64,
    pub created_at: String,
    pub updated_at: String,
}

const PROFILE_COLUMNS: &str = "id, name, email, email_verified_at IS NOT NULL AS email_verified, bio, \
     followers_count, following_count, created_at, updated_at";

impl Profile {
    fn from_row(row: &Row, show_email: bool) -> Profile {
        Profile {
            id: row.get("id"),
            name: row.get("name"),
            email: show_email.then(|| row.get("email")),
            email_verified: show_email.then(|| row.get("email_verified")),
            bio: row.get("bio"),
            followers_count: row.get("followers_count"),
            following_count: row.get("following_count"),
            created_at: timestamp(row.get("created_at")),
            updated_at: timestamp(row.get("updated_at")),
        }
    }
}

#[utoipa::path(post, path = "/v1/users", tag = "users", request_body = CreateUser,
    responses(
        (status = 201, description = "Created and signed in", body = CreatedUser),
        (status = 409, description = "The e-mail address is taken", body = Problem),
        (status = 422, description = "A field is invalid", body = Problem),
    ))]
pub async fn create_user(
    State(state): State<UsersState>,
    trace: TraceContext,
    headers: HeaderMap,
    Json(input): Json<CreateUser>,
) -> Result<impl IntoResponse, ApiError> {
    let name = text("name", &input.name, 1, 100)?;
    let email = Email::parse(&input.email).map_err(|why| ApiError::invalid("email", &why))?;
    let email = email.as_str().to_owned();
    let bio = text("bio", input.bio.as_deref().unwrap_or(""), 0, 1000)?;
    let password_hash = match &input.password {
        Some(password) => {
            let hasher = &state.accounts.hasher;
            hasher
                .check_new_password(password, &[&email, &name])
                .await
                .map_err(|why| ApiError::invalid("password", &why))?;
            Some(hasher.hash(password).await)
        }
        None => None,
    };
    let id = UserId::new();

    claim_email(&state, &email, id).await?;
    let shard = &*state.db.shard_of(id);
    let created = async {
        let mut client = shard.client().await?;
        // One transaction: the user, its wallet, its first session and the event exist together or
        // not at all.
        let tx = client.transaction().await?;
        let row = tx
            .row(
                "WITH new_user AS (
                     INSERT INTO users (id, bucket, name, email, bio, password_hash)
                     VALUES ($1, $2, $3, $4, $5, $6) RETURNING id, created_at
                 )
                 INSERT INTO wallets (user_id) SELECT id FROM new_user
                 RETURNING (SELECT created_at FROM new_user)",
                &[&id, &bucket_of(id), &name, &email, &bio, &password_hash],
            )
            .await?;
        let session = sessions::open(&tx, &state.accounts, id, &sessions::user_agent(&headers)).await?;
        // The code that verifies the address: the welcome e-mail carries it (one e-mail, not two).
        codes::issue(&tx, &state.accounts.auth.keys, id, Purpose::VerifyEmail, &email).await?;
        let registered = UserRegistered { user_id: id, name: name.clone() };
        keel_outbox::enqueue(&tx, &events::event(&registered, id, Some(trace.traceparent()))).await?;
        shard.commit_jobs(tx).await?;
        state.floors.wrote(shard, &client, id).await;
        Ok::<(SystemTime, SessionTokens), ApiError>((row.get(0), session))
    }
    .await;
    let (created_at, session) = match created {
        Ok(created) => created,
        Err(e) => {
            release_unless_used(&state, &email, id).await;
            return Err(e);
        }
    };
    let token = session.access_token.clone();
    let body = CreatedUser { id, name, email, bio, created_at: timestamp(created_at), session, token };
    // The tokens are in the body: no cache between here and the client may keep a copy of them.
    let headers = [(header::LOCATION, format!("/v1/users/{id}")), (header::CACHE_CONTROL, "no-store".to_owned())];
    Ok((StatusCode::CREATED, headers, Json(body)))
}

/// Claims `email` for `user` in the catalogue's lookup table. A claim whose user never appeared on its
/// shard (the sign-up crashed between the two writes) is taken over once it is old enough.
async fn claim_email(state: &UsersState, email: &str, user: UserId) -> Result<(), ApiError> {
    let catalog = state.db.catalog.client().await?;
    let claimed = catalog
        .maybe_row(
            "INSERT INTO user_emails (email, user_id) VALUES ($1, $2) ON CONFLICT (email) DO NOTHING RETURNING 1",
            &[&email, &user],
        )
        .await?;
    if claimed.is_some() {
        return Ok(());
    }
    let taken = || ApiError::Conflict(format!("the e-mail address {email} is already registered"));
    let Some(claim) = catalog
        .maybe_row(
            &format!(
                "SELECT user_id, claimed_at < now() - interval '{ABANDONED_CLAIM_AFTER}' AS abandoned \
                 FROM user_emails WHERE email = $1"
            ),
            &[&email],
        )
        .await?
    else {
        return Err(taken());
    };
    let holder: UserId = claim.get("user_id");
    if !claim.get::<_, bool>("abandoned") || has_email(state, holder, email).await? {
        return Err(taken());
    }
    let took_over = catalog
        .exec(
            "UPDATE user_emails SET user_id = $3, claimed_at = now() WHERE email = $1 AND user_id = $2",
            &[&email, &holder, &user],
        )
        .await?;
    if took_over == 1 {
        tracing::warn!(%email, abandoned_by = %holder, "took over an abandoned e-mail claim");
        return Ok(());
    }
    Err(taken())
}

/// Releases `user`'s claim of `email` (its row never got it, or has another address now). Best
/// effort: a claim left behind is taken over later by [`claim_email`].
async fn release_email(state: &UsersState, email: &str, user: UserId) {
    let result = async {
        let catalog = state.db.catalog.client().await?;
        catalog.exec("DELETE FROM user_emails WHERE email = $1 AND user_id = $2", &[&email, &user]).await?;
        Ok::<(), ApiError>(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, %email, "could not release an e-mail claim; it will be taken over later");
    }
}

/// Undoes a claim after writing the user's row with it failed — unless the row has it after all (a
/// commit whose answer was lost): releasing it then would let another user take an address in use.
/// When the shard cannot tell, the claim is left, to be taken over once old enough if it holds nothing.
async fn release_unless_used(state: &UsersState, email: &str, user: UserId) {
    if let Ok(false) = has_email(state, user, email).await {
        release_email(state, email, user).await;
    }
}

/// Whether `user`'s row has the address `email`: a claim whose holder's row does not (it was never
/// written, or it changed address since) holds nothing.
async fn has_email(state: &UsersState, user: UserId, email: &str) -> Result<bool, ApiError> {
    let client = state.db.shard_of(user).client().await?;
    Ok(client.maybe_row("SELECT 1 FROM users WHERE id = $1 AND email = $2", &[&user, &email]).await?.is_some())
}

#[utoipa::path(get, path = "/v1/users/{id}", tag = "users",
    params(("id" = String, Path, description = "The user's id")),
    responses(
        (status = 200, description = "The profile; `email` only for its owner, who always reads their own writes. \
            Others may see it up to the profile budget (5 min) late: see `Cache-Status` and `Age`.", body = Profile),
        (status = 404, description = "No such user", body = Problem),
    ))]
pub async fn get_user(
    State(state): State<UsersState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_id::<UserId>("user", &id)?;
    if caller.user() == Some(id) {
        // The owner reads their own writes on any node, around the cache: from a replica that has
        // replayed their last write, or else the primary.
        let floor = state.floors.of(&state.db.shard_of(id), id).await;
        let read = read_profile(&state, id, true, floor).await?;
        return Ok((bypass_headers("owner", read.lag), Json(read.value)));
    }
    let filled = OnceLock::new();
    let (profile, served) = state
        .profiles
        .get_or_load_aged(&id, || async {
            let read = read_profile(&state, id, false, Floor::Any).await?;
            let _ = filled.set((read.target, read.lag));
            Ok::<_, ApiError>((Arc::new(read.value), read.lag))
        })
        .await?;
    Ok((cache_headers(served, filled.get().copied()), Json((*profile).clone())))
}

/// The public profile of `id` through the profile cache (cache-aside, within the profile budget):
/// 404 if there is no such user.
pub(crate) async fn cached_profile(state: &UsersState, id: UserId) -> Result<Arc<Profile>, ApiError> {
    let (profile, _) = state
        .profiles
        .get_or_load_aged(&id, || async {
            let read = read_profile(state, id, false, Floor::Any).await?;
            Ok::<_, ApiError>((Arc::new(read.value), read.lag))
        })
        .await?;
    Ok(profile)
}

/// A profile from a replica within the profile budget (the profile cache's) that is past `floor`, or
/// the primary.
pub(crate) async fn read_profile(
    state: &UsersState,
    id: UserId,
    show_email: bool,
    floor: Floor,
) -> Result<Read<Profile>, ApiError> {
    let sql = format!("SELECT {PROFILE_COLUMNS} FROM users WHERE id = $1");
    let sql = sql.as_str();
    let read = state
        .db
        .shard_of(id)
        .read_one(DataKind::Profile, state.profiles.ttl(), floor, |client| async move {
            client.maybe_row(sql, &[&id]).await
        })
        .await?;
    let row = read.value.ok_or_else(|| ApiError::not_found("user", &id.to_string()))?;
    Ok(Read { value: Profile::from_row(&row, show_email), target: read.target, lag: read.lag })
}

#[utoipa::path(patch, path = "/v1/users/{id}", tag = "users", request_body = UpdateUser,
    params(("id" = String, Path, description = "The user's id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The updated profile", body = Profile),
        (status = 401, description = "No valid token", body = Problem),
        (status = 403, description = "Not the owner", body = Problem),
        (status = 409, description = "The new e-mail address is taken, or another request is changing it", body = Problem),
        (status = 422, description = "A field is invalid", body = Problem),
    ))]
pub async fn update_user(
    State(state): State<UsersState>,
    AuthUser(caller): AuthUser,
    trace: TraceContext,
    Path(id): Path<String>,
    Json(input): Json<UpdateUser>,
) -> Result<Json<Profile>, ApiError> {
    let id = parse_id::<UserId>("user", &id)?;
    if caller != id {
        return Err(ApiError::Forbidden("only the owner may change a profile".into()));
    }
    if input.name.is_none() && input.bio.is_none() && input.email.is_none() {
        return Err(ApiError::Unprocessable("give at least one of name, bio, email".into()));
    }
    let name = input.name.as_deref().map(|n| text("name", n, 1, 100)).transpose()?;
    let bio = input.bio.as_deref().map(|b| text("bio", b, 0, 1000)).transpose()?;
    let email = input.email.as_deref().map(Email::parse).transpose().map_err(|why| ApiError::invalid("email", &why))?;
    let profile = match email {
        Some(email) => change_email(&state, id, email.as_str(), &name, &bio, trace.traceparent()).await?,
        None => update_profile(&state, id, &name, &bio).await?,
    };
    // Cache-aside: the write is committed; others' next read loads it.
    state.profiles.invalidate(&id).await;
    Ok(Json(profile))
}

async fn update_profile(
    state: &UsersState,
    id: UserId,
    name: &Option<String>,
    bio: &Option<String>,
) -> Result<Profile, ApiError> {
    let client = state.db.shard_of(id).client().await?;
    let row = client
        .maybe_row(
            &format!(
                "UPDATE users SET name = coalesce($2, name), bio = coalesce($3, bio), updated_at = now() \
                 WHERE id = $1 RETURNING {PROFILE_COLUMNS}"
            ),
            &[&id, &name, &bio],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("user", &id.to_string()))?;
    state.floors.wrote(&state.db.shard_of(id), &client, id).await;
    Ok(Profile::from_row(&row, true))
}

/// Moves the user to address `new` (with their name and bio, if given), unverified, and e-mails a
/// verification code there. As at sign-up, the new address is claimed in the catalogue before the
/// shard is written, and released again if that fails; the old address is released once the row has
/// the new one. What a failure between the databases leaves is a claim of this user's that its row
/// does not have: harmless, and taken over by the next sign-up that wants it ([`claim_email`]).
async fn change_email(
    state: &UsersState,
    id: UserId,
    new: &str,
    name: &Option<String>,
    bio: &Option<String>,
    traceparent: String,
) -> Result<Profile, ApiError> {
    let client = state.db.shard_of(id).client().await?;
    let old: String = client
        .maybe_row("SELECT email FROM users WHERE id = $1", &[&id])
        .await?
        .ok_or_else(|| ApiError::not_found("user", &id.to_string()))?
        .get(0);
    drop(client);
    if old == new {
        // Not a change: the address stays as verified as it was.
        return update_profile(state, id, name, bio).await;
    }
    claim_email(state, new, id).await?;
    let changed = async {
        let shard = state.db.shard_of(id);
        let mut client = shard.client().await?;
        let tx = client.transaction().await?;
        let row = tx
            .maybe_row(
                &format!(
                    "UPDATE users SET email = $4, email_verified_at = NULL, name = coalesce($2, name), \
                     bio = coalesce($3, bio), updated_at = now() WHERE id = $1 AND email = $5 \
                     RETURNING {PROFILE_COLUMNS}"
                ),
                &[&id, name, bio, &new, &old],
            )
            .await?
            .ok_or_else(|| {
                ApiError::Conflict("the e-mail address was changed by another request meanwhile: try again".into())
            })?;
        // Codes and reset tokens went to the old address: they no longer sign in nor reset anything.
        tx.exec("DELETE FROM one_time_codes WHERE user_id = $1", &[&id]).await?;
        codes::issue_and_mail(&tx, &state.accounts.auth.keys, id, Purpose::VerifyEmail, new, Some(traceparent)).await?;
        shard.commit_jobs(tx).await?;
        state.floors.wrote(&shard, &client, id).await;
        Ok::<Profile, ApiError>(Profile::from_row(&row, true))
    }
    .await;
    match changed {
        Ok(profile) => {
            release_email(state, &old, id).await;
            Ok(profile)
        }
        Err(e) => {
            release_unless_used(state, new, id).await;
            Err(e)
        }
    }
}
