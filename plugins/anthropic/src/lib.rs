//! anthropic plugin (in progress)
