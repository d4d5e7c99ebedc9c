//! A gRPC client for a running plugin over its Unix socket (used by `kms-plugin status`
//! and by the tests).

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint as TonicEndpoint};

use crate::proto::admin::admin_client::AdminClient;
use crate::proto::v2::key_management_service_client::KeyManagementServiceClient;
use crate::server::socket::Endpoint;

/// Connects to the plugin listening on `socket` (a path or `@name`).
pub async fn connect(socket: &str) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::parse(socket);
    // The URI is required by tonic but unused: the connector below dials the socket.
    TonicEndpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let endpoint = endpoint.clone();
            async move {
                let std = endpoint.connect_std()?;
                std.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::from_std(std)?))
            }
        }))
        .await
}

/// The KMS v2 client on `channel`.
pub fn kms(channel: Channel) -> KeyManagementServiceClient<Channel> {
    KeyManagementServiceClient::new(channel)
}

/// The admin client on `channel`.
pub fn admin(channel: Channel) -> AdminClient<Channel> {
    AdminClient::new(channel)
}

/// Why a plugin on a socket gave no answer, found with one raw connection.
#[derive(Debug)]
pub enum NoAnswer {
    /// Nothing accepts connections there: no socket file, or nobody listening on it.
    NotListening(std::io::Error),
    /// Something accepted the connection and closed it before sending a byte, as the plugin
    /// does to a uid outside `allowed_uids` (or beyond `max_connections`).
    ClosedBeforeAnswering,
    /// It answered, or stayed silent: the error the caller already has is the explanation.
    Other,
}

/// Connects once more to `socket`, sends the HTTP/2 client preface and an empty SETTINGS
/// frame (as every gRPC client starts) and sees whether anything comes back.
pub async fn diagnose(socket: &str) -> NoAnswer {
    let endpoint = Endpoint::parse(socket);
    let probe = tokio::task::spawn_blocking(move || {
        use std::io::{ErrorKind, Read, Write};
        let mut stream = match endpoint.connect_std() {
            Ok(stream) => stream,
            Err(e) => return NoAnswer::NotListening(e),
        };
        if stream
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .is_err()
        {
            return NoAnswer::Other;
        }
        // A write to a connection already closed by the peer may fail; the read says more.
        let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0");
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => NoAnswer::ClosedBeforeAnswering,
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                NoAnswer::ClosedBeforeAnswering
            }
            _ => NoAnswer::Other,
        }
    });
    probe.await.unwrap_or(NoAnswer::Other)
}

/// The uid the plugin listening on the socket file `socket` runs as: the kernel's
/// credentials of the listening socket (SO_PEERCRED), whatever the plugin's allow-list then
/// does. Only for a socket in a directory owned by root or that uid and writable by no one
/// else (as the plugin requires), so that no other user can have put the listener there;
/// never for an abstract socket, which any local user can bind.
pub fn plugin_uid(socket: &str) -> std::io::Result<u32> {
    use std::os::unix::fs::MetadataExt;
    let endpoint = Endpoint::parse(socket);
    let Endpoint::Path(path) = &endpoint else {
        return Err(std::io::Error::other("an abstract socket has no owner"));
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let std = endpoint.connect_std()?;
    std.set_nonblocking(true)?;
    let uid = tokio::net::UnixStream::from_std(std)?.peer_cred()?.uid();
    let meta = std::fs::metadata(dir)?;
    let not_the_plugins = || std::io::Error::other("the socket's directory is not the plugin's");
    if meta.mode() & 0o022 != 0 {
        Err(not_the_plugins())
    } else if uid == 0 {
        // A root listener is also systemd's socket under socket activation (`kms-plugin.socket`),
        // in the service user's RuntimeDirectory: the plugin serves from a directory only if
        // it runs as root or as the directory's owner, so the owner is the plugin's user.
        Ok(meta.uid())
    } else if meta.uid() == uid || meta.uid() == 0 {
        Ok(uid)
    } else {
        Err(not_the_plugins())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_root_listener_in_the_service_users_directory_is_that_users_plugin() {
        use std::os::unix::fs::PermissionsExt;
        if crate::secure_path::euid() != 0 {
            return; // needs chown; CI runs as root
        }
        // Socket activation: systemd (root) listens in the service user's RuntimeDirectory.
        let dir = tempfile::tempdir().expect("tempdir");
        let run = dir.path().join("run");
        std::fs::create_dir(&run).expect("mkdir");
        std::os::unix::fs::chown(&run, Some(12345), None).expect("chown");
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let socket = run.join("kms.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        let socket = socket.to_string_lossy();
        assert_eq!(plugin_uid(&socket).expect("plugin uid"), 12345);

        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o770)).expect("chmod");
        assert!(
            plugin_uid(&socket).is_err(),
            "group-writable directory trusted"
        );
    }
}
