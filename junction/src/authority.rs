//! A bus authority made on the spot, for the demo, the benchmark and tests:
//! the same certificates `junction keygen` and `junction cert issue` make,
//! without the files in between.

use std::path::{Path, PathBuf};

use junction_identity::{CertBody, Certificate, IdentityError, Role, SecretKey, TrustStore};

/// An authority key with its self-issued certificate.
#[derive(Debug)]
pub struct LocalAuthority {
    key: SecretKey,
    certificate: Certificate,
    not_before: u64,
    not_after: u64,
}

impl LocalAuthority {
    /// A new authority whose certificates are valid for a day from a minute ago.
    pub fn new() -> Result<Self, IdentityError> {
        let now = crate::unix_now();
        let (not_before, not_after) = (now.saturating_sub(60), now + 86_400);
        let key = SecretKey::generate()?;
        let certificate = Certificate::authority(&key, 1, not_before, not_after)?;
        Ok(Self {
            key,
            certificate,
            not_before,
            not_after,
        })
    }

    /// The authority's public key.
    pub fn public(&self) -> junction_identity::PublicKey {
        self.key.public()
    }

    /// Its self-issued certificate.
    pub fn certificate(&self) -> &Certificate {
        &self.certificate
    }

    /// A trust store trusting exactly this authority.
    pub fn trust(&self) -> TrustStore {
        let mut trust = TrustStore::new();
        trust
            .add_authority(&self.certificate)
            .expect("its own certificate is valid");
        trust
    }

    /// A new key and its chain (the new certificate, then the authority's).
    pub fn issue(
        &self,
        serial: u64,
        role: Role,
    ) -> Result<(SecretKey, Vec<Certificate>), IdentityError> {
        let key = SecretKey::generate()?;
        let cert = Certificate::issue(
            CertBody {
                version: 1,
                serial,
                subject: key.public(),
                role,
                not_before: self.not_before,
                not_after: self.not_after,
                issuer: self.key.public(),
            },
            &self.key,
        )?;
        Ok((key, vec![cert, self.certificate.clone()]))
    }

    /// As [`LocalAuthority::issue`], written to `NAME.key` and `NAME.cert`
    /// in `dir`; returns their paths.
    pub fn issue_files(
        &self,
        dir: &Path,
        name: &str,
        serial: u64,
        role: Role,
    ) -> std::io::Result<(PathBuf, PathBuf)> {
        let (key, chain) = self.issue(serial, role).map_err(std::io::Error::other)?;
        let (key_path, cert_path) = (
            dir.join(format!("{name}.key")),
            dir.join(format!("{name}.cert")),
        );
        let pem = key.to_pem().map_err(std::io::Error::other)?;
        std::fs::write(&key_path, pem.as_str())?;
        std::fs::write(
            &cert_path,
            chain.iter().map(Certificate::to_pem).collect::<String>(),
        )?;
        Ok((key_path, cert_path))
    }

    /// Writes the authority's certificate to `authority.cert` in `dir`.
    pub fn write_certificate(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join("authority.cert");
        std::fs::write(&path, self.certificate.to_pem())?;
        Ok(path)
    }
}
