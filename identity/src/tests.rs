//! Certificates, chains, revocation, proofs and tokens against tampering.

use proptest::prelude::*;

use super::*;

const NOW: u64 = 1_800_000_000;

struct Bus {
    authority: SecretKey,
    authority_cert: Certificate,
    trust: TrustStore,
}

fn bus() -> Bus {
    let authority = SecretKey::generate().unwrap();
    let authority_cert = Certificate::authority(&authority, 1, 0, u64::MAX).unwrap();
    let mut trust = TrustStore::new();
    trust.add_authority(&authority_cert).unwrap();
    Bus {
        authority,
        authority_cert,
        trust,
    }
}

fn body(serial: u64, subject: &SecretKey, role: Role, issuer: &SecretKey) -> CertBody {
    CertBody {
        version: 1,
        serial,
        subject: subject.public(),
        role,
        not_before: NOW - 100,
        not_after: NOW + 100,
        issuer: issuer.public(),
    }
}

fn service(names: &[&str]) -> Role {
    Role::Service {
        names: names.iter().map(|n| n.parse().unwrap()).collect(),
    }
}

#[test]
fn a_service_certificate_verifies_and_grants_its_names() {
    let b = bus();
    let key = SecretKey::generate().unwrap();
    let cert = Certificate::issue(
        body(7, &key, service(&["org.acme.echo"]), &b.authority),
        &b.authority,
    )
    .unwrap();
    let v = b
        .trust
        .verify_chain(std::slice::from_ref(&cert), NOW, None)
        .unwrap();
    assert!(v.grants(&"org.acme.echo".parse().unwrap()));
    assert!(!v.grants(&"org.acme.other".parse().unwrap()));
    // With the authority's certificate appended, too.
    b.trust
        .verify_chain(&[cert.clone(), b.authority_cert.clone()], NOW, None)
        .unwrap();
    // PEM round trip, chains included.
    let pem = format!("{}{}", cert.to_pem(), b.authority_cert.to_pem());
    assert_eq!(
        Certificate::chain_from_pem(&pem).unwrap(),
        vec![cert, b.authority_cert]
    );
}

#[test]
fn time_untrusted_and_swapped_keys_are_refused() {
    let b = bus();
    let key = SecretKey::generate().unwrap();
    let cert = Certificate::issue(body(7, &key, Role::Client, &b.authority), &b.authority).unwrap();
    assert!(matches!(
        b.trust
            .verify_chain(std::slice::from_ref(&cert), NOW + 100, None),
        Err(IdentityError::Expired { .. })
    ));
    assert!(matches!(
        b.trust
            .verify_chain(std::slice::from_ref(&cert), NOW - 101, None),
        Err(IdentityError::NotYetValid { .. })
    ));
    let rogue = SecretKey::generate().unwrap();
    let forged = Certificate::issue(body(8, &key, Role::Client, &rogue), &rogue).unwrap();
    assert!(matches!(
        b.trust.verify_chain(&[forged], NOW, None),
        Err(IdentityError::Untrusted { .. })
    ));
    // A body claiming the real authority as issuer, signed by another key.
    let mut swapped = cert.clone();
    swapped.signature = rogue.sign(
        Purpose::Certificate,
        &postcard::to_allocvec(&swapped.body).unwrap(),
    );
    assert!(matches!(
        b.trust.verify_chain(&[swapped], NOW, None),
        Err(IdentityError::BadCertificateSignature { .. })
    ));
    // A signature for another purpose over the same bytes.
    let mut wrong_purpose = cert;
    wrong_purpose.signature = b.authority.sign(
        Purpose::ProofOfPossession,
        &postcard::to_allocvec(&wrong_purpose.body).unwrap(),
    );
    assert!(b.trust.verify_chain(&[wrong_purpose], NOW, None).is_err());
    assert!(matches!(
        Certificate::issue(body(9, &key, Role::Client, &b.authority), &rogue),
        Err(IdentityError::WrongIssuerKey)
    ));
}

