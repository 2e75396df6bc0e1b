//! The Highway's TLS identity and admission: certificates read by openssl,
//! and real quinn connections on 127.0.0.1, accepted and refused.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use junction_identity::{
    CertBody, Certificate, RevocationBody, RevocationList, Role, SecretKey, TrustStore, Verified,
};

use super::*;
use crate::cert::{BUS_CHAIN_OID_STR, day_of, junction_of_server_name, parse_peer, server_name};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A test bus: its authority and the trust store that believes it.
struct Bus {
    key: SecretKey,
    trust: TrustStore,
}

fn bus() -> Bus {
    let key = SecretKey::generate().unwrap();
    let own = Certificate::authority(&key, 1, 0, u64::MAX).unwrap();
    let mut trust = TrustStore::new();
    trust.add_authority(&own).unwrap();
    Bus { key, trust }
}

impl Bus {
    /// A chain of one certificate for `key` in `role`, with `serial`.
    fn certify(&self, key: &SecretKey, role: Role, serial: u64) -> Vec<Certificate> {
        let body = CertBody {
            version: 1,
            serial,
            subject: key.public(),
            role,
            not_before: now() - 3600,
            not_after: now() + 86_400,
            issuer: self.key.public(),
        };
        vec![Certificate::issue(body, &self.key).unwrap()]
    }

    /// Junction `id`'s key, chain (serial `0x100 + id`) and TLS identity.
    fn junction(&self, id: u16) -> (SecretKey, Vec<Certificate>, TlsIdentity) {
        let key = SecretKey::generate().unwrap();
        let chain = self.certify(&key, Role::Junction { id }, 0x100 + u64::from(id));
        let tls = TlsIdentity::new(&key, &chain).unwrap();
        (key, chain, tls)
    }

    fn policy(&self) -> PeerPolicy {
        PeerPolicy::new(self.trust.clone(), Revocations::default())
    }

    fn revoking(&self, serials: Vec<u64>) -> Verified<RevocationList> {
        let body = RevocationBody {
            issuer: self.key.public(),
            number: 1,
            issued_at: now(),
            serials,
            keys: vec![],
        };
        RevocationList::issue(body, &self.key)
            .unwrap()
            .verify(&self.trust)
            .unwrap()
    }
}

// ---------------------------------------------------------------------------
// The certificate.

#[test]
fn the_certificate_carries_the_chain_and_reads_back() {
    let b = bus();
    let (key, chain, tls) = b.junction(3);
    assert_eq!(tls.junction(), 3);
    let peer = parse_peer(tls.certificate()).unwrap();
    assert_eq!(peer.key, key.public());
    assert_eq!(peer.chain.as_deref(), Some(chain.as_slice()));
    assert_eq!(
        peer_junction(std::slice::from_ref(tls.certificate())),
        Some(3)
    );
    assert!(format!("{tls:?}").contains("redacted"));
    let checked = b
        .policy()
        .check(tls.certificate(), &[], Some(3), now())
        .unwrap();
    assert_eq!(
        checked,
        PeerJunction {
            id: 3,
            key: key.public()
        }
    );
}

#[test]
fn openssl_reads_the_certificate() {
    let b = bus();
    let (_, _, tls) = b.junction(3);
    let pem = tls.certificate_pem();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    let child = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            println!("note: no openssl binary ({e}); openssl_reads_the_certificate skipped");
            return;
        }
    };
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(pem.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openssl refused it: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(BUS_CHAIN_OID_STR), "{text}");
    assert!(text.contains("ED25519"), "{text}");
    assert!(text.contains("DNS:junction-3"), "{text}");
    // Non-critical: openssl marks critical extensions so.
    let ext_line = text
        .lines()
        .find(|l| l.contains(BUS_CHAIN_OID_STR))
        .unwrap();
    assert!(!ext_line.contains("critical"), "{ext_line}");
}

