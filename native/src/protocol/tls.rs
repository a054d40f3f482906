//! TLS configuration with rustls (ring provider): the server side agents connect to, with ALPN
//! `postgresql` for PG17 direct TLS, and the client side for the upstream leg (verify-full against a
//! configured CA, or encryption-only `require`).

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::sync::Arc;

use crate::config::{Target, TlsFiles, UpstreamTls};

pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read certificate file {path}: {e}"))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate file {path} is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("certificate file {path} holds no certificate"));
    }
    Ok(certs)
}

fn load_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read key file {path}: {e}"))?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| format!("key file {path} is not valid PEM: {e}"))?
        .ok_or_else(|| format!("key file {path} holds no private key"))
}

/// The listener's TLS config. ALPN `postgresql` is offered; a client offering only other
/// protocols is refused by rustls during the handshake.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let certs = load_certs(&files.cert_file)?;
    let key = load_key(&files.key_file)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls_cert/tls_key do not form a usable pair: {e}"))?;
    cfg.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Arc::new(cfg))
}

/// The upstream leg's TLS config, or None for `tls = "disable"`.
pub fn client_config(target: &Target) -> Result<Option<Arc<ClientConfig>>, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let cfg = match target.tls {
        UpstreamTls::Disable => return Ok(None),
        UpstreamTls::VerifyFull => {
            let ca = target.ca_file.as_deref().ok_or("ca_file is required for verify-full")?;
            let mut roots = RootCertStore::empty();
            for c in load_certs(ca)? {
                roots.add(c).map_err(|e| format!("CA file {ca}: {e}"))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        UpstreamTls::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider())))
            .with_no_client_auth(),
    };
    Ok(Some(Arc::new(cfg)))
}

pub fn server_name(target: &Target) -> Result<ServerName<'static>, String> {
    let name = target.server_name.clone().unwrap_or_else(|| target.host.clone());
    ServerName::try_from(name.clone()).map_err(|_| format!("{name:?} is not a valid TLS server name"))
}

/// `tls = "require"`: encrypt, but accept any certificate (like libpq's sslmode=require).
/// Signatures are still checked so the handshake itself is sound.
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
