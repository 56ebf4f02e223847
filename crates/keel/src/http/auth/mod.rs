//! Who is calling: `Authorization: Bearer <token>`, either the administrator's token or a user's
//! access token.
//!
//! An access token is verified with no query ([`tokens`]): its signature and expiry, and this node's
//! list of revoked sessions ([`revocations`]), which it learns within the `session` budget. The admin
//! token comes from configuration; requests are checked against its digest ([`AdminToken`]).

pub mod revocations;
pub mod tokens;

use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};

use self::revocations::Revocations;
use self::tokens::{unix_now, AccessClaims, Keys};
use super::error::ApiError;
use crate::db::{shard_key, Databases};
use crate::ids::{SessionId, UserId};

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

/// What verifies users' access tokens: the signing keys, and this node's revoked sessions.
pub struct Authenticator {
    pub keys: Keys,
    pub revocations: Arc<Revocations>,
    /// To find a user's shard, whose sessions this node must have heard from recently.
    pub db: Arc<Databases>,
}

impl Authenticator {
    /// The claims of a valid access token of a live session: no query.
    pub fn verify(&self, token: &str) -> Result<AccessClaims, ApiError> {
        let claims = self.keys.verify_access(token, unix_now()).map_err(|why| {
            metrics::counter!("keel_auth_refused_total", "reason" => format!("{why:?}").to_lowercase()).increment(1);
            ApiError::Unauthorized(match why {
                tokens::Refused::Expired => "the access token has expired: refresh it".into(),
                _ => "the bearer token is not valid".into(),
            })
        })?;
        if self.revocations.is_revoked(claims.sid) {
            metrics::counter!("keel_auth_refused_total", "reason" => "revoked").increment(1);
            return Err(ApiError::Unauthorized("the session has ended: sign in again".into()));
        }
        let shard = self.db.shards().route(&shard_key(claims.sub)).shard;
        if !self.revocations.can_vouch_for(usize::from(shard)) {
            // This node has not heard from the user's shard for a whole budget: the session may have
            // been revoked there. Refused until it hears again, rather than accepted unchecked.
            metrics::counter!("keel_auth_refused_total", "reason" => "unverifiable").increment(1);
            return Err(ApiError::Unavailable("this account's sessions cannot be checked right now".into()));
        }
        Ok(claims)
    }
}

/// Who the token says the caller is.
enum Identified {
    Anonymous,
    Admin,
    User(AccessClaims),
}

/// The extractors ask the application's state for the admin token and the authenticator only.
fn identify<S>(parts: &Parts, state: &S) -> Result<Identified, ApiError>
where
    AdminToken: FromRef<S>,
    Arc<Authenticator>: FromRef<S>,
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
    Ok(Identified::User(Arc::<Authenticator>::from_ref(state).verify(token)?))
}

impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync,
    AdminToken: FromRef<S>,
    Arc<Authenticator>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Ok(match identify(parts, state)? {
            Identified::Anonymous => Caller::Anonymous,
            Identified::Admin => Caller::Admin,
            Identified::User(claims) => Caller::User(claims.sub),
        })
    }
}

/// A caller that must be the administrator.
pub struct Admin;

impl<S> FromRequestParts<S> for Admin
where
    S: Send + Sync,
    AdminToken: FromRef<S>,
    Arc<Authenticator>: FromRef<S>,
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
    Arc<Authenticator>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        AuthSession::from_request_parts(parts, state).await.map(|session| AuthUser(session.user))
    }
}

/// A caller that must be a user, with the session their token belongs to and when it was issued.
pub struct AuthSession {
    pub user: UserId,
    pub session: SessionId,
    /// When the access token was issued (Unix seconds): a sign-in this recent, or a refresh.
    pub issued_at: u64,
}

impl<S> FromRequestParts<S> for AuthSession
where
    S: Send + Sync,
    AdminToken: FromRef<S>,
    Arc<Authenticator>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match identify(parts, state)? {
            Identified::User(claims) => {
                Ok(AuthSession { user: claims.sub, session: claims.sid, issued_at: claims.iat })
            }
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
