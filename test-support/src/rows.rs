//! The entities of the tables the worker writes, so tests can look at them: the worker's own
//! (`worker::storage`).

pub use worker::storage::{
    membership_tombstones, organization_memberships, organization_tombstones, organizations,
    processed_events, user_tombstones, users,
};
