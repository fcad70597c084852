//! The shared token estimate.
//!
//! Upstreams such as OpenAI charge a request against tokens-per-minute
//! *before* running it, using the prompt estimate plus `max_tokens`. llmq
//! charges its own limiter the same way, and the mock provider enforces TPM
//! with this very formula, so the two agree to the token.

use crate::types::{ChatRequest, Content, ContentPart};

/// Tokens charged per message for role and framing.
pub const PER_MESSAGE_TOKENS: u64 = 4;
/// Tokens charged per image part.
pub const PER_IMAGE_TOKENS: u64 = 85;
/// `max_tokens` assumed when a job gives none.
pub const DEFAULT_MAX_TOKENS: u64 = 256;

/// Tokens of a piece of text: one per four bytes, rounded up.
pub fn text_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

/// Estimated prompt tokens of a message list.
pub fn prompt_tokens(messages: &[crate::types::Message]) -> u64 {
    messages
        .iter()
        .map(|m| {
            PER_MESSAGE_TOKENS
                + match &m.content {
                    Content::Text(t) => text_tokens(t),
                    Content::Parts(parts) => parts
                        .iter()
                        .map(|p| match p {
                            ContentPart::Text { text } => text_tokens(text),
                            ContentPart::ImageUrl { .. } => PER_IMAGE_TOKENS,
                        })
                        .sum(),
                }
        })
        .sum()
}

/// What a request is charged against tokens-per-minute before it is sent.
pub fn charged_tokens(req: &ChatRequest) -> u64 {
    prompt_tokens(&req.messages) + req.max_tokens.map(u64::from).unwrap_or(DEFAULT_MAX_TOKENS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Message;

    #[test]
    fn estimate_counts_text_images_and_max_tokens() {
        let req = ChatRequest {
            model: "m".into(),
            messages: vec![
                Message {
                    role: "user".into(),
                    content: Content::Text("abcdefgh".into()),
                },
                Message {
                    role: "user".into(),
                    content: Content::Parts(vec![
                        ContentPart::Text { text: "abc".into() },
                        ContentPart::ImageUrl {
                            image_url: crate::types::ImageUrl {
                                url: "u".into(),
                                detail: None,
                            },
                        },
                    ]),
                },
            ],
            max_tokens: Some(10),
            temperature: None,
            json: false,
        };
        assert_eq!(prompt_tokens(&req.messages), 4 + 2 + 4 + 1 + 85);
        assert_eq!(charged_tokens(&req), 96 + 10);
    }
}
