//! Helpers for Junction's cross-process tests: a real `junction` daemon in a
//! temp dir, child processes that are killed when the test ends (pass or
//! fail), and a raw Road client for sending frames no driver would send.
//!
//! [`sim`] is the deterministic simulation: the real junction core and real
//! driver state machines in one simulated world with a fake clock, random
//! operations from one seed, and an oracle for the delivery contract
//! (`tests/simulation.rs` runs it).

pub mod sim;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use junction_road::{Frame, Header, Hello, MAGIC, PROTOCOL_VERSION, codec};

/// The `junction` binary of this build (`target/<profile>/junction`).
pub fn junction_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/<profile>/deps/<test> → target/<profile>/junction
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps");
    let bin = dir.join("junction");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p junction` (cargo test --workspace does)",
        bin.display()
    );
    bin
}

/// A fresh, private temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates one under the system temp dir.
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "jt-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        // Private (0700) whatever the umask: a socket directory others may
        // write in is refused.
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(&path)
            .expect("can create a temp dir");
        Self(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process that is killed and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
}

impl Proc {
    /// Starts `command`, keeping the child for cleanup.
    pub fn spawn(command: &mut Command) -> Self {
        let child = command.spawn().expect("can start the process");
        Self { child }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGKILL now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` and waits up to `timeout` for the exit status.
    pub fn signal_and_wait(
        &mut self,
        signal: i32,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill has no memory-safety preconditions.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(pid, signal);
            }
        }
        self.wait_timeout(timeout)
    }

    /// The child's stdout, to read what it prints.
    pub fn stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// The child's stderr, to read what it says.
    pub fn stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
    }

    /// The child's stdin, to write to it (dropping it closes the pipe).
    pub fn stdin(&mut self) -> Option<std::process::ChildStdin> {
        self.child.stdin.take()
    }

    /// Waits (polling) up to `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `junction serve` daemon on a socket in its own temp dir.
#[derive(Debug)]
pub struct TestJunction {
    /// Its socket.
    pub socket: PathBuf,
    /// The daemon process.
    pub process: Proc,
    dir: TempDir,
}

impl TestJunction {
    /// Starts `junction serve` with `extra` arguments and waits until it
    /// accepts connections. Its log goes to `junction.log` in its dir.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_under(&[], extra)
    }

    /// As [`TestJunction::start`], run through `wrapper` (a program and its
    /// arguments that end by running the command after them, e.g.
    /// `["prlimit", "--nofile=64:64", "--"]`); empty runs it directly.
    pub fn start_under(wrapper: &[&str], extra: &[&str]) -> Self {
        let dir = TempDir::new();
        let socket = dir.path().join("j.sock");
        let log =
            std::fs::File::create(dir.path().join("junction.log")).expect("can create the log");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(junction_bin());
                c
            }
            None => Command::new(junction_bin()),
        };
        let process = Proc::spawn(
            command
                .arg("serve")
                .arg("--socket")
                .arg(&socket)
                // The cross-process tests of the local bus use unguarded
                // names under t.*; the impostor suite uses certificates.
                .args(["--dev-namespace", "t.*"])
                .args(extra)
                // JUNCTION_TEST_LOG=debug to see more while a test fails.
                .env(
                    "RUST_LOG",
                    std::env::var("JUNCTION_TEST_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdin(Stdio::null())
                .stderr(log),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "the junction did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            socket,
            process,
            dir,
        }
    }

    /// The temp dir the junction lives in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the junction has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("junction.log")).unwrap_or_default()
    }

    /// A command for `junction` with this junction's socket in its environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(junction_bin());
        c.args(args)
            .env("JUNCTION_SOCKET", &self.socket)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        c
    }

    /// Starts a process with this junction's socket in its environment and
    /// waits for it to print `ready` (or for `name` to be registered).
    pub fn spawn_ready(&self, program: &Path, args: &[&str]) -> Proc {
        let mut proc = Proc::spawn(
            Command::new(program)
                .args(args)
                .env("JUNCTION_SOCKET", &self.socket)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::piped()),
        );
        let stdout = proc.stdout().expect("stdout is piped");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("can read the peer's stdout");
        assert_eq!(line.trim(), "ready", "the peer did not start");
        proc
    }

    /// The daemon's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The most resident memory the daemon has had, in KiB.
    pub fn hwm_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.process.pid()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

