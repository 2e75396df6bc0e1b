//! Service names: the dotted, lower-case names services register under.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest name the bus accepts, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// A valid service name, such as `org.acme.echo`.
///
/// One or more labels separated by dots; each label is 1 to 63 characters of
/// `a-z`, `0-9`, `-` and `_`, and starts with a letter or digit. The whole name
/// is at most 255 bytes. A `ServiceName` can only be built through
/// [`ServiceName::new`] (or `TryFrom`/`FromStr`), so holding one means it is
/// valid.
///
/// ```
/// use junction_identity::ServiceName;
/// assert!(ServiceName::new("org.acme.echo").is_ok());
/// assert!(ServiceName::new("echo").is_ok());
/// assert!(ServiceName::new("").is_err());
/// assert!(ServiceName::new("Org.Acme").is_err());
/// assert!(ServiceName::new("org..acme").is_err());
/// assert!(ServiceName::new("org.acme.").is_err());
/// assert!(ServiceName::new("-org").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ServiceName(String);

/// Why a string is not a valid [`ServiceName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name was empty.
    #[error("a service name cannot be empty")]
    Empty,
    /// The name was longer than [`MAX_NAME_LEN`].
    #[error("service name is {len} bytes long; the limit is {MAX_NAME_LEN}")]
    TooLong {
        /// The length that was given.
        len: usize,
    },
    /// Two dots in a row, or a dot at either end.
    #[error(
        "service name {name:?} has an empty label (check for doubled, leading or trailing dots)"
    )]
    EmptyLabel {
        /// The rejected name.
        name: String,
    },
    /// A label longer than 63 characters.
    #[error("a label of service name {name:?} is longer than 63 characters")]
    LabelTooLong {
        /// The rejected name.
        name: String,
    },
    /// A character outside `a-z 0-9 - _ .`.
    #[error(
        "service name {name:?} contains {found:?}; use lower-case letters, digits, '-', '_' and '.'"
    )]
    BadCharacter {
        /// The rejected name.
        name: String,
        /// The first character that is not allowed.
        found: char,
    },
    /// A label that starts with `-` or `_`.
    #[error(
        "a label of service name {name:?} starts with '-' or '_'; labels start with a letter or digit"
    )]
    BadLabelStart {
        /// The rejected name.
        name: String,
    },
}

impl ServiceName {
    /// Checks `name` and wraps it.
    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        validate(&name)?;
        Ok(Self(name))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn validate(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { len: name.len() });
    }
    if let Some(found) = name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-' | '_' | '.'))
    {
        return Err(NameError::BadCharacter {
            name: name.to_owned(),
            found,
        });
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(NameError::EmptyLabel {
                name: name.to_owned(),
            });
        }
        if label.len() > 63 {
            return Err(NameError::LabelTooLong {
                name: name.to_owned(),
            });
        }
        if label.starts_with(['-', '_']) {
            return Err(NameError::BadLabelStart {
                name: name.to_owned(),
            });
        }
    }
    Ok(())
}

impl TryFrom<String> for ServiceName {
    type Error = NameError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl TryFrom<&str> for ServiceName {
    type Error = NameError;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl std::str::FromStr for ServiceName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> Deserialize<'de> for ServiceName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceName({:?})", self.0)
    }
}

impl AsRef<str> for ServiceName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A pattern of service names, as granted to an intermediate: an exact
/// name (`org.acme.echo`), every name under a prefix (`org.acme.*` matches
/// `org.acme.echo` and `org.acme.db.main`, not `org.acme` itself), or every
/// name (`*`).
///
/// ```
/// use junction_identity::{NamePattern, ServiceName};
/// let p: NamePattern = "org.acme.*".parse().unwrap();
/// assert!(p.matches(&"org.acme.echo".parse().unwrap()));
/// assert!(!p.matches(&"org.acmex.echo".parse().unwrap()));
/// assert!(!p.matches(&"org.acme".parse().unwrap()));
/// assert!(p.covers(&"org.acme.db.*".parse().unwrap()));
/// assert!(!p.covers(&"org.*".parse().unwrap()));
/// assert!("org.*.x".parse::<NamePattern>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct NamePattern(String);

impl NamePattern {
    /// Checks and wraps a pattern.
    pub fn new(pattern: impl Into<String>) -> Result<Self, NameError> {
        let pattern = pattern.into();
        if pattern != "*" {
            let base = pattern.strip_suffix(".*").unwrap_or(&pattern);
            validate(base)?;
        }
        Ok(Self(pattern))
    }

    /// The pattern as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` is one of the names this pattern stands for.
    pub fn matches(&self, name: &ServiceName) -> bool {
        match self.prefix() {
            None if self.0 == "*" => true,
            None => self.0 == name.as_str(),
            Some(prefix) => name
                .as_str()
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('.') && rest.len() > 1),
        }
    }

    /// Whether every name `other` stands for is one this pattern stands for.
    pub fn covers(&self, other: &NamePattern) -> bool {
        if self.0 == "*" {
            return true;
        }
        match (self.prefix(), other.prefix()) {
            (_, None) if other.0 == "*" => false,
            (_, None) => ServiceName::new(other.0.clone()).is_ok_and(|n| self.matches(&n)),
            (None, Some(_)) => false,
            (Some(mine), Some(theirs)) => {
                theirs == mine
                    || theirs
                        .strip_prefix(mine)
                        .is_some_and(|rest| rest.starts_with('.'))
            }
        }
    }

    fn prefix(&self) -> Option<&str> {
        self.0.strip_suffix(".*")
    }
}

impl std::str::FromStr for NamePattern {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> Deserialize<'de> for NamePattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NamePattern({:?})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn deserialize_rejects_invalid_names() {
        let bytes = postcard::to_allocvec(&"Bad Name").unwrap();
        assert!(postcard::from_bytes::<ServiceName>(&bytes).is_err());
        let bytes = postcard::to_allocvec(&"good.name").unwrap();
        let name: ServiceName = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(name.as_str(), "good.name");
    }

    #[test]
    fn errors_name_the_problem() {
        let err = ServiceName::new("org.Acme").unwrap_err();
        assert_eq!(
            err,
            NameError::BadCharacter {
                name: "org.Acme".into(),
                found: 'A'
            }
        );
        assert!(err.to_string().contains("'A'"));
        assert!(matches!(
            ServiceName::new("a".repeat(300)),
            Err(NameError::TooLong { len: 300 })
        ));
        assert!(matches!(
            ServiceName::new("a".repeat(64)),
            Err(NameError::LabelTooLong { .. })
        ));
    }

    proptest! {
        #[test]
        fn any_string_is_accepted_or_refused_without_panic(s in ".{0,300}") {
            let _ = ServiceName::new(s);
        }

        #[test]
        fn valid_shapes_are_accepted(labels in proptest::collection::vec("[a-z0-9][a-z0-9_-]{0,20}", 1..6)) {
            let name = labels.join(".");
            let parsed = ServiceName::new(name.clone()).unwrap();
            prop_assert_eq!(parsed.as_str(), name.as_str());
        }
    }
}
