//! A Postgres cluster of the test's own (`initdb` + `pg_ctl` in a directory of its own, on a
//! spare port, with its socket in that directory), with the server's default settings: for a
//! test that stops the server (the fault suite stops it in immediate mode, a crash as far as the
//! data is concerned) or needs the defaults the shared server may not have
//! (`max_locks_per_transaction`, say), without touching any other cluster on the machine.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use sea_orm::{ConnectionTrait, Database};
use tokio::process::Command;

/// Postgres refuses to run as root; when the tests run as root they run the cluster as this user.
const SERVICE_USER: &str = "postgres";

/// A Postgres cluster the test created and may stop and start; stopped (immediately) on drop.
pub struct PgCluster {
    bin: PathBuf,
    data: PathBuf,
    dir: PathBuf,
    port: u16,
    /// `Some("postgres")` when the tests run as root.
    run_as: Option<&'static str>,
    running: bool,
    /// The directory [`PgCluster::start_temporary`] made, removed after the server stopped.
    _temporary: Option<tempfile::TempDir>,
}

impl PgCluster {
    /// Creates a cluster in a temporary directory of its own with the binaries
    /// [`find_bin_dir`] finds, and starts it; the directory is removed on drop.
    pub async fn start_temporary() -> anyhow::Result<Self> {
        let dir = workdir("postgres-")?;
        let mut cluster = Self::start(&find_bin_dir()?, &dir.path().join("postgres")).await?;
        cluster._temporary = Some(dir);
        Ok(cluster)
    }

    /// Creates a cluster under `dir` with the binaries in `bin` and starts it. When the tests run
    /// as root, `dir` is handed to the service user, who must be able to reach it.
    pub async fn start(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let run_as = nix::unistd::geteuid().is_root().then_some(SERVICE_USER);
        if let Some(user) = run_as {
            let account = nix::unistd::User::from_name(user)?
                .with_context(|| format!("running as root needs a `{user}` user for Postgres"))?;
            std::os::unix::fs::chown(dir, Some(account.uid.as_raw()), Some(account.gid.as_raw()))
                .with_context(|| format!("handing {} to {user}", dir.display()))?;
        }
        let mut cluster = Self {
            bin: bin.to_owned(),
            data: dir.join("data"),
            dir: dir.to_owned(),
            port: spare_port()?,
            run_as,
            running: false,
            _temporary: None,
        };
        let data = cluster.data.clone();
        cluster
            .run(
                "initdb",
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-U".as_ref(),
                    "postgres".as_ref(),
                    "--auth=trust".as_ref(),
                    "--encoding=UTF8".as_ref(),
                    "--no-locale".as_ref(),
                    // Only the initial files are written without fsync; the server itself
                    // keeps its default, durable settings.
                    "--no-sync".as_ref(),
                ],
            )
            .await?;
        cluster.start_server().await?;
        Ok(cluster)
    }

    /// `postgres://postgres@127.0.0.1:<port>/<database>`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates an empty database.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<()> {
        let db = Database::connect(self.url("postgres"))
            .await
            .context("connecting to the test's Postgres cluster")?;
        db.execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
            .with_context(|| format!("creating database {name}"))?;
        db.close().await?;
        Ok(())
    }

    /// `pg_ctl stop -m immediate`: every server process quits at once without a checkpoint, as
    /// in a crash; the next start replays the write-ahead log.
    pub async fn stop_immediate(&mut self) -> anyhow::Result<()> {
        self.pg_ctl("stop", &["-m", "immediate"]).await?;
        self.running = false;
        Ok(())
    }

    /// Starts the server and waits until it takes connections.
    pub async fn start_server(&mut self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("postgres.log");
        self.pg_ctl(
            "start",
            &["-l", &log.to_string_lossy(), "-t", "120", "-o", &options],
        )
        .await?;
        self.running = true;
        Ok(())
    }

    async fn pg_ctl(&self, action: &str, extra: &[&str]) -> anyhow::Result<()> {
        let data = self.data.to_string_lossy();
        let mut args = vec![action, "-D", &data, "-w"];
        args.extend_from_slice(extra);
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        self.run("pg_ctl", &args).await
    }

    async fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> anyhow::Result<()> {
        let output = self
            .command(program, args)
            .output()
            .await
            .with_context(|| format!("running {program}"))?;
        if !output.status.success() {
            bail!(
                "{program} {} failed ({}): {}{}",
                args.first()
                    .map(|a| a.to_string_lossy())
                    .unwrap_or_default(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    fn command(&self, program: &str, args: &[&std::ffi::OsStr]) -> Command {
        let program = self.bin.join(program);
        let mut command = match self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(program);
                command
            }
            None => Command::new(program),
        };
        command
            .args(args)
            .env_clear()
            .env("PATH", path_env())
            .env("LANG", "C.UTF-8")
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        command
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let program = self.bin.join("pg_ctl");
            let mut command = match self.run_as {
                Some(user) => {
                    let mut command = std::process::Command::new("runuser");
                    command.args(["-u", user, "--"]).arg(program);
                    command
                }
                None => std::process::Command::new(program),
            };
            let _ = command
                .arg("stop")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w"])
                .current_dir(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The directory holding `initdb` and `pg_ctl`: the one on `PATH` if there is one, else the
/// newest under Debian's `/usr/lib/postgresql/<version>/bin`.
pub fn find_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::split_paths(&path_env())
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
    {
        return Ok(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .context("no initdb found on PATH or under /usr/lib/postgresql; pass --pg-bin")
}

/// A port nothing listens on right now, picked by the kernel.
pub fn spare_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

/// `PATH` for the processes the tests start, which otherwise get a cleared environment so no
/// setting of the caller (a `DATABASE_URL`, say) can leak into them.
pub fn path_env() -> std::ffi::OsString {
    std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into())
}

/// A temporary working directory, removed when dropped. Its mode is 0711: when the tests run as
/// root, the Postgres cluster runs as the postgres user, who must pass through it to reach the
/// cluster's own directory.
pub fn workdir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
    Ok(dir)
}
