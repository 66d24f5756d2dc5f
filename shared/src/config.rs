//! Configuration: built-in defaults, then an optional TOML file, then the environment.
//!
//! Every key is named like its environment variable, lower-cased: `AMQP_URL` is `amqp_url` in the
//! file. The binaries take what they need through the accessors below, which turn a missing or
//! malformed setting into one [`ConfigError`] line naming the variable.

use std::path::Path;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

use crate::broker::AmqpNodes;
use crate::roles::{Roles, RolesError};
use crate::telemetry::LogFormat;
use crate::topology::Topology;

/// The longest `WORKER_LOCK_TIMEOUT` accepted: an hour is already far past any wait a live event
/// should make.
pub const MAX_LOCK_TIMEOUT: Duration = Duration::from_secs(3600);

/// The signing secret `docker-compose.yml` falls back to without a `CLERK_WEBHOOK_SECRET` of
/// the user's own. It is public: the ingest warns for as long as it runs with it, and
/// `worker doctor` says so.
pub const DEMO_WEBHOOK_SECRET: &str = "whsec_Y2xlcmstc3luYy1sb2NhbC1kZW1vLXNlY3JldC0wMDA=";

/// A setting that is missing or malformed. Its `Display` is the one line the binary stops with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {variable} is required but not set")]
    Missing { variable: &'static str },
    #[error("configuration: {variable} is malformed: {reason}")]
    Malformed {
        variable: &'static str,
        reason: String,
    },
    #[error("configuration: {0}")]
    Load(String),
}

