//! TLS to the broker: rustls with the `ring` provider (no aws-lc: the daemon cross-builds for
//! ARMv6), the server verified against the CA file of `[mqtt] ca_file`, TLS 1.2 and 1.3.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// A client configuration that trusts exactly the certificates in the PEM file `ca_file`.
pub fn client_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("reading the CA file {}", ca_file.display()))?;
    for cert in certs {
        let cert = cert.with_context(|| format!("parsing the CA file {}", ca_file.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("a certificate in {} is unusable", ca_file.display()))?;
    }
    if roots.is_empty() {
        bail!("the CA file {} holds no certificate", ca_file.display());
    }
    // rustls 0.23.48 deprecates the ring provider for lacking post-quantum key exchange; the
    // alternative, aws-lc-rs, does not build for ARMv6 (arm-unknown-linux-gnueabi). ring's
    // X25519/ECDHE suites are what mosquitto and Home Assistant's broker offer today.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
