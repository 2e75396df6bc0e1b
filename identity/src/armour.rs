//! PEM-style armour for certificates and revocation lists.

use pem_rfc7468::LineEnding;

use crate::IdentityError;

/// Armours `bytes` under `label`.
pub(crate) fn encode(label: &str, bytes: &[u8]) -> String {
    pem_rfc7468::encode_string(label, LineEnding::LF, bytes).expect("labels are valid PEM labels")
}

/// Every block labelled `label` in `text`, decoded; other text between
/// blocks (comments) is ignored.
pub(crate) fn decode_all(label: &str, text: &str) -> Result<Vec<Vec<u8>>, IdentityError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&begin) {
        let after = &rest[start..];
        let stop = after.find(&end).ok_or_else(|| {
            IdentityError::CertificateFormat(format!("a {label} block has no END line"))
        })? + end.len();
        let (_, bytes) = pem_rfc7468::decode_vec(&after.as_bytes()[..stop])
            .map_err(|e| IdentityError::CertificateFormat(format!("bad {label} armour: {e}")))?;
        blocks.push(bytes);
        rest = &after[stop..];
    }
    Ok(blocks)
}
