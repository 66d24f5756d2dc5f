//! What the clerk-sync binaries agree on: the event types (users in `events`, organizations and
//! memberships in `organizations`), the header names, the RabbitMQ topology, configuration,
//! telemetry, the text tables of the command-line tools, `json`, which reads JSON of any depth, and
//! `sanitize`, which makes JSON text storable in Postgres. Nothing here talks to a database.

pub mod backoff;
pub mod broker;
pub mod config;
pub mod events;
pub mod headers;
pub mod json;
pub mod organizations;
pub mod roles;
pub mod sanitize;
pub mod table;
pub mod telemetry;
pub mod topology;
pub mod trace_context;

pub use backoff::Backoff;
pub use broker::AmqpNodes;
pub use config::{ConfigError, Settings};
pub use roles::Roles;
pub use topology::Topology;
