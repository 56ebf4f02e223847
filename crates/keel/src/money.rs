//! Money: whole cents in an `i64`, added and multiplied only with overflow checked, so a total too
//! large to represent is an error a handler can answer with 422, never a wrapped number or a panic.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An amount in cents. Serialized as a plain JSON number, as the API has always shown money.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = i64)]
pub struct Cents(pub i64);

/// An amount too large for a 64-bit number of cents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the amount is larger than {} cents", i64::MAX)]
pub struct Overflow;

impl Cents {
    pub const ZERO: Cents = Cents(0);

    pub fn checked_add(self, other: Cents) -> Result<Cents, Overflow> {
        self.0.checked_add(other.0).map(Cents).ok_or(Overflow)
    }

    /// This price `quantity` times.
    pub fn times(self, quantity: i64) -> Result<Cents, Overflow> {
        self.0.checked_mul(quantity).map(Cents).ok_or(Overflow)
    }

    /// The sum of `amounts`, or [`Overflow`].
    pub fn sum(amounts: impl IntoIterator<Item = Result<Cents, Overflow>>) -> Result<Cents, Overflow> {
        amounts.into_iter().try_fold(Cents::ZERO, |total, amount| total.checked_add(amount?))
    }
}

impl std::fmt::Display for Cents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} cents", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_and_products_are_checked() {
        assert_eq!(Cents(250).times(4), Ok(Cents(1_000)));
        assert_eq!(Cents::sum([Ok(Cents(1)), Cents(2).times(3)]), Ok(Cents(7)));
        assert_eq!(Cents(i64::MAX).checked_add(Cents(1)), Err(Overflow));
        assert_eq!(Cents(i64::MAX / 2 + 1).times(2), Err(Overflow));
        assert_eq!(Cents::sum([Ok(Cents(i64::MAX)), Ok(Cents(1))]), Err(Overflow));
        assert_eq!(serde_json::to_string(&Cents(42)).unwrap(), "42");
    }
}
