//! `mechanism = "rsa-oaep"` against SoftHSM2. SoftHSM 2.6 does OAEP only with SHA-1, so
//! these keys use `oaep_hash = "sha1"`; the software TPM runs SHA-256 in tests/.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};

use super::super::config::{Mechanism as WrapMechanism, OaepHash};
use super::*;

fn rsa_config(key_label: &str) -> Config {
    valid(Fields {
        mechanism: WrapMechanism::RsaOaep,
        oaep_hash: OaepHash::Sha1,
        rsa_bits: 2048,
        ..(*config(key_label)).clone()
    })
}

/// A pair made directly on the token, with the given private-key attributes.
fn make_pair(label: &str, bits: u64, private_extra: &[Attribute]) {
    let session = raw_session(&fixture().module);
    let public = [
        Attribute::Token(true),
        Attribute::Encrypt(true),
        Attribute::ModulusBits(bits.into()),
        Attribute::PublicExponent(vec![1, 0, 1]),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    let mut private = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Decrypt(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    private.extend_from_slice(private_extra);
    session
        .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
        .expect("generate pair");
}

#[tokio::test]
async fn keygen_creates_a_pair_whose_private_key_stays_in_the_token() {
    let _g = shared().await;
    let c = rsa_config("rsa-keygen");
    keygen_once(&c).await;
    let session = raw_session(&c.module);
    let private = find_class(&session, "rsa-keygen", ObjectClass::PRIVATE_KEY);
    assert_eq!(private.len(), 1);
    assert_eq!(
        find_class(&session, "rsa-keygen", ObjectClass::PUBLIC_KEY).len(),
        1
    );
    let attrs = assert_attributes(
        &session,
        private[0],
        &[
            Attribute::KeyType(KeyType::RSA),
            Attribute::Token(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::NeverExtractable(true),
            Attribute::Decrypt(true),
        ],
        &[AttributeType::Modulus],
    );
    assert!(
        attrs
            .iter()
            .any(|a| matches!(a, Attribute::Modulus(m) if m.len() == 256)),
        "rsa_bits = 2048 gives a 256-byte modulus: {attrs:?}"
    );
}

#[tokio::test]
async fn rsa_wrap_round_trip_and_binding() {
    let _g = shared().await;
    let (a, b) = (rsa_config("rsa-wrap-a"), rsa_config("rsa-wrap-b"));
    check_wrap_and_binding(&a, &b, 1 + 256 + 12 + 32 + 16, |w| {
        // A flipped bit anywhere: version byte, the OAEP part (start, middle, end), nonce, body.
        let mut forged = flipped(w, &[0, 1, 100, 256, 257, 269, w.len() - 1]);
        // A blob announcing SHA-256, which this token refuses: a forged blob, not a broken root.
        let mut other_hash = w.to_vec();
        other_hash[0] = 1;
        forged.push(other_hash);
        forged
    })
    .await;
}

/// What anyone with the public key can do: encrypt a seed of their own and seal a local KEK
/// of their choice under it. Without S (only the private key can compute it) the blob must
/// not unwrap.
#[tokio::test]
async fn a_blob_made_with_only_the_public_key_is_refused() {
    let _g = shared().await;
    let c = rsa_config("rsa-forged");
    Pkcs11Root::create(&c).await.expect("create");
    let root = Pkcs11Root::open(&c).await.expect("open");
    let ctx = WrapContext::new(root.key_id());
    let session = raw_session(&c.module);
    let public = find_class(&session, "rsa-forged", ObjectClass::PUBLIC_KEY)[0];
    let seed = Key256::generate();
    let params = cryptoki::mechanism::rsa::PkcsOaepParams::new(
        cryptoki::mechanism::MechanismType::SHA1,
        cryptoki::mechanism::rsa::PkcsMgfType::MGF1_SHA1,
        cryptoki::mechanism::rsa::PkcsOaepSource::empty(),
    );
    let encrypted = session
        .encrypt(
            &Mechanism::RsaPkcsOaep(params),
            public,
            seed.expose_secret(),
        )
        .expect("encrypt with the public key");
    let mut head = vec![2u8];
    head.extend_from_slice(&encrypted);
    // The forger's best guesses for S: none (all zero), or the seed itself.
    let guesses = [[0u8; 32], *seed.expose_secret()];
    for guess in guesses.iter().map(|g| Key256::from_slice(g).expect("key")) {
        let forged = super::super::rsa_oaep::seal(
            head.clone(),
            &guess,
            seed.expose_secret(),
            &ctx.aad(),
            &Key256::generate(),
        )
        .expect("seal");
        assert_not_authentic(&root, &forged, &ctx, "forged with the public key").await;
    }
}

#[tokio::test]
async fn a_private_key_that_cannot_sign_is_refused() {
    let _g = shared().await;
    make_pair(
        "rsa-nosign",
        2048,
        &[
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(false),
        ],
    );
    let e = open_err(&rsa_config("rsa-nosign")).await;
    assert!(e.to_string().contains("CKA_SIGN"), "{e}");
}

#[tokio::test]
async fn rsa_key_id_is_stable_and_follows_the_key_pair() {
    let _g = shared().await;
    let pair = [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY];
    check_key_id_follows_the_key(&rsa_config("rsa-recreated"), |session| {
        destroy_all(session, "rsa-recreated", &pair);
    })
    .await;
}

#[tokio::test]
async fn sha256_oaep_on_softhsm_is_refused_at_start_with_the_fix() {
    let _g = shared().await;
    let c = rsa_config("rsa-sha256");
    Pkcs11Root::create(&c).await.expect("create");
    let e = open_err(&valid(Fields {
        oaep_hash: OaepHash::Sha256,
        ..(*c).clone()
    }))
    .await;
    assert!(e.to_string().contains("oaep_hash = \"sha1\""), "{e}");
}

#[tokio::test]
async fn small_extractable_or_readable_private_keys_are_refused() {
    let _g = shared().await;
    make_pair(
        "rsa-1024",
        1024,
        &[Attribute::Sensitive(true), Attribute::Extractable(false)],
    );
    let e = open_err(&valid(Fields {
        allow_extractable: true,
        ..(*rsa_config("rsa-1024")).clone()
    }))
    .await;
    assert!(e.to_string().contains("1024-bit"), "{e}");

    make_pair(
        "rsa-extractable",
        2048,
        &[Attribute::Sensitive(true), Attribute::Extractable(true)],
    );
    let e = open_err(&rsa_config("rsa-extractable")).await;
    assert!(e.to_string().contains("extractable"), "{e}");
    make_pair(
        "rsa-readable",
        2048,
        &[Attribute::Sensitive(false), Attribute::Extractable(false)],
    );
    let e = open_err(&rsa_config("rsa-readable")).await;
    assert!(e.to_string().contains("not sensitive"), "{e}");
    Pkcs11Root::open(&valid(Fields {
        allow_extractable: true,
        ..(*rsa_config("rsa-readable")).clone()
    }))
    .await
    .expect("allowed when asked for");
}

#[tokio::test]
async fn a_missing_or_mismatched_pair_is_named() {
    let _g = shared().await;
    let e = open_err(&rsa_config("rsa-absent")).await;
    assert!(
        e.to_string()
            .contains("no RSA private key labelled \"rsa-absent\""),
        "{e}"
    );
    assert!(e.to_string().contains("kms-plugin keygen"), "{e}");

    // Two pairs under one label, then the public half of one and the private half of the
    // other: not one pair.
    let sensitive = [Attribute::Sensitive(true), Attribute::Extractable(false)];
    make_pair("rsa-mixed", 2048, &sensitive);
    make_pair("rsa-mixed", 2048, &sensitive);
    let e = open_err(&rsa_config("rsa-mixed")).await;
    assert!(e.to_string().contains("2 RSA private keys"), "{e}");
    let session = raw_session(&fixture().module);
    let private = find_class(&session, "rsa-mixed", ObjectClass::PRIVATE_KEY);
    let public = find_class(&session, "rsa-mixed", ObjectClass::PUBLIC_KEY);
    let modulus = |h| {
        session
            .get_attributes(h, &[AttributeType::Modulus])
            .expect("modulus")
    };
    // Keep the private key whose modulus differs from the first public key.
    let keep_public = public[0];
    let drop_private = *private
        .iter()
        .find(|p| modulus(**p) == modulus(keep_public))
        .expect("matching private key");
    session.destroy_object(drop_private).expect("destroy");
    session.destroy_object(public[1]).expect("destroy");
    let e = open_err(&rsa_config("rsa-mixed")).await;
    assert!(e.to_string().contains("not one pair"), "{e}");
}
