//! The socket and its files against another local user: which directories
//! clients and the junction trust, the socket's mode from its first moment,
//! and the lock file's place and life.
//!
//! "Another user" is played by what another user could do: make the
//! directory writable by all, own it (`chown` to an unused uid; the tests
//! run as root), or replace it with a symbolic link.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use junction_driver::Driver;
use junction_tests::{Proc, TempDir, TestJunction, junction_bin};

const T: Duration = Duration::from_secs(10);

/// A uid nobody on a test machine has.
const STRANGER: u32 = 12345;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), None).unwrap();
}

fn mkdir(path: &Path, mode: u32) {
    std::fs::DirBuilder::new().mode(mode).create(path).unwrap();
    // The umask may have taken bits away.
    chmod(path, mode);
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// The junction's user, as the tests run it.
fn me() -> u32 {
    junction_road::transport::unix::effective_uid().unwrap()
}

/// `junction ARGS` with `env`, its output once it exits.
fn junction(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(junction_bin());
    c.args(args)
        .env("RUST_LOG", "off")
        .env_remove("JUNCTION_SOCKET");
    for (k, v) in env {
        c.env(k, v);
    }
    run(c)
}

/// Runs `command` to its end, and kills it if it takes too long (a
/// `serve` that should have refused would run for ever).
fn run(mut command: Command) -> Output {
    let out = TempDir::new();
    let (stdout, stderr) = (out.path().join("stdout"), out.path().join("stderr"));
    let mut p = Proc::spawn(
        command
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap()),
    );
    let status = p
        .wait_timeout(T)
        .unwrap_or_else(|| panic!("{command:?} did not exit (it is killed)"));
    Output {
        status,
        stdout: std::fs::read(&stdout).unwrap(),
        stderr: std::fs::read(&stderr).unwrap(),
    }
}

/// Asserts `out` failed and said `want` on stderr.
fn refused(out: &Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it should have been refused");
    assert!(err.contains(want), "expected {want:?} in: {err}");
}

fn succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every client command the CLI has, against `socket`.
fn every_client_command(socket: &Path) -> Vec<Vec<String>> {
    let s = socket.to_str().unwrap().to_string();
    [
        vec!["ls"],
        vec!["call", "t.echo", "hi", "--timeout", "1"],
        vec!["send", "t.echo", "hi"],
        vec!["listen", "t.listener", "--count", "1"],
    ]
    .into_iter()
    .map(|args| {
        let mut v: Vec<String> = args.into_iter().map(String::from).collect();
        v.extend(["--socket".to_string(), s.clone()]);
        v
    })
    .collect()
}

/// Every CLI command, with `--socket` and through `$JUNCTION_SOCKET`, and
/// the driver's `connect`, refuse `socket` with `want`.
async fn every_client_refuses(socket: &Path, want: &str) {
    for args in every_client_command(socket) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&junction(&args, &[]), want);
    }
    refused(&junction(&["ls"], &[("JUNCTION_SOCKET", socket)]), want);
    let err = Driver::connect(socket).await.unwrap_err().to_string();
    assert!(err.contains(want), "expected {want:?} in: {err}");
}

#[tokio::test]
async fn clients_refuse_a_socket_directory_others_can_write_own_or_redirect() {
    let j = TestJunction::start(&[]);
    let dir = j.dir().to_owned();
    succeeded(&junction(&["ls"], &[("JUNCTION_SOCKET", &j.socket)]));

    chmod(&dir, 0o777);
    every_client_refuses(&j.socket, "can be written by other users").await;
    // A sticky bit does not make the socket's own directory safe: anyone
    // could have made the socket's name first.
    chmod(&dir, 0o1777);
    every_client_refuses(&j.socket, "can be written by other users").await;
    chmod(&dir, 0o700);

    chown(&dir, STRANGER);
    every_client_refuses(&j.socket, &format!("belongs to user {STRANGER}")).await;
    chown(&dir, me());

    let links = TempDir::new();
    let link = links.path().join("link");
    std::os::unix::fs::symlink(&dir, &link).unwrap();
    every_client_refuses(&link.join("j.sock"), "is a symbolic link").await;

    // A shared directory above it must be sticky, or the socket's
    // directory could be renamed away and replaced.
    let shared = TempDir::new();
    chmod(shared.path(), 0o777);
    let inner = shared.path().join("inner");
    mkdir(&inner, 0o700);
    every_client_refuses(&inner.join("j.sock"), "is not sticky").await;

    // Put right, it works again.
    succeeded(&junction(&["ls"], &[("JUNCTION_SOCKET", &j.socket)]));
    Driver::connect(&j.socket).await.unwrap();
}

