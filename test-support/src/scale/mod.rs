//! The scale bench: `worker reconcile`, `worker rebuild` and `worker replay` at the size of a
//! real Clerk instance, each run as its own process beside a `worker` process that applies a
//! steady stream of live events, with the wall time, the peak memory of every process and the
//! live events' latency, next to an idle baseline measured just before in the same run.
//!
//! The worker's example `worker-scale-bench` prints the figures (see BENCHMARKS.md); the
//! worker's integration test `scale` runs the same code at a short size and checks only that
//! every step did what it should.
//!
//! - [`reconcile`]: a backfill into empty tables and a run with nothing changed, against the
//!   Backend API stand-in serving generated users ([`crate::clerk_api::ClerkApi::generate_users`]).
//! - [`history`]: a history of generated rows filled by SQL, then `rebuild` and `replay` over it.

pub mod history;
pub mod live;
pub mod process;
pub mod reconcile;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

pub use live::Latency;

/// What every scenario shares.
#[derive(Debug, Clone)]
pub struct Setup {
    /// A Postgres URL the bench creates its databases from (any database of the server).
    pub admin_url: String,
    /// The broker of the live events.
    pub amqp_url: String,
    /// The `worker` binary: the worker process and the commands.
    pub worker_bin: PathBuf,
    /// Live events published per second while a scenario runs.
    pub live_rate: u32,
    /// How long the idle baseline before each command lasts.
    pub idle: Duration,
    /// The longest a command may run before the bench gives up on it.
    pub command_timeout: Duration,
    /// Settings given to the worker and to every command, e.g. `WORKER_LOCK_TIMEOUT`.
    pub env: Vec<(String, String)>,
}

/// One command measured beside the live events.
#[derive(Debug, Clone)]
pub struct Phase {
    /// What ran, e.g. `reconcile backfill`.
    pub name: String,
    /// The command's wall time.
    pub wall: Duration,
    /// Its summary (`--json`) when it succeeded, or why it failed.
    pub outcome: Result<Value, String>,
    /// The command process's peak RSS (`VmHWM`), in KiB.
    pub command_peak_kib: Option<u64>,
    /// The worker process's peak RSS so far, in KiB, read when the command ended.
    pub worker_peak_kib: Option<u64>,
    /// The live events of the idle baseline just before.
    pub idle: Latency,
    /// The live events published while the command ran.
    pub during: Latency,
    /// The one-minute load average when the command ended.
    pub load: String,
    /// What the worker logged at `WARN` or `ERROR` while the command ran.
    pub worker_warnings: process::Warnings,
}

impl Phase {
    /// p99 while the command ran over p99 of the idle baseline.
    pub fn p99_ratio(&self) -> Option<f64> {
        let (during, idle) = (self.during.p99?, self.idle.p99?);
        (idle > Duration::ZERO).then(|| during.as_secs_f64() / idle.as_secs_f64())
    }

    /// Whether the command exited successfully.
    pub fn succeeded(&self) -> bool {
        self.outcome.is_ok()
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} in {:.1} s (load {})",
            self.name,
            match &self.outcome {
                Ok(_) => "succeeded".to_owned(),
                Err(error) => format!("FAILED ({error})"),
            },
            self.wall.as_secs_f64(),
            self.load
        )?;
        writeln!(
            f,
            "  peak RSS: command {}, worker {}",
            mib(self.command_peak_kib),
            mib(self.worker_peak_kib)
        )?;
        writeln!(f, "  worker warnings during: {}", self.worker_warnings)?;
        writeln!(f, "  live events idle:   {}", self.idle)?;
        writeln!(f, "  live events during: {}", self.during)?;
        match self.p99_ratio() {
            Some(ratio) => writeln!(f, "  p99 during / idle: {ratio:.2}")?,
            None => writeln!(f, "  p99 during / idle: -")?,
        }
        if let Ok(summary) = &self.outcome {
            writeln!(f, "  summary: {summary}")?;
        }
        Ok(())
    }
}

/// KiB as MiB with one decimal, or `-`.
pub fn mib(kib: Option<u64>) -> String {
    match kib {
        Some(kib) => format!("{:.1} MiB", kib as f64 / 1024.0),
        None => "-".to_owned(),
    }
}

/// Clerk's `created_at` of the user at position 0, in milliseconds; each next position is a
/// millisecond later, and every stored version's `updated_at` is after it.
pub const CREATED_AT_BASE: i64 = 1_654_012_591_514;

/// The Clerk user at `position` as the bench generates it, with `updated_at` in milliseconds.
/// Its id is [`crate::clerk_api::generated_user_id`]; the history's SQL fill
/// ([`history::fill`]) writes the same shape.
pub fn user(position: usize, updated_at: i64) -> Value {
    let email_id = format!("idn_{position}");
    json!({
        "id": crate::clerk_api::generated_user_id(position), "object": "user",
        "email_addresses": [{"id": email_id, "object": "email_address",
                             "email_address": format!("user{position}@example.org")}],
        "primary_email_address_id": email_id,
        "phone_numbers": [], "primary_phone_number_id": null,
        "first_name": "Bench", "last_name": format!("No{position}"),
        "public_metadata": {"role": "client"},
        "private_metadata": {}, "unsafe_metadata": {},
        "created_at": CREATED_AT_BASE + position as i64,
        "updated_at": updated_at,
    })
}
