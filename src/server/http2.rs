//! HTTP/2 on the accepted connections, in place of tonic's `Server`: one hyper connection
//! per socket, each request handed by its path to the KMS or the Admin service, and a
//! graceful stop (GOAWAY on every connection, then wait for them to close).
//!
//! tonic's `Server` costs, per call, what the plugin does not need: an axum router (a hash
//! of the path, a boxed clone of the route), a boxed request body, a timer armed for every
//! `grpc-timeout`, a connection-info value cloned into every request, and, on every
//! wake-up of a connection, a poll of a shutdown watch channel. Here two services are told
//! apart by a path prefix, the body reaches the service as hyper delivers it, and a
//! connection checks one flag per wake-up. The calls that can take time (a root key's
//! round trip) honour `grpc-timeout` in the service itself; the others take microseconds.
//! The HTTP/2 settings are those tonic's `Server` uses, so clients see the same server.

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::{Connected, UdsConnectInfo};
use tower::Service as _;

use super::peer::AdminCheck;
use crate::proto::admin::admin_server::AdminServer;
use crate::proto::v2::key_management_service_server::KeyManagementServiceServer;
use crate::service::Service;

/// How long the peer gets to answer a keep-alive ping (tonic's default; pings are off).
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// The Admin service: its callers are checked against `admin_uids` on each call.
type Admin = InterceptedService<AdminServer<Service>, AdminCheck>;

/// The two services, told apart by the request's path (`/<service>/<method>`).
pub struct Routes {
    kms: KeyManagementServiceServer<Service>,
    kms_prefix: String,
    admin: Admin,
    admin_prefix: String,
}

impl Routes {
    /// Serves `kms` and `admin` under their gRPC service names.
    pub fn new(kms: KeyManagementServiceServer<Service>, admin: Admin) -> Self {
        Self {
            kms_prefix: format!("/{}/", <KeyManagementServiceServer<Service>>::NAME),
            kms,
            admin_prefix: format!("/{}/", Admin::NAME),
            admin,
        }
    }
}

/// A connection's view of [`Routes`]: the shared services plus the peer's credentials,
/// which the Admin service's check reads.
struct ConnRoutes {
    routes: Arc<Routes>,
    info: UdsConnectInfo,
}

// tonic's generated servers are always ready (no `poll_ready` needed); cloning one clones
// an `Arc`.
impl hyper::service::Service<Request<Incoming>> for ConnRoutes {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn call(&self, mut request: Request<Incoming>) -> BoxFuture {
        let path = request.uri().path();
        if path.starts_with(&self.routes.kms_prefix) {
            // KMS callers were vetted when their connection was accepted.
            self.routes.kms.clone().call(request)
        } else if path.starts_with(&self.routes.admin_prefix) {
            request.extensions_mut().insert(self.info.clone());
            let called = self.routes.admin.clone().call(request);
            Box::pin(async move { called.await.map(|response| response.map(Body::new)) })
        } else {
            let status = Status::unimplemented(format!("no such service: {path}"));
            Box::pin(std::future::ready(Ok(status.into_http())))
        }
    }
}

/// The connections being served: a stop raises `stopping` and wakes each of them.
#[derive(Default)]
struct Connections {
    stopping: AtomicBool,
    live: Mutex<Vec<Weak<AtomicWaker>>>,
    closed: Notify,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Weak<AtomicWaker>>> {
        // A list of weak references: nothing a panicking holder could leave half-done.
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new connection, forgetting those that have closed.
    fn add(&self) -> Arc<AtomicWaker> {
        let waker = Arc::new(AtomicWaker::new());
        let mut live = self.lock();
        live.retain(|w| w.strong_count() > 0);
        live.push(Arc::downgrade(&waker));
        waker
    }

    /// Asks every connection to finish: each sends GOAWAY and closes after its last call.
    fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        for waker in self.lock().iter().filter_map(Weak::upgrade) {
            waker.wake();
        }
    }

