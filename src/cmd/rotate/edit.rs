//! The config-file side of `rotate`: prove the new root, rewrite the file keeping its
//! comments and layout, write it atomically, and say what to do next.
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use toml_edit::{Array, DocumentMut, value};

use crate::config::{Config, Role};
use crate::keyring::roots::{Root, UnwrapRate};
use crate::root;

/// Why a rotation stopped. Nothing was changed unless the message says so.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// The request does not fit the configuration.
    #[error("{0}")]
    Invalid(String),
    /// The new root key does not work.
    #[error("key \"{name}\" does not work, nothing was changed: {source}")]
    Root {
        /// The key.
        name: String,
        /// Why.
        source: root::RootError,
    },
    /// The config file could not be read or written.
    #[error("config file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Checks that `to` works and returns the rewritten config text (not yet written).
pub async fn prepare(
    config_path: &Path,
    to: &str,
) -> Result<(String, String, Config), RotateError> {
    let io = |source| RotateError::Io {
        path: config_path.display().to_string(),
        source,
    };
    let text = std::fs::read_to_string(config_path).map_err(io)?;
    let config = Config::parse(&text).map_err(|e| RotateError::Invalid(e.to_string()))?;
    let Some(key) = config.keys.get(to) else {
        return Err(RotateError::Invalid(format!(
            "{} has no [keys.{to}] entry; add it (and run `kms-plugin keygen`) first",
            config_path.display()
        )));
    };
    if config.kek.active == to {
        return Err(RotateError::Invalid(format!(
            "key \"{to}\" is already the active key"
        )));
    }
    let opened = root::open(to, key)
        .await
        .map_err(|source| RotateError::Root {
            name: to.to_string(),
            source,
        })?;
    let rate = UnwrapRate::from(&config.cache);
    // A checked round trip: the copy NAME wraps must unwrap to the same key.
    Root::new(to, Role::Active, opened, Default::default(), rate)
        .probe()
        .await
        .map_err(|source| RotateError::Root {
            name: to.to_string(),
            source,
        })?;
    let rewritten = rewrite(&text, &config.kek.active, to)?;
    let new_config = Config::parse(&rewritten).map_err(|e| RotateError::Invalid(e.to_string()))?;
    Ok((text, rewritten, new_config))
}

/// `[kek] active = to`, the old active appended to `retired`, `to` removed from the other lists.
pub fn rewrite(text: &str, old_active: &str, to: &str) -> Result<String, RotateError> {
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e| RotateError::Invalid(format!("cannot parse config: {e}")))?;
    let kek = doc
        .get_mut("kek")
        .and_then(|k| k.as_table_like_mut())
        .ok_or_else(|| RotateError::Invalid("config has no [kek] table".into()))?;
    // Replace the value in place, keeping its decor: the whitespace around it and the
    // comment after it on the same line (`active = "main"   # ...`).
    match kek.get_mut("active") {
        Some(active) => {
            let decor = active.as_value().map(|v| v.decor().clone());
            *active = value(to);
            if let (Some(decor), Some(new)) = (decor, active.as_value_mut()) {
                *new.decor_mut() = decor;
            }
        }
        None => {
            kek.insert("active", value(to));
        }
    }
    for list in ["retired", "also_wrap"] {
        if let Some(array) = kek.get_mut(list).and_then(|v| v.as_array_mut()) {
            array.retain(|v| v.as_str() != Some(to));
        }
    }
    match kek.get_mut("retired").and_then(|v| v.as_array_mut()) {
        Some(retired) => {
            if !retired.iter().any(|v| v.as_str() == Some(old_active)) {
                retired.push(old_active);
            }
        }
        None => {
            let mut retired = Array::new();
            retired.push(old_active);
            kek.insert("retired", value(retired));
        }
    }
    Ok(doc.to_string())
}

/// Replaces the file's content atomically, keeping its owner, group and mode.
pub fn write_atomically(path: &Path, text: &str) -> Result<(), RotateError> {
    let io = |source| RotateError::Io {
        path: path.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = dir.join(format!(".{name}.rotate-{}", std::process::id()));
    // A leftover from a crashed run with the same pid; create_new below never follows a
    // planted symlink.
    let _ = std::fs::remove_file(&staging);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staging)?;
        // Owner first: chown clears set-id bits, so the mode goes on afterwards.
        std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid())).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot give the new file the old one's owner {}:{} ({e}); run rotate as \
                     root or as the file's owner",
                    meta.uid(),
                    meta.gid()
                ),
            )
        })?;
        file.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&staging, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    result.map_err(io)
}