/// Every setting of both binaries, as loaded. Required ones are `Option` here and checked by the
/// accessor the binary calls.
///
/// It serializes to the same keys it is loaded from, with the secrets written as `"[redacted]"`
/// (null when unset): `serde_json::to_value(Settings::default())` lists every setting with
/// its default, which is how the configuration reference (docs/configuration.md) is checked.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Settings {
    /// `CLERK_WEBHOOK_SECRET`: one or more `whsec_…` signing secrets, separated by spaces or
    /// commas (several during rotation). Required by the ingest.
    #[serde(serialize_with = "redacted")]
    pub clerk_webhook_secret: Option<SecretString>,
    /// `AMQP_URL`: the RabbitMQ URL, `amqp://user:pass@host:5672/%2f`, or several separated by
    /// commas (the nodes of one cluster, tried in a shuffled order). Required by both.
    #[serde(serialize_with = "redacted")]
    pub amqp_url: Option<SecretString>,
    /// `DATABASE_URL`: the Postgres URL, `postgres://user:pass@host:5432/db`. Required by the
    /// worker and the migrations.
    #[serde(serialize_with = "redacted")]
    pub database_url: Option<SecretString>,
    /// `LOG_FORMAT`: `pretty` (default) or `json`.
    pub log_format: LogFormat,

    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: the OTLP/HTTP collector traces are exported to, e.g.
    /// `http://collector:4318` (`/v1/traces` is appended). Unset (the default): no tracing.
    pub otel_exporter_otlp_endpoint: Option<String>,
    /// `OTEL_EXPORTER_OTLP_HEADERS`: headers sent with every export, `key=value` pairs separated
    /// by commas (a tracing backend's API key, say). Never logged.
    #[serde(serialize_with = "redacted")]
    pub otel_exporter_otlp_headers: Option<SecretString>,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf`, the only one supported (the default).
    pub otel_exporter_otlp_protocol: String,
    /// `OTEL_EXPORTER_OTLP_TIMEOUT`: milliseconds one export may take, retries included; the
    /// flush at shutdown waits this long and a second at most (default 10000).
    pub otel_exporter_otlp_timeout: u64,
    /// `OTEL_SERVICE_NAME`: the service name on exported spans (default: `clerk-sync-ingest`,
    /// `clerk-sync-worker`, `clerk-sync-migrations`).
    pub otel_service_name: Option<String>,
    /// `OTEL_TRACES_SAMPLER`: `parentbased_always_on` (default), `parentbased_traceidratio`,
    /// `traceidratio`, `always_on`, `always_off` or `parentbased_always_off`.
    pub otel_traces_sampler: String,
    /// `OTEL_TRACES_SAMPLER_ARG`: the ratio of the ratio samplers, 0 to 1 (default 1).
    pub otel_traces_sampler_arg: Option<String>,
    /// `OTEL_RESOURCE_ATTRIBUTES`: extra resource attributes, `key=value` pairs separated by
    /// commas, e.g. `deployment.environment=production`.
    pub otel_resource_attributes: Option<String>,
    /// `OTEL_BSP_MAX_QUEUE_SIZE`: finished spans waiting for export at most; beyond it spans are
    /// dropped and counted in `clerk_sync_trace_spans_dropped_total` (default 2048).
    pub otel_bsp_max_queue_size: usize,
    /// `OTEL_BSP_SCHEDULE_DELAY`: milliseconds between two exports of the spans gathered
    /// (default 5000; a full batch of 512 goes at once).
    pub otel_bsp_schedule_delay: u64,

    /// `AMQP_EXCHANGE`: the topic exchange (default `clerk.events`).
    pub amqp_exchange: String,
    /// `AMQP_QUEUE`: the worker's quorum queue (default `clerk.events.worker`).
    pub amqp_queue: String,
    /// `AMQP_DEAD_QUEUE`: the dead-letter queue (default `clerk.events.dead`).
    pub amqp_dead_queue: String,
    /// `AMQP_DELIVERY_LIMIT`: deliveries after which the broker dead-letters a message (default 20).
    pub amqp_delivery_limit: u32,
    /// `AMQP_QUORUM_INITIAL_GROUP_SIZE`: replicas of each quorum queue when it is first declared
    /// (default 3; RabbitMQ caps it at the cluster's size, so one node works too).
    pub amqp_quorum_initial_group_size: u32,

    /// `INGEST_LISTEN`: the ingest's address (default `0.0.0.0:3000`).
    pub ingest_listen: String,
    /// `INGEST_BODY_LIMIT`: the largest accepted request body in bytes (default 1 MiB).
    pub ingest_body_limit: usize,
    /// `INGEST_CONFIRM_TIMEOUT_MS`: how long a request waits for the broker's confirm before it
    /// is answered 503 (default 5000).
    pub ingest_confirm_timeout_ms: u64,
    /// `INGEST_PUBLISH_CHANNELS`: AMQP channels the ingest publishes on (default 1, the fastest
    /// arrangement in the ingest's benchmark; see BENCHMARKS.md).
    pub ingest_publish_channels: usize,
    /// `INGEST_MAX_CONCURRENT_REQUESTS`: requests handled at once; beyond it the answer is 503
    /// (default 1024).
    pub ingest_max_concurrent_requests: usize,
    /// `INGEST_CLIENT_TIMEOUT_MS`: how long a client may take to send its request head and body
    /// before it is answered 408 (default 10000).
    pub ingest_client_timeout_ms: u64,
    /// `INGEST_BODY_BUDGET`: bytes of request bodies all requests together may hold while they
    /// are read and published; a request that would go past it is answered 503 (default 32 MiB).
    pub ingest_body_budget: usize,
    /// `INGEST_WORKERS`: HTTP worker threads (default 1: on a few cores one worker and the
    /// broker client's thread beat more workers; see BENCHMARKS.md).
    pub ingest_workers: usize,
    /// `INGEST_MAX_CONNECTIONS`: open HTTP connections each worker serves at once; more wait in
    /// the listen backlog (default 256). Each open connection may buffer up to ~160 KiB.
    pub ingest_max_connections: usize,

    /// `WORKER_LISTEN`: the worker's health and metrics address (default `0.0.0.0:3001`).
    pub worker_listen: String,
    /// `WORKER_PREFETCH`: unacknowledged deliveries the worker holds at once (default 1024:
    /// enough to fill `WORKER_DB_POOL_SIZE` batches of `WORKER_BATCH_SIZE`).
    pub worker_prefetch: u16,
    /// `WORKER_BATCH_SIZE`: deliveries applied in one database transaction at most (default 128;
    /// a batch costs the same few statements whatever its size, and a lone event never waits).
    pub worker_batch_size: usize,
    /// `WORKER_MAX_ATTEMPTS`: attempts for a failure that belongs to the message before it is
    /// dead-lettered as `exhausted` (default 5).
    pub worker_max_attempts: u32,
    /// `WORKER_RETRY_BASE_MS`: first back-off step, doubled on each retry (default 100).
    pub worker_retry_base_ms: u64,
    /// `WORKER_RETRY_MAX_MS`: the back-off cap (default 30000).
    pub worker_retry_max_ms: u64,
    /// `WORKER_RUN_MIGRATIONS`: apply pending migrations at start (default true).
    pub worker_run_migrations: bool,
    /// `WORKER_DB_POOL_SIZE`: transactions (batches) the worker applies at once (default 8); its
    /// pool holds one connection more, for `/readyz`.
    pub worker_db_pool_size: u32,
    /// `WORKER_ROLES`: the roles a user can hold, separated by commas (default
    /// `admin,trainer,client`).
    pub worker_roles: String,
    /// `WORKER_DEFAULT_ROLE`: the role of a user whose `public_metadata.role` is missing or not
    /// one of `WORKER_ROLES` (default `client`; must be one of them).
    pub worker_default_role: String,
    /// `WORKER_RECONCILE_INTERVAL`: how often a running worker reconciles from Clerk's Backend
    /// API, e.g. `24h` (humantime; unset or empty: never). Needs `CLERK_SECRET_KEY`.
    pub worker_reconcile_interval: Option<String>,
    /// `WORKER_RECONCILE_CONNECTIONS`: the database connections of a reconcile run, its own pool
    /// apart from the consumer's (default 2, at least 2): one reads, the others write a page's
    /// objects at once.
    pub worker_reconcile_connections: u32,

    /// `WORKER_REPAIR_SHARE`: the share of its time a repair command (`worker reconcile`, a
    /// scheduled reconcile, `rebuild`, `replay`) spends working, as a percentage (default `50%`,
    /// `100%` never rests). After each page or chunk it rests for the rest of the time, so that
    /// live events find the database free: see BENCHMARKS.md ("Scale") for what each share
    /// costs the live events and the command.
    pub worker_repair_share: String,

    /// `CLERK_SECRET_KEY`: the Backend API key of the Clerk instance (`sk_live_…`/`sk_test_…`).
    /// Required by `worker reconcile` and by a scheduled reconcile only.
    #[serde(serialize_with = "redacted")]
    pub clerk_secret_key: Option<SecretString>,
    /// `CLERK_API_URL`: the Backend API's base URL (default `https://api.clerk.com`).
    pub clerk_api_url: String,
    /// `CLERK_API_RATE_LIMIT`: Backend API requests per 10 seconds at most. Unset: by the key's
    /// kind, Clerk's own limit per instance: 1000 for a production key (`sk_live_…`), 100 for
    /// a development key (`sk_test_…`) or any other.
    pub clerk_api_rate_limit: Option<u32>,
    /// `CLERK_API_TIMEOUT_MS`: how long one Backend API request may take (default 30000).
    pub clerk_api_timeout_ms: u64,
    /// `WORKER_PROCESSED_RETENTION`: how long a `processed_events` row is kept before the worker
    /// prunes it, as a human-readable duration like `30d` or `72h` (default `30d`).
    pub worker_processed_retention: String,
    /// `WORKER_STORE_PAYLOADS`: keep each event's body in its history row (default true). The
    /// bodies hold personal data; without them the history keeps everything else, and `worker
    /// replay`/`rebuild` have nothing to re-apply.
    pub worker_store_payloads: bool,
    /// `WORKER_STALLED_AFTER`: `/readyz` answers 503 once a delivery has been held unacknowledged
    /// this long, as a human-readable duration (default `5m`).
    pub worker_stalled_after: String,
    /// `WORKER_BROKER_TIMEOUT_MS`: the longest the worker waits for the broker in any one step (a
    /// dead letter's publish and confirm, an acknowledgement, a cancel or close) before it counts
    /// as broker trouble (default 10000).
    pub worker_broker_timeout_ms: u64,
    /// `WORKER_DELETE_MODE`: what a deletion does to a user's, an organization's or a
    /// membership's row: `hard` removes it (the default), `soft` keeps it with `deleted_at` set,
    /// `anonymize` keeps it with `deleted_at` set and its personal columns and history payloads
    /// cleared. Tombstones are written in every mode.
    pub worker_delete_mode: String,
    /// `WORKER_PURGE_DELETED_AFTER`: rows kept by `soft` or `anonymize` are removed for good once
    /// deleted this long, as a human-readable duration like `90d` (unset or empty: never).
    pub worker_purge_deleted_after: Option<String>,
    /// `WORKER_LOCK_TIMEOUT`: Postgres's `lock_timeout` on every connection the worker, its
    /// commands and the `migrations` binary open, as a human-readable duration (default `5s`). A
    /// statement that waits longer for a lock fails with SQLSTATE 55P03 and is retried, instead
    /// of waiting (and making others wait behind it) for as long as the lock is held.
    pub worker_lock_timeout: String,

    /// `WORKER_API_TOKEN`: the bearer token of the worker's on-demand sync API (`POST
    /// /v1/sync/users/{id}`, `POST /v1/sync/organizations/{id}`). Unset or empty: the API is off.
    /// Needs `CLERK_SECRET_KEY`.
    #[serde(serialize_with = "redacted")]
    pub worker_api_token: Option<SecretString>,
    /// `WORKER_API_LISTEN`: a separate address for the on-demand sync API, e.g. `0.0.0.0:3002`
    /// (unset or empty: the API shares `WORKER_LISTEN`).
    pub worker_api_listen: Option<String>,
    /// `WORKER_API_TIMEOUT_MS`: the longest an on-demand sync request waits (for the rate limit,
    /// Clerk and the database together) before it is answered 503 (default 5000).
    pub worker_api_timeout_ms: u64,
    /// `WORKER_API_REUSE_MS`: for this long after an on-demand sync of an object, another request
    /// for it is answered from the stored row without asking Clerk again (default 2000; 0: never).
    pub worker_api_reuse_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        let topology = Topology::default();
        Self {
            clerk_webhook_secret: None,
            amqp_url: None,
            database_url: None,
            log_format: LogFormat::Pretty,
            otel_exporter_otlp_endpoint: None,
            otel_exporter_otlp_headers: None,
            otel_exporter_otlp_protocol: "http/protobuf".into(),
            otel_exporter_otlp_timeout: 10_000,
            otel_service_name: None,
            otel_traces_sampler: "parentbased_always_on".into(),
            otel_traces_sampler_arg: None,
            otel_resource_attributes: None,
            otel_bsp_max_queue_size: 2048,
            otel_bsp_schedule_delay: 5_000,
            amqp_exchange: topology.exchange,
            amqp_queue: topology.queue,
            amqp_dead_queue: topology.dead_queue,
            amqp_delivery_limit: topology.delivery_limit,
            amqp_quorum_initial_group_size: topology.quorum_initial_group_size,
            ingest_listen: "0.0.0.0:3000".into(),
            ingest_body_limit: 1024 * 1024,
            ingest_confirm_timeout_ms: 5_000,
            ingest_publish_channels: 1,
            ingest_max_concurrent_requests: 1024,
            ingest_client_timeout_ms: 10_000,
            ingest_body_budget: 32 * 1024 * 1024,
            ingest_workers: 1,
            ingest_max_connections: 256,
            worker_listen: "0.0.0.0:3001".into(),
            worker_prefetch: 1024,
            worker_batch_size: 128,
            worker_max_attempts: 5,
            worker_retry_base_ms: 100,
            worker_retry_max_ms: 30_000,
            worker_run_migrations: true,
            worker_db_pool_size: 8,
            worker_roles: "admin,trainer,client".into(),
            worker_default_role: "client".into(),
            worker_reconcile_interval: None,
            worker_reconcile_connections: 2,
            worker_repair_share: "50%".into(),
            clerk_secret_key: None,
            clerk_api_url: "https://api.clerk.com".into(),
            clerk_api_rate_limit: None,
            clerk_api_timeout_ms: 30_000,
            worker_processed_retention: "30d".into(),
            worker_store_payloads: true,
            worker_stalled_after: "5m".into(),
            worker_broker_timeout_ms: 10_000,
            worker_delete_mode: "hard".into(),
            worker_purge_deleted_after: None,
            worker_lock_timeout: "5s".into(),
            worker_api_token: None,
            worker_api_listen: None,
            worker_api_timeout_ms: 5_000,
            worker_api_reuse_ms: 2_000,
        }
    }
}

