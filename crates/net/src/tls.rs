//! TLS 1.3 with raw public keys (RFC 7250): the peer ID *is* the key each side
//! presents, so there is no certificate, no CA and nothing to expire.
//!
//! - The dialer pins the key it expects: a server presenting any other key
//!   fails the handshake with [`PEER_ID_MISMATCH`] in the error text.
//! - The acceptor requires a client key (mutual authentication) and learns
//!   the dialer's peer ID from it.
//! - Handshake signatures are verified against the presented key, so a peer
//!   must hold the secret key of the ID it claims.
//!
//! Only TLS 1.3 and ed25519 are offered. The ALPN `p2pos/1` keeps other QUIC
//! applications out.

use std::sync::Arc;

use p2pos_proto::{Keypair, PeerId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    verify_tls13_signature_with_raw_key, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer,
    UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// ALPN of p2pos sessions.
pub const ALPN: &[u8] = b"p2pos/1";

/// Marker in a handshake error when the peer presented another key (the
/// name of the error type, which rustls reports in its debug form).
pub const PEER_ID_MISMATCH: &str = "PeerIdMismatch";

/// Server name sent in the ClientHello. Identity comes from the key, not the
/// name, so it is a constant.
pub const SERVER_NAME: &str = "p2pos";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// The node's TLS identity: its key as a raw public key.
#[derive(Clone, Debug)]
pub struct TlsIdentity {
    certified: Arc<CertifiedKey>,
}

/// Why a TLS configuration could not be built (a bug or a corrupt key).
#[derive(Debug, thiserror::Error)]
#[error("TLS setup failed: {0}")]
pub struct TlsSetupError(String);

impl TlsSetupError {
    pub(crate) fn new(message: String) -> Self {
        TlsSetupError(message)
    }
}

impl TlsIdentity {
    /// Builds the TLS identity of `keypair`.
    pub fn new(keypair: &Keypair) -> Result<Self, TlsSetupError> {
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(keypair.to_pkcs8_der()));
        let signing = provider()
            .key_provider
            .load_private_key(der)
            .map_err(|e| TlsSetupError(e.to_string()))?;
        let spki = CertificateDer::from(keypair.peer_id().to_spki_der());
        Ok(TlsIdentity {
            certified: Arc::new(CertifiedKey::new(vec![spki], signing)),
        })
    }

    /// A client configuration that accepts only `expected` as the server.
    pub fn client_config(&self, expected: PeerId) -> Result<rustls::ClientConfig, TlsSetupError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsSetupError(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedServerKey { expected }))
            .with_client_cert_resolver(Arc::new(
                rustls::client::AlwaysResolvesClientRawPublicKeys::new(self.certified.clone()),
            ));
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// The server configuration: any client key is accepted (and becomes
    /// the session's peer ID), but one must be presented.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsSetupError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsSetupError(e.to_string()))?
            .with_client_cert_verifier(Arc::new(AnyClientKey))
            .with_cert_resolver(Arc::new(
                rustls::server::AlwaysResolvesServerRawPublicKeys::new(self.certified.clone()),
            ));
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

/// The peer ID of a QUIC connection's other end, from its raw public key.
pub fn peer_id_of(conn: &quinn::Connection) -> Option<PeerId> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    PeerId::from_spki_der(certs.first()?.as_ref()).ok()
}

fn check_key(cert: &CertificateDer<'_>) -> Result<PeerId, rustls::Error> {
    PeerId::from_spki_der(cert.as_ref())
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))
}

fn verify_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    verify_tls13_signature_with_raw_key(
        message,
        &SubjectPublicKeyInfoDer::from(cert.as_ref()),
        dss,
        &algorithms(),
    )
}

#[derive(Debug)]
struct PinnedServerKey {
    expected: PeerId,
}

impl ServerCertVerifier for PinnedServerKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = check_key(end_entity)?;
        if presented != self.expected {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(PeerIdMismatch {
                    presented,
                }))),
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct PeerIdMismatch {
    presented: PeerId,
}

impl std::fmt::Display for PeerIdMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer presented another peer ID: {}", self.presented)
    }
}

impl std::error::Error for PeerIdMismatch {}

#[derive(Debug)]
struct AnyClientKey;

impl ClientCertVerifier for AnyClientKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_key(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}