#[test]
fn every_field_altered_breaks_the_signature() {
    let b = bus();
    let key = SecretKey::generate().unwrap();
    let cert =
        Certificate::issue(body(7, &key, service(&["a.b"]), &b.authority), &b.authority).unwrap();
    let other = SecretKey::generate().unwrap().public();
    type Alteration = Box<dyn Fn(&mut CertBody)>;
    let alterations: Vec<Alteration> = vec![
        Box::new(|c| c.version = 2),
        Box::new(|c| c.serial += 1),
        Box::new(move |c| c.subject = other),
        Box::new(|c| c.role = service(&["a.c"])),
        Box::new(|c| c.role = Role::Client),
        Box::new(|c| c.role = Role::Junction { id: 3 }),
        Box::new(|c| c.not_before -= 1),
        Box::new(|c| c.not_after += 1),
    ];
    for (i, alter) in alterations.iter().enumerate() {
        let mut c = cert.clone();
        alter(&mut c.body);
        assert!(
            matches!(
                b.trust.verify_chain(&[c], NOW, None),
                Err(IdentityError::BadCertificateSignature { .. })
            ),
            "alteration {i} went unnoticed"
        );
    }
    // Changing the issuer field makes the chain untrusted instead.
    let mut c = cert;
    c.body.issuer = other;
    assert!(b.trust.verify_chain(&[c], NOW, None).is_err());
}

#[test]
fn intermediates_sign_only_within_their_patterns() {
    let b = bus();
    let inter = SecretKey::generate().unwrap();
    let inter_cert = Certificate::issue(
        body(
            20,
            &inter,
            Role::Intermediate {
                patterns: vec!["org.acme.*".parse().unwrap()],
            },
            &b.authority,
        ),
        &b.authority,
    )
    .unwrap();
    let svc = SecretKey::generate().unwrap();
    let good =
        Certificate::issue(body(21, &svc, service(&["org.acme.db"]), &inter), &inter).unwrap();
    let v = b
        .trust
        .verify_chain(&[good, inter_cert.clone()], NOW, None)
        .unwrap();
    assert_eq!(v.names(), &["org.acme.db".parse::<ServiceName>().unwrap()]);

    let outside =
        Certificate::issue(body(22, &svc, service(&["org.evil.db"]), &inter), &inter).unwrap();
    assert!(matches!(
        b.trust
            .verify_chain(&[outside, inter_cert.clone()], NOW, None),
        Err(IdentityError::OutsidePatterns { .. })
    ));
    let junction =
        Certificate::issue(body(23, &svc, Role::Junction { id: 4 }, &inter), &inter).unwrap();
    assert!(matches!(
        b.trust
            .verify_chain(&[junction, inter_cert.clone()], NOW, None),
        Err(IdentityError::RoleCannotIssue { .. })
    ));
    let wider = Certificate::issue(
        body(
            24,
            &svc,
            Role::Intermediate {
                patterns: vec!["org.*".parse().unwrap()],
            },
            &inter,
        ),
        &inter,
    )
    .unwrap();
    assert!(matches!(
        b.trust
            .verify_chain(&[wider, inter_cert.clone()], NOW, None),
        Err(IdentityError::OutsidePatterns { .. })
    ));
    // A service cannot issue.
    let leaf = SecretKey::generate().unwrap();
    let svc_cert =
        Certificate::issue(body(25, &svc, service(&["org.acme.x"]), &inter), &inter).unwrap();
    let by_service =
        Certificate::issue(body(26, &leaf, service(&["org.acme.y"]), &svc), &svc).unwrap();
    assert!(matches!(
        b.trust
            .verify_chain(&[by_service, svc_cert, inter_cert], NOW, None),
        Err(IdentityError::RoleCannotIssue { .. })
    ));
}

