//! The integration tests of `migrations`, one binary: each file of this folder is a module.

mod command;
mod deleted_at;
mod on_demand_source;
mod online;
mod schema;
mod upgrade;
