//! The ingest's configuration: taken from [`shared::Settings`] once at start and validated, so a
//! missing or malformed setting stops the binary with one line naming its variable.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use shared::{AmqpNodes, ConfigError, Settings, Topology};

use crate::signature::Verifier;

/// Everything the ingest needs, checked. Secrets stay in [`SecretString`], so `Debug` redacts them.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// `INGEST_LISTEN`: the address the HTTP server binds (port 0 picks a free port).
    pub listen: String,
    /// `CLERK_WEBHOOK_SECRET`: the signing secrets, each known to decode.
    pub webhook_secrets: Vec<SecretString>,
    /// `AMQP_URL`: the broker's nodes (one URL, or several separated by commas).
    pub amqp_nodes: AmqpNodes,
    /// `AMQP_EXCHANGE`, `AMQP_QUEUE`, `AMQP_DEAD_QUEUE`, `AMQP_DELIVERY_LIMIT`.
    pub topology: Topology,
    /// `INGEST_BODY_LIMIT`: the largest accepted body in bytes; beyond it the answer is 413.
    pub body_limit: usize,
    /// `INGEST_CONFIRM_TIMEOUT_MS`: the longest a request waits for the broker.
    pub confirm_timeout: Duration,
    /// `INGEST_PUBLISH_CHANNELS`: AMQP channels publishing shares out over.
    pub publish_channels: usize,
    /// `INGEST_MAX_CONCURRENT_REQUESTS`: webhook requests handled at once; beyond it, 503.
    pub max_concurrent_requests: usize,
    /// `INGEST_CLIENT_TIMEOUT_MS`: how long a client may take to send its head and its body; 408
    /// after that.
    pub client_timeout: Duration,
    /// `INGEST_BODY_BUDGET`: bytes of bodies held by all requests at once; past it, 503.
    pub body_budget: usize,
    /// `INGEST_WORKERS`: HTTP worker threads.
    pub workers: usize,
    /// `INGEST_MAX_CONNECTIONS`: open connections each worker serves at once.
    pub max_connections: usize,
    /// True when `CLERK_WEBHOOK_SECRET` holds the public demo secret of the compose file.
    pub demo_secret: bool,
}

pub use shared::config::DEMO_WEBHOOK_SECRET;

