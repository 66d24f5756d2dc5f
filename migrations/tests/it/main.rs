//! The integration tests of `migrations`, one binary: each file of this folder is a module.

mod clerk_instance;
mod command;
mod deleted_at;
mod on_demand_source;
mod online;
mod schema;
mod upgrade;
