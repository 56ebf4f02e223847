//! The tokens of a session, both made with the signing keys (`KEEL_TOKEN_KEYS`):
//!
//! - **Access tokens** are JWTs signed with HMAC-SHA-256 (`HS256`, RFC 7519), carrying the user, the
//!   session, and their issue and expiry times. Any node verifies one with no query: the signature,
//!   the expiry, and this node's list of revoked sessions ([`super::revocations`]). A keyed MAC
//!   rather than a signature with a public key, because only Keel's own nodes make and check these
//!   tokens, all of them holding the keys: a MAC costs a microsecond, and nothing is gained by letting
//!   a third party verify a token it cannot use. The header names the key (`kid`), so keys rotate:
//!   the first key signs, the others still verify until the tokens they signed have expired.
//! - **Refresh tokens** are `<user>.<session>.<generation>.<kid>.<mac>`, the MAC of the user's and
//!   session's ids and the generation (the user's id routes the refresh to the user's shard). Nothing secret is stored: the session row keeps the generation, and the token of a
//!   generation can be made again, which is how a retried refresh gets the very pair it was answered
//!   the first time ([`super::sessions`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::ids::{SessionId, UserId};

type HmacSha256 = Hmac<Sha256>;

/// The fewest bytes a key's secret may have: HMAC-SHA-256's output size.
pub const MIN_SECRET_BYTES: usize = 32;

/// One signing key: its id (in every token it signed) and its secret.
#[derive(Clone)]
pub struct TokenKey {
    pub id: String,
    secret: Vec<u8>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenKey({}, <secret>)", self.id)
    }
}

impl TokenKey {
    /// A new key with a random secret.
    pub fn generate(id: &str) -> TokenKey {
        let mut secret = vec![0u8; MIN_SECRET_BYTES];
        keel_random::secure_bytes(&mut secret);
        TokenKey { id: id.to_owned(), secret }
    }

    /// `id:secret`, the secret in URL-safe base64: how keys are written in settings.
    pub fn parse(text: &str) -> Result<TokenKey, String> {
        let (id, secret) = text.trim().split_once(':').ok_or("a key is written `id:secret`")?;
        if id.is_empty() || id.len() > 32 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(format!("{id:?} is not a key id: 1 to 32 letters, digits, `-` or `_`"));
        }
        let secret = B64
            .decode(secret.trim_end_matches('='))
            .map_err(|_| format!("the secret of key {id} is not URL-safe base64"))?;
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!("the secret of key {id} has {} bytes; at least {MIN_SECRET_BYTES}", secret.len()));
        }
        Ok(TokenKey { id: id.to_owned(), secret })
    }

    /// The form [`TokenKey::parse`] reads.
    pub fn to_setting(&self) -> String {
        format!("{}:{}", self.id, B64.encode(&self.secret))
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.secret).expect("HMAC takes a key of any length")
    }
}

/// What an access token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub sub: UserId,
    pub sid: SessionId,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expires at, Unix seconds.
    pub exp: u64,
}

#[derive(Serialize, Deserialize)]
struct Header<'a> {
    alg: &'a str,
    typ: &'a str,
    kid: &'a str,
}

/// Why a token was refused. Shown to nobody but the logs: a client is told only that it is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Malformed,
    UnknownKey,
    BadSignature,
    Expired,
}

/// The signing keys: the first signs, every one verifies.
#[derive(Clone, Debug)]
pub struct Keys {
    keys: Vec<TokenKey>,
}

impl Keys {
    pub fn new(keys: Vec<TokenKey>) -> Result<Keys, String> {
        if keys.is_empty() {
            return Err("at least one key is needed".into());
        }
        for (i, key) in keys.iter().enumerate() {
            if keys[..i].iter().any(|k| k.id == key.id) {
                return Err(format!("key id {} is given twice", key.id));
            }
        }
        Ok(Keys { keys })
    }

    fn signing(&self) -> &TokenKey {
        &self.keys[0]
    }

