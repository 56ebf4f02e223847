//! Standard Webhooks 1.0 signatures: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed
//! with the base64-decoded part of a `whsec_…` secret.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const PREFIX: &str = "whsec_";

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

/// The `webhook-signature` header value for one attempt.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> Result<String, BadSecret> {
    let key = secret.strip_prefix(PREFIX).ok_or(BadSecret::Prefix)?;
    let key = BASE64.decode(key)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes a key of any length");
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    Ok(format!("v1,{}", BASE64.encode(mac.finalize().into_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification and its reference libraries.
    #[test]
    fn matches_the_specification_example() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(sign(secret, id, 1614265330, body).unwrap(), "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn secrets_are_fresh_and_well_formed() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        assert_eq!(BASE64.decode(a.strip_prefix(PREFIX).unwrap()).unwrap().len(), 24);
        assert!(sign("nope", "id", 1, "{}").is_err());
    }
}
