//! The baseline: an empty KMS v2 handler on plain tonic. Status, Encrypt and Decrypt return
//! fixed bytes shaped like the plugin's answers (a 61-byte ciphertext, one ~60-byte
//! annotation, a 32-byte plaintext), so the difference to the plugin is the plugin's own work.

use std::collections::HashMap;
use std::path::Path;

use kms_plugin::proto::v2::key_management_service_server::{
    KeyManagementService, KeyManagementServiceServer,
};
use kms_plugin::proto::v2::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

const KEY_ID: &str = "baseline-00000000000000000000000000000000";

struct Empty {
    annotations: HashMap<String, Vec<u8>>,
}

#[tonic::async_trait]
impl KeyManagementService for Empty {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            version: "v2".into(),
            healthz: "ok".into(),
            key_id: KEY_ID.into(),
        }))
    }

    async fn encrypt(
        &self,
        _: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        Ok(Response::new(EncryptResponse {
            ciphertext: vec![1; 61],
            key_id: KEY_ID.into(),
            annotations: self.annotations.clone(),
        }))
    }

    async fn decrypt(
        &self,
        _: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        Ok(Response::new(DecryptResponse {
            plaintext: vec![7; 32],
        }))
    }
}

/// Serves the empty handler on `socket` until killed (multi-threaded tokio, as the plugin).
pub fn serve(socket: &Path) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket)?;
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let annotations = HashMap::from([(
            "file-00000000000000000000000000000000.kek.kms-plugin.dev".to_string(),
            vec![2; 60],
        )]);
        tonic::transport::Server::builder()
            .add_service(KeyManagementServiceServer::new(Empty { annotations }))
            .serve_with_incoming(incoming)
            .await
            .map_err(std::io::Error::other)
    })
}
