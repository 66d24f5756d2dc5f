//! The `ingest` and `worker` binaries, run as black boxes through their contract: configuration
//! by environment, `/readyz` for readiness, `/metrics` for counts, signals to stop them.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::support::{self, Deadline};

/// How long a binary may take to become ready (the worker applies migrations first).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a graceful stop may take; the worker finishes what it has in flight.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// One process of a binary, started and restarted with the same settings.
pub struct Service {
    name: String,
    binary: PathBuf,
    environment: Vec<(String, String)>,
    log: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Service {
    /// Starts `binary` with exactly `environment` (nothing of the caller's leaks in), serving
    /// health and metrics on `port`, and waits until `/readyz` answers 200.
    pub async fn start(
        name: &str,
        binary: &Path,
        environment: Vec<(String, String)>,
        port: u16,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut service = Self {
            name: name.to_owned(),
            binary: binary.to_owned(),
            environment,
            log: log_dir.join(format!("{name}.log")),
            port,
            child: None,
        };
        service.launch().await?;
        Ok(service)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// SIGKILL: no chance to finish, acknowledge or close anything.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            signal(&child, Signal::SIGKILL);
            child
                .wait()
                .await
                .with_context(|| format!("waiting for the killed {}", self.name))?;
        }
        Ok(())
    }

    /// SIGTERM, then waits for the process to exit; a graceful stop must exit 0.
    pub async fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("{} is not running", self.name);
        };
        signal(&child, Signal::SIGTERM);
        match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!("{} exited with {status} after SIGTERM", self.name);
                }
                Ok(status)
            }
            Err(_) => {
                signal(&child, Signal::SIGKILL);
                let _ = child.wait().await;
                bail!(
                    "{} did not stop within {STOP_TIMEOUT:?} of SIGTERM",
                    self.name
                )
            }
        }
    }

    /// Starts the process again with the same settings.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            self.kill().await?;
        }
        self.launch().await
    }

    /// The sum of every sample whose metric name contains `needle`, from `/metrics`; `None`
    /// when the process does not answer or exposes no such metric.
    pub async fn metric_sum(&self, needle: &str) -> Option<f64> {
        let (status, text) = http_get(&self.url("/metrics")).await.ok()?;
        if !status.is_success() {
            return None;
        }
        sum_samples(&text, needle)
    }

    /// The last lines of the process's log, for a failure report.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.binary)
            .env_clear()
            .env("PATH", support::path_env())
            .envs(self.environment.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        self.wait_until_ready().await
    }

    async fn wait_until_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Deadline::after(READY_TIMEOUT);
        let url = self.url("/readyz");
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "{} exited at start ({status}):\n{}",
                    self.name,
                    self.log_tail(20)
                );
            }
            if let Ok((status, _)) = http_get(&url).await
                && status.is_success()
            {
                return Ok(());
            }
            if deadline.passed() {
                bail!(
                    "{} did not become ready at {url} within {READY_TIMEOUT:?}:\n{}",
                    self.name,
                    self.log_tail(10)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn signal(child: &Child, signal: Signal) {
    if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// A plain GET with a short timeout.
pub async fn http_get(url: &str) -> anyhow::Result<(hyper::StatusCode, String)> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: hyper::Uri = url.parse()?;
    let request = async {
        let response = client.get(uri).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), request)
        .await
        .context("no answer in time")?
}

/// Sums the samples of the Prometheus text format whose metric name contains `needle`.
fn sum_samples(text: &str, needle: &str) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        if name.contains(needle)
            && let Ok(value) = value.trim().parse::<f64>()
        {
            found = true;
            sum += value;
        }
    }
    found.then_some(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_summed_over_labels_of_matching_metrics_only() {
        let text = "# HELP worker_duplicates_total Deliveries already processed\n\
                    # TYPE worker_duplicates_total counter\n\
                    worker_duplicates_total{type=\"user.created\"} 3\n\
                    worker_duplicates_total{type=\"user.deleted\"} 2\n\
                    worker_events_total{outcome=\"applied\"} 40\n";
        assert_eq!(sum_samples(text, "duplicate"), Some(5.0));
        assert_eq!(sum_samples(text, "nothing"), None);
    }
}
