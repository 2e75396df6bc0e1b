//! The junction's TLS certificate: an X.509 certificate made with rcgen
//! from the junction's bus key, self-signed, carrying the junction's bus
//! certificate chain in a non-critical extension.
//!
//! # What it holds
//!
//! - subject public key and signature: ed25519, the junction's bus key (the
//!   same key its bus certificate speaks for);
//! - subject `CN=junction-<id>` and one SAN dNSName `junction-<id>`, the
//!   server name a dialer connects with ([`server_name`]);
//! - validity: the bus leaf certificate's window, to the day (the bus chain
//!   is what is checked; the X.509 dates are for people);
//! - extension [`BUS_CHAIN_OID`], non-critical (webpki, which rustls runs on
//!   its own certificate, refuses unknown critical extensions): its
//!   `extnValue` is the DER `OCTET STRING` of the postcard-encoded
//!   `Vec<Certificate>`, leaf first.
//!
//! `openssl x509 -noout -text` reads it; the extension shows as an unknown
//! OID with its bytes.

use junction_identity::{Certificate, PublicKey, Role, SecretKey};
use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, PKCS_ED25519, SerialNumber,
};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::OID_SIG_ED25519;
use x509_parser::prelude::FromDer;

use crate::HighwayError;

/// The OID of the extension that carries the bus chain:
/// `1.3.6.1.4.1.99999.1.1`, under a placeholder private-enterprise arc
/// (99999) until the project registers its own; `.1` = Junction, `.1` =
/// bus certificate chain, version 1.
pub const BUS_CHAIN_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 99999, 1, 1];

/// [`BUS_CHAIN_OID`] in dotted form, as openssl prints it.
pub const BUS_CHAIN_OID_STR: &str = "1.3.6.1.4.1.99999.1.1";

/// The TLS server name of junction `id`: `junction-<id>`. A dialer connects
/// with it, and the server's certificate must be junction `id`'s.
pub fn server_name(id: u16) -> String {
    format!("junction-{id}")
}

/// The junction id a server name `junction-<id>` names, if it is one.
pub fn junction_of_server_name(name: &str) -> Option<u16> {
    let digits = name.strip_prefix("junction-")?;
    // No sign, no leading zeros: one spelling per id.
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

/// A junction's TLS identity: its X.509 certificate (with the bus chain in
/// it) and the key that signs its handshakes.
pub struct TlsIdentity {
    id: u16,
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsIdentity(junction {}, key redacted)", self.id)
    }
}

impl TlsIdentity {
    /// The TLS identity of the junction whose bus key is `key` and whose bus
    /// certificate chain (leaf first) is `chain`. The leaf must be a junction
    /// certificate for `key`. The chain is not checked against a trust
    /// store here: peers check it.
    pub fn new(key: &SecretKey, chain: &[Certificate]) -> Result<Self, HighwayError> {
        let leaf = chain.first().ok_or(HighwayError::NoChain)?;
        let Role::Junction { id } = leaf.body.role else {
            return Err(HighwayError::NotAJunctionCertificate {
                role: leaf.body.role.to_string(),
            });
        };
        if leaf.body.subject != key.public() {
            return Err(HighwayError::ChainForAnotherKey {
                certified: leaf.body.subject,
                key: key.public(),
            });
        }
        Self::build(key, Some(chain), id)
    }

    /// A certificate signed by `key` carrying `chain` (if any) for server
    /// name `junction-<id>`, with none of [`Self::new`]'s checks: the rogue
    /// peers of tests (no chain, another key's chain, a service's chain).
    /// Peers refuse what it makes unless [`Self::new`] would have made it.
    pub fn danger_unchecked(
        key: &SecretKey,
        chain: Option<&[Certificate]>,
        id: u16,
    ) -> Result<Self, HighwayError> {
        Self::build(key, chain, id)
    }

    /// What [`Self::new`] and [`Self::danger_unchecked`] make.
    fn build(
        key: &SecretKey,
        chain: Option<&[Certificate]>,
        id: u16,
    ) -> Result<Self, HighwayError> {
        let pkcs8 = key.to_pkcs8_der()?;
        let signer = RcgenKey::new(&pkcs8)?;
        let mut params = CertificateParams::new(vec![server_name(id)])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, server_name(id));
        params.distinguished_name = dn;
        // The serial: the bus leaf's, else the key's first bytes; positive.
        let serial = chain
            .and_then(|c| c.first())
            .map(|leaf| leaf.body.serial.to_be_bytes())
            .unwrap_or_else(|| {
                let mut s = [0u8; 8];
                s.copy_from_slice(&key.public().0[..8]);
                s
            });
        let mut serial_bytes = vec![0u8];
        serial_bytes.extend_from_slice(&serial);
        params.serial_number = Some(SerialNumber::from_slice(&serial_bytes));
        if let Some(leaf) = chain.and_then(|c| c.first()) {
            let (y, m, d) = day_of(leaf.body.not_before, false);
            params.not_before = rcgen::date_time_ymd(y, m, d);
            let (y, m, d) = day_of(leaf.body.not_after, true);
            params.not_after = rcgen::date_time_ymd(y, m, d);
        }
        if let Some(chain) = chain {
            let bytes =
                postcard::to_allocvec(chain).map_err(|e| HighwayError::Encoding(e.to_string()))?;
            params
                .custom_extensions
                .push(CustomExtension::from_oid_content(
                    BUS_CHAIN_OID,
                    der_octet_string(&bytes),
                ));
        }
        let cert = params.self_signed(&signer)?;
        Ok(Self {
            id,
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(pkcs8.to_vec()),
        })
    }

    /// The junction id the certificate is for.
    pub fn junction(&self) -> u16 {
        self.id
    }

    /// The X.509 certificate, DER.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The X.509 certificate as PEM (`-----BEGIN CERTIFICATE-----`), for
    /// `openssl x509 -text` and people.
    pub fn certificate_pem(&self) -> String {
        pem_rfc7468::encode_string("CERTIFICATE", pem_rfc7468::LineEnding::LF, &self.cert)
            .unwrap_or_default()
    }

    /// The certificate chain and key, as rustls takes them.
    pub(crate) fn rustls_parts(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            vec![self.cert.clone()],
            PrivateKeyDer::Pkcs8(self.key.clone_key()),
        )
    }
}

