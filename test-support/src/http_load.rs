//! HTTP load on a release `ingest` process, for the benchmarks: the process started on a free
//! port and stopped, and a minimal keep-alive client to send it signed events.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use shared::Topology;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The `svix-*` header values [`HttpClient::post`] sends, as the ingest reads them.
pub use ingest::signature::SignedHeaders;

use crate::signing::SECRET;

/// Starts the `ingest` binary at `binary` on a free loopback port, verifying with [`SECRET`] and
/// publishing to `topology` on the broker at `amqp_url`, with `settings` (such as
/// `INGEST_PUBLISH_CHANNELS`) as further environment variables; nothing else of this process's
/// environment is passed on. Returns the process and its port once `/readyz` answers 200.
pub async fn start_ingest(
    binary: &Path,
    amqp_url: &str,
    topology: &Topology,
    settings: &[(&str, String)],
) -> anyhow::Result<(Child, u16)> {
    let mut command = Command::new(binary);
    command.env_clear();
    for (name, value) in settings {
        command.env(name, value);
    }
    let mut child = command
        .env("CLERK_WEBHOOK_SECRET", SECRET)
        .envs(crate::services::broker_env(amqp_url, topology))
        .env("INGEST_LISTEN", "127.0.0.1:0")
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the ingest")?;
    // The port it bound is in its "ingest listening" log line.
    let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
    let port = loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .context("waiting for the ingest to listen")??
            .ok_or_else(|| anyhow!("the ingest exited before listening"))?;
        if let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line)
            && entry["message"] == "ingest listening"
        {
            break entry["port"].as_u64().context("port")? as u16;
        }
    };
    // Read on, so that a full pipe never blocks the ingest.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut client = HttpClient::connect(port).await?;
        if client.get("/readyz").await? == 200 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the ingest did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((child, port))
}

/// Stops a process a bench started (an ingest, a worker; `pid` is its id) with SIGTERM, as a
/// deployment does, and waits up to 30 s for it to exit; fails unless it exits successfully.
pub async fn stop_process(child: &mut Child, pid: u32) -> anyhow::Result<()> {
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
    if !status.success() {
        bail!("process {pid} exited with {status}");
    }
    Ok(())
}

/// A minimal HTTP/1.1 keep-alive client: the load generator shares two cores with the ingest
/// and the broker, so it should cost as little as possible. One request at a time; it reads
/// only responses with a `content-length` body (as the ingest answers).
pub struct HttpClient {
    stream: TcpStream,
    buffer: Vec<u8>,
    request: Vec<u8>,
}

impl HttpClient {
    /// Connects to `127.0.0.1:port`, with Nagle's algorithm off.
    pub async fn connect(port: u16) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buffer: Vec::with_capacity(4096),
            request: Vec::with_capacity(4096),
        })
    }

    /// POSTs the JSON `body` to `/api/webhooks` with the `svix-*` headers of `signed`; returns
    /// the answer's status.
    pub async fn post(&mut self, body: &str, signed: &SignedHeaders) -> anyhow::Result<u16> {
        self.request.clear();
        self.request.extend_from_slice(
            format!(
                "POST /api/webhooks HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nsvix-id: {}\r\nsvix-timestamp: {}\r\nsvix-signature: {}\r\n\r\n",
                body.len(),
                signed.id,
                signed.timestamp,
                signed.signature
            )
            .as_bytes(),
        );
        self.request.extend_from_slice(body.as_bytes());
        self.stream.write_all(&self.request).await?;
        self.read_response().await
    }

    /// GETs `path`; returns the answer's status.
    pub async fn get(&mut self, path: &str) -> anyhow::Result<u16> {
        let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n");
        self.stream.write_all(request.as_bytes()).await?;
        self.read_response().await
    }

    /// Reads one response with a `content-length` body; returns its status.
    pub async fn read_response(&mut self) -> anyhow::Result<u16> {
        self.buffer.clear();
        let head_end = loop {
            if let Some(end) = find(&self.buffer, b"\r\n\r\n") {
                break end + 4;
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buffer[..head_end])?;
        let status: u16 = head
            .get(9..12)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| anyhow!("bad status line"))?;
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        while self.buffer.len() < head_end + length {
            self.fill().await?;
        }
        Ok(status)
    }

    /// Appends what the connection has to read next to the buffer; fails when it is closed.
    pub async fn fill(&mut self) -> anyhow::Result<()> {
        let mut chunk = [0_u8; 4096];
        let read = self.stream.read(&mut chunk).await?;
        if read == 0 {
            bail!("connection closed");
        }
        self.buffer.extend_from_slice(&chunk[..read]);
        Ok(())
    }
}

/// Where `needle` first occurs in `haystack`, if it does.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}
