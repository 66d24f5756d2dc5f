//! Small helpers the other modules share: spare ports, working directories, deadlines, the
//! child environment.

use std::ffi::OsString;
use std::time::{Duration, Instant};

use anyhow::bail;

/// A port nothing listens on right now, picked by the kernel.
pub fn spare_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

/// `PATH` for the processes the suite starts, which otherwise get a cleared environment so no
/// setting of the caller (a `DATABASE_URL`, say) can leak into them.
pub fn path_env() -> OsString {
    std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into())
}

/// A temporary working directory, removed when dropped. Its mode is 0711: when the suite runs as
/// root, the Postgres cluster runs as the postgres user, who must pass through it to reach the
/// cluster's own directory.
pub fn workdir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
    Ok(dir)
}

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
