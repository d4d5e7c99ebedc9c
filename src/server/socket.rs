//! The listening socket: path or abstract name, stale-socket recovery, permissions.
//!
//! A socket file left by a crash is removed only if it is a socket and nothing answers on
//! it. A live plugin on the path, or a path that is not a socket, stops start-up and is
//! left untouched.
//!
//! Under systemd socket activation (`kms-plugin.socket`) the listening socket is inherited
//! instead (`LISTEN_FDS`/`LISTEN_PID`): systemd owns its file, so it is checked but never
//! bound, replaced or removed here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{SocketAddr, UnixListener as StdListener, UnixStream as StdStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use tokio::net::UnixListener;

use crate::root::file::create_private_dir;

/// Where the plugin listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A socket file.
    Path(PathBuf),
    /// A Linux abstract socket (`@name`): no file, gone when the process exits.
    Abstract(String),
}

impl Endpoint {
    /// Parses `/path`, `unix:///path`, `@name` or `unix:///@name` (the apiserver's forms).
    pub fn parse(text: &str) -> Self {
        let text = match text.strip_prefix("unix://") {
            Some(rest) => rest
                .strip_prefix('/')
                .filter(|r| r.starts_with('@'))
                .unwrap_or(rest),
            None => text,
        };
        match text.strip_prefix('@') {
            Some(name) => Endpoint::Abstract(name.to_string()),
            None => Endpoint::Path(PathBuf::from(text)),
        }
    }

    /// Connects a blocking client stream (used to detect a live plugin, and by clients).
    pub fn connect_std(&self) -> io::Result<StdStream> {
        match self {
            Endpoint::Path(path) => StdStream::connect(path),
            Endpoint::Abstract(name) => {
                StdStream::connect_addr(&SocketAddr::from_abstract_name(name)?)
            }
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Path(path) => write!(f, "{}", path.display()),
            Endpoint::Abstract(name) => write!(f, "@{name}"),
        }
    }
}

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another process answers on the endpoint.
    #[error("another process is already serving on {0}; stop it first (nothing was changed)")]
    InUse(String),
    /// Something other than a socket sits at the path.
    #[error("{0} exists and is not a socket; refusing to replace it (nothing was deleted)")]
    NotASocket(PathBuf),
    /// The socket's directory could be changed by another user, who could then put their
    /// own socket in front of kube-apiserver and read every DEK seed.
    #[error("refusing to serve: {0}")]
    Insecure(String),
    /// The socket systemd passed (socket activation) is not one the plugin can serve on.
    #[error("socket activation: {0}")]
    Activation(String),
    /// Any other I/O failure.
    #[error("cannot listen on {endpoint}: {source}")]
    Io {
        /// The endpoint.
        endpoint: String,
        /// The cause.
        source: io::Error,
    },
}

/// The listening socket for `endpoint`: the one systemd passed if the plugin was socket
/// activated, else a socket of its own ([`bind`]). Logs which.
pub fn listen(endpoint: &Endpoint, mode: u32) -> Result<UnixListener, SocketError> {
    let activation = |e: io::Error| {
        SocketError::Activation(format!(
            "cannot read LISTEN_FDS/LISTEN_PID: {e}; unset them to bind {endpoint} directly"
        ))
    };
    let mut fds = sd_notify::listen_fds().map_err(activation)?;
    let fd = match (fds.len(), fds.next()) {
        (0, _) | (_, None) => {
            let listener = bind(endpoint, mode)?;
            tracing::info!(socket = %endpoint, "listening on a socket of its own");
            return Ok(listener);
        }
        (1, Some(fd)) => fd,
        (n, _) => {
            return Err(SocketError::Activation(format!(
                "systemd passed {n} sockets, expected one: give kms-plugin.socket a single \
                 ListenStream= (the plugin's socket path)"
            )));
        }
    };
    let fd = take_inherited(fd)?;
    let shown_fd = fd.as_raw_fd();
    let listener = inherited(fd, endpoint, mode)?;
    tracing::info!(
        socket = %endpoint,
        fd = shown_fd,
        "listening on the socket systemd passed (socket activation)"
    );
    Ok(listener)
}

