//! Tests against a real SoftHSM2 token. SoftHSM reads SOFTHSM2_CONF once, at C_Initialize,
//! so the whole test binary shares one token (made on first use) and each test uses its
//! own key labels.

use std::path::{Path, PathBuf};
use std::process::Command;
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
use crate::root::{ErrorKind, RootError, RootKey, WrapContext};
use crate::secret::{KEY_LEN, Key256};

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

/// The SoftHSM2 module, or a panic saying how to get it: tests never skip silently.
pub(crate) fn softhsm_module() -> PathBuf {
    if let Ok(path) = std::env::var("SOFTHSM2_MODULE") {
        return PathBuf::from(path);
    }
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .unwrap_or_else(|| panic!("libsofthsm2.so not found: install softhsm2 (apt-get install softhsm2) or set SOFTHSM2_MODULE"))
}

#[allow(unsafe_code)] // set_var before any PKCS#11 initialisation, see SAFETY
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let module = softhsm_module();
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).expect("token dir");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("write conf");
        // SAFETY: runs once, before this process initialises any PKCS#11 module (SoftHSM
        // reads the variable in C_Initialize); std's own env accesses are serialised.
        unsafe {
            std::env::set_var("SOFTHSM2_CONF", &conf);
            std::env::set_var(PIN_ENV, PIN);
        }
        let out = Command::new("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                TOKEN,
                "--so-pin",
                "1234",
                "--pin",
                PIN,
            ])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run softhsm2-util ({e}): install softhsm2 (apt-get install softhsm2)"
                )
            });
        assert!(
            out.status.success(),
            "softhsm2-util failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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

fn find(session: &Session, label: &str) -> Vec<ObjectHandle> {
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .expect("find")
}

async fn open_err(config: &Config) -> RootError {
    match Pkcs11Root::open(config).await {
        Ok(_) => panic!("opened {config:?}"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn keygen_creates_a_sensitive_non_extractable_key() {
    let _g = shared().await;
    let c = config("keygen");
    assert!(Pkcs11Root::create(&c).await.expect("create"));
    assert!(
        !Pkcs11Root::create(&c).await.expect("second create"),
        "keygen must not make a second key"
    );
    Pkcs11Root::open(&c).await.expect("open");

    let session = raw_session(&c.module);
    let keys = find(&session, "keygen");
    assert_eq!(keys.len(), 1);
    let attrs = session
        .get_attributes(
            keys[0],
            &[
                AttributeType::KeyType,
                AttributeType::ValueLen,
                AttributeType::Token,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
            ],
        )
        .expect("attributes");
    for want in [
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32u64.into()),
        Attribute::Token(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::AlwaysSensitive(true),
        Attribute::NeverExtractable(true),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
    ] {
        assert!(attrs.contains(&want), "missing {want:?} in {attrs:?}");
    }
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
    let (a, b) = (config("wrap-a"), config("wrap-b"));
    Pkcs11Root::create(&a).await.expect("create a");
    Pkcs11Root::create(&b).await.expect("create b");
    let root = Pkcs11Root::open(&a).await.expect("open a");
    let other = Pkcs11Root::open(&b).await.expect("open b");
    assert_ne!(root.key_id(), other.key_id());
    assert!(root.key_id().as_str().starts_with("pkcs11-"));

    let ctx = WrapContext::new(root.key_id());
    let kek = Key256::generate();
    let wrapped = root.wrap(&kek, &ctx).await.expect("wrap");
    assert_eq!(wrapped.len(), WRAPPED_LEN);
    assert_ne!(
        root.wrap(&kek, &ctx).await.expect("wrap again"),
        wrapped,
        "fresh IV per wrap"
    );
    assert_eq!(
        root.unwrap(&wrapped, &ctx)
            .await
            .expect("unwrap")
            .expose_secret(),
        kek.expose_secret()
    );

    let wrong_ctx = WrapContext::new(other.key_id());
    assert!(matches!(
        root.unwrap(&wrapped, &wrong_ctx).await,
        Err(e) if e.kind() == ErrorKind::NotAuthentic
    ));
    assert!(matches!(
        other.unwrap(&wrapped, &ctx).await,
        Err(e) if e.kind() == ErrorKind::NotAuthentic
    ));
    for i in [0, IV_LEN, IV_LEN + KEY_LEN, WRAPPED_LEN - 1] {
        let mut tampered = wrapped.clone();
        tampered[i] ^= 1;
        assert!(
            matches!(
                root.unwrap(&tampered, &ctx).await,
                Err(e) if e.kind() == ErrorKind::NotAuthentic
            ),
            "byte {i}"
        );
    }
    assert!(matches!(
        root.unwrap(&wrapped[1..], &ctx).await,
        Err(e) if e.kind() == ErrorKind::NotAuthentic
    ));
    assert!(matches!(
        root.unwrap(&[], &ctx).await,
        Err(e) if e.kind() == ErrorKind::NotAuthentic
    ));
    // The token still works after failed decryptions (no operation left active).
    assert_eq!(
        root.unwrap(&wrapped, &ctx)
            .await
            .expect("unwrap after failures")
            .expose_secret(),
        kek.expose_secret()
    );
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
            let ctx = WrapContext::new(root.key_id());
            let kek = Key256::generate();
            let wrapped = root.wrap(&kek, &ctx).await.expect("wrap");
            assert_eq!(
                root.unwrap(&wrapped, &ctx)
                    .await
                    .expect("unwrap")
                    .expose_secret(),
                kek.expose_secret()
            );
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
}

#[tokio::test]
async fn key_id_is_stable_and_follows_the_key_material() {
    let _g = shared().await;
    let c = config("recreated");
    Pkcs11Root::create(&c).await.expect("create");
    let first = Pkcs11Root::open(&c).await.expect("open");
    let again = Pkcs11Root::open(&c).await.expect("reopen");
    assert_eq!(first.key_id(), again.key_id());
    let ctx = WrapContext::new(first.key_id());
    let wrapped = first.wrap(&Key256::generate(), &ctx).await.expect("wrap");

    // Delete and re-create under the same label: a different key, so a different key_id.
    let session = raw_session(&c.module);
    for key in find(&session, "recreated") {
        session.destroy_object(key).expect("destroy");
    }
    assert!(Pkcs11Root::create(&c).await.expect("re-create"));
    let recreated = Pkcs11Root::open(&c).await.expect("open re-created");
    assert_ne!(first.key_id(), recreated.key_id());
    assert!(matches!(
        recreated.unwrap(&wrapped, &ctx).await,
        Err(e) if e.kind() == ErrorKind::NotAuthentic
    ));

    // The running instance notices the swap instead of using the new key under the old id.
    match first.wrap(&Key256::generate(), &ctx).await {
        Err(e) if e.kind() == ErrorKind::KeyDisabled => {
            assert!(e.detail().contains("no longer the key"), "{e}");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
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
    let ctx = WrapContext::new(root.key_id());
    let kek = Key256::generate();
    let wrapped = root.wrap(&kek, &ctx).await.expect("wrap");
    assert_eq!(
        root.unwrap(&wrapped, &ctx)
            .await
            .expect("unwrap")
            .expose_secret(),
        kek.expose_secret()
    );
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
    let kek = Key256::generate();
    let wrapped = root.wrap(&kek, &ctx).await.expect("wrap");

    let session = raw_session(&c.module);
    session.logout().expect("logout");
    // The pooled session is no longer logged in; the root logs in afresh and retries.
    assert_eq!(
        root.unwrap(&wrapped, &ctx)
            .await
            .expect("unwrap after logout")
            .expose_secret(),
        kek.expose_secret()
    );
    root.wrap(&kek, &ctx).await.expect("wrap after logout");
}
