//! Sessions: signing in (a password or an e-mailed code), refreshing with rotation and reuse
//! detection, listing one's sessions and ending them.
//!
//! A session is a row on its user's shard. It answers a pair of tokens ([`crate::http::auth::tokens`]):
//! a short-lived access token every node verifies with no query, and a refresh token that is
//! exchanged for the next pair. Each exchange moves the session to its next generation; presenting a
//! superseded refresh token again means two parties hold it (RFC 9700, 4.14.2), so the whole session
//! is revoked — unless it comes within the reuse window of its exchange, when it is taken for a client
//! retrying after a lost answer and gets that same answer again (the pair of a generation can be made
//! again from the row: nothing secret is stored).

use std::time::SystemTime;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use utoipa::ToSchema;

use super::codes::{self, Purpose};
use super::password::Verified;
use super::AccountsState;
use crate::db::{bucket_of, Sql};
use crate::email::Email;
use crate::http::auth::tokens::{unix_seconds, AccessClaims};
use crate::http::auth::AuthSession;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{parse_id, Json, Path};
use crate::http::timestamp;
use crate::ids::{SessionId, UserId};

/// The answer to every sign-in, sign-up and refresh. Sent with `Cache-Control: no-store`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SessionTokens {
    #[schema(value_type = String)]
    pub session_id: SessionId,
    #[schema(value_type = String)]
    pub user_id: UserId,
    /// `Authorization: Bearer <access_token>` on every request.
    pub access_token: String,
    /// Seconds until the access token expires.
    pub access_expires_in: u64,
    /// Exchanged at `POST /v1/sessions/refresh` for the next pair; keep it secret.
    pub refresh_token: String,
    pub token_type: &'static str,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    pub email: String,
    /// Either a password…
    pub password: Option<String>,
    /// …or the 6-digit code from `POST /v1/sessions/codes`.
    pub code: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Refresh {
    pub refresh_token: String,
}

/// A session as its user sees it in the list.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionInfo {
    #[schema(value_type = String)]
    pub id: SessionId,
    pub created_at: String,
    /// The last sign-in or refresh (requests with an access token are not recorded: they cost no
    /// query).
    pub last_used_at: String,
    pub user_agent: String,
    /// Whether this is the session of the token that asked.
    pub current: bool,
}

/// The one answer to every failed sign-in: the same for an unknown address, a wrong password and a
/// wrong code, so that signing in tells nobody which addresses have accounts.
fn wrong_credentials() -> ApiError {
    ApiError::Unauthorized("the e-mail address, password or code is not right".into())
}

/// The pair of tokens of a session's generation, issued at `rotated_at`: the same inputs make the
/// same pair.
pub(crate) fn tokens(
    state: &AccountsState,
    user: UserId,
    session: SessionId,
    generation: i32,
    rotated_at: SystemTime,
) -> SessionTokens {
    let ttl = state.config.access_token_ttl.as_secs();
    let iat = unix_seconds(rotated_at);
    let access = state.auth.keys.sign_access(&AccessClaims { sub: user, sid: session, iat, exp: iat + ttl });
    let left = (iat + ttl).saturating_sub(crate::http::auth::tokens::unix_now());
    SessionTokens {
        session_id: session,
        user_id: user,
        access_token: access,
        access_expires_in: left,
        refresh_token: state.auth.keys.refresh_token(user, session, generation),
        token_type: "Bearer",
    }
}

/// Opens a session for `user` (whose credentials were checked) on `sql`, the user's shard.
pub(crate) async fn open(
    sql: &impl Sql,
    state: &AccountsState,
    user: UserId,
    user_agent: &str,
) -> Result<SessionTokens, ApiError> {
    let session = SessionId::new();
    let row = sql
        .row(
            "INSERT INTO sessions (id, user_id, bucket, expires_at, user_agent)
             VALUES ($1, $2, $3, now() + make_interval(secs => $4), $5) RETURNING rotated_at",
            &[&session, &user, &bucket_of(user), &state.config.refresh_token_ttl.as_secs_f64(), &user_agent],
        )
        .await?;
    metrics::counter!("keel_sessions_opened_total").increment(1);
    Ok(tokens(state, user, session, 0, row.get(0)))
}

