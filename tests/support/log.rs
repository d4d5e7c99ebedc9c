//! What a plugin under test logs: each run writes stdout and stderr to its own file, which
//! the plugin fills from a worker thread, so a test that needs a line waits for it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::Plugin;

impl Plugin {
    pub(super) fn log_path(&self) -> PathBuf {
        self.log.join(format!("plugin-{}.log", self.runs))
    }

    /// Everything the current run wrote to stdout and stderr.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Waits until the current run's output contains `text` (for plugins whose Status this
    /// test may not call).
    pub async fn wait_for_output(&mut self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.output().contains(text) {
            assert!(self.try_wait().is_none(), "exited:\n{}", self.output());
            assert!(
                Instant::now() < deadline,
                "no `{text}` in:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
