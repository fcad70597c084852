//! `llmq-bench`: the command line over the `llmq_bench` library.
//!
//! `cargo run --release -p llmq-bench -- all` runs the suite, prints the
//! table and writes `bench-results/summary.json`.

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use llmq_bench::baseline::BaselineArgs;
use llmq_bench::{Options, Profile, Scenario, Sizes};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "llmq-bench",
    about = "Benchmarks llmq against a bare-loop baseline measured in the same run"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Every scenario at full size (a few minutes on 2 cores).
    All(RunArgs),
    /// Every scenario at tiny sizes: proves the harness works, in seconds.
    Smoke(RunArgs),
    /// Preloaded jobs drained as fast as possible: jobs/s, CPU per job.
    BurnDown(RunArgs),
    /// Added latency under open-loop load, and idle pickup.
    Latency(RunArgs),
    /// Daemon RSS idle and with 10k jobs in flight; Redis memory per 10k jobs.
    Memory(RunArgs),
    /// Throughput with 10, 1,000 and 10,000 keys.
    Keys(RunArgs),
    /// Admitted/capacity and upstream 429s with 100 mixed-limit keys.
    Quota(RunArgs),
    /// The baseline loop itself (started by the harness).
    #[command(hide = true)]
    BaselineWorker(WorkerArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Where summary.json and summary.txt go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Use the tiny smoke sizes for the chosen scenario.
    #[arg(long)]
    small: bool,
    /// Jobs of the burn-down (default 100,000; 500 with --small).
    #[arg(long)]
    jobs: Option<u64>,
    /// Jobs run at once by llmq and by the baseline loop.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Offered rate of the latency run in jobs/s (default: half of llmq's burn-down throughput).
    #[arg(long)]
    latency_rate: Option<f64>,
    /// Build the daemon in the debug profile instead of release.
    #[arg(long)]
    debug_daemon: bool,
    /// A prebuilt `llmq` binary (skips cargo build; needs --plugins-dir).
    #[arg(long, requires = "plugins_dir")]
    llmq_bin: Option<PathBuf>,
    /// A directory with the OpenAI plugin, for --llmq-bin.
    #[arg(long)]
    plugins_dir: Option<PathBuf>,
    /// LLMQ_LOG for the daemon (default: the daemon's own default).
    #[arg(long)]
    daemon_log: Option<String>,
    /// Measure only the baseline loop (no daemon).
    #[arg(long)]
    baseline_only: bool,
}

#[derive(Debug, Args)]
struct WorkerArgs {
    #[arg(long)]
    redis: String,
    #[arg(long)]
    base_url: String,
    #[arg(long)]
    concurrency: usize,
    /// API keys, one per line.
    #[arg(long)]
    keys_file: PathBuf,
    #[arg(long)]
    results_maxlen: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (name, args, scenarios, smoke): (&str, RunArgs, Vec<Scenario>, bool) = match cli.command {
        Cmd::BaselineWorker(w) => {
            let keys = std::fs::read_to_string(&w.keys_file)
                .with_context(|| format!("reading {}", w.keys_file.display()))?
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_owned)
                .collect();
            let args = BaselineArgs {
                redis_url: w.redis,
                base_url: w.base_url,
                concurrency: w.concurrency,
                keys,
                results_maxlen: w.results_maxlen,
            };
            runtime.block_on(llmq_bench::baseline::run(args))?;
            return Ok(());
        }
        Cmd::All(a) => ("all", a, Scenario::ALL.to_vec(), false),
        Cmd::Smoke(a) => ("smoke", a, Scenario::ALL.to_vec(), true),
        Cmd::BurnDown(a) => ("burn-down", a, vec![Scenario::BurnDown], false),
        Cmd::Latency(a) => ("latency", a, vec![Scenario::Latency], false),
        Cmd::Memory(a) => ("memory", a, vec![Scenario::Memory], false),
        Cmd::Keys(a) => ("keys", a, vec![Scenario::Keys], false),
        Cmd::Quota(a) => ("quota", a, vec![Scenario::Quota], false),
    };
    let mut sizes = if smoke || args.small {
        Sizes::smoke()
    } else {
        Sizes::full()
    };
    if let Some(j) = args.jobs {
        sizes.burn_jobs = j;
    }
    if let Some(r) = args.latency_rate {
        sizes.latency_rate = Some(r);
    }
    if let Some(c) = args.concurrency {
        sizes.concurrency = c;
    }
    let exe = std::env::current_exe().context("locating the llmq-bench executable")?;
    let mut opts = Options::new(name, sizes, scenarios, exe);
    opts.profile = if args.debug_daemon {
        Profile::Debug
    } else {
        Profile::Release
    };
    opts.llmq_bin = args.llmq_bin;
    opts.plugins_dir = args.plugins_dir;
    opts.daemon_log = args.daemon_log;
    opts.with_llmq = !args.baseline_only;
    let summary = runtime.block_on(llmq_bench::run(opts));
    println!("{}", summary.table());
    summary
        .write(&args.out)
        .with_context(|| format!("writing results to {}", args.out.display()))?;
    println!(
        "llmq-bench: {} rows in {:.0}s; wrote {}",
        summary.rows.len(),
        summary.elapsed_s,
        args.out.join("summary.json").display()
    );
    let errors = summary.errors().len();
    if errors > 0 {
        anyhow::bail!("{errors} figure(s) could not be measured (see ERROR rows above)");
    }
    Ok(())
}
