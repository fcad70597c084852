//! The one-off Redis connection the CLI and tests use (`llmq submit`,
//! `llmq cluster`, …). A runtime module, so `commands` re-uses it and no
//! runtime code needs the CLI layer.

use crate::error::Result;

/// A multiplexed connection with no response timeout (BLPOP waits).
pub async fn connect(url: &str) -> Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    let cfg = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    Ok(client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await?)
}