/// A Road client speaking raw frames, for tests of what drivers never send.
#[derive(Debug)]
pub struct RawClient {
    stream: UnixStream,
    buf: BytesMut,
}

impl RawClient {
    /// Connects without a handshake.
    pub fn connect(socket: &Path) -> Self {
        let stream = UnixStream::connect(socket).expect("can connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("can set a timeout");
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Connects and completes the handshake; returns the Welcome.
    pub fn hello(socket: &Path) -> (Self, junction_road::Welcome) {
        let mut c = Self::connect(socket);
        c.send(hello("raw"));
        match c.recv().map(|f| f.header) {
            Some(Header::Welcome(w)) => (c, w),
            other => panic!("expected a Welcome, got {other:?}"),
        }
    }

    /// Opens a port, mints a `send|grant` capability to it and registers it
    /// as `name` (a dev-namespace name, or one this connection proved);
    /// returns the port's address and the capability's handle.
    pub fn serve(&mut self, name: &str) -> (junction_road::Address, u32) {
        use junction_road::control::{ControlReply, ControlRequest};
        self.send(Header::OpenPort { req: 1 });
        let f = self.recv_until(|h| matches!(h, Header::PortOpened { req: 1, .. }));
        let Header::PortOpened { address, .. } = f.header else {
            unreachable!("matched above")
        };
        self.send(Header::Mint {
            req: 2,
            port: address.port,
            rights: junction_road::Rights::SEND | junction_road::Rights::GRANT,
        });
        let f = self.recv_until(|h| matches!(h, Header::Minted { req: 2, .. }));
        let Header::Minted { handle, .. } = f.header else {
            unreachable!("matched above")
        };
        let request = ControlRequest::Register {
            name: name.parse().expect("a valid service name"),
        };
        let (reply, _) = self.control_with(&request, vec![handle]);
        assert_eq!(reply, ControlReply::Registered, "registering {name}");
        (address, handle)
    }

    /// What the junction lists for port `address`; panics if it lists none.
    pub fn port_info(
        &mut self,
        address: junction_road::Address,
    ) -> junction_road::control::PortInfo {
        use junction_road::control::{ControlReply, ControlRequest};
        let (reply, _) = self.control(&ControlRequest::List);
        let ControlReply::Listing(listing) = reply else {
            panic!("expected a listing, got {reply:?}")
        };
        listing
            .ports
            .into_iter()
            .find(|p| p.address == address)
            .unwrap_or_else(|| panic!("port {address} is not listed"))
    }

    /// The socket, for what the helpers here do not do (half-closing it,
    /// non-blocking writes).
    pub fn socket(&self) -> &UnixStream {
        &self.stream
    }

    /// Writes one frame.
    pub fn send(&mut self, header: Header) {
        self.send_frame(&Frame::bare(header));
    }

    /// Writes one frame with a payload.
    pub fn send_frame(&mut self, frame: &Frame) {
        let mut out = BytesMut::new();
        codec::encode(frame, &mut out);
        self.write_raw(&out);
    }

    /// Writes bytes as they are.
    pub fn write_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("can write");
    }

    /// Writes bytes, reporting failure (the junction hung up) instead of
    /// panicking. Gives up after a few seconds of a full socket.
    pub fn try_write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream
            .set_write_timeout(Some(Duration::from_secs(5)))?;
        self.stream.write_all(bytes)
    }

    /// Reads the next frame; `None` when the junction closed the connection.
    pub fn recv(&mut self) -> Option<Frame> {
        loop {
            match codec::decode(&mut self.buf, u32::MAX) {
                Ok(Some(frame)) => return Some(frame),
                Ok(None) => {}
                Err(e) => panic!("the junction sent a bad frame: {e}"),
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                // A signal (a child exiting) interrupted the read: nothing
                // was lost, read again.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("reading from the junction failed: {e}"),
            }
        }
    }

