//! The `junction` command as people use it (issue 10, section 5): times as
//! dates and durations, listings and their JSON, a revoked listener told
//! of its loss, files not overwritten without `--force`, errors that name
//! their file once and say what to do, help with defaults and examples,
//! completions and a man page, raw replies, and the bench's progress. All
//! with the real binary; every process is killed when its test ends.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use junction_tests::{Proc, TempDir, TestJunction, TestPki, junction_bin, text};

/// How long to wait for a line a process should print soon; only a
/// failing test ever waits this long.
const PATIENCE: Duration = Duration::from_secs(30);

/// Runs `junction ARGS` in `dir`, with no junction around.
fn run_in(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(junction_bin())
        .args(args)
        .current_dir(dir)
        .env_remove("JUNCTION_SOCKET")
        .env_remove("JUNCTION_KEY")
        .env_remove("JUNCTION_CERT")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("junction runs")
}

/// Runs a command of `j`; returns (success, stdout, stderr).
fn run(j: &TestJunction, args: &[&str]) -> (bool, String, String) {
    let out = j.command(args).output().expect("junction runs");
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// The lines a child writes to stderr, as they come.
fn stderr_lines(proc: &mut Proc) -> mpsc::Receiver<String> {
    let stderr = proc.stderr().expect("stderr is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits for a line containing `want`; panics with what came instead.
fn expect_line(lines: &mpsc::Receiver<String>, want: &str) -> String {
    let mut seen = Vec::new();
    loop {
        match lines.recv_timeout(PATIENCE) {
            Ok(line) if line.contains(want) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no line with {want:?}; saw:\n{}", seen.join("\n")),
        }
    }
}

fn sighup(j: &TestJunction) {
    // SAFETY: kill has no memory-safety preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(j.process.pid() as i32, libc::SIGHUP);
    }
}

/// Runs `ls` until its output contains `want` (a reload or a registration
/// under way); panics with the last output if it never does.
fn ls_until(j: &TestJunction, args: &[&str], want: &str) -> String {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let (_, out, err) = run(j, args);
        if out.contains(want) {
            return out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ls never showed {want:?}:\n{out}{err}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A PKI with a service certificate `svc.cert` for `org.acme.svc`, and a
/// junction trusting it with an (empty) revocation list.
fn revocable_service() -> (TestPki, TestJunction) {
    let pki = TestPki::new();
    pki.issue(
        "svc",
        "svc",
        "authority",
        &["--role", "service", "--name", "org.acme.svc"],
    );
    let crl = pki.revoke(&[]);
    let authority = pki.path("authority.cert");
    let j = TestJunction::start(&[
        "--authority",
        authority.to_str().unwrap(),
        "--revocations",
        crl.to_str().unwrap(),
    ]);
    (pki, j)
}

fn revoke_svc(pki: &TestPki, j: &TestJunction) {
    pki.revoke(&["--cert", "svc.cert"]);
    sighup(j);
}

/// `junction listen NAME` with a key and certificate, its stderr piped.
fn certified_listener(
    j: &TestJunction,
    name: &str,
    key: &std::path::Path,
    cert: &std::path::Path,
) -> Proc {
    Proc::spawn(
        j.command(&[
            "listen",
            name,
            "--key",
            key.to_str().unwrap(),
            "--cert",
            cert.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped()),
    )
}

#[test]
fn a_listener_whose_certificate_is_revoked_says_so_and_exits() {
    let (pki, j) = revocable_service();
    let (key, cert) = (pki.path("svc.key"), pki.path("svc.cert"));
    let mut listener = certified_listener(&j, "org.acme.svc", &key, &cert);
    let lines = stderr_lines(&mut listener);
    expect_line(&lines, "listening as org.acme.svc");
    revoke_svc(&pki, &j);
    let said = expect_line(&lines, "withdrew");
    assert!(said.contains("has been revoked"), "{said}");
    assert!(
        said.contains("org.acme.svc is no longer registered"),
        "{said}"
    );
    assert!(said.contains("get a new certificate"), "{said}");
    let status = listener
        .wait_timeout(PATIENCE)
        .expect("the listener exits once its name is gone");
    assert_eq!(status.code(), Some(1), "it exits non-zero");
    // The loss is the junction's log too, and the name is free.
    let (ok, _, err) = run(&j, &["call", "org.acme.svc", "hi"]);
    assert!(!ok);
    assert!(
        err.contains("no service is registered as org.acme.svc"),
        "{err}"
    );
}

#[test]
fn ls_shows_a_name_its_port_lost_and_why() {
    let (pki, j) = revocable_service();
    let (key, cert) = (pki.path("svc.key"), pki.path("svc.cert"));
    // The echo service does not watch for the loss: its port lives on,
    // nameless, which is what ls must not show as a blank.
    let _echo = Proc::spawn(
        j.command(&[
            "echo",
            "--name",
            "org.acme.svc",
            "--key",
            key.to_str().unwrap(),
            "--cert",
            cert.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null()),
    );
    ls_until(&j, &["ls"], " org.acme.svc");
    revoke_svc(&pki, &j);
    let out = ls_until(&j, &["ls"], "org.acme.svc (withdrawn:");
    assert!(out.contains("has been revoked)"), "{out}");
    let (ok, json, err) = run(&j, &["ls", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("ls --json is JSON");
    let lost: Vec<&serde_json::Value> = v["ports"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["withdrawn_names"].as_array().unwrap())
        .collect();
    assert_eq!(lost.len(), 1, "{json}");
    assert_eq!(lost[0]["name"], "org.acme.svc");
}

#[test]
fn ls_names_its_unconsumed_column_and_has_json() {
    let j = TestJunction::start(&[]);
    let (ok, out, err) = run(&j, &["ls"]);
    assert!(ok, "{err}");
    assert!(out.contains("UNCONSUMED"), "{out}");
    assert!(!out.contains("QUEUED"), "{out}");
    let (_, help, _) = run(&j, &["ls", "--help"]);
    assert!(help.contains("not yet reported consumed"), "{help}");
    let (ok, json, err) = run(&j, &["ls", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["ports"][0]["unconsumed"], 0, "{json}");
}

#[test]
fn certificates_show_dates_and_take_them() {
    let pki = TestPki::new();
    pki.key("alice");
    pki.run(&[
        "cert",
        "issue",
        "--role",
        "client",
        "--key",
        "alice.key",
        "--issuer-key",
        "authority.key",
        "--issuer-cert",
        "authority.cert",
        "--not-before",
        "2030-01-02",
        "--not-after",
        "2030-02-01 12:30",
        "-o",
        "alice.cert",
    ]);
    let out = run_in(&pki.path(""), &["cert", "inspect", "alice.cert"]);
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        shown.contains("valid from: 2030-01-02 00:00 UTC (in "),
        "{shown}"
    );
    assert!(
        shown.contains("expires:    2030-02-01 12:30 UTC (in "),
        "{shown}"
    );
    assert!(shown.contains("NOT YET VALID"), "{shown}");
    assert!(!shown.contains("epoch"), "{shown}");
    let out = run_in(&pki.path(""), &["cert", "inspect", "alice.cert", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["certificates"][0]["role"], "client");
    assert_eq!(v["certificates"][0]["not_before"], 1_893_542_400u64);
    assert_eq!(
        v["certificates"][0]["not_after_utc"],
        "2030-02-01 12:30 UTC"
    );
    // Not valid yet, so it does not verify now, and says why.
    assert_eq!(v["verifies_against_its_authority"], false);
    let problem = v["problem"].as_str().unwrap();
    assert!(problem.contains("not valid before 2030-01-02"), "{problem}");
    // A revocation list has dates too.
    pki.revoke(&[]);
    let out = run_in(&pki.path(""), &["cert", "inspect", "revoked.crl"]);
    let shown = text(&out.stdout);
    assert!(shown.contains(" UTC ("), "{shown}");
    // A date that is no date says how to write one.
    let out = run_in(
        &pki.path(""),
        &[
            "cert",
            "issue",
            "--role",
            "authority",
            "--key",
            "alice.key",
            "--not-before",
            "next tuesday",
            "-o",
            "x.cert",
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("2026-12-01"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn cert_issue_and_keygen_refuse_to_overwrite_without_force() {
    let pki = TestPki::new();
    let dir = pki.path("");
    let before = std::fs::read(pki.path("authority.cert")).unwrap();
    let issue = |extra: &[&str]| {
        let mut args = vec![
            "cert",
            "issue",
            "--role",
            "authority",
            "--key",
            "authority.key",
            "-o",
            "authority.cert",
        ];
        args.extend_from_slice(extra);
        run_in(&dir, &args)
    };
    let out = issue(&[]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("authority.cert exists already"), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(pki.path("authority.cert")).unwrap(), before);
    assert!(issue(&["--force"]).status.success());
    assert_ne!(std::fs::read(pki.path("authority.cert")).unwrap(), before);

    let key = std::fs::read(pki.path("authority.key")).unwrap();
    let out = run_in(&dir, &["keygen", "authority.key"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--force"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read(pki.path("authority.key")).unwrap(), key);
    let out = run_in(&dir, &["keygen", "authority.key", "--force"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_ne!(std::fs::read(pki.path("authority.key")).unwrap(), key);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(pki.path("authority.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "a replaced key is still private");
}

#[test]
fn errors_name_their_file_once_and_say_what_to_do() {
    let pki = TestPki::new();
    let dir = pki.path("");
    let socket_dir = TempDir::new();
    let socket = socket_dir.path().join("j.sock");
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--socket", socket.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = run_in(&dir, &args);
        assert!(!out.status.success(), "{args:?} started");
        text(&out.stderr)
    };
    // A missing authority is the authority, not "the config file", and
    // the OS's words come once.
    let err = serve(&["--authority", "nope.cert"]);
    assert!(err.contains("the authority certificate"), "{err}");
    assert!(err.contains("nope.cert"), "{err}");
    assert!(!err.contains("config file nope"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert!(
        err.contains("junction cert issue --role authority"),
        "{err}"
    );
    let err = serve(&["--config", "nope.toml"]);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    std::fs::write(pki.path("bad.toml"), "bogus = 1\n").unwrap();
    let err = serve(&["--config", "bad.toml"]);
    assert_eq!(err.matches("unknown field").count(), 1, "{err}");
    // A Highway identity that is not a junction's keeps its cause.
    let err = serve(&[
        "--authority",
        "authority.cert",
        "--junction-key",
        "authority.key",
        "--junction-cert",
        "authority.cert",
        "--quic-listen",
        "127.0.0.1:0",
    ]);
    assert!(err.contains("not for a junction"), "{err}");
    assert!(err.contains("--role junction"), "{err}");
    // A revocation list is a revocation list.
    let err = serve(&[
        "--authority",
        "authority.cert",
        "--revocations",
        "authority.cert",
    ]);
    assert!(err.contains("not a valid revocation list"), "{err}");
    assert!(!err.contains("certificate:"), "{err}");
    assert!(err.contains("junction cert revoke"), "{err}");
    // A corrupt certificate: which file, that it is not a certificate,
    // what to do; never postcard's words.
    let good = std::fs::read_to_string(pki.path("authority.cert")).unwrap();
    let lines: Vec<&str> = good.lines().collect();
    let cut = format!(
        "{}\n{}\n{}\n",
        lines[0],
        &lines[1][..8],
        lines[lines.len() - 1]
    );
    std::fs::write(pki.path("cut.cert"), cut).unwrap();
    for args in [
        &["cert", "inspect", "cut.cert"][..],
        &["serve", "--authority", "cut.cert"][..],
    ] {
        let out = run_in(&dir, args);
        let err = text(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("cut.cert"), "{err}");
        assert!(err.contains("not a valid junction certificate"), "{err}");
        assert!(err.contains("junction cert issue"), "{err}");
        assert!(!err.contains("Serde"), "{err}");
        assert!(!err.contains("Deserialization"), "{err}");
    }
}

#[test]
fn an_identity_refusal_says_refused_once_and_the_log_never_claims_a_refused_registration() {
    let pki = TestPki::new();
    let other = TestPki::new();
    other.issue(
        "svc",
        "svc",
        "authority",
        &["--role", "service", "--name", "org.acme.svc"],
    );
    let authority = pki.path("authority.cert");
    let j = TestJunction::start(&["--authority", authority.to_str().unwrap()]);
    let (key, cert) = (other.path("svc.key"), other.path("svc.cert"));
    let (ok, _, err) = run(
        &j,
        &[
            "listen",
            "org.acme.svc",
            "--key",
            key.to_str().unwrap(),
            "--cert",
            cert.to_str().unwrap(),
        ],
    );
    assert!(!ok);
    assert_eq!(err.matches("refused").count(), 1, "{err}");
    assert!(err.contains("svc.cert"), "{err}");
    assert!(err.contains("not a trusted authority"), "{err}");
    assert!(err.contains("--authority"), "{err}");

    // A name in the development namespace, held with a certificate: an
    // anonymous listener's attempt on it is refused, and the log never
    // said it was registered.
    pki.issue(
        "dup",
        "dup",
        "authority",
        &["--role", "service", "--name", "t.dup"],
    );
    let (key, cert) = (pki.path("dup.key"), pki.path("dup.cert"));
    let mut first = certified_listener(&j, "t.dup", &key, &cert);
    expect_line(&stderr_lines(&mut first), "listening as t.dup");
    let (ok, _, err) = run(&j, &["listen", "t.dup"]);
    assert!(!ok);
    assert!(err.contains("already registered"), "{err}");
    let log = j.log();
    assert!(!log.contains("t.dup registered"), "{log}");
}

#[test]
fn call_takes_durations_and_writes_raw_replies() {
    let j = TestJunction::start(&[]);
    let mut listener = Proc::spawn(
        j.command(&["listen", "t.echo"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    expect_line(&stderr_lines(&mut listener), "listening as t.echo");
    let payload = "a\u{1}b";
    let (ok, out, err) = run(&j, &["call", "t.echo", payload, "--timeout", "5s"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("0x610162"), "shown as hex: {out}");
    let out = j
        .command(&["call", "t.echo", payload, "--raw", "--timeout", "1500ms"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout, b"a\x01b", "the reply's bytes as they are");
    // Old plain seconds still work; a bad duration says how to write one.
    let (ok, _, err) = run(&j, &["call", "t.echo", "x", "--timeout", "2.5"]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&j, &["call", "t.echo", "x", "--timeout", "soon"]);
    assert!(!ok);
    assert!(err.contains("500ms"), "{err}");
}

#[test]
fn help_lists_every_command_with_examples() {
    let dir = TempDir::new();
    let top = text(&run_in(dir.path(), &["--help"]).stdout);
    for command in [
        "serve",
        "ls",
        "call",
        "listen",
        "echo",
        "completions",
        "man",
    ] {
        assert!(top.contains(&format!("  {command}")), "{command}: {top}");
    }
    assert!(top.contains("EXAMPLES"), "{top}");
    assert!(!top.contains("capability-based"), "speaks to users: {top}");
    for command in [
        &["serve"][..],
        &["ls"],
        &["call"],
        &["send"],
        &["listen"],
        &["echo"],
        &["keygen"],
        &["cert", "issue"],
        &["cert", "inspect"],
        &["cert", "revoke"],
        &["bench"],
        &["completions"],
        &["man"],
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let help = text(&run_in(dir.path(), &args).stdout);
        assert!(help.contains("EXAMPLES"), "{command:?}: {help}");
    }
    let help = text(&run_in(dir.path(), &["call", "--help"]).stdout);
    assert!(help.contains("[default: 10s]"), "{help}");
}

#[test]
fn completions_and_man_pages_come_from_the_same_definitions() {
    let dir = TempDir::new();
    for shell in ["bash", "zsh", "fish"] {
        let out = run_in(dir.path(), &["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(script.contains("junction"), "{shell}");
        assert!(script.contains("revoke"), "{shell}: subcommands complete");
    }
    let out = run_in(dir.path(), &["man"]);
    let page = text(&out.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH junction"),
        "{page}"
    );
    assert!(page.contains("completions"), "{page}");
    let out = run_in(dir.path(), &["man", "--out-dir", "."]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(dir.path().join("junction.1").exists());
    assert!(dir.path().join("junction-serve.1").exists());
    assert!(dir.path().join("junction-cert-issue.1").exists());
}

#[test]
fn bench_shows_progress_on_stderr_and_labels_its_tables() {
    let dir = TempDir::new();
    let out = run_in(
        dir.path(),
        &["bench", "--quick", "--no-pin", "--rtt-only", "--json"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let _: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is only the JSON");
    assert!(
        text(&out.stderr).contains("bench: round trips"),
        "{}",
        text(&out.stderr)
    );
    let out = run_in(dir.path(), &["bench", "--quick", "--no-pin", "--rtt-only"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    let lines: Vec<&str> = report.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        // A heading is an upper-case line; each is followed by a row.
        let heading = line.chars().any(|c| c.is_ascii_uppercase())
            && !line.chars().any(|c| c.is_ascii_lowercase());
        if heading {
            assert!(line.contains("RATIO"), "every column labelled: {line}");
            let next = lines.get(i + 1).copied().unwrap_or("");
            assert!(!next.trim().is_empty(), "empty heading {line:?}:\n{report}");
        }
    }
    assert!(
        !report.contains("for scale"),
        "no heading without rows:\n{report}"
    );
}

/// `junction bench --highway` runs end to end (quick, unpinned): raw quinn
/// and the bus across a real Highway, and the reroute after a cut, every
/// figure it reports a positive number.
#[test]
fn bench_highway_measures_the_bus_across_a_highway_and_a_cut() {
    let dir = TempDir::new();
    let out = run_in(
        dir.path(),
        &["bench", "--highway", "--quick", "--no-pin", "--json"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is only the JSON");
    let figure = |side: &str, key: &str| report["highway"][side][key].as_f64().unwrap_or(0.0);
    for side in ["raw_quinn", "bus"] {
        for key in ["rtt_p50_us", "small_msgs_per_sec", "large_gb_per_sec"] {
            assert!(figure(side, key) > 0.0, "{side} {key}: {report}");
        }
    }
    assert!(figure("bus", "reroute_ms") > 0.0, "{report}");
    let cpu = |side: &str, key: &str, process: &str| {
        report["highway"][side][key][process]
            .as_f64()
            .unwrap_or(0.0)
    };
    for process in ["sender", "junction_1", "junction_2", "receiver"] {
        assert!(cpu("bus", "cpu_per_small_ns", process) > 0.0, "{report}");
    }
    for process in ["client", "server"] {
        assert!(
            cpu("raw_quinn", "endpoints_cpu_per_small_ns", process) > 0.0,
            "{report}"
        );
    }
}
