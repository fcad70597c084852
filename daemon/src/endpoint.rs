//! Endpoint checks shared by `config` (validation at load) and `upstream`
//! (building the client): a provider's base URL, the proxy URL and the CA
//! file. They sit below both so `config` never imports the runtime HTTP
//! client.

use std::path::Path;

/// Why `[upstream] ca_file` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("a readable PEM file of CA certificates; {path:?}: {error}")]
    Unreadable { path: String, error: std::io::Error },
    #[error(
        "a PEM file of CA certificates; {path:?} holds no \"-----BEGIN CERTIFICATE-----\" block"
    )]
    NoCertificates { path: String },
    #[error("a PEM file of CA certificates; {path:?}: {detail}")]
    Invalid { path: String, detail: String },
}

/// A reqwest error without the URL (a careless plugin may put a key in it).
pub(crate) fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// Reads `[upstream] ca_file`: at least one PEM certificate, each a valid
/// X.509 trust anchor.
pub fn read_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, CaFileError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|error| CaFileError::Unreadable {
        path: shown.clone(),
        error,
    })?;
    let mut certs = Vec::new();
    let mut anchors = rustls::RootCertStore::empty();
    for (i, der) in CertificateDer::pem_slice_iter(&bytes).enumerate() {
        let der = der.map_err(|e| CaFileError::Invalid {
            path: shown.clone(),
            detail: format!("PEM block {} does not decode: {e}", i + 1),
        })?;
        anchors.add(der.clone()).map_err(|e| CaFileError::Invalid {
            path: shown.clone(),
            detail: format!(
                "certificate {} is not a valid X.509 CA certificate: {e}",
                i + 1
            ),
        })?;
        let cert =
            reqwest::Certificate::from_der(der.as_ref()).map_err(|e| CaFileError::Invalid {
                path: shown.clone(),
                detail: format!("certificate {}: {}", i + 1, describe(e)),
            })?;
        certs.push(cert);
    }
    if certs.is_empty() {
        return Err(CaFileError::NoCertificates { path: shown });
    }
    Ok(certs)
}

/// `[upstream] proxy`: an absolute http(s) URL with a host.
pub fn check_proxy_url(proxy: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(proxy.trim()).map_err(|e| {
        format!("a proxy URL such as \"http://proxy.internal:3128\"; {proxy:?} is not a URL ({e})")
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "a proxy URL such as \"http://proxy.internal:3128\"; {proxy:?} cannot work: llmq speaks to http and https proxies"
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "a proxy URL such as \"http://proxy.internal:3128\"; {proxy:?} has no host"
        ));
    }
    Ok(())
}

/// A provider's `base_url`: an absolute http(s) URL with a host.
pub fn check_base_url(base: &str) -> Result<(), String> {
    if base.contains(char::is_whitespace) {
        return Err(format!("an http(s) URL without spaces; got {base:?}"));
    }
    let url = reqwest::Url::parse(base).map_err(|e| {
        format!(
            "an http(s) URL such as \"https://api.example.com/v1\"; {base:?} is not a URL ({e})"
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{base:?} cannot work: llmq speaks http and https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "an http(s) URL such as \"https://api.example.com/v1\"; {base:?} has no host"
        ));
    }
    Ok(())
}
