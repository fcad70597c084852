//! openai plugin (in progress)
