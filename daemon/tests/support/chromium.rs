//! Drives a real headless Chromium for dashboard end-to-end tests.
//!
//! - [`find_chromium`]: the binary (`$LLMQ_CHROMIUM`, else `chromium`,
//!   `chromium-browser`, `google-chrome`, `google-chrome-stable` on PATH);
//!   tests SKIP with a printed message when it is `None`;
//! - [`dump_dom`]: `--dump-dom` with a virtual-time budget (no clicks);
//! - [`Browser`] / [`Page`]: the DevTools protocol over a WebSocket, for
//!   `Runtime.evaluate`, real clicks and polling a condition with a deadline.
//!
//! Reusable against the real daemon: it only needs a URL.
#![allow(dead_code)] // each test binary uses a different part of this file

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Flags for a quiet, sandbox-less, throwaway headless browser.
pub const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--mute-audio",
];

/// The Chromium binary, or `None` (the caller prints a SKIP and returns).
pub fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LLMQ_CHROMIUM") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")?;
    for name in [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// `find_chromium()`, or a failure that says how to get it: a test that
/// needs a browser never passes by skipping (scripts/test.sh installs it).
pub fn require_chromium(test: &str) -> PathBuf {
    find_chromium().unwrap_or_else(|| {
        panic!(
            "{test} needs chromium: none found (set LLMQ_CHROMIUM, or `apt-get install -y chromium`; scripts/test.sh installs it)"
        )
    })
}

/// Loads `url`, lets its scripts run for `budget_ms` of virtual time and
/// returns the serialised DOM.
pub async fn dump_dom(bin: &Path, url: &str, budget_ms: u64) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(bin)
        .args(FLAGS)
        .arg(format!("--user-data-dir={}", dir.path().display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("chromium --dump-dom timed out")
        .expect("cannot run chromium");
    assert!(
        out.status.success(),
        "chromium --dump-dom failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A headless Chromium with remote debugging on a free port; killed on drop.
pub struct Browser {
    child: tokio::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium and waits (with a deadline) until DevTools listens.
    pub async fn launch(bin: &Path) -> Browser {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("chromium.log")).unwrap();
        let child = tokio::process::Command::new(bin)
            .args(FLAGS)
            .arg(format!(
                "--user-data-dir={}",
                dir.path().join("profile").display()
            ))
            .arg("--remote-debugging-address=127.0.0.1")
            .arg("--remote-debugging-port=0")
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("cannot start chromium");
        let mut b = Browser {
            child,
            port: 0,
            dir,
        };
        // Chromium writes the chosen port to <profile>/DevToolsActivePort.
        let port_file = b.dir.path().join("profile").join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = std::fs::read_to_string(&port_file) {
                if let Some(p) = s.lines().next().and_then(|l| l.trim().parse::<u16>().ok()) {
                    b.port = p;
                    break;
                }
            }
            if let Ok(Some(status)) = b.child.try_wait() {
                panic!("chromium exited early ({status}):\n{}", b.log());
            }
            assert!(
                Instant::now() < deadline,
                "chromium DevTools did not start:\n{}",
                b.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        b
    }

    /// Chromium's stderr so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chromium.log")).unwrap_or_default()
    }

    /// Attaches to the first page target and navigates it to `url`.
    pub async fn open(&self, url: &str) -> Page {
        let list_url = format!("http://127.0.0.1:{}/json/list", self.port);
        let targets: Vec<Value> = reqwest::get(&list_url).await.unwrap().json().await.unwrap();
        let ws_url = targets
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap_or_else(|| panic!("no page target in {targets:?}"))
            .to_owned();
        let (ws, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .unwrap();
        let mut page = Page { ws, next_id: 0 };
        page.call("Page.navigate", json!({ "url": url })).await;
        page
    }
}

/// One page, driven over the DevTools protocol.
pub struct Page {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Page {
    /// Sends a DevTools command and returns its `result` (events are skipped).
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.ws.send(Message::text(msg)).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(frame) = self.ws.next().await {
                let Message::Text(text) = frame.unwrap() else {
                    continue;
                };
                let v: Value = serde_json::from_str(text.as_str()).unwrap();
                if v["id"] == id {
                    return v;
                }
            }
            panic!("DevTools connection closed during {method}");
        })
        .await
        .unwrap_or_else(|_| panic!("DevTools {method} timed out"));
        if let Some(err) = reply.get("error") {
            panic!("DevTools {method} failed: {err}");
        }
        reply["result"].clone()
    }

    /// Evaluates `expr` in the page (awaiting promises). `Err` carries the
    /// JavaScript exception text.
    pub async fn try_eval(&mut self, expr: &str) -> Result<Value, String> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if let Some(ex) = r.get("exceptionDetails") {
            return Err(ex["exception"]["description"]
                .as_str()
                .or(ex["text"].as_str())
                .unwrap_or("exception")
                .to_owned());
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `expr`, panicking on a JavaScript exception.
    pub async fn eval(&mut self, expr: &str) -> Value {
        self.try_eval(expr)
            .await
            .unwrap_or_else(|e| panic!("`{expr}` threw: {e}"))
    }

    /// Polls `expr` until it is truthy (exceptions count as "not yet"),
    /// panicking with `what` after `timeout`. Returns the truthy value.
    pub async fn wait_for(&mut self, expr: &str, timeout: Duration, what: &str) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.try_eval(expr).await {
                Ok(v) if truthy(&v) => return v,
                Ok(v) => v,
                Err(e) => Value::String(e),
            };
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what} (`{expr}` was {last})"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Clicks the element `selector` matches (a real DOM click event).
    pub async fn click(&mut self, selector: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        let found = self
            .eval(&format!("(() => {{ const e = document.querySelector({sel}); if (!e) return false; e.click(); return true; }})()"))
            .await;
        assert_eq!(found, Value::Bool(true), "nothing to click at {selector}");
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}
