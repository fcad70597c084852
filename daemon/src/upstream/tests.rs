//! The client against local servers: body cap, deadline vs timeout, TLS
//! classification, proxies and NO_PROXY, HTTP/2 modes, and the start-up checks.

use super::*;
use crate::endpoint::check_base_url;
use axum::body::{Body, Bytes};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn cfg() -> UpstreamConfig {
    UpstreamConfig::default()
}

/// A client that ignores the machine's proxy variables.
fn client(cfg: &UpstreamConfig) -> Upstream {
    Upstream::build(cfg, &ProxyEnv::default()).expect("client builds")
}

fn get(url: String) -> HttpRequest {
    HttpRequest {
        method: "GET".into(),
        url,
        headers: vec![],
        body: String::new(),
    }
}

const LONG: Duration = Duration::from_secs(60);

/// Serves `app` on a free port; returns its address.
async fn serve(app: axum::Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// A body of `n` bytes, declared with content-length.
async fn fixed_body(n: usize) -> SocketAddr {
    serve(axum::Router::new().route(
        "/",
        axum::routing::get(move || async move { "x".repeat(n) }),
    ))
    .await
}

/// A body of `chunks` × 1 KiB, streamed without content-length.
async fn streamed_body(chunks: usize) -> SocketAddr {
    serve(axum::Router::new().route(
        "/",
        axum::routing::get(move || async move {
            let stream = futures::stream::iter(
                (0..chunks).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'y'; 1024]))),
            );
            Body::from_stream(stream)
        }),
    ))
    .await
}

/// Accepts connections and never answers (holds them open).
async fn hang() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    addr
}

/// Answers every connection with a fixed HTTP/1.1 response (a fake proxy,
/// or a plain-HTTP server reached with https://).
async fn fixed_http(text: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                    text.len()
                );
                let _ = sock.write_all(reply.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_body_within_the_cap_is_read_whole() {
    let addr = fixed_body(1024).await;
    let up = client(&UpstreamConfig {
        max_response_bytes: 1024,
        ..cfg()
    });
    let r = up
        .send(get(format!("http://{addr}/")), LONG, || 7)
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.body.len(), r.received_at_unix_ms),
        (200, 1024, 7)
    );
}

#[tokio::test]
async fn a_declared_body_over_the_cap_fails_before_it_is_read() {
    let addr = fixed_body(10 * 1024).await;
    let up = client(&UpstreamConfig {
        max_response_bytes: 1024,
        ..cfg()
    });
    let e = up
        .send(get(format!("http://{addr}/")), LONG, || 0)
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::TooLarge { limit: 1024 }), "{e}");
}

#[tokio::test]
async fn a_streamed_body_over_the_cap_fails_while_it_streams() {
    let addr = streamed_body(64).await;
    let up = client(&UpstreamConfig {
        max_response_bytes: 10 * 1024,
        ..cfg()
    });
    let e = up
        .send(get(format!("http://{addr}/")), LONG, || 0)
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::TooLarge { limit: 10240 }), "{e}");
    // The same stream under a larger cap is read whole.
    let up = client(&UpstreamConfig {
        max_response_bytes: 64 * 1024,
        ..cfg()
    });
    let r = up
        .send(get(format!("http://{addr}/")), LONG, || 0)
        .await
        .unwrap();
    assert_eq!(r.body.len(), 64 * 1024);
}

#[tokio::test]
async fn the_jobs_remaining_time_cuts_a_call_as_deadline() {
    let addr = hang().await;
    let up = client(&cfg());
    let started = std::time::Instant::now();
    let e = up
        .send(
            get(format!("http://{addr}/")),
            Duration::from_millis(300),
            || 0,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::Deadline(_)), "{e}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

#[tokio::test]
async fn the_upstream_timeout_cuts_a_call_as_timeout_when_it_comes_first() {
    let addr = hang().await;
    let up = client(&UpstreamConfig {
        timeout: Duration::from_millis(300),
        ..cfg()
    });
    let e = up
        .send(get(format!("http://{addr}/")), LONG, || 0)
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::Timeout(_)), "{e}");
}

#[tokio::test]
async fn a_failed_tls_handshake_is_a_tls_error() {
    // A plain HTTP server behind an https:// URL: rustls rejects the answer.
    let addr = fixed_http("plain").await;
    let up = client(&cfg());
    let e = up
        .send(get(format!("https://{addr}/")), LONG, || 0)
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::Tls(_)), "{e:?}");
    assert!(e.to_string().starts_with("TLS/certificate error"), "{e}");
}

#[tokio::test]
async fn a_refused_connection_is_not_a_tls_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let up = client(&cfg());
    let e = up
        .send(get(format!("https://127.0.0.1:{port}/")), LONG, || 0)
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::Connect(_)), "{e:?}");
}

