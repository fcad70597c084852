//! gemini plugin (in progress)
