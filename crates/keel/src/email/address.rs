//! An e-mail address, parsed once where it enters (sign-up) with the parser the mailer uses, so an
//! address Keel accepted can always be mailed, and trusted from then on.

use std::str::FromStr;

use lettre::Address;

/// A lower-cased, checked e-mail address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(Address);

impl Email {
    /// Trims and lower-cases `raw`, then checks it: what the mailer's parser (lettre's) accepts, with a
    /// dotted domain of letters, digits, `-` and `.`, at most 254 characters. The reason says what is
    /// wrong, for the person who typed it.
    pub fn parse(raw: &str) -> Result<Email, String> {
        let email = raw.trim().to_lowercase();
        let invalid = || format!("{raw:?} is not a valid e-mail address");
        let (_, domain) = email.split_once('@').ok_or_else(invalid)?;
        let dotted = domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !domain.contains("..")
            && domain.chars().all(|c| c.is_alphanumeric() || c == '.' || c == '-');
        if !dotted || email.len() > 254 {
            return Err(invalid());
        }
        Address::from_str(&email).map(Email).map_err(|_| invalid())
    }

    pub fn as_str(&self) -> &str {
        self.0.as_ref()
    }

    /// The address as the mailer takes it.
    pub fn address(&self) -> &Address {
        &self.0
    }
}

impl std::fmt::Display for Email {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::Email;

    #[test]
    fn addresses_are_normalised_and_checked_as_the_mailer_would() {
        assert_eq!(Email::parse("  Ada@Example.ORG ").unwrap().as_str(), "ada@example.org");
        assert_eq!(
            Email::parse("ada.lovelace+shop@mail.example.org").unwrap().as_str(),
            "ada.lovelace+shop@mail.example.org"
        );
        for bad in [
            "",
            "ada",
            "@example.org",
            "ada@",
            "ada@example",
            "ada@@example.org",
            "a da@example.org",
            "ada@exa mple.org",
            "ada@.org",
            "ada@example..org",
            // Accepted once by a looser check, then refused by the mailer for hours of retries.
            "a,b@example.org",
            "ada;x@example.org",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