#[tokio::test]
async fn the_configured_proxy_carries_calls_except_to_no_proxy_hosts() {
    let target = fixed_body(6).await; // answers "xxxxxx" directly
    let proxy = fixed_http("proxied").await;
    let cfg = UpstreamConfig {
        proxy: Some(format!("http://{proxy}")),
        ..cfg()
    };
    let url = format!("http://{target}/");
    let via = Upstream::build(&cfg, &ProxyEnv::default()).unwrap();
    let r = via.send(get(url.clone()), LONG, || 0).await.unwrap();
    assert_eq!(r.body, "proxied");
    let bypass = Upstream::build(
        &cfg,
        &ProxyEnv {
            from_env: true,
            no_proxy: Some("example.org, 127.0.0.1".into()),
        },
    )
    .unwrap();
    let r = bypass.send(get(url), LONG, || 0).await.unwrap();
    assert_eq!(r.body, "xxxxxx");
}

/// The first bytes each connection sends, then closes it.
async fn first_bytes() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = vec![0u8; 14];
            if sock.read_exact(&mut buf).await.is_ok() {
                let _ = tx.send(buf);
            }
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn http2_modes_pick_the_protocol() {
    for (mode, preface) in [
        (Http2Mode::Auto, "GET / HTTP/1.1"),
        (Http2Mode::Never, "GET / HTTP/1.1"),
        // h2c: the HTTP/2 connection preface at once, no upgrade.
        (Http2Mode::PriorKnowledge, "PRI * HTTP/2.0"),
    ] {
        let (addr, mut seen) = first_bytes().await;
        let up = client(&UpstreamConfig {
            http2: mode,
            timeout: Duration::from_secs(5),
            ..cfg()
        });
        // The server closes after reading: the call itself fails.
        let _ = up.send(get(format!("http://{addr}/")), LONG, || 0).await;
        let first = seen.recv().await.expect("the client connected");
        assert_eq!(String::from_utf8_lossy(&first), preface, "{mode:?}");
    }
}

#[test]
fn base_urls_must_be_absolute_http_or_https() {
    assert!(check_base_url("https://api.example.com/v1").is_ok());
    assert!(check_base_url("http://127.0.0.1:8000/v1").is_ok());
    let e = check_base_url("ftp://files.example.com/v1").unwrap_err();
    assert_eq!(
        e,
        "\"ftp://files.example.com/v1\" cannot work: llmq speaks http and https"
    );
    assert!(check_base_url("api.example.com/v1")
        .unwrap_err()
        .contains("is not a URL"));
    assert!(check_base_url("https://api.example .com")
        .unwrap_err()
        .contains("without spaces"));
}

#[test]
fn proxies_must_be_http_or_https_urls() {
    assert!(check_proxy_url("http://proxy.internal:3128").is_ok());
    assert!(check_proxy_url("https://user:pw@proxy.internal").is_ok());
    assert!(check_proxy_url("socks5://proxy:1080")
        .unwrap_err()
        .contains("cannot work"));
    assert!(check_proxy_url("proxy.internal:3128").is_err());
    assert!(check_proxy_url("not a url")
        .unwrap_err()
        .contains("is not a URL"));
}

#[test]
fn a_ca_file_must_be_readable_pem_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let e = read_ca_file(&missing).unwrap_err();
    assert!(matches!(e, CaFileError::Unreadable { .. }), "{e}");
    assert!(e.to_string().contains("missing.pem"), "{e}");

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "just some text\n").unwrap();
    let e = read_ca_file(&text).unwrap_err();
    assert!(matches!(e, CaFileError::NoCertificates { .. }), "{e}");

    let junk = dir.path().join("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let e = read_ca_file(&junk).unwrap_err();
    assert!(matches!(e, CaFileError::Invalid { .. }), "{e}");
    assert!(e.to_string().contains("certificate 1"), "{e}");

    // A CA file that cannot be used fails the client at start, too.
    let e = Upstream::build(
        &UpstreamConfig {
            ca_file: Some(junk.display().to_string()),
            ..cfg()
        },
        &ProxyEnv::default(),
    )
    .unwrap_err();
    assert!(matches!(e, SetupError::CaFile(_)), "{e}");
}

#[test]
fn the_platform_roots_are_used_when_it_has_some() {
    let up = client(&cfg());
    let native = rustls_native_certs::load_native_certs().certs.len();
    if native > 0 {
        assert!(
            matches!(up.roots(), Roots::Native { certs, .. } if *certs == native),
            "{}",
            up.roots()
        );
    } else {
        assert_eq!(up.roots(), &Roots::WebpkiFallback);
    }
}
