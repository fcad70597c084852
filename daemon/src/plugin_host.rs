//! plugin_host (in progress)
