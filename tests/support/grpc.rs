//! gRPC calls the tests make on a running plugin: KMS v2 Status, Encrypt and Decrypt, and the
//! Admin service's Info.

use kms_plugin::proto::admin::{InfoRequest, InfoResponse, RootInfo};
use kms_plugin::proto::v2::key_management_service_client::KeyManagementServiceClient;
use kms_plugin::proto::v2::{
    DecryptRequest, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use tonic::transport::Channel;

use super::Plugin;

/// Connects a KMS v2 client to `socket`.
pub async fn connect(
    socket: &str,
) -> Result<KeyManagementServiceClient<Channel>, tonic::transport::Error> {
    Ok(kms_plugin::client::kms(
        kms_plugin::client::connect(socket).await?,
    ))
}

/// What `kms-plugin status` shows: the Admin service's Info.
pub async fn info(plugin: &Plugin) -> InfoResponse {
    let channel = kms_plugin::client::connect(&plugin.socket)
        .await
        .expect("connect");
    kms_plugin::client::admin(channel)
        .info(InfoRequest {})
        .await
        .expect("info")
        .into_inner()
}

/// The root named `name` in `info`.
pub fn root_info<'a>(info: &'a InfoResponse, name: &str) -> &'a RootInfo {
    info.roots
        .iter()
        .find(|r| r.name == name)
        .expect("root in Info")
}

/// Encrypts `n` fresh seeds on one connection; returns each response with its seed.
pub async fn batch(plugin: &Plugin, n: usize) -> Vec<(EncryptResponse, Vec<u8>)> {
    let mut client = plugin.client().await;
    let mut out = Vec::new();
    for _ in 0..n {
        let seed = seed();
        out.push((encrypt(&mut client, &seed).await, seed));
    }
    out
}

/// Decrypts every response of `batch` on one connection, expecting its seed back.
pub async fn all_decrypt(plugin: &Plugin, batch: &[(EncryptResponse, Vec<u8>)]) {
    let mut client = plugin.client().await;
    for (sealed, seed) in batch {
        assert_eq!(&decrypt(&mut client, sealed).await, seed);
    }
}

/// The root named `name` as Info shows it now.
pub async fn root(plugin: &Plugin, name: &str) -> RootInfo {
    root_info(&info(plugin).await, name).clone()
}

pub async fn status(client: &mut KeyManagementServiceClient<Channel>) -> StatusResponse {
    client
        .status(StatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

pub async fn encrypt(
    client: &mut KeyManagementServiceClient<Channel>,
    plaintext: &[u8],
) -> EncryptResponse {
    client
        .encrypt(EncryptRequest {
            plaintext: plaintext.to_vec(),
            uid: uid(),
        })
        .await
        .expect("encrypt")
        .into_inner()
}

pub fn decrypt_request(sealed: &EncryptResponse) -> DecryptRequest {
    DecryptRequest {
        ciphertext: sealed.ciphertext.clone(),
        uid: uid(),
        key_id: sealed.key_id.clone(),
        annotations: sealed.annotations.clone(),
    }
}

pub async fn decrypt(
    client: &mut KeyManagementServiceClient<Channel>,
    sealed: &EncryptResponse,
) -> Vec<u8> {
    client
        .decrypt(decrypt_request(sealed))
        .await
        .expect("decrypt")
        .into_inner()
        .plaintext
}

/// A random-looking per-call id, as the apiserver sends.
pub fn uid() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// A random 32-byte DEK seed.
pub fn seed() -> Vec<u8> {
    (0..32).map(|_| rand::random::<u8>()).collect()
}
