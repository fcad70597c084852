//! mock provider (in progress)
