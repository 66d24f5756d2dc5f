//! Throughput and latency of the ingest against a raw lapin publisher, in one run.
//!
//! For each channel arrangement (`--channels 1,4,8`), it measures first a raw publisher (one
//! connection with that many channels, C tasks, each with one publish awaiting its confirm at a
//! time) and then the release `ingest` binary started with `INGEST_PUBLISH_CHANNELS` set so,
//! driven by C keep-alive HTTP clients sending unique, signed events of the same size. It prints
//! req/s, p50 and p99 latency, CPU-seconds per 1,000 confirmed messages (the raw publisher's own
//! and the ingest process's, user + system time from `/proc` over the measured seconds), the
//! ratio ingest/raw, the ingest's peak RSS (VmHWM) and the load average. Everything
//! runs on its own exchange and queues, purged between runs and deleted at the end.
//!
//! With `--processes 1,2` it compares instead that many ingest processes side by side (each on a
//! port of its own, all publishing to the same exchange and queue), the C clients spread evenly
//! over them, against the raw publisher; the order of the runs is reversed every other round. It
//! also prints the CPU time each process used over the measured seconds (each ingest, this
//! process as the load generator, the broker when it runs on this machine) and the machine's
//! busy CPU, to show which of them bounds the rate.
//!
//! ```text
//! cargo build --release -p ingest --bin ingest --example ingest-bench
//! target/release/examples/ingest-bench --concurrency 64 --seconds 10
//! target/release/examples/ingest-bench --processes 1,2 --rounds 3 --seconds 10
//! target/release/examples/ingest-bench --channels 1 --trace-ratio 0.1
//! ```
//!
//! With `--trace-ratio R` the ingest exports its traces (sampling R of them) to an OTLP receiver
//! this benchmark runs, so the CPU figures include the tracing's cost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use clap::Parser;
use futures_util::future::try_join_all;
use ingest::publisher::Message;
use ingest::signature::{SignedHeaders, Verifier};
use lapin::options::{
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::{Channel, Connection, ConnectionProperties};
use secrecy::SecretString;
use shared::Topology;
use test_support::http_load::{HttpClient, start_ingest, stop_process};
use test_support::otlp::OtlpReceiver;
use test_support::proc_stats;
use test_support::signing::{SECRET, event_body};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser, Debug)]
#[command(about = "Benchmark the ingest against a raw lapin publisher")]
struct Args {
    /// Concurrent clients (HTTP) and publishing tasks (raw).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Measured seconds per run (after a one-second warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Event size in bytes.
    #[arg(long, default_value_t = 2048)]
    size: usize,
    /// Rounds per arrangement, raw and ingest alternating; a summary row combines them.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Channel arrangements to compare, comma-separated [default: 1,4,8; with --processes: 1].
    #[arg(long, value_delimiter = ',')]
    channels: Option<Vec<usize>>,
    /// Instead of the channel arrangements: numbers of ingest processes to compare side by side
    /// on the one topology, comma-separated (e.g. `1,2`), the clients spread evenly over them.
    #[arg(long, value_delimiter = ',')]
    processes: Option<Vec<usize>>,
    /// The broker.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// The ingest binary (default: `ingest` beside this example's directory).
    #[arg(long)]
    ingest: Option<std::path::PathBuf>,
    /// `INGEST_WORKERS` for the ingest (default: the ingest's own default).
    #[arg(long)]
    workers: Option<usize>,
    /// Instead of the comparison: open this many connections that each send the headers and
    /// ~1 MiB of an unsigned body and then stall, while a few clients send valid events; print
    /// the ingest's peak RSS and how the valid events were answered.
    #[arg(long)]
    stalled: Option<usize>,
    /// Export the ingest's traces, sampling this ratio of them (`OTEL_TRACES_SAMPLER=
    /// parentbased_traceidratio`), to an OTLP receiver this benchmark runs (default: tracing
    /// off, as without `OTEL_EXPORTER_OTLP_ENDPOINT`).
    #[arg(long, value_name = "RATIO")]
    trace_ratio: Option<f64>,
    /// The receiver's address when `--trace-ratio` is given (set at start).
    #[arg(skip)]
    trace_endpoint: Option<String>,
}

