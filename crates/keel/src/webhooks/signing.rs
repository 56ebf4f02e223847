//! Standard Webhooks 1.0 signatures: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed
//! with the base64-decoded part of a `whsec_…` secret. Keel signs the webhooks it sends with it, and
//! verifies the ones it receives (payment events) with the same code.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const PREFIX: &str = "whsec_";

/// The headers a signed message travels with.
pub const ID_HEADER: &str = "webhook-id";
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const SIGNATURE_HEADER: &str = "webhook-signature";

/// A new secret: 24 random bytes (192 bits), as the specification suggests (between 24 and 64).
pub fn new_secret() -> String {
    let mut key = [0u8; 24];
    keel_random::secure_bytes(&mut key);
    format!("{PREFIX}{}", BASE64.encode(key))
}

/// A stored secret that cannot key a signature.
#[derive(Debug, thiserror::Error)]
pub enum BadSecret {
    #[error("the secret does not start with whsec_")]
    Prefix,
    #[error("the secret is not base64: {0}")]
    Base64(#[from] base64::DecodeError),
}

/// The key of a `whsec_…` secret, decoded once. Its `Debug` shows no part of it, so a
/// configuration holding one can be logged.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({} bytes, redacted)", self.0.len())
    }
}

impl SigningKey {
    pub fn parse(secret: &str) -> Result<SigningKey, BadSecret> {
        let key = secret.strip_prefix(PREFIX).ok_or(BadSecret::Prefix)?;
        Ok(SigningKey(BASE64.decode(key)?))
    }

    /// How many bytes the key has: a configured secret must have enough to be worth keeping.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        mac
    }

    /// The `webhook-signature` header value for one message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        format!("v1,{}", BASE64.encode(self.mac(id, timestamp, body).finalize().into_bytes()))
    }

    /// Checks a received message: its timestamp is within `tolerance` of `now` (both in seconds since
    /// the epoch), so a captured message cannot be replayed later, and one of the `v1` signatures of
    /// its `webhook-signature` header (a space-separated list, so a sender can rotate secrets) is this
    /// key's. Signatures are compared in constant time (`Mac::verify_slice`): how soon a comparison
    /// fails must not tell a forger how much of a guess was right.
    pub fn verify(&self, message: &Signed<'_>, body: &[u8], now: i64, tolerance: Duration) -> Result<(), Unverified> {
        let timestamp: i64 = message.timestamp.trim().parse().map_err(|_| Unverified::Timestamp)?;
        let off = now.abs_diff(timestamp);
        if off > tolerance.as_secs() {
            return Err(Unverified::Stale { off, tolerance: tolerance.as_secs() });
        }
        let matches = message
            .signatures
            .split(' ')
            .filter_map(|signature| signature.strip_prefix("v1,"))
            .filter_map(|signature| BASE64.decode(signature).ok())
            .any(|signature| self.mac(message.id, timestamp, body).verify_slice(&signature).is_ok());
        if matches {
            Ok(())
        } else {
            Err(Unverified::Signature)
        }
    }
}

/// The signature headers of a received message.
pub struct Signed<'a> {
    pub id: &'a str,
    pub timestamp: &'a str,
    pub signatures: &'a str,
}

/// Why a received message was not accepted as signed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unverified {
    #[error("the {0} header is missing or not text")]
    Missing(&'static str),
    #[error("the webhook-timestamp header is not a whole number of seconds since 1970")]
    Timestamp,
    #[error("the webhook-timestamp is {off} s away from this server's clock, more than the {tolerance} s allowed")]
    Stale { off: u64, tolerance: u64 },
    #[error("no webhook-signature matches the message")]
    Signature,
}

impl<'a> Signed<'a> {
    /// The three headers of a received message.
    pub fn from_headers(headers: &'a axum::http::HeaderMap) -> Result<Signed<'a>, Unverified> {
        let header = |name: &'static str| {
            headers.get(name).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty()).ok_or(Unverified::Missing(name))
        };
        Ok(Signed {
            id: header(ID_HEADER)?,
            timestamp: header(TIMESTAMP_HEADER)?,
            signatures: header(SIGNATURE_HEADER)?,
        })
    }
}