/// The `User-Agent` of a request, as a session records it (cut to 200 characters).
pub(crate) fn user_agent(headers: &HeaderMap) -> String {
    let agent = headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("");
    agent.chars().take(200).collect()
}

/// Answers with a new session's tokens: nothing between here and the client may keep them.
pub(crate) fn created(tokens: SessionTokens) -> impl IntoResponse {
    (StatusCode::CREATED, [(header::CACHE_CONTROL, "no-store")], Json(tokens))
}

/// Revokes sessions of `user` (`only`: that one; else all), recording `why`; returns the ones it
/// revoked, for [`crate::http::auth::revocations::Revocations::revoked`] once committed.
pub(crate) async fn revoke(
    sql: &impl Sql,
    user: UserId,
    only: Option<SessionId>,
    why: &str,
) -> Result<Vec<SessionId>, ApiError> {
    let rows = sql
        .rows(
            "UPDATE sessions SET revoked_at = now(), revoked_why = $3
             WHERE user_id = $1 AND ($2::uuid IS NULL OR id = $2) AND revoked_at IS NULL RETURNING id",
            &[&user, &only, &why],
        )
        .await?;
    let revoked: Vec<SessionId> = rows.iter().map(|r| r.get(0)).collect();
    metrics::counter!("keel_sessions_revoked_total", "why" => why.to_owned()).increment(revoked.len() as u64);
    Ok(revoked)
}

/// The user an address belongs to, from the catalogue's claims.
pub(crate) async fn user_by_email(state: &AccountsState, email: &str) -> Result<Option<UserId>, ApiError> {
    let catalog = state.db.catalog.client().await?;
    let row = catalog.maybe_row("SELECT user_id FROM user_emails WHERE email = $1", &[&email]).await?;
    Ok(row.map(|r| r.get(0)))
}

#[utoipa::path(post, path = "/v1/sessions", tag = "sessions", request_body = SignIn,
    responses(
        (status = 201, description = "Signed in: a new session", body = SessionTokens),
        (status = 401, description = "The address, password or code is not right (one answer for all three)", body = Problem),
        (status = 403, description = "The account is locked", body = Problem),
        (status = 422, description = "Neither or both of password and code", body = Problem),
    ))]
pub async fn sign_in(
    State(state): State<AccountsState>,
    headers: HeaderMap,
    Json(input): Json<SignIn>,
) -> Result<impl IntoResponse, ApiError> {
    let email = Email::parse(&input.email).map_err(|why| ApiError::invalid("email", &why))?;
    let email = email.as_str();
    let _turn = state.sign_ins.acquire().await.expect("the sign-in semaphore is never closed");
    let user = user_by_email(&state, email).await?;
    let user = match (&input.password, &input.code) {
        (Some(password), None) => check_password(&state, email, user, password).await?,
        (None, Some(code)) => check_code(&state, email, user, code).await?,
        _ => return Err(ApiError::Unprocessable("give either a password or a code".into())),
    };
    let shard = state.db.shard_of(user).client().await?;
    let tokens = open(&shard, &state, user, &user_agent(&headers)).await?;
    Ok(created(tokens))
}