impl IngestConfig {
    /// Reads and checks the ingest's settings.
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let webhook_secrets = settings.webhook_secrets()?;
        // Decoding here, not at the first request, turns a mistyped secret into a start failure.
        Verifier::new(&webhook_secrets)?;
        let amqp_nodes = settings.amqp_nodes()?;
        let topology = settings.topology()?;
        for (variable, value) in [
            ("INGEST_BODY_LIMIT", settings.ingest_body_limit as u64),
            (
                "INGEST_CONFIRM_TIMEOUT_MS",
                settings.ingest_confirm_timeout_ms,
            ),
            (
                "INGEST_PUBLISH_CHANNELS",
                settings.ingest_publish_channels as u64,
            ),
            (
                "INGEST_MAX_CONCURRENT_REQUESTS",
                settings.ingest_max_concurrent_requests as u64,
            ),
            (
                "INGEST_CLIENT_TIMEOUT_MS",
                settings.ingest_client_timeout_ms,
            ),
            ("INGEST_BODY_BUDGET", settings.ingest_body_budget as u64),
            ("INGEST_WORKERS", settings.ingest_workers as u64),
            (
                "INGEST_MAX_CONNECTIONS",
                settings.ingest_max_connections as u64,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::Malformed {
                    variable,
                    reason: "must be at least 1".into(),
                });
            }
        }
        // One AMQP connection has at most 2047 channels on RabbitMQ's default settings.
        if settings.ingest_publish_channels > 1024 {
            return Err(ConfigError::Malformed {
                variable: "INGEST_PUBLISH_CHANNELS",
                reason: "must be at most 1024".into(),
            });
        }
        // A body the size of the limit must fit, or the largest events could never be accepted.
        if settings.ingest_body_budget < settings.ingest_body_limit {
            return Err(ConfigError::Malformed {
                variable: "INGEST_BODY_BUDGET",
                reason: format!(
                    "must be at least INGEST_BODY_LIMIT ({} bytes)",
                    settings.ingest_body_limit
                ),
            });
        }
        let demo_secret = webhook_secrets
            .iter()
            .any(|secret| secret.expose_secret() == DEMO_WEBHOOK_SECRET);
        Ok(Self {
            listen: settings.ingest_listen.clone(),
            webhook_secrets,
            amqp_nodes,
            topology,
            body_limit: settings.ingest_body_limit,
            confirm_timeout: settings.confirm_timeout(),
            publish_channels: settings.ingest_publish_channels,
            max_concurrent_requests: settings.ingest_max_concurrent_requests,
            client_timeout: Duration::from_millis(settings.ingest_client_timeout_ms),
            body_budget: settings.ingest_body_budget,
            workers: settings.ingest_workers,
            max_connections: settings.ingest_max_connections,
            demo_secret,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(secret: &str) -> Settings {
        Settings {
            clerk_webhook_secret: Some(secret.into()),
            amqp_url: Some("amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            ..Settings::default()
        }
    }

    #[test]
    fn a_valid_configuration_keeps_every_secret() {
        let config = IngestConfig::from_settings(&settings(
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD,whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ))
        .expect("valid");
        assert_eq!(config.webhook_secrets.len(), 2);
        assert_eq!(config.publish_channels, 1);
    }

    #[test]
    fn an_undecodable_secret_stops_the_start_naming_the_variable_but_not_the_secret() {
        let line = IngestConfig::from_settings(&settings(
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD whsec_not*base64*secret",
        ))
        .expect_err("malformed")
        .to_string();
        assert!(
            line.starts_with("configuration: CLERK_WEBHOOK_SECRET is malformed"),
            "{line}"
        );
        assert!(!line.contains("not*base64"), "{line}");
        assert!(!line.contains('\n'), "{line}");
    }

    #[test]
    fn a_missing_amqp_url_is_named() {
        let mut settings = settings("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD");
        settings.amqp_url = None;
        let line = IngestConfig::from_settings(&settings)
            .expect_err("missing")
            .to_string();
        assert_eq!(line, "configuration: AMQP_URL is required but not set");
    }

    #[test]
    fn zero_publish_channels_is_refused() {
        let mut settings = settings("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD");
        settings.ingest_publish_channels = 0;
        let line = IngestConfig::from_settings(&settings)
            .expect_err("zero")
            .to_string();
        assert!(line.contains("INGEST_PUBLISH_CHANNELS"), "{line}");
    }

    #[test]
    fn a_body_budget_smaller_than_the_body_limit_is_refused() {
        let mut settings = settings("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD");
        settings.ingest_body_budget = settings.ingest_body_limit - 1;
        let line = IngestConfig::from_settings(&settings)
            .expect_err("too small")
            .to_string();
        assert!(line.contains("INGEST_BODY_BUDGET"), "{line}");
    }

    #[test]
    fn the_demo_secret_is_recognised_and_is_the_one_the_compose_file_falls_back_to() {
        let config = IngestConfig::from_settings(&settings(&format!(
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD {DEMO_WEBHOOK_SECRET}"
        )))
        .expect("valid");
        assert!(config.demo_secret);
        let config =
            IngestConfig::from_settings(&settings("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"))
                .expect("valid");
        assert!(!config.demo_secret);
        let compose = include_str!("../../docker-compose.yml");
        assert!(
            compose.contains(&format!("CLERK_WEBHOOK_SECRET:-{DEMO_WEBHOOK_SECRET}}}")),
            "docker-compose.yml falls back to another secret"
        );
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let config =
            IngestConfig::from_settings(&settings("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"))
                .expect("valid");
        let debug = format!("{config:?}");
        assert!(!debug.contains("C2FVsBQI"), "{debug}");
        assert!(!debug.contains("guest:guest"), "{debug}");
    }
}
