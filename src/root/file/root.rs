//! The file root key: reading and creating the key file, AES-256-GCM wrapping.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use aes_gcm::{Aes256Gcm, KeyInit};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::root::{BoxFuture, ErrorKind, KeyId, RootError, RootKey, WrapContext, gcm};
use crate::secret::{KEY_LEN, Key256};

/// A root key read from a file.
pub struct FileRoot {
    cipher: Aes256Gcm,
    key_id: KeyId,
}

impl FileRoot {
    /// Reads the key file, refusing one that others can read or that is not 32 bytes.
    pub async fn open(path: &Path) -> Result<Self, RootError> {
        let path = path.to_path_buf();
        let key = tokio::task::spawn_blocking(move || read_key_file(&path))
            .await
            .map_err(|e| {
                RootError::new(ErrorKind::Misconfigured, format!("reading key file: {e}"))
            })??;
        Ok(Self::from_key(&key))
    }

    /// Creates a key file with 32 fresh random bytes, mode 0600, if none exists.
    pub async fn create(path: &Path) -> Result<bool, RootError> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || create_key_file(&path))
            .await
            .map_err(|e| {
                RootError::new(ErrorKind::Misconfigured, format!("creating key file: {e}"))
            })?
    }

    pub(crate) fn from_key(key: &Key256) -> Self {
        // key_id = hash of an HMAC check value: stable for the key, reveals nothing of it.
        let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(key.expose_secret()) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts any key length"),
        };
        mac.update(b"kms-plugin file root check value");
        let check = mac.finalize().into_bytes();
        Self {
            cipher: Aes256Gcm::new(key.expose_secret().into()),
            key_id: KeyId::derive("file", &check),
        }
    }
}

impl RootKey for FileRoot {
    fn provider(&self) -> &'static str {
        "file"
    }

    fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    fn wrap<'a>(
        &'a self,
        kek: &'a Key256,
        ctx: &'a WrapContext,
    ) -> BoxFuture<'a, Result<Vec<u8>, RootError>> {
        Box::pin(async move { gcm::seal(Vec::new(), &self.cipher, &ctx.aad(), kek) })
    }

    fn unwrap<'a>(
        &'a self,
        wrapped: &'a [u8],
        ctx: &'a WrapContext,
    ) -> BoxFuture<'a, Result<Key256, RootError>> {
        Box::pin(async move { gcm::open(&self.cipher, &ctx.aad(), wrapped) })
    }
}

fn read_key_file(path: &Path) -> Result<Key256, RootError> {
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| {
        RootError::new(
            ErrorKind::Misconfigured,
            format!("cannot open root key file {shown}: {e}"),
        )
    })?;
    let meta = file.metadata().map_err(|e| {
        RootError::new(
            ErrorKind::Misconfigured,
            format!("cannot stat root key file {shown}: {e}"),
        )
    })?;
    crate::secure_path::check_file(path, &meta, "root key file")
        .map_err(|e| RootError::new(ErrorKind::Misconfigured, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(RootError::new(
            ErrorKind::Misconfigured,
            format!(
                "root key file {shown} has mode {mode:04o}; group and others must have no access (chmod 600)"
            ),
        ));
    }
    if meta.len() != KEY_LEN as u64 {
        return Err(RootError::new(
            ErrorKind::Misconfigured,
            format!(
                "root key file {shown} must hold exactly {KEY_LEN} bytes, it holds {}",
                meta.len()
            ),
        ));
    }
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    std::io::Read::read_exact(&mut &file, bytes.as_mut_slice()).map_err(|e| {
        RootError::new(
            ErrorKind::Misconfigured,
            format!("cannot read root key file {shown}: {e}"),
        )
    })?;
    Key256::from_slice(bytes.as_slice()).ok_or_else(|| {
        RootError::new(
            ErrorKind::Misconfigured,
            format!("root key file {shown} has the wrong length"),
        )
    })
}

