//! The built-in catalog: default providers, models, prices, tiers and
//! capabilities (`config/catalog.toml`, embedded at build time). The user's
//! config is merged over it field by field by `config::load`.

use crate::config::ProviderConfig;
use crate::error::Error;
use serde::Deserialize;
use std::collections::BTreeMap;

/// The catalog's TOML text, as shipped in `config/catalog.toml`.
pub const CATALOG_TOML: &str = include_str!("../../config/catalog.toml");

/// How config errors name the catalog.
pub const CATALOG_NAME: &str = "built-in catalog (config/catalog.toml)";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    providers: BTreeMap<String, ProviderConfig>,
}

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

/// The catalog's providers, typed.
pub fn providers() -> Result<BTreeMap<String, ProviderConfig>, Error> {
    let de = toml::Deserializer::new(CATALOG_TOML);
    serde_path_to_error::deserialize::<_, CatalogFile>(de)
        .map(|c| c.providers)
        .map_err(|e| {
            Error::config(
                CATALOG_NAME,
                e.path().to_string(),
                e.inner().message().to_string(),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Tier;

    #[test]
    fn catalog_parses_and_has_the_seed_providers() {
        let p = providers().unwrap();
        for name in [
            "openai",
            "anthropic",
            "gemini",
            "groq",
            "mistral",
            "nvidia",
            "zai",
            "bigmodel",
            "openrouter",
            "ollama",
        ] {
            let prov = p.get(name).unwrap_or_else(|| panic!("{name} missing"));
            assert!(!prov.base_url.is_empty(), "{name}");
            assert!(!prov.models.is_empty(), "{name}");
        }
        assert_eq!(p["groq"].tier, Tier::Free);
        assert_eq!(p["mistral"].tier, Tier::Trial);
        assert_eq!(p["anthropic"].env_aliases, vec!["CLAUDE".to_string()]);
        assert_eq!(p["gemini"].env_aliases, vec!["GOOGLE".to_string()]);
        assert!(p["ollama"].keyless);
        // Z.AI's international API and BigModel (China) are separate
        // platforms with separate keys.
        assert_eq!(p["zai"].base_url, "https://api.z.ai/api/paas/v4");
        assert_eq!(
            p["bigmodel"].base_url,
            "https://open.bigmodel.cn/api/paas/v4"
        );
        assert_eq!(p["bigmodel"].keys_env.as_deref(), Some("BIGMODEL"));
        assert_eq!(p["bigmodel"].env_aliases, vec!["ZHIPUAI".to_string()]);
        assert!(table().unwrap().contains_key("providers"));
    }
}