#[test]
fn a_junction_identity_needs_its_own_junction_certificate() {
    let b = bus();
    let key = SecretKey::generate().unwrap();
    let other = SecretKey::generate().unwrap();
    let service = b.certify(
        &key,
        Role::Service {
            names: vec!["org.acme.echo".parse().unwrap()],
        },
        5,
    );
    assert!(matches!(
        TlsIdentity::new(&key, &service),
        Err(HighwayError::NotAJunctionCertificate { .. })
    ));
    let theirs = b.certify(&other, Role::Junction { id: 4 }, 6);
    let err = TlsIdentity::new(&key, &theirs).unwrap_err();
    assert!(
        matches!(err, HighwayError::ChainForAnotherKey { .. }),
        "{err}"
    );
    assert!(matches!(
        TlsIdentity::new(&key, &[]),
        Err(HighwayError::NoChain)
    ));
}

#[test]
fn server_names_name_junctions() {
    assert_eq!(server_name(42), "junction-42");
    assert_eq!(junction_of_server_name("junction-42"), Some(42));
    assert_eq!(junction_of_server_name("junction-65535"), Some(65535));
    for bad in [
        "junction-",
        "junction-042",
        "junction-+4",
        "junction-65536",
        "junction 4",
        "4",
    ] {
        assert_eq!(junction_of_server_name(bad), None, "{bad}");
    }
}

#[test]
fn x509_dates_are_the_bus_leaf_days() {
    assert_eq!(day_of(0, false), (1970, 1, 1));
    assert_eq!(day_of(0, true), (1970, 1, 1));
    assert_eq!(day_of(1_700_000_000, false), (2023, 11, 14));
    assert_eq!(day_of(1_700_000_000, true), (2023, 11, 15));
    assert_eq!(day_of(951_782_400, false), (2000, 2, 29));
    assert_eq!(day_of(u64::MAX, true), (9999, 12, 31));
}

#[test]
fn a_large_chain_survives_the_der_length_form() {
    // Chains over 127 and 255 bytes take the long DER length forms.
    let b = bus();
    let key = SecretKey::generate().unwrap();
    let mut chain = b.certify(&key, Role::Junction { id: 9 }, 9);
    chain.extend(b.certify(&key, Role::Client, 10));
    chain.extend(b.certify(&key, Role::Client, 11));
    let tls = TlsIdentity::danger_unchecked(&key, Some(&chain), 9).unwrap();
    assert_eq!(
        parse_peer(tls.certificate()).unwrap().chain.as_deref(),
        Some(chain.as_slice())
    );
}

#[test]
fn garbage_is_refused_without_panic() {
    let policy = bus().policy();
    for bytes in [&b""[..], b"\x30\x03\x02\x01\x01", &[0xff; 64]] {
        let err = policy
            .check(&CertificateDer::from(bytes.to_vec()), &[], None, now())
            .unwrap_err();
        assert!(matches!(err, PeerRefused::Malformed { .. }), "{err}");
    }
    assert_eq!(peer_junction(&[]), None);
}

// ---------------------------------------------------------------------------
// Real connections.

use rustls::pki_types::CertificateDer;

/// What each side of one connection attempt saw: the peer's junction id
/// once a message went both ways, or the error's words.
#[derive(Debug)]
struct Outcome {
    server: Result<Option<u16>, String>,
    client: Result<Option<u16>, String>,
}

/// `client` dials `server` (on 127.0.0.1) as junction `dial`; the client
/// sends one message and the server echoes it.
async fn attempt(
    server: (&TlsIdentity, &PeerPolicy),
    client: (&TlsIdentity, &PeerPolicy),
    dial: u16,
) -> Outcome {
    let transport = TransportSettings::default();
    let server_cfg = server_config(server.0, server.1, &transport).unwrap();
    let client_cfg = client_config(client.0, client.1, &transport).unwrap();
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server_ep = quinn::Endpoint::server(server_cfg, listen).unwrap();
    let addr = server_ep.local_addr().unwrap();
    let serving = tokio::spawn(async move {
        let incoming = server_ep.accept().await.ok_or("endpoint closed")?;
        let conn = incoming.await.map_err(|e| e.to_string())?;
        let peer = connection_peer_junction(&conn);
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let msg = recv.read_to_end(64).await.map_err(|e| e.to_string())?;
        send.write_all(&msg).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        conn.closed().await;
        Ok::<_, String>(peer)
    });
    let client_ep = quinn::Endpoint::client(listen).unwrap();
    let dialling = async {
        let connecting = client_ep
            .connect_with(client_cfg, addr, &server_name(dial))
            .map_err(|e| e.to_string())?;
        let conn = connecting.await.map_err(|e| e.to_string())?;
        let peer = connection_peer_junction(&conn);
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(b"hello").await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let echo = recv.read_to_end(64).await.map_err(|e| e.to_string())?;
        assert_eq!(echo, b"hello");
        conn.close(0u32.into(), b"done");
        Ok::<_, String>(peer)
    };
    let limit = Duration::from_secs(10);
    let client = tokio::time::timeout(limit, dialling)
        .await
        .unwrap_or_else(|_| Err("client timed out".into()));
    let server = match tokio::time::timeout(limit, serving).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(format!("server task: {e}")),
        Err(_) => Err("server timed out".into()),
    };
    client_ep.wait_idle().await;
    Outcome { server, client }
}

