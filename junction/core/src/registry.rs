//! The name registry: which port each service name reaches, with what
//! rights, and the certificate chain its registrant proved.

use std::collections::HashMap;
use std::sync::Arc;

use junction_identity::{Certificate, ServiceName, Signature};
use junction_road::Rights;

use crate::slab::Key;

/// A name's registration.
#[derive(Debug, Clone)]
pub(crate) struct Registration {
    pub(crate) port: Key,
    pub(crate) rights: Rights,
    /// The chain the registrant proved; `None` in the development namespace.
    pub(crate) chain: Option<Arc<Vec<Certificate>>>,
    /// With the chain: the nonce and the registrant's proof of possession
    /// over it, which other junctions check (docs/protocol.md 16.3).
    pub(crate) proof: Option<([u8; 32], Signature)>,
}

/// Every registered name. A name is held by one port at a time; it dies
/// with its port or its registrant's identity.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    names: HashMap<ServiceName, Registration>,
}

impl Registry {
    pub(crate) fn get(&self, name: &ServiceName) -> Option<&Registration> {
        self.names.get(name)
    }

    /// Registers `name`; the registration already there, if any, stays and
    /// is returned as the refusal.
    pub(crate) fn insert(
        &mut self,
        name: ServiceName,
        registration: Registration,
    ) -> Result<(), &Registration> {
        match self.names.entry(name) {
            std::collections::hash_map::Entry::Occupied(taken) => Err(taken.into_mut()),
            std::collections::hash_map::Entry::Vacant(free) => {
                free.insert(registration);
                Ok(())
            }
        }
    }

    pub(crate) fn remove(&mut self, name: &ServiceName) -> Option<Registration> {
        self.names.remove(name)
    }

    /// Every name and its registration.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&ServiceName, &Registration)> {
        self.names.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_name_stays_with_its_holder() {
        let mut registry = Registry::default();
        let name: ServiceName = "org.acme.echo".parse().unwrap();
        let first = Registration {
            port: Key {
                index: 1,
                generation: 0,
            },
            rights: Rights::SEND | Rights::GRANT,
            chain: None,
            proof: None,
        };
        let second = Registration {
            port: Key {
                index: 2,
                generation: 0,
            },
            ..first.clone()
        };
        registry.insert(name.clone(), first).unwrap();
        let held = registry.insert(name.clone(), second).unwrap_err();
        assert_eq!(held.port.index, 1);
        assert_eq!(registry.get(&name).unwrap().port.index, 1);
        assert!(registry.remove(&name).is_some());
        assert!(registry.get(&name).is_none());
    }
}