/// What one run measured.
struct Figures {
    completed: usize,
    failed: usize,
    elapsed: Duration,
    latencies_us: Vec<u32>,
    /// Requests completed through each measured process (one for a raw run).
    completed_by: Vec<usize>,
    cpu: CpuUse,
}

/// One client's or publishing task's count: the measured process it used (its index), requests
/// completed and failed, and the latency of each completed one.
type Part = (usize, usize, usize, Vec<u32>);

impl Figures {
    fn rate(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64()
    }

    /// CPU-seconds of the measured processes per 1,000 completed requests.
    fn cpu_per_thousand(&self) -> f64 {
        self.cpu.measured.iter().sum::<f64>() * 1000.0 / self.completed as f64
    }

    /// CPU-seconds per measured second: the cores `seconds` kept busy on average.
    fn cores(&self, seconds: f64) -> f64 {
        seconds / self.elapsed.as_secs_f64()
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let index = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
        f64::from(self.latencies_us[index]) / 1000.0
    }

    /// Several rounds as one: total count over total time, all latencies.
    fn combine(rounds: Vec<Figures>) -> Self {
        let mut all = Self {
            completed: 0,
            failed: 0,
            elapsed: Duration::ZERO,
            latencies_us: Vec::new(),
            completed_by: Vec::new(),
            cpu: CpuUse::default(),
        };
        for round in rounds {
            all.completed += round.completed;
            all.failed += round.failed;
            all.elapsed += round.elapsed;
            all.latencies_us.extend(round.latencies_us);
            all.completed_by.resize(round.completed_by.len(), 0);
            for (sum, completed) in all.completed_by.iter_mut().zip(round.completed_by) {
                *sum += completed;
            }
            all.cpu = all.cpu.plus(&round.cpu);
        }
        all.latencies_us.sort_unstable();
        all
    }

    fn merge(parts: Vec<Part>, (elapsed, cpu): (Duration, CpuUse)) -> Self {
        let mut latencies_us = Vec::new();
        let (mut completed, mut failed) = (0, 0);
        let mut completed_by = vec![0; cpu.measured.len().max(1)];
        for (process, ok, bad, latencies) in parts {
            completed += ok;
            failed += bad;
            completed_by[process] += ok;
            latencies_us.extend(latencies);
        }
        latencies_us.sort_unstable();
        Self {
            completed,
            failed,
            elapsed,
            latencies_us,
            completed_by,
            cpu,
        }
    }
}

/// CPU-seconds (user + system) used: as read at one moment (totals so far), or over the measured
/// time (the difference of two readings).
#[derive(Debug, Clone, Default)]
struct CpuUse {
    /// Each measured process: the ingest processes of an ingest run, this process (the raw
    /// publisher) for a raw run.
    measured: Vec<f64>,
    /// This process: the raw publisher, or the HTTP clients of an ingest run.
    bench: f64,
    /// The broker's process, when it runs on this machine and could be read.
    broker: Option<f64>,
    /// Busy time of all the machine's CPUs together (from `/proc/stat`).
    machine: f64,
}

impl CpuUse {
    fn read(measured: &[u32], broker: Option<u32>) -> anyhow::Result<Self> {
        Ok(Self {
            measured: measured
                .iter()
                .map(|&pid| proc_stats::cpu_seconds(pid).context("reading an ingest's CPU time"))
                .collect::<anyhow::Result<_>>()?,
            bench: proc_stats::cpu_seconds(std::process::id())
                .context("reading the bench's CPU time")?,
            broker: broker.and_then(proc_stats::cpu_seconds),
            machine: machine_busy_seconds()?,
        })
    }

    fn minus(&self, earlier: &Self) -> Self {
        self.zip(earlier, |now, then| now - then)
    }

    fn plus(&self, other: &Self) -> Self {
        if self.measured.is_empty() {
            return other.clone();
        }
        self.zip(other, |a, b| a + b)
    }

