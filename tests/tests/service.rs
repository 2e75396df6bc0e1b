//! Running the junction as a service, with the real binary: readiness
//! (`--ready-fd`, `junction wait`, systemd's `NOTIFY_SOCKET`), socket
//! activation, `junction reload`, the socket's mode and group and
//! `allow_gids`, `junction config check`, and the systemd units in deploy/.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use junction_driver::Driver;
use junction_tests::{Proc, TempDir, TestJunction, TestPki, junction_bin, text};

/// How long anything may take before the test gives up (not a timing
/// assertion: a hung junction must not hang the suite).
const T: Duration = Duration::from_secs(20);

/// The workspace's deploy/ directory.
fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// `junction serve` on `socket` with `extra` arguments, its log in `dir`.
fn serve(dir: &Path, socket: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(junction_bin());
    c.arg("serve")
        .arg("--socket")
        .arg(socket)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(dir.join("junction.log")).unwrap());
    c
}

fn run(args: &[&str]) -> Output {
    Command::new(junction_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("junction runs")
}

/// Makes descriptor `from` the child's descriptor `to` (not closed on exec).
fn hand_over(command: &mut Command, from: i32, to: i32) {
    // SAFETY: dup2 is async-signal-safe; it runs in the child between fork
    // and exec, on descriptors the parent keeps open until spawn returns.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            // dup2 onto itself would leave close-on-exec set.
            let done = if from == to {
                libc::fcntl(to, libc::F_SETFD, 0)
            } else {
                libc::dup2(from, to)
            };
            if done < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid()
    }
}

fn egid() -> u32 {
    // SAFETY: getegid cannot fail and touches no memory.
    #[allow(unsafe_code)]
    unsafe {
        libc::getegid()
    }
}

#[tokio::test]
async fn ready_fd_says_ready_once_the_socket_accepts() {
    let dir = TempDir::new();
    let socket = dir.path().join("j.sock");
    let (mut reader, writer) = std::io::pipe().unwrap();
    let mut command = serve(dir.path(), &socket, &["--ready-fd", "5"]);
    hand_over(&mut command, writer.as_raw_fd(), 5);
    let _junction = Proc::spawn(&mut command);
    drop(writer);
    // The junction writes one line and closes its end: reading to the end
    // returns once it did, with no polling.
    let mut said = String::new();
    reader.read_to_string(&mut said).unwrap();
    assert_eq!(said, "READY\n");
    // Ready means accepting: the first try connects.
    Driver::connect(&socket)
        .await
        .expect("a ready junction answers");
}

#[test]
fn ready_fd_must_be_open() {
    let dir = TempDir::new();
    let socket = dir.path().join("j.sock");
    let out = serve(dir.path(), &socket, &["--ready-fd", "77"])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("--ready-fd 77: no such open file descriptor"),
        "{err}"
    );
    assert!(!socket.exists(), "it never listened");
}

