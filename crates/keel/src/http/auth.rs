//! Who is calling: `Authorization: Bearer <token>`, either the administrator's token or a user's.
//!
//! A user token is `<user id>.<secret>`: the id routes the check to the user's shard, where only a
//! SHA-256 of the secret is stored. The admin token comes from configuration; only its digest is kept
//! in memory.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::error::ApiError;
use crate::db::Sql;
use crate::startup::AppState;

/// A SHA-256 digest, compared instead of the secret it came from.
pub type Digest32 = [u8; 32];

pub fn digest(secret: &str) -> Digest32 {
    Sha256::digest(secret.as_bytes()).into()
}

/// A new user token and the digest of its secret, the part to store.
pub fn new_user_token(user: Uuid) -> (String, Digest32) {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).expect("the operating system's random source is available");
    let secret = hex(&secret);
    (format!("{user}.{secret}"), digest(&secret))
}

/// A fresh random token for the administrator.
pub fn new_admin_token() -> String {
    let mut secret = [0u8; 24];
    getrandom::fill(&mut secret).expect("the operating system's random source is available");
    format!("keel_admin_{}", hex(&secret))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The authenticated caller, if any. A request with no `Authorization` header is anonymous; one with
/// a header that does not verify is refused with 401, never treated as anonymous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Anonymous,
    Admin,
    User(Uuid),
}

impl Caller {
    pub fn user(self) -> Option<Uuid> {
        match self {
            Caller::User(id) => Some(id),
            _ => None,
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(AUTHORIZATION) else { return Ok(Caller::Anonymous) };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| ApiError::Unauthorized("the Authorization header must be `Bearer <token>`".into()))?;
        if digest(token) == state.admin_token_digest {
            return Ok(Caller::Admin);
        }
        verify_user_token(state, token).await.map(Caller::User)
    }
}

async fn verify_user_token(state: &AppState, token: &str) -> Result<Uuid, ApiError> {
    let invalid = || ApiError::Unauthorized("the bearer token is not valid".into());
    let (id, secret) = token.split_once('.').ok_or_else(invalid)?;
    let id = Uuid::try_parse(id).map_err(|_| invalid())?;
    let client = state.db.shard_of(id).client().await?;
    let row = client.maybe_row("SELECT token_hash FROM users WHERE id = $1", &[&id]).await?;
    let stored: Vec<u8> = row.ok_or_else(invalid)?.get(0);
    if stored.as_slice() != digest(secret).as_slice() {
        return Err(invalid());
    }
    Ok(id)
}

/// A caller that must be the administrator.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        match Caller::from_request_parts(parts, state).await? {
            Caller::Admin => Ok(Admin),
            Caller::Anonymous => Err(ApiError::Unauthorized("this needs the admin token".into())),
            Caller::User(_) => Err(ApiError::Forbidden("this needs the admin token, not a user's".into())),
        }
    }
}

/// A caller that must be a user: the id of the user.
pub struct AuthUser(pub Uuid);

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        match Caller::from_request_parts(parts, state).await? {
            Caller::User(id) => Ok(AuthUser(id)),
            Caller::Anonymous => Err(ApiError::Unauthorized("this needs a user's bearer token".into())),
            Caller::Admin => Err(ApiError::Forbidden("this acts for a user: use that user's token".into())),
        }
    }
}
