//! `[upstream]` (SPEC §12): defaults, parsing, env overrides, and the
//! start-up errors that name the file and field (CA file, proxy, base URLs).

use llmq::config::{load_from_str, load_layers, Http2Mode, UpstreamConfig};
use llmq::error::Error;
use std::collections::BTreeMap;
use std::time::Duration;

fn err(toml: &str) -> (String, String, String) {
    match load_from_str(toml, "test.toml") {
        Err(Error::Config {
            file,
            field,
            expected,
        }) => (file, field, expected),
        Err(other) => panic!("expected a config error, got {other}"),
        Ok(_) => panic!("expected an error for:\n{toml}"),
    }
}

#[test]
fn defaults_follow_the_spec() {
    let cfg = load_layers(None, &BTreeMap::new()).unwrap();
    assert_eq!(
        cfg.upstream,
        UpstreamConfig {
            ca_file: None,
            proxy: None,
            http2: Http2Mode::Auto,
            connect_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(120),
            max_response_bytes: 16 * 1024 * 1024,
        }
    );
}

#[test]
fn every_field_parses() {
    let cfg = load_from_str(
        "[upstream]\nproxy = \"http://proxy.internal:3128\"\nhttp2 = \"prior-knowledge\"\n\
         connect_timeout = \"3s\"\ntimeout = \"45s\"\nmax_response_bytes = 1048576\n",
        "test.toml",
    )
    .unwrap();
    let u = cfg.upstream;
    assert_eq!(u.proxy.as_deref(), Some("http://proxy.internal:3128"));
    assert_eq!(u.http2, Http2Mode::PriorKnowledge);
    assert_eq!(u.connect_timeout, Duration::from_secs(3));
    assert_eq!(u.timeout, Duration::from_secs(45));
    assert_eq!(u.max_response_bytes, 1 << 20);
    let never = load_from_str("[upstream]\nhttp2 = \"never\"\n", "t.toml").unwrap();
    assert_eq!(never.upstream.http2, Http2Mode::Never);
}

#[test]
fn env_overrides_reach_upstream() {
    let env: BTreeMap<String, String> = [
        ("LLMQ__UPSTREAM__TIMEOUT", "30s"),
        ("LLMQ__UPSTREAM__MAX_RESPONSE_BYTES", "2048"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let cfg = load_layers(None, &env).unwrap();
    assert_eq!(cfg.upstream.timeout, Duration::from_secs(30));
    assert_eq!(cfg.upstream.max_response_bytes, 2048);
}

#[test]
fn unknown_fields_and_bad_values_name_the_field() {
    let (file, field, _) = err("[upstream]\nca_path = \"/x\"\n");
    assert_eq!(
        (file.as_str(), field.as_str()),
        ("test.toml", "upstream.ca_path")
    );
    let (_, field, expected) = err("[upstream]\nhttp2 = \"always\"\n");
    assert_eq!(field, "upstream.http2");
    assert!(expected.contains("prior-knowledge"), "{expected}");
    let (_, field, _) = err("[upstream]\ntimeout = \"0s\"\n");
    assert_eq!(field, "upstream.timeout");
    // Longer than the cluster gate counts a call in flight.
    let (_, field, expected) = err("[upstream]\ntimeout = \"10m\"\n");
    assert_eq!(field, "upstream.timeout");
    assert!(expected.contains("at most 2m"), "{expected}");
    let (_, field, _) = err("[upstream]\nconnect_timeout = \"0s\"\n");
    assert_eq!(field, "upstream.connect_timeout");
    let (_, field, _) = err("[upstream]\nmax_response_bytes = 0\n");
    assert_eq!(field, "upstream.max_response_bytes");
}

#[test]
fn a_ca_file_that_is_missing_or_not_pem_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem");
    let (file, field, expected) = err(&format!("[upstream]\nca_file = {:?}\n", missing));
    assert_eq!(
        (file.as_str(), field.as_str()),
        ("test.toml", "upstream.ca_file")
    );
    assert!(expected.contains("nope.pem"), "{expected}");
    let text = dir.path().join("ca.pem");
    std::fs::write(&text, "not a certificate\n").unwrap();
    let (_, field, expected) = err(&format!("[upstream]\nca_file = {:?}\n", text));
    assert_eq!(field, "upstream.ca_file");
    assert!(expected.contains("BEGIN CERTIFICATE"), "{expected}");
}

#[test]
fn a_proxy_must_be_an_http_or_https_url() {
    let (_, field, expected) = err("[upstream]\nproxy = \"proxy.internal\"\n");
    assert_eq!(field, "upstream.proxy");
    assert!(expected.contains("is not a URL"), "{expected}");
    let (_, field, expected) = err("[upstream]\nproxy = \"socks5://p:1080\"\n");
    assert_eq!(field, "upstream.proxy");
    assert!(expected.contains("cannot work"), "{expected}");
}

#[test]
fn a_base_url_llmq_cannot_speak_names_the_provider() {
    let (file, field, expected) = err(
        "[providers.foo]\nbase_url = \"ftp://files.example.com/v1\"\n\
         [[providers.foo.models]]\nid = \"m\"\n",
    );
    assert_eq!(
        (file.as_str(), field.as_str()),
        ("test.toml", "providers.foo.base_url")
    );
    assert_eq!(
        expected,
        "\"ftp://files.example.com/v1\" cannot work: llmq speaks http and https"
    );
    // A catalog provider overridden by the user: the user's file is named.
    let (file, field, _) = err("[providers.groq]\nbase_url = \"groq.com/v1\"\n");
    assert_eq!(
        (file.as_str(), field.as_str()),
        ("test.toml", "providers.groq.base_url")
    );
}