/// The user, if `password` is theirs and they are not locked. An unknown address costs the same
/// hashing as a wrong password.
async fn check_password(
    state: &AccountsState,
    email: &str,
    user: Option<UserId>,
    password: &str,
) -> Result<UserId, ApiError> {
    let row = match user {
        Some(user) => account(state, user, email).await?,
        None => None,
    };
    let Some((user, row)) = user.zip(row) else {
        state.hasher.verify_dummy(password).await;
        return Err(wrong_credentials());
    };
    let Some(stored) = row.get::<_, Option<String>>("password_hash") else {
        // An account that signs in with codes only.
        state.hasher.verify_dummy(password).await;
        return Err(wrong_credentials());
    };
    match state.hasher.verify(password, &stored).await {
        Verified::No => Err(wrong_credentials()),
        Verified::Yes { rehash } => {
            refuse_locked(&row)?;
            if rehash {
                // The hash was made with older parameters: made again with the current ones.
                let hash = state.hasher.hash(password).await;
                let shard = state.db.shard_of(user).client().await?;
                shard.exec("UPDATE users SET password_hash = $2 WHERE id = $1", &[&user, &hash]).await?;
            }
            Ok(user)
        }
    }
}

async fn check_code(state: &AccountsState, email: &str, user: Option<UserId>, code: &str) -> Result<UserId, ApiError> {
    let Some(user) = user else { return Err(wrong_credentials()) };
    let shard = state.db.shard_of(user).client().await?;
    let sent_to = codes::consume(&shard, &state.auth.keys, user, Purpose::SignIn, code).await?;
    if sent_to.as_deref() != Some(email) {
        return Err(wrong_credentials());
    }
    drop(shard);
    let row = account(state, user, email).await?.ok_or_else(wrong_credentials)?;
    refuse_locked(&row)?;
    Ok(user)
}

/// The user's row as sign-in needs it, if it still has `email` (the catalogue's claim of an address
/// the user just changed from may outlive the change for a moment).
async fn account(state: &AccountsState, user: UserId, email: &str) -> Result<Option<Row>, ApiError> {
    let shard = state.db.shard_of(user).client().await?;
    let query = "SELECT password_hash, locked_at FROM users WHERE id = $1 AND email = $2";
    Ok(shard.maybe_row(query, &[&user, &email]).await?)
}

fn refuse_locked(row: &Row) -> Result<(), ApiError> {
    if row.get::<_, Option<SystemTime>>("locked_at").is_some() {
        return Err(ApiError::Forbidden("this account is locked: contact the shop".into()));
    }
    Ok(())
}

#[utoipa::path(post, path = "/v1/sessions/refresh", tag = "sessions", request_body = Refresh,
    responses(
        (status = 201, description = "The session's next pair of tokens (the same pair again for a retry \
            within the reuse window)", body = SessionTokens),
        (status = 401, description = "Not a valid refresh token, the session has ended, or the token was \
            already exchanged (which ends the session)", body = Problem),
    ))]
