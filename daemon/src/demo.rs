//! `llmq demo` (in progress).

use crate::cli::{exit, DemoArgs, GlobalArgs};
use crate::error::Result;

pub async fn run(_g: &GlobalArgs, _args: &DemoArgs) -> Result<i32> {
    eprintln!("llmq demo: not yet implemented");
    Ok(exit::FAILURE)
}
