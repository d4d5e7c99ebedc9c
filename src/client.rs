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