fn create_key_file(path: &Path) -> Result<bool, RootError> {
    let shown = path.display();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_private_dir(dir)?;
        // Never write a new key where another user could read the directory's future
        // contents by swapping it.
        crate::secure_path::check_dir(dir, "key directory")
            .map_err(|e| RootError::new(ErrorKind::Misconfigured, e))?;
    }
    // create_new: never overwrite a key that may still protect data.
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => {
            return Err(RootError::new(
                ErrorKind::Misconfigured,
                format!("cannot create root key file {shown}: {e}"),
            ));
        }
    };
    let key = Key256::generate();
    file.write_all(key.expose_secret())
        .and_then(|()| file.sync_all())
        .map_err(|e| {
            RootError::new(
                ErrorKind::Misconfigured,
                format!("cannot write root key file {shown}: {e}"),
            )
        })?;
    if let Some(dir) = path.parent() {
        // Persist the directory entry too, so a crash cannot lose a key already in use.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(true)
}

/// The state directory: created with mode 0700 if missing; refused (never changed) if
/// another user owns it or could write to it or to a directory above it.
pub fn prepare_state_dir(dir: &Path) -> Result<(), RootError> {
    create_private_dir(dir)?;
    crate::secure_path::check_dir(dir, "state directory")
        .map_err(|e| RootError::new(ErrorKind::Misconfigured, e))
}

/// Creates `dir` (and parents) with mode 0700 if missing; an existing one is left as is.
pub fn create_private_dir(dir: &Path) -> Result<(), RootError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            RootError::new(
                ErrorKind::Misconfigured,
                format!("cannot create directory {}: {e}", dir.display()),
            )
        })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    async fn fresh(dir: &tempfile::TempDir, name: &str) -> (PathBuf, FileRoot) {
        let path = dir.path().join(name);
        assert!(FileRoot::create(&path).await.expect("create"));
        let root = FileRoot::open(&path).await.expect("open");
        (path, root)
    }

    #[tokio::test]
    async fn create_is_0600_and_never_overwrites() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, root) = fresh(&dir, "sub/k.key").await;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(dir.path().join("sub"))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        assert!(!FileRoot::create(&path).await.expect("second create"));
        assert_eq!(
            FileRoot::open(&path).await.expect("reopen").key_id(),
            root.key_id()
        );
    }

    #[tokio::test]
    async fn create_refuses_a_directory_others_can_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).expect("mkdir");
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let path = keys.join("k.key");
        let err = FileRoot::create(&path)
            .await
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("key directory") && err.contains("chmod 700"),
            "{err}"
        );
        assert!(!path.exists(), "no key written");
    }

    #[tokio::test]
    async fn wrap_round_trip_and_context_binding() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, root) = fresh(&dir, "a.key").await;
        let (_, other) = fresh(&dir, "b.key").await;
        assert_ne!(root.key_id(), other.key_id());
        let ctx = WrapContext::new(root.key_id());
        let kek = Key256::generate();
        let wrapped = root.wrap(&kek, &ctx).await.expect("wrap");
        assert_eq!(wrapped.len(), gcm::SEALED_LEN);
        let back = root.unwrap(&wrapped, &ctx).await.expect("unwrap");
        assert_eq!(back.expose_secret(), kek.expose_secret());

        let wrong_ctx = WrapContext::new(other.key_id());
        assert!(matches!(
            root.unwrap(&wrapped, &wrong_ctx).await,
            Err(e) if e.kind() == ErrorKind::NotAuthentic
        ));
        assert!(matches!(
            other.unwrap(&wrapped, &ctx).await,
            Err(e) if e.kind() == ErrorKind::NotAuthentic
        ));
        assert!(matches!(
            root.unwrap(&wrapped[1..], &ctx).await,
            Err(e) if e.kind() == ErrorKind::NotAuthentic
        ));
    }

    #[tokio::test]
    async fn refuses_readable_or_wrong_length_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _) = fresh(&dir, "k.key").await;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = FileRoot::open(&path)
            .await
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("0640") && err.contains("chmod 600"), "{err}");

        let short = dir.path().join("short.key");
        std::fs::write(&short, [1u8; 31]).expect("write");
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let err = FileRoot::open(&short)
            .await
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("exactly 32 bytes"), "{err}");

        let missing = FileRoot::open(&dir.path().join("none"))
            .await
            .err()
            .expect("refused");
        assert!(missing.to_string().contains("cannot open"));
    }
}
