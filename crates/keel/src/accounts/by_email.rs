//! What accounts do by e-mail: sign-in codes, verifying an address, resetting a password.
//!
//! The anonymous routes (asking for a code or a reset) answer 202 whatever the address: whether it
//! has an account, is locked, or nothing was sent is not the caller's to learn. The secrets themselves
//! are made and checked by [`codes`]; the e-mail worker writes them ([`crate::email`]).

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::ToSchema;

use super::codes::{self, Purpose};
use super::sessions;
use super::AccountsState;
use crate::db::replicas::Floor;
use crate::db::Sql;
use crate::email::Email;
use crate::http::auth::AuthUser;
use crate::http::error::{ApiError, Problem};
use crate::http::extract::{parse_id, Json, Path};
use crate::http::trace::TraceContext;
use crate::ids::UserId;
use crate::users::{self, Profile, UsersState};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ByEmail {
    pub email: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetConfirmation {
    /// The token from the e-mail, as it is.
    pub token: String,
    /// The new password: 8 to 128 characters, not a common or easily guessed one.
    pub password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerificationCode {
    /// The 6-digit code from the e-mail.
    pub code: String,
}

#[utoipa::path(post, path = "/v1/sessions/codes", tag = "sessions", request_body = ByEmail,
    responses(
        (status = 202, description = "If the address is an account's (and it is not locked), a 6-digit code \
            valid 10 minutes for 5 attempts was e-mailed to it, replacing any earlier one; the same answer \
            otherwise. Sign in with it at `POST /v1/sessions`."),
        (status = 422, description = "Not an e-mail address", body = Problem),
        (status = 429, description = "Over the mail rate limit", body = Problem),
    ))]
pub async fn request_code(
    State(state): State<AccountsState>,
    trace: TraceContext,
    Json(input): Json<ByEmail>,
) -> Result<StatusCode, ApiError> {
    mail_secret(&state, &input.email, Purpose::SignIn, trace.traceparent()).await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(post, path = "/v1/password-resets", tag = "sessions", request_body = ByEmail,
    responses(
        (status = 202, description = "If the address is an account's (and it is not locked), a password reset \
            token valid 30 minutes was e-mailed to it; the same answer otherwise. Use it at \
            `POST /v1/password-resets/confirm`."),
        (status = 422, description = "Not an e-mail address", body = Problem),
        (status = 429, description = "Over the mail rate limit", body = Problem),
    ))]
pub async fn request_password_reset(
    State(state): State<AccountsState>,
    trace: TraceContext,
    Json(input): Json<ByEmail>,
) -> Result<StatusCode, ApiError> {
    mail_secret(&state, &input.email, Purpose::PasswordReset, trace.traceparent()).await?;
    Ok(StatusCode::ACCEPTED)
}

/// E-mails a secret for `purpose` to `email` if it is the address of an account that is not locked;
/// nothing otherwise, and the caller is told the same either way.
async fn mail_secret(
    state: &AccountsState,
    email: &str,
    purpose: Purpose,
    traceparent: String,
) -> Result<(), ApiError> {
    let email = Email::parse(email).map_err(|why| ApiError::invalid("email", &why))?;
    let email = email.as_str();
    let Some(user) = sessions::user_by_email(state, email).await? else { return Ok(()) };
    let shard = state.db.shard_of(user);
    let mut client = shard.client().await?;
    let tx = client.transaction().await?;
    // The claim is not enough: the row must have the address still (a claim can outlive a change of
    // address). Locked, so that a change of address committing meanwhile either waits for this code
    // and deletes it, or is seen here and no code goes to the old address.
    let eligible = tx
        .maybe_row(
            "SELECT 1 FROM users WHERE id = $1 AND email = $2 AND locked_at IS NULL FOR UPDATE",
            &[&user, &email],
        )
        .await?
        .is_some();
    if eligible {
        codes::issue_and_mail(&tx, &state.auth.keys, user, purpose, email, Some(traceparent)).await?;
        shard.commit_jobs(tx).await?;
        metrics::counter!("keel_codes_issued_total", "purpose" => purpose.as_str()).increment(1);
    }
    Ok(())
}

#[utoipa::path(post, path = "/v1/password-resets/confirm", tag = "sessions", request_body = ResetConfirmation,
    responses(
        (status = 204, description = "The password is set, the token used up, and every session of the account \
            ended (their tokens are refused at once on this node, on every node within the session budget). \
            The address is verified too: the token was read there."),
        (status = 401, description = "The token is wrong, has expired or was used", body = Problem),
        (status = 403, description = "The account is locked", body = Problem),
        (status = 422, description = "The new password is refused (the token stays usable)", body = Problem),
    ))]
