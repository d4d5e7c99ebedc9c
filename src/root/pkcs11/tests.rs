//! Tests against a real SoftHSM2 token. SoftHSM reads SOFTHSM2_CONF once, at C_Initialize,
//! so the whole test binary shares one token (made on first use) and each test uses its
//! own key labels.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tokio::sync::{Mutex, MutexGuard};

use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use secrecy::SecretString;

use super::config::Fields;
use super::root::*;
use super::session::context;
use super::*;
use crate::root::gcm::{IV_LEN, SEALED_LEN as WRAPPED_LEN};
use crate::root::{ErrorKind, RootError, RootKey, WrapContext};
use crate::secret::{KEY_LEN, Key256};

mod rsa;

const TOKEN: &str = "kms";
const PIN: &str = "5678";
const PIN_ENV: &str = "KMS_PLUGIN_UNIT_TEST_PIN";

struct Fixture {
    _dir: tempfile::TempDir,
    module: PathBuf,
    pin_file: PathBuf,
}

/// The tests share one token and one process-wide login, and SoftHSM 2.6 fails concurrent
/// C_GenerateKey calls for token objects (CKR_GENERAL_ERROR), so they run one at a time.
/// (In production keys are made by the one-off `kms-plugin keygen`.)
static EXCLUSIVE: Mutex<()> = Mutex::const_new(());

async fn shared() -> MutexGuard<'static, ()> {
    EXCLUSIVE.lock().await
}

// Finding SoftHSM2 and making a token: one copy, shared with the integration tests.
#[path = "../../../tests/support/softhsm_token.rs"]
mod softhsm;

#[allow(unsafe_code)] // set_var before any PKCS#11 initialisation, see SAFETY
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let module = softhsm::module();
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = softhsm::write_conf(dir.path());
        // SAFETY: runs once, before this process initialises any PKCS#11 module (SoftHSM
        // reads the variable in C_Initialize); std's own env accesses are serialised.
        unsafe {
            std::env::set_var("SOFTHSM2_CONF", &conf);
            std::env::set_var(PIN_ENV, PIN);
        }
        softhsm::init_token(&conf, TOKEN, "1234", PIN);
        let pin_file = dir.path().join("pin");
        std::fs::write(&pin_file, format!("{PIN}\n")).expect("pin file");
        Fixture {
            _dir: dir,
            module,
            pin_file,
        }
    })
}

/// A validated config from `fields`.
fn valid(fields: Fields) -> Config {
    Config::new(fields).expect("valid pkcs11 config")
}

fn config(key_label: &str) -> Config {
    let f = fixture();
    valid(Fields {
        module: f.module.clone(),
        token_label: Some(TOKEN.into()),
        slot: None,
        key_label: key_label.into(),
        key_id_hex: None,
        pin_file: Some(f.pin_file.clone()),
        pin_env: None,
        allow_extractable: false,
        timeout_ms: 2500,
        mechanism: Default::default(),
        oaep_hash: Default::default(),
        rsa_bits: 3072,
    })
}

/// A logged-in session of our own, to inspect and tamper with the token directly.
fn raw_session(module: &Path) -> Session {
    let ctx = context(module).expect("context");
    let slot = ctx
        .get_slots_with_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|i| i.label() == TOKEN)
                .unwrap_or(false)
        })
        .expect("token");
    let session = ctx.open_rw_session(slot).expect("session");
    match session.login(UserType::User, Some(&SecretString::from(PIN))) {
        Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("login: {e}"),
    }
    session
}

