//! Where a delivery stands. Stored in `webhook_deliveries.status` (whose CHECK constraint allows
//! exactly these values) and shown in the API as the same text; [`DeliveryStatus::as_str`] is the
//! one mapping between the two.

crate::text_enum::text_enum! {
    /// Where a delivery stands.
    #[derive(utoipa::ToSchema)]
    #[schema(rename_all = "lowercase")]
    DeliveryStatus, "a webhook delivery status" {
        /// Made by fan-out (or replayed), not yet attempted.
        Pending = "pending",
        /// Failed; another attempt is due at `next_attempt_at`.
        Retrying = "retrying",
        /// The endpoint answered 2xx.
        Succeeded = "succeeded",
        /// No more attempts: the schedule ran out, the endpoint is gone or refused, or the
        /// subscription is disabled. Replayable.
        Dead = "dead",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_is_serialized_as_stored() {
        for &status in DeliveryStatus::ALL {
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
