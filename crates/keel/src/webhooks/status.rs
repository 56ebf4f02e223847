//! Where a delivery stands. Stored in `webhook_deliveries.status` (whose CHECK constraint allows
//! exactly these values) and shown in the API as the same text; [`DeliveryStatus::as_str`] is the
//! one mapping between the two.

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};
use tokio_postgres::types::{FromSql, Type};
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Made by fan-out (or replayed), not yet attempted.
    Pending,
    /// Failed; another attempt is due at `next_attempt_at`.
    Retrying,
    /// The endpoint answered 2xx.
    Succeeded,
    /// No more attempts: the schedule ran out, the endpoint is gone or refused, or the subscription
    /// is disabled. Replayable.
    Dead,
}

impl DeliveryStatus {
    pub const ALL: [DeliveryStatus; 4] =
        [DeliveryStatus::Pending, DeliveryStatus::Retrying, DeliveryStatus::Succeeded, DeliveryStatus::Dead];

    /// The stored and serialized text.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Retrying => "retrying",
            DeliveryStatus::Succeeded => "succeeded",
            DeliveryStatus::Dead => "dead",
        }
    }
}

/// Text that is not one of the [`DeliveryStatus`] values.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a webhook delivery status")]
pub struct UnknownStatus(String);

impl FromStr for DeliveryStatus {
    type Err = UnknownStatus;

    fn from_str(text: &str) -> Result<DeliveryStatus, UnknownStatus> {
        DeliveryStatus::ALL.into_iter().find(|status| status.as_str() == text).ok_or_else(|| UnknownStatus(text.into()))
    }
}

impl fmt::Display for DeliveryStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for DeliveryStatus {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Read from the `status` column; written as [`DeliveryStatus::as_str`].
impl<'a> FromSql<'a> for DeliveryStatus {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<DeliveryStatus, Box<dyn std::error::Error + Sync + Send>> {
        Ok(<&str as FromSql>::from_sql(ty, raw)?.parse()?)
    }

    fn accepts(ty: &Type) -> bool {
        <&str as FromSql>::accepts(ty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_is_serialized_as_stored() {
        for status in DeliveryStatus::ALL {
            assert_eq!(status.as_str().parse::<DeliveryStatus>().unwrap(), status);
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
            assert_eq!(status.to_string(), status.as_str());
        }
        assert!("delivered".parse::<DeliveryStatus>().is_err());
        assert!("Dead".parse::<DeliveryStatus>().is_err());
    }

    #[test]
    fn the_database_and_the_document_allow_exactly_these_values() {
        let quoted: Vec<String> = DeliveryStatus::ALL.iter().map(|s| format!("'{s}'")).collect();
        let check = format!("CHECK (status IN ({}))", quoted.join(", "));
        let schema = include_str!("../../migrations/catalog/0004_search_and_webhooks.sql");
        assert!(schema.contains(&check), "the migration's constraint is not {check}");

        let document = serde_json::to_value(<DeliveryStatus as utoipa::PartialSchema>::schema()).unwrap();
        let names: Vec<&str> = DeliveryStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(document["enum"], serde_json::json!(names), "{document}");
    }
}
