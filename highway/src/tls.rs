//! Peer authentication on Highways: rustls verifiers for both sides of a
//! QUIC connection, and the quinn configurations that use them.
//!
//! A peer is accepted only when all of these hold ([`PeerPolicy::check`],
//! one check for both sides):
//!
//! 1. its X.509 certificate parses, is ed25519, and is signed by its own key;
//! 2. the bus chain in its extension ([`crate::cert::BUS_CHAIN_OID`]) reaches
//!    an authority of the trust store, now;
//! 3. no certificate of that chain is revoked by the list in force
//!    ([`Revocations`], swappable while connections run);
//! 4. the chain's leaf is a junction certificate;
//! 5. on the dialer's side, its id is the one dialled (server name
//!    `junction-<id>`); on the listener's side any junction may connect, and
//!    [`peer_junction`] reads its id back;
//! 6. the TLS key (the X.509 subject key, which signs the handshake) is the
//!    key the bus leaf certifies.
//!
//! Checks 2 to 5 are [`junction_identity::certify_junction`], the same check
//! routing applies to link-state seals and session hellos. TLS 1.3 only, and
//! ED25519 the only signature scheme. Every refusal is a [`PeerRefused`],
//! carried in a `rustls::Error::Other`, so its words reach the refusing
//! side's connection error (quinn's `TransportError` reason); the peer gets
//! a `handshake_failure` alert.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use junction_identity::{
    IdentityError, JunctionCertError, PublicKey, RevocationList, TrustStore, Verified,
};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use ring::signature::{ED25519, UnparsedPublicKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use crate::HighwayError;
use crate::cert::{TlsIdentity, X509Refused, junction_of_server_name, parse_peer};

/// The ALPN protocol of Highways, version 1. Both sides offer only this.
pub const ALPN: &[u8] = b"junction-highway/1";

/// The revocation list in force, shared by every verifier made from one
/// [`PeerPolicy`]: replacing it (on SIGHUP, say) applies to every
/// handshake from then on. Connections already up are not re-checked here.
#[derive(Debug, Clone, Default)]
pub struct Revocations(Arc<RwLock<Option<Verified<RevocationList>>>>);

impl Revocations {
    /// Holds `list` (or none).
    pub fn new(list: Option<Verified<RevocationList>>) -> Self {
        Self(Arc::new(RwLock::new(list)))
    }

    /// Puts `list` in force and gives back the one it replaces. Whether a
    /// list is newer than the one in force is the caller's decision.
    pub fn replace(
        &self,
        list: Option<Verified<RevocationList>>,
    ) -> Option<Verified<RevocationList>> {
        let mut slot = self.0.write().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *slot, list)
    }

    /// The number of the list in force, if there is one.
    pub fn number(&self) -> Option<u64> {
        self.read(|list| list.map(|l| l.body.number))
    }

    /// Runs `f` with the list in force.
    fn read<R>(&self, f: impl FnOnce(Option<&Verified<RevocationList>>) -> R) -> R {
        let slot = self.0.read().unwrap_or_else(PoisonError::into_inner);
        f(slot.as_ref())
    }
}

/// Which peers a junction admits: the authorities it trusts and the
/// revocation list in force.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    trust: Arc<TrustStore>,
    revocations: Revocations,
}

/// A peer that passed [`PeerPolicy::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerJunction {
    /// Its junction id, from its bus certificate.
    pub id: u16,
    /// Its bus key, which is also its TLS key.
    pub key: PublicKey,
}

impl PeerPolicy {
    /// Admits junctions certified by `trust`, unless `revocations` revokes
    /// them (now or once a list is put in it).
    pub fn new(trust: TrustStore, revocations: Revocations) -> Self {
        Self {
            trust: Arc::new(trust),
            revocations,
        }
    }

    /// The revocation list in force, to replace it.
    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// Whether the peer presenting `end_entity` (and `intermediates`, which
    /// must be none) is a junction of this bus, junction `expected` when
    /// given, at `now` (seconds since the Unix epoch).
    pub fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        expected: Option<u16>,
        now: u64,
    ) -> Result<PeerJunction, PeerRefused> {
        if !intermediates.is_empty() {
            return Err(PeerRefused::ExtraCertificates {
                count: intermediates.len(),
            });
        }
        let peer = parse_peer(end_entity).map_err(PeerRefused::from)?;
        let chain = peer.chain.ok_or(PeerRefused::NoChain)?;
        let (id, bus_key) = self
            .revocations
            .read(|list| {
                junction_identity::certify_junction(&chain, expected, &self.trust, list, now)
            })
            .map_err(PeerRefused::from)?;
        if bus_key != peer.key {
            return Err(PeerRefused::KeyMismatch {
                tls: peer.key,
                bus: bus_key,
            });
        }
        Ok(PeerJunction { id, key: bus_key })
    }
}

