//! The ids of the shop's entities, one type each, so that a user id cannot be passed where an order
//! or a product id is meant (nor route a request to a shard: [`crate::db::Databases::shard_of`]
//! takes a [`UserId`]).
//!
//! Each is a UUID (version 7, time-ordered, as new ids have always been) and nothing more: the same
//! text in JSON ([`serde`], transparent) and in [`fmt::Display`] (the hyphenated lower-case form),
//! the same `uuid` column in PostgreSQL ([`ToSql`], [`FromSql`]), and a plain string in the OpenAPI
//! document (fields holding one say `#[schema(value_type = String)]`). The ids of the machinery
//! (events and jobs, webhooks and their deliveries, deposits) stay [`Uuid`]s.

use std::error::Error;
use std::fmt;
use std::str::FromStr;

use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use uuid::Uuid;

macro_rules! id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new id: a UUIDv7, so ids sort in the order they were made.
            #[allow(clippy::new_without_default, reason = "a default id would be a fresh one, made unnoticed")]
            pub fn new() -> $name {
                $name(Uuid::now_v7())
            }

            /// The id that `uuid` is, for a UUID known to be one (a job's aggregate, a cursor).
            pub const fn from_uuid(uuid: Uuid) -> $name {
                $name(uuid)
            }

            pub const fn as_uuid(self) -> Uuid {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;

            fn from_str(text: &str) -> Result<$name, uuid::Error> {
                Uuid::try_parse(text).map($name)
            }
        }

        impl ToSql for $name {
            fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
                self.0.to_sql(ty, out)
            }

            fn accepts(ty: &Type) -> bool {
                <Uuid as ToSql>::accepts(ty)
            }

            to_sql_checked!();
        }

        impl<'a> FromSql<'a> for $name {
            fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<$name, Box<dyn Error + Sync + Send>> {
                Uuid::from_sql(ty, raw).map($name)
            }

            fn accepts(ty: &Type) -> bool {
                <Uuid as FromSql>::accepts(ty)
            }
        }
    };
}

id! {
    /// A user's id: it also names the user's shard.
    UserId
}

id! {
    /// A product's id, in the catalogue.
    ProductId
}

id! {
    /// An order's id, on its user's shard.
    OrderId
}

id! {
    /// A session's id (a signed-in device), on its user's shard.
    SessionId
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_id_is_its_uuid_in_text_and_json() {
        let uuid = Uuid::now_v7();
        let user = UserId::from_uuid(uuid);
        assert_eq!(user.to_string(), uuid.to_string());
        assert_eq!(user.to_string(), uuid.hyphenated().to_string());
        assert_eq!(json!(user), json!(uuid.to_string()));
        assert_eq!(serde_json::from_value::<UserId>(json!(uuid.to_string())).unwrap(), user);
        assert_eq!(uuid.to_string().parse::<UserId>().unwrap(), user);
        assert_eq!(user.as_uuid(), uuid);
        assert!("not-an-id".parse::<ProductId>().is_err());
        assert!(serde_json::from_value::<OrderId>(json!(7)).is_err());
    }

    #[test]
    fn new_ids_are_version_7_and_ordered() {
        let (a, b) = (OrderId::new(), OrderId::new());
        assert_eq!(a.as_uuid().get_version_num(), 7);
        assert!(a < b);
    }

    #[test]
    fn an_id_is_a_uuid_to_postgres() {
        let id = ProductId::new();
        let mut out = BytesMut::new();
        id.to_sql_checked(&Type::UUID, &mut out).unwrap();
        assert_eq!(&out[..], id.as_uuid().as_bytes());
        assert_eq!(ProductId::from_sql(&Type::UUID, &out).unwrap(), id);
        assert!(<ProductId as ToSql>::accepts(&Type::UUID) && !<ProductId as ToSql>::accepts(&Type::TEXT));
        assert!(<Vec<ProductId> as ToSql>::accepts(&Type::UUID_ARRAY));
        assert!(id.to_sql_checked(&Type::TEXT, &mut out).is_err());
    }
}