pub async fn confirm_password_reset(
    State(state): State<AccountsState>,
    Json(input): Json<ResetConfirmation>,
) -> Result<StatusCode, ApiError> {
    let invalid = || {
        ApiError::Unauthorized(
            "the password reset token is not valid: it is wrong, has expired or was used; ask for a new one".into(),
        )
    };
    let (user, secret) = codes::open_reset_token(&input.token).ok_or_else(invalid)?;
    let keys = &state.auth.keys;
    let shard = &*state.db.shard_of(user);
    // The token is checked before anything costly, without using it up: a made-up token costs no
    // hashing, and a refused password leaves the token usable.
    let client = shard.client().await?;
    let row = client
        .maybe_row("SELECT email, name, locked_at IS NOT NULL FROM users WHERE id = $1", &[&user])
        .await?
        .ok_or_else(invalid)?;
    let (email, name, locked): (String, String, bool) = (row.get(0), row.get(1), row.get(2));
    if codes::check(&client, keys, user, Purpose::PasswordReset, secret).await?.as_deref() != Some(email.as_str()) {
        return Err(invalid());
    }
    drop(client);
    if locked {
        return Err(ApiError::Forbidden("this account is locked: contact the shop".into()));
    }
    // No connection is held while hashing, which waits its turn under load.
    let hasher = &state.hasher;
    hasher
        .check_new_password(&input.password, &[&email, &name])
        .await
        .map_err(|why| ApiError::invalid("password", &why))?;
    let hash = hasher.hash(&input.password).await;

    let mut client = shard.client().await?;
    let tx = client.transaction().await?;
    // Used up in the transaction that sets the password: of two requests with the token, one does.
    if codes::consume(&tx, keys, user, Purpose::PasswordReset, secret).await?.as_deref() != Some(email.as_str()) {
        return Err(invalid());
    }
    tx.exec(
        "UPDATE users SET password_hash = $2, email_verified_at = coalesce(email_verified_at, now()) WHERE id = $1",
        &[&user, &hash],
    )
    .await?;
    // Whoever knew the old password may hold a session: none survives.
    let revoked = sessions::revoke(&tx, user, None, "password reset").await?;
    tx.commit().await?;
    state.auth.revocations.revoked(&revoked).await;
    metrics::counter!("keel_password_resets_total").increment(1);
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/users/{id}/email-verification", tag = "users", request_body = VerificationCode,
    params(("id" = String, Path, description = "The user's id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The address is verified: the owner's profile", body = Profile),
        (status = 401, description = "No valid token", body = Problem),
        (status = 403, description = "Not the owner", body = Problem),
        (status = 409, description = "The address is verified already, or the code was for an address that is \
            no longer the user's", body = Problem),
        (status = 422, description = "The code is not right, has expired or was used up (5 attempts)", body = Problem),
    ))]
pub async fn verify_email(
    State(state): State<UsersState>,
    AuthUser(caller): AuthUser,
    Path(id): Path<String>,
    Json(input): Json<VerificationCode>,
) -> Result<Json<Profile>, ApiError> {
    let id = owner(caller, &id)?;
    let mut client = state.db.shard_of(id).client().await?;
    let tx = client.transaction().await?;
    let keys = &state.accounts.auth.keys;
    let Some(sent_to) = codes::consume(&tx, keys, id, Purpose::VerifyEmail, &input.code).await? else {
        // The attempt it cost is kept.
        tx.commit().await?;
        if is_verified(&client, id).await? {
            return Err(ApiError::Conflict("the e-mail address is verified already".into()));
        }
        return Err(ApiError::Unprocessable(format!(
            "code: not right, expired or used up; ask for a new one at /v1/users/{id}/email-verification/resend"
        )));
    };
    let verified = tx
        .exec(
            "UPDATE users SET email_verified_at = coalesce(email_verified_at, now()) WHERE id = $1 AND email = $2",
            &[&id, &sent_to],
        )
        .await?;
    if verified == 0 {
        return Err(ApiError::Conflict("this code was sent to an address that is no longer yours".into()));
    }
    tx.commit().await?;
    state.floors.wrote(&state.db.shard_of(id), &client, id).await;
    drop(client);
    // Not a public field: the cached profiles need no invalidation.
    // From the primary: the address was verified just now.
    Ok(Json(users::read_profile(&state, id, true, Floor::Primary).await?.value))
}

#[utoipa::path(post, path = "/v1/users/{id}/email-verification/resend", tag = "users",
    params(("id" = String, Path, description = "The user's id")),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "A new code, valid 24 hours, was e-mailed to the user's address; earlier \
            codes no longer work"),
        (status = 401, description = "No valid token", body = Problem),
        (status = 403, description = "Not the owner", body = Problem),
        (status = 404, description = "No such user", body = Problem),
        (status = 409, description = "The address is verified already", body = Problem),
        (status = 429, description = "Over the mail rate limit", body = Problem),
    ))]
pub async fn resend_verification(
    State(state): State<UsersState>,
    AuthUser(caller): AuthUser,
    trace: TraceContext,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = owner(caller, &id)?;
    let shard = state.db.shard_of(id);
    let mut client = shard.client().await?;
    let tx = client.transaction().await?;
    // Locked against a change of address committing meanwhile (as in `mail_secret`).
    let row = tx
        .maybe_row("SELECT email, email_verified_at IS NOT NULL FROM users WHERE id = $1 FOR UPDATE", &[&id])
        .await?
        .ok_or_else(|| ApiError::not_found("user", &id.to_string()))?;
    if row.get::<_, bool>(1) {
        return Err(ApiError::Conflict("the e-mail address is verified already".into()));
    }
    let email: String = row.get(0);
    codes::issue_and_mail(&tx, &state.accounts.auth.keys, id, Purpose::VerifyEmail, &email, Some(trace.traceparent()))
        .await?;
    shard.commit_jobs(tx).await?;
    metrics::counter!("keel_codes_issued_total", "purpose" => Purpose::VerifyEmail.as_str()).increment(1);
    Ok(StatusCode::ACCEPTED)
}

/// The user of path segment `id`, if it is the caller.
fn owner(caller: UserId, id: &str) -> Result<UserId, ApiError> {
    let id = parse_id::<UserId>("user", id)?;
    if caller != id {
        return Err(ApiError::Forbidden("only the owner may verify their e-mail address".into()));
    }
    Ok(id)
}

async fn is_verified(sql: &impl Sql, user: UserId) -> Result<bool, ApiError> {
    let row = sql.maybe_row("SELECT email_verified_at IS NOT NULL FROM users WHERE id = $1", &[&user]).await?;
    Ok(row.is_some_and(|r| r.get(0)))
}
