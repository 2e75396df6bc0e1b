//! The message path with a monitor attached, against none, in the same run:
//! a real `junction monitor` process that keeps up as well as it can and
//! writes its lines to /dev/null.

use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, bail};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

/// Starts `junction monitor` on the junction at `socket`; returns once the
/// junction has attached it. Killed when dropped.
pub(super) async fn attach(socket: &Path) -> anyhow::Result<Child> {
    let mut child = Command::new(crate::self_exe()?)
        .arg("monitor")
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start a monitor")?;
    let stderr = child.stderr.take().context("the monitor's stderr")?;
    let mut line = String::new();
    tokio::io::BufReader::new(stderr)
        .read_line(&mut line)
        .await?;
    if !line.starts_with("monitoring") {
        bail!("the monitor did not attach: {line}");
    }
    Ok(child)
}

/// The monitor lines of the text report: with a monitor against without,
/// as a ratio.
pub(super) fn report(through: &super::Side) {
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    println!("with a monitor attached (junction monitor) vs without:");
    if let Some(m) = through.monitored_rtt {
        println!(
            "  call round trip p50 {:.2} µs vs {:.2} µs ({:.2}x), p99 {:.2} µs vs {:.2} µs",
            m.p50_us,
            through.rtt.p50_us,
            ratio(m.p50_us, through.rtt.p50_us),
            m.p99_us,
            through.rtt.p99_us
        );
    }
    if let (Some(m), Some(r)) = (through.monitored_rtt_pinned, through.rtt_pinned) {
        println!(
            "  pinned round trip p50 {:.2} µs vs {:.2} µs ({:.2}x)",
            m.p50_us,
            r.p50_us,
            ratio(m.p50_us, r.p50_us)
        );
    }
    if let (Some(m), Some(r)) = (
        through.monitored_small_msgs_per_sec,
        through.unmonitored_small_msgs_per_sec,
    ) {
        println!(
            "  64 B one-way {:.3} vs {:.3} M msg/s ({:.2}x)",
            m / 1e6,
            r / 1e6,
            ratio(m, r)
        );
    }
    if let (Some(m), Some(r)) = (
        through.monitored_junction_cpu_ns,
        through.unmonitored_junction_cpu_ns,
    ) {
        println!(
            "  junction CPU per 64 B message {m:.0} ns vs {r:.0} ns ({:.2}x)",
            ratio(m, r)
        );
    }
}