impl Settings {
    /// Defaults, then `file` (TOML) if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).required(true));
        }
        builder
            .add_source(config::Environment::default().try_parsing(true))
            .build()
            .and_then(|config| config.try_deserialize::<Self>())
            .map_err(|error| ConfigError::Load(error.to_string()))
    }

    /// The exchange and queue names and the delivery limit.
    pub fn topology(&self) -> Result<Topology, ConfigError> {
        for (variable, name) in [
            ("AMQP_EXCHANGE", &self.amqp_exchange),
            ("AMQP_QUEUE", &self.amqp_queue),
            ("AMQP_DEAD_QUEUE", &self.amqp_dead_queue),
        ] {
            if name.trim().is_empty() || name.len() > 255 {
                return Err(ConfigError::Malformed {
                    variable,
                    reason: "must be 1 to 255 characters".into(),
                });
            }
        }
        if self.amqp_delivery_limit == 0 {
            return Err(ConfigError::Malformed {
                variable: "AMQP_DELIVERY_LIMIT",
                reason: "must be at least 1".into(),
            });
        }
        if self.amqp_quorum_initial_group_size == 0 {
            return Err(ConfigError::Malformed {
                variable: "AMQP_QUORUM_INITIAL_GROUP_SIZE",
                reason: "must be at least 1".into(),
            });
        }
        Ok(Topology {
            exchange: self.amqp_exchange.clone(),
            queue: self.amqp_queue.clone(),
            dead_queue: self.amqp_dead_queue.clone(),
            delivery_limit: self.amqp_delivery_limit,
            quorum_initial_group_size: self.amqp_quorum_initial_group_size,
        })
    }

    /// `AMQP_URL`: the broker's nodes, each checked to be an AMQP URL, in a shuffled order so
    /// that replicas given the same list spread over the nodes.
    pub fn amqp_nodes(&self) -> Result<AmqpNodes, ConfigError> {
        let urls = required(&self.amqp_url, "AMQP_URL")?;
        let nodes =
            AmqpNodes::parse(urls.expose_secret()).map_err(|reason| ConfigError::Malformed {
                variable: "AMQP_URL",
                reason,
            })?;
        Ok(nodes.shuffle(&mut rand::rng()))
    }

    /// `DATABASE_URL`, checked to be a Postgres URL.
    pub fn database_url(&self) -> Result<SecretString, ConfigError> {
        let url = required(&self.database_url, "DATABASE_URL")?;
        let text = url.expose_secret();
        if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
            return Err(ConfigError::Malformed {
                variable: "DATABASE_URL",
                reason: "not a postgres:// URL".into(),
            });
        }
        Ok(url)
    }

    /// `WORKER_LOCK_TIMEOUT`, checked: above zero and at most `MAX_LOCK_TIMEOUT` (Postgres takes
    /// whole milliseconds that fit an `i32`; a longer wait is no timeout at all).
    pub fn lock_timeout(&self) -> Result<Duration, ConfigError> {
        let malformed = |reason: String| ConfigError::Malformed {
            variable: "WORKER_LOCK_TIMEOUT",
            reason,
        };
        match humantime::parse_duration(self.worker_lock_timeout.trim()) {
            Ok(timeout) if timeout < Duration::from_millis(1) => {
                Err(malformed("must be at least 1ms".into()))
            }
            Ok(timeout) if timeout > MAX_LOCK_TIMEOUT => Err(malformed(format!(
                "must be at most {}",
                humantime::format_duration(MAX_LOCK_TIMEOUT)
            ))),
            Ok(timeout) => Ok(timeout),
            Err(error) => Err(malformed(format!(
                "not a duration like 5s or 500ms ({error})"
            ))),
        }
    }

    /// `WORKER_REPAIR_SHARE`, checked: a percentage above 0 and at most 100, as a fraction.
    pub fn repair_share(&self) -> Result<f64, ConfigError> {
        let text = self.worker_repair_share.trim();
        text.strip_suffix('%')
            .and_then(|percent| percent.trim().parse::<f64>().ok())
            .filter(|percent| *percent > 0.0 && *percent <= 100.0)
            .map(|percent| percent / 100.0)
            .ok_or_else(|| ConfigError::Malformed {
                variable: "WORKER_REPAIR_SHARE",
                reason: format!("{text:?} is not a percentage above 0% and at most 100%, like 50%"),
            })
    }

    /// `CLERK_WEBHOOK_SECRET`, split into its secrets. Whether each one decodes is for the
    /// verifier to say.
    pub fn webhook_secrets(&self) -> Result<Vec<SecretString>, ConfigError> {
        let all = required(&self.clerk_webhook_secret, "CLERK_WEBHOOK_SECRET")?;
        let secrets: Vec<SecretString> = all
            .expose_secret()
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|part| !part.is_empty())
            .map(SecretString::from)
            .collect();
        if secrets.is_empty() {
            return Err(ConfigError::Missing {
                variable: "CLERK_WEBHOOK_SECRET",
            });
        }
        Ok(secrets)
    }

    /// `WORKER_ROLES` and `WORKER_DEFAULT_ROLE`, checked to name at least one role with the
    /// default among them.
    pub fn roles(&self) -> Result<Roles, ConfigError> {
        Roles::new(
            Roles::split_list(&self.worker_roles),
            self.worker_default_role.trim(),
        )
        .map_err(|error| match error {
            RolesError::Empty => ConfigError::Malformed {
                variable: "WORKER_ROLES",
                reason: "names no role (expected e.g. admin,trainer,client)".into(),
            },
            RolesError::DefaultNotListed { .. } => ConfigError::Malformed {
                variable: "WORKER_DEFAULT_ROLE",
                reason: format!("must be one of WORKER_ROLES: {error}"),
            },
        })
    }

    /// `CLERK_SECRET_KEY`, required.
    pub fn clerk_secret_key(&self) -> Result<SecretString, ConfigError> {
        required(&self.clerk_secret_key, "CLERK_SECRET_KEY")
    }

    /// `WORKER_API_TOKEN`, when set and not blank: the on-demand sync API is on.
    pub fn worker_api_token(&self) -> Option<SecretString> {
        required(&self.worker_api_token, "WORKER_API_TOKEN").ok()
    }

    /// `INGEST_CONFIRM_TIMEOUT_MS` as a duration.
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.ingest_confirm_timeout_ms)
    }
}