#[test]
fn wait_returns_once_a_junction_answers_and_fails_clearly_without_one() {
    let dir = TempDir::new();
    let socket = dir.path().join("j.sock");
    // Started before the junction: it waits for it.
    let mut wait = Proc::spawn(
        Command::new(junction_bin())
            .args(["wait", "--timeout", "60s", "--socket"])
            .arg(&socket)
            .stdin(Stdio::null()),
    );
    let _junction = Proc::spawn(&mut serve(dir.path(), &socket, &["--dev-namespace", "t.*"]));
    let status = wait.wait_timeout(T * 3).expect("wait returned");
    assert!(status.success(), "{status}");

    // With --name, it also waits for a service started in the background.
    let mut wait = Proc::spawn(
        Command::new(junction_bin())
            .args(["wait", "--name", "t.late", "--timeout", "60s", "--socket"])
            .arg(&socket)
            .stdin(Stdio::null()),
    );
    let _listener = Proc::spawn(
        Command::new(junction_bin())
            .args(["listen", "t.late", "--socket"])
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    let status = wait.wait_timeout(T * 3).expect("wait returned");
    assert!(status.success(), "{status}");
    let out = run(&[
        "wait",
        "--name",
        "t.never",
        "--timeout",
        "200ms",
        "--socket",
        socket.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("t.never was not registered within 200ms"),
        "{err}"
    );

    let nowhere = dir.path().join("nobody-here.sock");
    let out = run(&[
        "wait",
        "--timeout",
        "200ms",
        "--socket",
        nowhere.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("no junction answered within 200ms"), "{err}");
    assert!(err.contains(nowhere.to_str().unwrap()), "{err}");
}

/// Starts `junction serve` as systemd would for socket activation: the
/// listening socket as descriptor 3, `LISTEN_FDS=1` and `LISTEN_PID` set to
/// the junction's own pid (by a shell that then execs it, keeping its pid).
fn activated(dir: &Path, listener_fd: i32, extra: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(junction_bin())
        .arg("serve")
        .arg("--socket")
        .arg(dir.join("unused.sock"))
        .args(extra)
        .env("LISTEN_FDS", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(dir.join("junction.log")).unwrap());
    hand_over(&mut c, listener_fd, 3);
    c
}

#[tokio::test]
async fn socket_activation_takes_the_listener_from_fd_3() {
    let dir = TempDir::new();
    let socket = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let (mut reader, writer) = std::io::pipe().unwrap();
    let mut command = activated(dir.path(), listener.as_raw_fd(), &["--ready-fd", "5"]);
    hand_over(&mut command, writer.as_raw_fd(), 5);
    let mut junction = Proc::spawn(&mut command);
    drop(writer);
    drop(listener);
    let mut said = String::new();
    reader.read_to_string(&mut said).unwrap();
    assert_eq!(said, "READY\n");
    let driver = Driver::connect(&socket)
        .await
        .expect("the passed socket answers");
    let listing = driver.listing().await.unwrap();
    assert_eq!(listing.junction, 1);
    drop(driver);
    assert!(
        !dir.path().join("unused.sock").exists(),
        "it bound no socket of its own"
    );
    let status = junction
        .signal_and_wait(libc::SIGTERM, T)
        .expect("it exits on SIGTERM");
    assert!(status.success(), "{status}");
    assert!(
        socket.exists(),
        "systemd owns the socket file; the junction leaves it"
    );
    let log = std::fs::read_to_string(dir.path().join("junction.log")).unwrap();
    assert!(log.contains("socket activation"), "{log}");
}

#[test]
fn socket_activation_refuses_what_is_not_a_listening_unix_socket() {
    let dir = TempDir::new();
    let file = std::fs::File::create(dir.path().join("not-a-socket")).unwrap();
    let out = activated(dir.path(), file.as_raw_fd(), &[])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("descriptor 3 is not a listening Unix stream socket"),
        "{err}"
    );
    // A Unix socket that does not listen is refused too.
    let (a, _b) = UnixStream::pair().unwrap();
    let out = activated(dir.path(), a.as_raw_fd(), &[])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(err.contains("it is not listening"), "{err}");
}

/// The next message the junction sends to the notify socket.
fn notified(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a notification within the limit");
    text(&buf[..n])
}

#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    let dir = TempDir::new();
    let socket = dir.path().join("j.sock");
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(T)).unwrap();
    let mut junction =
        Proc::spawn(serve(dir.path(), &socket, &[]).env("NOTIFY_SOCKET", &notify_path));
    let ready = notified(&notify);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(ready.contains("STATUS=accepting on"), "{ready}");

    let out = run(&["reload", "--socket", socket.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reloading = notified(&notify);
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading}");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let again = notified(&notify);
    assert!(again.lines().any(|l| l == "READY=1"), "{again}");

    junction
        .signal_and_wait(libc::SIGTERM, T)
        .expect("it exits");
    let stopping = notified(&notify);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
}

#[tokio::test]
async fn reload_puts_a_new_revocation_list_and_allow_lists_in_force() {
    let pki = TestPki::new();
    pki.issue(
        "svc",
        "svc",
        "authority",
        &["--role", "service", "--name", "org.acme.svc"],
    );
    pki.revoke(&[]);
    let config = pki.path("junction.toml");
    let write_config = |extra: &str| {
        std::fs::write(
            &config,
            format!(
                "authority = {:?}\nrevocations = {:?}\n{extra}",
                pki.path("authority.cert"),
                pki.path("revoked.crl")
            ),
        )
        .unwrap()
    };
    write_config("");
    let j = TestJunction::start(&["--config", config.to_str().unwrap()]);
    let authenticate = || async {
        let d = Driver::connect(&j.socket).await.unwrap();
        let key = junction_identity::SecretKey::from_pem(
            &std::fs::read_to_string(pki.path("svc.key")).unwrap(),
        )
        .unwrap();
        let chain = junction_identity::Certificate::chain_from_pem(
            &std::fs::read_to_string(pki.path("svc.cert")).unwrap(),
        )
        .unwrap();
        d.authenticate(&key, chain).await
    };
    authenticate().await.expect("not revoked yet");

    pki.revoke(&["--cert", "svc.cert"]);
    let out = j.command(&["reload"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("revoked.crl reloaded (1 revoked)"), "{said}");
    // The reload is done when the command returns: no waiting.
    match authenticate().await {
        Err(junction_driver::Error::Refused { code, .. }) => {
            assert_eq!(code, junction_driver::ErrorCode::CertificateRevoked)
        }
        other => panic!("the revoked certificate was taken: {other:?}"),
    }

    // Allow lists and connection limits apply at once; others need a
    // restart, and the reload says so and fails.
    write_config(&format!(
        "allow_uids = [{}]\nmax_connections = 100\n",
        euid()
    ));
    let out = j.command(&["reload"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains(&format!("allow_uids is now [{}]", euid())),
        "{said}"
    );
    assert!(said.contains("max_connections is now 100"), "{said}");
    write_config(&format!("allow_uids = [{}]\nwindow = 8\n", euid()));
    let out = j.command(&["reload"]).output().unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("window changed (1024 -> 8)"), "{err}");
    assert!(err.contains("restart the junction"), "{err}");
    assert!(j.log().contains("window changed"), "{}", j.log());
    // The metrics endpoint is bound once too: a reload that would move it
    // says so.
    write_config(&format!(
        "allow_uids = [{}]\nmetrics = \"127.0.0.1:9\"\n",
        euid()
    ));
    let out = j.command(&["reload"]).output().unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("metrics changed (off -> 127.0.0.1:9)"),
        "{err}"
    );
    // Taking the list out of the file un-revokes nothing.
    std::fs::write(
        &config,
        format!("authority = {:?}\n", pki.path("authority.cert")),
    )
    .unwrap();
    let out = j.command(&["reload"]).output().unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("revocations was removed"), "{err}");
    assert!(authenticate().await.is_err(), "still revoked");
    // A file that does not parse keeps everything in force.
    std::fs::write(&config, "window = \"many\"").unwrap();
    let out = j.command(&["reload"]).output().unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("the configuration did not load"), "{err}");
    Driver::connect(&j.socket)
        .await
        .expect("still serving, to the same users");
}

