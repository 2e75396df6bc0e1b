//! Why the core refuses a request: one enum for every refusal, each variant
//! naming what was wrong and what to do, mapped onto the wire's
//! [`ErrorCode`] for programs and its message for people.

use junction_identity::{IdentityError, ServiceName};
use junction_road::frame::MAX_CAPS_PER_MESSAGE;
use junction_road::{ErrorCode, Rights};

/// A request the core turned down. The connection lives on unless the
/// variant says it closes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The first frame was not a good `Hello`. Closes the connection.
    #[error("expected a Hello frame with magic JNCT first, got {got}")]
    HandshakeRequired {
        /// The frame that came instead.
        got: &'static str,
    },
    /// The whole `Hello` did not arrive in time. Closes the connection.
    #[error("no complete Hello frame within {timeout:?} of connecting")]
    HelloTimeout {
        /// The configured deadline.
        timeout: std::time::Duration,
    },
    /// The driver speaks another protocol version. Closes the connection.
    #[error(
        "protocol version {version} is not supported; this junction speaks version {}",
        junction_road::PROTOCOL_VERSION
    )]
    UnsupportedVersion {
        /// The version the driver asked for.
        version: u16,
    },
    /// A frame only the junction sends.
    #[error("a driver may not send {frame}; see docs/protocol.md for the frames a driver sends")]
    UnexpectedFrame {
        /// The frame's name.
        frame: &'static str,
    },
    /// The handle names nothing in this connection's table.
    #[error("handle {handle} is not in this connection's capability table")]
    UnknownHandle {
        /// The handle.
        handle: u32,
    },
    /// A capability in a message's list names nothing in the table.
    #[error("handle {handle} in the message's capability list is not in this connection's table")]
    UnknownAttachment {
        /// The handle.
        handle: u32,
    },
    /// The connection owns no such open port.
    #[error("this connection owns no open port {port}")]
    UnknownPort {
        /// The port number.
        port: u16,
    },
    /// The home port lives as long as its connection.
    #[error("port {port} is this connection's home port; it closes with the connection")]
    HomePort {
        /// The port number.
        port: u16,
    },
    /// A capability without `grant` cannot travel.
    #[error(
        "capability {handle} has rights {rights} without grant, so it cannot be passed on; nothing was sent"
    )]
    NotGrantable {
        /// The handle.
        handle: u32,
        /// Its rights.
        rights: Rights,
    },
    /// Not a valid set of rights.
    #[error(
        "rights {rights} are not a valid set: give exactly one of send and send-once, optionally with grant"
    )]
    BadRights {
        /// The rights asked for.
        rights: Rights,
    },
    /// The handle's credit does not cover the message.
    #[error(
        "handle {handle} has less than the {cost} send credits this message costs; wait for SendCredit before sending again"
    )]
    NoCredit {
        /// The handle.
        handle: u32,
        /// What the message costs.
        cost: u32,
    },
    /// The connection's capability table is full.
    #[error("this connection holds {limit} capability handles, the limit; drop some first")]
    TooManyHandles {
        /// The limit.
        limit: u32,
    },
    /// The receiver's capability table cannot take what the message carries.
    #[error("the receiver's capability table is full; nothing was sent")]
    ReceiverFull,
    /// The connection owns as many ports as it may.
    #[error("this connection owns {limit} ports already, the limit; close one first")]
    TooManyPorts {
        /// The limit.
        limit: u32,
    },
    /// Every port number of the junction is taken. Closes a connection
    /// that is still shaking hands.
    #[error("the junction has no free port numbers; try again later")]
    NoFreePort,
    /// The connection has as many calls waiting as it may.
    #[error(
        "this connection has {limit} calls waiting for replies, the limit; read replies before calling again"
    )]
    TooManyPendingCalls {
        /// The limit.
        limit: u32,
    },
    /// More capabilities than a message may carry.
    #[error("a message carries at most {MAX_CAPS_PER_MESSAGE} capabilities; this one had {count}")]
    TooManyAttachments {
        /// How many it had.
        count: usize,
    },
    /// A capability listed twice, or the one the message is sent on.
    #[error("capability {handle} appears twice in the message or is the one it is sent on")]
    RepeatedAttachment {
        /// The handle.
        handle: u32,
    },
    /// A call's tag must not be 0.
    #[error("a call's tag must not be 0")]
    BadTag,
    /// A call's tag names another call still waiting for its reply.
    #[error(
        "tag {tag} names a call of this connection still waiting for its reply; give each call a fresh tag"
    )]
    TagInUse {
        /// The tag.
        tag: u64,
    },
    /// A reply capability answers a call with `Send`; it cannot make one.
    #[error(
        "handle {handle} is a reply capability: answer the call with Send, not Call; the call it answers has failed"
    )]
    CallOnReply {
        /// The reply capability.
        handle: u32,
    },
    /// The control port answers calls only.
    #[error("the control port answers calls only; use Call, not Send")]
    ControlSend,
    /// The control request did not decode.
    #[error("the control request did not decode: {reason}")]
    BadControlRequest {
        /// What the decoder said.
        reason: String,
    },
    /// A `Reload` came with no answer from the shell, which alone reads
    /// files (a core driven without one).
    #[error("this junction does not reload over its control port; send it SIGHUP")]
    ReloadUnavailable,
    /// Attenuation may only narrow.
    #[error("{what}")]
    CannotWiden {
        /// What would have widened.
        what: String,
    },
    /// Only the revocable root of a lineage can revoke it.
    #[error(
        "handle {handle} is not a revocable capability this connection made (use Attenuate with revocable)"
    )]
    NotRevocable {
        /// The handle.
        handle: u32,
    },
    /// An attenuation would nest more lineages or budgets than one
    /// capability may carry.
    #[error(
        "a capability carries at most {limit} revocable lineages and {limit} message budgets; attenuate from a capability nearer the original instead"
    )]
    NestedTooDeep {
        /// The limit on each.
        limit: usize,
    },
    /// The connection holds as many names as it may.
    #[error(
        "this connection has registered {limit} names, the limit; unregister one (or close its port) first"
    )]
    TooManyNames {
        /// The limit.
        limit: u32,
    },
    /// Registration needs exactly one capability, with send and grant, to
    /// a port the connection owns.
    #[error("{what}")]
    BadRegistration {
        /// What was wrong.
        what: String,
    },
    /// The name is neither granted by the proven identity nor in the
    /// development namespace.
    #[error("{what}")]
    NameNotGranted {
        /// What was wrong.
        what: String,
    },
    /// Someone else holds the name.
    #[error("{name} is already registered, by port {by}")]
    NameTaken {
        /// The name.
        name: ServiceName,
        /// The port holding it.
        by: junction_road::Address,
    },
    /// No such registration.
    #[error("{what}")]
    NameNotFound {
        /// What was looked for.
        what: String,
    },
    /// An identity proven once per connection.
    #[error("this connection has proven an identity already; connect again to use another")]
    AlreadyAuthenticated,
    /// The connection's one attempt to prove an identity failed: each
    /// attempt costs signature checks, so a connection gets one.
    #[error(
        "this connection's attempt to authenticate failed already, and a connection gets one attempt; connect again to try another chain or key"
    )]
    AuthenticationSpent,
    /// The chain is larger than a proven chain may be, or says nothing a
    /// trusted authority signed; refused before any signature is checked.
    #[error("the certificate chain is not usable: {what}")]
    BadChain {
        /// What was wrong.
        what: String,
    },
    /// The chain or proof did not hold.
    #[error("{0}")]
    Identity(IdentityError),
    /// The identity would not fit on a delivery.
    #[error(
        "the certificate grants {names} names ({bytes} bytes); at most {limit} bytes of names fit on a delivery"
    )]
    IdentityTooLarge {
        /// Names granted.
        names: usize,
        /// Their encoded size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// A capability in the message cannot travel to the junction the
    /// message goes to.
    #[error("handle {handle} cannot go to another junction: {why}")]
    CannotCross {
        /// The handle.
        handle: u32,
        /// Why not.
        why: String,
    },
    /// A `Monitor` request was turned down.
    #[error("cannot monitor: {why}")]
    MonitorRefused {
        /// Why, and what would be allowed.
        why: String,
    },
}