/// The bus key seen by rcgen: ring signs with it (from its PKCS#8 form), as
/// rustls does for handshakes.
struct RcgenKey {
    pair: Ed25519KeyPair,
}

impl RcgenKey {
    fn new(pkcs8: &[u8]) -> Result<Self, HighwayError> {
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map(|pair| Self { pair })
            .map_err(|e| HighwayError::Encoding(format!("ring refuses the key: {e}")))
    }
}

impl rcgen::PublicKeyData for RcgenKey {
    fn der_bytes(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &PKCS_ED25519
    }
}

impl rcgen::SigningKey for RcgenKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        Ok(self.pair.sign(msg).as_ref().to_vec())
    }
}

/// What a peer's X.509 certificate says, once it is known to be a
/// well-formed, self-signed ed25519 certificate.
#[derive(Debug)]
pub(crate) struct PeerCert {
    /// Its subject public key: the key that signs the peer's handshake.
    pub(crate) key: PublicKey,
    /// The bus chain its extension carries, if it has the extension.
    pub(crate) chain: Option<Vec<Certificate>>,
}

/// Why a peer's X.509 certificate is not even a candidate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum X509Refused {
    #[error("its certificate is not X.509 DER: {0}")]
    Malformed(String),
    #[error("its certificate's key is not ed25519")]
    NotEd25519,
    #[error("its certificate is not self-signed by its own ed25519 key")]
    BadSelfSignature,
    #[error("its certificate's bus chain extension is critical; it must not be")]
    CriticalExtension,
    #[error("its certificate's bus chain extension does not decode: {0}")]
    BadChain(String),
}

/// Parses a peer's certificate: DER, ed25519 key and signature, signed by
/// its own key; and decodes the bus chain extension if there is one.
pub(crate) fn parse_peer(der: &[u8]) -> Result<PeerCert, X509Refused> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| X509Refused::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(X509Refused::Malformed(format!(
            "{} bytes after the certificate",
            rest.len()
        )));
    }
    let spki = cert.public_key();
    if spki.algorithm.algorithm != OID_SIG_ED25519
        || cert.signature_algorithm.algorithm != OID_SIG_ED25519
        || cert.tbs_certificate.signature.algorithm != OID_SIG_ED25519
    {
        return Err(X509Refused::NotEd25519);
    }
    let raw_key: [u8; 32] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| X509Refused::NotEd25519)?;
    UnparsedPublicKey::new(&ED25519, raw_key)
        .verify(
            cert.tbs_certificate.as_ref(),
            cert.signature_value.data.as_ref(),
        )
        .map_err(|_| X509Refused::BadSelfSignature)?;
    let mut chain = None;
    for ext in cert.extensions() {
        if ext.oid.to_id_string() != BUS_CHAIN_OID_STR {
            continue;
        }
        if ext.critical {
            return Err(X509Refused::CriticalExtension);
        }
        let bytes = der_octet_string_content(ext.value)
            .ok_or_else(|| X509Refused::BadChain("not a DER OCTET STRING".into()))?;
        let certs: Vec<Certificate> =
            postcard::from_bytes(bytes).map_err(|e| X509Refused::BadChain(e.to_string()))?;
        chain = Some(certs);
    }
    Ok(PeerCert {
        key: PublicKey(raw_key),
        chain,
    })
}

/// `bytes` as a DER OCTET STRING.
fn der_octet_string(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![0x04];
    let len = bytes.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let be = len.to_be_bytes();
        let skip = be.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (be.len() - skip) as u8);
        out.extend_from_slice(&be[skip..]);
    }
    out.extend_from_slice(bytes);
    out
}

/// The content of a DER OCTET STRING that is the whole of `der`.
fn der_octet_string_content(der: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x04 {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > std::mem::size_of::<usize>() || rest.len() < n {
            return None;
        }
        let (len_bytes, rest) = rest.split_at(n);
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    (rest.len() == len).then_some(rest)
}

/// The calendar day (UTC) of `secs` (seconds since the Unix epoch), the next
/// day when `up` and `secs` is not midnight; clamped to 1970..=9999, what an
/// X.509 date holds and a bus certificate means ("forever" is `u64::MAX`).
pub(crate) fn day_of(secs: u64, up: bool) -> (i32, u8, u8) {
    let days = secs / 86_400 + u64::from(up && !secs.is_multiple_of(86_400));
    // 9999-12-31 is day 2_932_896 after 1970-01-01.
    let days = days.min(2_932_896) as i64;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}
