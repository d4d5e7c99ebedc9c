//! deploy/ agrees with the plugin: deploy/kms-plugin.toml is loaded by the plugin's own
//! config parser, and tests/deploy/check_manifests.py (PyYAML) checks that the static pod
//! and the EncryptionConfiguration use its socket, probe its metrics listener and mount its
//! files, with the security settings the README promises.

use std::path::Path;
use std::process::Command;

use kms_plugin::config::{self, Config, KeyConfig};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The numeric uid of the Containerfile's last USER.
fn image_uid() -> u32 {
    let text = std::fs::read_to_string(repo().join("Containerfile")).expect("Containerfile");
    let user = text
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("USER "))
        .expect("Containerfile has a USER");
    user.split(':')
        .next()
        .unwrap_or_default()
        .trim()
        .parse()
        .expect("numeric USER")
}

#[test]
fn manifests_agree_with_the_plugin_config() {
    let path = repo().join("deploy/kms-plugin.toml");
    let config = Config::load(&path).expect("deploy/kms-plugin.toml is a valid config");
    let key_files: Vec<String> = config
        .keys
        .values()
        .filter_map(|k| match k {
            KeyConfig::File(f) => Some(f.path.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    let facts = format!(
        r#"{{"socket": "{}", "metrics_listen": {}, "key_files": [{}], "config_file": "kms-plugin.toml", "image_uid": {}}}"#,
        config.socket.as_deref().unwrap_or(config::DEFAULT_SOCKET),
        config
            .metrics_listen
            .map(|a| format!("\"{a}\""))
            .unwrap_or_else(|| "null".into()),
        key_files
            .iter()
            .map(|k| format!("\"{k}\""))
            .collect::<Vec<_>>()
            .join(", "),
        image_uid(),
    );
    let out = Command::new("python3")
        .arg("tests/deploy/check_manifests.py")
        .arg(&facts)
        .current_dir(repo())
        .output()
        .expect("python3 (apt-get install python3)");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("1 pod, 1 encryption config: 0 problems"),
        "{report}"
    );
}

#[test]
fn the_plugin_defaults_match_the_deployed_paths() {
    // The systemd units and the manifests name the default socket; a changed default must
    // change them too.
    let pod = std::fs::read_to_string(repo().join("deploy/static-pod.yaml")).expect("pod");
    let unit =
        std::fs::read_to_string(repo().join("systemd/kms-plugin.socket")).expect("socket unit");
    let socket_dir = Path::new(config::DEFAULT_SOCKET)
        .parent()
        .expect("dir")
        .to_string_lossy()
        .into_owned();
    assert!(
        unit.contains(&format!("ListenStream={}", config::DEFAULT_SOCKET)),
        "{unit}"
    );
    assert!(pod.contains(&format!("path: {socket_dir}\n")), "{pod}");
    assert!(
        pod.contains(&format!("path: {}\n", config::DEFAULT_STATE_DIR)),
        "{pod}"
    );
}