#[test]
fn the_junction_refuses_to_listen_in_a_directory_that_is_not_safe() {
    let base = TempDir::new();
    let open = base.path().join("open");
    mkdir(&open, 0o1777);
    let socket = open.join("j.sock");
    refused(
        &junction(&["serve", "--socket", socket.to_str().unwrap()], &[]),
        "can be written by other users",
    );
    // Neither a socket nor a lock file was left where others could take it.
    assert_eq!(std::fs::read_dir(&open).unwrap().count(), 0);

    let theirs = base.path().join("theirs");
    mkdir(&theirs, 0o755);
    chown(&theirs, STRANGER);
    refused(
        &junction(
            &["serve", "--socket", theirs.join("j.sock").to_str().unwrap()],
            &[],
        ),
        &format!("belongs to user {STRANGER}"),
    );
}

/// The environment of a user without `$XDG_RUNTIME_DIR`: the socket goes
/// to `$TMPDIR/junction-jt/junction.sock`.
struct Fallback {
    tmp: TempDir,
}

impl Fallback {
    fn new() -> Self {
        Self {
            tmp: TempDir::new(),
        }
    }

    fn dir(&self) -> PathBuf {
        self.tmp.path().join("junction-jt")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(junction_bin());
        c.args(args)
            .env("TMPDIR", self.tmp.path())
            .env("USER", "jt")
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("JUNCTION_SOCKET")
            .env("RUST_LOG", "off")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        run(self.command(args))
    }
}

#[test]
fn the_tmpdir_fallback_directory_must_be_private_to_the_user() {
    let f = Fallback::new();
    let dir = f.dir();
    let socket = dir.join("junction.sock");

    // The junction makes it 0700, even under umask 000, and clients use it.
    let mut j = serve_with_umask_000(f.command(&["serve", "--dev-namespace", "t.*"]), &socket);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&socket) & 0o777, 0o600);
    succeeded(&f.run(&["ls"]));
    stop(&mut j);

    // Made by someone else first, or opened up, or a link: refused, by the
    // junction and by every client.
    let checks: [(&str, &dyn Fn()); 3] = [
        ("must be private", &|| chmod(&dir, 0o755)),
        ("belongs to user 12345", &|| {
            chmod(&dir, 0o700);
            chown(&dir, STRANGER);
        }),
        ("is a symbolic link", &|| {
            std::fs::remove_dir_all(&dir).unwrap();
            let elsewhere = f.tmp.path().join("elsewhere");
            mkdir(&elsewhere, 0o700);
            std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
        }),
    ];
    for (want, make) in checks {
        make();
        refused(&f.run(&["serve", "--dev-namespace", "t.*"]), want);
        refused(&f.run(&["ls"]), want);
        refused(&f.run(&["call", "t.echo", "hi"]), want);
    }
}

/// Starts `command` (a `junction serve`) with umask 000, as a careless
/// service manager might, and waits until `socket` accepts connections.
fn serve_with_umask_000(mut command: Command, socket: &Path) -> Proc {
    use std::os::unix::process::CommandExt;
    // SAFETY: umask is async-signal-safe and touches no memory.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut j = Proc::spawn(&mut command);
    let deadline = Instant::now() + T;
    while UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "the junction did not start");
        assert!(
            j.wait_timeout(Duration::from_millis(2)).is_none(),
            "the junction exited"
        );
    }
    // Once it answers a Hello its main loop runs, and with it the SIGTERM
    // handler that `stop` relies on.
    drop(junction_tests::RawClient::hello(socket));
    j
}

