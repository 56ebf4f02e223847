//! Who is calling: `Authorization: Bearer <token>`, either the administrator's token or a user's.
//!
//! A user token is `<user id>.<secret>`: the id routes the check to the user's shard, where only a
//! SHA-256 of the secret is stored. The admin token comes from configuration; requests are checked
//! against its digest ([`AdminToken`]).

use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::db::{Databases, Sql};
use crate::ids::UserId;

/// A SHA-256 digest, compared instead of the secret it came from.
pub type Digest32 = [u8; 32];

/// The administrator's token, kept only as its digest.
#[derive(Clone, Copy)]
pub struct AdminToken(Digest32);

impl AdminToken {
    pub fn new(token: &str) -> AdminToken {
        AdminToken(digest(token))
    }
}

pub fn digest(secret: &str) -> Digest32 {
    Sha256::digest(secret.as_bytes()).into()
}

/// A new user token and the digest of its secret, the part to store.
pub fn new_user_token(user: UserId) -> (String, Digest32) {
    let mut secret = [0u8; 32];
    keel_random::secure_bytes(&mut secret);
    let secret = hex(&secret);
    (format!("{user}.{secret}"), digest(&secret))
}

/// A fresh random token for the administrator.
pub fn new_admin_token() -> String {
    let mut secret = [0u8; 24];
    keel_random::secure_bytes(&mut secret);
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
    User(UserId),
}

impl Caller {
    pub fn user(self) -> Option<UserId> {
        match self {
            Caller::User(id) => Some(id),
            _ => None,
        }
    }
}

/// Who the token says the caller is, with what the token check read of a user along the way.
enum Identified {
    Anonymous,
    Admin,
    User { id: UserId, owner_version: u64 },
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is matched without regard to
/// case (RFC 9110, 11.1): `bearer` and `BEARER` are the same scheme.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("Bearer") && !token.is_empty()).then_some(token)
}

/// Whether two digests are equal, in a time that does not depend on where they differ: `==` stops at
/// the first differing byte, and how soon it answers would tell a caller how much of a guess was right.
fn same_digest(a: &Digest32, b: &Digest32) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimiser from turning the fold back into an early exit.
    std::hint::black_box(difference) == 0
}

/// The extractors ask the application's state for the admin token and the databases only.
async fn identify<S>(parts: &Parts, state: &S) -> Result<Identified, ApiError>
where
    AdminToken: FromRef<S>,
    Arc<Databases>: FromRef<S>,
{
    let Some(value) = parts.headers.get(AUTHORIZATION) else { return Ok(Identified::Anonymous) };
    let token = value
        .to_str()
        .ok()
        .and_then(bearer_token)
        .ok_or_else(|| ApiError::Unauthorized("the Authorization header must be `Bearer <token>`".into()))?;
    if same_digest(&digest(token), &AdminToken::from_ref(state).0) {
        return Ok(Identified::Admin);
    }
    let (id, owner_version) = verify_user_token(&Arc::<Databases>::from_ref(state), token).await?;
    Ok(Identified::User { id, owner_version })
}

impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync,
    AdminToken: FromRef<S>,
    Arc<Databases>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Ok(match identify(parts, state).await? {
            Identified::Anonymous => Caller::Anonymous,
            Identified::Admin => Caller::Admin,
            Identified::User { id, .. } => Caller::User(id),
        })
    }
}

/// The user a token names, and the user's `owner_version` (read in the same query: free).
async fn verify_user_token(db: &Databases, token: &str) -> Result<(UserId, u64), ApiError> {
    let invalid = || ApiError::Unauthorized("the bearer token is not valid".into());
    let (id, secret) = token.split_once('.').ok_or_else(invalid)?;
    let id: UserId = id.parse().map_err(|_| invalid())?;
    let client = db.shard_of(id).client().await?;
    let row = client.maybe_row("SELECT token_hash, owner_version FROM users WHERE id = $1", &[&id]).await?;
    let row = row.ok_or_else(invalid)?;
    let stored: Vec<u8> = row.get(0);
    // Every stored digest is 32 bytes; the length says nothing about the secret.
    let stored: Digest32 = stored.try_into().map_err(|_| invalid())?;
    if !same_digest(&stored, &digest(secret)) {
        return Err(invalid());
    }
    Ok((id, row.get::<_, i64>(1) as u64))
}

/// A caller that must be the administrator.
pub struct Admin;

impl<S> FromRequestParts<S> for Admin
where
    S: Send + Sync,
    AdminToken: FromRef<S>,
    Arc<Databases>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Caller::from_request_parts(parts, state).await? {
            Caller::Admin => Ok(Admin),
            Caller::Anonymous => Err(ApiError::Unauthorized("this needs the admin token".into())),
            Caller::User(_) => Err(ApiError::Forbidden("this needs the admin token, not a user's".into())),
        }
    }
}

/// A caller that must be a user: the id of the user.
pub struct AuthUser(pub UserId);

impl<S> FromRequestParts<S> for AuthUser
where
    S: Send + Sync,
    AdminToken: FromRef<S>,
    Arc<Databases>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Owner::from_request_parts(parts, state).await.map(|owner| AuthUser(owner.id))
    }
}

/// A caller that must be a user, and how many of the user's writes to data they read back through a
/// cache (the cart) had committed when the token was checked (`users.owner_version`): a cached copy
/// older than that must not be served to them. Read with the token, so it costs nothing.
pub struct Owner {
    pub id: UserId,
    pub version: u64,
}

impl<S> FromRequestParts<S> for Owner
where
    S: Send + Sync,
    AdminToken: FromRef<S>,
    Arc<Databases>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match identify(parts, state).await? {
            Identified::User { id, owner_version } => Ok(Owner { id, version: owner_version }),
            Identified::Anonymous => Err(ApiError::Unauthorized("this needs a user's bearer token".into())),
            Identified::Admin => Err(ApiError::Forbidden("this acts for a user: use that user's token".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_matched_without_regard_to_case() {
        for value in ["Bearer abc.def", "bearer abc.def", "BEARER abc.def", "bEaReR  abc.def "] {
            assert_eq!(bearer_token(value), Some("abc.def"), "{value:?}");
        }
        for value in ["Basic abc.def", "Bearerabc.def", "Bearer", "Bearer ", "abc.def", "Bearer\tabc.def"] {
            assert_eq!(bearer_token(value), None, "{value:?}");
        }
    }

    #[test]
    fn digests_are_equal_only_when_every_byte_is() {
        let a = digest("secret");
        assert!(same_digest(&a, &digest("secret")));
        assert!(!same_digest(&a, &digest("secreT")));
        for i in [0, 15, 31] {
            let mut b = a;
            b[i] ^= 1;
            assert!(!same_digest(&a, &b), "byte {i}");
        }
    }
}
