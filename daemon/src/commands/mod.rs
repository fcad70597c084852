//! One function per CLI subcommand. Each is a thin shell over a library
//! module and returns the process exit code (see [`crate::cli::exit`]).

use crate::cli::{exit, Cli, Command, GlobalArgs, PluginsArgs};
use crate::error::{Error, Result};
use crate::job::{parse_job_with, JobResult, Status};
use crate::queue::QueueError;
use crate::serve::Options;
use std::io::Read;

mod cluster;
mod keys;
use std::time::Duration;

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<i32> {
    let g = &cli.global;
    match &cli.command {
        Command::Serve(args) => {
            let mut opts = options(g);
            opts.plugins_dir = args.plugins_dir.clone();
            opts.admin_listen = args.admin_listen.clone();
            crate::serve::serve(opts).await?;
            Ok(exit::OK)
        }
        Command::Push(args) => {
            let body = read_arg_or_stdin(args.job.as_deref())?;
            let settings = options(g).load_config_only()?;
            let mut conn = crate::redis_conn::connect(&settings.redis.url).await?;
            let id = match crate::queue::push_with(
                &mut conn,
                &args.lane,
                &body,
                &settings.queue.job_limits(),
            )
            .await
            {
                Ok(id) => id,
                // The job or lane given is wrong: bad usage, like bad config.
                Err(e @ (QueueError::InvalidJob(_) | QueueError::InvalidLane(_))) => {
                    eprintln!("llmq: {e}");
                    return Ok(exit::CONFIG);
                }
                Err(e) => return Err(e.into()),
            };
            if !args.wait {
                if g.json {
                    println!("{}", serde_json::json!({ "id": id }));
                } else {
                    println!("{id}");
                }
                return Ok(exit::OK);
            }
            wait_and_print(g, &mut conn, &id, args.timeout).await
        }
        Command::Wait(args) => {
            let settings = options(g).load_config_only()?;
            let mut conn = crate::redis_conn::connect(&settings.redis.url).await?;
            wait_and_print(g, &mut conn, &args.id, args.timeout).await
        }
        Command::Result(args) => {
            let settings = options(g).load_config_only()?;
            let mut conn = crate::redis_conn::connect(&settings.redis.url).await?;
            match crate::queue::get_result(&mut conn, &args.id).await? {
                Some(r) => Ok(print_result(g, &r)),
                None => {
                    eprintln!("no result for job {}", args.id);
                    Ok(exit::NOT_FOUND)
                }
            }
        }
        Command::Routes(args) => {
            let settings = options(g).load()?;
            let body = match args.job.as_deref() {
                None => r#"{"messages":[{"role":"user","content":"hello"}]}"#.to_string(),
                Some(s) => read_arg_or_stdin(Some(s))?,
            };
            let job = match parse_job_with(body.as_bytes(), &settings.config.queue.job_limits()) {
                Ok(job) => job,
                Err((e, _)) => {
                    eprintln!("llmq: {e}");
                    return Ok(exit::CONFIG);
                }
            };
            let ring = &settings.ring;
            let table = crate::router::RouteTable::new(&settings.config, |p| {
                !ring.for_provider(p).is_empty()
            });
            if g.json {
                println!("{}", to_json(&table.explain_data(&job)));
            } else {
                print!("{}", table.explain(&job));
            }
            Ok(exit::OK)
        }
        Command::Plugins(args) => plugins(g, args),
        Command::CheckConfig => check_config(g),
        Command::Keys(args) => keys::keys(g, &options(g), args.action.as_ref()).await,
        Command::Usage(args) => keys::usage(g, &options(g), args.since.as_deref()).await,
        Command::Cluster => cluster::command(g).await,
        #[cfg(feature = "demo")]
        Command::Demo(args) => crate::demo::run(g, args).await,
    }
}

pub(crate) fn options(g: &GlobalArgs) -> Options {
    Options {
        config: g.config.clone(),
        env_file: g.env_file.clone(),
        redis_url: g.redis.clone(),
        plugins_dir: None,
        admin_listen: None,
    }
}

fn read_arg_or_stdin(arg: Option<&str>) -> Result<String> {
    match arg {
        Some(s) if s != "-" => Ok(s.to_string()),
        _ => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            Ok(s)
        }
    }
}

async fn wait_and_print(
    g: &GlobalArgs,
    conn: &mut redis::aio::MultiplexedConnection,
    id: &str,
    timeout: u64,
) -> Result<i32> {
    match crate::queue::wait(conn, id, Duration::from_secs(timeout)).await? {
        Some(r) => Ok(print_result(g, &r)),
        None => {
            eprintln!("no result for job {id} within {timeout}s");
            Ok(exit::NOT_FOUND)
        }
    }
}

