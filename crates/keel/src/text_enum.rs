//! Enums stored as text (order status, failure reason, webhook delivery status): each value's text is
//! written once, in the invocation of [`text_enum!`], and used for the database, JSON and display.

/// A stored text that names none of a type's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not {what}")]
pub struct UnknownValue {
    pub(crate) what: &'static str,
    pub(crate) value: String,
}

/// An enum stored as text: each value's text written once, in the table of the invocation, and
/// used for the database (`as_str`, `FromStr`, `FromSql`), JSON (serde through the same text)
/// and `Display` alike.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident, $what:literal { $($(#[$variant_meta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ::serde::Serialize, ::serde::Deserialize)]
        #[serde(into = "&'static str", try_from = "String")]
        pub enum $name {
            $($(#[$variant_meta])* $variant,)+
        }

        impl $name {
            /// Every value.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The text stored in the database and shown in the API.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::text_enum::UnknownValue;

            fn from_str(text: &str) -> Result<$name, $crate::text_enum::UnknownValue> {
                match text {
                    $($text => Ok($name::$variant),)+
                    other => Err($crate::text_enum::UnknownValue { what: $what, value: other.to_owned() }),
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl From<$name> for &'static str {
            fn from(value: $name) -> &'static str {
                value.as_str()
            }
        }

        impl TryFrom<String> for $name {
            type Error = $crate::text_enum::UnknownValue;

            fn try_from(text: String) -> Result<$name, $crate::text_enum::UnknownValue> {
                text.parse()
            }
        }

        impl<'a> ::tokio_postgres::types::FromSql<'a> for $name {
            fn from_sql(ty: &::tokio_postgres::types::Type, raw: &'a [u8]) -> Result<$name, Box<dyn std::error::Error + Sync + Send>> {
                Ok(<&str as ::tokio_postgres::types::FromSql>::from_sql(ty, raw)?.parse()?)
            }

            fn accepts(ty: &::tokio_postgres::types::Type) -> bool {
                <&str as ::tokio_postgres::types::FromSql>::accepts(ty)
            }
        }
    };
}

pub(crate) use text_enum;