/// SIGTERM, and the clean exit that should follow.
fn stop(j: &mut Proc) {
    let status = j.signal_and_wait(libc::SIGTERM, T).expect("it stops");
    assert!(status.success(), "{status:?}");
}

#[test]
fn under_umask_000_the_socket_is_never_reachable_with_a_looser_mode() {
    let base = TempDir::new();
    // A directory others may enter (as a system's socket directory may be):
    // here the socket's own mode is all that keeps them out.
    let dir = base.path().join("run");
    mkdir(&dir, 0o755);
    let socket = dir.join("j.sock");
    let done = Arc::new(AtomicBool::new(false));
    let loose = Arc::new(AtomicU32::new(0));
    // Watches the socket's name as fast as it can, as another user's
    // `connect` loop would.
    let watcher = {
        let (socket, done, loose) = (socket.clone(), done.clone(), loose.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Ok(meta) = std::fs::symlink_metadata(&socket)
                    && meta.mode() & 0o077 != 0
                {
                    loose.store(meta.mode(), Ordering::Relaxed);
                }
            }
        })
    };
    let result = std::panic::catch_unwind(|| {
        for _ in 0..30 {
            let mut command = Command::new(junction_bin());
            command
                .args(["serve", "--socket"])
                .arg(&socket)
                .env("RUST_LOG", "off")
                .stdin(Stdio::null());
            let mut j = serve_with_umask_000(command, &socket);
            assert_eq!(mode(&socket) & 0o777, 0o600);
            stop(&mut j);
        }
    });
    done.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    assert_eq!(
        loose.load(Ordering::Relaxed),
        0,
        "the socket was seen with mode {:o}",
        loose.load(Ordering::Relaxed)
    );
}

#[test]
fn a_stop_leaves_no_socket_and_no_lock_and_a_restart_works() {
    let base = TempDir::new();
    let socket = base.path().join("j.sock");
    let lock = base.path().join("j.sock.lock");
    let serve = || {
        let mut c = Command::new(junction_bin());
        c.args(["serve", "--socket"])
            .arg(&socket)
            .env("RUST_LOG", "off")
            .stdin(Stdio::null());
        c
    };
    let mut j = serve_with_umask_000(serve(), &socket);
    // Held while it runs, and out of other users' reach.
    assert_eq!(mode(&lock) & 0o777, 0o600);
    stop(&mut j);
    let left: Vec<_> = std::fs::read_dir(base.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // A junction killed outright leaves its lock file; the next one takes
    // it over (and tightens an old, loose one).
    let mut j = serve_with_umask_000(serve(), &socket);
    j.kill();
    assert!(lock.exists());
    chmod(&lock, 0o644);
    let mut j = serve_with_umask_000(serve(), &socket);
    assert_eq!(mode(&lock) & 0o777, 0o600);
    stop(&mut j);
    assert!(!lock.exists() && !socket.exists());
}

#[test]
fn a_lock_file_that_is_a_link_or_another_users_is_refused() {
    let base = TempDir::new();
    let socket = base.path().join("j.sock");
    let lock = base.path().join("j.sock.lock");
    let target = base.path().join("elsewhere");
    std::os::unix::fs::symlink(&target, &lock).unwrap();
    refused(
        &junction(&["serve", "--socket", socket.to_str().unwrap()], &[]),
        "is a symbolic link, which is never followed",
    );
    assert!(!target.exists(), "the link was followed");
    std::fs::remove_file(&lock).unwrap();

    std::fs::write(&lock, b"").unwrap();
    chown(&lock, STRANGER);
    refused(
        &junction(&["serve", "--socket", socket.to_str().unwrap()], &[]),
        "is not a file of this user's",
    );
}
