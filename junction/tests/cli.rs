//! The `junction` command's own behaviour when misused: clear errors, no panics.
//! (Its presence also makes `cargo test` build the binary that the
//! cross-process tests in `tests/` run.)

use std::process::Command;

fn junction(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_junction"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("the junction binary runs")
}

#[test]
fn a_missing_junction_is_reported_with_what_to_do() {
    let out = junction(&["ls", "--socket", "/nonexistent/j.sock"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("could not reach the junction at /nonexistent/j.sock"),
        "{err}"
    );
    assert!(err.contains("junction serve"), "{err}");
}

#[test]
fn bad_settings_are_refused_before_starting() {
    let out = junction(&["serve", "--socket", "/tmp/never.sock", "--junction-id", "0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reserved"), "{err}");

    let dir = std::env::temp_dir().join(format!("jcli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("bad.toml");
    std::fs::write(&config, "junction_id = \"twelve\"").unwrap();
    let out = junction(&["serve", "--config", config.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("junction_id"),
        "{err}"
    );
}

#[test]
fn a_bad_service_name_says_which_rule_it_broke() {
    let out = junction(&["call", "--socket", "/nonexistent/j.sock", "Bad Name", "x"]);
    assert!(!out.status.success());
    // Connecting fails first here; the name is checked by the driver on lookup.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.is_empty());
}
