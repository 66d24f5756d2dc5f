//! The integration tests of `dlq`, one binary: each file of this folder is a module.

mod common;
mod end_to_end;
mod inspect;
mod replay;
