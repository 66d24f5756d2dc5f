//! The integration tests of `migrations`, one binary: each file of this folder is a module.

mod command;
mod online;
mod schema;
mod upgrade;