    /// Calls the control port with `request`; returns the reply and the
    /// capabilities that came with it.
    pub fn control(
        &mut self,
        request: &junction_road::control::ControlRequest,
    ) -> (
        junction_road::control::ControlReply,
        Vec<junction_road::Granted>,
    ) {
        self.control_with(request, vec![])
    }

    /// As [`RawClient::control`], passing the capabilities `caps` with the
    /// request (a `Register` needs one).
    pub fn control_with(
        &mut self,
        request: &junction_road::control::ControlRequest,
        caps: Vec<u32>,
    ) -> (
        junction_road::control::ControlReply,
        Vec<junction_road::Granted>,
    ) {
        static NEXT_TAG: AtomicU32 = AtomicU32::new(1);
        let tag = u64::from(NEXT_TAG.fetch_add(1, Ordering::Relaxed));
        let payload = postcard::to_allocvec(request).expect("requests encode");
        self.send_frame(&Frame::with_payload(
            Header::Call(junction_road::Call {
                handle: junction_road::control::CONTROL_HANDLE,
                tag,
                caps,
            }),
            bytes::Bytes::from(payload),
        ));
        let frame = self.recv_until(|h| matches!(h, Header::Deliver(d) if d.tag == tag));
        let Header::Deliver(d) = frame.header else {
            unreachable!("matched above")
        };
        let reply = postcard::from_bytes(&frame.payload).expect("the junction's reply decodes");
        (reply, d.caps)
    }

    /// Reads frames until one matches `want`; panics if the link closes first.
    pub fn recv_until(&mut self, mut want: impl FnMut(&Header) -> bool) -> Frame {
        loop {
            let frame = self.recv().expect("the junction closed the connection");
            if want(&frame.header) {
                return frame;
            }
        }
    }
}

/// A command's output as text, lossily.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A bus authority and certificates made with the real `junction keygen`
/// and `junction cert` commands, in a temp dir.
#[derive(Debug)]
pub struct TestPki {
    dir: TempDir,
}

impl TestPki {
    /// A new authority: `authority.key` and `authority.cert`.
    pub fn new() -> Self {
        let pki = Self {
            dir: TempDir::new(),
        };
        pki.run(&["keygen", "authority.key"]);
        pki.run(&[
            "cert",
            "issue",
            "--role",
            "authority",
            "--key",
            "authority.key",
            "-o",
            "authority.cert",
        ]);
        pki
    }