/// The `webhook-signature` header value for one attempt, with a stored secret.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> Result<String, BadSecret> {
    Ok(SigningKey::parse(secret)?.sign(id, timestamp, body.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const BODY: &str = r#"{"test": 2432232314}"#;
    const TIMESTAMP: i64 = 1614265330;
    /// The example of the Standard Webhooks specification and its reference libraries.
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn matches_the_specification_example() {
        assert_eq!(sign(SECRET, ID, TIMESTAMP, BODY).unwrap(), SIGNATURE);
    }

    #[test]
    fn secrets_are_fresh_and_well_formed() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        assert_eq!(BASE64.decode(a.strip_prefix(PREFIX).unwrap()).unwrap().len(), 24);
        assert!(sign("nope", "id", 1, "{}").is_err());
        assert_eq!(SigningKey::parse(&a).unwrap().len(), 24);
        assert!(!format!("{:?}", SigningKey::parse(&a).unwrap()).contains(a.strip_prefix(PREFIX).unwrap()));
    }

    #[test]
    fn verifies_the_specification_example_and_nothing_else() {
        let key = SigningKey::parse(SECRET).unwrap();
        let minutes = |m: i64| TIMESTAMP + m * 60;
        let five = Duration::from_secs(300);
        let stamp = TIMESTAMP.to_string();
        let signed = |signatures| Signed { id: ID, timestamp: &stamp, signatures };
        assert_eq!(key.verify(&signed(SIGNATURE), BODY.as_bytes(), TIMESTAMP, five), Ok(()));
        // Within 5 minutes either way of the clock; not beyond.
        assert_eq!(key.verify(&signed(SIGNATURE), BODY.as_bytes(), minutes(5), five), Ok(()));
        assert_eq!(key.verify(&signed(SIGNATURE), BODY.as_bytes(), minutes(-5), five), Ok(()));
        let stale = key.verify(&signed(SIGNATURE), BODY.as_bytes(), minutes(5) + 1, five);
        assert_eq!(stale, Err(Unverified::Stale { off: 301, tolerance: 300 }));
        assert!(key.verify(&signed(SIGNATURE), BODY.as_bytes(), minutes(-6), five).is_err());
        // Any one of several signatures may match (a sender rotating its secret); other versions are skipped.
        let several = format!("v1,bm90IGl0 v1a,{} {SIGNATURE}", &SIGNATURE[3..]);
        assert_eq!(key.verify(&signed(&several), BODY.as_bytes(), TIMESTAMP, five), Ok(()));
        // Another body, id, timestamp or key, a truncated or undecodable signature: refused.
        let refused = |key: &SigningKey, message: &Signed<'_>, body: &str| {
            key.verify(message, body.as_bytes(), TIMESTAMP + 1, five) == Err(Unverified::Signature)
        };
        assert!(refused(&key, &signed(SIGNATURE), r#"{"test": 2432232315}"#));
        assert!(refused(&key, &Signed { id: "msg_other", timestamp: &stamp, signatures: SIGNATURE }, BODY));
        let later = (TIMESTAMP + 1).to_string();
        assert!(refused(&key, &Signed { id: ID, timestamp: &later, signatures: SIGNATURE }, BODY));
        assert!(refused(&SigningKey::parse(&new_secret()).unwrap(), &signed(SIGNATURE), BODY));
        assert!(refused(&key, &signed(&SIGNATURE[..20]), BODY));
        assert!(refused(&key, &signed(&SIGNATURE[3..]), BODY), "without its version");
        assert!(refused(&key, &signed("v1,!!!"), BODY));
        let not_a_number = Signed { id: ID, timestamp: "soon", signatures: SIGNATURE };
        assert_eq!(key.verify(&not_a_number, BODY.as_bytes(), TIMESTAMP, five), Err(Unverified::Timestamp));
    }
}