#[test]
fn sighup_reloads_as_junction_reload_does() {
    let dir = TempDir::new();
    let socket = dir.path().join("j.sock");
    let config = dir.path().join("junction.toml");
    std::fs::write(&config, "").unwrap();
    let mut j = Proc::spawn(&mut serve(
        dir.path(),
        &socket,
        &["--config", config.to_str().unwrap()],
    ));
    let out = run(&["wait", "--socket", socket.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::write(&config, "max_connections_per_uid = 7\n").unwrap();
    let log = || std::fs::read_to_string(dir.path().join("junction.log")).unwrap();
    // SAFETY: kill has no memory-safety preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(j.pid() as i32, libc::SIGHUP);
    }
    let deadline = Instant::now() + T;
    while !log().contains("SIGHUP: max_connections is now") {
        assert!(Instant::now() < deadline, "no reload logged: {}", log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(log().contains("max_connections_per_uid 7"), "{}", log());
    j.signal_and_wait(libc::SIGTERM, T).expect("it exits");
}

/// Runs `command` as uid and gid 65534 (nobody) with `groups` as its
/// supplementary groups. Needs root.
fn as_nobody(command: &mut Command, groups: Vec<libc::gid_t>) -> &mut Command {
    // SAFETY: setgroups, setgid and setuid are async-signal-safe system
    // calls, run in the child between fork and exec; `groups` is moved in.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

#[test]
fn socket_mode_and_group_are_set_and_allow_gids_narrow_who_gets_in() {
    let dir = TempDir::new();
    let socket = dir.path().join("j.sock");
    let root = euid() == 0;
    // Root may give the socket any group; others only their own.
    let group = if root { 1 } else { egid() };
    let mut j = Proc::spawn(&mut serve(
        dir.path(),
        &socket,
        &[
            "--socket-mode",
            "0666",
            "--socket-group",
            &group.to_string(),
            "--allow-uid",
            &euid().to_string(),
            "--allow-gid",
            "4242",
        ],
    ));
    let out = run(&["wait", "--socket", socket.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o666);
    assert_eq!(meta.gid(), group);

    if !root {
        println!("skipped the allow_gids part: it needs root to run clients as other users");
        return;
    }
    // Others may reach the socket only through a directory that root owns
    // and nobody else can write (the clients' own check).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let wait_as = |groups: Vec<libc::gid_t>| {
        as_nobody(
            Command::new(junction_bin())
                .args(["wait", "--timeout", "300ms", "--socket"])
                .arg(&socket)
                .stdin(Stdio::null()),
            groups,
        )
        .output()
        .unwrap()
    };
    let out = wait_as(vec![]);
    assert!(!out.status.success(), "nobody got in");
    let err = text(&out.stderr);
    assert!(
        err.contains("user 65534 (group 65534) may not use this junction"),
        "{err}"
    );
    // A supplementary group in allow_gids lets in (SO_PEERGROUPS).
    let out = wait_as(vec![4242]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // And nobody, let in, may still not reload it.
    let out = as_nobody(
        Command::new(junction_bin())
            .args(["reload", "--socket"])
            .arg(&socket)
            .stdin(Stdio::null()),
        vec![4242],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("user 65534 may not reload this junction: only its own user (0) and root may"),
        "{err}"
    );
    j.signal_and_wait(libc::SIGTERM, T).expect("it exits");
    let log = std::fs::read_to_string(dir.path().join("junction.log")).unwrap();
    assert!(
        log.contains("refused a reload over the control port"),
        "{log}"
    );
}

#[test]
fn config_check_passes_the_shipped_file_and_names_every_problem() {
    let shipped = deploy().join("junction.toml");
    let out = run(&["config", "check", shipped.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert_eq!(text(&out.stdout), format!("{}: ok\n", shipped.display()));

    let dir = TempDir::new();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "junction_id = 0\nwindow = 0\nsocket_mode = \"0999\"\nsocket_group = \"no-such-group-here\"\n\
         authority = \"/nonexistent/authority.cert\"\npeers = [\"2@host\"]\n\
         junction_key = \"/nonexistent/j.key\"\ndev_namespace = [\"not a pattern\"]\n",
    )
    .unwrap();
    let out = run(&["config", "check", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let said = text(&out.stdout);
    for field in [
        "junction_id:",
        "window = 0",
        "socket_mode:",
        "socket_group:",
        "authority:",
        "peers:",
        "junction_key, junction_cert: give both or neither",
        "dev_namespace:",
    ] {
        assert!(
            said.lines()
                .any(|l| l.starts_with(&format!("{}: {field}", bad.display()))),
            "no line for {field}: {said}"
        );
    }
    assert!(
        text(&out.stderr).contains("has 8 problems"),
        "{}",
        text(&out.stderr)
    );

    std::fs::write(&bad, "window = \"many\"\n").unwrap();
    let out = run(&["config", "check", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let said = text(&out.stdout);
    assert!(said.contains("line 1") && said.contains("window"), "{said}");
}

#[test]
fn the_shipped_config_lists_every_field_with_its_default() {
    let shipped = std::fs::read_to_string(deploy().join("junction.toml")).unwrap();
    // The parser names every field it knows when it meets one it does not.
    let e = junction::config::FileConfig::parse("no_such_field = 1").unwrap_err();
    let message = e.to_string();
    let (_, expected) = message
        .split_once("expected one of")
        .expect("the parser lists the fields");
    let fields: Vec<&str> = expected
        .split(['`', ','])
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .collect();
    assert!(fields.len() > 20, "{fields:?}");
    for field in &fields {
        assert!(
            shipped.contains(&format!("\n# {field} = ")),
            "deploy/junction.toml does not list {field}"
        );
    }
    // Uncommented, the file parses, and its limits are the code's defaults.
    let uncommented: String = shipped
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if fields.iter().any(|f| rest.starts_with(&format!("{f} = "))) => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let config = junction::config::FileConfig::parse(&uncommented).unwrap();
    let core = junction::core::Config::default();
    assert_eq!(config.junction_id, Some(core.junction));
    assert_eq!(config.max_frame, Some(core.max_frame));
    assert_eq!(config.window, Some(core.window));
    assert_eq!(config.max_handles, Some(core.max_handles));
    assert_eq!(config.max_ports, Some(core.max_ports));
    assert_eq!(config.max_pending_calls, Some(core.max_pending_calls));
    assert_eq!(config.max_names, Some(core.max_names));
    assert_eq!(
        config.hello_timeout_ms,
        Some(core.hello_timeout.as_millis() as u64)
    );
    let max = junction::admit::DEFAULT_MAX_CONNECTIONS;
    assert_eq!(config.max_connections, Some(max));
    assert_eq!(
        config.max_connections_per_uid,
        Some(junction::admit::default_per_uid(max))
    );
    assert_eq!(config.socket_mode.as_deref(), Some("0600"));
    assert!(config.allow_uids.is_empty() && config.allow_gids.is_empty());
}

/// The units of deploy/, with the junction of this build as their program
/// (systemd-analyze checks that it exists), in a temp dir.
fn units(dir: &Path) -> Vec<PathBuf> {
    let bin = junction_bin();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(deploy()).unwrap() {
        let path = entry.unwrap().path();
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("service" | "socket")
        ) {
            let text = std::fs::read_to_string(&path)
                .unwrap()
                .replace("/usr/local/bin/junction", bin.to_str().unwrap());
            let copy = dir.join(path.file_name().unwrap());
            std::fs::write(&copy, text).unwrap();
            out.push(copy);
        }
    }
    out.sort();
    out
}

/// `systemd-analyze` with `args`, or why it cannot run here.
fn systemd_analyze(args: &[&str], units: &[PathBuf]) -> Result<Output, String> {
    match Command::new("systemd-analyze")
        .args(args)
        .args(units)
        .output()
    {
        Ok(out) => Ok(out),
        Err(e) => Err(format!("systemd-analyze cannot run here ({e})")),
    }
}

#[test]
fn the_systemd_units_verify_and_the_system_unit_rates_ok() {
    let dir = TempDir::new();
    let units = units(dir.path());
    let names: Vec<String> = units
        .iter()
        .map(|u| u.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "junction-system.service",
            "junction-system.socket",
            "junction.service",
            "junction.socket"
        ]
    );
    for unit in &units {
        let text = std::fs::read_to_string(unit).unwrap();
        let docs = "Documentation=man:junction(1) file:///usr/share/doc/junction/README.md";
        assert!(text.contains(docs), "{}: no {docs}", unit.display());
        if unit.extension().is_some_and(|e| e == "service") {
            for needed in [
                "Type=notify",
                "ExecReload=",
                " reload --socket ",
                "LimitNOFILE=65536",
            ] {
                assert!(text.contains(needed), "{}: no {needed}", unit.display());
            }
        }
    }
    // The man page is another install step: don't ask for it here.
    let verify = match systemd_analyze(&["verify", "--man=no"], &units) {
        Ok(out) => out,
        Err(why) => {
            println!("skipped systemd-analyze verify: {why}");
            return;
        }
    };
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        text(&verify.stderr)
    );
    let security = systemd_analyze(&["security", "--offline=yes"], &units[..1]).unwrap();
    let said = text(&security.stdout);
    let Some(overall) = said.lines().find(|l| l.contains("Overall exposure level")) else {
        println!(
            "skipped systemd-analyze security: this systemd cannot rate units offline: {}",
            text(&security.stderr)
        );
        return;
    };
    println!("{overall}");
    assert!(
        overall.contains(" OK ") || overall.contains(" SAFE "),
        "the system unit must rate OK or better: {overall}"
    );
}
