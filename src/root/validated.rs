//! Parse, don't validate twice: a provider's `[keys.NAME]` fields as written ([`Check`]),
//! wrapped once they passed their checks ([`Validated`]). Parsing goes through the checks,
//! so everything that holds a `Validated` may rely on them.

use std::ops::Deref;

use serde::Deserialize;

/// The checks of a provider's config fields.
pub trait Check {
    /// What is wrong and how to fix it, or `Ok`.
    fn check(&self) -> Result<(), String>;
}

/// Config fields that passed [`Check::check`]; only made by [`Validated::new`] (which
/// deserializing goes through). Reads like the fields through `Deref`.
#[derive(Debug, Clone)]
pub struct Validated<F>(F);

impl<F: Check> Validated<F> {
    /// Checks `fields`; the error says what is wrong and how to fix it.
    pub fn new(fields: F) -> Result<Self, String> {
        fields.check()?;
        Ok(Self(fields))
    }
}

impl<'de, F: Deserialize<'de> + Check> Deserialize<'de> for Validated<F> {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        Self::new(F::deserialize(de)?).map_err(serde::de::Error::custom)
    }
}

impl<F> Deref for Validated<F> {
    type Target = F;

    fn deref(&self) -> &F {
        &self.0
    }
}
