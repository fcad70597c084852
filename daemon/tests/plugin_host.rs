//! The plugin host against real `.so` files built by cargo: the three
//! first-party plugins load; broken fixture plugins are refused or survived
//! with clear errors, and the process keeps running.

use llmq::plugin_host::{CallLimits, PluginCallError, PluginHost};
use llmq_sdk::host::{CallError, LoadError, LoadedPlugin};
use llmq_sdk::{ChatRequest, Content, HttpResponse, Message, PrepareInput, ProviderInfo};
use llmq_testkit::{fixture_plugin, plugin_dir};
use std::time::{Duration, Instant};

fn input(model: &str) -> PrepareInput {
    PrepareInput {
        request: ChatRequest {
            model: model.into(),
            messages: vec![Message {
                role: "user".into(),
                content: Content::Text("hi".into()),
            }],
            max_tokens: Some(8),
            temperature: None,
            json: false,
        },
        api_key: Some("sk-test-plugin-host-0000".into()),
        provider: ProviderInfo {
            name: "x".into(),
            base_url: "http://127.0.0.1:1/v1".into(),
            options: Default::default(),
        },
    }
}

#[test]
fn first_party_plugins_load_with_manifests() {
    let host = PluginHost::load_dir(plugin_dir()).expect("first-party plugins load");
    let names: Vec<&str> = host.names().collect();
    assert_eq!(names, vec!["anthropic", "gemini", "openai"]);
    for info in host.infos() {
        assert!(!info.version.is_empty(), "{info:?}");
        assert!(!info.protocols.is_empty(), "{info:?}");
        assert!(info.build.contains("panic=unwind"), "{info:?}");
    }
}

#[test]
fn wrong_abi_version_is_refused_naming_the_file() {
    let so = fixture_plugin("bad-abi");
    let err = LoadedPlugin::load(&so).unwrap_err();
    assert!(
        matches!(err, LoadError::AbiMismatch { found: 99, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&so.display().to_string()), "{msg}");
    assert!(msg.contains("ABI version 99"), "{msg}");
}

#[test]
fn a_file_that_is_not_a_library_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let so = dir
        .path()
        .join(format!("libjunk.{}", std::env::consts::DLL_EXTENSION));
    std::fs::write(&so, b"not an ELF file").unwrap();
    let err = PluginHost::load_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("libjunk"), "{err}");
    // Lenient loading keeps going and reports it.
    let host = PluginHost::load_dir_lenient(dir.path()).unwrap();
    assert!(host.is_empty());
    assert_eq!(host.refused().len(), 1);
}

#[test]
fn a_panic_inside_a_plugin_fails_the_call_not_the_process() {
    let p = LoadedPlugin::load(&fixture_plugin("panicky")).unwrap();
    let resp = HttpResponse {
        status: 200,
        headers: vec![],
        body: "{}".into(),
        received_at_unix_ms: 0,
    };
    for _ in 0..3 {
        let err = p.parse(&resp).unwrap_err();
        assert!(matches!(err, CallError::Panic { .. }), "{err}");
        assert!(err.to_string().contains("parse always panics"), "{err}");
    }
    let err = p.prepare(&input("panic")).unwrap_err();
    assert!(matches!(err, CallError::Panic { .. }), "{err}");
    // Still alive and still serving calls that do not panic.
    let req = p
        .prepare(&input("fine"))
        .expect("non-panicking call works after panics");
    assert_eq!(req.method, "POST");
}

#[test]
fn garbage_from_a_plugin_is_an_error_not_a_crash() {
    let p = LoadedPlugin::load(&fixture_plugin("garbage")).unwrap();
    let err = p.prepare(&input("m")).unwrap_err();
    assert!(matches!(err, CallError::Garbage { .. }), "{err}");
    let err = p
        .parse(&HttpResponse {
            status: 200,
            headers: vec![],
            body: String::new(),
            received_at_unix_ms: 0,
        })
        .unwrap_err();
    assert!(matches!(err, CallError::Garbage { .. }), "{err}");
}

#[test]
fn secrets_passed_to_plugins_do_not_leak_into_call_errors() {
    let p = LoadedPlugin::load(&fixture_plugin("panicky")).unwrap();
    let err = p.prepare(&input("panic")).unwrap_err();
    assert!(!format!("{err} {err:?}").contains("sk-test-plugin-host-0000"));
}

