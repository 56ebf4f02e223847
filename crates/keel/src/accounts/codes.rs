//! One-time secrets sent by e-mail: a 6-digit sign-in code, an e-mail verification code, a password
//! reset token. One live secret per user and purpose (a new one replaces it), used once, for a
//! limited time and a limited number of attempts.
//!
//! **No secret is stored**, not even in the outbox: the row keeps a random nonce and the id of the
//! signing key, and the secret is made from them with that key ([`Keys::derive`]) twice — by the
//! worker writing the e-mail, and when it is presented. Someone who reads the database (a backup, a
//! replica) cannot sign in with what they read; and a 6-digit code, which a digest could not hide
//! (a million guesses), is keyed.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;

use crate::db::{DbError, Sql};
use crate::events::{self, CodeIssued};
use crate::http::auth::tokens::Keys;
use crate::ids::UserId;

// The types an event carries live with the events (as the orders' states do).
pub use crate::events::{Issued, Purpose};

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::SignIn => "sign_in",
            Purpose::VerifyEmail => "verify_email",
            Purpose::PasswordReset => "password_reset",
        }
    }

    /// How long a secret is valid.
    pub fn lifetime(self) -> Duration {
        match self {
            Purpose::SignIn => Duration::from_secs(10 * 60),
            Purpose::VerifyEmail => Duration::from_secs(24 * 3600),
            Purpose::PasswordReset => Duration::from_secs(30 * 60),
        }
    }

    /// How many wrong guesses a secret survives: few for 6 digits (5 in a million); a reset token
    /// cannot be guessed, but a link is opened more than once by mail scanners.
    pub fn attempts(self) -> i16 {
        match self {
            Purpose::SignIn | Purpose::VerifyEmail => 5,
            Purpose::PasswordReset => 5,
        }
    }
}

/// Makes a new secret for `user` and `purpose`, sent to `email`, replacing any earlier one. Run it in
/// the transaction that enqueues the e-mail.
pub(crate) async fn issue(
    sql: &impl Sql,
    keys: &Keys,
    user: UserId,
    purpose: Purpose,
    email: &str,
) -> Result<Issued, DbError> {
    let mut nonce = [0u8; 16];
    keel_random::secure_bytes(&mut nonce);
    let (key_id, _) = keys.derive(None, b"").expect("the signing key exists");
    sql.exec(
        "INSERT INTO one_time_codes (user_id, purpose, nonce, key_id, email, expires_at, attempts_left)
         VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6), $7)
         ON CONFLICT (user_id, purpose) DO UPDATE SET nonce = EXCLUDED.nonce, key_id = EXCLUDED.key_id,
             email = EXCLUDED.email, expires_at = EXCLUDED.expires_at, attempts_left = EXCLUDED.attempts_left,
             created_at = now()",
        &[
            &user,
            &purpose.as_str(),
            &nonce.as_slice(),
            &key_id,
            &email,
            &purpose.lifetime().as_secs_f64(),
            &purpose.attempts(),
        ],
    )
    .await?;
    Ok(Issued { purpose, nonce: B64.encode(nonce), key_id })
}

/// The secret an [`Issued`] stands for: 6 digits, or a 43-character token for a password reset.
/// `None` if its key is no longer configured.
pub fn secret(keys: &Keys, user: UserId, issued: &Issued) -> Option<String> {
    let nonce = B64.decode(&issued.nonce).ok()?;
    secret_of(keys, user, issued.purpose, &nonce, &issued.key_id)
}

