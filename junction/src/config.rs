//! The optional configuration file (TOML). Every field may be left out; the
//! command line overrides the file.
//!
//! ```toml
//! socket = "/run/junction/junction.sock"
//! junction_id = 12
//! max_frame = 4194304
//! window = 64
//! max_handles = 4096
//! max_ports = 256
//! max_pending_calls = 1024
//! max_names = 64
//! grace_ms = 3000
//! hello_timeout_ms = 10000
//! max_connections = 16384
//! max_connections_per_uid = 12288
//! max_unread = 16777216
//! write_timeout_ms = 30000
//! spawn = ["/usr/bin/my-service --flag"]
//! authority = "/etc/junction/authority.cert"
//! revocations = "/etc/junction/revoked.crl"
//! dev_namespace = ["dev.*"]
//! allow_uids = [1000]
//! allow_gids = [1001]
//! socket_mode = "0660"
//! socket_group = "junction"
//! # Highways to other junctions (QUIC):
//! quic_listen = "0.0.0.0:4433"
//! peers = ["2@198.51.100.2:4433", "3@bus-c.example:4433"]
//! junction_key = "/etc/junction/junction.key"
//! junction_cert = "/etc/junction/junction.cert"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The configuration file's contents.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The Unix socket to listen on.
    pub socket: Option<PathBuf>,
    /// This junction's id, 1 to 65534.
    pub junction_id: Option<u16>,
    /// The largest frame accepted, in bytes.
    pub max_frame: Option<u32>,
    /// Send credits each capability starts with.
    pub window: Option<u32>,
    /// Capability handles one connection may hold.
    pub max_handles: Option<u32>,
    /// Ports one connection may own.
    pub max_ports: Option<u32>,
    /// Calls one connection may have waiting.
    pub max_pending_calls: Option<u32>,
    /// Names one connection may register (default 64).
    pub max_names: Option<u32>,
    /// Milliseconds children get between SIGTERM and SIGKILL at shutdown.
    pub grace_ms: Option<u64>,
    /// Milliseconds a new connection has to deliver its whole Hello frame
    /// (default 10 000).
    pub hello_timeout_ms: Option<u64>,
    /// Connections served at once (default 16 384); more are turned away.
    /// The last one is kept for the junction's own user and root.
    pub max_connections: Option<usize>,
    /// Connections one user may hold at once (default three quarters of
    /// `max_connections`); the junction's own user and root may take one
    /// more.
    pub max_connections_per_uid: Option<usize>,
    /// Bytes queued for a connection above which the junction stops taking
    /// new requests from it and pauses those who send to it (default 16 MiB).
    pub max_unread: Option<usize>,
    /// Milliseconds a connection's writer may make no progress while bytes
    /// wait for it before the connection is cut off (default 30 000).
    pub write_timeout_ms: Option<u64>,
    /// Commands to spawn with stdio Roads.
    #[serde(default)]
    pub spawn: Vec<String>,
    /// The bus authority's certificate (PEM); several may follow each other.
    pub authority: Option<PathBuf>,
    /// The authority's revocation list (PEM), reloaded on SIGHUP.
    pub revocations: Option<PathBuf>,
    /// Name patterns that may be registered without a certificate, for
    /// development only (each registration is logged as such).
    #[serde(default)]
    pub dev_namespace: Vec<String>,
    /// User ids that may connect over the socket; empty means any user
    /// who can open the socket (which is created 0600).
    #[serde(default)]
    pub allow_uids: Vec<u32>,
    /// Group ids that may connect: a peer in one of them (its primary gid
    /// from SO_PEERCRED, or a supplementary group from SO_PEERGROUPS, as of
    /// its connect) is let in, as is one whose uid is in `allow_uids`.
    /// Both empty: anyone who can open the socket.
    #[serde(default)]
    pub allow_gids: Vec<u32>,
    /// The socket's mode, in octal (default "0600"): "0660" lets the
    /// socket's group connect too. Unused under socket activation, where
    /// the .socket unit sets it (SocketMode=).
    pub socket_mode: Option<String>,
    /// The group to give the socket, by name or gid (default: the
    /// junction's own). Unused under socket activation (SocketGroup=).
    pub socket_group: Option<String>,
    /// The UDP address to accept Highways (QUIC) from other junctions on;
    /// none: this junction accepts none (it may still dial `peers`).
    pub quic_listen: Option<std::net::SocketAddr>,
    /// Junctions to dial and keep a Highway to, as `ID@HOST:PORT`.
    #[serde(default)]
    pub peers: Vec<String>,
    /// This junction's key (PKCS#8 PEM): its identity on Highways, and the
    /// key that seals its routes and sessions.
    pub junction_key: Option<PathBuf>,
    /// This junction's certificate chain (PEM, leaf first): a junction
    /// certificate for `junction_id` from the bus authority.
    pub junction_cert: Option<PathBuf>,
    /// Serve the traffic counters as Prometheus text on this address
    /// (`GET /metrics`); off by default, loopback only unless
    /// `metrics_allow_remote`.
    pub metrics: Option<std::net::SocketAddr>,
    /// Let `metrics` listen on an address other than loopback.
    #[serde(default)]
    pub metrics_allow_remote: bool,
}

