//! `fault-suite`: runs the ingest and the worker against a RabbitMQ node and a Postgres cluster
//! of its own, injects faults under a steady load of signed events, and fails unless every
//! acknowledged event was applied exactly once and nothing was dead-lettered.

use std::process::ExitCode;

use clap::Parser;
use fault_suite::suite;
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> ExitCode {
    let options = suite::Options::parse();
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(terminate) => terminate,
        Err(error) => {
            eprintln!("fault-suite: cannot handle SIGTERM: {error}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        result = suite::run(options) => match result {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(error) => {
                eprintln!("fault-suite: {error:#}");
                ExitCode::FAILURE
            }
        },
        // Dropping the suite's future kills the processes it started and removes its files.
        _ = tokio::signal::ctrl_c() => {
            eprintln!("fault-suite: interrupted, cleaning up");
            ExitCode::FAILURE
        }
        _ = terminate.recv() => {
            eprintln!("fault-suite: terminated, cleaning up");
            ExitCode::FAILURE
        }
    }
}
