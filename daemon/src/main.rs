//! The `llmq` binary: parse the command line, set up logging, run the
//! command, map errors to exit codes. `anyhow` lives only here.

use clap::Parser;
use llmq::cli::{exit, Cli, LogFormat};

fn main() {
    let cli = Cli::parse();
    init_logging(cli.global.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("llmq: cannot start the async runtime: {e}");
            std::process::exit(exit::FAILURE);
        }
    };
    let code = runtime.block_on(async move {
        match llmq::commands::run(cli).await {
            Ok(code) => code,
            Err(e) => {
                let e: anyhow::Error = e.into();
                // Our Error's Display already includes its source's message,
                // so the alternate (chained) form would say everything twice.
                eprintln!("llmq: {e}");
                match e.downcast_ref::<llmq::Error>() {
                    Some(e) if e.is_config() => exit::CONFIG,
                    _ => exit::FAILURE,
                }
            }
        }
    });
    std::process::exit(code);
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LLMQ_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