/// Why a Highway peer was refused, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerRefused {
    /// Its TLS certificate is not a well-formed, self-signed ed25519 one.
    #[error("the peer's TLS certificate is unusable: {why}")]
    Malformed {
        /// What is wrong with it.
        why: String,
    },
    /// It sent more than its own certificate.
    #[error("the peer sent {count} certificates besides its own; a junction sends only its own")]
    ExtraCertificates {
        /// How many more.
        count: usize,
    },
    /// Its certificate carries no bus chain.
    #[error(
        "the peer presented a self-signed key with no bus chain: its certificate carries no junction certificate chain"
    )]
    NoChain,
    /// Its chain ends at an authority this junction does not trust.
    #[error("the peer's chain is signed by an authority this bus does not trust (key {issuer})")]
    ForeignAuthority {
        /// The last issuer of its chain.
        issuer: PublicKey,
    },
    /// Its chain is broken, badly signed, expired or not yet valid.
    #[error("the peer's bus certificate chain does not hold: {0}")]
    Chain(IdentityError),
    /// A certificate of its chain is revoked.
    #[error("the peer's certificate {serial:#x} is revoked")]
    Revoked {
        /// The revoked certificate's serial.
        serial: u64,
    },
    /// Its certificate is another junction's than the one dialled.
    #[error("the peer's certificate is for junction {certified}, not {expected}, the one dialled")]
    WrongJunction {
        /// The junction dialled.
        expected: u16,
        /// The junction its certificate is for.
        certified: u16,
    },
    /// Its certificate is not a junction certificate.
    #[error("the peer's certificate is a {role} certificate, not a junction's")]
    NotAJunction {
        /// The role it has.
        role: String,
    },
    /// Its TLS key is not the key its bus certificate is for.
    #[error(
        "the peer's TLS key {tls} is not the key its bus certificate speaks for ({bus}): it shows a chain that is not its own"
    )]
    KeyMismatch {
        /// The key that signed the TLS handshake.
        tls: PublicKey,
        /// The key its bus leaf certifies.
        bus: PublicKey,
    },
    /// The dialer named no junction (a local mistake, not the peer's).
    #[error("the server name {name:?} names no junction (junction-<id> expected)")]
    BadServerName {
        /// The name dialled.
        name: String,
    },
}

impl From<X509Refused> for PeerRefused {
    fn from(e: X509Refused) -> Self {
        PeerRefused::Malformed { why: e.to_string() }
    }
}

impl From<JunctionCertError> for PeerRefused {
    fn from(e: JunctionCertError) -> Self {
        match e {
            JunctionCertError::Certificate(IdentityError::Untrusted { issuer }) => {
                PeerRefused::ForeignAuthority { issuer }
            }
            JunctionCertError::Certificate(source) => PeerRefused::Chain(source),
            JunctionCertError::Revoked { serial } => PeerRefused::Revoked { serial },
            JunctionCertError::WrongJunction {
                expected,
                certified,
            } => PeerRefused::WrongJunction {
                expected,
                certified,
            },
            JunctionCertError::NotAJunction { role } => PeerRefused::NotAJunction { role },
            other => PeerRefused::Chain(IdentityError::CertificateFormat(other.to_string())),
        }
    }
}

/// A refusal as rustls carries it: `Error::Other`, whose text is the
/// refusal's own words (`CertificateError::Other` would print them with
/// `Debug`). The peer gets a `handshake_failure` alert.
impl From<PeerRefused> for rustls::Error {
    fn from(e: PeerRefused) -> Self {
        rustls::Error::Other(OtherError(Arc::new(e)))
    }
}

/// The rustls verifier of Highway peers, for both sides: a
/// [`ServerCertVerifier`] for the dialer and a [`ClientCertVerifier`] (client
/// certificates mandatory) for the listener, both applying
/// [`PeerPolicy::check`].
#[derive(Debug, Clone)]
pub struct JunctionVerifier {
    policy: PeerPolicy,
}