#[test]
fn revocation_by_serial_and_by_key() {
    let b = bus();
    let key = SecretKey::generate().unwrap();
    let cert = Certificate::issue(body(7, &key, Role::Client, &b.authority), &b.authority).unwrap();
    let list = RevocationList::issue(
        RevocationBody {
            issuer: b.authority.public(),
            number: 1,
            issued_at: NOW,
            serials: vec![7],
            keys: vec![],
        },
        &b.authority,
    )
    .unwrap();
    let pem = list.to_pem();
    let list = RevocationList::from_pem(&pem)
        .unwrap()
        .verify(&b.trust)
        .unwrap();
    assert!(matches!(
        b.trust.verify_chain(&[cert], NOW, Some(&list)),
        Err(IdentityError::Revoked { serial: 7 })
    ));
    let by_key = RevocationList::issue(
        RevocationBody {
            issuer: b.authority.public(),
            number: 1,
            issued_at: NOW,
            serials: vec![],
            keys: vec![key.public()],
        },
        &b.authority,
    )
    .unwrap()
    .verify(&b.trust)
    .unwrap();
    let again =
        Certificate::issue(body(8, &key, Role::Client, &b.authority), &b.authority).unwrap();
    assert!(b.trust.verify_chain(&[again], NOW, Some(&by_key)).is_err());
    // A list signed by anyone else is not believed.
    let rogue = SecretKey::generate().unwrap();
    let fake = RevocationList::issue(
        RevocationBody {
            issuer: rogue.public(),
            number: 1,
            issued_at: NOW,
            serials: vec![],
            keys: vec![],
        },
        &rogue,
    )
    .unwrap();
    assert!(fake.verify(&b.trust).is_err());
    let mut tampered = list.into_inner();
    tampered.body.serials.clear();
    assert!(matches!(
        tampered.verify(&b.trust),
        Err(IdentityError::BadRevocationSignature)
    ));
}

#[test]
fn certify_junction_is_the_one_junction_check() {
    let b = bus();
    let key = SecretKey::generate().unwrap();
    let chain = vec![
        Certificate::issue(
            body(9, &key, Role::Junction { id: 3 }, &b.authority),
            &b.authority,
        )
        .unwrap(),
    ];
    assert_eq!(
        certify_junction(&chain, Some(3), &b.trust, None, NOW),
        Ok((3, key.public()))
    );
    assert_eq!(
        certify_junction(&chain, None, &b.trust, None, NOW),
        Ok((3, key.public()))
    );
    assert_eq!(
        certify_junction(&chain, Some(7), &b.trust, None, NOW),
        Err(JunctionCertError::WrongJunction {
            expected: 7,
            certified: 3
        })
    );
    let revoked = RevocationList::issue(
        RevocationBody {
            issuer: b.authority.public(),
            number: 1,
            issued_at: NOW,
            serials: vec![9],
            keys: vec![],
        },
        &b.authority,
    )
    .unwrap()
    .verify(&b.trust)
    .unwrap();
    assert_eq!(
        certify_junction(&chain, Some(3), &b.trust, Some(&revoked), NOW),
        Err(JunctionCertError::Revoked { serial: 9 })
    );
    let svc = vec![
        Certificate::issue(
            body(10, &key, service(&["org.acme.x"]), &b.authority),
            &b.authority,
        )
        .unwrap(),
    ];
    assert!(matches!(
        certify_junction(&svc, None, &b.trust, None, NOW),
        Err(JunctionCertError::NotAJunction { .. })
    ));
    assert!(matches!(
        certify_junction(&chain, None, &TrustStore::new(), None, NOW),
        Err(JunctionCertError::Certificate(
            IdentityError::Untrusted { .. }
        ))
    ));
}

#[test]
fn proofs_bind_the_key_the_nonce_and_the_junction() {
    let b = bus();
    let key = SecretKey::generate().unwrap();
    let cert = Certificate::issue(body(7, &key, Role::Client, &b.authority), &b.authority).unwrap();
    let nonce = [9u8; 32];
    let proof = prove_possession(&key, &nonce, 1);
    let verified = || {
        b.trust
            .verify_chain(std::slice::from_ref(&cert), NOW, None)
            .unwrap()
    };
    let proven = verify_possession(verified(), &nonce, 1, &proof).unwrap();
    assert_eq!(proven.key(), key.public());
    assert!(matches!(
        verify_possession(verified(), &[8u8; 32], 1, &proof),
        Err(IdentityError::BadProof)
    ));
    assert!(verify_possession(verified(), &nonce, 2, &proof).is_err());
    let thief = SecretKey::generate().unwrap();
    let stolen = prove_possession(&thief, &nonce, 1);
    assert!(verify_possession(verified(), &nonce, 1, &stolen).is_err());
}

