//! `llmq-mock`: runs the mock provider server until killed.
//!
//! Prints `listening on http://ADDR` as its first stdout line so a parent
//! process can read the port.

use anyhow::Context;
use clap::Parser;
use llmq_mock::{MockConfig, MockServer};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Mock OpenAI / Anthropic / Gemini upstream with per-key limits.
#[derive(Parser, Debug)]
#[command(name = "llmq-mock", version)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// JSON config (keys, limits, window, contexts). Defaults to no keys.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = match &args.config {
        Some(path) => MockConfig::from_file(path)?,
        None => MockConfig::default(),
    };
    let server = MockServer::start_on(config, args.listen).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{}", server.addr()).context("writing to stdout")?;
        out.flush().context("flushing stdout")?;
    }
    wait_for_signal().await?;
    server.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}
