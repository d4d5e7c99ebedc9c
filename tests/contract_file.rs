//! The provider contract against `provider = "file"`.

mod common;
mod contract;

use std::path::Path;

use contract::Backend;

struct FileBackend;

impl Backend for FileBackend {
    async fn new_key(&self, dir: &Path, name: &str) -> String {
        let path = dir.join(format!("keys/{name}.key"));
        let body = format!("provider = \"file\"\npath = \"{}\"", path.display());
        let config = common::write_config(dir, "unused", name, &[(name, body.clone())], "");
        common::keygen(&config, name, &[]);
        body
    }

    fn env(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

contract_tests!(FileBackend);
