//! testkit (in progress)
