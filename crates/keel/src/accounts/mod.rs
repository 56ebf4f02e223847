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
    pub config: Arc<Config>,
}