    /// A file in the PKI's dir.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Runs `junction` in the PKI's dir; panics with its stderr if it fails.
    pub fn run(&self, args: &[&str]) {
        let out = Command::new(junction_bin())
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("junction runs");
        assert!(
            out.status.success(),
            "junction {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Makes `NAME.key` unless it exists.
    pub fn key(&self, name: &str) -> PathBuf {
        let file = format!("{name}.key");
        if !self.path(&file).exists() {
            self.run(&["keygen", &file]);
        }
        self.path(&file)
    }

    /// Issues `OUT.cert` for `subject`'s key, signed by `issuer` (a name
    /// whose `.key` and `.cert` exist, e.g. `authority`), with `extra`
    /// arguments (role and the rest); replaces an `OUT.cert` issued before.
    pub fn issue(&self, out: &str, subject: &str, issuer: &str, extra: &[&str]) -> PathBuf {
        self.key(subject);
        let (key, cert, out_file) = (
            format!("{subject}.key"),
            format!("{issuer}.cert"),
            format!("{out}.cert"),
        );
        let issuer_key = format!("{issuer}.key");
        let mut args = vec![
            "cert",
            "issue",
            "--key",
            &key,
            "--issuer-key",
            &issuer_key,
            "--issuer-cert",
            &cert,
            "-o",
            &out_file,
            // Tests issue a certificate again (a junction restarted with a
            // new one); `cert issue` refuses to overwrite without it.
            "--force",
        ];
        args.extend_from_slice(extra);
        self.run(&args);
        self.path(&out_file)
    }

    /// Writes the next revocation list, `revoked.crl`, signed by the
    /// authority, with `extra` arguments (`--cert FILE` to revoke).
    pub fn revoke(&self, extra: &[&str]) -> PathBuf {
        let mut args = vec!["cert", "revoke", "--authority-key", "authority.key"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-o", "revoked.crl"]);
        self.run(&args);
        self.path("revoked.crl")
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// A port on the junction at `socket`, registered as `name` (a name of
/// the development namespace, `t.*`): the driver that owns it (keep it, or
/// the port goes) and the port.
pub async fn registered_port(
    socket: &Path,
    name: &str,
) -> (junction_driver::Driver, junction_driver::Port) {
    let owner = junction_driver::Driver::connect(socket).await.unwrap();
    let port = owner.open_port().await.unwrap();
    let cap = port
        .mint(junction_driver::Rights::SEND | junction_driver::Rights::GRANT)
        .await
        .unwrap();
    owner.register(name, &cap).await.unwrap();
    (owner, port)
}

/// Looks `name` up until it is registered (a service process starting up),
/// for at most `patience`.
pub async fn lookup_eventually(
    driver: &junction_driver::Driver,
    name: &str,
    patience: Duration,
) -> junction_driver::Capability {
    let deadline = std::time::Instant::now() + patience;
    loop {
        match driver.lookup(name).await {
            Ok(cap) => return cap,
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("{name} never registered: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// A driver's Hello, labelled `label`: for raw clients that shake hands,
/// dribble it, or send it without waiting.
pub fn hello(label: &str) -> Header {
    Header::Hello(Hello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        max_frame: junction_road::DEFAULT_MAX_FRAME,
        label: label.into(),
    })
}

/// A bus: its authority, and junction certificates made on demand.
pub struct Bus {
    /// Its authority, and the certificates it issued.
    pub pki: TestPki,
}

impl Bus {
    /// A bus with a fresh authority.
    pub fn new() -> Self {
        Self {
            pki: TestPki::new(),
        }
    }

    /// The key and certificate of junction `id` (made by this authority).
    pub fn junction(&self, id: u16) -> (PathBuf, PathBuf) {
        let name = format!("j{id}");
        let id = id.to_string();
        let cert = self.pki.issue(
            &name,
            &name,
            "authority",
            &["--role", "junction", "--junction-id", &id],
        );
        (self.pki.path(&format!("{name}.key")), cert)
    }

    /// Starts junction `id` with its own key and certificate, listening on
    /// `port` and dialling `peers` (id, port) on loopback.
    pub fn start(&self, id: u16, port: u16, peers: &[(u16, u16)]) -> TestJunction {
        let (key, cert) = self.junction(id);
        self.start_as(id, port, peers, &key, &cert, &[])
    }

    /// Starts junction `id` as [`Bus::start`] does, with `key` and `cert`
    /// (whoever's they are) and `extra` arguments.
    pub fn start_as(
        &self,
        id: u16,
        port: u16,
        peers: &[(u16, u16)],
        key: &std::path::Path,
        cert: &std::path::Path,
        extra: &[&str],
    ) -> TestJunction {
        let id = id.to_string();
        let listen = format!("127.0.0.1:{port}");
        let authority = self.pki.path("authority.cert");
        let mut args: Vec<String> = [
            "--junction-id",
            &id,
            "--authority",
            &authority.to_string_lossy(),
            "--junction-key",
            &key.to_string_lossy(),
            "--junction-cert",
            &cert.to_string_lossy(),
            "--quic-listen",
            &listen,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for (peer, port) in peers {
            args.push("--peer".into());
            args.push(format!("{peer}@127.0.0.1:{port}"));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        TestJunction::start(&args)
    }

    /// Adds `cert`'s certificate to the bus's revocation list
    /// (`revoked.crl`, made on first use); the list's path.
    pub fn revoke(&self, cert: &std::path::Path) -> PathBuf {
        self.pki.run(&[
            "cert",
            "revoke",
            "--authority-key",
            "authority.key",
            "--cert",
            &cert.to_string_lossy(),
            "-o",
            "revoked.crl",
        ]);
        self.pki.path("revoked.crl")
    }
}

/// A UDP port free on loopback now.
pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free UDP port")
}

impl Default for Bus {
    fn default() -> Self {
        Self::new()
    }
}
