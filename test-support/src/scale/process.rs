//! The processes the bench measures: a `worker` consuming live events, and the commands
//! (`worker reconcile`, `rebuild`, `replay`), each with its peak memory read from `/proc`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::proc_stats;
use crate::services::broker_env;

/// How often a command's peak memory is read while it runs: `VmHWM` is gone once the process
/// has exited, so the last reading before the exit is the figure.
const RSS_EVERY: Duration = Duration::from_millis(50);

/// Lines of a failed command's standard error kept for the report.
const STDERR_KEPT: usize = 5;

/// The database and broker a process of the bench works on.
#[derive(Debug, Clone)]
pub struct Target {
    pub db_url: String,
    pub amqp_url: String,
    pub topology: shared::Topology,
    /// Settings given to every process of the bench, after its own (`--env` of the bench).
    pub env: Vec<(String, String)>,
}

impl Target {
    /// The `worker` binary as a command on this target, with logs of warnings and errors only
    /// (as JSON lines) and nothing inherited from the bench's environment but `PATH`.
    fn command(&self, worker_bin: &Path) -> Command {
        let mut command = Command::new(worker_bin);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", &self.db_url)
            .envs(broker_env(&self.amqp_url, &self.topology))
            .env("WORKER_RUN_MIGRATIONS", "false")
            .env("RUST_LOG", "warn")
            .env("LOG_FORMAT", "json")
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }
}

/// A `worker` process consuming the target's queue with its default settings.
pub struct WorkerProcess {
    child: Child,
    pid: u32,
    warnings: Arc<Mutex<Warnings>>,
}

/// The warnings and errors a worker logged, e.g. a batch retried after a lock timeout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Warnings {
    /// Lines logged at `WARN` or `ERROR`.
    pub count: u64,
    /// The message of each, by how often it came.
    pub messages: BTreeMap<String, u64>,
}

impl Warnings {
    fn note(&mut self, line: &str) {
        let Ok(record) = serde_json::from_str::<Value>(line) else {
            return;
        };
        let level = record["level"].as_str().unwrap_or_default();
        if level != "WARN" && level != "ERROR" {
            return;
        }
        self.count += 1;
        let message = format!("{level} {}", record["message"].as_str().unwrap_or_default());
        *self.messages.entry(message).or_default() += 1;
    }

    /// What was logged since `earlier`.
    pub fn since(&self, earlier: &Warnings) -> Warnings {
        let messages = self
            .messages
            .iter()
            .map(|(message, count)| {
                let before = earlier.messages.get(message).copied().unwrap_or_default();
                (message.clone(), count - before)
            })
            .filter(|(_, count)| *count > 0)
            .collect();
        Warnings {
            count: self.count - earlier.count,
            messages,
        }
    }
}

impl std::fmt::Display for Warnings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.count == 0 {
            return write!(f, "none");
        }
        let each: Vec<String> = self
            .messages
            .iter()
            .map(|(message, count)| format!("{count} × {message}"))
            .collect();
        write!(f, "{}", each.join("; "))
    }
}

impl WorkerProcess {
    /// Starts it and waits until `/readyz` answers 200.
    pub async fn start(worker_bin: &Path, target: &Target) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut child = target
            .command(worker_bin)
            .arg("run")
            .env("WORKER_LISTEN", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", worker_bin.display()))?;
        let pid = child.id().context("the worker's pid")?;
        let warnings = Arc::new(Mutex::new(Warnings::default()));
        let stderr = child.stderr.take().context("the worker's stderr")?;
        {
            let warnings = warnings.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(mut warnings) = warnings.lock() {
                        warnings.note(&line);
                    }
                }
            });
        }
        let mut worker = Self {
            child,
            pid,
            warnings,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = worker.child.try_wait()? {
                bail!("the worker exited before it was ready: {status}");
            }
            let (status, _) = crate::http::get(&format!("http://127.0.0.1:{port}/readyz")).await;
            if status == 200 {
                return Ok(worker);
            }
            if Instant::now() > deadline {
                bail!("the worker was not ready within a minute");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its peak RSS so far, in KiB.
    pub fn peak_kib(&self) -> Option<u64> {
        proc_stats::peak_rss_kib(self.pid)
    }

    /// What it has logged at `WARN` or `ERROR` so far.
    pub fn warnings(&self) -> Warnings {
        self.warnings
            .lock()
            .map(|warnings| warnings.clone())
            .unwrap_or_default()
    }

    /// Ends it (it holds nothing the bench still needs: every event it acknowledged was
    /// committed first).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

/// How one command run ended.
#[derive(Debug, Clone)]
pub struct CommandRun {
    pub wall: Duration,
    /// The `--json` summary when it exited 0, else the exit status and the end of its standard
    /// error.
    pub outcome: Result<Value, String>,
    /// Its peak RSS in KiB, as last read before it exited.
    pub peak_kib: Option<u64>,
}

/// Runs `worker <args> --json` on the target with `env` added, reading its peak memory as it
/// runs; gives up after `timeout`.
pub async fn run_command(
    worker_bin: &Path,
    target: &Target,
    args: &[&str],
    env: &[(&str, String)],
    timeout: Duration,
) -> anyhow::Result<CommandRun> {
    let started = Instant::now();
    let mut child = target
        .command(worker_bin)
        .args(args)
        .arg("--json")
        .envs(env.iter().map(|(name, value)| (*name, value.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting worker {}", args.join(" ")))?;
    let pid = child.id().context("the command's pid")?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let stdout = tokio::spawn(async move {
        let mut text = String::new();
        stdout.read_to_string(&mut text).await.map(|_| text)
    });
    let stderr = child.stderr.take().context("stderr")?;
    let stderr = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut kept = std::collections::VecDeque::with_capacity(STDERR_KEPT);
        while let Ok(Some(line)) = lines.next_line().await {
            if kept.len() == STDERR_KEPT {
                kept.pop_front();
            }
            kept.push_back(line);
        }
        Vec::from(kept).join("\n")
    });
    let mut peak_kib = None;
    let mut ticks = tokio::time::interval(RSS_EVERY);
    let deadline = tokio::time::Instant::now() + timeout;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            _ = ticks.tick() => {
                if let Some(kib) = proc_stats::peak_rss_kib(pid) {
                    peak_kib = Some(kib);
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                child.kill().await?;
                bail!("worker {} did not finish within {timeout:?}", args.join(" "));
            }
        }
    };
    let wall = started.elapsed();
    let stdout = stdout.await??;
    let stderr = stderr.await?;
    let outcome = if status.success() {
        serde_json::from_str(stdout.trim())
            .with_context(|| format!("the summary of worker {}: {stdout}", args.join(" ")))
            .map_err(|error| format!("{error:#}"))
    } else {
        Err(format!("{status}: {stderr}"))
    };
    Ok(CommandRun {
        wall,
        outcome,
        peak_kib,
    })
}