fn secret_of(keys: &Keys, user: UserId, purpose: Purpose, nonce: &[u8], key_id: &str) -> Option<String> {
    let mut message = purpose.as_str().as_bytes().to_vec();
    message.extend_from_slice(user.as_uuid().as_bytes());
    message.extend_from_slice(nonce);
    let (_, bytes) = keys.derive(Some(key_id), &message)?;
    Some(match purpose {
        // The bias of taking a 64-bit number modulo a million is below one in ten million.
        Purpose::SignIn | Purpose::VerifyEmail => {
            format!("{:06}", u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes")) % 1_000_000)
        }
        Purpose::PasswordReset => B64.encode(bytes),
    })
}

/// Uses up `user`'s live secret for `purpose` if `presented` is it: the address it was sent to.
/// A wrong guess costs an attempt; the last one, or expiry, ends the secret.
pub(crate) async fn consume(
    sql: &impl Sql,
    keys: &Keys,
    user: UserId,
    purpose: Purpose,
    presented: &str,
) -> Result<Option<String>, DbError> {
    let Some((nonce, email)) = spend_attempt(sql, keys, user, purpose, presented).await? else { return Ok(None) };
    sql.exec(
        "DELETE FROM one_time_codes WHERE user_id = $1 AND purpose = $2 AND nonce = $3",
        &[&user, &purpose.as_str(), &nonce],
    )
    .await?;
    Ok(Some(email))
}

/// Whether `presented` is `user`'s live secret for `purpose`, without using it up: the address it
/// was sent to. A wrong guess costs an attempt, as with [`consume`]; a right one costs nothing. For a
/// check before costly work (hashing a new password) done with no connection held, followed by
/// [`consume`] in the transaction that acts on it.
pub(crate) async fn check(
    sql: &impl Sql,
    keys: &Keys,
    user: UserId,
    purpose: Purpose,
    presented: &str,
) -> Result<Option<String>, DbError> {
    let Some((nonce, email)) = spend_attempt(sql, keys, user, purpose, presented).await? else { return Ok(None) };
    sql.exec(
        "UPDATE one_time_codes SET attempts_left = attempts_left + 1 WHERE user_id = $1 AND purpose = $2 AND nonce = $3",
        &[&user, &purpose.as_str(), &nonce],
    )
    .await?;
    Ok(Some(email))
}

/// Takes an attempt from the live secret and compares: its nonce and address if `presented` is it.
/// The attempt is taken first, in one statement, so concurrent guesses cannot share one.
async fn spend_attempt(
    sql: &impl Sql,
    keys: &Keys,
    user: UserId,
    purpose: Purpose,
    presented: &str,
) -> Result<Option<(Vec<u8>, String)>, DbError> {
    let row = sql
        .maybe_row(
            "UPDATE one_time_codes SET attempts_left = attempts_left - 1
             WHERE user_id = $1 AND purpose = $2 AND expires_at > now() AND attempts_left > 0
             RETURNING nonce, key_id, email",
            &[&user, &purpose.as_str()],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let nonce: Vec<u8> = row.get(0);
    let key_id: String = row.get(1);
    let Some(expected) = secret_of(keys, user, purpose, &nonce, &key_id) else { return Ok(None) };
    if !same_text(&expected, presented.trim()) {
        return Ok(None);
    }
    Ok(Some((nonce, row.get(2))))
}

/// A live secret as its e-mail needs it.
pub(crate) struct Live {
    pub secret: String,
    /// The address it was issued for.
    pub email: String,
}

/// `user`'s live secret for `purpose`, made again for its e-mail: the one `issued` stands for, or
/// with `None` whichever is live. `None` when it was replaced, used up or has expired (an e-mail
/// would carry a dead secret), or its key is no longer configured.
pub(crate) async fn live(
    sql: &impl Sql,
    keys: &Keys,
    user: UserId,
    purpose: Purpose,
    issued: Option<&Issued>,
) -> Result<Option<Live>, DbError> {
    let row = sql
        .maybe_row(
            "SELECT nonce, key_id, email FROM one_time_codes
             WHERE user_id = $1 AND purpose = $2 AND expires_at > now() AND attempts_left > 0",
            &[&user, &purpose.as_str()],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let (nonce, key_id): (Vec<u8>, String) = (row.get(0), row.get(1));
    if let Some(issued) = issued {
        if B64.encode(&nonce) != issued.nonce || key_id != issued.key_id {
            return Ok(None); // replaced by a newer one, which has its own e-mail
        }
    }
    Ok(secret_of(keys, user, purpose, &nonce, &key_id).map(|secret| Live { secret, email: row.get(2) }))
}

/// Issues a secret ([`issue`]) and enqueues the e-mail carrying it ([`CodeIssued`]), in the
/// caller's transaction: the secret exists exactly when its e-mail is due.
pub(crate) async fn issue_and_mail(
    tx: &impl Sql,
    keys: &Keys,
    user: UserId,
    purpose: Purpose,
    email: &str,
    traceparent: Option<String>,
) -> Result<(), DbError> {
    let issued = issue(tx, keys, user, purpose, email).await?;
    keel_outbox::enqueue(tx, &events::event(&CodeIssued { user_id: user, issued }, user, traceparent)).await?;
    Ok(())
}

/// A password reset token as mailed: `<user id>.<secret>`, so that it names the shard to check it on.
pub fn reset_token(user: UserId, secret: &str) -> String {
    format!("{user}.{secret}")
}

/// The user and secret of a token made by [`reset_token`], if it has that shape.
pub fn open_reset_token(token: &str) -> Option<(UserId, &str)> {
    let (user, secret) = token.trim().split_once('.')?;
    Some((user.parse().ok()?, secret))
}

/// Compares in a time that does not depend on where the texts differ.
fn same_text(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::auth::tokens::TokenKey;

    #[test]
    fn a_secret_is_made_again_from_its_nonce_and_differs_by_purpose_and_user() {
        let keys = Keys::new(vec![TokenKey::generate("k")]).unwrap();
        let user = UserId::new();
        let issued = |purpose| Issued { purpose, nonce: B64.encode([7u8; 16]), key_id: "k".into() };
        let code = secret(&keys, user, &issued(Purpose::SignIn)).unwrap();
        assert_eq!(code.len(), 6);
        assert!(code.bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(secret(&keys, user, &issued(Purpose::SignIn)).unwrap(), code);
        assert_ne!(secret(&keys, UserId::new(), &issued(Purpose::SignIn)).unwrap(), code);
        assert_eq!(secret(&keys, user, &issued(Purpose::PasswordReset)).unwrap().len(), 43);
        let gone = Issued { key_id: "retired".into(), ..issued(Purpose::SignIn) };
        assert_eq!(secret(&keys, user, &gone), None);
    }
}
