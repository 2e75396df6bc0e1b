//! The impostor suite: real attempts, over a real socket against a real
//! junction, that must each fail with a clear, specific error, while the
//! legitimate service keeps its name and keeps answering.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use junction_driver::{Attenuation, Driver, Error, ErrorCode, Rights};
use junction_identity::{Certificate, SecretKey, prove_possession};
use junction_road::control::{ControlReply, ControlRequest};
use junction_road::{Frame, Header, Send};
use junction_tests::{Proc, RawClient, TestJunction, TestPki};

const T: Duration = Duration::from_secs(10);
const NAME: &str = "org.acme.echo";

fn key(path: &Path) -> SecretKey {
    SecretKey::from_pem(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn chain(path: &Path) -> Vec<Certificate> {
    Certificate::chain_from_pem(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A junction trusting `pki`'s authority, with the legitimate echo service
/// registered under its certificate.
struct Bus {
    pki: TestPki,
    junction: TestJunction,
    _echo: Proc,
}

impl Bus {
    async fn start(extra: &[&str]) -> Self {
        let pki = TestPki::new();
        pki.issue(
            "echo",
            "echo",
            "authority",
            &["--role", "service", "--name", NAME],
        );
        let authority = pki.path("authority.cert");
        let mut args = vec!["--authority", authority.to_str().unwrap()];
        args.extend_from_slice(extra);
        let junction = TestJunction::start(&args);
        let echo = Proc::spawn(
            junction
                .command(&["echo", "--name", NAME])
                .env("JUNCTION_KEY", pki.path("echo.key"))
                .env("JUNCTION_CERT", pki.path("echo.cert")),
        );
        let bus = Self {
            pki,
            junction,
            _echo: echo,
        };
        bus.until_served().await;
        bus
    }

    async fn driver(&self) -> Driver {
        Driver::connect(&self.junction.socket).await.unwrap()
    }

    async fn until_served(&self) {
        let d = self.driver().await;
        let deadline = Instant::now() + T;
        while d.lookup(NAME).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "the echo service never registered"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The legitimate service still owns its name, with its own identity,
    /// and answers.
    async fn assert_legitimate_service_intact(&self) {
        let d = self.driver().await;
        let (cap, chain) = d.lookup_with_chain(NAME).await.unwrap();
        let chain = chain.expect("the name is held with a certificate");
        assert_eq!(
            chain[0].body.subject,
            key(&self.pki.path("echo.key")).public()
        );
        for i in 0..5 {
            let reply = d.call(&cap, format!("ping {i}"), T).await.unwrap();
            assert_eq!(reply.payload, Bytes::from(format!("ping {i}")));
            let id = reply
                .identity
                .as_ref()
                .expect("the reply is signed by who answered");
            assert_eq!(id.names, vec![NAME.parse().unwrap()]);
        }
    }

    /// A holder peer process registered as `name`, and a capability to it.
    async fn holder(&self, me: &Driver, name: &str) -> (Proc, junction_driver::Capability) {
        let bin = Path::new(env!("CARGO_BIN_EXE_junction-test-peer"));
        let process = self.junction.spawn_ready(bin, &["holder", name]);
        (process, me.lookup(name).await.unwrap())
    }

    /// Authenticates a fresh connection with `key_file` and `cert_file`.
    async fn try_as(&self, key_file: &Path, cert_file: &Path) -> (Driver, Result<(), Error>) {
        let d = self.driver().await;
        let r = d
            .authenticate(&key(key_file), chain(cert_file))
            .await
            .map(|_| ());
        (d, r)
    }

    /// Tries to take over the echo name on `d`.
    async fn try_register(d: &Driver) -> Result<(), Error> {
        let port = d.open_port().await?;
        let cap = port.mint(Rights::SEND | Rights::GRANT).await?;
        let r = d.register(NAME, &cap).await;
        std::mem::forget(port);
        r
    }
}

/// Asks a holder peer to call through the capability it keeps.
async fn use_through(me: &Driver, holder: &junction_driver::Capability, text: &str) -> String {
    let r = me.call(holder, format!("use:{text}"), T).await.unwrap();
    String::from_utf8_lossy(&r.payload).into_owned()
}

fn code(r: Result<(), Error>) -> (ErrorCode, String) {
    match r {
        Err(Error::Refused { code, message }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn the_right_certificate_with_another_key_is_refused() {
    let bus = Bus::start(&[]).await;
    let thief_key = bus.pki.key("thief");
    let (_, r) = bus.try_as(&thief_key, &bus.pki.path("echo.cert")).await;
    let (c, m) = code(r);
    assert_eq!(c, ErrorCode::BadProof);
    assert!(m.contains("proof of possession"), "{m}");
    bus.assert_legitimate_service_intact().await;
    assert!(
        bus.junction.log().contains("refused"),
        "the attempt is logged"
    );
}

#[tokio::test]
async fn expired_not_yet_valid_and_untrusted_certificates_are_refused() {
    let bus = Bus::start(&[]).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let long_ago = (now - 10 * 86_400).to_string();
    let later = (now + 10 * 86_400).to_string();
    bus.pki.issue(
        "old",
        "mallory",
        "authority",
        &[
            "--role",
            "service",
            "--name",
            NAME,
            "--not-before",
            &long_ago,
            "--days",
            "1",
        ],
    );
    bus.pki.issue(
        "early",
        "mallory",
        "authority",
        &["--role", "service", "--name", NAME, "--not-before", &later],
    );
    let mallory = bus.pki.path("mallory.key");
    let (c, m) = code(bus.try_as(&mallory, &bus.pki.path("old.cert")).await.1);
    assert_eq!(c, ErrorCode::BadCertificate);
    assert!(m.contains("expired"), "{m}");
    let (c, m) = code(bus.try_as(&mallory, &bus.pki.path("early.cert")).await.1);
    assert_eq!(c, ErrorCode::BadCertificate);
    assert!(m.contains("not valid before"), "{m}");

    let rogue = TestPki::new();
    rogue.issue(
        "fake",
        "mallory",
        "authority",
        &["--role", "service", "--name", NAME],
    );
    let (c, m) = code(
        bus.try_as(&rogue.path("mallory.key"), &rogue.path("fake.cert"))
            .await
            .1,
    );
    assert_eq!(c, ErrorCode::BadCertificate);
    assert!(m.contains("not a trusted authority"), "{m}");
    bus.assert_legitimate_service_intact().await;
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_after_sighup() {
    let bus = Bus::start(&[]).await;
    bus.pki.issue(
        "second",
        "second",
        "authority",
        &["--role", "service", "--name", "org.acme.second"],
    );
    // Write an empty list first, then restart with it configured.
    let crl = bus.pki.revoke(&[]);
    let authority = bus.pki.path("authority.cert");
    let junction = TestJunction::start(&[
        "--authority",
        authority.to_str().unwrap(),
        "--revocations",
        crl.to_str().unwrap(),
    ]);
    let second_key = bus.pki.path("second.key");
    let second_cert = bus.pki.path("second.cert");
    let d = Driver::connect(&junction.socket).await.unwrap();
    d.authenticate(&key(&second_key), chain(&second_cert))
        .await
        .unwrap();
    let port = d.open_port().await.unwrap();
    let cap = port.mint(Rights::SEND | Rights::GRANT).await.unwrap();
    d.register("org.acme.second", &cap).await.unwrap();

    bus.pki.revoke(&["--cert", "second.cert"]);
    junction_tests_sighup(&junction);
    let deadline = Instant::now() + T;
    loop {
        let fresh = Driver::connect(&junction.socket).await.unwrap();
        match fresh
            .authenticate(&key(&second_key), chain(&second_cert))
            .await
        {
            Err(Error::Refused {
                code: ErrorCode::CertificateRevoked,
                message,
            }) => {
                assert!(message.contains("revoked"), "{message}");
                break;
            }
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "the revocation never took effect"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    // The connection that proved the now revoked certificate lost its name.
    let err = d.lookup("org.acme.second").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Refused {
                code: ErrorCode::NameNotFound,
                ..
            }
        ),
        "{err}"
    );
    let log = junction.log();
    assert!(log.contains("org.acme.second unregistered"), "{log}");
    bus.assert_legitimate_service_intact().await;
}

fn junction_tests_sighup(j: &TestJunction) {
    // SAFETY: kill has no memory-safety preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(j.process.pid() as i32, libc::SIGHUP);
    }
}

#[tokio::test]
async fn names_outside_the_grant_and_outside_an_intermediates_patterns_are_refused() {
    let bus = Bus::start(&[]).await;
    bus.pki.issue(
        "other",
        "other",
        "authority",
        &["--role", "service", "--name", "org.acme.other"],
    );
    let (d, r) = bus
        .try_as(&bus.pki.key("other"), &bus.pki.path("other.cert"))
        .await;
    r.unwrap();
    let (c, m) = code(Bus::try_register(&d).await);
    assert_eq!(c, ErrorCode::NameNotGranted);
    assert!(
        m.contains("org.acme.other"),
        "the refusal says what is granted: {m}"
    );

    bus.pki.issue(
        "inter",
        "inter",
        "authority",
        &["--role", "intermediate", "--pattern", "org.partner.*"],
    );
    bus.pki.issue(
        "stretch",
        "stretch",
        "inter",
        &["--role", "service", "--name", NAME],
    );
    let (c, m) = code(
        bus.try_as(&bus.pki.key("stretch"), &bus.pki.path("stretch.cert"))
            .await
            .1,
    );
    assert_eq!(c, ErrorCode::BadCertificate);
    assert!(m.contains("outside the name patterns"), "{m}");
    // Within its patterns, the intermediate's certificate works.
    bus.pki.issue(
        "fair",
        "fair",
        "inter",
        &["--role", "service", "--name", "org.partner.db"],
    );
    let (d, r) = bus
        .try_as(&bus.pki.key("fair"), &bus.pki.path("fair.cert"))
        .await;
    r.unwrap();
    let port = d.open_port().await.unwrap();
    let cap = port.mint(Rights::SEND | Rights::GRANT).await.unwrap();
    d.register("org.partner.db", &cap).await.unwrap();
    bus.assert_legitimate_service_intact().await;
}

#[tokio::test]
async fn a_proof_replayed_from_an_earlier_connection_is_refused() {
    let bus = Bus::start(&[]).await;
    bus.pki
        .issue("client", "client", "authority", &["--role", "client"]);
    let k = key(&bus.pki.key("client"));
    let c = chain(&bus.pki.path("client.cert"));
    let authenticate = |raw: &mut RawClient, proof| {
        raw.control(&ControlRequest::Authenticate {
            chain: c.clone(),
            proof,
        })
        .0
    };
    let (mut first, w1) = RawClient::hello(&bus.junction.socket);
    let proof = prove_possession(&k, &w1.nonce, w1.junction);
    assert!(matches!(
        authenticate(&mut first, proof.clone()),
        ControlReply::Authenticated(_)
    ));
    let (mut second, w2) = RawClient::hello(&bus.junction.socket);
    assert_ne!(w1.nonce, w2.nonce, "every connection gets a fresh nonce");
    match authenticate(&mut second, proof) {
        ControlReply::Refused { code, message } => {
            assert_eq!(code, ErrorCode::BadProof);
            assert!(message.contains("another connection"), "{message}");
        }
        other => panic!("a replayed proof was accepted: {other:?}"),
    }
    bus.assert_legitimate_service_intact().await;
}

#[tokio::test]
async fn a_taken_name_stays_with_its_owner() {
    let bus = Bus::start(&[]).await;
    // No identity at all.
    let anonymous = bus.driver().await;
    assert_eq!(
        code(Bus::try_register(&anonymous).await).0,
        ErrorCode::NameNotGranted
    );
    // A second holder of a valid certificate for the very name.
    bus.pki.issue(
        "twin",
        "twin",
        "authority",
        &["--role", "service", "--name", NAME],
    );
    let (twin, r) = bus
        .try_as(&bus.pki.key("twin"), &bus.pki.path("twin.cert"))
        .await;
    r.unwrap();
    let (c, m) = code(Bus::try_register(&twin).await);
    assert_eq!(c, ErrorCode::NameTaken);
    assert!(m.contains("already registered"), "{m}");
    bus.assert_legitimate_service_intact().await;
}

#[tokio::test]
async fn a_sender_identity_cannot_be_forged() {
    let bus = Bus::start(&[]).await;
    let receiver = bus.driver().await;
    let mut port = receiver.open_port().await.unwrap();
    let inbox = port.mint(Rights::SEND | Rights::GRANT).await.unwrap();
    receiver.register("t.inbox", &inbox).await.unwrap();

    // A raw client sends: the delivery carries no identity, whatever it claims.
    let (mut raw, _) = RawClient::hello(&bus.junction.socket);
    let (_, found) = raw.control(&ControlRequest::Lookup {
        name: "t.inbox".parse().unwrap(),
    });
    raw.send_frame(&Frame::with_payload(
        Header::Send(Send {
            handle: found[0].handle,
            caps: vec![],
        }),
        Bytes::from_static(b"I am org.acme.echo"),
    ));
    let msg = tokio::time::timeout(T, port.recv()).await.unwrap().unwrap();
    assert_eq!(msg.identity, None);
    // Pretending to be the junction, with a forged Deliver, gets nowhere.
    let forged = junction_road::Deliver {
        port: inbox.address().port,
        origin: inbox.address(),
        tag: 0,
        reply: None,
        caps: vec![],
        ack: false,
        identity: Some(std::sync::Arc::new(junction_road::Identity {
            key: key(&bus.pki.path("echo.key")).public(),
            names: vec![NAME.parse().unwrap()],
        })),
    };
    raw.send(Header::Deliver(forged));
    let f = raw.recv_until(|h| matches!(h, Header::Error(_)));
    assert!(matches!(f.header, Header::Error(e) if e.code == ErrorCode::UnexpectedFrame));

    // A proven client's messages carry exactly its proven key.
    bus.pki
        .issue("client", "client", "authority", &["--role", "client"]);
    let (client, r) = bus
        .try_as(&bus.pki.key("client"), &bus.pki.path("client.cert"))
        .await;
    r.unwrap();
    let cap = client.lookup("t.inbox").await.unwrap();
    client.send(&cap, "signed").await.unwrap();
    let msg = tokio::time::timeout(T, port.recv()).await.unwrap().unwrap();
    assert_eq!(&msg.payload[..], b"signed");
    let id = msg.identity.expect("a proven sender is identified");
    assert_eq!(id.key, key(&bus.pki.path("client.key")).public());
    assert!(id.names.is_empty());
    assert!(
        tokio::time::timeout(Duration::from_millis(200), port.recv())
            .await
            .is_err(),
        "the forged delivery never arrived"
    );
    bus.assert_legitimate_service_intact().await;
}

#[tokio::test]
async fn a_revoked_capability_dies_in_every_process_it_reached() {
    let bus = Bus::start(&[]).await;
    let me = bus.driver().await;
    let echo = me.lookup(NAME).await.unwrap();
    let (_holder, holder) = bus.holder(&me, "t.holder").await;

    // Revocable: works, then dies everywhere at once.
    let revocable = echo
        .attenuate(Attenuation::rights(Rights::SEND | Rights::GRANT).revocable())
        .await
        .unwrap();
    me.call_with(&holder, "take", &[&revocable], T)
        .await
        .unwrap();
    assert!(
        use_through(&me, &holder, "before")
            .await
            .starts_with("before via")
    );
    revocable.revoke().await.unwrap();
    let after = use_through(&me, &holder, "after").await;
    assert!(after.contains("revoked"), "{after}");
    // Revoking what one did not make as revocable is refused.
    let err = echo.revoke().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Refused {
                code: ErrorCode::NotRevocable,
                ..
            }
        ),
        "{err}"
    );
    bus.assert_legitimate_service_intact().await;
}

#[tokio::test]
async fn budgets_and_expiry_hold_across_processes() {
    let bus = Bus::start(&[]).await;
    let me = bus.driver().await;
    let echo = me.lookup(NAME).await.unwrap();
    let (_holder, holder) = bus.holder(&me, "t.holder").await;
    // One message, then spent. (A budgeted capability moves: the sender loses it.)
    let once = echo
        .attenuate(Attenuation::rights(Rights::SEND | Rights::GRANT).max_messages(1))
        .await
        .unwrap();
    assert!(once.moves());
    me.call_with(&holder, "take", &[&once], T).await.unwrap();
    // Gone from this driver: refused locally, nothing sent.
    assert!(matches!(
        me.send(&once, "again").await,
        Err(junction_driver::Error::Moved { .. })
    ));
    assert!(matches!(
        me.call_with(&holder, "take", &[&once], T).await,
        Err(junction_driver::Error::Moved { .. })
    ));
    assert!(!echo.moves());
    assert!(
        use_through(&me, &holder, "one")
            .await
            .starts_with("one via")
    );
    let spent = use_through(&me, &holder, "two").await;
    assert!(spent.contains("budget"), "{spent}");
    drop(once);

    // Expiring: works now, dead after its time.
    let (holder2, h2) = bus.holder(&me, "t.holder2").await;
    let brief = echo
        .attenuate(
            Attenuation::rights(Rights::SEND | Rights::GRANT).expiring_in(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    me.call_with(&h2, "take", &[&brief], T).await.unwrap();
    let r = me.call(&h2, "use:soon", T).await.unwrap();
    assert!(String::from_utf8_lossy(&r.payload).starts_with("soon via"));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = me.call(&h2, "use:late", T).await.unwrap();
    let late = String::from_utf8_lossy(&r.payload);
    assert!(late.contains("expired"), "{late}");
    drop(holder2);
    bus.assert_legitimate_service_intact().await;
}

#[tokio::test]
async fn guessed_handles_reach_nothing() {
    let bus = Bus::start(&[]).await;
    let (mut raw, _) = RawClient::hello(&bus.junction.socket);
    for guess in 1..64u32 {
        raw.send_frame(&Frame::with_payload(
            Header::Send(Send {
                handle: guess,
                caps: vec![],
            }),
            Bytes::from_static(b"guess"),
        ));
        let f = raw.recv_until(|h| matches!(h, Header::Error(_)));
        assert!(matches!(f.header, Header::Error(e) if e.code == ErrorCode::UnknownHandle));
    }
    for guess in [0x0001_0001u32, 0xffff_0001, 0x0002_0003] {
        raw.send(Header::Revoke { handle: guess });
        let f = raw.recv_until(|h| matches!(h, Header::Error(_)));
        assert!(matches!(f.header, Header::Error(e) if e.code == ErrorCode::UnknownHandle));
    }
    bus.assert_legitimate_service_intact().await;
}

#[tokio::test]
async fn users_outside_allow_uids_are_turned_away() {
    let junction = TestJunction::start(&["--allow-uid", "4242424"]);
    match Driver::connect(&junction.socket).await {
        Err(Error::Handshake(message)) => assert!(message.contains("allow_uids"), "{message}"),
        Err(Error::Closed { .. }) => {}
        other => panic!("a user outside allow_uids got in: {other:?}"),
    }
    let deadline = Instant::now() + T;
    while !junction.log().contains("not in allow_uids") {
        assert!(Instant::now() < deadline, "the refusal was not logged");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_service_decides_per_message_from_the_callers_proven_identity() {
    let bus = Bus::start(&[]).await;
    let service = bus.driver().await;
    let mut port = service.open_port().await.unwrap();
    let cap = port.mint(Rights::SEND | Rights::GRANT).await.unwrap();
    service.register("t.guarded", &cap).await.unwrap();
    bus.pki
        .issue("client", "client", "authority", &["--role", "client"]);
    let trusted_client = key(&bus.pki.key("client")).public();
    let policy = junction_driver::Policy::new()
        .allow_names("org.acme.*")
        .unwrap()
        .allow_key(trusted_client);
    tokio::spawn(async move {
        while let Ok(msg) = port.recv().await {
            let answer = match policy.check(&msg) {
                Ok(_) => "welcome".to_string(),
                Err(e) => format!("{e}"),
            };
            let _ = msg.reply(answer);
        }
    });
    let ask = |d: Driver| async move {
        let cap = d.lookup("t.guarded").await.unwrap();
        let r = d.call(&cap, "may I?", T).await.unwrap();
        String::from_utf8_lossy(&r.payload).into_owned()
    };
    let anonymous = ask(bus.driver().await).await;
    assert!(anonymous.contains("proved no identity"), "{anonymous}");
    let (acme, r) = bus
        .try_as(&bus.pki.path("echo.key"), &bus.pki.path("echo.cert"))
        .await;
    r.unwrap();
    assert_eq!(ask(acme).await, "welcome");
    let (client, r) = bus
        .try_as(&bus.pki.path("client.key"), &bus.pki.path("client.cert"))
        .await;
    r.unwrap();
    assert_eq!(ask(client).await, "welcome");
    bus.pki.issue(
        "stranger",
        "stranger",
        "authority",
        &["--role", "service", "--name", "com.other.x"],
    );
    let (stranger, r) = bus
        .try_as(&bus.pki.key("stranger"), &bus.pki.path("stranger.cert"))
        .await;
    r.unwrap();
    let denied = ask(stranger).await;
    assert!(
        denied.contains("not allowed") && denied.contains("com.other.x"),
        "{denied}"
    );
}

#[tokio::test]
async fn an_attenuated_budget_is_shared_not_copied() {
    let junction = TestJunction::start(&[]);
    let holder = Driver::connect(&junction.socket).await.unwrap();
    let owner = Driver::connect(&junction.socket).await.unwrap();
    let mut port = owner.open_port().await.unwrap();
    let full = port.mint(Rights::SEND | Rights::GRANT).await.unwrap();
    // The holder gets a capability limited to one message...
    let mut inbox = holder.open_port().await.unwrap();
    let minted = inbox.mint(Rights::SEND | Rights::GRANT).await.unwrap();
    holder.register("t.budget", &minted).await.unwrap();
    let to_holder = owner.lookup("t.budget").await.unwrap();
    let once = full
        .attenuate(Attenuation::rights(Rights::SEND | Rights::GRANT).max_messages(1))
        .await
        .unwrap();
    owner
        .send_with(&to_holder, "yours", &[&once])
        .await
        .unwrap();
    let msg = tokio::time::timeout(T, inbox.recv())
        .await
        .unwrap()
        .unwrap();
    let once = msg.caps.into_iter().next().expect("the capability came");
    // ...and attenuates it 200 times, then sends on every one.
    let mut all = vec![once];
    for i in 0..200 {
        let from = &all[i / 2];
        let narrower = from
            .attenuate(Attenuation::rights(Rights::SEND | Rights::GRANT))
            .await
            .unwrap();
        all.push(narrower);
    }
    for cap in &all {
        let _ = holder.send(cap, "one of 201").await;
    }
    holder.sync().await.unwrap();
    let first = tokio::time::timeout(T, port.recv()).await.unwrap().unwrap();
    assert_eq!(first.payload, Bytes::from_static(b"one of 201"));
    let more = tokio::time::timeout(Duration::from_millis(500), port.recv()).await;
    assert!(
        more.is_err(),
        "a one-message budget delivered a second message"
    );
}

#[tokio::test]
async fn junk_after_the_trusted_link_is_neither_kept_nor_served() {
    let bus = Bus::start(&[]).await;
    bus.pki.issue(
        "junky",
        "junky",
        "authority",
        &["--role", "service", "--name", "org.acme.junky"],
    );
    // The file holds the leaf and the authority's own certificate, which
    // comes after the link the authority signed: not kept either.
    let file = chain(&bus.pki.path("junky.cert"));
    let leaf = file[..1].to_vec();
    // Large certificates nobody signed, appended after the link the
    // authority signed: verification never reaches them.
    let mut junk = leaf[0].clone();
    junk.body.role = junction_identity::Role::Service {
        names: (0..2000)
            .map(|i| format!("org.junk.name{i}").parse().unwrap())
            .collect(),
    };
    let mut padded = file.clone();
    padded.extend(std::iter::repeat_n(junk, 8 - file.len()));
    let sent = postcard::to_allocvec(&padded).unwrap().len();
    assert!(sent > 100_000, "{sent} bytes of chain");
    let d = bus.driver().await;
    d.authenticate(&key(&bus.pki.path("junky.key")), padded)
        .await
        .unwrap();
    let port = d.open_port().await.unwrap();
    let cap = port.mint(Rights::SEND | Rights::GRANT).await.unwrap();
    d.register("org.acme.junky", &cap).await.unwrap();

    let client = bus.driver().await;
    let (_, served) = client.lookup_with_chain("org.acme.junky").await.unwrap();
    let served = served.expect("registered with a certificate");
    assert_eq!(served, leaf, "only the verified link is served");
    let bytes = postcard::to_allocvec(&served).unwrap().len();
    assert!(bytes < 2048, "a lookup serves {bytes} bytes of chain");
    bus.assert_legitimate_service_intact().await;
}

#[tokio::test]
async fn a_connection_gets_one_attempt_to_authenticate() {
    let bus = Bus::start(&[]).await;
    let echo_chain = chain(&bus.pki.path("echo.cert"));
    let thief_key = SecretKey::generate().unwrap();
    let (mut raw, w) = RawClient::hello(&bus.junction.socket);
    let proof = prove_possession(&thief_key, &w.nonce, w.junction);
    let attempt = |raw: &mut RawClient| {
        raw.control(&ControlRequest::Authenticate {
            chain: echo_chain.clone(),
            proof: proof.clone(),
        })
        .0
    };
    match attempt(&mut raw) {
        ControlReply::Refused { code, .. } => assert_eq!(code, ErrorCode::BadProof),
        other => panic!("a wrong key was accepted: {other:?}"),
    }
    // Every later attempt is refused without a signature checked, while
    // others keep being served.
    let bystander = bus.driver().await;
    let echo = bystander.lookup(NAME).await.unwrap();
    for i in 0..200 {
        match attempt(&mut raw) {
            ControlReply::Refused { code, message } => {
                assert_eq!(code, ErrorCode::AlreadyAuthenticated, "{message}");
                assert!(message.contains("connect again"), "{message}");
            }
            other => panic!("attempt {i} was examined: {other:?}"),
        }
        if i % 50 == 0 {
            let r = bystander.call(&echo, "still there?", T).await.unwrap();
            assert_eq!(r.payload, Bytes::from_static(b"still there?"));
        }
    }
    // The refusals are not logged one by one: the log cannot be flooded.
    let logged = bus.junction.log().matches("refused").count();
    assert!(logged < 10, "{logged} refusals logged");
    bus.assert_legitimate_service_intact().await;
}

#[tokio::test]
async fn names_are_bounded_per_connection_and_ls_always_answers() {
    // A small frame, so that a few connections' names overflow it.
    let junction = TestJunction::start(&["--max-frame", "65536"]);
    let label = "x".repeat(60);
    let mut hoarders = Vec::new();
    for c in 0..8 {
        let d = Driver::connect(&junction.socket).await.unwrap();
        let port = d.open_port().await.unwrap();
        let cap = port.mint(Rights::SEND | Rights::GRANT).await.unwrap();
        for n in 0..64 {
            let name = format!("t.{label}.{label}.{label}.c{c}n{n}");
            d.register(&name, &cap).await.unwrap();
        }
        // The 65th name of one connection is refused, with what to do.
        let err = d.register(&format!("t.c{c}.one-too-many"), &cap).await;
        let (code, message) = code(err);
        assert_eq!(code, ErrorCode::BadRegistration);
        assert!(message.contains("64 names"), "{message}");
        hoarders.push((d, port, cap));
    }
    // 8 × 64 names of 200 bytes do not fit in a 64 KiB frame: the listing
    // is cut, says so, and everyone can still list.
    let d = Driver::connect(&junction.socket).await.unwrap();
    let listing = d.listing().await.unwrap();
    assert!(listing.more_ports > 0, "{listing:?}");
    assert_eq!(listing.more_connections, 0);
    let out = junction.command(&["ls"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("more ports"), "{text}");
}

#[tokio::test]
async fn lineages_of_dead_roots_do_not_grow_the_junction() {
    use junction_road::Attenuate;
    const BATCH: usize = 16;
    let junction = TestJunction::start(&[]);
    let (mut raw, w) = RawClient::hello(&junction.socket);
    let home = w.home.port;
    raw.send(Header::Mint {
        req: 1,
        port: home,
        rights: Rights::SEND | Rights::GRANT,
    });
    let Header::Minted {
        handle: to_home, ..
    } = raw
        .recv_until(|h| matches!(h, Header::Minted { .. }))
        .header
    else {
        unreachable!()
    };
    // Each cycle makes revocable, budgeted roots and passes them to its
    // own home port (budgeted, they move, so the roots leave their table),
    // then drops what arrives: every lineage's root is gone.
    let cycle = |raw: &mut RawClient| {
        for req in 0..BATCH as u32 {
            raw.send(Header::Attenuate(Attenuate {
                req,
                handle: to_home,
                rights: Rights::SEND | Rights::GRANT,
                expires_at: None,
                max_messages: Some(1),
                revocable: true,
            }));
        }
        let mut roots = Vec::new();
        while roots.len() < BATCH {
            let f = raw.recv_until(|h| matches!(h, Header::Minted { .. }));
            if let Header::Minted { handle, .. } = f.header {
                roots.push(handle);
            }
        }
        raw.send(Header::Send(Send {
            handle: to_home,
            caps: roots,
        }));
        let f = raw.recv_until(|h| matches!(h, Header::Deliver(_)));
        let Header::Deliver(d) = f.header else {
            unreachable!()
        };
        assert_eq!(d.caps.len(), BATCH);
        for g in d.caps {
            raw.send(Header::Drop { handle: g.handle });
        }
        raw.send(Header::Credit {
            port: home,
            count: 1,
        });
    };
    for _ in 0..1000 {
        cycle(&mut raw);
    }
    let warm = junction.rss_kib();
    for _ in 0..5000 {
        cycle(&mut raw);
    }
    // Before the fix each cycle left its lineages behind: about 12 MiB here.
    let grown = junction.rss_kib().saturating_sub(warm);
    assert!(
        grown < 4 * 1024,
        "the junction grew by {grown} KiB over 5000 cycles"
    );
    raw.send(Header::Ping { nonce: 7 });
    raw.recv_until(|h| matches!(h, Header::Pong { nonce: 7 }));
}