fn print_result(g: &GlobalArgs, r: &JobResult) -> i32 {
    if g.json {
        println!("{}", to_json(r));
    } else {
        match r.status {
            Status::Succeeded => {
                println!(
                    "{} succeeded via {}/{} key {} ({}) in {} ms, ${:.6}",
                    r.id,
                    r.provider.as_deref().unwrap_or("-"),
                    r.model.as_deref().unwrap_or("-"),
                    r.key.as_deref().unwrap_or("-"),
                    r.tier.map(|t| t.as_str()).unwrap_or("-"),
                    r.duration_ms,
                    r.cost_usd
                );
                if let Some(out) = &r.output {
                    println!("{out}");
                }
                if let Some(resp) = &r.responses {
                    for m in resp {
                        println!(
                            "  {}: {} {}",
                            m.model,
                            m.status.as_str(),
                            m.output.as_deref().unwrap_or("")
                        );
                    }
                }
            }
            Status::Failed => {
                let (kind, msg) = r
                    .error
                    .as_ref()
                    .map(|e| (e.kind.as_str(), e.message.as_str()))
                    .unwrap_or(("unknown", ""));
                println!("{} failed ({kind}): {msg}", r.id);
            }
        }
    }
    match r.status {
        Status::Succeeded => exit::OK,
        Status::Failed => exit::FAILURE,
    }
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

fn plugins(g: &GlobalArgs, args: &PluginsArgs) -> Result<i32> {
    let mut opts = options(g);
    opts.plugins_dir = args.plugins_dir.clone();
    let config = opts.load_config_only()?;
    let dir = std::path::PathBuf::from(&config.plugins.dir);
    let host = crate::plugin_host::PluginHost::load_dir_lenient(&dir)?;
    let mut code = if host.refused().is_empty() {
        exit::OK
    } else {
        exit::FAILURE
    };
    if let Some(fixtures) = &args.check {
        for info in host.infos() {
            let own = fixtures.join(&info.name);
            let dir = if own.is_dir() { own } else { fixtures.clone() };
            let plugin = host.get(&info.name)?;
            let fx = llmq_sdk::conformance::load_fixtures(&dir)
                .map_err(|e| Error::Other(e.to_string()))?;
            let report = llmq_sdk::conformance::check_loaded(plugin, &fx);
            print!("{report}");
            if !report.ok() {
                code = exit::FAILURE;
            }
        }
        return Ok(code);
    }
    if g.json {
        println!(
            "{}",
            to_json(&serde_json::json!({"plugins": host.infos(), "refused": host.refused()}))
        );
    } else {
        println!("plugins dir: {}", dir.display());
        println!("{:<12} {:<10} {:<28} FILE", "NAME", "VERSION", "PROTOCOLS");
        for p in host.infos() {
            println!(
                "{:<12} {:<10} {:<28} {}",
                p.name,
                p.version,
                p.protocols.join(","),
                p.file
            );
        }
        for r in host.refused() {
            println!("refused: {r}");
        }
    }
    Ok(code)
}

/// `check-config`: config, keys, and the plugins the routes need, as
/// `serve` would check them, without Redis.
fn check_config(g: &GlobalArgs) -> Result<i32> {
    let settings = options(g).load()?;
    let report = settings.ring.report();
    let ring = &settings.ring;
    let table =
        crate::router::RouteTable::new(&settings.config, |p| !ring.for_provider(p).is_empty());
    let refused = check_plugins(g, &settings.config, &table)?;
    // The HTTP client as `serve` builds it: CA file, roots, proxy.
    let file = g
        .config
        .as_ref()
        .map_or_else(|| "config".to_string(), |p| p.display().to_string());
    let upstream = crate::serve::upstream_client(&settings.config, &file)?;
    if g.json {
        println!(
            "{}",
            to_json(&serde_json::json!({
                "ok": true,
                "keys": settings.ring.len(),
                "routes": table.routes().len(),
                "report": report,
                "refused_plugins": refused,
                "tls_roots": upstream.roots().to_string(),
            }))
        );
    } else {
        println!(
            "config ok: {} providers, {} keys, {} routes",
            settings.config.providers.len(),
            settings.ring.len(),
            table.routes().len()
        );
        for p in &report.unknown_prefixes {
            println!("warning: {p}_API_KEY* is set but no provider reads it");
        }
        for o in &report.unused_overrides {
            println!("warning: {o} names an instance that has no key");
        }
        for p in &report.providers_without_keys {
            println!("note: provider {p} has no keys and will not be routed to");
        }
        for r in &refused {
            println!("warning: plugin refused: {r}");
        }
        println!("note: TLS roots: {}", upstream.roots());
        if let Some(ca) = &settings.config.upstream.ca_file {
            println!("note: also trusting the CA certificates in {ca}");
        }
    }
    Ok(exit::OK)
}

/// Every provider that can be routed to needs its plugin in `plugins.dir`
/// (as `serve` requires). Returns the refused plugin files, as warnings.
fn check_plugins(
    g: &GlobalArgs,
    config: &crate::config::Config,
    table: &crate::router::RouteTable,
) -> Result<Vec<String>> {
    if table.routes().is_empty() {
        return Ok(vec![]);
    }
    let file = g
        .config
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "(built-in defaults)".into());
    let dir = std::path::Path::new(&config.plugins.dir);
    let host = crate::plugin_host::PluginHost::load_dir_lenient(dir)
        .map_err(|e| Error::config(&file, "plugins.dir", format!("a readable plugins dir: {e}")))?;
    for route in table.routes() {
        if host.get(&route.plugin).is_err() {
            return Err(Error::config(
                &file,
                format!("providers.{}.plugin", route.provider),
                format!(
                    "a plugin in the plugins dir {}; {:?} is not there (loaded: {})",
                    dir.display(),
                    route.plugin,
                    host.names().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    Ok(host.refused().to_vec())
}
