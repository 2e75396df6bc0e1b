//! Port addresses: `J.P`, a 16-bit junction id and a 16-bit port number.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The address of a port: the junction that owns it and its number there.
///
/// Addresses are for diagnostics and routing; they grant nothing. Only a
/// capability lets a process send to a port. An address prints as `J.P` in
/// decimal.
///
/// ```
/// use junction_road::Address;
/// let a: Address = "12.7".parse().unwrap();
/// assert_eq!(a, Address::new(12, 7));
/// assert_eq!(a.to_string(), "12.7");
/// assert!("12".parse::<Address>().is_err());
/// assert!("12.70000".parse::<Address>().is_err());
/// assert!("x.1".parse::<Address>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Address {
    /// The junction id; 0 means "this junction".
    pub junction: u16,
    /// The port number on that junction; 0 is its control port.
    pub port: u16,
}

impl Address {
    /// The address of `port` on `junction`.
    pub const fn new(junction: u16, port: u16) -> Self {
        Self { junction, port }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.junction, self.port)
    }
}

/// Why a string is not a `J.P` address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not a port address; expected J.P with two numbers from 0 to 65535, like 12.7"
)]
pub struct AddressError {
    /// The rejected text.
    pub input: String,
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || AddressError {
            input: s.to_owned(),
        };
        let (j, p) = s.split_once('.').ok_or_else(err)?;
        let number = |t: &str| {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            t.parse::<u16>().ok()
        };
        Ok(Self::new(
            number(j).ok_or_else(err)?,
            number(p).ok_or_else(err)?,
        ))
    }
}