/// What the admin does after a rotation.
pub fn next_steps(
    old: &str,
    old_key_id: &str,
    new: &str,
    new_key_id: &str,
    socket: &str,
) -> String {
    format!(
        "Rotated: \"{new}\" (key_id {new_key_id}) is now active; \"{old}\" (key_id {old_key_id}) is retired and still decrypts.

Next steps:
  1. Wait at least 5 minutes: every kube-apiserver must pick up the new key_id (it polls Status
     about once a minute and keeps its current DEK for up to 3 minutes).
  2. Rewrite all Secrets so they are encrypted under the new key:
       kubectl get secrets --all-namespaces -o json | kubectl replace -f -
  3. Check that the retired key is no longer used: `kms-plugin status --socket {socket}` shows, per
     root, the last Decrypt that needed it. After the rewrite, restart each kube-apiserver once
     (it re-reads everything) and confirm \"{old}\" shows no new decrypts.
  4. Only then remove \"{old}\" from `retired` and drop [keys.{old}], and apply with
       kms-plugin reload --socket {socket} --force
     Keep a backup of key \"{old}\" as long as you keep etcd backups taken before step 2.
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# my plugin\nsocket = \"/run/k.sock\"\n\n[kek]\n# the key in use\nactive = \"a\"\nalso_wrap = [\"b\"]\n\n[keys.a]\nprovider = \"file\"\npath = \"/a\"\n\n[keys.b]\nprovider = \"file\"\npath = \"/b\"\n";

    #[test]
    fn rewrite_keeps_comments_and_moves_roles() {
        let out = rewrite(TEXT, "a", "b").expect("rewrite");
        assert!(
            out.contains("# my plugin") && out.contains("# the key in use"),
            "{out}"
        );
        let config = Config::parse(&out).expect("valid");
        assert_eq!(config.kek.active, "b");
        assert_eq!(config.kek.retired, vec!["a".to_string()]);
        assert!(config.kek.also_wrap.is_empty());
    }

    #[test]
    fn rewrite_keeps_the_comment_on_the_active_line() {
        let text = TEXT.replace(
            "active = \"a\"\n",
            "active = \"a\"   # rotated by kms-plugin rotate\n",
        );
        let out = rewrite(&text, "a", "b").expect("rewrite");
        assert!(
            out.contains("active = \"b\"   # rotated by kms-plugin rotate\n"),
            "{out}"
        );
        assert_eq!(Config::parse(&out).expect("valid").kek.active, "b");
    }

    #[test]
    fn rewrite_appends_to_an_existing_retired_list_once() {
        let text = TEXT
            .replace("also_wrap = [\"b\"]", "retired = [\"old\"]")
            .replace(
                "[keys.b]",
                "[keys.old]\nprovider = \"file\"\npath = \"/o\"\n\n[keys.b]",
            );
        let out = rewrite(&text, "a", "b").expect("rewrite");
        let config = Config::parse(&out).expect("valid");
        assert_eq!(config.kek.retired, vec!["old".to_string(), "a".to_string()]);
        let again = rewrite(&out, "b", "a").expect("rewrite back");
        let config = Config::parse(&again).expect("valid");
        assert_eq!(config.kek.active, "a");
        assert_eq!(config.kek.retired, vec!["old".to_string(), "b".to_string()]);
    }

    #[test]
    fn atomic_write_keeps_owner_group_and_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "x").expect("write");
        // Tests run as root: hand the file to another user and group, as /etc files may be.
        let (uid, gid) = if crate::secure_path::euid() == 0 {
            std::os::unix::fs::chown(&path, Some(1234), Some(5678)).expect("chown");
            (1234, 5678)
        } else {
            let m = std::fs::metadata(&path).expect("meta");
            (m.uid(), m.gid())
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        write_atomically(&path, "y").expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "y");
        let meta = std::fs::metadata(&path).expect("meta");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        assert_eq!((meta.uid(), meta.gid()), (uid, gid));
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("ls").count(),
            1,
            "no temp file left"
        );
    }
}
