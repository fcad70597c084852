//! `llmq keys` and `llmq usage`, the operator's view of every key (like the
//! seeds' `/list-instances`).
//!
//! They ask the running daemon through its admin API (`admin.listen`, with
//! the token from `admin.token_env`), so what they show is live and what
//! they change (`reset`, `disable`) takes effect at once. Without a running
//! daemon, `keys` still lists the configured keys (ids, masked secrets and
//! limits) and says the daemon is not reachable.

use crate::admin::{KeyView, UsageRow};
use crate::cli::{exit, GlobalArgs, KeysAction};
use crate::error::{Error, Result};
use crate::serve::{Options, Settings};
use secrecy::ExposeSecret;

/// The admin API of the configured daemon.
struct Admin {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Admin {
    fn from(settings: &Settings) -> Option<Admin> {
        let listen = settings.config.admin.listen.trim();
        if listen.is_empty() {
            return None;
        }
        let host = listen
            .replace("0.0.0.0", "127.0.0.1")
            .replace("[::]", "[::1]");
        Some(Admin {
            base: format!("http://{host}"),
            token: settings
                .env
                .secret(&settings.config.admin.token_env)
                .map(|s| s.expose_secret().to_string()),
            http: reqwest::Client::new(),
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(std::time::Duration::from_secs(10));
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|_| {
            Error::Other(format!(
                "the daemon's admin API at {} is not reachable",
                self.base
            ))
        })?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .map_err(|e| Error::Other(format!("admin API: {}", e.without_url())))?;
        let value: serde_json::Value =
            serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
        if !status.is_success() {
            let msg = value["error"].as_str().unwrap_or(body.as_str()).to_string();
            return Err(Error::Other(format!("admin API answered {status}: {msg}")));
        }
        Ok(value)
    }
}

/// Percent-encodes a key id for a URL path (`groq#2` → `groq%232`).
fn encode_id(id: &str) -> String {
    id.chars()
        .map(|c| match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '-' | '_' | '.' => c.to_string(),
            other => {
                let mut buf = [0u8; 4];
                other
                    .encode_utf8(&mut buf)
                    .bytes()
                    .map(|b| format!("%{b:02X}"))
                    .collect()
            }
        })
        .collect()
}

pub(crate) async fn keys(
    g: &GlobalArgs,
    opts: &Options,
    action: Option<&KeysAction>,
) -> Result<i32> {
    let settings = opts.load()?;
    let admin = Admin::from(&settings);
    match action {
        Some(KeysAction::Reset { id }) | Some(KeysAction::Disable { id, .. }) => {
            let Some(admin) = admin else {
                eprintln!(
                    "llmq keys: admin.listen is empty, so there is no running daemon to change"
                );
                return Ok(exit::FAILURE);
            };
            let (path, body) = match action {
                Some(KeysAction::Disable { reason, .. }) => (
                    format!("/v1/keys/{}/disable", encode_id(id)),
                    Some(serde_json::json!({ "reason": reason })),
                ),
                _ => (format!("/v1/keys/{}/reset", encode_id(id)), None),
            };
            let view = admin.call(reqwest::Method::POST, &path, body).await?;
            let view: KeyView = serde_json::from_value(view)
                .map_err(|e| Error::Other(format!("admin API returned an unexpected key: {e}")))?;
            if g.json {
                println!("{}", super::to_json(&view));
            } else {
                print_keys(&[view]);
            }
            Ok(exit::OK)
        }
        None => {
            let live = match &admin {
                Some(a) => a.call(reqwest::Method::GET, "/v1/keys", None).await,
                None => Err(Error::Other("admin.listen is empty".into())),
            };
            match live.and_then(|v| {
                serde_json::from_value::<Vec<KeyView>>(v)
                    .map_err(|e| Error::Other(format!("unexpected answer: {e}")))
            }) {
                Ok(views) => {
                    if g.json {
                        println!("{}", super::to_json(&views));
                    } else {
                        print_keys(&views);
                    }
                    Ok(exit::OK)
                }
                Err(e) => {
                    // Offline: what is configured, without live state.
                    let configured: Vec<serde_json::Value> = settings
                        .ring
                        .iter()
                        .map(|k| {
                            serde_json::json!({
                                "id": k.id.to_string(),
                                "masked": k.masked,
                                "source": k.source,
                                "models": k.models,
                                "limits": k.limits,
                                "account": k.account,
                            })
                        })
                        .collect();
                    if g.json {
                        println!(
                            "{}",
                            super::to_json(
                                &serde_json::json!({"daemon": e.to_string(), "keys": configured})
                            )
                        );
                    } else {
                        eprintln!("note: {e}; showing configured keys only");
                        println!("{:<16} {:<16} SOURCE", "KEY", "MASKED");
                        for k in settings.ring.iter() {
                            println!("{:<16} {:<16} {}", k.id.to_string(), k.masked, k.source);
                        }
                    }
                    Ok(exit::OK)
                }
            }
        }
    }
}

fn limit(v: Option<u64>) -> String {
    v.map(|n| n.to_string()).unwrap_or_else(|| "-".into())
}

fn print_keys(views: &[KeyView]) {
    // An ACCOUNT column only when some key shares an account's limits.
    let accounts = views.iter().any(|v| v.account.is_some());
    let account = |v: Option<&KeyView>| match (accounts, v) {
        (false, _) => String::new(),
        (true, None) => format!("{:<14} ", "ACCOUNT"),
        (true, Some(v)) => format!("{:<14} ", v.account.as_deref().unwrap_or("-")),
    };
    println!(
        "{:<14} {}{:<16} {:<10} {:>11} {:>13} {:>13} {:>7} {:>6} {:>5} {:>8} {:<20} REASON",
        "KEY",
        account(None),
        "MASKED",
        "STATUS",
        "RPM/TPM",
        "WINDOW r/tok",
        "TODAY r/tok",
        "CALLS",
        "FAIL",
        "429",
        "COST$",
        "LAST USED"
    );
    for v in views {
        let status = match v.cooldown_remaining_ms {
            Some(ms) if ms > 0 => format!("cool {:.0}s", (ms as f64 / 1000.0).ceil()),
            _ => format!("{:?}", v.status).to_lowercase(),
        };
        let last = v
            .last_used_ms
            .map_or_else(|| "-".into(), crate::calendar::rfc3339_ms);
        let mut reason = v.reason.clone().unwrap_or_default();
        for p in &v.parked_models {
            if !reason.is_empty() {
                reason.push_str("; ");
            }
            reason.push_str(&format!(
                "{} parked until {}",
                p.model,
                crate::calendar::rfc3339_ms(p.until_ms)
            ));
        }
        println!(
            "{:<14} {}{:<16} {:<10} {:>11} {:>13} {:>13} {:>7} {:>6} {:>5} {:>8.4} {:<20} {}",
            v.id,
            account(Some(v)),
            v.masked,
            status,
            format!("{}/{}", limit(v.limits.rpm), limit(v.limits.tpm)),
            format!("{}/{}", v.window.requests, v.window.tokens),
            format!("{}/{}", v.today.requests, v.today.tokens),
            v.requests,
            v.failures,
            v.rate_limited,
            v.cost_usd,
            last,
            reason
        );
    }
}

pub(crate) async fn usage(g: &GlobalArgs, opts: &Options, since: Option<&str>) -> Result<i32> {
    let settings = opts.load()?;
    let Some(admin) = Admin::from(&settings) else {
        eprintln!("llmq usage: admin.listen is empty, so there is no running daemon to ask");
        return Ok(exit::FAILURE);
    };
    let path = match since {
        Some(s) => format!("/v1/usage?since={}", encode_id(s)),
        None => "/v1/usage".to_string(),
    };
    let rows: Vec<UsageRow> =
        serde_json::from_value(admin.call(reqwest::Method::GET, &path, None).await?)
            .map_err(|e| Error::Other(format!("unexpected usage answer: {e}")))?;
    if g.json {
        println!("{}", super::to_json(&rows));
        return Ok(exit::OK);
    }
    println!(
        "{:<10} {:<14} {:<12} {:<28} {:>8} {:>10} {:>10} {:>10}",
        "DAY", "KEY", "PROVIDER", "MODEL", "REQS", "TOK IN", "TOK OUT", "COST$"
    );
    for r in &rows {
        println!(
            "{:<10} {:<14} {:<12} {:<28} {:>8} {:>10} {:>10} {:>10.4}",
            r.day, r.key, r.provider, r.model, r.requests, r.tokens_in, r.tokens_out, r.cost_usd
        );
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::encode_id;

    #[test]
    fn key_ids_are_percent_encoded_for_urls() {
        assert_eq!(encode_id("groq#2"), "groq%232");
        assert_eq!(encode_id("a b/c"), "a%20b%2Fc");
    }
}