    /// Waits until every connection has closed.
    async fn all_closed(&self) {
        loop {
            let mut closed = pin!(self.closed.notified());
            closed.as_mut().enable();
            if self.lock().iter().all(|w| w.strong_count() == 0) {
                return;
            }
            closed.await;
        }
    }
}

/// Serves HTTP/2 on every connection `incoming` yields until `shutdown` resolves (or
/// `incoming` ends), then stops accepting, asks every connection to finish and returns once
/// all have closed.
pub async fn serve<C>(
    incoming: impl Stream<Item = C>,
    routes: Routes,
    shutdown: impl Future<Output = ()>,
) where
    C: AsyncRead + AsyncWrite + Connected<ConnectInfo = UdsConnectInfo> + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        // As tonic's `Server` sets them (no stream limit, pings off, hyper's windows, frame
        // and header list sizes), except that hyper's cap on streams reset for local errors
        // (1,024, against reset floods) stays on where tonic turns it off.
        .max_concurrent_streams(None)
        .keep_alive_interval(None)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .adaptive_window(false);
    let routes = Arc::new(routes);
    let connections = Arc::new(Connections::default());
    {
        let mut incoming = pin!(incoming);
        let mut shutdown = pin!(shutdown);
        loop {
            let conn = tokio::select! {
                () = &mut shutdown => break,
                conn = incoming.next() => match conn {
                    Some(conn) => conn,
                    None => break,
                },
            };
            let service = ConnRoutes {
                routes: routes.clone(),
                info: conn.connect_info(),
            };
            let served = builder.serve_connection(TokioIo::new(conn), service);
            let waker = connections.add();
            let connections = connections.clone();
            tokio::spawn(async move {
                let mut served = pin!(served);
                let mut finishing = false;
                let result = poll_fn(|cx| {
                    if !finishing {
                        // Registered before the flag is read, so a stop in between still
                        // wakes this connection.
                        waker.register(cx.waker());
                        if connections.stopping.load(Ordering::Acquire) {
                            served.as_mut().graceful_shutdown();
                            finishing = true;
                        }
                    }
                    served.as_mut().poll(cx)
                })
                .await;
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                drop(waker);
                connections.closed.notify_waiters();
            });
        }
    }
    connections.stop();
    connections.all_closed().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn all_closed_waits_for_every_registered_connection() {
        let connections = Arc::new(Connections::default());
        let a = connections.add();
        let b = connections.add();
        let mut waiting = tokio::spawn({
            let connections = connections.clone();
            async move { connections.all_closed().await }
        });
        drop(a);
        connections.closed.notify_waiters();
        let early = tokio::time::timeout(Duration::from_millis(50), &mut waiting).await;
        assert!(early.is_err(), "returned while a connection was open");
        drop(b);
        connections.closed.notify_waiters();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("all_closed did not return after the last connection closed")
            .expect("task");
    }

    #[tokio::test]
    async fn stop_raises_the_flag_and_wakes_every_live_connection() {
        let connections = Connections::default();
        let (first, first_woken) = counting_waker();
        let (second, second_woken) = counting_waker();
        let (gone, gone_woken) = counting_waker();
        let live = [connections.add(), connections.add()];
        live[0].register(&first);
        live[1].register(&second);
        let closed = connections.add();
        closed.register(&gone);
        drop(closed);
        assert!(!connections.stopping.load(Ordering::Acquire));
        connections.stop();
        assert!(connections.stopping.load(Ordering::Acquire));
        let woken = [&first_woken, &second_woken, &gone_woken].map(|w| w.load(Ordering::SeqCst));
        assert_eq!(woken, [1, 1, 0]);
    }

    /// A waker that counts its wakes.
    fn counting_waker() -> (std::task::Waker, Arc<std::sync::atomic::AtomicUsize>) {
        struct Count(Arc<std::sync::atomic::AtomicUsize>);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        (Arc::new(Count(woken.clone())).into(), woken)
    }
}
