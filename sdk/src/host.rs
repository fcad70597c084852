//! The loading side of the ABI: opens a plugin `cdylib`, checks it and calls it.
//!
//! This module and [`crate::abi`] are the only places with `unsafe` code
//! (every other crate in the workspace forbids it; see the root
//! `Cargo.toml`). Every `unsafe` block carries a `// SAFETY:` comment, which
//! `clippy::undocumented_unsafe_blocks` enforces.
//! Libraries are never unloaded: a [`LoadedPlugin`] leaks its
//! [`libloading::Library`], so the vtable and every function pointer stay
//! valid for the life of the process.

use crate::abi::{
    EntryFn, PluginVTable, RawBuf, RawResult, ABI_MAJOR, ENTRY_SYMBOL, STATUS_ERROR, STATUS_OK,
    STATUS_PANIC,
};
use crate::types::{HttpRequest, HttpResponse, Manifest, Parsed, PluginError, PrepareInput};
use std::ffi::CStr;
use std::path::{Path, PathBuf};

/// Why a plugin file was refused. Always names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("plugin {path}: cannot load library: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("plugin {path}: no `llmq_plugin_entry` symbol (not an llmq plugin?): {reason}")]
    NoEntry { path: PathBuf, reason: String },
    #[error("plugin {path}: entry returned a null vtable")]
    NullVTable { path: PathBuf },
    #[error("plugin {path}: ABI version {found} is not supported (this daemon speaks ABI {expected}); rebuild it against a matching llmq-sdk")]
    AbiMismatch {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("plugin {path}: vtable is {found} bytes, expected at least {expected}; rebuild it against a matching llmq-sdk")]
    StructSize {
        path: PathBuf,
        found: usize,
        expected: usize,
    },
    #[error("plugin {path}: manifest failed: {reason}")]
    Manifest { path: PathBuf, reason: String },
}

/// Why one call into a loaded plugin failed. The process is unaffected.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("plugin {plugin} panicked in {call}: {message}")]
    Panic {
        plugin: String,
        call: &'static str,
        message: String,
    },
    #[error("plugin {plugin} refused {call}: {message}")]
    Refused {
        plugin: String,
        call: &'static str,
        message: String,
    },
    #[error("plugin {plugin} returned garbage from {call}: {reason}")]
    Garbage {
        plugin: String,
        call: &'static str,
        reason: String,
    },
}

/// A loaded, checked plugin. Cheap to clone; safe to call from any thread.
#[derive(Clone)]
pub struct LoadedPlugin {
    path: PathBuf,
    vtable: &'static PluginVTable,
    manifest: Manifest,
    build_info: String,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("path", &self.path)
            .field("manifest", &self.manifest)
            .finish()
    }
}

