//! Refuses secret-holding files and directories (state directory, root key files, PIN
//! files) that another local user could change: owned by a user other than root or the
//! plugin's own, or writable by group or others, themselves or in any directory above them.
//! Whoever can replace a key file or PIN file can make the plugin wrap data under their key.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The sticky bit: in a sticky directory (like /tmp) only an entry's owner may rename or
/// delete it, so others' write access cannot swap our files.
const STICKY: u32 = 0o1000;

/// The uid of the running plugin, when this process is an operator command acting for it.
static SERVICE_USER: OnceLock<u32> = OnceLock::new();

/// The plugin's effective uid.
#[allow(unsafe_code)] // geteuid(2), see SAFETY
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Also accepts files owned by `uid`, the user the running plugin serves as (its socket's
/// SO_PEERCRED): `kms-plugin rotate`, run by root, opens keys and PIN files that belong to
/// the service user, who can change them anyway. Set once; `serve` never sets it.
pub fn trust_service_user(uid: u32) {
    let _ = SERVICE_USER.set(uid);
}

/// Root, this process's user, or the running plugin's user (see [`trust_service_user`]).
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == euid() || SERVICE_USER.get() == Some(&uid)
}

/// Checks the file `meta` describes (from the opened descriptor) and every directory above
/// `path`. `what` names the file in messages ("root key file").
pub fn check_file(path: &Path, meta: &Metadata, what: &str) -> Result<(), String> {
    let shown = path.display();
    if !meta.is_file() {
        return Err(format!("{what} {shown} is not a regular file"));
    }
    check_owner(path, meta, what)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "{what} {shown} has mode {mode:04o}: group or others can write it; fix with `chmod 600 {shown}`"
        ));
    }
    check_ancestors(path, what)
}

/// Checks a directory that holds secrets (the state directory) and every directory above it.
pub fn check_dir(dir: &Path, what: &str) -> Result<(), String> {
    let shown = dir.display();
    let meta = std::fs::metadata(dir).map_err(|e| format!("cannot inspect {what} {shown}: {e}"))?;
    if !meta.is_dir() {
        return Err(format!("{what} {shown} is not a directory"));
    }
    check_owner(dir, &meta, what)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "{what} {shown} has mode {mode:04o}: group or others can write it; fix with `chmod 700 {shown}`"
        ));
    }
    check_ancestors(dir, what)
}

fn check_owner(path: &Path, meta: &Metadata, what: &str) -> Result<(), String> {
    let me = euid();
    if trusted_owner(meta.uid()) {
        return Ok(());
    }
    let shown = path.display();
    Err(format!(
        "{what} {shown} is owned by uid {}, which is neither root nor the plugin's user (uid {me}); \
         that user could replace it. Fix with `chown {me} {shown}`, or if uid {} is the \
         plugin's service user, run this command as that user (sudo -u kms-plugin ...)",
        meta.uid(),
        meta.uid()
    ))
}

/// Every directory from `path`'s parent up to `/` (symlinks resolved) must be owned by root
/// or the plugin's user and not writable by group or others, unless sticky.
fn check_ancestors(path: &Path, what: &str) -> Result<(), String> {
    let real = std::fs::canonicalize(path)
        .map_err(|e| format!("cannot resolve {what} {}: {e}", path.display()))?;
    let me = euid();
    let mut dir: Option<PathBuf> = real.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        let meta = std::fs::metadata(&d)
            .map_err(|e| format!("cannot inspect directory {}: {e}", d.display()))?;
        let shown = d.display();
        if !trusted_owner(meta.uid()) {
            return Err(format!(
                "directory {shown}, above {what} {}, is owned by uid {}, which is neither root nor \
                 the plugin's user (uid {me}); that user could swap the file. Fix with \
                 `chown {me} {shown}` or move the file, or if uid {} is the plugin's service \
                 user, run this command as that user (sudo -u kms-plugin ...)",
                path.display(),
                meta.uid(),
                meta.uid()
            ));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 && mode & STICKY == 0 {
            return Err(format!(
                "directory {shown}, above {what} {}, has mode {mode:04o}: group or others could \
                 swap the file. Fix with `chmod go-w {shown}` or move the file",
                path.display()
            ));
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    fn file_error(path: &Path) -> Option<String> {
        let meta = std::fs::metadata(path).expect("meta");
        check_file(path, &meta, "PIN file").err()
    }

    #[test]
    fn private_file_in_private_dir_passes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("pin");
        std::fs::write(&f, "1234").expect("write");
        chmod(&f, 0o600);
        assert_eq!(file_error(&f), None);
        chmod(&f, 0o644); // readable is the caller's business; writable is not
        assert_eq!(file_error(&f), None);
        assert_eq!(check_dir(dir.path(), "state directory"), Ok(()));
    }

    #[test]
    fn writable_files_and_dirs_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("pin");
        std::fs::write(&f, "1234").expect("write");
        for mode in [0o620, 0o602, 0o666] {
            chmod(&f, mode);
            let err = file_error(&f).expect("refused");
            assert!(
                err.contains(&f.display().to_string())
                    && err.contains(&format!("chmod 600 {}", f.display())),
                "{err}"
            );
        }
        chmod(&f, 0o600);
        let sub = dir.path().join("state");
        std::fs::create_dir(&sub).expect("mkdir");
        chmod(&sub, 0o770);
        let err = check_dir(&sub, "state directory").expect_err("refused");
        assert!(err.contains("chmod 700"), "{err}");
        // A writable directory above a file: anyone could swap the file.
        chmod(dir.path(), 0o777);
        let err = file_error(&f).expect("refused");
        assert!(err.contains("chmod go-w"), "{err}");
        // ...unless it is sticky, like /tmp.
        chmod(dir.path(), 0o1777);
        assert_eq!(file_error(&f), None);
    }

    #[test]
    fn foreign_owners_are_refused_with_the_fix() {
        if euid() != 0 {
            // chown to another user needs root; the suite runs as root.
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("pin");
        std::fs::write(&f, "1234").expect("write");
        chmod(&f, 0o600);
        std::os::unix::fs::chown(&f, Some(4321), None).expect("chown");
        let err = file_error(&f).expect("refused");
        assert!(err.contains("uid 4321") && err.contains("chown 0"), "{err}");
        std::os::unix::fs::chown(&f, Some(0), None).expect("chown");
        std::os::unix::fs::chown(dir.path(), Some(4321), None).expect("chown");
        let err = file_error(&f).expect("refused");
        assert!(
            err.contains("directory") && err.contains("uid 4321"),
            "{err}"
        );
        let err = check_dir(dir.path(), "state directory").expect_err("refused");
        assert!(err.contains("uid 4321"), "{err}");
    }
}
