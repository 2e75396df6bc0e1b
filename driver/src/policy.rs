//! A small helper for services that decide per message from the sender's
//! proven identity.

use junction_identity::{NamePattern, PublicKey};
use junction_road::Identity;

use crate::{Error, Message};

/// Who may ask: senders whose proven certificate grants a name matching one
/// of the patterns, or whose key is listed. Anonymous senders are refused
/// unless allowed.
///
/// ```
/// use junction_driver::Policy;
/// let policy = Policy::new().allow_names("org.acme.*").unwrap();
/// ```
#[derive(Debug, Clone, Default)]
pub struct Policy {
    names: Vec<NamePattern>,
    keys: Vec<PublicKey>,
    anonymous: bool,
}

impl Policy {
    /// Allows nobody.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also allows senders granted a name matching `pattern` (`org.acme.*`).
    pub fn allow_names(mut self, pattern: &str) -> Result<Self, Error> {
        self.names.push(pattern.parse()?);
        Ok(self)
    }

    /// Also allows the sender that proved `key`.
    pub fn allow_key(mut self, key: PublicKey) -> Self {
        self.keys.push(key);
        self
    }

    /// Also allows senders that proved no identity.
    pub fn allow_anonymous(mut self) -> Self {
        self.anonymous = true;
        self
    }

    /// Whether `message`'s sender may be served; the proven identity when
    /// there is one.
    pub fn check<'m>(&self, message: &'m Message) -> Result<Option<&'m Identity>, Error> {
        match message.identity.as_deref() {
            Some(id)
                if self.keys.contains(&id.key)
                    || id
                        .names
                        .iter()
                        .any(|n| self.names.iter().any(|p| p.matches(n))) =>
            {
                Ok(Some(id))
            }
            None if self.anonymous => Ok(None),
            Some(id) => Err(Error::Denied(format!(
                "sender {} (names: {}) is not allowed here",
                id.key,
                id.names
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            None => Err(Error::Denied(format!(
                "sender {} proved no identity, and anonymous senders are not allowed here",
                message.origin
            ))),
        }
    }
}
