//! The integration tests of `migrations`, one binary: each file of this folder is a module.

mod command;
mod deleted_at;
mod online;
mod schema;
mod upgrade;
