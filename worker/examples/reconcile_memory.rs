//! Peak memory of `worker reconcile` as a process of its own, against the stand-in for Clerk's
//! Backend API served by this one, at a number of users:
//!
//! ```text
//! cargo build -p worker --bin worker --example worker-reconcile-memory
//! target/debug/examples/worker-reconcile-memory --users 10000 [--worker PATH]
//! ```
//!
//! A fresh database (the binary applies its own migrations); a backfill into the empty tables,
//! then a run with nothing changed and every stored user listed, then one with a tenth of the
//! users deleted in Clerk (`--max-delete 100%`, so the deletion phase confirms and deletes them
//! all). Prints each run's wall time and the process's peak resident memory (`VmHWM`, read from
//! `/proc` until it exits). `--worker` measures another build of the binary (default: the
//! `worker` next to this example's folder). Uses `DATABASE_URL` as the benches do and drops the
//! database afterwards.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use serde_json::{Value, json};
use test_support::TestDatabase;
use test_support::clerk_api::ClerkApi;
use test_support::proc_stats::peak_rss_kib;

#[derive(Debug, Parser)]
struct Args {
    /// Users in the stand-in.
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// The `worker` binary to measure.
    #[arg(long)]
    worker: Option<PathBuf>,
}

const KEY: &str = "sk_test_memory";

fn user(n: usize) -> Value {
    json!({
        "id": format!("user_{n:08}"), "object": "user",
        "email_addresses": [{"id": format!("idn_{n}"), "object": "email_address",
                             "email_address": format!("user{n}@example.org")}],
        "primary_email_address_id": format!("idn_{n}"),
        "phone_numbers": [], "primary_phone_number_id": null,
        "first_name": "Bench", "last_name": format!("No{n}"),
        "public_metadata": {"role": "client"}, "private_metadata": {}, "unsafe_metadata": {},
        "created_at": 1_654_012_591_514_i64 + n as i64,
        "updated_at": 1_654_012_591_835_i64 + n as i64,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let worker = match &args.worker {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .and_then(|examples| examples.parent())
            .context("the example's folder")?
            .join("worker"),
    };
    let database = TestDatabase::empty().await;
    let api = ClerkApi::start(KEY).await;
    api.put_users((0..args.users).map(user));
    println!("users={} worker={}", args.users, worker.display());
    measure("backfill", &worker, &database.url, &api, &[]).await?;
    measure("no change", &worker, &database.url, &api, &[]).await?;
    for n in (0..args.users).step_by(10) {
        api.delete_user(&format!("user_{n:08}"));
    }
    measure(
        "10% deleted",
        &worker,
        &database.url,
        &api,
        &["--max-delete", "100%"],
    )
    .await?;
    Ok(())
}

/// Runs `worker reconcile --json` once and prints its time and peak memory.
async fn measure(
    what: &str,
    worker: &PathBuf,
    db_url: &str,
    api: &ClerkApi,
    args: &[&str],
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut child = Command::new(worker)
        .args(["reconcile", "--json"])
        .args(args)
        .env("DATABASE_URL", db_url)
        .env("CLERK_API_URL", api.url())
        .env("CLERK_SECRET_KEY", KEY)
        .env("CLERK_API_RATE_LIMIT", "1000000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("start {}", worker.display()))?;
    let pid = child.id();
    let mut peak = 0;
    // VmHWM only grows: its last reading before the exit is the peak.
    while child.try_wait()?.is_none() {
        if let Some(kib) = peak_rss_kib(pid) {
            peak = peak.max(kib);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("{what}: worker reconcile failed");
    }
    let summary: Value = serde_json::from_slice(&output.stdout)?;
    println!(
        "{what:>12}: {:>7.2} s, peak RSS {:>7.1} MiB, users {}",
        started.elapsed().as_secs_f64(),
        peak as f64 / 1024.0,
        summary["users"]
    );
    Ok(())
}