/// The `class` objects labelled `label` on the test token.
fn find_class(session: &Session, label: &str, class: ObjectClass) -> Vec<ObjectHandle> {
    session
        .find_objects(&[
            Attribute::Class(class),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .expect("find")
}

/// Deletes every `classes` object labelled `label`.
fn destroy_all(session: &Session, label: &str, classes: &[ObjectClass]) {
    for &class in classes {
        for key in find_class(session, label, class) {
            session.destroy_object(key).expect("destroy");
        }
    }
}

/// The secret keys labelled `label`.
fn find(session: &Session, label: &str) -> Vec<ObjectHandle> {
    find_class(session, label, ObjectClass::SECRET_KEY)
}

async fn open_err(config: &Config) -> RootError {
    match Pkcs11Root::open(config).await {
        Ok(_) => panic!("opened {config:?}"),
        Err(e) => e,
    }
}

/// `keygen` on `c` makes its key once and the key opens.
async fn keygen_once(c: &Config) {
    assert!(Pkcs11Root::create(c).await.expect("create"));
    assert!(
        !Pkcs11Root::create(c).await.expect("second create"),
        "keygen must not make a second key"
    );
    Pkcs11Root::open(c).await.expect("open");
}

/// Asserts that `key` has every attribute in `want`; returns them and the `extra` ones.
fn assert_attributes(
    session: &Session,
    key: ObjectHandle,
    want: &[Attribute],
    extra: &[AttributeType],
) -> Vec<Attribute> {
    let types: Vec<AttributeType> = want
        .iter()
        .map(Attribute::attribute_type)
        .chain(extra.iter().copied())
        .collect();
    let attrs = session.get_attributes(key, &types).expect("attributes");
    for want in want {
        assert!(attrs.contains(want), "missing {want:?} in {attrs:?}");
    }
    attrs
}

/// Asserts that `wrapped` unwraps under `root` and `ctx` to `kek`.
async fn assert_unwraps(root: &Pkcs11Root, wrapped: &[u8], ctx: &WrapContext, kek: &Key256) {
    let got = root.unwrap(wrapped, ctx).await.expect("unwrap");
    assert_eq!(got.expose_secret(), kek.expose_secret());
}

/// Wraps a fresh local KEK under `root` and checks that it unwraps; returns both.
async fn round_trip(root: &Pkcs11Root, ctx: &WrapContext) -> (Key256, Vec<u8>) {
    let kek = Key256::generate();
    let wrapped = root.wrap(&kek, ctx).await.expect("wrap");
    assert_unwraps(root, &wrapped, ctx, &kek).await;
    (kek, wrapped)
}

/// Asserts that `root` refuses `blob` under `ctx` as not authentic; `what` names the blob.
async fn assert_not_authentic(root: &Pkcs11Root, blob: &[u8], ctx: &WrapContext, what: &str) {
    match root.unwrap(blob, ctx).await {
        Err(e) if e.kind() == ErrorKind::NotAuthentic => {}
        Err(e) => panic!("{what}: expected NotAuthentic, got {e}"),
        Ok(_) => panic!("{what}: unwrapped"),
    }
}

/// Copies of `wrapped` with one bit flipped at each of `at`.
fn flipped(wrapped: &[u8], at: &[usize]) -> Vec<Vec<u8>> {
    at.iter()
        .map(|&i| {
            let mut tampered = wrapped.to_vec();
            tampered[i] ^= 1;
            tampered
        })
        .collect()
}

/// The wrap contract for two keys `a` and `b` made by keygen: distinct `pkcs11-` key_ids;
/// blobs of `len` bytes, fresh per wrap, that unwrap only under `a` and its context; the
/// `forgeries` of a blob and its truncations refused as not authentic; and the token still
/// working after those failures (no operation left active).
async fn check_wrap_and_binding(
    a: &Config,
    b: &Config,
    len: usize,
    forgeries: impl Fn(&[u8]) -> Vec<Vec<u8>>,
) {
    Pkcs11Root::create(a).await.expect("create a");
    Pkcs11Root::create(b).await.expect("create b");
    let root = Pkcs11Root::open(a).await.expect("open a");
    let other = Pkcs11Root::open(b).await.expect("open b");
    assert_ne!(root.key_id(), other.key_id());
    assert!(root.key_id().as_str().starts_with("pkcs11-"));

    let ctx = WrapContext::new(root.key_id());
    let (kek, wrapped) = round_trip(&root, &ctx).await;
    assert_eq!(wrapped.len(), len);
    assert_ne!(
        root.wrap(&kek, &ctx).await.expect("wrap again"),
        wrapped,
        "fresh IV per wrap"
    );

    // Moved to another key_id / context, or to another key.
    let wrong_ctx = WrapContext::new(other.key_id());
    assert_not_authentic(&root, &wrapped, &wrong_ctx, "another context").await;
    assert_not_authentic(&other, &wrapped, &ctx, "another key").await;
    for (i, forged) in forgeries(&wrapped).iter().enumerate() {
        assert_not_authentic(&root, forged, &ctx, &format!("forgery {i}")).await;
    }
    for short in [&wrapped[1..], &wrapped[..len - 1], &[][..]] {
        let what = format!("{} bytes", short.len());
        assert_not_authentic(&root, short, &ctx, &what).await;
    }
    assert_unwraps(&root, &wrapped, &ctx, &kek).await;
}

/// The key_id of the key keygen makes for `c` is stable across opens and follows the key
/// material: after `destroy` deletes the key and keygen re-creates it under the same
/// label, the key_id differs, old blobs do not unwrap, and the running root refuses to
/// use the new key under the old key_id.
async fn check_key_id_follows_the_key(c: &Config, destroy: impl FnOnce(&Session)) {
    Pkcs11Root::create(c).await.expect("create");
    let first = Pkcs11Root::open(c).await.expect("open");
    let again = Pkcs11Root::open(c).await.expect("reopen");
    assert_eq!(first.key_id(), again.key_id());
    let ctx = WrapContext::new(first.key_id());
    let wrapped = first.wrap(&Key256::generate(), &ctx).await.expect("wrap");

    destroy(&raw_session(&c.module));
    assert!(Pkcs11Root::create(c).await.expect("re-create"));
    let recreated = Pkcs11Root::open(c).await.expect("open re-created");
    assert_ne!(first.key_id(), recreated.key_id());
    assert_not_authentic(&recreated, &wrapped, &ctx, "under the re-created key").await;

    // The running instance notices the swap instead of using the new key under the old id.
    match first.wrap(&Key256::generate(), &ctx).await {
        Err(e) if e.kind() == ErrorKind::KeyDisabled => {
            assert!(e.detail().contains("no longer the key"), "{e}");
        }
        other => panic!("expected KeyDisabled, got {other:?}"),
    }
}

#[tokio::test]
async fn keygen_creates_a_sensitive_non_extractable_key() {
    let _g = shared().await;
    let c = config("keygen");
    keygen_once(&c).await;

    let session = raw_session(&c.module);
    let keys = find(&session, "keygen");
    assert_eq!(keys.len(), 1);
    assert_attributes(
        &session,
        keys[0],
        &[
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32u64.into()),
            Attribute::Token(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::AlwaysSensitive(true),
            Attribute::NeverExtractable(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
        ],
        &[],
    );
    // The key value cannot be read out: the token withholds CKA_VALUE.
    let value = session
        .get_attributes(keys[0], &[AttributeType::Value])
        .expect("get value");
    assert!(
        !value.iter().any(|a| matches!(a, Attribute::Value(_))),
        "CKA_VALUE readable: {value:?}"
    );
    // Nor wrapped out under another key.
    let wrapper = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::ValueLen(32u64.into()),
                Attribute::Wrap(true),
                Attribute::Token(false),
            ],
        )
        .expect("session wrapping key");
    assert!(
        session
            .wrap_key(&Mechanism::AesKeyWrap, wrapper, keys[0])
            .is_err()
    );
}

#[tokio::test]
async fn wrap_round_trip_and_binding() {
    let _g = shared().await;
    check_wrap_and_binding(&config("wrap-a"), &config("wrap-b"), WRAPPED_LEN, |w| {
        flipped(w, &[0, IV_LEN, IV_LEN + KEY_LEN, WRAPPED_LEN - 1])
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_share_the_session_pool() {
    let _g = shared().await;
    let c = config("concurrent");
    Pkcs11Root::create(&c).await.expect("create");
    let root = std::sync::Arc::new(Pkcs11Root::open(&c).await.expect("open"));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let root = root.clone();
        tasks.push(tokio::spawn(async move {
            round_trip(&root, &WrapContext::new(root.key_id())).await;
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
}

#[tokio::test]
async fn key_id_is_stable_and_follows_the_key_material() {
    let _g = shared().await;
    check_key_id_follows_the_key(&config("recreated"), |session| {
        destroy_all(session, "recreated", &[ObjectClass::SECRET_KEY]);
    })
    .await;
}

#[tokio::test]
async fn the_cbc_check_value_is_the_ecb_check_value() {
    // Tokens that refuse ECB and choose their own GCM IV get their key_id from AES-CBC with
    // a zero IV; over one block that must be the ECB value, so the key_id is the same as on
    // a token that allows ECB.
    let _g = shared().await;
    let c = config("kcv");
    Pkcs11Root::create(&c).await.expect("create");
    let session = raw_session(&c.module);
    let key = find(&session, "kcv")[0];
    let ecb = session
        .encrypt(&Mechanism::AesEcb, key, CHECK_BLOCK)
        .expect("ecb");
    assert_eq!(ecb.len(), 16);
    assert_eq!(cbc_check_value(&session, key).expect("cbc"), ecb);
    assert_eq!(check_value(&session, key).expect("check value"), ecb);
    // SoftHSM honours the caller's GCM IV, so the GCM step keeps its old value.
    let gcm = gcm_check_value(&session, key)
        .expect("gcm")
        .expect("the IV was kept");
    assert_eq!(gcm[0], b'g');
    assert_eq!(gcm_check_value(&session, key).expect("gcm"), Some(gcm));
}

#[tokio::test]
async fn a_wrong_pin_is_named_as_such() {
    // Login state is per process and token: while any session is logged in, C_Login does
    // not check the PIN at all (CKR_USER_ALREADY_LOGGED_IN). Run alone, with no sessions.
    let _g = EXCLUSIVE.lock().await;
    let base = config("errors");
    Pkcs11Root::create(&base).await.expect("create");
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong = dir.path().join("wrong-pin");
    std::fs::write(&wrong, "0000\n").expect("write");
    let e = open_err(&valid(Fields {
        pin_file: Some(wrong),
        ..Fields::clone(&base)
    }))
    .await;
    assert_eq!(e.kind(), ErrorKind::CredentialsRejected);
    assert!(
        e.to_string().contains("PIN rejected by token \"kms\""),
        "{e}"
    );
    assert!(!e.to_string().contains("0000"));
}

#[tokio::test]
async fn clear_errors_for_token_key_and_module() {
    let _g = shared().await;
    let base = config("errors");
    Pkcs11Root::create(&base).await.expect("create");

    let e = open_err(&config("nope")).await;
    assert!(
        e.to_string()
            .contains("no AES key labelled \"nope\" on token \"kms\""),
        "{e}"
    );

    let e = open_err(&valid(Fields {
        token_label: Some("absent".into()),
        ..Fields::clone(&base)
    }))
    .await;
    assert!(
        e.to_string().contains("no token labelled \"absent\""),
        "{e}"
    );
    assert!(
        e.to_string().contains("\"kms\""),
        "lists the tokens present: {e}"
    );

    let e = open_err(&valid(Fields {
        module: "/nonexistent/libpkcs11.so".into(),
        ..Fields::clone(&base)
    }))
    .await;
    assert!(
        e.to_string()
            .contains("PKCS#11 module /nonexistent/libpkcs11.so"),
        "{e}"
    );

    let e = open_err(&valid(Fields {
        pin_file: None,
        pin_env: Some("KMS_PLUGIN_UNSET_PIN".into()),
        ..Fields::clone(&base)
    }))
    .await;
    assert!(e.to_string().contains("KMS_PLUGIN_UNSET_PIN"), "{e}");

    let e = open_err(&valid(Fields {
        key_id_hex: Some("0102".into()),
        ..Fields::clone(&base)
    }))
    .await;
    assert!(e.to_string().contains("with CKA_ID 0102"), "{e}");

    // pin_env works, and so does a slot number.
    let by_env = valid(Fields {
        pin_file: None,
        pin_env: Some(PIN_ENV.into()),
        ..Fields::clone(&base)
    });
    let root = Pkcs11Root::open(&by_env).await.expect("pin_env");
    let session = raw_session(&base.module);
    let slot = session.get_session_info().expect("info").slot_id().id();
    let by_slot = valid(Fields {
        token_label: None,
        slot: Some(slot),
        ..Fields::clone(&base)
    });
    assert_eq!(
        Pkcs11Root::open(&by_slot).await.expect("slot").key_id(),
        root.key_id()
    );
}

#[tokio::test]
async fn key_id_hex_selects_among_keys_sharing_a_label() {
    let _g = shared().await;
    let one = valid(Fields {
        key_id_hex: Some("01".into()),
        ..Fields::clone(&config("shared-label"))
    });
    let two = valid(Fields {
        key_id_hex: Some("02".into()),
        ..Fields::clone(&config("shared-label"))
    });
    assert!(Pkcs11Root::create(&one).await.expect("create 1"));
    assert!(Pkcs11Root::create(&two).await.expect("create 2"));
    let (r1, r2) = (
        Pkcs11Root::open(&one).await.expect("1"),
        Pkcs11Root::open(&two).await.expect("2"),
    );
    assert_ne!(r1.key_id(), r2.key_id());
    let e = open_err(&config("shared-label")).await;
    assert!(
        e.to_string()
            .contains("2 AES keys labelled \"shared-label\""),
        "{e}"
    );
}

#[tokio::test]
async fn extractable_or_readable_keys_are_refused() {
    let _g = shared().await;
    let session = raw_session(&fixture().module);
    for (label, sensitive, extractable) in [("extractable", true, true), ("readable", false, false)]
    {
        session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32u64.into()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(sensitive),
                    Attribute::Extractable(extractable),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Label(label.as_bytes().to_vec()),
                ],
            )
            .expect("generate");
    }
    let e = open_err(&config("extractable")).await;
    assert!(e.to_string().contains("is extractable"), "{e}");
    assert!(e.to_string().contains("allow_extractable"), "{e}");
    let e = open_err(&config("readable")).await;
    assert!(e.to_string().contains("is not sensitive"), "{e}");

    let allowed = valid(Fields {
        allow_extractable: true,
        ..Fields::clone(&config("extractable"))
    });
    let root = Pkcs11Root::open(&allowed).await.expect("allowed");
    round_trip(&root, &WrapContext::new(root.key_id())).await;
}

#[tokio::test]
async fn a_128_bit_key_is_refused() {
    let _g = shared().await;
    let session = raw_session(&fixture().module);
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::ValueLen(16u64.into()),
                Attribute::Token(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Label(b"aes128".to_vec()),
            ],
        )
        .expect("generate");
    let e = open_err(&config("aes128")).await;
    assert!(e.to_string().contains("not an AES-256 key"), "{e}");
}

#[tokio::test]
async fn recovers_after_the_login_is_lost() {
    // Logging out affects every session of the process: run alone.
    let _g = EXCLUSIVE.lock().await;
    let c = config("recover");
    Pkcs11Root::create(&c).await.expect("create");
    let root = Pkcs11Root::open(&c).await.expect("open");
    let ctx = WrapContext::new(root.key_id());
    let (kek, wrapped) = round_trip(&root, &ctx).await;

    let session = raw_session(&c.module);
    session.logout().expect("logout");
    // The pooled session is no longer logged in; the root logs in afresh and retries.
    assert_unwraps(&root, &wrapped, &ctx, &kek).await;
    root.wrap(&kek, &ctx).await.expect("wrap after logout");
}
