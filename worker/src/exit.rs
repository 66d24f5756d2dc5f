//! The exit codes of the `worker` binary, so scripts can tell the stops that need a person
//! from other failures:
//! - 0: done;
//! - 1: failed (the message says why);
//! - 2: the command line was not understood (clap);
//! - [`WRONG_INSTANCE`] (3): `worker reconcile` stopped before its first listing because
//!   `CLERK_SECRET_KEY` belongs to another Clerk instance than the one the database mirrors;
//! - [`RECONCILE_RUNNING`] (4): `worker reconcile` did nothing because another reconcile (a
//!   command or a worker's scheduled run) holds the reconcile lock.

use std::process::ExitCode;

use crate::reconcile::instance::WrongInstance;
use crate::reconcile::lock::AnotherRunHoldsTheLock;

/// `worker reconcile` with a key of another instance.
pub const WRONG_INSTANCE: u8 = 3;

/// `worker reconcile` while another reconcile runs.
pub const RECONCILE_RUNNING: u8 = 4;

/// The exit code of a command that failed with `error`.
pub fn code(error: &anyhow::Error) -> ExitCode {
    if error.downcast_ref::<WrongInstance>().is_some() {
        ExitCode::from(WRONG_INSTANCE)
    } else if error.downcast_ref::<AnotherRunHoldsTheLock>().is_some() {
        ExitCode::from(RECONCILE_RUNNING)
    } else {
        ExitCode::FAILURE
    }
}
