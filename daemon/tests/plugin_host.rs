//! The plugin host against real `.so` files built by cargo: the three
//! first-party plugins load; broken fixture plugins are refused or survived
//! with clear errors, and the process keeps running.

use llmq::plugin_host::PluginHost;
use llmq_sdk::host::{CallError, LoadError, LoadedPlugin};
use llmq_sdk::{ChatRequest, Content, HttpResponse, Message, PrepareInput, ProviderInfo};
use llmq_testkit::{fixture_plugin, plugin_dir};

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