    fn key(&self, id: &str) -> Option<&TokenKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// An access token for `claims`, signed with the first key. The same claims make the same token.
    pub fn sign_access(&self, claims: &AccessClaims) -> String {
        let key = self.signing();
        let header = serde_json::to_vec(&Header { alg: "HS256", typ: "JWT", kid: &key.id }).expect("a header is JSON");
        let payload = serde_json::to_vec(claims).expect("claims are JSON");
        let mut token = format!("{}.{}", B64.encode(header), B64.encode(payload));
        let mut mac = key.mac();
        mac.update(token.as_bytes());
        let signature = B64.encode(mac.finalize().into_bytes());
        token.push('.');
        token.push_str(&signature);
        token
    }

    /// The claims of a valid, unexpired access token.
    pub fn verify_access(&self, token: &str, now: u64) -> Result<AccessClaims, Refused> {
        let (signed, signature) = token.rsplit_once('.').ok_or(Refused::Malformed)?;
        let (header, payload) = signed.split_once('.').ok_or(Refused::Malformed)?;
        let header = B64.decode(header).map_err(|_| Refused::Malformed)?;
        let header: Header<'_> = serde_json::from_slice(&header).map_err(|_| Refused::Malformed)?;
        // Only HS256: a token cannot choose a weaker algorithm (or `none`) for itself.
        if header.alg != "HS256" {
            return Err(Refused::Malformed);
        }
        let key = self.key(header.kid).ok_or(Refused::UnknownKey)?;
        let signature = B64.decode(signature).map_err(|_| Refused::Malformed)?;
        let mut mac = key.mac();
        mac.update(signed.as_bytes());
        // `verify_slice` compares in constant time.
        mac.verify_slice(&signature).map_err(|_| Refused::BadSignature)?;
        let payload = B64.decode(payload).map_err(|_| Refused::Malformed)?;
        let claims: AccessClaims = serde_json::from_slice(&payload).map_err(|_| Refused::Malformed)?;
        if claims.exp <= now {
            return Err(Refused::Expired);
        }
        Ok(claims)
    }

    /// A secret made from `message` with the key `key_id` (the signing key when `None`), and that
    /// key's id: for secrets that must not be stored but made again when needed (e-mailed codes).
    /// `None` if no such key is configured any more.
    pub fn derive(&self, key_id: Option<&str>, message: &[u8]) -> Option<(String, [u8; 32])> {
        let key = match key_id {
            Some(id) => self.key(id)?,
            None => self.signing(),
        };
        let mut mac = key.mac();
        mac.update(b"keel derive ");
        mac.update(message);
        Some((key.id.clone(), mac.finalize().into_bytes().into()))
    }

    /// The refresh token of a session's generation, made with the first key.
    pub fn refresh_token(&self, user: UserId, session: SessionId, generation: i32) -> String {
        let key = self.signing();
        let mac = B64.encode(refresh_mac(key, user, session, generation));
        format!("{user}.{session}.{generation}.{}.{mac}", key.id)
    }

    /// The user, session and generation a refresh token names, if a key of ours made it.
    pub fn open_refresh(&self, token: &str) -> Option<(UserId, SessionId, i32)> {
        let mut parts = token.trim().split('.');
        let (user, session, generation, kid, mac) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let (user, session): (UserId, SessionId) = (user.parse().ok()?, session.parse().ok()?);
        let generation: i32 = generation.parse().ok()?;
        let key = self.key(kid)?;
        let mac = B64.decode(mac).ok()?;
        let mut expected = key.mac();
        expected.update(&refresh_message(user, session, generation));
        expected.verify_slice(&mac).ok()?;
        Some((user, session, generation))
    }
}

fn refresh_message(user: UserId, session: SessionId, generation: i32) -> Vec<u8> {
    // Domain-separated from access tokens (whose signed text never starts with this).
    let mut message = b"keel refresh ".to_vec();
    message.extend_from_slice(user.as_uuid().as_bytes());
    message.extend_from_slice(session.as_uuid().as_bytes());
    message.extend_from_slice(&generation.to_be_bytes());
    message
}

fn refresh_mac(key: &TokenKey, user: UserId, session: SessionId, generation: i32) -> Vec<u8> {
    let mut mac = key.mac();
    mac.update(&refresh_message(user, session, generation));
    mac.finalize().into_bytes().to_vec()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()
}