impl LoadedPlugin {
    /// Loads and checks the plugin at `path`.
    pub fn load(path: &Path) -> Result<LoadedPlugin, LoadError> {
        let p = path.to_path_buf();
        // SAFETY: loading a library runs its initialisers. We only load files
        // the operator placed in the plugins dir (or a test built), which is
        // the trust boundary documented in ARCHITECTURE.md.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| LoadError::Open {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        // The library is never unloaded: leak it so every pointer it hands out
        // is valid for 'static.
        let lib: &'static libloading::Library = Box::leak(Box::new(lib));
        // SAFETY: `EntryFn` is the documented signature of the entry symbol;
        // a library exporting the name with another type is outside the ABI
        // contract (and is caught below by the ABI and size checks when it
        // returns something that does not look like a vtable).
        let entry: libloading::Symbol<'static, EntryFn> = unsafe { lib.get(ENTRY_SYMBOL) }
            .map_err(|e| LoadError::NoEntry {
                path: p.clone(),
                reason: e.to_string(),
            })?;
        // SAFETY: the entry function takes no arguments; running code from
        // the library is the trust boundary already crossed by loading it.
        let raw = unsafe { entry() };
        if raw.is_null() {
            return Err(LoadError::NullVTable { path: p });
        }
        // Read only the leading, layout-stable fields first.
        // SAFETY: `raw` is non-null and points at the plugin's static vtable;
        // `struct_size` and `abi_major` are the first fields in every ABI
        // version, so reading them is valid before the version check.
        let (struct_size, abi_major) = unsafe { ((*raw).struct_size, (*raw).abi_major) };
        if abi_major != ABI_MAJOR {
            return Err(LoadError::AbiMismatch {
                path: p,
                found: abi_major,
                expected: ABI_MAJOR,
            });
        }
        let expected = std::mem::size_of::<PluginVTable>();
        if struct_size < expected {
            return Err(LoadError::StructSize {
                path: p,
                found: struct_size,
                expected,
            });
        }
        // SAFETY: same major ABI and at least our struct size, so every field
        // we know is present with our layout; the vtable is static in a
        // library we never unload.
        let vtable: &'static PluginVTable = unsafe { &*raw };
        let build_info = if vtable.build_info.is_null() {
            String::new()
        } else {
            // SAFETY: the ABI says `build_info` is a static NUL-terminated string.
            unsafe { CStr::from_ptr(vtable.build_info) }
                .to_string_lossy()
                .into_owned()
        };
        let mut plugin = LoadedPlugin {
            path: p.clone(),
            vtable,
            manifest: Manifest {
                name: file_stem(&p),
                version: String::new(),
                protocols: vec![],
                providers: vec![],
            },
            build_info,
        };
        let bytes = plugin
            .call_raw("manifest", None)
            .map_err(|e| LoadError::Manifest {
                path: p.clone(),
                reason: e.to_string(),
            })?;
        plugin.manifest = serde_json::from_slice(&bytes).map_err(|e| LoadError::Manifest {
            path: p.clone(),
            reason: format!("not a manifest: {e}"),
        })?;
        if plugin.manifest.name.trim().is_empty() {
            return Err(LoadError::Manifest {
                path: p,
                reason: "manifest has an empty name".into(),
            });
        }
        Ok(plugin)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    pub fn build_info(&self) -> &str {
        &self.build_info
    }

    /// `prepare`: the request to send for this job on this key.
    pub fn prepare(&self, input: &PrepareInput) -> Result<HttpRequest, CallError> {
        let json = serde_json::to_vec(input).map_err(|e| self.garbage("prepare", e.to_string()))?;
        self.prepare_bytes(&json)
    }

    /// `prepare` with an already-encoded [`PrepareInput`].
    pub fn prepare_bytes(&self, json: &[u8]) -> Result<HttpRequest, CallError> {
        let out = self.call_raw("prepare", Some(json))?;
        let req: HttpRequest =
            serde_json::from_slice(&out).map_err(|e| self.garbage("prepare", e.to_string()))?;
        if req.method.is_empty()
            || !(req.url.starts_with("http://") || req.url.starts_with("https://"))
        {
            return Err(self.garbage(
                "prepare",
                "request needs a method and an http(s) URL".to_string(),
            ));
        }
        Ok(req)
    }

    /// `parse`: the one outcome this response means.
    pub fn parse(&self, response: &HttpResponse) -> Result<Parsed, CallError> {
        let json =
            serde_json::to_vec(response).map_err(|e| self.garbage("parse", e.to_string()))?;
        self.parse_bytes(&json)
    }

    /// `parse` with an already-encoded [`HttpResponse`] (a host that calls
    /// plugins on another thread encodes on its own).
    pub fn parse_bytes(&self, json: &[u8]) -> Result<Parsed, CallError> {
        let out = self.call_raw("parse", Some(json))?;
        serde_json::from_slice(&out).map_err(|e| self.garbage("parse", e.to_string()))
    }

    /// The error for a failure to encode a call's input (host side).
    pub fn encode_error(&self, call: &'static str, reason: String) -> CallError {
        self.garbage(call, reason)
    }

    fn garbage(&self, call: &'static str, reason: String) -> CallError {
        CallError::Garbage {
            plugin: self.manifest.name.clone(),
            call,
            reason,
        }
    }

    fn call_raw(&self, call: &'static str, input: Option<&[u8]>) -> Result<Vec<u8>, CallError> {
        let result: RawResult = match (call, input) {
            // SAFETY: `manifest` takes no input; the buffer it returns is
            // handed to this plugin's `free_bytes` by `take` below.
            ("manifest", _) => unsafe { (self.vtable.manifest)() },
            // SAFETY: `b` is a live slice of `b.len()` bytes borrowed for the
            // whole call (the `CallFn` contract); the result goes to `take`.
            ("prepare", Some(b)) => unsafe { (self.vtable.prepare)(b.as_ptr(), b.len()) },
            // SAFETY: as for `prepare`.
            ("parse", Some(b)) => unsafe { (self.vtable.parse)(b.as_ptr(), b.len()) },
            _ => return Err(self.garbage(call, "unknown call".into())),
        };
        let bytes = self.take(result.buf);
        let bytes = bytes.map_err(|reason| self.garbage(call, reason))?;
        match result.status {
            STATUS_OK => Ok(bytes),
            STATUS_ERROR => {
                let message = serde_json::from_slice::<PluginError>(&bytes)
                    .map(|e| e.message)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
                Err(CallError::Refused {
                    plugin: self.manifest.name.clone(),
                    call,
                    message,
                })
            }
            STATUS_PANIC => Err(CallError::Panic {
                plugin: self.manifest.name.clone(),
                call,
                message: String::from_utf8_lossy(&bytes).into_owned(),
            }),
            other => Err(self.garbage(call, format!("unknown status {other}"))),
        }
    }

    /// Copies a plugin buffer into host memory and hands it back to the plugin.
    fn take(&self, buf: RawBuf) -> Result<Vec<u8>, String> {
        if buf.ptr.is_null() {
            return if buf.len == 0 {
                Ok(Vec::new())
            } else {
                Err("null buffer with a non-zero length".into())
            };
        }
        if buf.len > buf.cap {
            // Do not hand an inconsistent buffer to free_bytes; leaking is the
            // safe choice for memory we cannot describe.
            return Err("buffer length exceeds its capacity".into());
        }
        // SAFETY: the plugin returned a non-null buffer of `len` initialised
        // bytes that stays valid until we pass it to its `free_bytes`.
        let copy = unsafe { std::slice::from_raw_parts(buf.ptr, buf.len) }.to_vec();
        // SAFETY: `buf` came from a call into this same plugin (the only
        // caller is `call_raw`), is unchanged, and is freed exactly once here;
        // `copy` owns its own bytes, so nothing reads `buf` afterwards.
        unsafe { (self.vtable.free_bytes)(buf) };
        Ok(copy)
    }
}

fn file_stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The file names of plugins in `dir`: every `*.so` (`.dylib` on macOS).
pub fn plugin_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext == std::env::consts::DLL_EXTENSION && path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}
