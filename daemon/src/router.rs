//! router (in progress)
