//! `[keys.NAME]` with `provider = "file"`: where the key file is.

use std::path::PathBuf;

use serde::Deserialize;

/// `provider = "file"`. Any path parses; the file itself is checked when it is opened
/// (owner, mode 0600, exactly 32 bytes).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Path of the 32-byte raw key file.
    pub path: PathBuf,
}