/// A junction to dial: its id and where it listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    /// The junction's id, which its certificate must carry.
    pub junction: u16,
    /// Its host (a name or an address) and UDP port.
    pub host: String,
    /// Its port.
    pub port: u16,
}

impl std::str::FromStr for PeerAddr {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            ConfigError::Invalid(format!(
                "peer {s:?} is not ID@HOST:PORT (say 2@198.51.100.2:4433): {why}"
            ))
        };
        let (id, addr) = s.split_once('@').ok_or_else(|| bad("no '@'"))?;
        let junction: u16 = id
            .trim()
            .parse()
            .map_err(|_| bad("the id is not a number from 1 to 65534"))?;
        let junction = check_junction_id(junction)?;
        let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("no ':PORT'"))?;
        let port: u16 = port.parse().map_err(|_| bad("the port is not a number"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Self {
            junction,
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}@[{}]:{}", self.junction, self.host, self.port)
        } else {
            write!(f, "{}@{}:{}", self.junction, self.host, self.port)
        }
    }
}

/// Why the configuration file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("the config file {} is invalid: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with its place in the file.
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
    /// A file the configuration names (not the configuration file itself)
    /// could not be read.
    #[error("cannot read {what} {}: {source}; {hint}", path.display())]
    ReadNamed {
        /// What the file is, e.g. "the authority certificate (--authority)".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
}

impl FileConfig {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// Parses and checks TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: FileConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source,
        })?;
        match config.problems().into_iter().next() {
            Some(problem) => Err(problem),
            None => Ok(config),
        }
    }

    /// Every value out of range or malformed, each naming its field; the
    /// files the configuration names are checked by [`check_file`].
    pub fn problems(&self) -> Vec<ConfigError> {
        let mut problems = Vec::new();
        let mut invalid = |message: String| problems.push(ConfigError::Invalid(message));
        if let Some(id) = self.junction_id
            && let Err(e) = check_junction_id(id)
        {
            invalid(format!("junction_id: {e}"));
        }
        if let Some(max) = self.max_frame
            && max < junction_road::MIN_MAX_FRAME
        {
            invalid(format!(
                "max_frame = {max} is below the minimum of {} bytes",
                junction_road::MIN_MAX_FRAME
            ));
        }
        if let Err(e) = check_connection_limits(self.max_connections, self.max_connections_per_uid)
        {
            invalid(e.to_string());
        }
        if self.hello_timeout_ms == Some(0) {
            invalid(
                "hello_timeout_ms = 0 would close every connection before its Hello; use at least 1".into(),
            );
        }
        if self.write_timeout_ms == Some(0) {
            invalid(
                "write_timeout_ms = 0 would cut off every connection that is sent anything".into(),
            );
        }
        if self.window == Some(0) {
            invalid("window = 0 would let nobody send; use at least 1".into());
        }
        for peer in &self.peers {
            if let Err(e) = peer.parse::<PeerAddr>() {
                invalid(format!("peers: {e}"));
            }
        }
        if let Some(mode) = &self.socket_mode
            && let Err(e) = crate::service::parse_mode(mode)
        {
            invalid(format!("socket_mode: {e}"));
        }
        problems
    }
}

