//! What the clerk-sync tests share. A dev-dependency of the other crates only: nothing here is
//! ever part of a shipped binary.

pub mod clerk_api;
