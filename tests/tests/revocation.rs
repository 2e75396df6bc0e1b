//! Revocation lists are ordered by their number: a list that is not newer
//! than the one in force, even one made in the same second, cannot bring a
//! revoked certificate back at SIGHUP.

use std::path::Path;
use std::time::{Duration, Instant};

use junction_driver::{Driver, Error, ErrorCode};
use junction_identity::{Certificate, RevocationList, SecretKey};
use junction_tests::{TestJunction, TestPki};

const T: Duration = Duration::from_secs(10);

fn key(path: &Path) -> SecretKey {
    SecretKey::from_pem(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn chain(path: &Path) -> Vec<Certificate> {
    Certificate::chain_from_pem(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn sighup(j: &TestJunction) {
    // SAFETY: kill has no memory-safety preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(j.process.pid() as i32, libc::SIGHUP);
    }
}

/// Whether the service's certificate is refused as revoked right now.
async fn revoked(j: &TestJunction, pki: &TestPki) -> bool {
    let d = Driver::connect(&j.socket).await.unwrap();
    match d
        .authenticate(&key(&pki.path("svc.key")), chain(&pki.path("svc.cert")))
        .await
    {
        Ok(_) => false,
        Err(Error::Refused {
            code: ErrorCode::CertificateRevoked,
            ..
        }) => true,
        Err(e) => panic!("unexpected: {e}"),
    }
}

async fn until_revoked(j: &TestJunction, pki: &TestPki, want: bool) {
    let deadline = Instant::now() + T;
    while revoked(j, pki).await != want {
        assert!(Instant::now() < deadline, "the reload never took effect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for the junction to log its `n`th refusal of a list.
async fn until_refused(j: &TestJunction, n: usize) -> String {
    let deadline = Instant::now() + T;
    loop {
        let log = j.log();
        if log.matches("keeping the old revocation list").count() >= n {
            return log;
        }
        assert!(Instant::now() < deadline, "no refusal logged: {log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_list_not_numbered_above_the_one_in_force_is_refused() {
    let pki = TestPki::new();
    pki.issue(
        "svc",
        "svc",
        "authority",
        &["--role", "service", "--name", "org.acme.svc"],
    );
    let crl = pki.revoke(&[]);
    let first = RevocationList::from_pem(&std::fs::read_to_string(&crl).unwrap()).unwrap();
    assert_eq!(first.body.number, 1, "cert revoke numbers from 1");
    let j = TestJunction::start(&[
        "--authority",
        pki.path("authority.cert").to_str().unwrap(),
        "--revocations",
        crl.to_str().unwrap(),
    ]);
    assert!(!revoked(&j, &pki).await);

    pki.revoke(&["--cert", "svc.cert"]);
    let second = RevocationList::from_pem(&std::fs::read_to_string(&crl).unwrap()).unwrap();
    assert_eq!(second.body.number, 2, "cert revoke counts up");
    sighup(&j);
    until_revoked(&j, &pki, true).await;

    // Another list with the same number and the same second, that revokes
    // nothing: under `issued_at` ordering it would have replaced the list
    // in force and brought the certificate back.
    let authority = key(&pki.path("authority.key"));
    let mut twin = second.body.clone();
    twin.serials.clear();
    let twin = RevocationList::issue(twin, &authority).unwrap();
    std::fs::write(&crl, twin.to_pem()).unwrap();
    sighup(&j);
    let log = until_refused(&j, 1).await;
    assert!(log.contains("number 2, not newer than number 2"), "{log}");
    assert!(revoked(&j, &pki).await, "the same-numbered list was taken");

    // An older list is refused as well.
    std::fs::write(&crl, first.to_pem()).unwrap();
    sighup(&j);
    until_refused(&j, 2).await;
    assert!(revoked(&j, &pki).await, "the older list was taken");

    // The list in force again changes nothing and is no error.
    std::fs::write(&crl, second.to_pem()).unwrap();
    sighup(&j);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        j.log().matches("keeping the old revocation list").count(),
        2,
        "{}",
        j.log()
    );

    // A higher number is taken, whatever it says: the authority decided.
    let mut third = second.body.clone();
    third.number = 3;
    third.serials.clear();
    let third = RevocationList::issue(third, &authority).unwrap();
    std::fs::write(&crl, third.to_pem()).unwrap();
    sighup(&j);
    until_revoked(&j, &pki, false).await;
}