/// Set once the inherited descriptor has an owner, so no second [`OwnedFd`] can claim it.
static INHERITED_TAKEN: AtomicBool = AtomicBool::new(false);

fn take_inherited(fd: RawFd) -> Result<OwnedFd, SocketError> {
    if INHERITED_TAKEN.swap(true, Ordering::SeqCst) {
        return Err(SocketError::Activation(format!(
            "descriptor {fd} from systemd was already taken"
        )));
    }
    // SAFETY: `sd_notify::listen_fds` checked LISTEN_PID is this process and made `fd` (3,
    // SD_LISTEN_FDS_START) close-on-exec, which fails on a descriptor that is not open.
    // Nothing else in the process opens it by number, and the flag above makes this the only
    // owner ever created for it.
    #[allow(unsafe_code)]
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(owned)
}

/// Checks an inherited descriptor as [`bind`] checks its own socket: a listening Unix
/// stream socket, at `endpoint`, in a directory only root or the plugin's user can change,
/// and no more open than `mode`.
fn inherited(fd: OwnedFd, endpoint: &Endpoint, mode: u32) -> Result<UnixListener, SocketError> {
    let refuse = |why: String| {
        SocketError::Activation(format!(
            "{why}; fix ListenStream=/SocketMode= in kms-plugin.socket or the plugin's \
             `socket` setting so they agree"
        ))
    };
    let io_err = |source| SocketError::Io {
        endpoint: endpoint.to_string(),
        source,
    };
    let raw = fd.as_raw_fd();
    if sockopt(raw, libc::SO_DOMAIN).map_err(io_err)? != libc::AF_UNIX {
        return Err(refuse(format!(
            "descriptor {raw} from systemd is not a Unix socket"
        )));
    }
    if sockopt(raw, libc::SO_TYPE).map_err(io_err)? != libc::SOCK_STREAM {
        return Err(refuse(format!(
            "descriptor {raw} from systemd is not a stream socket (use ListenStream=)"
        )));
    }
    if sockopt(raw, libc::SO_ACCEPTCONN).map_err(io_err)? == 0 {
        return Err(refuse(format!(
            "descriptor {raw} from systemd is not listening (Accept=no is needed)"
        )));
    }
    let listener = StdListener::from(fd);
    let addr = listener.local_addr().map_err(io_err)?;
    let matches = match endpoint {
        Endpoint::Path(path) => addr.as_pathname() == Some(path.as_path()),
        Endpoint::Abstract(name) => addr.as_abstract_name() == Some(name.as_bytes()),
    };
    if !matches {
        return Err(refuse(format!(
            "systemd passed a socket on {}, but the plugin is configured for {endpoint}",
            shown_addr(&addr)
        )));
    }
    if let Endpoint::Path(path) = endpoint {
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        crate::secure_path::check_dir(dir, "socket directory").map_err(SocketError::Insecure)?;
        let meta = std::fs::symlink_metadata(path).map_err(io_err)?;
        // Connecting needs write permission: refuse a file more writable than `socket_mode`.
        let extra = meta.mode() & 0o222 & !mode;
        if extra != 0 {
            return Err(refuse(format!(
                "socket file {} has mode {:04o}, wider than socket_mode {mode:04o}",
                path.display(),
                meta.mode() & 0o777
            )));
        }
    }
    listener.set_nonblocking(true).map_err(io_err)?;
    UnixListener::from_std(listener).map_err(io_err)
}

fn shown_addr(addr: &SocketAddr) -> String {
    if let Some(path) = addr.as_pathname() {
        path.display().to_string()
    } else if let Some(name) = addr.as_abstract_name() {
        format!("@{}", String::from_utf8_lossy(name))
    } else {
        "an unnamed socket".to_string()
    }
}

