//! The Junction Driver: how a process attaches to its Junction.
//!
//! ```no_run
//! # async fn demo() -> Result<(), junction_driver::Error> {
//! use std::time::Duration;
//! use junction_driver::{Driver, Rights};
//!
//! // A service: open a port, register a name for it, answer calls.
//! let service = Driver::connect_default().await?;
//! let mut port = service.open_port().await?;
//! let cap = port.mint(Rights::SEND | Rights::GRANT).await?;
//! service.register("org.example.echo", &cap).await?;
//! tokio::spawn(async move {
//!     while let Ok(msg) = port.recv().await {
//!         let payload = msg.payload.clone();
//!         let _ = msg.reply(payload);
//!     }
//! });
//!
//! // A client: look the name up, call it.
//! let client = Driver::connect_default().await?;
//! let echo = client.lookup("org.example.echo").await?;
//! let answer = client.call(&echo, "hello", Duration::from_secs(5)).await?;
//! assert_eq!(&answer.payload[..], b"hello");
//! # Ok(()) }
//! ```
//!
//! A [`Driver`] is a cheap handle to one connection (clone it freely). Two
//! background tasks serve it: a reader that sorts incoming frames to ports,
//! calls and capabilities, and a writer that batches outgoing frames. A
//! [`Capability`] is the right to send to a port; it carries send credits,
//! and [`Driver::send`] waits when they run out, which is how a slow receiver
//! slows its senders. Dropping the last clone of a capability gives it back
//! to the Junction.
//!
//! Programs without async use [`blocking::Driver`].
//!
//! Every protocol decision (credits, sequence numbers, acknowledgements,
//! pending calls, port state, capabilities that move) is made by
//! [`machine::Machine`], a state machine with no I/O that this crate's tokio
//! code only feeds frames and drains; simulations drive it directly.

#![forbid(unsafe_code)]

pub mod blocking;
mod conn;
mod error;
pub mod machine;
mod policy;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use junction_road::control::{ControlReply, ControlRequest, Listing};
use junction_road::{Header, Hello, MAGIC, PROTOCOL_VERSION};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use conn::{Attenuation, Capability, Message, Notice, Port, Reply};
pub use error::Error;
pub use junction_identity::ServiceName;
pub use junction_identity::{Certificate, PublicKey, SecretKey};
pub use junction_road::Identity;
pub use junction_road::{Address, ErrorCode, Reason, Rights};
pub use policy::Policy;

use conn::Shared;

/// The environment variable that names the Junction's socket.
pub const SOCKET_ENV: &str = "JUNCTION_SOCKET";

/// The socket a Junction listens on when nothing says otherwise:
/// `$XDG_RUNTIME_DIR/junction.sock`, else `junction.sock` in
/// [`fallback_socket_dir`].
pub fn default_socket_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("junction.sock"),
        _ => fallback_socket_dir().join("junction.sock"),
    }
}

/// The directory for the socket without `$XDG_RUNTIME_DIR`:
/// `junction-$USER` (or `junction-<uid>` without `$USER`) in the temp dir.
/// The temp dir is shared, so this directory must be private to its user
/// ([`DirRule::Private`](junction_road::transport::unix::DirRule)): the
/// junction creates it `0700`, and clients and the junction refuse it
/// otherwise.
pub fn fallback_socket_dir() -> PathBuf {
    let user = match std::env::var("USER") {
        Ok(user) if !user.is_empty() => user,
        _ => junction_road::transport::unix::effective_uid()
            .map_or_else(|_| "user".into(), |uid| uid.to_string()),
    };
    std::env::temp_dir().join(format!("junction-{user}"))
}

/// The socket named by `$JUNCTION_SOCKET`, else [`default_socket_path`].
pub fn socket_path() -> PathBuf {
    match std::env::var_os(SOCKET_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => default_socket_path(),
    }
}

/// How long [`Driver::connect`] waits for the junction to accept and answer
/// the handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How far the directory of the socket at `path` must be this user's own:
/// private if it is the [`fallback_socket_dir`], else safe (see
/// [`DirRule`](junction_road::transport::unix::DirRule)).
pub fn socket_dir_rule(path: &Path) -> junction_road::transport::unix::DirRule {
    use junction_road::transport::unix::DirRule;
    match path.parent() {
        Some(dir) if dir == fallback_socket_dir() => DirRule::Private,
        _ => DirRule::Safe,
    }
}

/// The directory of the socket at `path`, `.` for a bare file name.
pub fn socket_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// The one check every client makes before it connects to `path`, and the
/// junction before it binds there: the socket's directory must be this
/// user's own ([`socket_dir_rule`]), or whoever controls it could stand in
/// for the junction, read what clients send and relay their proofs.
pub fn check_socket_path(
    path: &Path,
) -> Result<(), junction_road::transport::unix::SocketDirError> {
    junction_road::transport::unix::check_socket_dir(socket_dir(path), socket_dir_rule(path))
}