impl Refusal {
    /// The code programs match on.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::HandshakeRequired { .. } | Self::HelloTimeout { .. } => {
                ErrorCode::HandshakeRequired
            }
            Self::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            Self::UnexpectedFrame { .. } | Self::CallOnReply { .. } => ErrorCode::UnexpectedFrame,
            Self::UnknownHandle { .. } | Self::UnknownAttachment { .. } => ErrorCode::UnknownHandle,
            Self::UnknownPort { .. } | Self::HomePort { .. } => ErrorCode::UnknownPort,
            Self::NotGrantable { .. } | Self::CannotCross { .. } => ErrorCode::MissingRight,
            Self::BadRights { .. } => ErrorCode::BadRights,
            Self::NoCredit { .. } => ErrorCode::NoCredit,
            Self::TooManyHandles { .. } | Self::ReceiverFull => ErrorCode::TooManyHandles,
            Self::TooManyPorts { .. } | Self::NoFreePort => ErrorCode::TooManyPorts,
            Self::TooManyPendingCalls { .. } => ErrorCode::TooManyPendingCalls,
            Self::TooManyAttachments { .. } | Self::RepeatedAttachment { .. } => {
                ErrorCode::BadCapabilityList
            }
            Self::BadTag | Self::TagInUse { .. } => ErrorCode::BadTag,
            Self::ControlSend | Self::BadControlRequest { .. } => ErrorCode::BadControlRequest,
            Self::ReloadUnavailable => ErrorCode::NotAllowed,
            Self::CannotWiden { .. } => ErrorCode::CannotWiden,
            Self::NotRevocable { .. } => ErrorCode::NotRevocable,
            Self::NestedTooDeep { .. } => ErrorCode::CannotWiden,
            Self::TooManyNames { .. } => ErrorCode::BadRegistration,
            Self::AuthenticationSpent => ErrorCode::AlreadyAuthenticated,
            Self::BadChain { .. } => ErrorCode::BadCertificate,
            Self::BadRegistration { .. } => ErrorCode::BadRegistration,
            Self::NameNotGranted { .. } => ErrorCode::NameNotGranted,
            Self::NameTaken { .. } => ErrorCode::NameTaken,
            Self::NameNotFound { .. } => ErrorCode::NameNotFound,
            Self::AlreadyAuthenticated => ErrorCode::AlreadyAuthenticated,
            Self::Identity(e) => match e {
                IdentityError::Revoked { .. } => ErrorCode::CertificateRevoked,
                IdentityError::BadProof => ErrorCode::BadProof,
                _ => ErrorCode::BadCertificate,
            },
            Self::IdentityTooLarge { .. } => ErrorCode::BadCertificate,
            Self::MonitorRefused { .. } => ErrorCode::NotAllowed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_names_its_code_and_says_what_to_do() {
        let cases = [
            (
                Refusal::NoCredit { handle: 3, cost: 2 },
                ErrorCode::NoCredit,
                "wait for SendCredit",
            ),
            (
                Refusal::TooManyHandles { limit: 8 },
                ErrorCode::TooManyHandles,
                "drop some first",
            ),
            (
                Refusal::ReceiverFull,
                ErrorCode::TooManyHandles,
                "nothing was sent",
            ),
            (
                Refusal::HomePort { port: 4 },
                ErrorCode::UnknownPort,
                "closes with the connection",
            ),
            (
                Refusal::RepeatedAttachment { handle: 1 },
                ErrorCode::BadCapabilityList,
                "appears twice",
            ),
            (
                Refusal::NestedTooDeep { limit: 8 },
                ErrorCode::CannotWiden,
                "nearer the original",
            ),
            (
                Refusal::TooManyNames { limit: 64 },
                ErrorCode::BadRegistration,
                "unregister one",
            ),
            (
                Refusal::AuthenticationSpent,
                ErrorCode::AlreadyAuthenticated,
                "connect again",
            ),
            (
                Refusal::UnsupportedVersion { version: 9 },
                ErrorCode::UnsupportedVersion,
                "version 9 is not supported",
            ),
        ];
        for (refusal, code, says) in cases {
            assert_eq!(refusal.code(), code, "{refusal:?}");
            assert!(refusal.to_string().contains(says), "{refusal}");
        }
    }
}