/// An integer `SOL_SOCKET` option of `fd`.
fn sockopt(fd: RawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the sizes given, and `fd` is open
    // for the duration of the call (the caller holds it).
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Binds the endpoint. Socket files get `mode` before they appear at their final path.
pub fn bind(endpoint: &Endpoint, mode: u32) -> Result<UnixListener, SocketError> {
    let io_err = |source| SocketError::Io {
        endpoint: endpoint.to_string(),
        source,
    };
    let listener = match endpoint {
        Endpoint::Abstract(name) => {
            let addr = SocketAddr::from_abstract_name(name).map_err(io_err)?;
            StdListener::bind_addr(&addr).map_err(|e| match e.kind() {
                io::ErrorKind::AddrInUse => SocketError::InUse(endpoint.to_string()),
                _ => io_err(e),
            })?
        }
        Endpoint::Path(path) => bind_path(path, mode)?,
    };
    listener.set_nonblocking(true).map_err(io_err)?;
    UnixListener::from_std(listener).map_err(io_err)
}

/// (device, inode) of each socket file this process bound, by path.
static BOUND: Mutex<Vec<(PathBuf, u64, u64)>> = Mutex::new(Vec::new());

/// Removes the socket file at shutdown, only if it is still the one this process bound:
/// if the file was replaced (a newer instance bound the path after ours was deleted), the
/// newer instance's socket stays.
pub fn remove(endpoint: &Endpoint) {
    let Endpoint::Path(path) = endpoint else {
        return;
    };
    let mut bound = BOUND.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(at) = bound.iter().position(|(p, _, _)| p == path) else {
        return;
    };
    let (_, dev, ino) = bound.swap_remove(at);
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() && m.dev() == dev && m.ino() == ino => {
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => {
            tracing::info!(path = %path.display(), "socket path now belongs to another process; leaving it");
        }
        Err(_) => {}
    }
}

fn bind_path(path: &Path, mode: u32) -> Result<StdListener, SocketError> {
    let io_err = |source| SocketError::Io {
        endpoint: path.display().to_string(),
        source,
    };
    // Nothing is touched in a directory another user could change.
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.exists() {
        create_private_dir(dir).map_err(|e| io_err(io::Error::other(e.to_string())))?;
    }
    crate::secure_path::check_dir(dir, "socket directory").map_err(SocketError::Insecure)?;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SocketError::NotASocket(path.to_path_buf()));
        }
        Ok(_) => match StdStream::connect(path) {
            Ok(_) => return Err(SocketError::InUse(path.display().to_string())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::warn!(path = %path.display(), "removing stale socket left by an earlier run");
                std::fs::remove_file(path).map_err(io_err)?;
            }
            Err(e) => return Err(io_err(e)),
        },
    }
    // Bind under a temporary name, set the mode, then rename: the final path never
    // exists with the umask's (possibly wider) permissions.
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let listener = StdListener::bind(&staging).map_err(io_err)?;
    // The inode survives the rename; remember it so that `remove` deletes only our file.
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::symlink_metadata(&staging))
        .and_then(|meta| {
            std::fs::rename(&staging, path)?;
            Ok(meta)
        });
    let meta = match placed {
        Ok(meta) => meta,
        Err(e) => {
            let _ = std::fs::remove_file(&staging);
            return Err(io_err(e));
        }
    };
    let mut bound = BOUND.lock().unwrap_or_else(PoisonError::into_inner);
    bound.retain(|(p, _, _)| p != path);
    bound.push((path.to_path_buf(), meta.dev(), meta.ino()));
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_a_directory_another_user_could_change() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).expect("mkdir");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let endpoint = Endpoint::Path(shared.join("kms.sock"));
        let err = bind(&endpoint, 0o600).expect_err("world-writable directory");
        assert!(matches!(err, SocketError::Insecure(_)), "{err}");
        assert!(err.to_string().contains("chmod"), "{err}");
        assert!(!shared.join("kms.sock").exists());
        if crate::secure_path::euid() == 0 {
            let foreign = dir.path().join("foreign");
            std::fs::create_dir(&foreign).expect("mkdir");
            std::os::unix::fs::chown(&foreign, Some(12345), None).expect("chown");
            let err = bind(&Endpoint::Path(foreign.join("kms.sock")), 0o600)
                .expect_err("directory owned by another user");
            assert!(err.to_string().contains("uid 12345"), "{err}");
        }
    }

    #[test]
    fn endpoint_forms() {
        assert_eq!(
            Endpoint::parse("/run/k.sock"),
            Endpoint::Path("/run/k.sock".into())
        );
        assert_eq!(
            Endpoint::parse("unix:///run/k.sock"),
            Endpoint::Path("/run/k.sock".into())
        );
        assert_eq!(Endpoint::parse("@kms"), Endpoint::Abstract("kms".into()));
        assert_eq!(
            Endpoint::parse("unix:///@kms"),
            Endpoint::Abstract("kms".into())
        );
        assert_eq!(Endpoint::parse("@kms").to_string(), "@kms");
    }

    #[tokio::test]
    async fn binds_with_mode_and_recovers_stale_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("new/kms.sock");
        let endpoint = Endpoint::Path(path.clone());
        let listener = bind(&endpoint, 0o600).expect("bind");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(path.parent().expect("parent"))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);

        assert!(matches!(bind(&endpoint, 0o600), Err(SocketError::InUse(_))));
        drop(listener); // leaves the file behind, like a crash
        assert!(path.exists());
        let _again = bind(&endpoint, 0o660).expect("stale socket replaced");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
    }

    #[tokio::test]
    async fn remove_leaves_a_socket_another_process_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kms.sock");
        let endpoint = Endpoint::Path(path.clone());
        let _ours = bind(&endpoint, 0o600).expect("bind");
        // Someone deletes our file and a newer instance binds the same path.
        std::fs::remove_file(&path).expect("rm");
        let _newer = StdListener::bind(&path).expect("newer bind");
        remove(&endpoint);
        assert!(path.exists(), "the newer instance's socket was removed");
        assert!(StdStream::connect(&path).is_ok());

        let other = dir.path().join("own.sock");
        let own = Endpoint::Path(other.clone());
        let _listener = bind(&own, 0o600).expect("bind");
        remove(&own);
        assert!(!other.exists(), "our own socket stays after stop");
    }

    #[test]
    fn refuses_non_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kms.sock");
        std::fs::write(&path, b"precious").expect("write");
        assert!(matches!(
            bind(&Endpoint::Path(path.clone()), 0o600),
            Err(SocketError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).expect("still there"), b"precious");
    }

    #[tokio::test]
    async fn takes_an_inherited_listening_socket_at_the_endpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kms.sock");
        let made = StdListener::bind(&path).expect("bind");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let endpoint = Endpoint::Path(path.clone());
        let listener = inherited(OwnedFd::from(made), &endpoint, 0o600).expect("inherited");
        let client = tokio::net::UnixStream::connect(&path);
        let (accepted, connected) = tokio::join!(listener.accept(), client);
        accepted.expect("accept");
        connected.expect("connect");
        // Not ours to remove: systemd owns the file.
        remove(&endpoint);
        assert!(path.exists());
    }

    #[tokio::test]
    async fn refuses_inherited_sockets_it_cannot_serve_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kms.sock");
        let endpoint = Endpoint::Path(path.clone());
        let refused = |fd: OwnedFd, mode: u32| match inherited(fd, &endpoint, mode) {
            Err(SocketError::Activation(why)) => why,
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("accepted"),
        };

        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
        assert!(refused(tcp.into(), 0o600).contains("not a Unix socket"));

        let datagram = std::os::unix::net::UnixDatagram::bind(&path).expect("datagram");
        assert!(refused(datagram.into(), 0o600).contains("not a stream socket"));
        std::fs::remove_file(&path).expect("rm");

        let (stream, _peer) = StdStream::pair().expect("pair");
        assert!(refused(stream.into(), 0o600).contains("not listening"));

        let elsewhere = StdListener::bind(dir.path().join("other.sock")).expect("bind");
        let why = refused(elsewhere.into(), 0o600);
        assert!(
            why.contains("other.sock") && why.contains("kms.sock"),
            "{why}"
        );

        let wide = StdListener::bind(&path).expect("bind");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let why = refused(wide.into(), 0o600);
        assert!(
            why.contains("0666") && why.contains("socket_mode 0600"),
            "{why}"
        );
    }

    #[tokio::test]
    async fn abstract_socket_in_use_is_detected() {
        let name = format!("kms-plugin-test-{}", std::process::id());
        let endpoint = Endpoint::Abstract(name);
        let _listener = bind(&endpoint, 0o600).expect("bind");
        assert!(matches!(bind(&endpoint, 0o600), Err(SocketError::InUse(_))));
        assert!(endpoint.connect_std().is_ok());
    }
}
