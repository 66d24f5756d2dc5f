//! The fault-injection suite: the whole pipeline (the real `ingest` and `worker` binaries) on a
//! RabbitMQ node and a Postgres cluster of its own, a sender that behaves like Svix, faults, and
//! a ledger to count what was lost. `main.rs` is the command line; the pieces are public so the
//! tests can exercise them one by one.

pub mod check;
pub mod cluster;
pub mod history;
pub mod rabbit;
pub mod report;
pub mod scenario;
pub mod sender;
pub mod service;
pub mod suite;
pub mod support;
