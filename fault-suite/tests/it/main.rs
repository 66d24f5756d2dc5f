//! The integration tests of `fault-suite`, one binary: each file of this folder is a module.

mod infrastructure;
mod sender;
mod short_suite;
mod verdict;
