//! The built-in catalog: default providers, models, prices, tiers and
//! capabilities (`config/catalog.toml`, embedded at build time). The user's
//! config is merged over it field by field by `config::load`.
//!
//! This module is the raw data only (the text and its TOML table); it sits
//! below `config`, which reads it into typed providers
//! (`config::catalog_providers`).

use crate::error::Error;

/// The catalog's TOML text, as shipped in `config/catalog.toml`.
pub const CATALOG_TOML: &str = include_str!("../../config/catalog.toml");

/// How config errors name the catalog.
pub const CATALOG_NAME: &str = "built-in catalog (config/catalog.toml)";

/// The catalog as a raw TOML table (`{ providers = { … } }`), the base layer
/// the user's file is merged onto.
pub fn table() -> Result<toml::Table, Error> {
    CATALOG_TOML.parse::<toml::Table>().map_err(|e| {
        Error::config(
            CATALOG_NAME,
            "(syntax)",
            format!("valid TOML: {}", e.message()),
        )
    })
}