/// The seconds of a timestamp.
pub fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(ids: &[&str]) -> Keys {
        Keys::new(ids.iter().map(|id| TokenKey::generate(id)).collect()).unwrap()
    }

    fn claims() -> AccessClaims {
        AccessClaims { sub: UserId::new(), sid: SessionId::new(), iat: 1_000, exp: 2_000 }
    }

    #[test]
    fn an_access_token_verifies_until_it_expires() {
        let keys = keys(&["a"]);
        let claims = claims();
        let token = keys.sign_access(&claims);
        assert_eq!(keys.verify_access(&token, 1_999), Ok(claims));
        assert_eq!(keys.verify_access(&token, 2_000), Err(Refused::Expired));
        assert_eq!(keys.sign_access(&claims), token, "the same claims make the same token");
    }

    #[test]
    fn a_token_changed_anywhere_or_signed_by_another_key_is_refused() {
        let keys = keys(&["a"]);
        let token = keys.sign_access(&claims());
        for i in [0, token.len() / 2, token.len() - 2] {
            let mut bytes = token.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let changed = String::from_utf8(bytes).unwrap();
            assert!(keys.verify_access(&changed, 1_500).is_err(), "byte {i}");
        }
        let other = Keys::new(vec![TokenKey::generate("a")]).unwrap();
        assert_eq!(other.verify_access(&token, 1_500), Err(Refused::BadSignature));
        assert_eq!(
            super::Keys::new(vec![TokenKey::generate("b")]).unwrap().verify_access(&token, 1_500),
            Err(Refused::UnknownKey)
        );
        // A token that names another algorithm is refused whatever its signature.
        let none =
            format!("{}.{}.", B64.encode(r#"{"alg":"none","typ":"JWT","kid":"a"}"#), token.split('.').nth(1).unwrap());
        assert_eq!(keys.verify_access(&none, 1_500), Err(Refused::Malformed));
    }

    #[test]
    fn keys_rotate_old_ones_still_verify() {
        let old = TokenKey::generate("old");
        let before = Keys::new(vec![old.clone()]).unwrap();
        let token = before.sign_access(&claims());
        let refresh = before.refresh_token(UserId::new(), SessionId::new(), 3);
        let after = Keys::new(vec![TokenKey::generate("new"), old]).unwrap();
        assert!(after.verify_access(&token, 1_500).is_ok());
        assert!(after.open_refresh(&refresh).is_some());
        assert!(after.sign_access(&claims()).len() > 10);
        let header = B64.decode(after.sign_access(&claims()).split('.').next().unwrap()).unwrap();
        assert!(String::from_utf8(header).unwrap().contains(r#""kid":"new""#));
    }

    #[test]
    fn a_refresh_token_names_its_session_and_generation_and_cannot_be_forged() {
        let keys = keys(&["a"]);
        let (user, session) = (UserId::new(), SessionId::new());
        let token = keys.refresh_token(user, session, 7);
        assert_eq!(keys.open_refresh(&token), Some((user, session, 7)));
        assert_eq!(keys.refresh_token(user, session, 7), token, "a generation's token can be made again");
        assert_eq!(keys.open_refresh(&token.replacen(".7.", ".8.", 1)), None);
        let other_user = token.replacen(&user.to_string(), &UserId::new().to_string(), 1);
        assert_eq!(keys.open_refresh(&other_user), None);
        assert_eq!(keys.open_refresh("garbage"), None);
        assert_eq!(keys.open_refresh(&format!("{token}.x")), None);
    }

    #[test]
    fn key_settings_round_trip_and_bad_ones_say_why() {
        let key = TokenKey::generate("k1");
        let parsed = TokenKey::parse(&key.to_setting()).unwrap();
        assert_eq!(parsed.id, "k1");
        assert_eq!(parsed.secret, key.secret);
        assert!(TokenKey::parse("nocolon").unwrap_err().contains("id:secret"));
        assert!(TokenKey::parse("k:c2hvcnQ").unwrap_err().contains("at least 32"));
        assert!(TokenKey::parse("bad id:AAAA").unwrap_err().contains("not a key id"));
        assert!(Keys::new(vec![key.clone(), key]).unwrap_err().contains("twice"));
    }
}