/// A secret as serialized: never its value.
fn redacted<S: Serializer>(value: &Option<SecretString>, serializer: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(_) => serializer.serialize_some("[redacted]"),
        None => serializer.serialize_none(),
    }
}

fn required(
    value: &Option<SecretString>,
    variable: &'static str,
) -> Result<SecretString, ConfigError> {
    match value {
        Some(value) if !value.expose_secret().trim().is_empty() => Ok(value.clone()),
        _ => Err(ConfigError::Missing { variable }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(secret: &str) -> Settings {
        Settings {
            clerk_webhook_secret: Some(secret.into()),
            ..Settings::default()
        }
    }

    #[test]
    fn secrets_split_on_spaces_and_commas() {
        let secrets = with("whsec_a, whsec_b whsec_c")
            .webhook_secrets()
            .expect("secrets");
        let exposed: Vec<&str> = secrets.iter().map(|s| s.expose_secret()).collect();
        assert_eq!(exposed, ["whsec_a", "whsec_b", "whsec_c"]);
    }

    #[test]
    fn the_lock_timeout_is_human_readable_bounded_and_named_when_malformed() {
        let timeout = |text: &str| {
            Settings {
                worker_lock_timeout: text.into(),
                ..Settings::default()
            }
            .lock_timeout()
        };
        assert_eq!(
            Settings::default().lock_timeout().expect("default"),
            Duration::from_secs(5)
        );
        assert_eq!(
            timeout(" 250ms ").expect("250ms"),
            Duration::from_millis(250)
        );
        for bad in ["0s", "500us", "2h", "five seconds"] {
            let line = timeout(bad).expect_err(bad).to_string();
            assert!(
                line.contains("WORKER_LOCK_TIMEOUT is malformed"),
                "{bad}: {line}"
            );
        }
    }

    #[test]
    fn the_repair_share_is_a_percentage_named_when_malformed() {
        let share = |text: &str| {
            Settings {
                worker_repair_share: text.into(),
                ..Settings::default()
            }
            .repair_share()
        };
        assert_eq!(Settings::default().repair_share().expect("default"), 0.5);
        assert_eq!(share(" 25 % ").expect("25 %"), 0.25);
        assert_eq!(share("100%").expect("100%"), 1.0);
        for bad in ["0%", "150%", "0.5", "half", "-5%"] {
            let line = share(bad).expect_err(bad).to_string();
            assert!(
                line.contains("WORKER_REPAIR_SHARE is malformed"),
                "{bad}: {line}"
            );
        }
    }

    #[test]
    fn a_blank_secret_is_missing_and_named() {
        let error = with(" , ").webhook_secrets().expect_err("blank");
        assert_eq!(
            error.to_string(),
            "configuration: CLERK_WEBHOOK_SECRET is required but not set"
        );
    }

    #[test]
    fn a_malformed_amqp_url_is_named_without_its_password() {
        let settings = Settings {
            amqp_url: Some("http://user:hunter2@host".into()),
            ..Settings::default()
        };
        let line = settings.amqp_nodes().expect_err("malformed").to_string();
        assert!(
            line.starts_with("configuration: AMQP_URL is malformed"),
            "{line}"
        );
        assert!(!line.contains("hunter2"), "{line}");
    }

    #[test]
    fn a_missing_database_url_is_named() {
        let line = Settings::default()
            .database_url()
            .expect_err("missing")
            .to_string();
        assert_eq!(line, "configuration: DATABASE_URL is required but not set");
    }

    #[test]
    fn roles_come_from_the_settings_and_a_default_outside_them_is_named() {
        assert_eq!(
            Settings::default().roles().expect("roles"),
            Roles::default()
        );
        let custom = Settings {
            worker_roles: "owner, editor,viewer".into(),
            worker_default_role: "viewer".into(),
            ..Settings::default()
        };
        let roles = custom.roles().expect("roles");
        assert_eq!(roles.names(), ["owner", "editor", "viewer"]);
        assert_eq!(roles.default_role(), "viewer");
        let unlisted = Settings {
            worker_roles: "owner,editor".into(),
            ..Settings::default()
        };
        let line = unlisted.roles().expect_err("client unlisted").to_string();
        assert!(
            line.starts_with("configuration: WORKER_DEFAULT_ROLE is malformed"),
            "{line}"
        );
        let empty = Settings {
            worker_roles: " , ".into(),
            ..Settings::default()
        };
        let line = empty.roles().expect_err("no roles").to_string();
        assert!(
            line.starts_with("configuration: WORKER_ROLES is malformed"),
            "{line}"
        );
    }

    #[test]
    fn secrets_are_serialized_redacted_and_unset_ones_as_null() {
        let settings = Settings {
            clerk_webhook_secret: Some("whsec_topsecret".into()),
            amqp_url: Some("amqp://guest:hunter2@localhost".into()),
            ..Settings::default()
        };
        let value = serde_json::to_value(&settings).expect("serializable");
        assert_eq!(value["clerk_webhook_secret"], "[redacted]");
        assert_eq!(value["amqp_url"], "[redacted]");
        assert!(value["database_url"].is_null());
        let text = value.to_string();
        assert!(
            !text.contains("topsecret") && !text.contains("hunter2"),
            "{text}"
        );
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let settings = Settings {
            clerk_webhook_secret: Some("whsec_topsecret".into()),
            amqp_url: Some("amqp://guest:hunter2@localhost".into()),
            ..Settings::default()
        };
        let debug = format!("{settings:?}");
        assert!(
            !debug.contains("topsecret") && !debug.contains("hunter2"),
            "{debug}"
        );
    }
}