    fn zip(&self, other: &Self, operation: impl Fn(f64, f64) -> f64) -> Self {
        Self {
            measured: self
                .measured
                .iter()
                .zip(&other.measured)
                .map(|(&a, &b)| operation(a, b))
                .collect(),
            bench: operation(self.bench, other.bench),
            broker: self.broker.zip(other.broker).map(|(a, b)| operation(a, b)),
            machine: operation(self.machine, other.machine),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    let receiver = args.trace_ratio.map(|_| OtlpReceiver::start());
    args.trace_endpoint = receiver.as_ref().map(|r| r.endpoint().to_owned());
    let ingest_binary = match &args.ingest {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .and_then(|examples| examples.parent())
            .map(|dir| dir.join("ingest"))
            .ok_or_else(|| anyhow!("cannot locate the ingest binary; pass --ingest"))?,
    };
    if !ingest_binary.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p ingest --bin ingest`",
            ingest_binary.display()
        );
    }
    let topology = Topology::prefixed(&format!("bench-{}", uuid::Uuid::new_v4().simple()));
    let connection = Connection::connect(&args.amqp_url, ConnectionProperties::default())
        .await
        .context("connecting to the broker")?;
    let admin = connection.create_channel().await?;
    topology.declare(&admin).await.context("declaring")?;

    println!(
        "concurrency {}  seconds {}  event size {} B  broker {}",
        args.concurrency,
        args.seconds,
        args.size,
        redact(&args.amqp_url)
    );
    let result = match (args.stalled, &args.processes) {
        (Some(stalled), _) => stalled_run(&args, &ingest_binary, &topology, stalled).await,
        (None, Some(processes)) => {
            scale_all(
                &args,
                &ingest_binary,
                &topology,
                &connection,
                &admin,
                processes,
            )
            .await
        }
        (None, None) => run_all(&args, &ingest_binary, &topology, &connection, &admin).await,
    };
    cleanup(&admin, &topology).await;
    let _ = connection.close(200, "bench done".into()).await;
    if let (Some(receiver), Some(ratio)) = (&receiver, args.trace_ratio) {
        println!(
            "traces: sampling {ratio}, {} spans received in {} export requests",
            receiver.spans().len(),
            receiver.requests()
        );
    }
    result
}

async fn run_all(
    args: &Args,
    ingest_binary: &std::path::Path,
    topology: &Topology,
    connection: &Connection,
    admin: &Channel,
) -> anyhow::Result<()> {
    println!(
        "{:>8} | {:>9} {:>8} {:>8} {:>8} | {:>9} {:>8} {:>8} {:>6} {:>8} | {:>6} {:>9} {:>5}",
        "channels",
        "raw/s",
        "p50 ms",
        "p99 ms",
        "cpu s/1k",
        "ingest/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "cpu s/1k",
        "ratio",
        "peak RSS",
        "load"
    );
    println!(
        "cpu s/1k: CPU-seconds (user + system, from /proc) per 1,000 confirmed messages, of this \
         process for raw (it also builds and signs the events), of the ingest process for ingest \
         (0.0250 = 25 µs a request)"
    );
    for channels in channel_arrangements(args) {
        // Raw and ingest alternate, so a burst of other load on the machine hits both sides.
        let mut rounds = Vec::new();
        for round in 1..=args.rounds {
            let raw = raw_run(args, topology, connection, channels).await?;
            purge(admin, topology).await?;
            let (ingest, peaks) = ingest_run(args, ingest_binary, topology, channels, 1).await?;
            purge(admin, topology).await?;
            let peak = peaks.into_iter().max().unwrap_or(0);
            print_row(&format!("{channels} #{round}"), &raw, &ingest, peak);
            rounds.push((raw, ingest, peak));
        }
        if args.rounds > 1 {
            let peak = rounds.iter().map(|(_, _, peak)| *peak).max().unwrap_or(0);
            let (raw, ingest): (Vec<Figures>, Vec<Figures>) = rounds
                .into_iter()
                .map(|(raw, ingest, _)| (raw, ingest))
                .unzip();
            print_row(
                &format!("{channels} all"),
                &Figures::combine(raw),
                &Figures::combine(ingest),
                peak,
            );
        }
    }
    Ok(())
}

fn print_row(label: &str, raw: &Figures, ingest: &Figures, peak_rss_kib: u64) {
    println!(
        "{:>8} | {:>9.0} {:>8.2} {:>8.2} {:>8.4} | {:>9.0} {:>8.2} {:>8.2} {:>6} {:>8.4} | {:>6.2} {:>5.1} MiB {:>5}",
        label,
        raw.rate(),
        raw.percentile_ms(0.50),
        raw.percentile_ms(0.99),
        raw.cpu_per_thousand(),
        ingest.rate(),
        ingest.percentile_ms(0.50),
        ingest.percentile_ms(0.99),
        ingest.failed + raw.failed,
        ingest.cpu_per_thousand(),
        ingest.rate() / raw.rate(),
        peak_rss_kib as f64 / 1024.0,
        proc_stats::load_average().unwrap_or_default(),
    );
}

/// `--channels`, or its default: the three arrangements compared, or with `--processes` the
/// ingest's own default of one channel.
fn channel_arrangements(args: &Args) -> Vec<usize> {
    match (&args.channels, &args.processes) {
        (Some(channels), _) => channels.clone(),
        (None, Some(_)) => vec![1],
        (None, None) => vec![1, 4, 8],
    }
}

/// One ingest process against several side by side, each against the raw publisher of the same
/// round, for each channel arrangement.
async fn scale_all(
    args: &Args,
    ingest_binary: &std::path::Path,
    topology: &Topology,
    connection: &Connection,
    admin: &Channel,
    processes: &[usize],
) -> anyhow::Result<()> {
    if processes.contains(&0) {
        bail!("--processes: each count must be at least 1");
    }
    println!(
        "CPUs {}  load average {}  broker process {}",
        std::thread::available_parallelism().map_or(0, usize::from),
        std::fs::read_to_string("/proc/loadavg")?.trim(),
        broker_pid(&args.amqp_url).map_or("not found".to_owned(), |pid| pid.to_string())
    );
    println!(
        "cores: CPU-seconds per measured second (user + system, from /proc) of the ingest \
         processes (of this process for raw), of this process (the load generator: HTTP clients, \
         or the raw publisher), of the broker, and of the whole machine (busy time of all CPUs)"
    );
    println!(
        "{:>12} | {:>8} {:>8} {:>8} {:>6} | {:>7} {:>7} | {:>8} | {:>6} {:>6} {:>6} {:>7} | {:>5}",
        "run",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "/raw",
        "/first",
        "cpu s/1k",
        "ingest",
        "bench",
        "broker",
        "machine",
        "load"
    );
    // `None` is the raw publisher.
    let arrangements: Vec<Option<usize>> = std::iter::once(None)
        .chain(processes.iter().copied().map(Some))
        .collect();
    for channels in channel_arrangements(args) {
        println!("channels {channels}");
        let mut measured: Vec<Vec<(Figures, Vec<u64>)>> =
            arrangements.iter().map(|_| Vec::new()).collect();
        for round in 1..=args.rounds {
            // Every other round runs in the reverse order, so a drift of the machine's other
            // load does not favour the arrangement that always runs first.
            let mut order: Vec<usize> = (0..arrangements.len()).collect();
            if round % 2 == 0 {
                order.reverse();
            }
            for index in order {
                let run = match arrangements[index] {
                    None => (
                        raw_run(args, topology, connection, channels).await?,
                        Vec::new(),
                    ),
                    Some(count) => {
                        ingest_run(args, ingest_binary, topology, channels, count).await?
                    }
                };
                purge(admin, topology).await?;
                measured[index].push(run);
            }
            let this_round: Vec<_> = measured
                .iter()
                .map(|runs| runs.last().expect("measured this round"))
                .collect();
            print_scale_rows(&format!("#{round}"), &arrangements, &this_round);
        }
        if args.rounds > 1 {
            let combined: Vec<(Figures, Vec<u64>)> = measured
                .into_iter()
                .map(|runs| {
                    let peaks = runs.iter().fold(Vec::new(), |peaks: Vec<u64>, (_, run)| {
                        (0..peaks.len().max(run.len()))
                            .map(|process| {
                                let earlier = peaks.get(process).copied().unwrap_or(0);
                                earlier.max(run.get(process).copied().unwrap_or(0))
                            })
                            .collect()
                    });
                    let figures = Figures::combine(runs.into_iter().map(|(run, _)| run).collect());
                    (figures, peaks)
                })
                .collect();
            print_scale_rows("all", &arrangements, &combined.iter().collect::<Vec<_>>());
        }
    }
    println!(
        "load average at the end {}",
        std::fs::read_to_string("/proc/loadavg")?.trim()
    );
    Ok(())
}

/// A row for each arrangement of one round (or of all rounds), the raw publisher's first; each
/// ingest row with its ratio to the raw publisher and to the first process count, then a line
/// with each process's share.
fn print_scale_rows(label: &str, arrangements: &[Option<usize>], runs: &[&(Figures, Vec<u64>)]) {
    let raw_rate = runs[0].0.rate();
    let first_rate = runs.get(1).map_or(f64::NAN, |(figures, _)| figures.rate());
    for (arrangement, (figures, peaks)) in arrangements.iter().zip(runs) {
        let (name, to_raw, to_first) = match arrangement {
            None => ("raw".to_owned(), String::new(), String::new()),
            Some(count) => (
                format!("{count} ingest"),
                format!("{:.2}", figures.rate() / raw_rate),
                format!("{:.2}", figures.rate() / first_rate),
            ),
        };
        let cpu = &figures.cpu;
        println!(
            "{:>12} | {:>8.0} {:>8.2} {:>8.2} {:>6} | {:>7} {:>7} | {:>8.4} | {:>6.2} {:>6.2} {:>6} {:>7.2} | {:>5}",
            format!("{label} {name}"),
            figures.rate(),
            figures.percentile_ms(0.50),
            figures.percentile_ms(0.99),
            figures.failed,
            to_raw,
            to_first,
            figures.cpu_per_thousand(),
            figures.cores(cpu.measured.iter().sum()),
            figures.cores(cpu.bench),
            cpu.broker.map_or("-".to_owned(), |seconds| format!(
                "{:.2}",
                figures.cores(seconds)
            )),
            figures.cores(cpu.machine),
            proc_stats::load_average().unwrap_or_default(),
        );
        if arrangement.is_some() {
            let processes: Vec<String> = figures
                .completed_by
                .iter()
                .zip(&cpu.measured)
                .zip(peaks)
                .map(|((&completed, &seconds), &peak)| {
                    format!(
                        "{:.0} req/s, {:.2} cores, peak RSS {:.1} MiB",
                        completed as f64 / figures.elapsed.as_secs_f64(),
                        figures.cores(seconds),
                        peak as f64 / 1024.0
                    )
                })
                .collect();
            println!("{:>12}   each: {}", "", processes.join(" | "));
        }
    }
}

/// C tasks publishing straight to the exchange, each awaiting its confirm before the next.
async fn raw_run(
    args: &Args,
    topology: &Topology,
    connection: &Connection,
    channel_count: usize,
) -> anyhow::Result<Figures> {
    let mut channels = Vec::new();
    for _ in 0..channel_count {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channels.push(channel);
    }
    let verifier = Arc::new(verifier());
    let exchange = topology.exchange.clone();
    let (measuring, stop) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut tasks = Vec::new();
    for task in 0..args.concurrency {
        let channel = channels[task % channels.len()].clone();
        let (verifier, exchange) = (Arc::clone(&verifier), exchange.clone());
        let (measuring, stop, size) = (Arc::clone(&measuring), Arc::clone(&stop), args.size);
        tasks.push(tokio::spawn(async move {
            let publisher = RawPublisher { channel, exchange };
            let (mut ok, mut bad, mut latencies) = (0, 0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                // The same message the ingest would publish, built the same way.
                let (body, signed) = signed_event(&verifier, size);
                let started = Instant::now();
                let message =
                    Message::new("user.created", &signed, body.into(), chrono::Utc::now())
                        .map_err(|error| anyhow!("{error}"));
                let outcome = match message {
                    Ok(message) => publisher.publish(&message).await,
                    Err(error) => Err(error),
                };
                if measuring.load(Ordering::Relaxed) {
                    match outcome {
                        Ok(()) => {
                            ok += 1;
                            latencies.push(started.elapsed().as_micros() as u32);
                        }
                        Err(_) => bad += 1,
                    }
                }
            }
            (0, ok, bad, latencies)
        }));
    }
    let measured = measure(args, &measuring, &stop, &[std::process::id()]).await?;
    let mut parts = Vec::new();
    for task in tasks {
        parts.push(task.await?);
    }
    for channel in channels {
        let _ = channel.close(200, "done".into()).await;
    }
    Ok(Figures::merge(parts, measured))
}

struct RawPublisher {
    channel: Channel,
    exchange: String,
}

impl RawPublisher {
    async fn publish(&self, message: &Message) -> anyhow::Result<()> {
        let (routing_key, properties, body) = message.parts();
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.clone(),
                lapin::options::BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties.clone(),
            )
            .await?
            .await?;
        match confirm {
            lapin::Confirmation::Ack(None) => Ok(()),
            other => bail!("not confirmed: {other:?}"),
        }
    }
}

/// `processes` release binaries side by side on the one topology, driven over HTTP by the C
/// clients spread evenly over them. Returns the figures and each process's peak RSS (KiB).
async fn ingest_run(
    args: &Args,
    binary: &std::path::Path,
    topology: &Topology,
    channels: usize,
    processes: usize,
) -> anyhow::Result<(Figures, Vec<u64>)> {
    // Started at the same time, as replicas of a deployment are.
    let settings = ingest_settings(args, channels);
    let mut ingests = try_join_all(
        (0..processes).map(|_| start_ingest(binary, &args.amqp_url, topology, &settings)),
    )
    .await?;
    let pids = ingests
        .iter()
        .map(|(child, _)| child.id().ok_or_else(|| anyhow!("an ingest exited")))
        .collect::<anyhow::Result<Vec<u32>>>()?;
    let verifier = Arc::new(verifier());
    let (measuring, stop) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut tasks = Vec::new();
    for task in 0..args.concurrency {
        let process = task % processes;
        let port = ingests[process].1;
        let verifier = Arc::clone(&verifier);
        let (measuring, stop, size) = (Arc::clone(&measuring), Arc::clone(&stop), args.size);
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut bad, mut latencies) = (0, 0, Vec::new());
            let mut client = HttpClient::connect(port).await?;
            while !stop.load(Ordering::Relaxed) {
                let (body, signed) = signed_event(&verifier, size);
                let started = Instant::now();
                let status = client.post(&body, &signed).await?;
                if measuring.load(Ordering::Relaxed) {
                    if status == 200 {
                        ok += 1;
                        latencies.push(started.elapsed().as_micros() as u32);
                    } else {
                        bad += 1;
                    }
                }
            }
            anyhow::Ok((process, ok, bad, latencies))
        }));
    }
    let measured = measure(args, &measuring, &stop, &pids).await?;
    let mut parts = Vec::new();
    for task in tasks {
        parts.push(task.await??);
    }
    let peaks = pids
        .iter()
        .map(|&pid| proc_stats::peak_rss_kib(pid).unwrap_or(0))
        .collect();
    for ((child, _), &pid) in ingests.iter_mut().zip(&pids) {
        stop_process(child, pid).await?;
    }
    Ok((Figures::merge(parts, measured), peaks))
}

/// Junk traffic: `stalled` connections each send the head and ~1 MiB of an unsigned body and then
/// stall, while [`VALID_CLIENTS`] clients keep sending valid events for `--seconds`. Prints the
/// ingest's peak RSS, how the stalled uploads ended and how the valid events were answered.
async fn stalled_run(
    args: &Args,
    binary: &std::path::Path,
    topology: &Topology,
    stalled: usize,
) -> anyhow::Result<()> {
    const VALID_CLIENTS: usize = 4;
    let (mut child, port) =
        start_ingest(binary, &args.amqp_url, topology, &ingest_settings(args, 1)).await?;
    let pid = child.id().ok_or_else(|| anyhow!("the ingest exited"))?;
    let rss_at_start = proc_stats::peak_rss_kib(pid).unwrap_or(0);
    // Declares the 1 MiB body limit and sends a little less, so the request is never complete.
    let junk: Arc<[u8]> = vec![b'x'; (1 << 20) - 1024].into();
    let head: Arc<str> = format!(
        "POST /api/webhooks HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nsvix-id: msg_junk\r\nsvix-timestamp: {}\r\n\
         svix-signature: v1,bm90IGEgc2lnbmF0dXJl\r\n\r\n",
        1 << 20,
        chrono::Utc::now().timestamp()
    )
    .into();

    let stop = Arc::new(AtomicBool::new(false));
    let verifier = Arc::new(verifier());
    let valid: Vec<_> = (0..VALID_CLIENTS)
        .map(|_| {
            let (stop, verifier, size) = (Arc::clone(&stop), Arc::clone(&verifier), args.size);
            tokio::spawn(async move {
                let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
                let mut client = HttpClient::connect(port).await?;
                while !stop.load(Ordering::Relaxed) {
                    let (body, signed) = signed_event(&verifier, size);
                    match client.post(&body, &signed).await {
                        Ok(status) => *statuses.entry(status).or_default() += 1,
                        // A request refused before its body was read (503 past the body
                        // budget) has its connection closed; the answer may be lost with it.
                        Err(_) => {
                            *statuses.entry(0).or_default() += 1;
                            client = HttpClient::connect(port).await?;
                        }
                    }
                }
                anyhow::Ok(statuses)
            })
        })
        .collect();

    let started = Instant::now();
    let uploads: Vec<_> = (0..stalled)
        .map(|_| {
            let (head, junk) = (Arc::clone(&head), Arc::clone(&junk));
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
                stream.write_all(head.as_bytes()).await?;
                // A refused upload is closed by the ingest: the write fails or ends early.
                let _ =
                    tokio::time::timeout(Duration::from_secs(30), stream.write_all(&junk)).await;
                anyhow::Ok(stream)
            })
        })
        .collect();
    let mut streams = Vec::new();
    for upload in uploads {
        if let Ok(stream) = upload.await? {
            streams.push(stream);
        }
    }
    let uploaded_in = started.elapsed();
    // The valid clients go on beside the stalled uploads for the measured time.
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let peak = proc_stats::peak_rss_kib(pid).unwrap_or(0);
    stop.store(true, Ordering::Relaxed);
    let mut valid_statuses = std::collections::BTreeMap::<u16, usize>::new();
    for client in valid {
        for (status, count) in client.await?? {
            *valid_statuses.entry(status).or_default() += count;
        }
    }
    // How each stalled upload ended: an answer (503 when over the budget, 408 after the client
    // timeout) or none yet.
    let mut endings = std::collections::BTreeMap::<String, usize>::new();
    for mut stream in streams {
        let mut answer = [0_u8; 12];
        let ending =
            match tokio::time::timeout(Duration::from_millis(200), stream.read_exact(&mut answer))
                .await
            {
                Ok(Ok(_)) => String::from_utf8_lossy(&answer[9..12]).into_owned(),
                Ok(Err(_)) => "closed".to_owned(),
                Err(_) => "no answer yet".to_owned(),
            };
        *endings.entry(ending).or_default() += 1;
    }
    stop_process(&mut child, pid).await?;
    println!(
        "stalled uploads {stalled} of {} B each (sent in {:.1} s): {endings:?}",
        junk.len(),
        uploaded_in.as_secs_f64()
    );
    println!(
        "valid events from {VALID_CLIENTS} other clients over {} s, by status (0: connection \
         closed before the answer): {valid_statuses:?}",
        args.seconds
    );
    println!(
        "ingest peak RSS {:.1} MiB (at start {:.1} MiB)  load {}",
        peak as f64 / 1024.0,
        rss_at_start as f64 / 1024.0,
        proc_stats::load_average().unwrap_or_default()
    );
    Ok(())
}

/// Warm-up of one second, then `--seconds` measured; returns the measured time and the CPU time
/// used in it by the processes `measured` and the others [`CpuUse`] looks at.
async fn measure(
    args: &Args,
    measuring: &AtomicBool,
    stop: &AtomicBool,
    measured: &[u32],
) -> anyhow::Result<(Duration, CpuUse)> {
    let broker = broker_pid(&args.amqp_url);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = CpuUse::read(measured, broker)?;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let after = CpuUse::read(measured, broker)?;
    stop.store(true, Ordering::Relaxed);
    Ok((started.elapsed(), after.minus(&before)))
}

/// Busy CPU-seconds of the whole machine so far, all CPUs together, from `/proc/stat`.
fn machine_busy_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .context("reading /proc/stat")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user and nice).
    let busy: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&index| fields.get(index))
        .sum();
    Ok(busy as f64 / proc_stats::clock_ticks_per_second() as f64)
}

/// The process listening on the broker's port on this machine, if any: found through the
/// listening socket's inode in `/proc/net/tcp*` and the process holding it. `None` for a remote
/// broker or without the permission to look at the broker's open files.
fn broker_pid(amqp_url: &str) -> Option<u32> {
    static PID: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *PID.get_or_init(|| {
        let uri: lapin::uri::AMQPUri = amqp_url.parse().ok()?;
        let port = format!(":{:04X}", uri.authority.port);
        let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .filter_map(|table| std::fs::read_to_string(table).ok())
            .flat_map(|text| {
                text.lines()
                    .skip(1)
                    .map(|line| line.split_whitespace().map(str::to_owned).collect())
                    .collect::<Vec<Vec<String>>>()
            })
            // local_address, state 0A (listening), inode.
            .find(|fields| fields.len() > 9 && fields[1].ends_with(&port) && fields[3] == "0A")
            .map(|fields| format!("socket:[{}]", fields[9]))?;
        std::fs::read_dir("/proc")
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| {
                std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                    fds.filter_map(Result::ok).any(|fd| {
                        std::fs::read_link(fd.path())
                            .is_ok_and(|link| link.to_str() == Some(&inode))
                    })
                })
            })
    })
}

/// The ingest's settings for a run on `channels` publishing channels: `INGEST_PUBLISH_CHANNELS`,
/// and `INGEST_WORKERS` when `--workers` is given.
fn ingest_settings(args: &Args, channels: usize) -> Vec<(&'static str, String)> {
    let mut settings = vec![("INGEST_PUBLISH_CHANNELS", channels.to_string())];
    if let Some(workers) = args.workers {
        settings.push(("INGEST_WORKERS", workers.to_string()));
    }
    if let (Some(endpoint), Some(ratio)) = (&args.trace_endpoint, args.trace_ratio) {
        settings.push(("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()));
        settings.push(("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".into()));
        settings.push(("OTEL_TRACES_SAMPLER_ARG", ratio.to_string()));
    }
    settings
}

fn verifier() -> Verifier {
    Verifier::new(&[SecretString::from(SECRET)]).expect("the benchmark's secret decodes")
}

/// A unique `user.created` event of `size` bytes and its signature.
fn signed_event(verifier: &Verifier, size: usize) -> (String, SignedHeaders) {
    let body = event_body("user.created", size);
    let message_id = test_support::signing::svix_id();
    let timestamp = chrono::Utc::now().timestamp();
    let signature = verifier
        .sign(&message_id, timestamp, body.as_bytes())
        .expect("text bodies sign");
    (
        body,
        SignedHeaders {
            id: message_id.into(),
            timestamp,
            signature,
        },
    )
}

async fn purge(channel: &Channel, topology: &Topology) -> anyhow::Result<()> {
    channel
        .queue_purge(topology.queue.as_str().into(), QueuePurgeOptions::default())
        .await?;
    Ok(())
}

async fn cleanup(channel: &Channel, topology: &Topology) {
    for queue in [&topology.queue, &topology.dead_queue] {
        if let Err(error) = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
        {
            eprintln!("deleting {queue}: {error}");
        }
    }
    if let Err(error) = channel
        .exchange_delete(
            topology.exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
    {
        eprintln!("deleting {}: {error}", topology.exchange);
    }
}

/// The URL without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}
