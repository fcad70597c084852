//! TLS for the mock: a throwaway CA made at start (rcgen), a server
//! certificate it signs for `localhost`, `127.0.0.1` and `::1` (and the bound
//! address), and a rustls server config offering ALPN `h2` and `http/1.1`.
//!
//! Only the `ring` crypto provider is used, selected explicitly, so nothing
//! depends on a process-wide default provider being installed.

use crate::MockError;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::rustls::crypto::ring::default_provider;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// The file name of the CA certificate in the server's temp dir.
const CA_FILE_NAME: &str = "llmq-mock-ca.pem";

/// A server's TLS material: the acceptor and the CA clients must trust.
pub(crate) struct Tls {
    pub acceptor: TlsAcceptor,
    pub ca_pem: String,
    /// Holds `ca_path`; removed with it when the server is dropped.
    _dir: tempfile::TempDir,
    pub ca_path: PathBuf,
}

fn tls_error(what: &str, e: impl std::fmt::Display) -> MockError {
    MockError::Tls(format!("{what}: {e}"))
}

impl Tls {
    /// Makes a fresh CA and a server certificate valid for the loopback
    /// names and `bound` (when it is a specific address).
    pub fn generate(bound: IpAddr) -> Result<Tls, MockError> {
        let ca_key = KeyPair::generate().map_err(|e| tls_error("generating the CA key", e))?;
        let mut ca = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| tls_error("building the CA certificate", e))?;
        ca.distinguished_name
            .push(DnType::CommonName, "llmq-mock throwaway test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca
            .self_signed(&ca_key)
            .map_err(|e| tls_error("signing the CA certificate", e))?;

        let mut names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        if !bound.is_unspecified() && !bound.is_loopback() {
            names.push(bound.to_string());
        }
        let key = KeyPair::generate().map_err(|e| tls_error("generating the server key", e))?;
        let mut leaf = CertificateParams::new(names)
            .map_err(|e| tls_error("building the server certificate", e))?;
        leaf.distinguished_name
            .push(DnType::CommonName, "localhost");
        leaf.use_authority_key_identifier_extension = true;
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_cert = leaf
            .signed_by(&key, &ca_cert, &ca_key)
            .map_err(|e| tls_error("signing the server certificate", e))?;

        let chain = vec![leaf_cert.der().clone(), ca_cert.der().clone()];
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error("choosing TLS versions", e))?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(|e| tls_error("loading the server certificate", e))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        let ca_pem = ca_cert.pem();
        let dir = tempfile::Builder::new()
            .prefix("llmq-mock-ca-")
            .tempdir()
            .map_err(MockError::CaFile)?;
        let ca_path = dir.path().join(CA_FILE_NAME);
        std::fs::write(&ca_path, &ca_pem).map_err(MockError::CaFile)?;
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            ca_pem,
            _dir: dir,
            ca_path,
        })
    }

    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }
}