impl JunctionVerifier {
    /// A verifier applying `policy`.
    pub fn new(policy: PeerPolicy) -> Self {
        Self { policy }
    }
}

impl ServerCertVerifier for JunctionVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = server_name.to_str();
        let expected =
            junction_of_server_name(&name).ok_or_else(|| PeerRefused::BadServerName {
                name: name.to_string(),
            })?;
        self.policy
            .check(end_entity, intermediates, Some(expected), now.as_secs())?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for JunctionVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.policy
            .check(end_entity, intermediates, None, now.as_secs())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::General("Highways speak TLS 1.3 only".into())
}

/// A TLS 1.3 handshake signature by the certificate's (ed25519) key.
fn verify_tls13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::PeerMisbehaved(
            rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
        ));
    }
    let peer = parse_peer(cert).map_err(PeerRefused::from)?;
    UnparsedPublicKey::new(&ED25519, peer.key.0)
        .verify(message, dss.signature())
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
    Ok(HandshakeSignatureValid::assertion())
}

/// The junction id in a connection's peer certificates (as quinn's
/// `Connection::peer_identity` gives them, downcast to
/// `Vec<CertificateDer>`), once the verifiers admitted it. `None` if there
/// is no junction certificate in them. It reads, it does not check again.
pub fn peer_junction(certs: &[CertificateDer<'_>]) -> Option<u16> {
    let peer = parse_peer(certs.first()?).ok()?;
    match peer.chain?.first()?.body.role {
        junction_identity::Role::Junction { id } => Some(id),
        _ => None,
    }
}

/// The junction id at the other end of `conn` ([`peer_junction`] of its
/// peer identity).
pub fn connection_peer_junction(conn: &quinn::Connection) -> Option<u16> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    peer_junction(&certs)
}

/// Checks the peer of an established connection again with `policy` (the
/// revocation list changed, say): its junction, or why it no longer passes.
pub fn check_connection(
    policy: &PeerPolicy,
    conn: &quinn::Connection,
    now: u64,
) -> Result<PeerJunction, PeerRefused> {
    let certs = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(PeerRefused::NoChain)?;
    let (leaf, rest) = certs.split_first().ok_or(PeerRefused::NoChain)?;
    policy.check(leaf, rest, None, now)
}

/// QUIC transport settings of Highways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportSettings {
    /// How often an idle connection sends a keep-alive (default 5 s): well
    /// under the idle timeout, so a quiet but live link never times out.
    pub keep_alive: Duration,
    /// How long a connection may hear nothing before it is dead (default
    /// 30 s; the smaller of both sides' values applies).
    pub idle_timeout: Duration,
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

impl TransportSettings {
    fn quinn(&self) -> Result<Arc<quinn::TransportConfig>, HighwayError> {
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout).map_err(|_| {
            HighwayError::IdleTimeout {
                timeout: self.idle_timeout,
            }
        })?;
        let mut t = quinn::TransportConfig::default();
        // One bidirectional stream, the control stream the dialer opens:
        // a peer gets no more, each of which quinn would buffer up to a
        // stream window of data for, unread. No datagrams either: nothing
        // reads them.
        t.keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(Some(idle))
            .max_concurrent_bidi_streams(1u32.into())
            .datagram_receive_buffer_size(None);
        Ok(Arc::new(t))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The listening side's QUIC configuration: presents `identity`, demands a
/// client certificate and admits any junction `policy` admits, TLS 1.3 and
/// [`ALPN`] only.
pub fn server_config(
    identity: &TlsIdentity,
    policy: &PeerPolicy,
    transport: &TransportSettings,
) -> Result<quinn::ServerConfig, HighwayError> {
    let (certs, key) = identity.rustls_parts();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(JunctionVerifier::new(policy.clone())))
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(transport.quinn()?);
    Ok(config)
}

/// The dialing side's QUIC configuration: presents `identity` and admits
/// the server only if `policy` admits it as the junction named by the server
/// name it is dialled with ([`crate::cert::server_name`]), TLS 1.3 and
/// [`ALPN`] only.
pub fn client_config(
    identity: &TlsIdentity,
    policy: &PeerPolicy,
    transport: &TransportSettings,
) -> Result<quinn::ClientConfig, HighwayError> {
    let (certs, key) = identity.rustls_parts();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(JunctionVerifier::new(policy.clone())))
        .with_client_auth_cert(certs, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(transport.quinn()?);
    Ok(config)
}
