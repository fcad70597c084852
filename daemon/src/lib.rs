//! llmq
