//! Migrations (to be written).
