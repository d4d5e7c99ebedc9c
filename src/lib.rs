//! kms-plugin: a Kubernetes KMS v2 plugin that does envelope encryption.
//!
//! kube-apiserver asks the plugin to encrypt its DEK seeds. The plugin seals each seed with
//! AES-256-GCM under a *local KEK*, and the local KEK travels, wrapped by one or more *root
//! keys* (a file, an HSM over PKCS#11, AWS KMS), in the response annotations.
//!
//! Layers, outside in (each calls only those below it; README "Architecture" has the map of
//! which concern lives where):
//! - [`server`]: Unix socket, accept loop and peer credentials, HTTP/2 and routing, signals;
//! - [`h2authority`]: rewrites the invalid `:authority` older apiservers send, so h2 accepts it;
//! - [`service`]: the gRPC handlers and the one error-to-status mapping;
//! - [`plugin`]: the keyring in force, reloads;
//! - [`keyring`]: local KEKs, their rotation, the unwrap cache, the roots' roles, health;
//! - [`root`]: root key providers (one folder each) behind one trait, typed errors;
//! - [`envelope`]: the ciphertext format and annotations.
//!
//! Beside them: [`cmd`] (one module per subcommand; `main.rs` only parses and calls it),
//! [`config`] (composition of the config file), [`secret`], [`metrics`], [`systemd`],
//! [`process`], [`secure_path`], [`proto`], [`client`], [`log_writer`], [`audit_line`].

pub mod audit_line;
pub mod client;
pub mod cmd;
pub mod config;
pub mod envelope;
pub mod h2authority;
pub mod keyring;
pub mod log_writer;
pub mod metrics;
pub mod plugin;
pub mod process;
pub mod proto;
pub mod root;
pub mod secret;
pub mod secure_path;
pub mod server;
pub mod service;
pub mod systemd;
pub mod zeroizing_alloc;