#[tokio::test]
async fn two_junctions_admit_each_other_both_ways() {
    let b = bus();
    let policy = b.policy();
    let (_, _, one) = b.junction(1);
    let (_, _, two) = b.junction(2);
    let o = attempt((&one, &policy), (&two, &policy), 1).await;
    assert_eq!(o.server, Ok(Some(2)), "{o:?}");
    assert_eq!(o.client, Ok(Some(1)), "{o:?}");
    let o = attempt((&two, &policy), (&one, &policy), 2).await;
    assert_eq!(o.server, Ok(Some(1)), "{o:?}");
    assert_eq!(o.client, Ok(Some(2)), "{o:?}");
}

/// `rogue` is refused by a good junction of `b` both when it dials (the
/// server refuses; the rogue's connect may still succeed, but the server
/// yields no connection) and when it is dialled as junction `as_id` (the
/// client refuses). Each refusing side's error says `why`.
async fn refused_both_ways(b: &Bus, rogue: &TlsIdentity, as_id: u16, why: &str) {
    let policy = b.policy();
    let (_, _, good) = b.junction(1);
    let rogue_policy = b.policy();
    let o = attempt((&good, &policy), (rogue, &rogue_policy), 1).await;
    let server = o
        .server
        .as_ref()
        .expect_err("the server must not admit the rogue client");
    println!("listener refused: {server}");
    assert!(
        server.contains(why),
        "server said {server:?}, expected {why:?}"
    );
    assert!(o.client.is_err(), "{o:?}");
    let o = attempt((rogue, &rogue_policy), (&good, &policy), as_id).await;
    let client = o
        .client
        .as_ref()
        .expect_err("the client must not admit the rogue server");
    println!("dialer refused: {client}");
    assert!(
        client.contains(why),
        "client said {client:?}, expected {why:?}"
    );
    assert!(o.server.is_err(), "{o:?}");
}

#[tokio::test]
async fn a_self_signed_key_with_no_chain_is_refused() {
    let b = bus();
    let key = SecretKey::generate().unwrap();
    let rogue = TlsIdentity::danger_unchecked(&key, None, 5).unwrap();
    refused_both_ways(&b, &rogue, 5, "a self-signed key with no bus chain").await;
}

#[tokio::test]
async fn a_chain_from_another_authority_is_refused() {
    let b = bus();
    let (_, _, foreign) = bus().junction(5);
    refused_both_ways(&b, &foreign, 5, "an authority this bus does not trust").await;
}

#[tokio::test]
async fn a_service_certificate_is_refused() {
    let b = bus();
    let key = SecretKey::generate().unwrap();
    let names = vec!["org.acme.echo".parse().unwrap()];
    let chain = b.certify(&key, Role::Service { names }, 77);
    let rogue = TlsIdentity::danger_unchecked(&key, Some(&chain), 5).unwrap();
    refused_both_ways(
        &b,
        &rogue,
        5,
        "service org.acme.echo certificate, not a junction's",
    )
    .await;
}

#[tokio::test]
async fn a_tls_key_that_is_not_the_bus_key_is_refused() {
    let b = bus();
    // Junction 5's genuine chain, shown by a machine with another key.
    let (_, chain, _) = b.junction(5);
    let thief = SecretKey::generate().unwrap();
    let rogue = TlsIdentity::danger_unchecked(&thief, Some(&chain), 5).unwrap();
    refused_both_ways(
        &b,
        &rogue,
        5,
        "is not the key its bus certificate speaks for",
    )
    .await;
}

