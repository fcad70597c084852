//! `llmq cluster`: prints the membership list that `cluster` keeps.

use crate::cli::{exit, GlobalArgs};
use crate::cluster;
use crate::error::Result;

/// `llmq cluster`: the daemons sharing the configured Redis.
pub(crate) async fn command(g: &GlobalArgs) -> Result<i32> {
    let config = super::options(g).load_config_only()?;
    let mut conn = crate::redis_conn::connect(&config.redis.url).await?;
    let members = cluster::list(&mut conn).await?;
    if g.json {
        println!("{}", super::to_json(&members));
        return Ok(exit::OK);
    }
    if members.is_empty() {
        println!("no llmq daemon is running on {}", config.redis.url);
        return Ok(exit::OK);
    }
    let now = crate::clock::unix_ms_now();
    println!(
        "{:<44} {:<20} {:>8} {:<10} {:>10} {:>10}",
        "CONSUMER", "HOST", "PID", "VERSION", "UP", "SEEN"
    );
    for m in &members {
        println!(
            "{:<44} {:<20} {:>8} {:<10} {:>10} {:>10}",
            m.consumer,
            m.host,
            m.pid,
            m.version,
            human(now.saturating_sub(m.started_ms)),
            format!("{} ago", human(now.saturating_sub(m.last_seen_ms))),
        );
    }
    println!("{} daemon(s)", members.len());
    Ok(exit::OK)
}

fn human(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{}s", ms / 1_000),
        60_000..=3_599_999 => format!("{}m", ms / 60_000),
        _ => format!("{}h{}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_uptime() {
        assert_eq!(human(250), "250ms");
        assert_eq!(human(12_000), "12s");
        assert_eq!(human(180_000), "3m");
        assert_eq!(human(3_900_000), "1h5m");
    }
}
