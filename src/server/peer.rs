//! Who may call: the kernel's peer credentials (SO_PEERCRED) of each connection.
//!
//! - [`PeerCheck`] is the KMS allow-list (`allowed_uids`), checked once per connection when
//!   it is accepted, before any byte of it is read.
//! - [`AdminCheck`] is the Admin service's own allow-list (`admin_uids`), checked per request
//!   on that service only: Reload and Info are for operators, not for every KMS caller.
//!
//! A socket file is guarded by its mode (0600 by default), but a Linux abstract socket has no
//! permissions at all: any process in the network namespace can connect. So an abstract socket
//! without `allowed_uids` is refused at start-up.

use std::collections::BTreeSet;
use std::sync::Arc;

use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

use super::socket::Endpoint;

/// The KMS allow-list; `None` = whoever can open the socket file.
#[derive(Clone, Debug)]
pub struct PeerCheck(Option<Arc<BTreeSet<u32>>>);

/// Why a connection was turned away at accept time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The peer's uid is not in `allowed_uids`.
    Uid(u32),
    /// The kernel did not tell who the peer is.
    NoCredentials,
}

impl PeerCheck {
    /// The policy for `endpoint` given the configured `allowed_uids`. An abstract socket
    /// without a list is refused: nothing else would stop any local process from calling.
    pub fn new(endpoint: &Endpoint, allowed_uids: Option<&[u32]>) -> Result<Self, String> {
        match (allowed_uids, endpoint) {
            (Some(list), _) => Ok(Self(Some(Arc::new(list.iter().copied().collect())))),
            (None, Endpoint::Path(_)) => Ok(Self(None)),
            (None, Endpoint::Abstract(_)) => Err(format!(
                "socket {endpoint} is an abstract socket, which has no file permissions: any \
                 process in the network namespace could call the plugin. Set allowed_uids in the \
                 config file to the uids that may call (e.g. allowed_uids = [0] for a \
                 kube-apiserver running as root), or use a socket path"
            )),
        }
    }

    /// The allowed uids, if any list applies.
    pub fn allowed(&self) -> Option<&BTreeSet<u32>> {
        self.0.as_deref()
    }

    /// Whether the peer of a just-accepted connection may use it.
    pub fn admit(&self, stream: &tokio::net::UnixStream) -> Result<(), Refused> {
        let Some(allowed) = &self.0 else {
            return Ok(());
        };
        match stream.peer_cred() {
            Ok(cred) if allowed.contains(&cred.uid()) => Ok(()),
            Ok(cred) => Err(Refused::Uid(cred.uid())),
            Err(_) => Err(Refused::NoCredentials),
        }
    }
}

/// The Admin service's allow-list.
#[derive(Clone, Debug)]
pub struct AdminCheck(Arc<BTreeSet<u32>>);

impl AdminCheck {
    /// `admin_uids`, or by default root and the plugin's own user (who run `kms-plugin
    /// status`, `reload` and `rotate`).
    pub fn new(admin_uids: Option<&[u32]>) -> Self {
        let uids = match admin_uids {
            Some(list) => list.iter().copied().collect(),
            None => [0, own_uid()].into(),
        };
        Self(Arc::new(uids))
    }

    /// The allowed uids.
    pub fn allowed(&self) -> &BTreeSet<u32> {
        &self.0
    }

    /// Tonic interceptor for the Admin service: lets the call through only if the peer's uid
    /// is in `admin_uids`.
    pub fn check(&self, request: Request<()>) -> Result<Request<()>, Status> {
        let uid = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .map(|cred| cred.uid());
        match uid {
            Some(uid) if self.0.contains(&uid) => Ok(request),
            Some(uid) => {
                tracing::warn!(uid, "admin call refused: peer uid not in admin_uids");
                Err(Status::permission_denied(format!(
                    "uid {uid} may not use the admin service (Info, Reload); add it to \
                     admin_uids in the plugin's config file, or run the command as root or as \
                     the plugin's user"
                )))
            }
            None => Err(Status::permission_denied(
                "the admin service needs the caller's credentials, which are unknown",
            )),
        }
    }
}

impl tonic::service::Interceptor for AdminCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request)
    }
}

#[allow(unsafe_code)] // getuid(2), see SAFETY
fn own_uid() -> u32 {
    // SAFETY: getuid(2) cannot fail and touches no memory.
    unsafe { libc::getuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ends of a socket pair: the second's peer is this process.
    fn pair() -> (tokio::net::UnixStream, tokio::net::UnixStream) {
        tokio::net::UnixStream::pair().expect("pair")
    }

    /// A request carrying this process's real credentials, read from a socket pair.
    fn request_from_self() -> Request<()> {
        let (a, _b) = pair();
        let info = tonic::transport::server::Connected::connect_info(&a);
        assert_eq!(info.peer_cred.map(|c| c.uid()), Some(own_uid()));
        let mut request = Request::new(());
        request.extensions_mut().insert(info);
        request
    }

    #[tokio::test]
    async fn path_sockets_rely_on_file_mode_by_default() {
        let check = PeerCheck::new(&Endpoint::Path("/run/k.sock".into()), None).expect("ok");
        assert!(check.allowed().is_none());
        assert_eq!(check.admit(&pair().0), Ok(()));
    }

    #[test]
    fn abstract_sockets_need_an_allow_list() {
        let err = PeerCheck::new(&Endpoint::Abstract("k".into()), None).expect_err("refused");
        assert!(err.contains("no file permissions") && err.contains("allowed_uids"));
        assert!(PeerCheck::new(&Endpoint::Abstract("k".into()), Some(&[0])).is_ok());
    }

    #[tokio::test]
    async fn connections_from_unlisted_uids_are_refused_at_accept() {
        let me = own_uid();
        let other = me.wrapping_add(1);
        let path = Endpoint::Path("/k".into());
        let check = PeerCheck::new(&path, Some(&[other])).expect("ok");
        assert_eq!(check.admit(&pair().0), Err(Refused::Uid(me)));
        let check = PeerCheck::new(&path, Some(&[other, me])).expect("ok");
        assert_eq!(check.admit(&pair().0), Ok(()));
    }

    #[tokio::test]
    async fn admin_defaults_to_root_and_own_uid() {
        let check = AdminCheck::new(None);
        assert!(check.allowed().contains(&0) && check.allowed().contains(&own_uid()));
        assert!(check.check(request_from_self()).is_ok());
    }

    #[tokio::test]
    async fn admin_refuses_unlisted_or_unknown_callers() {
        let check = AdminCheck::new(Some(&[own_uid().wrapping_add(1)]));
        let err = check.check(request_from_self()).expect_err("refused");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("admin_uids"), "{}", err.message());
        let err = check.check(Request::new(())).expect_err("no credentials");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }
}
