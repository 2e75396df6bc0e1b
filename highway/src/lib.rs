//! Highways: QUIC links between Junctions on different machines.
//!
//! Highways are QUIC connections between junctions. The protocol logic is
//! sans-IO, as quinn-proto is: pure Rust, no tokio, no clock of its own,
//! driven by a shell (the junction's) that owns the QUIC endpoint.
//!
//! - [`wire`]: what junctions exchange over a Highway, byte by byte: the
//!   control stream's frames, the data streams' frames, their framing, an
//!   incremental decoder and a batching encoder (docs/protocol.md,
//!   section 18).
//! - [`link`]: the link state machine, one per junction: hellos,
//!   admission, keep-alives and liveness, round-trip times, the redial
//!   schedule with backoff and the tie-break that keeps one connection per
//!   pair of junctions.
//! - [`cert`]: the junction's TLS certificate ([`TlsIdentity`]), made with
//!   rcgen from its bus key, self-signed, carrying its bus certificate chain
//!   in a non-critical extension ([`cert::BUS_CHAIN_OID`]), with the server
//!   name `junction-<id>` ([`cert::server_name`]);
//! - [`tls`]: the rustls verifiers of both sides ([`JunctionVerifier`],
//!   applying [`PeerPolicy::check`], which is junction-identity's
//!   `certify_junction` plus the TLS checks), the revocation list in force
//!   ([`Revocations`], swappable at run time), and the quinn configurations
//!   ([`server_config`], [`client_config`]): TLS 1.3, ed25519, mutual
//!   authentication, ALPN [`ALPN`].
//!
//! A shell makes one endpoint with both configurations, dials a neighbour
//! with server name `cert::server_name(id)`, and reads the id of a peer that
//! dialled it with [`connection_peer_junction`]. A client the server refused
//! still sees its QUIC connect succeed (the refusal shows on its first
//! stream use), so a link counts as up only after the peer's first frame.

#![forbid(unsafe_code)]

pub mod cert;
pub mod link;
pub mod tls;
pub mod wire;

pub use cert::TlsIdentity;
pub use tls::{
    ALPN, JunctionVerifier, PeerJunction, PeerPolicy, PeerRefused, Revocations, TransportSettings,
    check_connection, client_config, connection_peer_junction, peer_junction, server_config,
};

use std::time::Duration;

use junction_identity::{IdentityError, PublicKey};

/// Why a Highway's TLS identity or configuration could not be made: the
/// caller's inputs, not a peer's doing (peers' refusals are [`PeerRefused`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HighwayError {
    /// The junction's key could not be exported.
    #[error("the junction's bus key cannot be used: {0}")]
    Key(#[from] IdentityError),
    /// No bus chain was given.
    #[error("no bus certificate chain was given for this junction")]
    NoChain,
    /// The chain's leaf is not a junction certificate.
    #[error(
        "the junction's bus certificate is for {role}, not for a junction; issue one with \
         `junction cert issue --role junction --junction-id ID`"
    )]
    NotAJunctionCertificate {
        /// Its role.
        role: String,
    },
    /// The chain's leaf certifies another key than the junction's.
    #[error(
        "the junction's bus certificate is for key {certified}, not for its key {key}: wrong key or certificate file"
    )]
    ChainForAnotherKey {
        /// The key the leaf certifies.
        certified: PublicKey,
        /// The junction's key.
        key: PublicKey,
    },
    /// The certificate's contents could not be encoded.
    #[error("the TLS certificate could not be encoded: {0}")]
    Encoding(String),
    /// rcgen could not make the certificate.
    #[error("the TLS certificate could not be made: {0}")]
    Certificate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("the TLS configuration is refused: {0}")]
    Tls(#[from] rustls::Error),
    /// quinn cannot use the rustls configuration.
    #[error("QUIC cannot use the TLS configuration: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// The idle timeout does not fit QUIC's.
    #[error("an idle timeout of {timeout:?} is longer than QUIC can carry")]
    IdleTimeout {
        /// The timeout asked for.
        timeout: Duration,
    },
}

#[cfg(test)]
mod tests;
