//! A wrong PIN for a new HSM key (real SoftHSM2 token): `rotate` and reload refuse it and the
//! old configuration keeps serving.

use crate::key_id;
use crate::support::backends::file::FileBackend;
use crate::support::backends::pkcs11::{SoftHsmBackend, hsm};
use crate::support::{self, softhsm};

#[tokio::test]
async fn a_wrong_pin_for_the_new_key_leaves_the_old_config_serving() {
    // b on the HSM gives the plugin its SoftHSM environment; the new key gets a token of its own.
    let s = crate::two_keys(&FileBackend, &SoftHsmBackend, "").await;
    let id = key_id(&s.plugin).await;
    let sealed = crate::batch(&s.plugin, 3).await;

    // A new HSM key on its own token, configured with a wrong PIN.
    let token = hsm().new_token();
    let good_pin = hsm().pin_file(s.dir.path(), softhsm::PIN);
    let body = softhsm::key_body(&token, "hsm", &good_pin);
    let setup = support::write_config(s.dir.path(), "unused", "hsm", &[("hsm", body)], "");
    support::keygen(&setup, "hsm", &hsm().env());
    let bad_pin = hsm().pin_file(s.dir.path(), "wrong-pin-0000");
    let socket = s.plugin.socket.clone();
    crate::write_config(
        s.dir.path(),
        &socket,
        "active = \"a\"",
        &[
            ("a", &s.a),
            ("b", &s.b),
            ("hsm", &softhsm::key_body(&token, "hsm", &bad_pin)),
        ],
    );

    // `rotate` checks the key first and changes nothing.
    let config = s.config.to_string_lossy().into_owned();
    let before = std::fs::read_to_string(&s.config).expect("config");
    let out = support::run_cli(
        &[
            "rotate", "--config", &config, "--to", "hsm", "--socket", &socket,
        ],
        &hsm().env(),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PIN") && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(!err.contains("wrong-pin-0000"), "PIN echoed: {err}");
    assert_eq!(std::fs::read_to_string(&s.config).expect("config"), before);

    // A hand-edited config that makes it active is refused by the plugin on reload.
    let text = before.replace("active = \"a\"", "active = \"hsm\"\nretired = [\"a\"]");
    std::fs::write(&s.config, text).expect("write");
    let out = support::run_cli(&["reload", "--socket", &socket], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PIN"));
    assert_eq!(key_id(&s.plugin).await, id);
    assert_eq!(
        support::status(&mut s.plugin.client().await).await.healthz,
        "ok"
    );
    crate::all_decrypt(&s.plugin, &sealed).await;
}
