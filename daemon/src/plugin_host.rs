//! The plugin host: loads every plugin in the plugins dir and hands out the
//! one a provider names. The loading and calling itself is `llmq_sdk::host`
//! (the only code with `unsafe`); this module owns the registry.
//!
//! A bad plugin file is refused with an error naming the file and the
//! reason. By default `serve` refuses to start when any file in the dir is
//! bad (fail fast on a broken deploy); `lenient` loading skips bad files with
//! a warning, which `llmq plugins` uses to list what is there.

use crate::error::{Error, Result};
use llmq_sdk::host::{plugin_files, LoadError, LoadedPlugin};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Loaded plugins by name.
#[derive(Debug, Clone, Default)]
pub struct PluginHost {
    dir: PathBuf,
    plugins: BTreeMap<String, LoadedPlugin>,
    refused: Vec<String>,
}

/// What `llmq plugins` shows for one plugin.
#[derive(Debug, Clone, Serialize)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub protocols: Vec<String>,
    pub file: String,
    pub build: String,
}

impl PluginHost {
    /// Loads every plugin in `dir`; any bad file is an error naming it.
    pub fn load_dir(dir: &Path) -> Result<PluginHost> {
        let mut host = Self::empty(dir);
        for file in Self::files(dir)? {
            let p = LoadedPlugin::load(&file)?;
            host.insert(p)?;
        }
        Ok(host)
    }

    /// Loads what it can; refused files are kept as messages.
    pub fn load_dir_lenient(dir: &Path) -> Result<PluginHost> {
        let mut host = Self::empty(dir);
        for file in Self::files(dir)? {
            match LoadedPlugin::load(&file) {
                Ok(p) => {
                    if let Err(e) = host.insert(p) {
                        host.refused.push(e.to_string());
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "plugin refused");
                    host.refused.push(e.to_string());
                }
            }
        }
        Ok(host)
    }

    fn empty(dir: &Path) -> PluginHost {
        PluginHost {
            dir: dir.to_path_buf(),
            ..PluginHost::default()
        }
    }

    fn files(dir: &Path) -> Result<Vec<PathBuf>> {
        plugin_files(dir).map_err(|e| Error::Other(format!("plugins dir {}: {e}", dir.display())))
    }

    /// Adds one loaded plugin (tests and embedders).
    pub fn insert(&mut self, plugin: LoadedPlugin) -> Result<()> {
        let name = plugin.name().to_string();
        if let Some(existing) = self.plugins.get(&name) {
            return Err(Error::PluginLoad(LoadError::Manifest {
                path: plugin.path().to_path_buf(),
                reason: format!(
                    "plugin name {name:?} is already served by {}",
                    existing.path().display()
                ),
            }));
        }
        tracing::info!(plugin = %name, version = %plugin.manifest().version, file = %plugin.path().display(), "plugin loaded");
        self.plugins.insert(name, plugin);
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<&LoadedPlugin> {
        self.plugins.get(name).ok_or_else(|| Error::NoPlugin {
            name: name.to_string(),
            dir: self.dir.clone(),
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.plugins.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.plugins.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Messages for files that were refused by lenient loading.
    pub fn refused(&self) -> &[String] {
        &self.refused
    }

    pub fn infos(&self) -> Vec<PluginInfo> {
        self.plugins
            .values()
            .map(|p| PluginInfo {
                name: p.name().to_string(),
                version: p.manifest().version.clone(),
                protocols: p.manifest().protocols.clone(),
                file: p.path().display().to_string(),
                build: p.build_info().to_string(),
            })
            .collect()
    }
}
