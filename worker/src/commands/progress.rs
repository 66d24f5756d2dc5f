//! Progress of a long command (`worker reconcile`, `worker replay`, `worker rebuild`): one bar on
//! a terminal (through `tracing-indicatif`, so log lines are printed above it instead of tearing
//! it), plain progress log lines otherwise.

use std::time::{Duration, Instant};

use indicatif::ProgressStyle;
use tracing::Span;
use tracing_indicatif::IndicatifLayer;
use tracing_indicatif::filter::{IndicatifFilter, hide_indicatif_span_fields};
use tracing_indicatif::span_ext::IndicatifSpanExt;
use tracing_subscriber::fmt::format::DefaultFields;
use tracing_subscriber::layer::{Layer as _, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;

/// How often a progress line is logged when there is no bar.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// Whether a command shows a progress bar: on a terminal, with human-readable logs, and not for
/// `--json`.
pub fn shows_bar(settings: &shared::Settings, json: bool) -> bool {
    !json
        && settings.log_format == shared::telemetry::LogFormat::Pretty
        && std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// Installs the global subscriber of a command with a bar on a terminal: the usual human-readable
/// lines, written through the bar's writer, the bar of the one span that asks for it, and the
/// trace export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
pub fn init_telemetry_with_bar(
    settings: &shared::Settings,
    service: &str,
) -> Result<shared::telemetry::Telemetry, shared::ConfigError> {
    use shared::telemetry::{Telemetry, TraceSettings};
    let telemetry = Telemetry::start(TraceSettings::from_settings(settings, service)?);
    let bars = IndicatifLayer::new()
        .with_span_field_formatter(hide_indicatif_span_fields(DefaultFields::new()));
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(bars.get_stderr_writer())
        .with_filter(shared::telemetry::filter());
    // `try_init`: harmless when a subscriber is already set.
    let installed = tracing_subscriber::registry()
        .with(lines)
        .with(bars.with_filter(IndicatifFilter::new(false)))
        .with(telemetry.layer())
        .try_init()
        .is_ok();
    Ok(telemetry.installed(installed))
}

/// Reports how far a pass is.
pub struct Progress {
    bar: Option<Span>,
    doing: &'static str,
    what: &'static str,
    total: u64,
    done: u64,
    last_line: Instant,
}

impl Progress {
    /// A bar when `bar` is set (and a bar layer is installed), log lines otherwise. `doing` names
    /// the work (`reconciling`) and `what` the objects counted (`users`).
    pub fn new(bar: bool, doing: &'static str, what: &'static str, total: u64) -> Self {
        let bar = bar.then(|| {
            let span = tracing::info_span!("progress", indicatif.pb_show = tracing::field::Empty);
            if let Ok(style) = ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} ({per_sec}, about {eta} left)",
            ) {
                span.pb_set_style(&style.progress_chars("=> "));
            }
            span.pb_set_length(total);
            span.pb_set_message(what);
            span.pb_start();
            span
        });
        tracing::info!(total, "{doing} {what}");
        Self {
            bar,
            doing,
            what,
            total,
            done: 0,
            last_line: Instant::now(),
        }
    }

    /// `count` more objects handled.
    pub fn advance(&mut self, count: u64) {
        self.done += count;
        match &self.bar {
            Some(span) => {
                // Clerk's count can be behind the listing while users sign up.
                if self.done > self.total {
                    self.total = self.done;
                    span.pb_set_length(self.total);
                }
                span.pb_set_position(self.done);
            }
            None if self.last_line.elapsed() >= LINE_EVERY => {
                self.last_line = Instant::now();
                tracing::info!(
                    done = self.done,
                    total = self.total,
                    "{} {}",
                    self.doing,
                    self.what
                );
            }
            None => {}
        }
    }

    /// A new phase with its own length, e.g. confirming the users missing from the listing.
    pub fn phase(&mut self, message: &str, total: u64) {
        self.done = 0;
        self.total = total;
        self.last_line = Instant::now();
        if let Some(span) = &self.bar {
            span.pb_set_message(message);
            span.pb_set_length(total);
            span.pb_set_position(0);
        }
        tracing::info!(total, "{message}");
    }
}
