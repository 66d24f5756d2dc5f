//! Small helpers the other modules share: spare ports, working directories, deadlines, the
//! child environment.

use std::time::{Duration, Instant};

use anyhow::bail;

pub use test_support::private_postgres::{path_env, spare_port, workdir};

/// A point in time by which a condition must hold.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(Instant);

impl Deadline {
    pub fn after(timeout: Duration) -> Self {
        Self(Instant::now() + timeout)
    }

    pub fn passed(&self) -> bool {
        Instant::now() >= self.0
    }

    /// An error naming what was awaited once the deadline has passed.
    pub fn check(&self, what: impl FnOnce() -> String) -> anyhow::Result<()> {
        if self.passed() {
            bail!("timed out waiting for {}", what());
        }
        Ok(())
    }
}