/// Checks the configuration file at `path` as `junction serve` would use
/// it, without starting anything: it parses, every value is in range, and
/// every file it names (authority, revocations, junction key and
/// certificate) exists and parses, and the groups and name patterns
/// resolve. Returns every problem found, each naming its field; empty
/// means the file is good.
pub fn check_file(path: &Path) -> Vec<String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(source) => {
            return vec![
                ConfigError::Read {
                    path: path.to_owned(),
                    source,
                }
                .to_string(),
            ];
        }
    };
    let config: FileConfig = match toml::from_str(&text) {
        Ok(config) => config,
        // The TOML reader stops at the first error, with its line and
        // column; nothing past it can be checked.
        Err(e) => return vec![e.to_string().trim_end().to_string()],
    };
    let mut problems: Vec<String> = config.problems().iter().map(|e| e.to_string()).collect();
    let trust = match &config.authority {
        Some(path) => match load_trust(path) {
            Ok(trust) => Some(trust),
            Err(e) => {
                problems.push(format!("authority: {e}"));
                None
            }
        },
        None => Some(junction_identity::TrustStore::new()),
    };
    if let Some(list) = &config.revocations {
        match &trust {
            Some(trust) if config.authority.is_some() => {
                if let Err(e) = load_revocations(list, trust) {
                    problems.push(format!("revocations: {e}"));
                }
            }
            Some(_) => problems.push(format!(
                "revocations: {} can only be checked against an authority; set authority too",
                list.display()
            )),
            None => {}
        }
    }
    match (&config.junction_key, &config.junction_cert) {
        (Some(key), Some(cert)) => {
            if let Err(e) = read_to_string(key).and_then(|text| {
                junction_identity::SecretKey::from_pem(&text)
                    .map(drop)
                    .map_err(|e| format!("{} is not a usable key: {e}", key.display()))
            }) {
                problems.push(format!("junction_key: {e}"));
            }
            if let Err(e) = read_to_string(cert).and_then(|text| {
                junction_identity::Certificate::chain_from_pem(&text)
                    .map(drop)
                    .map_err(|e| format!("{} holds no usable certificate: {e}", cert.display()))
            }) {
                problems.push(format!("junction_cert: {e}"));
            }
        }
        (None, None) => {
            if config.quic_listen.is_some() || !config.peers.is_empty() {
                problems.push(
                    "junction_key, junction_cert: Highways (quic_listen, peers) need this junction's key and certificate".into(),
                );
            }
        }
        _ => problems.push("junction_key, junction_cert: give both or neither".into()),
    }
    if (config.quic_listen.is_some() || !config.peers.is_empty()) && config.authority.is_none() {
        problems.push(
            "authority: Highways (quic_listen, peers) need the bus authority, to check the junctions they reach".into(),
        );
    }
    if let Err(e) = parse_patterns(&config.dev_namespace) {
        problems.push(format!("dev_namespace: {e}"));
    }
    if let Some(group) = &config.socket_group
        && let Err(e) = crate::service::parse_group(group)
    {
        problems.push(format!("socket_group: {e}"));
    }
    for command in &config.spawn {
        match shlex::split(command) {
            Some(words) if !words.is_empty() => {}
            _ => problems.push(format!(
                "spawn: {command:?} is not a command line (empty, or unbalanced quotes)"
            )),
        }
    }
    problems
}

fn read_to_string(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Loads the trusted authorities from a PEM file of authority certificates.
pub fn load_trust(path: &Path) -> Result<junction_identity::TrustStore, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadNamed {
        what: "the authority certificate (--authority, or `authority` in the config file)",
        path: path.to_owned(),
        source,
        hint: "give the file `junction cert issue --role authority` wrote",
    })?;
    let invalid = |e: junction_identity::IdentityError| {
        ConfigError::Invalid(format!(
            "the authority certificate {} (--authority) is unusable: {e}; give the file \
             `junction cert issue --role authority` wrote",
            path.display()
        ))
    };
    let certs = junction_identity::Certificate::chain_from_pem(&text).map_err(invalid)?;
    let mut trust = junction_identity::TrustStore::new();
    for cert in &certs {
        trust.add_authority(cert).map_err(invalid)?;
    }
    Ok(trust)
}

/// Loads and checks a revocation list against the trusted authorities.
pub fn load_revocations(
    path: &Path,
    trust: &junction_identity::TrustStore,
) -> Result<junction_identity::Verified<junction_identity::RevocationList>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadNamed {
        what: "the revocation list (--revocations, or `revocations` in the config file)",
        path: path.to_owned(),
        source,
        hint: "make one with `junction cert revoke --authority-key KEY -o FILE` (with nothing \
               to revoke, it makes an empty list)",
    })?;
    junction_identity::RevocationList::from_pem(&text)
        .and_then(|list| list.verify(trust))
        .map_err(|e| {
            ConfigError::Invalid(format!(
                "the revocation list {} (--revocations) is unusable: {e}; make revocation \
                 lists with `junction cert revoke`",
                path.display()
            ))
        })
}

