//! `llmq-mock`: runs the mock provider server until killed.
//!
//! Prints `listening on URL` as its first stdout line so a parent process
//! can read the port: `https://localhost:PORT` by default (TLS with a
//! throwaway CA, HTTP/2 and HTTP/1.1 by ALPN), `http://ADDR` with
//! `--plain-http`. Under TLS the second line is `ca file: PATH`, the CA
//! certificate (PEM) clients must trust; `--ca-out PATH` also copies it there.

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
    /// Serve plain HTTP instead of HTTPS (overrides the config's `plain_http`).
    #[arg(long)]
    plain_http: bool,
    /// Also write the CA certificate (PEM) to this path (TLS only).
    #[arg(long)]
    ca_out: Option<PathBuf>,
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
    let mut config = match &args.config {
        Some(path) => MockConfig::from_file(path)?,
        None => MockConfig::default(),
    };
    if args.plain_http {
        config = config.plain_http();
    }
    let server = MockServer::start_on(config, args.listen).await?;
    if let (Some(out), Some(pem)) = (&args.ca_out, server.ca_pem()) {
        std::fs::write(out, pem)
            .with_context(|| format!("writing the CA certificate to {}", out.display()))?;
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", server.origin()).context("writing to stdout")?;
        if let Some(ca) = server.ca_file() {
            writeln!(out, "ca file: {}", ca.display()).context("writing to stdout")?;
        }
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
