//! `llmq keys` and `llmq usage` (in progress).

use crate::cli::{exit, GlobalArgs, KeysAction};
use crate::error::Result;
use crate::serve::Options;

pub async fn keys(_g: &GlobalArgs, _opts: &Options, _action: Option<&KeysAction>) -> Result<i32> {
    eprintln!("llmq keys: not yet implemented");
    Ok(exit::FAILURE)
}

pub async fn usage(_g: &GlobalArgs, _opts: &Options, _since: Option<&str>) -> Result<i32> {
    eprintln!("llmq usage: not yet implemented");
    Ok(exit::FAILURE)
}
