//! `provider = "file"` keys, created with `kms-plugin keygen`.

use std::path::{Path, PathBuf};

use super::Backend;
use crate::support;

pub struct FileBackend;

fn key_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("keys/{name}.key"))
}

impl Backend for FileBackend {
    async fn new_key(&self, dir: &Path, name: &str) -> String {
        let body = format!(
            "provider = \"file\"\npath = \"{}\"",
            key_path(dir, name).display()
        );
        let config = support::write_config(dir, "unused", name, &[(name, body.clone())], "");
        support::keygen(&config, name, &[]);
        body
    }

    fn env(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    async fn lose_key(&self, dir: &Path, name: &str) {
        std::fs::remove_file(key_path(dir, name)).expect("delete key file");
    }
}