/// Parses development-namespace patterns.
pub fn parse_patterns(
    patterns: &[String],
) -> Result<Vec<junction_identity::NamePattern>, ConfigError> {
    patterns
        .iter()
        .map(|p| {
            p.parse()
                .map_err(|e| ConfigError::Invalid(format!("development namespace {p:?}: {e}")))
        })
        .collect()
}

/// Checks the connection limits that are given: the junction's own user
/// needs a slot beyond what others may take, and every user at least one.
pub fn check_connection_limits(
    max_connections: Option<usize>,
    per_uid: Option<usize>,
) -> Result<(), ConfigError> {
    if let Some(max) = max_connections
        && max <= crate::admit::RESERVED_SLOTS
    {
        return Err(ConfigError::Invalid(format!(
            "max_connections = {max} leaves no slot beside the {} kept for the junction's own user; use at least {}",
            crate::admit::RESERVED_SLOTS,
            crate::admit::RESERVED_SLOTS + 1
        )));
    }
    if per_uid == Some(0) {
        return Err(ConfigError::Invalid(
            "max_connections_per_uid = 0 would let nobody connect; use at least 1".into(),
        ));
    }
    Ok(())
}

/// Checks that `id` may name a junction: 0 means "this junction" and
/// 0xFFFF is reserved.
pub fn check_junction_id(id: u16) -> Result<u16, ConfigError> {
    if id == 0 || id == u16::MAX {
        return Err(ConfigError::Invalid(format!(
            "junction id {id} is reserved; use 1 to 65534"
        )));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses_and_bad_ones_say_why() {
        let c = FileConfig::parse("junction_id = 12\nwindow = 8\nspawn = [\"echo hi\"]").unwrap();
        assert_eq!(c.junction_id, Some(12));
        assert_eq!(c.spawn, vec!["echo hi".to_string()]);
        let e = FileConfig::parse("junction_id = 0").unwrap_err();
        assert!(e.to_string().contains("reserved"), "{e}");
        let e = FileConfig::parse("bogus = 1").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = FileConfig::parse("max_frame = 10").unwrap_err();
        assert!(e.to_string().contains("minimum"), "{e}");
        let e = FileConfig::parse("max_connections = 1").unwrap_err();
        assert!(e.to_string().contains("own user"), "{e}");
        let e = FileConfig::parse("max_connections_per_uid = 0").unwrap_err();
        assert!(e.to_string().contains("nobody"), "{e}");
        let c = FileConfig::parse("max_connections = 10\nmax_connections_per_uid = 4").unwrap();
        assert_eq!(
            (c.max_connections, c.max_connections_per_uid),
            (Some(10), Some(4))
        );
        let c = FileConfig::parse("write_timeout_ms = 500\nmax_unread = 1048576").unwrap();
        assert_eq!(c.write_timeout_ms, Some(500));
        let e = FileConfig::parse("write_timeout_ms = 0").unwrap_err();
        assert!(e.to_string().contains("write_timeout_ms"), "{e}");
    }

    #[test]
    fn highway_settings_parse_and_bad_peers_say_why() {
        let c = FileConfig::parse(
            "quic_listen = \"0.0.0.0:4433\"\npeers = [\"2@198.51.100.2:4433\", \"3@[::1]:5000\"]",
        )
        .unwrap();
        assert_eq!(c.quic_listen, Some("0.0.0.0:4433".parse().unwrap()));
        let peers: Vec<PeerAddr> = c.peers.iter().map(|p| p.parse().unwrap()).collect();
        assert_eq!(peers[0].junction, 2);
        assert_eq!(peers[0].host, "198.51.100.2");
        assert_eq!(peers[1].to_string(), "3@[::1]:5000");
        for (bad, says) in [
            ("198.51.100.2:4433", "no '@'"),
            ("x@h:1", "1 to 65534"),
            ("0@h:1", "reserved"),
            ("2@h", "':PORT'"),
            ("2@h:port", "port"),
            ("2@:1", "no host"),
        ] {
            let e = FileConfig::parse(&format!("peers = [\"{bad}\"]")).unwrap_err();
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
        let e = FileConfig::parse("quic_listen = \"nowhere\"").unwrap_err();
        assert!(e.to_string().contains("quic_listen"), "{e}");
    }
}
