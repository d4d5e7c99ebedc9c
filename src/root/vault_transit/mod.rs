//! `provider = "vault-transit"`: a HashiCorp Vault or OpenBao Transit key wraps local KEKs
//! (`{mount}/encrypt/{key}`, `{mount}/decrypt/{key}`), with the wrap context bound as
//! associated data.
//!
//! `config.rs` holds the fields and their validation; `client.rs` HTTP (hyper + rustls with
//! ring) and the one classification of Vault's answers; `auth.rs` the token (file, AppRole,
//! TLS certificate, renewal); `session.rs` one authenticated call with retries;
//! `transit.rs` the three Transit calls; `root.rs` the [`VaultTransitRoot`].

#[cfg(feature = "vault-transit")]
pub mod auth;
#[cfg(feature = "vault-transit")]
pub mod client;
pub mod config;
#[cfg(feature = "vault-transit")]
mod root;
#[cfg(feature = "vault-transit")]
pub mod session;
#[cfg(feature = "vault-transit")]
pub mod transit;

pub use config::Config;
#[cfg(feature = "vault-transit")]
pub use root::VaultTransitRoot;

super::feature_gated_provider!(Config, "vault-transit", "vault-transit", VaultTransitRoot);
