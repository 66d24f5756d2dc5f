//! The integration tests of `shared`, one binary: each file of this folder is a module.

mod configuration_reference;
mod nodes;
mod parsing_never_panics;
mod topology;