#[test]
fn tokens_delegate_narrowly_and_verify_per_holder() {
    let j1 = SecretKey::generate().unwrap();
    let j2 = SecretKey::generate().unwrap();
    let j3 = SecretKey::generate().unwrap();
    let keys = [(1u16, j1.public()), (2, j2.public()), (3, j3.public())];
    let key_of = |id: u16| keys.iter().find(|(i, _)| *i == id).map(|(_, k)| *k);
    let token = CapabilityToken::issue(
        TokenBody {
            owner: 1,
            port: 7,
            generation: 0,
            export: 3,
            rights: 0b101,
            holder: 2,
            expires_at: NOW + 60,
            serial: 99,
            budget: None,
        },
        &j1,
    );
    token.clone().verify(2, NOW, key_of).unwrap();
    assert!(matches!(
        token.clone().verify(3, NOW, key_of),
        Err(IdentityError::TokenNotForYou { holder: 2, user: 3 })
    ));
    assert!(matches!(
        token.clone().verify(2, NOW + 60, key_of),
        Err(IdentityError::TokenExpired { .. })
    ));
    let passed = token.delegate(&j2, 3, 0b001, NOW + 30).unwrap();
    passed.clone().verify(3, NOW, key_of).unwrap();
    assert!(
        token.delegate(&j2, 3, 0b111, NOW + 30).is_err(),
        "widening refused"
    );
    // A delegation signed by someone other than the holder.
    let forged = token.delegate(&j3, 3, 0b001, NOW + 30).unwrap();
    assert!(forged.verify(3, NOW, key_of).is_err());
    // A junction minting access to a port it does not own.
    let mut minted = CapabilityToken::issue(
        TokenBody {
            owner: 1,
            port: 7,
            generation: 0,
            export: 4,
            rights: 1,
            holder: 3,
            expires_at: NOW + 60,
            serial: 5,
            budget: Some(2),
        },
        &j3,
    );
    assert!(matches!(
        minted.clone().verify(3, NOW, key_of),
        Err(IdentityError::BadTokenSignature)
    ));
    minted.body.owner = 3;
    assert!(
        minted.clone().verify(3, NOW, key_of).is_err(),
        "the body is signed"
    );
    let own = CapabilityToken::issue(minted.body.clone(), &j3);
    assert!(
        own.verify(3, NOW, key_of).is_ok(),
        "it can grant its own ports only"
    );
    let mut tampered = passed.clone();
    tampered.delegations[0].rights = 0b101;
    assert!(tampered.verify(3, NOW, key_of).is_err());
    // Passed on and on: the chain is bounded.
    let mut long = passed;
    let keys_by_id = [(2u16, &j2), (3, &j3)];
    for i in 1..MAX_DELEGATIONS {
        let holder = long.current().0;
        let key = keys_by_id.iter().find(|(id, _)| *id == holder).unwrap().1;
        long = long
            .delegate(key, if holder == 2 { 3 } else { 2 }, 0b001, NOW + 30)
            .unwrap();
        assert_eq!(long.delegations.len(), i + 1);
    }
    let holder = long.current().0;
    long.clone().verify(holder, NOW, key_of).unwrap();
    let key = keys_by_id.iter().find(|(id, _)| *id == holder).unwrap().1;
    assert!(matches!(
        long.delegate(key, 2, 0b001, NOW + 30),
        Err(IdentityError::TooManyDelegations { len }) if len == MAX_DELEGATIONS + 1
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Any single changed byte of a certificate's encoding is caught: it
    /// no longer decodes, or no longer verifies, or (in the signature's
    /// length prefix) no longer parses as the same certificate.
    #[test]
    fn tampered_bytes_never_verify(index in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let b = bus();
        let key = SecretKey::generate().unwrap();
        let cert = Certificate::issue(body(7, &key, service(&["org.acme.echo"]), &b.authority), &b.authority).unwrap();
        let mut bytes = cert.to_bytes();
        let i = index.index(bytes.len());
        bytes[i] ^= flip;
        if let Ok(decoded) = Certificate::from_bytes(&bytes) {
            prop_assert!(decoded == cert || b.trust.verify_chain(&[decoded], NOW, None).is_err());
        }
    }
}
