//! One function per CLI subcommand (in progress).

use crate::cli::Cli;

pub async fn run(_cli: Cli) -> crate::Result<i32> {
    Ok(crate::cli::exit::OK)
}
