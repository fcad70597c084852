//! keystore (in progress)