fn response() -> HttpResponse {
    HttpResponse {
        status: 200,
        headers: vec![],
        body: r#"{"choices":[{"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#.into(),
        received_at_unix_ms: 0,
    }
}

/// A dir with the given plugin files copied in.
fn dir_with(files: &[std::path::PathBuf]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in files {
        std::fs::copy(f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    dir
}

fn first_party(name: &str) -> std::path::PathBuf {
    std::fs::read_dir(plugin_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains(name))
        .unwrap()
}

/// A reload keeps what it loaded (and what it refused), adds new files,
/// and a provider whose plugin is missing is unavailable naming the
/// refused files.
#[test]
fn a_reload_reuses_seen_files_and_loads_new_ones() {
    let limits = CallLimits::default();
    let bad = fixture_plugin("bad-abi");
    let dir = dir_with(&[first_party("openai"), bad.clone()]);
    let host = PluginHost::default().reload(dir.path(), limits).unwrap();
    assert_eq!(host.names().collect::<Vec<_>>(), ["openai"]);
    assert_eq!(host.refused().len(), 1);
    let bad_name = bad.file_name().unwrap().to_str().unwrap();
    assert!(host.refused()[0].contains(bad_name), "{:?}", host.refused());
    let why = host.unavailable("anthropic").expect("not loaded");
    assert!(why.contains(bad_name), "{why}");
    assert_eq!(host.unavailable("openai"), None);

    let anthropic = first_party("anthropic");
    std::fs::copy(&anthropic, dir.path().join(anthropic.file_name().unwrap())).unwrap();
    let again = host.reload(dir.path(), limits).unwrap();
    assert_eq!(again.names().collect::<Vec<_>>(), ["anthropic", "openai"]);
    assert_eq!(again.refused(), host.refused());
    assert_eq!(again.unavailable("anthropic"), None);
    // A file that is gone is gone.
    std::fs::remove_file(dir.path().join(anthropic.file_name().unwrap())).unwrap();
    let third = again.reload(dir.path(), limits).unwrap();
    assert_eq!(third.names().collect::<Vec<_>>(), ["openai"]);
}

/// A call over the time limit fails naming the plugin, while calls to
/// other plugins go on; after `quarantine_after` timeouts the plugin is
/// quarantined (calls fail at once) until a reload.
#[tokio::test(flavor = "current_thread")]
async fn a_looping_call_times_out_and_repeated_timeouts_quarantine_the_plugin() {
    let dir = dir_with(&[first_party("openai"), fixture_plugin("looping")]);
    let limits = CallLimits {
        timeout: Duration::from_millis(300),
        quarantine_after: 2,
    };
    let host = PluginHost::default().reload(dir.path(), limits).unwrap();
    let looping = host.handle("looping").unwrap();
    let openai = host.handle("openai").unwrap();

    let resp = response();
    let started = Instant::now();
    let (stuck, fine) = tokio::join!(looping.parse(&resp), async {
        // Meanwhile, on this same (single-threaded) runtime.
        let parsed = openai.parse(&response()).await;
        (parsed, started.elapsed())
    });
    let err = stuck.unwrap_err();
    assert!(matches!(err, PluginCallError::TimedOut { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("looping") && msg.contains("call_timeout"),
        "{msg}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(fine.0.is_ok(), "{:?}", fine.0);
    assert!(fine.1 < Duration::from_millis(300), "{:?}", fine.1);
    assert_eq!(host.unavailable("looping"), None);

    // The second timeout quarantines it.
    assert!(matches!(
        looping.parse(&response()).await,
        Err(PluginCallError::TimedOut { .. })
    ));
    let why = host.unavailable("looping").expect("quarantined");
    assert!(why.contains("quarantined"), "{why}");
    assert!(host.problems().iter().any(|p| p.contains("looping")));
    let at_once = Instant::now();
    let err = looping.prepare(&input("m")).await.unwrap_err();
    assert!(
        matches!(err, PluginCallError::Quarantined { .. }),
        "{err:?}"
    );
    assert!(at_once.elapsed() < Duration::from_millis(100));
    assert!(openai.prepare(&input("m")).await.is_ok());

    // A reload lifts it.
    let reloaded = host.reload(dir.path(), limits).unwrap();
    assert_eq!(reloaded.unavailable("looping"), None);
    assert!(reloaded
        .handle("looping")
        .unwrap()
        .prepare(&input("m"))
        .await
        .is_ok());
}
