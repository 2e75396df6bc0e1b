//! Watching and counting the traffic with real binaries: `junction
//! monitor` sees sends, calls, replies and their metadata, filters, prints
//! JSON lines, shows payloads only to those allowed, drops its own events
//! (and says so) rather than hold traffic up, and sees across a Highway;
//! the traffic counters match what was sent, in `junction top`, `junction
//! ls` and on the Prometheus endpoint.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use junction_driver::{Driver, Rights};
use junction_road::monitor::TrafficReport;
use junction_tests::{
    Bus, Proc, TestJunction, TestPki, free_port, lookup_eventually, registered_port,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A running `junction monitor` and the lines it prints, as they come.
struct Monitor {
    _proc: Proc,
    lines: mpsc::Receiver<String>,
}

impl Monitor {
    /// Starts `junction monitor ARGS` with `command` (a junction's), and
    /// waits until the junction has attached it.
    fn start(mut command: Command) -> Monitor {
        let mut proc = Proc::spawn(command.stdout(Stdio::piped()).stderr(Stdio::piped()));
        let mut stderr = BufReader::new(proc.stderr().expect("stderr is piped"));
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        assert!(
            line.starts_with("monitoring junction"),
            "the monitor did not start: {line}"
        );
        let stdout = proc.stdout().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Monitor { _proc: proc, lines }
    }

    /// The next line, within `patience`.
    fn line(&self, patience: Duration) -> Option<String> {
        self.lines.recv_timeout(patience).ok()
    }

    /// The next JSON event, within ten seconds.
    fn event(&self) -> serde_json::Value {
        let line = self
            .line(Duration::from_secs(10))
            .expect("the monitor printed an event");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// Events until one satisfies `want`, within `patience`.
    fn event_where(
        &self,
        patience: Duration,
        mut want: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + patience;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .line(left)
                .expect("the monitor printed the event looked for");
            let v: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            if want(&v) {
                return v;
            }
        }
    }
}

/// The junction's traffic counters.
fn traffic(socket: &std::path::Path) -> TrafficReport {
    runtime().block_on(async {
        let driver = Driver::connect(socket).await.unwrap();
        driver.traffic().await.unwrap()
    })
}

fn echo(j: &TestJunction, name: &str) -> Proc {
    let proc = Proc::spawn(
        j.command(&["echo", "--name", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !j
        .command(&["ls"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(name))
        .unwrap_or(false)
    {
        assert!(Instant::now() < deadline, "{name} did not register");
        std::thread::sleep(Duration::from_millis(20));
    }
    proc
}

fn run(j: &TestJunction, args: &[&str]) -> String {
    let out = j.command(args).output().unwrap();
    assert!(
        out.status.success(),
        "junction {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A call, its reply and a send, each with its kind, origin, sender,
/// target, name, size and payload, as JSON lines; and the text form.
#[test]
fn a_monitor_sees_sends_calls_and_replies() {
    let j = TestJunction::start(&[]);
    let _echo = echo(&j, "t.echo");
    let m = Monitor::start(j.command(&["monitor", "--json", "--payload", "--name", "t.echo"]));
    assert_eq!(run(&j, &["call", "t.echo", "hello"]).trim(), "hello");
    run(&j, &["send", "t.echo", "hi!"]);

    let call = m.event();
    assert_eq!(call["kind"], "call", "{call}");
    assert_eq!(call["names"][0], "t.echo");
    assert_eq!(call["size"], 5);
    assert_eq!(call["payload_text"], "hello");
    assert_eq!(call["uid"], 0, "the sender's uid, from the OS");
    assert!(call["identity"].is_null());
    let (origin, target) = (call["origin"].clone(), call["target"].clone());
    assert!(origin.as_str().unwrap().starts_with("1."));
    assert!(call["unix_ms"].as_u64().unwrap() > 1_700_000_000_000);

    let reply = m.event();
    assert_eq!(reply["kind"], "reply", "{reply}");
    assert_eq!(reply["target"], origin, "the reply goes to the caller");
    assert_eq!(reply["payload_text"], "hello");

    let send = m.event();
    assert_eq!(send["kind"], "send", "{send}");
    assert_eq!(send["target"], target);
    assert_eq!(send["size"], 3);
    assert_eq!(send["dropped"], 0);

    // The text form: one line a message.
    let text = Monitor::start(j.command(&["monitor", "--name", "t.echo"]));
    run(&j, &["send", "t.echo", "text"]);
    let line = text.line(Duration::from_secs(10)).unwrap();
    assert!(line.contains(" send "), "{line}");
    assert!(line.contains("t.echo 4 B"), "{line}");
    assert!(line.contains("(uid 0)"), "{line}");
    assert!(
        !line.contains("text"),
        "no payload without --payload: {line}"
    );
}

/// Filters by name, port, junction and sender pick what a monitor sees.
#[test]
fn filters_pick_what_a_monitor_sees() {
    let j = TestJunction::start(&[]);
    let _a = echo(&j, "t.a");
    let _b = echo(&j, "t.b");
    let by_name = Monitor::start(j.command(&["monitor", "--json", "--name", "t.b"]));
    let elsewhere = Monitor::start(j.command(&["monitor", "--json", "--junction", "7"]));
    let anonymous = Monitor::start(j.command(&["monitor", "--json", "--from", "anonymous"]));
    let by_key = Monitor::start(j.command(&["monitor", "--json", "--from", "abcdef"]));
    let by_uid =
        Monitor::start(j.command(&["monitor", "--json", "--from", "uid:0", "--name", "t.a"]));
    run(&j, &["send", "t.a", "to a"]);
    run(&j, &["send", "t.b", "to b"]);
    let seen = by_name.event();
    assert_eq!(seen["names"][0], "t.b", "{seen}");
    let seen = by_uid.event();
    assert_eq!(seen["names"][0], "t.a", "{seen}");
    // By port: the address the name filter saw.
    let port = seen["target"].as_str().unwrap().to_string();
    let by_port = Monitor::start(j.command(&["monitor", "--json", "--port", &port]));
    run(&j, &["send", "t.b", "not this"]);
    run(&j, &["send", "t.a", "this"]);
    let seen = by_port.event();
    assert_eq!(seen["target"], port.as_str(), "{seen}");
    assert_eq!(seen["size"], 4);
    // No sender proved an identity; nobody here is junction 7.
    assert_eq!(anonymous.event()["size"], 4);
    assert_eq!(elsewhere.line(Duration::from_millis(500)), None);
    assert_eq!(by_key.line(Duration::from_millis(100)), None);
}

/// Payloads, and monitoring at all, need the junction's own user (or
/// root) or a certificate granting junction.monitor(.payload): another
/// user is refused, one with a junction.monitor certificate sees metadata
/// but not payloads.
#[test]
fn only_those_allowed_may_monitor_and_see_payloads() {
    const NOBODY: u32 = 65534;
    let pki = TestPki::new();
    let authority = pki.path("authority.cert");
    let j = TestJunction::start(&["--authority", &authority.to_string_lossy()]);
    // Let another user reach the socket.
    std::fs::set_permissions(j.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&j.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let cert = pki.issue(
        "watcher",
        "watcher",
        "authority",
        &["--role", "service", "--name", "junction.monitor"],
    );
    let key = pki.path("watcher.key");
    let (key_copy, cert_copy) = (j.dir().join("watcher.key"), j.dir().join("watcher.cert"));
    std::fs::copy(&key, &key_copy).unwrap();
    std::fs::copy(&cert, &cert_copy).unwrap();
    for file in [&key_copy, &cert_copy] {
        std::os::unix::fs::chown(file, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let as_nobody = |args: &[&str]| {
        let mut c = j.command(args);
        c.uid(NOBODY).gid(NOBODY).current_dir("/");
        c
    };
    let refused = |mut c: Command| {
        let mut proc = Proc::spawn(c.stdout(Stdio::null()).stderr(Stdio::piped()));
        let mut err = String::new();
        proc.stderr().unwrap().read_to_string(&mut err).unwrap();
        let status = proc.wait_timeout(Duration::from_secs(10)).unwrap();
        assert!(!status.success(), "the monitor was let in");
        err
    };
    let err = refused(as_nobody(&["monitor"]));
    assert!(err.contains("cannot monitor"), "{err}");
    assert!(
        err.contains("junction.monitor"),
        "says what would do: {err}"
    );
    let err = refused(as_nobody(&["monitor", "--payload"]));
    assert!(err.contains("cannot monitor"), "{err}");

    let key_arg = key_copy.to_string_lossy().into_owned();
    let cert_arg = cert_copy.to_string_lossy().into_owned();
    let certified = |extra: &[&str]| {
        let mut args = vec!["monitor", "--json", "--key", &key_arg, "--cert", &cert_arg];
        args.extend_from_slice(extra);
        as_nobody(&args)
    };
    let err = refused(certified(&["--payload"]));
    assert!(err.contains("payloads are shown only"), "{err}");
    let _echo = echo(&j, "t.echo");
    let m = Monitor::start(certified(&[]));
    run(&j, &["send", "t.echo", "secret"]);
    let seen = m.event();
    assert_eq!(seen["kind"], "send");
    assert_eq!(seen["size"], 6);
    assert!(seen.get("payload_text").is_none(), "{seen}");
}

/// A monitor that stops reading loses its own events: the traffic goes on
/// at full speed, the junction counts the drops, and the monitor says how
/// many it lost once it reads again.
#[test]
fn a_slow_monitor_drops_its_events_and_holds_nothing_up() {
    const MESSAGES: usize = 5000;
    let j = TestJunction::start(&[]);
    // A monitor whose stdout nobody reads: it blocks, and so does its
    // reading of the junction.
    let mut stuck = Proc::spawn(
        j.command(&["monitor"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let mut line = String::new();
    BufReader::new(stuck.stderr().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("monitoring"), "{line}");
    let rt = runtime();
    let took = rt.block_on(async {
        let (_server, mut port) = registered_port(&j.socket, "t.sink").await;
        let client = Driver::connect(&j.socket).await.unwrap();
        let sink = client.lookup("t.sink").await.unwrap();
        let start = Instant::now();
        let sending = async {
            for i in 0..MESSAGES {
                client.send(&sink, format!("message {i}")).await.unwrap();
            }
        };
        let receiving = async {
            for _ in 0..MESSAGES {
                port.recv().await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(sending, receiving)
        })
        .await
        .expect("the traffic went on while the monitor was stuck");
        start.elapsed()
    });
    let report = traffic(&j.socket);
    assert!(
        report.monitor_drops > 0,
        "the stuck monitor dropped events: {report:?}"
    );
    assert_eq!(report.monitors, 1);
    eprintln!(
        "{MESSAGES} messages in {took:?} past a stuck monitor; {} events dropped",
        report.monitor_drops
    );
    // It reads again: what was queued, then news of what it lost.
    let stdout = stuck.stdout().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    run(&j, &["ls"]);
    let out = j.command(&["send", "t.sink", "one more"]).output().unwrap();
    let _ = out;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the monitor reported its drops");
        if line.contains("events dropped") {
            break;
        }
    }
}

/// Messages and bytes counted per identity, port and direction match what
/// was sent, through the control port, `junction top --once`, `junction
/// ls`, and the Prometheus endpoint.
#[test]
fn traffic_counts_match_what_was_sent() {
    let pki = TestPki::new();
    let authority = pki.path("authority.cert");
    let metrics_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let metrics = format!("127.0.0.1:{metrics_port}");
    let j = TestJunction::start(&[
        "--authority",
        &authority.to_string_lossy(),
        "--metrics",
        &metrics,
    ]);
    let client_cert = pki.issue("client", "client", "authority", &["--role", "client"]);
    let service_cert = pki.issue(
        "service",
        "service",
        "authority",
        &["--role", "service", "--name", "t.count"],
    );
    let read_key = |name: &str| {
        junction_identity::SecretKey::from_pem(
            &std::fs::read_to_string(pki.path(&format!("{name}.key"))).unwrap(),
        )
        .unwrap()
    };
    let read_chain = |path: &std::path::Path| {
        junction_identity::Certificate::chain_from_pem(&std::fs::read_to_string(path).unwrap())
            .unwrap()
    };
    let (client_label, service_label, report) = runtime().block_on(async {
        let service = Driver::connect(&j.socket).await.unwrap();
        let service_id = service
            .authenticate(&read_key("service"), read_chain(&service_cert))
            .await
            .unwrap();
        let mut port = service.open_port().await.unwrap();
        let cap = port.mint(Rights::SEND | Rights::GRANT).await.unwrap();
        service.register("t.count", &cap).await.unwrap();
        let client = Driver::connect(&j.socket).await.unwrap();
        let client_id = client
            .authenticate(&read_key("client"), read_chain(&client_cert))
            .await
            .unwrap();
        let target = lookup_eventually(&client, "t.count", Duration::from_secs(5)).await;
        let serve = async {
            for _ in 0..15 {
                let msg = port.recv().await.unwrap();
                if msg.is_call() {
                    msg.reply(vec![7u8; 30]).unwrap();
                }
            }
        };
        let ask = async {
            for _ in 0..10 {
                client.send(&target, vec![1u8; 100]).await.unwrap();
            }
            for _ in 0..5 {
                let reply = client
                    .call(&target, vec![2u8; 20], Duration::from_secs(10))
                    .await
                    .unwrap();
                assert_eq!(reply.payload.len(), 30);
            }
        };
        tokio::join!(serve, ask);
        service.sync().await.unwrap();
        (
            client_id.key.to_hex()[..16].to_string(),
            format!("{} t.count", &service_id.key.to_hex()[..16]),
            // Asked while the service's port is open.
            client.traffic().await.unwrap(),
        )
    });
    let row = |label: &str| {
        report
            .identities
            .iter()
            .find(|r| r.identity == label)
            .unwrap_or_else(|| panic!("{label} is not counted: {report:?}"))
            .tally
    };
    let client = row(&client_label);
    assert_eq!(
        (client.sent_messages, client.sent_bytes),
        (15, 10 * 100 + 5 * 20)
    );
    assert_eq!((client.received_messages, client.received_bytes), (5, 150));
    let service = row(&service_label);
    assert_eq!(
        (service.received_messages, service.received_bytes),
        (15, 1100)
    );
    assert_eq!((service.sent_messages, service.sent_bytes), (5, 150));
    let port = report
        .ports
        .iter()
        .find(|p| p.names == ["t.count"])
        .expect("the service's port is counted");
    assert_eq!(
        (port.tally.received_messages, port.tally.received_bytes),
        (15, 1100)
    );
    // The connections are closed now: their counts stay.
    let later = traffic(&j.socket);
    assert!(
        later
            .identities
            .iter()
            .any(|r| r.identity == client_label && r.connections == 0 && r.tally == client)
    );

    let top = run(&j, &["top", "--once"]);
    assert!(top.contains(&client_label), "{top}");
    assert!(top.contains("IDENTITY"), "{top}");
    let top: serde_json::Value =
        serde_json::from_str(&run(&j, &["top", "--once", "--json"])).unwrap();
    let rows = top["identities"].as_array().unwrap();
    let mine = rows
        .iter()
        .find(|r| r["identity"] == client_label.as_str())
        .unwrap();
    assert_eq!(mine["tally"]["sent_messages"], 15);
    let ls = run(&j, &["ls"]);
    assert!(ls.contains(&service_label), "{ls}");
    let json: serde_json::Value = serde_json::from_str(&run(&j, &["ls", "--json"])).unwrap();
    assert!(json["traffic"]["identities"].is_array(), "{json}");

    // Prometheus text: every sample line parses; the client's count is there.
    let mut http = std::net::TcpStream::connect(&metrics).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    http.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let mut found = false;
    for line in body.lines() {
        if line.starts_with('#') {
            assert!(
                line.starts_with("# HELP ") || line.starts_with("# TYPE "),
                "{line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name{labels} value");
        value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
        assert!(series.ends_with('}') && series.contains('{'), "{line}");
        if series
            == format!(
                "junction_identity_messages_sent_total{{junction=\"1\",identity=\"{client_label}\"}}"
            )
        {
            assert_eq!(value, "15");
            found = true;
        }
    }
    assert!(found, "the client's count is exported: {body}");
    // Anything else is refused, and a huge request head too.
    let mut http = std::net::TcpStream::connect(&metrics).unwrap();
    http.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut response = String::new();
    http.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    let mut http = std::net::TcpStream::connect(&metrics).unwrap();
    let _ = http.write_all(&vec![b'a'; 16 * 1024]);
    let mut response = String::new();
    let _ = http.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");

    // A non-loopback address is refused unless forced.
    let out = j
        .command(&[
            "serve",
            "--socket",
            "/nonexistent/x",
            "--metrics",
            "192.0.2.1:9464",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a loopback address"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A junction's monitor sees the messages that cross its Highways, with
/// their origins on the other junction, and counts them per junction.
#[test]
fn a_monitor_sees_across_a_highway() {
    let bus = Bus::new();
    let ports = [free_port(), free_port()];
    let j1 = bus.start(1, ports[0], &[]);
    let j2 = bus.start(2, ports[1], &[(1, ports[0])]);
    let _echo = Proc::spawn(
        j2.command(&["echo", "--name", "t.echo"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let m1 = Monitor::start(j1.command(&["monitor", "--json", "--payload", "--junction", "2"]));
    let m2 = Monitor::start(j2.command(&["monitor", "--json", "--junction", "1"]));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = j1
            .command(&["call", "t.echo", "across", "--timeout", "2"])
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "no call across the Highway");
        std::thread::sleep(Duration::from_millis(100));
    }
    // On junction 1: the call leaving for 2, the reply coming from 2.
    let call = m1.event_where(Duration::from_secs(10), |v| v["kind"] == "call");
    assert!(call["target"].as_str().unwrap().starts_with("2."), "{call}");
    assert!(call["origin"].as_str().unwrap().starts_with("1."), "{call}");
    assert_eq!(call["payload_text"], "across");
    let reply = m1.event_where(Duration::from_secs(10), |v| v["kind"] == "reply");
    assert!(
        reply["origin"].as_str().unwrap().starts_with("2."),
        "{reply}"
    );
    // On junction 2: the call coming from 1, to the service by name.
    let call = m2.event_where(Duration::from_secs(10), |v| v["kind"] == "call");
    assert!(call["origin"].as_str().unwrap().starts_with("1."), "{call}");
    assert_eq!(call["names"][0], "t.echo");
    let reply = m2.event_where(Duration::from_secs(10), |v| v["kind"] == "reply");
    assert_eq!(reply["target"], "1.0", "{reply}");
    // Counted per junction, both ways.
    let report = traffic(&j1.socket);
    let two = report
        .junctions
        .iter()
        .find(|r| r.junction == 2)
        .expect("traffic with junction 2 is counted");
    assert!(two.tally.sent_messages >= 1 && two.tally.received_messages >= 1);
}