#[tokio::test]
async fn a_junction_dialled_under_another_id_is_refused() {
    let b = bus();
    let policy = b.policy();
    let (_, _, four) = b.junction(4);
    let (_, _, one) = b.junction(1);
    // The dialer wants junction 3; junction 4 answers, with a valid
    // certificate of its own.
    let o = attempt((&four, &policy), (&one, &policy), 3).await;
    let client = o
        .client
        .expect_err("the dialer must refuse junction 4 as 3");
    assert!(
        client.contains("the peer's certificate is for junction 4, not 3"),
        "{client}"
    );
    assert!(o.server.is_err());
}

#[tokio::test]
async fn a_junction_revoked_at_run_time_is_refused_from_then_on() {
    let b = bus();
    let policy = b.policy();
    let (_, chain, two) = b.junction(2);
    let (_, _, one) = b.junction(1);
    let o = attempt((&one, &policy), (&two, &policy), 1).await;
    assert_eq!(o.server, Ok(Some(2)), "{o:?}");
    let serial = chain[0].body.serial;
    assert_eq!(
        policy.revocations().replace(Some(b.revoking(vec![serial]))),
        None
    );
    assert_eq!(policy.revocations().number(), Some(1));
    let why = format!("the peer's certificate {serial:#x} is revoked");
    // It dials: the listener refuses it.
    let o = attempt((&one, &policy), (&two, &b.policy()), 1).await;
    let server = o
        .server
        .expect_err("a revoked junction must not be admitted");
    assert!(server.contains(&why), "{server}");
    assert!(o.client.is_err());
    // It is dialled: the dialer refuses it.
    let o = attempt((&two, &b.policy()), (&one, &policy), 2).await;
    let client = o
        .client
        .expect_err("a revoked junction must not be admitted");
    assert!(client.contains(&why), "{client}");
}

#[test]
fn transport_settings_are_checked() {
    let b = bus();
    let (_, _, one) = b.junction(1);
    let forever = TransportSettings {
        idle_timeout: Duration::from_secs(u64::MAX / 2),
        ..TransportSettings::default()
    };
    assert!(matches!(
        server_config(&one, &b.policy(), &forever),
        Err(HighwayError::IdleTimeout { .. })
    ));
}

/// A Highway carries one bidirectional stream, the control stream its
/// dialer opens: a neighbour cannot open more, each of which quinn would
/// fill with up to a stream window of data nobody reads, nor send
/// datagrams. Unidirectional streams, for traffic, stay many.
#[tokio::test]
async fn a_neighbour_may_open_one_bidirectional_stream() {
    let b = bus();
    let (_, _, one) = b.junction(1);
    let (_, _, two) = b.junction(2);
    let policy = b.policy();
    let transport = TransportSettings::default();
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server_ep =
        quinn::Endpoint::server(server_config(&two, &policy, &transport).unwrap(), listen).unwrap();
    let client_ep = quinn::Endpoint::client(listen).unwrap();
    let connecting = client_ep
        .connect_with(
            client_config(&one, &policy, &transport).unwrap(),
            server_ep.local_addr().unwrap(),
            &server_name(2),
        )
        .unwrap();
    let (conn, accepted) = tokio::join!(connecting, async {
        server_ep.accept().await.unwrap().await
    });
    let (conn, _accepted) = (conn.unwrap(), accepted.unwrap());

    assert_eq!(conn.max_datagram_size(), None, "no datagrams");
    assert!(conn.open_bi().await.is_ok(), "the control stream");
    // Opening a stream is decided at once, from the peer's limit.
    let mut second = std::pin::pin!(conn.open_bi());
    let polled = std::future::poll_fn(|cx| std::task::Poll::Ready(second.as_mut().poll(cx))).await;
    assert!(polled.is_pending(), "no second bidirectional stream");
    for _ in 0..64 {
        let mut next = std::pin::pin!(conn.open_uni());
        let polled =
            std::future::poll_fn(|cx| std::task::Poll::Ready(next.as_mut().poll(cx))).await;
        assert!(polled.is_ready(), "data streams open at once");
    }
}