/// One connection to a Junction. Clones share the connection.
#[derive(Clone, Debug)]
pub struct Driver {
    shared: Arc<Shared>,
}

impl Driver {
    /// Connects to the Junction at `$JUNCTION_SOCKET`, or at the default
    /// socket.
    pub async fn connect_default() -> Result<Driver, Error> {
        Self::connect(&socket_path()).await
    }

    /// Connects to the Junction listening at `path`, after checking that
    /// its directory is this user's own ([`check_socket_path`]), giving up
    /// after [`CONNECT_TIMEOUT`]. An explicit path gets the same check as
    /// the default one: a caller that names a socket trusts whoever
    /// controls its directory just as much.
    ///
    /// A connection holds one file descriptor. The library leaves the
    /// process's descriptor limit alone; a program that opens more than
    /// about a thousand connections should raise it first, with
    /// `junction_road::transport::unix::raise_fd_limit()`.
    pub async fn connect(path: &Path) -> Result<Driver, Error> {
        Self::connect_within(path, CONNECT_TIMEOUT).await
    }

    /// As [`Driver::connect`]; fails with [`Error::NoAnswer`] when the
    /// connection and the handshake are not through within `timeout` (a
    /// junction that is stopped, or wedged, must not hang its clients).
    pub async fn connect_within(path: &Path, timeout: Duration) -> Result<Driver, Error> {
        check_socket_path(path).map_err(|e| Error::Connect {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, e),
        })?;
        let connect = async {
            let (reader, writer) =
                junction_road::transport::unix::connect(path, junction_road::DEFAULT_MAX_FRAME)
                    .await
                    .map_err(|source| Error::Connect {
                        path: path.to_owned(),
                        source,
                    })?;
            Self::attach(reader, writer, program_label()).await
        };
        tokio::time::timeout(timeout, connect)
            .await
            .unwrap_or_else(|_| {
                Err(Error::NoAnswer {
                    path: path.to_owned(),
                    waited: timeout,
                })
            })
    }

    /// Attaches over this process's stdin and stdout, as a child the
    /// Junction spawned. Nothing else may use stdin or stdout afterwards.
    pub async fn from_stdio() -> Result<Driver, Error> {
        let (reader, writer) =
            junction_road::transport::stdio::open(junction_road::DEFAULT_MAX_FRAME)
                .map_err(Error::Stdio)?;
        Self::attach(reader, writer, program_label()).await
    }

    /// Attaches over any Road: sends the Hello and waits for the Welcome.
    pub async fn attach<R, W>(
        mut reader: junction_road::RoadReader<R>,
        mut writer: junction_road::RoadWriter<W>,
        label: String,
    ) -> Result<Driver, Error>
    where
        R: tokio::io::AsyncRead + Unpin + std::marker::Send + 'static,
        W: tokio::io::AsyncWrite + junction_road::DirectLink + Unpin + std::marker::Send + 'static,
    {
        let hello = Header::Hello(Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            max_frame: junction_road::DEFAULT_MAX_FRAME,
            label,
        });
        // A junction that turns us away writes its reason and hangs up, maybe
        // before our Hello is through: read its answer even if writing failed.
        let sent = writer.send(&junction_road::Frame::bare(hello)).await;
        let welcome = match reader.read_frame().await {
            Ok(Some(frame)) => match frame.header {
                Header::Welcome(w) => w,
                Header::Error(e) => return Err(Error::Handshake(e.message)),
                other => {
                    return Err(Error::Handshake(format!(
                        "expected a Welcome, got {other:?}"
                    )));
                }
            },
            Ok(None) => {
                return Err(Error::Closed {
                    reason: match sent {
                        Err(e) => format!("the junction closed the road during the handshake: {e}"),
                        Ok(()) => "the junction closed the road during the handshake".into(),
                    },
                });
            }
            Err(e) => return Err(Error::Handshake(e.to_string())),
        };
        reader.set_max_frame(
            welcome
                .max_frame
                .max(junction_road::MIN_MAX_FRAME)
                .saturating_add(junction_road::frame::DELIVER_SLACK),
        );
        let shared = Shared::start(reader, writer, welcome);
        Ok(Driver { shared })
    }

    /// This Driver's home port: the origin stamped on what it sends.
    pub fn home(&self) -> Address {
        self.shared.welcome.home
    }

    /// The id of the Junction this Driver is attached to.
    pub fn junction_id(&self) -> u16 {
        self.shared.welcome.junction
    }

    /// The largest frame the Junction accepts; payloads must fit in it with
    /// their header.
    pub fn max_frame(&self) -> u32 {
        self.shared.welcome.max_frame
    }

    /// Opens a new port; this Driver holds its receive right.
    pub async fn open_port(&self) -> Result<Port, Error> {
        let rx = self.shared.request(|m| m.open_port())?;
        match self.shared.answer(rx).await? {
            conn::Answer::Port(port) => Ok(port),
            conn::Answer::Cap(_) => {
                Err(Error::Protocol("a capability answered an OpenPort".into()))
            }
        }
    }

    /// Sends `payload` to the port behind `cap`. Waits while the capability
    /// has no send credit (the receiver is behind). Returns the message's
    /// sequence number on this capability, which [`Notice::Undeliverable`]
    /// refers to.
    pub async fn send(&self, cap: &Capability, payload: impl Into<Bytes>) -> Result<u64, Error> {
        self.send_with(cap, payload, &[]).await
    }

    /// Sends `payload` with capabilities attached. Each needs the `grant`
    /// right; the receiver gets its own handles for them.
    pub async fn send_with(
        &self,
        cap: &Capability,
        payload: impl Into<Bytes>,
        caps: &[&Capability],
    ) -> Result<u64, Error> {
        self.shared.send(cap, caps, payload.into()).await
    }

    /// Sends `value` encoded with postcard.
    pub async fn send_typed<T: Serialize>(
        &self,
        cap: &Capability,
        value: &T,
    ) -> Result<u64, Error> {
        let bytes = postcard::to_allocvec(value).map_err(Error::Encode)?;
        self.send(cap, bytes).await
    }

    /// Calls the port behind `cap` and waits up to `timeout` for the reply.
    pub async fn call(
        &self,
        cap: &Capability,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Message, Error> {
        self.call_with(cap, payload, &[], timeout).await
    }

    /// Calls with capabilities attached (see [`Driver::send_with`]).
    pub async fn call_with(
        &self,
        cap: &Capability,
        payload: impl Into<Bytes>,
        caps: &[&Capability],
        timeout: Duration,
    ) -> Result<Message, Error> {
        self.shared
            .call(Some(cap), caps, payload.into(), timeout)
            .await
    }

    /// Calls with a postcard-encoded request and decodes the reply.
    pub async fn call_typed<Q: Serialize, A: DeserializeOwned>(
        &self,
        cap: &Capability,
        request: &Q,
        timeout: Duration,
    ) -> Result<A, Error> {
        let bytes = postcard::to_allocvec(request).map_err(Error::Encode)?;
        self.call(cap, bytes, timeout).await?.decode()
    }

    /// Registers `name` for the port behind `cap`, a port this Driver owns;
    /// `cap` needs `send` and `grant`. Lookups of the name get copies of it.
    pub async fn register(&self, name: &str, cap: &Capability) -> Result<(), Error> {
        let name = ServiceName::new(name)?;
        match self
            .control(ControlRequest::Register { name }, &[cap])
            .await?
        {
            (ControlReply::Registered, _) => Ok(()),
            (other, _) => Err(control_error(other)),
        }
    }

    /// Removes a registration this Driver made.
    pub async fn unregister(&self, name: &str) -> Result<(), Error> {
        let name = ServiceName::new(name)?;
        match self
            .control(ControlRequest::Unregister { name }, &[])
            .await?
        {
            (ControlReply::Unregistered, _) => Ok(()),
            (other, _) => Err(control_error(other)),
        }
    }

    /// A capability to the service registered as `name`.
    pub async fn lookup(&self, name: &str) -> Result<Capability, Error> {
        Ok(self.lookup_with_chain(name).await?.0)
    }

    /// A capability to the service registered as `name`, with the
    /// certificate chain the service proved when it registered (`None` for
    /// a name in a development namespace). Check the chain against your own
    /// trust to know whom you talk to, end to end.
    pub async fn lookup_with_chain(
        &self,
        name: &str,
    ) -> Result<(Capability, Option<Vec<Certificate>>), Error> {
        let name = ServiceName::new(name)?;
        match self.control(ControlRequest::Lookup { name }, &[]).await? {
            (ControlReply::Found { chain, .. }, mut caps) if caps.len() == 1 => {
                Ok((caps.remove(0), chain))
            }
            (other, _) => Err(control_error(other)),
        }
    }

    /// Proves this connection's identity to the Junction: `chain` is the
    /// certificate chain (leaf first) for `key`. From then on, everything
    /// this Driver sends carries the identity, and it may register the
    /// names its certificate grants.
    pub async fn authenticate(
        &self,
        key: &SecretKey,
        chain: Vec<Certificate>,
    ) -> Result<Identity, Error> {
        let welcome = &self.shared.welcome;
        let proof = junction_identity::prove_possession(key, &welcome.nonce, welcome.junction);
        match self
            .control(ControlRequest::Authenticate { chain, proof }, &[])
            .await?
        {
            (ControlReply::Authenticated(identity), _) => Ok(identity),
            (other, _) => Err(control_error(other)),
        }
    }

    /// The Junction's ports and connections, as `junction ls` shows them.
    pub async fn listing(&self) -> Result<Listing, Error> {
        match self.control(ControlRequest::List, &[]).await? {
            (ControlReply::Listing(listing), _) => Ok(listing),
            (other, _) => Err(control_error(other)),
        }
    }

    /// Asks the Junction to reload its revocation list and configuration
    /// (as SIGHUP does). Only the junction's own user and root may; others
    /// get [`Error::Refused`] with `NotAllowed`.
    pub async fn reload(&self) -> Result<junction_road::control::ReloadReport, Error> {
        match self.control(ControlRequest::Reload, &[]).await? {
            (ControlReply::Reloaded(report), _) => Ok(report),
            (other, _) => Err(control_error(other)),
        }
    }

    /// Asks the Junction to deliver a
    /// [`MonitorEvent`](junction_road::monitor::MonitorEvent) for every
    /// message matching `filter` to `port` (one this Driver opened for
    /// them, not its home), until the port closes; with payloads when
    /// `payloads` (and allowed). Each event arrives as a message from the
    /// control port: decode it with
    /// [`Message::decode`]. Refused unless this Driver runs as the
    /// Junction's user or root, or proved an identity granted
    /// `junction.monitor` (`junction.monitor.payload` for payloads).
    pub async fn monitor(
        &self,
        port: &Port,
        filter: junction_road::monitor::MonitorFilter,
        payloads: bool,
    ) -> Result<(), Error> {
        let request = ControlRequest::Monitor {
            port: port.address().port,
            filter,
            payloads,
        };
        match self.control(request, &[]).await? {
            (ControlReply::Monitoring { .. }, _) => Ok(()),
            (other, _) => Err(control_error(other)),
        }
    }

    /// The Junction's traffic counters, as `junction top` shows them.
    pub async fn traffic(&self) -> Result<junction_road::monitor::TrafficReport, Error> {
        match self.control(ControlRequest::Traffic, &[]).await? {
            (ControlReply::Traffic(report), _) => Ok(report),
            (other, _) => Err(control_error(other)),
        }
    }

    async fn control(
        &self,
        request: ControlRequest,
        caps: &[&Capability],
    ) -> Result<(ControlReply, Vec<Capability>), Error> {
        let payload = postcard::to_allocvec(&request).map_err(Error::Encode)?;
        let reply = self
            .shared
            .call(None, caps, payload.into(), CONTROL_TIMEOUT)
            .await?;
        let decoded: ControlReply = reply.decode()?;
        Ok((decoded, reply.caps))
    }

    /// The next notice about messages this Driver sent that were not
    /// delivered, about errors the Junction reported outside any request,
    /// or that this connection's identity was withdrawn
    /// ([`Notice::IdentityWithdrawn`]). `None` once the connection is closed.
    pub async fn next_notice(&self) -> Option<Notice> {
        self.shared.next_notice().await
    }

    /// Waits until the Junction has handled everything this Driver sent
    /// before: a round trip. Use it before exiting right after a send.
    pub async fn sync(&self) -> Result<(), Error> {
        self.shared.sync().await
    }

    /// Resolves when the connection to the Junction is gone, with the reason.
    pub async fn closed(&self) -> Error {
        self.shared.closed().await
    }

    /// Whether the connection to the Junction is gone.
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }
}

/// How long control requests (register, lookup, listing) may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

fn control_error(reply: ControlReply) -> Error {
    match reply {
        ControlReply::Refused { code, message } => Error::Refused { code, message },
        other => Error::Protocol(format!("unexpected control reply {other:?}")),
    }
}

fn program_label() -> String {
    // The program's name, and its subcommand when it has one: "junction echo".
    let mut args = std::env::args();
    let program = args
        .next()
        .and_then(|a| {
            Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "driver".into());
    match args.next() {
        Some(sub) if !sub.starts_with('-') && sub.len() <= 32 => format!("{program} {sub}"),
        _ => program,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A junction that never answers (here: a socket nobody accepts on, so
    /// the connection waits in the backlog) makes `connect` fail, not hang.
    #[tokio::test]
    async fn a_junction_that_never_answers_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("jd-silent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("silent.sock");
        let _ = std::fs::remove_file(&path);
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = Driver::connect_within(&path, Duration::from_millis(200))
            .await
            .unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(err, Error::NoAnswer { .. }), "{err:?}");
        assert!(err.to_string().contains("did not answer"), "{err}");
    }
}
