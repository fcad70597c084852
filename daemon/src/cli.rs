//! The command line (clap): every subcommand, its flags and its exit codes.
//! Each command is a thin shell over a library module; output is a human
//! table by default and JSON with `--json`.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Exit codes, stable for scripts.
pub mod exit {
    /// Success.
    pub(crate) const OK: i32 = 0;
    /// A runtime failure (Redis unreachable, job failed, …).
    pub const FAILURE: i32 = 1;
    /// Bad usage or bad configuration.
    pub const CONFIG: i32 = 2;
    /// `wait` timed out / `result` not found.
    pub(crate) const NOT_FOUND: i32 = 3;
}

#[derive(Debug, Parser)]
#[command(
    name = "llmq",
    version,
    about = "Runs LLM jobs from Redis queues on the best API key available right now",
    long_about = "llmq takes LLM jobs off Redis Streams and runs each on the cheapest route \
                  (free tiers first) whose API key has room under its own rate limits."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Config file (TOML). Default: /etc/llmq/llmq.toml when it exists, else built-in defaults.
    #[arg(long, global = true, env = "LLMQ_CONFIG")]
    pub config: Option<PathBuf>,
    /// A .env file with API keys. Default: ./.env when present.
    #[arg(long, global = true, env = "LLMQ_ENV_FILE")]
    pub env_file: Option<PathBuf>,
    /// Redis URL (overrides the config).
    #[arg(long, global = true, env = "LLMQ_REDIS_URL")]
    pub redis: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: consume the lanes, serve the admin API.
    Serve(ServeArgs),
    /// Push a job (JSON from the argument or stdin) onto a lane.
    Push(PushArgs),
    /// Wait for a job's result.
    Wait(WaitArgs),
    /// Print a job's result if it exists.
    Result(ResultArgs),
    /// List API keys with status, limits and usage; reset or disable one.
    Keys(KeysArgs),
    /// Usage per key, provider, model and day.
    Usage(UsageArgs),
    /// Explain the routes a job would try, in order, and why others are excluded.
    Routes(RoutesArgs),
    /// List loaded plugins; `--check DIR` runs the conformance kit.
    Plugins(PluginsArgs),
    /// Validate the config and keys, then exit.
    CheckConfig,
    /// List the daemons sharing this Redis (scale-out membership).
    Cluster,
    /// Run a self-contained demo: private Redis, mock provider, daemon, mixed load.
    /// Only in builds with the `demo` feature (the default; the operator's
    /// build, `--no-default-features`, leaves the mock out).
    #[cfg(feature = "demo")]
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Override the plugins dir.
    #[arg(long)]
    pub plugins_dir: Option<PathBuf>,
    /// Override the admin listen address (`host:port`; empty disables).
    #[arg(long)]
    pub admin_listen: Option<String>,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The job JSON; read from stdin when absent or `-`.
    pub job: Option<String>,
    /// Lane: high, normal or low.
    #[arg(long, default_value = "normal")]
    pub lane: String,
    /// Wait for the result and print it.
    #[arg(long)]
    pub wait: bool,
    /// Seconds to wait with --wait.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    pub id: String,
    /// Seconds to wait.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct ResultArgs {
    pub id: String,
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub action: Option<KeysAction>,
}

#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Re-enable a disabled or cooling key (e.g. `groq#2`).
    Reset { id: String },
    /// Disable a key by hand.
    Disable {
        id: String,
        #[arg(long, default_value = "disabled by operator")]
        reason: String,
    },
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// First day to include (YYYY-MM-DD); default today.
    #[arg(long)]
    pub since: Option<String>,
}

#[derive(Debug, Args)]
pub struct RoutesArgs {
    /// A job JSON (or `-` for stdin); default a plain one-message job.
    pub job: Option<String>,
}

#[derive(Debug, Args)]
pub struct PluginsArgs {
    /// Run the conformance kit: fixtures dir to check each plugin against
    /// (`<DIR>/<plugin name>/` if present, else DIR itself).
    #[arg(long)]
    pub check: Option<PathBuf>,
    /// Override the plugins dir.
    #[arg(long)]
    pub plugins_dir: Option<PathBuf>,
}

#[cfg(feature = "demo")]
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Jobs to push.
    #[arg(long, default_value_t = 120)]
    pub jobs: usize,
    /// Rate window of the demo's mock provider, in seconds (compressed time).
    #[arg(long, default_value_t = 10)]
    pub window_s: u64,
    /// Plugins dir (default: next to the llmq binary, then ./target/*).
    #[arg(long)]
    pub plugins_dir: Option<PathBuf>,
}
