//! The daemon's life: one junction per socket, stale sockets, spawned
//! children, graceful shutdown.

use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use junction_driver::{Driver, Error};
use junction_tests::{Proc, TempDir, TestJunction, junction_bin};

const T: Duration = Duration::from_secs(10);

#[test]
fn a_second_junction_on_the_same_socket_refuses_to_start() {
    let j = TestJunction::start(&[]);
    let out = Command::new(junction_bin())
        .args(["serve", "--socket"])
        .arg(&j.socket)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another junction is already running"), "{err}");
    // The first one is untouched.
    UnixStream::connect(&j.socket).expect("the first junction still listens");
}

#[test]
fn a_stale_socket_from_a_crashed_junction_is_replaced() {
    let dir = TempDir::new();
    let socket = dir.path().join("j.sock");
    // A socket file nobody listens on, as a junction killed with SIGKILL leaves.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let mut j = Proc::spawn(
        Command::new(junction_bin())
            .args(["serve", "--socket"])
            .arg(&socket)
            .env("RUST_LOG", "off")
            .stdin(Stdio::null()),
    );
    let deadline = std::time::Instant::now() + T;
    while UnixStream::connect(&socket).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the junction did not take over the stale socket"
        );
        assert!(
            j.wait_timeout(Duration::from_millis(10)).is_none(),
            "the junction exited"
        );
    }
}

/// A junction on `j.sock` in a fresh dir, spawning an echo service named
/// `name` through a shell that first records its pid in `child.pid`.
fn junction_with_recorded_child(name: &str) -> (TempDir, Proc) {
    let dir = TempDir::new();
    let socket = dir.path().join("j.sock");
    let pidfile = dir.path().join("child.pid");
    let child_cmd = format!(
        "sh -c 'echo $$ > {}; exec {} echo --name {name}'",
        pidfile.display(),
        junction_bin().display()
    );
    let j = Proc::spawn(
        Command::new(junction_bin())
            .args(["serve", "--socket"])
            .arg(&socket)
            .args(["--spawn", &child_cmd, "--dev-namespace", "t.*"])
            .env("RUST_LOG", "off")
            .stdin(Stdio::null()),
    );
    (dir, j)
}

#[tokio::test]
async fn sigterm_tells_drivers_ends_children_and_removes_the_socket() {
    let (dir, mut j) = junction_with_recorded_child("t.child");
    let socket = dir.path().join("j.sock");
    let pidfile = dir.path().join("child.pid");
    let deadline = std::time::Instant::now() + T;
    let me = loop {
        if let Ok(d) = Driver::connect(&socket).await {
            break d;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the junction did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // The spawned child registers over its stdio Road.
    let echo = loop {
        if let Ok(c) = me.lookup("t.child").await {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the child never registered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let r = me.call(&echo, "over stdio", T).await.unwrap();
    assert_eq!(&r.payload[..], b"over stdio");
    let listing = me.listing().await.unwrap();
    assert!(listing.connections.iter().any(|c| c.road == "stdio"));
    let child_pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let status = j
        .signal_and_wait(libc::SIGTERM, T)
        .expect("the junction exits on SIGTERM");
    assert!(status.success(), "{status}");
    let err = tokio::time::timeout(T, me.closed()).await.unwrap();
    assert!(
        matches!(&err, Error::Closed { reason } if reason.contains("shutting down")),
        "{err}"
    );
    assert!(!socket.exists(), "the socket is removed");
    // SAFETY: kill with signal 0 only checks that the process exists.
    #[allow(unsafe_code)]
    let alive = unsafe { libc::kill(child_pid, 0) } == 0;
    assert!(!alive, "the spawned child was ended");
}

#[test]
fn a_spawned_child_exits_when_its_junction_is_killed() {
    let (dir, mut j) = junction_with_recorded_child("t.orphan");
    let pidfile = dir.path().join("child.pid");
    let deadline = std::time::Instant::now() + T;
    while !pidfile.exists()
        || std::fs::read_to_string(&pidfile)
            .unwrap_or_default()
            .trim()
            .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the child never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let child_pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    j.kill();
    let deadline = std::time::Instant::now() + T;
    loop {
        // SAFETY: kill with signal 0 only checks that the process exists.
        #[allow(unsafe_code)]
        let alive = unsafe { libc::kill(child_pid, 0) } == 0;
        // A zombie still "exists" until reaped by init; check its state too.
        let zombie = std::fs::read_to_string(format!("/proc/{child_pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true);
        if !alive || zombie {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the orphaned child is still running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child on a stdio Road, served by a real core over real pipes: once it
/// has registered, closing its stdin is all it takes for it to exit, cleanly.
#[test]
fn a_stdio_child_exits_on_its_own_when_its_road_closes() {
    use bytes::BytesMut;
    use junction::core::{Config, Core, Now, Output, Peer};
    use junction_road::codec;
    use junction_road::control::ControlReply;
    use std::io::{Read, Write};

    let mut child = Proc::spawn(
        Command::new(junction_bin())
            .args(["echo", "--name", "t.stdio"])
            .env("JUNCTION_ROAD", "stdio")
            .env("RUST_LOG", "off")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let mut to_child = child.stdin().expect("stdin is piped");
    let mut from_child = child.stdout().expect("stdout is piped");
    let now = Now::new(std::time::Instant::now(), junction::unix_now());
    let mut core = Core::new(
        Config {
            dev_namespace: vec!["t.*".parse().unwrap()],
            ..Config::default()
        },
        now,
    );
    let conn = core.handle_connected(Peer::default(), now);
    let mut buf = BytesMut::new();
    let mut registered = false;
    while !registered {
        let frame = loop {
            if let Some(f) = codec::decode(&mut buf, 1 << 20).expect("the child frames correctly") {
                break f;
            }
            let mut chunk = [0u8; 4096];
            let n = from_child
                .read(&mut chunk)
                .expect("can read the child's stdout");
            assert!(n > 0, "the child closed its road before registering");
            buf.extend_from_slice(&chunk[..n]);
        };
        core.handle_frame(conn, frame, now);
        while let Some(out) = core.poll_output() {
            let Output::Frame { frame, .. } = out else {
                continue;
            };
            if let junction_road::Header::Deliver(d) = &frame.header
                && d.origin.port == 0
            {
                let reply: ControlReply = postcard::from_bytes(&frame.payload).unwrap();
                registered = reply == ControlReply::Registered;
            }
            let mut bytes = BytesMut::new();
            codec::encode(&frame, &mut bytes);
            to_child.write_all(&bytes).expect("can write to the child");
        }
    }
    drop(to_child);
    let status = child
        .wait_timeout(T)
        .expect("the child exits when its road closes");
    assert!(status.success(), "{status}");
}
