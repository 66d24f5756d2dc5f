//! The integration tests of `ingest`, one binary: each file of this folder is a module.

mod body_budget;
mod broker_outage;
mod cli;
mod fuzz_verification;
mod shutdown;
mod unstorable_strings;
mod webhooks;
