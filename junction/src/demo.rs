//! `junction demo`: a private junction, two spawned processes, and a walk
//! through calls, capability passing and a dead-port notice.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use junction::core;
use junction::shell::ServeConfig;
use junction_driver::{Capability, Driver, Error, Rights};

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn step(n: u32, text: impl std::fmt::Display) {
    println!("[{n}] {text}");
}

fn detail(text: impl std::fmt::Display) {
    println!("    {text}");
}

/// Runs the demo; exits 0 when every step did what it should.
pub(crate) fn run() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("junction-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let socket = dir.join("junction.sock");
    let exe = crate::self_exe()?;
    let exe = shlex::try_quote(&exe.to_string_lossy())
        .context("the program path cannot be quoted")?
        .into_owned();
    let config = ServeConfig {
        socket: socket.clone(),
        core: core::Config {
            dev_namespace: vec!["demo.*".parse()?],
            ..core::Config::default()
        },
        spawn: vec![
            format!("{exe} echo --name demo.echo"),
            format!("{exe} demo-peer"),
        ],
        grace: Duration::from_secs(2),
        revocations_path: None,
        allow_uids: Vec::new(),
    };
    step(
        1,
        format!("starting a private junction at {}", socket.display()),
    );
    detail("it spawns two children over stdio Roads: an echo service and a peer process");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let junction = std::thread::spawn(move || {
        crate::cmd::run_junction(config, async move {
            let _ = stopped.await;
        })
    });
    let result = crate::cmd::block_on(script(&socket));
    let _ = stop.send(());
    let served = junction
        .join()
        .map_err(|_| anyhow::anyhow!("the junction thread panicked"))?;
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    served?;
    println!(
        "[9] the junction shut down: drivers told, children ended, socket removed. Demo complete."
    );
    Ok(())
}

async fn connect_when_ready(socket: &Path) -> anyhow::Result<Driver> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Driver::connect(socket).await {
            Ok(d) => return Ok(d),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn lookup_when_registered(driver: &Driver, name: &str) -> anyhow::Result<Capability> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match driver.lookup(name).await {
            Ok(cap) => return Ok(cap),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("{name} never registered"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn script(socket: &Path) -> anyhow::Result<()> {
    let me = connect_when_ready(socket).await?;
    step(
        2,
        format!(
            "this process attached over the Unix socket; its home port is {}",
            me.home()
        ),
    );
    let echo = lookup_when_registered(&me, "demo.echo").await?;
    let peer = lookup_when_registered(&me, "demo.peer").await?;
    detail(format!(
        "looked up demo.echo -> port {} ({})",
        echo.address(),
        echo.rights()
    ));
    detail(format!(
        "looked up demo.peer -> port {} ({})",
        peer.address(),
        peer.rights()
    ));

    step(3, "calling demo.echo");
    let started = Instant::now();
    let reply = me.call(&echo, "hello, bus", CALL_TIMEOUT).await?;
    detail(format!(
        "reply {:?} from {} in {:?}",
        String::from_utf8_lossy(&reply.payload),
        reply.origin,
        started.elapsed()
    ));
    if &reply.payload[..] != b"hello, bus" {
        bail!("the echo service answered {:?}", reply.payload);
    }

    step(
        4,
        "passing the echo capability to the peer process, which uses it",
    );
    let reply = me.call_with(&peer, "relay", &[&echo], CALL_TIMEOUT).await?;
    detail(format!(
        "the peer says: {}",
        String::from_utf8_lossy(&reply.payload)
    ));

    step(
        5,
        "opening a port here and handing the peer a capability to it",
    );
    let mut port = me.open_port().await?;
    let back = port.mint(Rights::SEND | Rights::GRANT).await?;
    me.call_with(&peer, "send-back", &[&back], CALL_TIMEOUT)
        .await?;
    let msg = port.recv().await?;
    detail(format!(
        "port {} received {:?} from {} (origin stamped by the junction)",
        port.address(),
        String::from_utf8_lossy(&msg.payload),
        msg.origin
    ));

    step(
        6,
        "trying to pass a capability minted without the grant right",
    );
    let private = port.mint(Rights::SEND).await?;
    match me
        .call_with(&peer, "relay", &[&private], CALL_TIMEOUT)
        .await
    {
        Err(e @ Error::NotGrantable { .. }) => detail(format!("refused, as it must be: {e}")),
        other => bail!("a capability without grant travelled: {other:?}"),
    }

    step(7, "what the junction holds now (as `junction ls` shows it)");
    let listing = me.listing().await?;
    for c in &listing.connections {
        detail(format!(
            "connection c{} over {:<5} pid {:>7} home {:<6} ports {} handles {} ({})",
            c.id,
            c.road,
            c.pid.map_or("-".into(), |p| p.to_string()),
            c.home.to_string(),
            c.ports,
            c.handles,
            c.label
        ));
    }

    step(8, "asking the peer process to exit, watching its port");
    let watcher = {
        let peer = peer.clone();
        tokio::spawn(async move { peer.watch().await })
    };
    tokio::task::yield_now().await;
    let bye = me.call(&peer, "quit", CALL_TIMEOUT).await?;
    detail(format!(
        "the peer said {:?} and exited",
        String::from_utf8_lossy(&bye.payload)
    ));
    let reason = tokio::time::timeout(CALL_TIMEOUT, watcher)
        .await
        .context("no dead-port notice arrived")???;
    detail(format!("dead-port notice for {}: {reason}", peer.address()));
    match me.call(&peer, "anyone there?", CALL_TIMEOUT).await {
        Err(e) => detail(format!("a call to it now fails at once: {e}")),
        Ok(_) => bail!("a call to a dead port was answered"),
    }
    Ok(())
}

/// The demo's peer process: relays calls through capabilities it is given.
pub(crate) async fn peer(identity: crate::cmd::IdentityArgs) -> anyhow::Result<()> {
    let driver = crate::cmd::attach().await?;
    identity.apply(&driver).await?;
    let mut port = driver.open_port().await?;
    let cap = port.mint(Rights::SEND | Rights::GRANT).await?;
    driver.register("demo.peer", &cap).await?;
    loop {
        let msg = match port.recv().await {
            Ok(msg) => msg,
            Err(Error::Closed { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        match &msg.payload[..] {
            b"relay" if !msg.caps.is_empty() => {
                let answer = driver
                    .call(&msg.caps[0], "relayed by the peer", CALL_TIMEOUT)
                    .await?;
                let text = format!(
                    "I called {} with the capability you sent; it answered {:?}",
                    msg.caps[0].address(),
                    String::from_utf8_lossy(&answer.payload)
                );
                msg.reply(text)?;
            }
            b"send-back" if !msg.caps.is_empty() => {
                driver.send(&msg.caps[0], "hello from the peer").await?;
                msg.reply("sent")?;
            }
            b"quit" => {
                msg.reply("bye")?;
                driver.sync().await?;
                return Ok(());
            }
            _ => {
                if msg.is_call() {
                    msg.reply("unknown request")?;
                }
            }
        }
    }
}
