//! The `ingest` service: verifies Svix-signed Clerk webhooks over their raw bytes and publishes
//! them to RabbitMQ, answering 2xx only once the broker has confirmed the message.

pub mod config;
pub mod example;
pub mod metrics;
pub mod publisher;
pub mod routes;
pub mod signature;
pub mod startup;
pub mod throttle;

pub use config::IngestConfig;
pub use startup::Application;
