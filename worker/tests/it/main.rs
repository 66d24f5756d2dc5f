//! The integration tests of `worker`, one binary: each file of this folder is a module.

mod apply_batch;
mod apply_rules;
mod batching;
mod blocked_broker;
mod broker_outage;
mod convergence;
mod dlq_cli;
mod doctor;
mod failures;
mod history;
mod history_explain;
mod history_replay;
mod lock_timeout;
mod organizations;
mod pipeline_health;
mod process;
mod pruning;
mod reconcile;
mod tracing;
mod tracing_stalled;
mod unstorable_strings;
mod waiting_at_start;