pub async fn refresh(
    State(state): State<AccountsState>,
    Json(input): Json<Refresh>,
) -> Result<impl IntoResponse, ApiError> {
    let invalid = || ApiError::Unauthorized("the refresh token is not valid".into());
    let (user, session, generation) = state.auth.keys.open_refresh(&input.refresh_token).ok_or_else(invalid)?;
    let mut client = state.db.shard_of(user).client().await?;
    let tx = client.transaction().await?;
    let row = tx
        .maybe_row(
            "SELECT s.generation, s.rotated_at, s.revoked_at IS NOT NULL AS revoked, s.expires_at <= now() AS expired,
                    now() - s.rotated_at <= make_interval(secs => $3) AS within_window, u.locked_at IS NOT NULL AS locked
             FROM sessions s JOIN users u ON u.id = s.user_id
             WHERE s.id = $1 AND s.user_id = $2 FOR UPDATE OF s",
            &[&session, &user, &state.config.refresh_reuse_window.as_secs_f64()],
        )
        .await?
        .ok_or_else(invalid)?;
    let ended = || ApiError::Unauthorized("the session has ended: sign in again".into());
    if row.get::<_, bool>("revoked") || row.get::<_, bool>("expired") || row.get::<_, bool>("locked") {
        return Err(ended());
    }
    let current: i32 = row.get("generation");
    if generation == current {
        let rotated = tx
            .row(
                "UPDATE sessions SET generation = generation + 1, rotated_at = now(), last_used_at = now(),
                     expires_at = now() + make_interval(secs => $2)
                 WHERE id = $1 RETURNING generation, rotated_at",
                &[&session, &state.config.refresh_token_ttl.as_secs_f64()],
            )
            .await?;
        tx.commit().await?;
        metrics::counter!("keel_session_refreshes_total", "outcome" => "rotated").increment(1);
        return Ok(created(tokens(&state, user, session, rotated.get(0), rotated.get(1))));
    }
    if generation == current - 1 && row.get::<_, bool>("within_window") {
        // A retry of the exchange just made: the same answer.
        tx.commit().await?;
        metrics::counter!("keel_session_refreshes_total", "outcome" => "retry").increment(1);
        return Ok(created(tokens(&state, user, session, current, row.get("rotated_at"))));
    }
    // A superseded token presented again: whoever holds it, the session is no longer safe.
    let revoked = revoke(&tx, user, Some(session), "refresh token reused").await?;
    tx.commit().await?;
    state.auth.revocations.revoked(&revoked).await;
    metrics::counter!("keel_session_refreshes_total", "outcome" => "reused").increment(1);
    tracing::warn!(%user, %session, generation, current, "a superseded refresh token was presented: session revoked");
    Err(ApiError::Unauthorized("this refresh token was already used: the session has ended, sign in again".into()))
}

#[utoipa::path(get, path = "/v1/sessions", tag = "sessions", security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's live sessions, oldest first", body = [SessionInfo]),
        (status = 401, body = Problem),
    ))]
pub async fn list_sessions(
    State(state): State<AccountsState>,
    caller: AuthSession,
) -> Result<Json<Vec<SessionInfo>>, ApiError> {
    let shard = state.db.shard_of(caller.user).client().await?;
    let rows = shard
        .rows(
            "SELECT id, created_at, last_used_at, user_agent FROM sessions
             WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > now() ORDER BY created_at, id",
            &[&caller.user],
        )
        .await?;
    Ok(Json(
        rows.iter()
            .map(|r| SessionInfo {
                id: r.get(0),
                created_at: timestamp(r.get(1)),
                last_used_at: timestamp(r.get(2)),
                user_agent: r.get(3),
                current: r.get::<_, SessionId>(0) == caller.session,
            })
            .collect(),
    ))
}

#[utoipa::path(delete, path = "/v1/sessions/{id}", tag = "sessions", security(("bearer" = [])),
    params(("id" = String, Path, description = "The session's id")),
    responses(
        (status = 204, description = "Ended (its tokens are refused on every node within the session budget)"),
        (status = 401, body = Problem),
        (status = 404, description = "No live session of the caller's has that id", body = Problem),
    ))]
pub async fn end_session(
    State(state): State<AccountsState>,
    caller: AuthSession,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let session = parse_id::<SessionId>("session", &id)?;
    let shard = state.db.shard_of(caller.user).client().await?;
    let revoked = revoke(&shard, caller.user, Some(session), "signed out").await?;
    if revoked.is_empty() {
        return Err(ApiError::not_found("session", &id));
    }
    state.auth.revocations.revoked(&revoked).await;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/v1/sessions", tag = "sessions", security(("bearer" = [])),
    responses(
        (status = 204, description = "Every session of the caller's ended, this one too: signed out everywhere"),
        (status = 401, body = Problem),
    ))]
pub async fn end_all_sessions(State(state): State<AccountsState>, caller: AuthSession) -> Result<StatusCode, ApiError> {
    let shard = state.db.shard_of(caller.user).client().await?;
    let revoked = revoke(&shard, caller.user, None, "signed out everywhere").await?;
    state.auth.revocations.revoked(&revoked).await;
    Ok(StatusCode::NO_CONTENT)
}
