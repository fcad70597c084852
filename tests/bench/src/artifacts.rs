//! Finds the binaries a run needs: the `llmq` daemon and a plugins dir
//! holding the OpenAI-compatible plugin. Unless given explicit paths, it
//! asks cargo to build them (`--message-format=json`) and reads the artifact
//! paths from cargo's messages, like `llmq_testkit::plugins` does.

use crate::error::{BenchError, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The cargo profile to build the daemon with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    Release,
    Debug,
}

/// Where the daemon and its plugin are.
#[derive(Debug, Clone)]
pub struct Daemon {
    pub llmq_bin: PathBuf,
    /// A directory containing the OpenAI plugin (and possibly others).
    pub plugins_dir: PathBuf,
}

/// The workspace root, known at compile time: the harness is an in-tree tool.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds `llmq` and the OpenAI plugin with `profile` and returns their paths.
/// The plugin is copied into `plugins_dir` (which must exist).
pub fn build_daemon(profile: Profile, plugins_dir: &Path) -> Result<Daemon> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--message-format=json-render-diagnostics")
        .arg("-p")
        .arg("llmq")
        .arg("-p")
        .arg("llmq-plugin-openai")
        .arg("--manifest-path")
        .arg(workspace_root().join("Cargo.toml"));
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    let out = cmd
        .output()
        .map_err(|e| BenchError::Build(format!("cannot run cargo: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(BenchError::Build(format!(
            "cargo build -p llmq -p llmq-plugin-openai failed:\n{}",
            tail.join("\n")
        )));
    }
    let (bins, cdylibs) = parse_artifacts(&String::from_utf8_lossy(&out.stdout));
    let llmq_bin = bins
        .into_iter()
        .find(|(name, _)| name == "llmq")
        .map(|(_, p)| p)
        .ok_or_else(|| BenchError::Build("cargo built no `llmq` executable".into()))?;
    let plugin = cdylibs
        .into_iter()
        .find(|p| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .is_some_and(|s| s.trim_start_matches("lib") == "llmq_plugin_openai")
        })
        .ok_or_else(|| BenchError::Build("cargo built no OpenAI plugin cdylib".into()))?;
    let name = plugin
        .file_name()
        .ok_or_else(|| BenchError::Build(format!("odd plugin path {plugin:?}")))?;
    let dest = plugins_dir.join(name);
    std::fs::copy(&plugin, &dest).map_err(|e| BenchError::io("copy plugin", &dest, e))?;
    Ok(Daemon {
        llmq_bin,
        plugins_dir: plugins_dir.to_path_buf(),
    })
}

/// Executables (by target name) and cdylib files among cargo's JSON messages.
pub fn parse_artifacts(stdout: &str) -> (Vec<(String, PathBuf)>, Vec<PathBuf>) {
    let mut bins = Vec::new();
    let mut cdylibs = Vec::new();
    for line in stdout.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let kinds = msg["target"]["kind"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let (Some(exe), Some(name)) =
            (msg["executable"].as_str(), msg["target"]["name"].as_str())
        {
            bins.push((name.to_owned(), PathBuf::from(exe)));
        }
        if kinds.iter().any(|k| k == "cdylib") {
            for f in msg["filenames"].as_array().into_iter().flatten() {
                if let Some(f) = f
                    .as_str()
                    .filter(|f| f.ends_with(std::env::consts::DLL_SUFFIX))
                {
                    cdylibs.push(PathBuf::from(f));
                }
            }
        }
    }
    (bins, cdylibs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_executables_and_cdylibs_from_cargo_messages() {
        let out = r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"llmq"},"executable":"/t/release/llmq","filenames":["/t/release/llmq"]}
{"reason":"compiler-artifact","target":{"kind":["cdylib","rlib"],"name":"llmq_plugin_openai"},"executable":null,"filenames":["/t/release/libllmq_plugin_openai.so","/t/release/libllmq_plugin_openai.rlib"]}
{"reason":"build-finished","success":true}
not json"#;
        let (bins, libs) = parse_artifacts(out);
        assert_eq!(
            bins,
            vec![("llmq".to_owned(), PathBuf::from("/t/release/llmq"))]
        );
        assert_eq!(
            libs,
            vec![PathBuf::from("/t/release/libllmq_plugin_openai.so")]
        );
    }
}
