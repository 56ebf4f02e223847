//! Accounts: credentials (passwords, e-mailed codes), sessions and their tokens, e-mail ownership,
//! password resets, locks and erasure. How a request's token is checked is the HTTP toolkit's
//! ([`crate::http::auth`]); this is where sessions begin and end.

pub mod by_email;
pub mod codes;
pub mod erasure;
pub mod password;
pub mod sessions;

use std::sync::Arc;

use crate::config::Config;
use crate::db::Databases;
use crate::http::auth::Authenticator;

/// What the accounts' handlers reach (a part of [`crate::state::AppState`]).
#[derive(Clone)]
pub struct AccountsState {
    pub db: Arc<Databases>,
    pub auth: Arc<Authenticator>,
    pub hasher: Arc<password::Hasher>,
    /// Sign-ins checked at once: twice the hashing threads, so the next one's queries overlap a hash.
    /// A burst of sign-ins otherwise sends all its queries at once, and the databases' and this
    /// process's CPU for them lands on the other requests in one lump; the hashes bound how fast
    /// sign-ins go anyway.
    pub sign_ins: Arc<tokio::sync::Semaphore>,
    pub config: Arc<Config>,
}
