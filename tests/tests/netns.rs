//! Three hosts in network namespaces, joined by veth pairs with addresses
//! from the documentation range 198.51.100.0/24: real `junction` binaries
//! on real QUIC between them (deploy/three-hosts.sh). A call from host A
//! reaches a service on host C; the A-C link goes down with `ip link set
//! … down` and the next call goes round through B; the link comes back.
//! The namespaces are deleted afterwards, whatever happens.
//!
//! Needs root and iproute2 (`.ci/run` installs it); elsewhere it says why
//! it did not run.

use std::process::Command;

#[test]
fn three_hosts_in_namespaces_are_one_bus_through_a_cut() {
    let root = real_uid() == 0;
    let ip = Command::new("ip").arg("-V").output().is_ok();
    if !root || !ip {
        eprintln!("skipped: needs root and iproute2 (root: {root}, ip: {ip})");
        return;
    }
    // A container may be root without the right to make namespaces.
    let probe = format!("jprobe{}", std::process::id());
    let made = Command::new("ip")
        .args(["netns", "add", &probe])
        .output()
        .is_ok_and(|o| o.status.success());
    if !made {
        eprintln!("skipped: this root may not create network namespaces");
        return;
    }
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/three-hosts.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(junction_tests::junction_bin())
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the three-host bus failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("hello from A"), "{stdout}");
    assert!(stdout.contains("hello again, around the cut"), "{stdout}");
}

/// This process's real user id, from /proc (no unsafe, no libc call).
fn real_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next().map(str::to_string))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(u32::MAX)
}
