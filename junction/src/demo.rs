//! `junction demo`: a private bus with its own authority, two spawned
//! services that prove who they are, and a walk through calls, capability
//! passing, impostors turned away, revocation and a dead-port notice.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use junction::authority::LocalAuthority;
use junction::core;
use junction::shell::ServeConfig;
use junction_driver::{Attenuation, Capability, Driver, Error, Rights};
use junction_identity::{Certificate, Role, SecretKey, TrustStore};

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn step(n: u32, text: impl std::fmt::Display) {
    println!("[{n}] {text}");
}

fn detail(text: impl std::fmt::Display) {
    println!("    {text}");
}

fn service(name: &str) -> anyhow::Result<Role> {
    Ok(Role::Service {
        names: vec![name.parse()?],
    })
}

/// Runs the demo; exits 0 when every step did what it should.
pub(crate) fn run() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("junction-demo-{}", std::process::id()));
    // Private whatever the umask: the socket goes in it, and a directory
    // others may write in is refused.
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let result = run_in(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(dir: &Path) -> anyhow::Result<()> {
    step(
        1,
        "making a bus authority and certificates (what `junction keygen` and `junction cert issue` do)",
    );
    let pki = LocalAuthority::new()?;
    let (echo_key, echo_cert) = pki.issue_files(dir, "echo", 2, service("demo.echo")?)?;
    let (peer_key, peer_cert) = pki.issue_files(dir, "peer", 3, service("demo.peer")?)?;
    let (me_key, me_cert) = pki.issue_files(dir, "me", 4, Role::Client)?;
    detail(format!("authority {}", pki.public()));
    detail(
        "service certificates for demo.echo and demo.peer, a client certificate for this process",
    );

    let socket = dir.join("junction.sock");
    let exe = crate::self_exe()?;
    let quote = |p: &Path| -> anyhow::Result<String> {
        Ok(shlex::try_quote(&p.to_string_lossy())
            .context("a path cannot be quoted")?
            .into_owned())
    };
    let exe = quote(&exe)?;
    let config = ServeConfig {
        socket: socket.clone(),
        core: core::Config {
            trust: pki.trust(),
            ..core::Config::default()
        },
        spawn: vec![
            format!(
                "{exe} echo --name demo.echo --key {} --cert {}",
                quote(&echo_key)?,
                quote(&echo_cert)?
            ),
            format!(
                "{exe} demo-peer --key {} --cert {}",
                quote(&peer_key)?,
                quote(&peer_cert)?
            ),
        ],
        grace: Duration::from_secs(2),
        revocations_path: None,
        allow_uids: Vec::new(),
        max_connections: 64,
        max_connections_per_uid: 64,
        max_unread: 64 << 20,
        write_timeout: Duration::from_secs(30),
        highways: None,
        service: Default::default(),
        metrics: None,
    };
    step(
        2,
        format!(
            "starting a private junction at {} that trusts only that authority",
            socket.display()
        ),
    );
    detail("it spawns two children over stdio Roads: an echo service and a peer process");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let junction = std::thread::spawn(move || {
        crate::cmd::run_junction(config, async move {
            let _ = stopped.await;
        })
    });
    let me = Identity {
        key: crate::pki::read_key(&me_key)?,
        chain: crate::pki::read_chain(&me_cert)?,
    };
    let result = crate::cmd::block_on(script(&socket, me, pki.trust()));
    let _ = stop.send(());
    let served = junction
        .join()
        .map_err(|_| anyhow::anyhow!("the junction thread panicked"))?;
    result?;
    served?;
    step(
        12,
        "the junction shut down: drivers told, children ended, socket removed. Demo complete.",
    );
    Ok(())
}

struct Identity {
    key: SecretKey,
    chain: Vec<Certificate>,
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

async fn lookup_when_registered(
    driver: &Driver,
    name: &str,
) -> anyhow::Result<(Capability, Option<Vec<Certificate>>)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match driver.lookup_with_chain(name).await {
            Ok(found) => return Ok(found),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("{name} never registered"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn script(socket: &Path, id: Identity, trust: TrustStore) -> anyhow::Result<()> {
    let me = connect_when_ready(socket).await?;
    let proven = me.authenticate(&id.key, id.chain.clone()).await?;
    step(
        3,
        format!(
            "this process attached over the Unix socket (home port {}) and proved its client key {}",
            me.home(),
            &proven.key.to_hex()[..16]
        ),
    );
    let (echo, echo_chain) = lookup_when_registered(&me, "demo.echo").await?;
    let (peer, _) = lookup_when_registered(&me, "demo.peer").await?;
    let chain = echo_chain.context("demo.echo was registered without a certificate")?;
    let verified = trust.verify_chain(&chain, junction::unix_now(), None)?;
    detail(format!(
        "looked up demo.echo -> port {} ({}); its certificate checks out here too, end to end: {}",
        echo.address(),
        echo.rights(),
        verified.body.role
    ));

    step(4, "calling demo.echo");
    let started = Instant::now();
    let reply = me.call(&echo, "hello, bus", CALL_TIMEOUT).await?;
    let who = reply
        .identity
        .as_ref()
        .context("the reply carries no identity")?;
    detail(format!(
        "reply {:?} from {} in {:?}, answered by {} (stamped by the junction)",
        text(&reply.payload),
        reply.origin,
        started.elapsed(),
        who.names
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    if &reply.payload[..] != b"hello, bus" {
        bail!("the echo service answered {:?}", reply.payload);
    }

    step(
        5,
        "passing the echo capability to the peer process, which uses it",
    );
    let reply = me.call_with(&peer, "relay", &[&echo], CALL_TIMEOUT).await?;
    detail(format!("the peer says: {}", text(&reply.payload)));

    step(
        6,
        "opening a port here and handing the peer a capability to it",
    );
    let mut port = me.open_port().await?;
    let back = port.mint(Rights::SEND | Rights::GRANT).await?;
    me.call_with(&peer, "send-back", &[&back], CALL_TIMEOUT)
        .await?;
    let msg = port.recv().await?;
    let sender = msg
        .identity
        .as_ref()
        .map_or("nobody".to_string(), |i| i.names[0].to_string());
    detail(format!(
        "port {} received {:?} from {}, proven to be {sender}",
        port.address(),
        text(&msg.payload),
        msg.origin
    ));

    step(
        7,
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

    step(8, "impostors try to take the name demo.echo");
    let anonymous = Driver::connect(socket).await?;
    let p = anonymous.open_port().await?;
    let c = p.mint(Rights::SEND | Rights::GRANT).await?;
    match anonymous.register("demo.echo", &c).await {
        Err(e) => detail(format!("without a certificate: {e}")),
        Ok(()) => bail!("an impostor registered demo.echo"),
    }
    let (rogue_key, rogue_chain) = LocalAuthority::new()?.issue(9, service("demo.echo")?)?;
    let rogue = Driver::connect(socket).await?;
    match rogue.authenticate(&rogue_key, rogue_chain).await {
        Err(e) => detail(format!("with a certificate from another authority: {e}")),
        Ok(_) => bail!("a rogue authority was trusted"),
    }
    let reply = me.call(&echo, "still mine?", CALL_TIMEOUT).await?;
    detail(format!(
        "demo.echo still answers: {:?}",
        text(&reply.payload)
    ));

    step(
        9,
        "lending the peer a revocable capability, then revoking it",
    );
    let lent = echo
        .attenuate(Attenuation::rights(Rights::SEND | Rights::GRANT).revocable())
        .await?;
    me.call_with(&peer, "keep", &[&lent], CALL_TIMEOUT).await?;
    let used = me.call(&peer, "use-kept", CALL_TIMEOUT).await?;
    detail(format!("the peer uses it: {}", text(&used.payload)));
    lent.revoke().await?;
    let used = me.call(&peer, "use-kept", CALL_TIMEOUT).await?;
    detail(format!("after revoke: {}", text(&used.payload)));
    if !text(&used.payload).contains("revoked") {
        bail!("a revoked capability still worked");
    }

    step(
        10,
        "what the junction holds now (as `junction ls` shows it)",
    );
    let listing = me.listing().await?;
    for c in &listing.connections {
        detail(format!(
            "connection c{} over {:<5} pid {:>7} home {:<6} handles {:>2} {}",
            c.id,
            c.road,
            c.pid.map_or("-".into(), |p| p.to_string()),
            c.home.to_string(),
            c.handles,
            c.identity.as_deref().unwrap_or("(no identity)")
        ));
    }

    step(11, "asking the peer process to exit, watching its port");
    let watcher = {
        let peer = peer.clone();
        tokio::spawn(async move { peer.watch().await })
    };
    tokio::task::yield_now().await;
    let bye = me.call(&peer, "quit", CALL_TIMEOUT).await?;
    detail(format!("the peer said {:?} and exited", text(&bye.payload)));
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
    let mut kept: Option<Capability> = None;
    loop {
        let mut msg = match port.recv().await {
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
            b"keep" if !msg.caps.is_empty() => {
                kept = Some(msg.caps.remove(0));
                msg.reply("kept")?;
            }
            b"use-kept" => {
                let answer = match &kept {
                    Some(cap) => match driver
                        .call(cap, "via the kept capability", CALL_TIMEOUT)
                        .await
                    {
                        Ok(r) => format!("answered {:?}", String::from_utf8_lossy(&r.payload)),
                        Err(e) => format!("failed: {e}"),
                    },
                    None => "nothing kept".to_string(),
                };
                msg.reply(answer)?;
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
