//! # llmq-plugin-openai
//!
//! The llmq provider plugin for every OpenAI-compatible chat-completions API:
//! OpenAI, Groq, NVIDIA NIM, Mistral, Z.AI, OpenRouter, Ollama, DeepSeek,
//! vLLM… one plugin, many providers, told apart only by `base_url` and
//! `options`.
//!
//! Sans-I/O like every llmq plugin: [`prepare`] builds the HTTP request,
//! [`parse`] classifies the response into one [`llmq_sdk::Outcome`]. The
//! outcome mapping is documented in the crate's README.

pub mod parse;
pub mod prepare;
mod redact;

use llmq_sdk::{
    HttpRequest, HttpResponse, Manifest, Parsed, Plugin, PluginError, PrepareInput, ProviderDefault,
};

/// The wire protocol this plugin speaks.
pub const PROTOCOL: &str = "openai-chat";

/// Default providers advertised in the manifest: `(name, base_url)`.
pub const DEFAULT_PROVIDERS: &[(&str, &str)] = &[
    ("openai", "https://api.openai.com/v1"),
    ("groq", "https://api.groq.com/openai/v1"),
    ("nvidia", "https://integrate.api.nvidia.com/v1"),
    ("mistral", "https://api.mistral.ai/v1"),
    // Z.AI's international platform (https://docs.z.ai); its Chinese twin,
    // BigModel (https://docs.bigmodel.cn), has its own accounts and keys.
    ("zai", "https://api.z.ai/api/paas/v4"),
    ("bigmodel", "https://open.bigmodel.cn/api/paas/v4"),
    ("openrouter", "https://openrouter.ai/api/v1"),
    ("ollama", "http://127.0.0.1:11434/v1"),
    ("deepseek", "https://api.deepseek.com/v1"),
];

/// The plugin: a unit struct, exported through the C ABI below.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenAiPlugin;

impl Plugin for OpenAiPlugin {
    fn manifest() -> Manifest {
        Manifest {
            name: "openai".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            protocols: vec![PROTOCOL.into()],
            providers: DEFAULT_PROVIDERS
                .iter()
                .map(|(name, base_url)| ProviderDefault {
                    name: (*name).into(),
                    base_url: (*base_url).into(),
                })
                .collect(),
        }
    }

    fn prepare(input: &PrepareInput) -> Result<HttpRequest, PluginError> {
        prepare::prepare(input)
    }

    fn parse(response: &HttpResponse) -> Result<Parsed, PluginError> {
        Ok(parse::parse(response))
    }
}

llmq_sdk::export_plugin!(OpenAiPlugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_names_the_plugin_protocol_and_defaults() {
        let m = <OpenAiPlugin as Plugin>::manifest();
        assert_eq!(m.name, "openai");
        assert_eq!(m.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(m.protocols, vec!["openai-chat".to_string()]);
        let names: Vec<&str> = m.providers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "openai",
                "groq",
                "nvidia",
                "mistral",
                "zai",
                "bigmodel",
                "openrouter",
                "ollama",
                "deepseek"
            ]
        );
        let groq = m.providers.iter().find(|p| p.name == "groq").unwrap();
        assert_eq!(groq.base_url, "https://api.groq.com/openai/v1");
        let base = |name: &str| {
            m.providers
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.base_url.as_str())
        };
        assert_eq!(base("zai"), Some("https://api.z.ai/api/paas/v4"));
        assert_eq!(
            base("bigmodel"),
            Some("https://open.bigmodel.cn/api/paas/v4")
        );
        assert!(m
            .providers
            .iter()
            .all(|p| p.base_url.starts_with("http") && !p.base_url.ends_with('/')));
    }
}
