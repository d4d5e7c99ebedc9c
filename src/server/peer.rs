//! Who may call: the kernel's peer credentials (SO_PEERCRED) of each connection, checked
//! against an allow-list of user ids.
//!
//! A socket file is guarded by its mode (0600 by default), but a Linux abstract socket has no
//! permissions at all: any process in the network namespace can connect. So abstract sockets
//! default to the plugin's own user and root; `allowed_uids` sets the list explicitly.

use std::collections::BTreeSet;
use std::sync::Arc;

use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

use super::socket::Endpoint;

/// The allow-list; `None` = whoever can open the socket file.
#[derive(Clone, Debug)]
pub struct PeerCheck(Option<Arc<BTreeSet<u32>>>);

impl PeerCheck {
    /// The policy for `endpoint` given the configured `allowed_uids`.
    pub fn new(endpoint: &Endpoint, allowed_uids: Option<&[u32]>) -> Self {
        let uids: Option<BTreeSet<u32>> = match (allowed_uids, endpoint) {
            (Some(list), _) => Some(list.iter().copied().collect()),
            // SAFETY: getuid(2) cannot fail and touches no memory.
            (None, Endpoint::Abstract(_)) => Some([0, unsafe { libc::getuid() }].into()),
            (None, Endpoint::Path(_)) => None,
        };
        Self(uids.map(Arc::new))
    }

    /// The allowed uids, if any list applies.
    pub fn allowed(&self) -> Option<&BTreeSet<u32>> {
        self.0.as_deref()
    }

    /// Tonic interceptor: lets the call through only if the peer's uid is allowed.
    pub fn check(&self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(allowed) = &self.0 else {
            return Ok(request);
        };
        let uid = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .map(|cred| cred.uid());
        match uid {
            Some(uid) if allowed.contains(&uid) => Ok(request),
            Some(uid) => {
                tracing::warn!(uid, "call refused: peer uid not in allowed_uids");
                Err(Status::permission_denied(
                    "caller's uid is not allowed to use this plugin",
                ))
            }
            None => Err(Status::permission_denied(
                "caller's credentials are unknown",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request carrying this process's real credentials, read from a socket pair.
    fn from_self() -> Request<()> {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let _enter = runtime.enter();
        let stream = tokio::net::UnixStream::from_std(a).expect("tokio stream");
        let info = tonic::transport::server::Connected::connect_info(&stream);
        assert_eq!(info.peer_cred.map(|c| c.uid()), Some(my_uid()));
        let mut request = Request::new(());
        request.extensions_mut().insert(info);
        request
    }

    fn my_uid() -> u32 {
        // SAFETY: getuid(2) cannot fail and touches no memory.
        unsafe { libc::getuid() }
    }

    #[test]
    fn path_sockets_rely_on_file_mode_by_default() {
        let check = PeerCheck::new(&Endpoint::Path("/run/k.sock".into()), None);
        assert!(check.allowed().is_none());
        assert!(check.check(Request::new(())).is_ok());
    }

    #[test]
    fn abstract_sockets_default_to_own_uid_and_root() {
        let check = PeerCheck::new(&Endpoint::Abstract("k".into()), None);
        let me = unsafe { libc::getuid() };
        assert!(
            check
                .allowed()
                .is_some_and(|a| a.contains(&0) && a.contains(&me))
        );
        assert!(check.check(from_self()).is_ok());
    }

    #[test]
    fn unlisted_or_unknown_peers_are_refused() {
        let me = my_uid();
        let check = PeerCheck::new(&Endpoint::Path("/k".into()), Some(&[me.wrapping_add(1)]));
        let err = check.check(from_self()).expect_err("refused");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            check.check(Request::new(())).is_err(),
            "no credentials: refused"
        );
        let check = PeerCheck::new(&Endpoint::Path("/k".into()), Some(&[me]));
        assert!(check.check(from_self()).is_ok());
    }
}
