//! A scripted driver process for the cross-process tests.
//!
//! `junction-test-peer ROLE NAME` connects to `$JUNCTION_SOCKET`, opens a
//! port, registers NAME for it, prints `ready` on stdout, and then plays ROLE:
//!
//! - `holder`: keeps capabilities it is sent. A call `forward:OTHER` sends the
//!   first held capability to the service OTHER; a call `use:TEXT` calls the
//!   held capability with TEXT and answers with its reply.
//! - `silent`: takes calls and never answers them (their callers wait).
//! - `slow`: never reads its port at all.

use std::time::Duration;

use anyhow::{Context, bail};
use junction_driver::{Capability, Driver, Rights};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(role), Some(name)) = (args.next(), args.next()) else {
        bail!("usage: junction-test-peer holder|silent|slow NAME");
    };
    let driver = Driver::connect_default().await?;
    let mut port = driver.open_port().await?;
    let cap = port.mint(Rights::SEND | Rights::GRANT).await?;
    driver.register(&name, &cap).await?;
    println!("ready");
    match role.as_str() {
        "holder" => holder(&driver, &mut port).await,
        "silent" => {
            let mut held = Vec::new();
            while let Ok(msg) = port.recv().await {
                held.push(msg);
            }
            Ok(())
        }
        "slow" => {
            driver.closed().await;
            Ok(())
        }
        other => bail!("unknown role {other}"),
    }
}

async fn holder(driver: &Driver, port: &mut junction_driver::Port) -> anyhow::Result<()> {
    let mut held: Vec<Capability> = Vec::new();
    while let Ok(mut msg) = port.recv().await {
        held.append(&mut msg.caps);
        let text = String::from_utf8_lossy(&msg.payload).into_owned();
        let answer = if let Some(other) = text.strip_prefix("forward:") {
            let target = driver.lookup(other).await.context("lookup")?;
            match held.first() {
                Some(cap) => match driver.send_with(&target, "here", &[cap]).await {
                    Ok(_) => "forwarded".to_string(),
                    Err(e) => format!("error: {e}"),
                },
                None => "error: holding nothing".to_string(),
            }
        } else if let Some(text) = text.strip_prefix("use:") {
            match held.first() {
                Some(cap) => match driver
                    .call(cap, text.to_string(), Duration::from_secs(10))
                    .await
                {
                    Ok(reply) => format!(
                        "{} via {}",
                        String::from_utf8_lossy(&reply.payload),
                        cap.address()
                    ),
                    Err(e) => format!("error: {e}"),
                },
                None => "error: holding nothing".to_string(),
            }
        } else {
            "kept".to_string()
        };
        if msg.is_call() {
            msg.reply(answer)?;
        }
    }
    Ok(())
}
