//! The `users` rows the bench writes without the worker (the floor, the baseline, the route
//! handler): the columns and values the worker writes for the same user object, mapped by the
//! same code (`shared::events`), so that every comparison writes the same rows.

use sea_orm::Value;
use shared::Roles;
use shared::events::{ClerkUser, UserRecord};

/// The columns of `users` a user event writes, `synced_at` last.
pub(crate) const COLUMNS: &str = "id, email, first_name, last_name, role, phone, username, image_url, \
     external_id, public_metadata, private_metadata, last_sign_in_at, clerk_data, created_at, \
     updated_at, synced_at";

/// Parameters per row: every column but `synced_at`, which is `now()`.
pub(crate) const PARAMETERS: usize = 15;

/// The worker's conflict rule: every column but the id replaced, only over an older version.
pub(crate) const UPSERT_TAIL: &str = "ON CONFLICT (id) DO UPDATE SET \
     email = excluded.email, first_name = excluded.first_name, last_name = excluded.last_name, \
     role = excluded.role, phone = excluded.phone, username = excluded.username, \
     image_url = excluded.image_url, external_id = excluded.external_id, \
     public_metadata = excluded.public_metadata, private_metadata = excluded.private_metadata, \
     last_sign_in_at = excluded.last_sign_in_at, clerk_data = excluded.clerk_data, \
     created_at = excluded.created_at, updated_at = excluded.updated_at, \
     synced_at = excluded.synced_at \
     WHERE users.updated_at < excluded.updated_at";

/// A Clerk user object as the worker's row, with the default roles.
pub(crate) fn record(user: serde_json::Value) -> anyhow::Result<UserRecord> {
    Ok(ClerkUser::from_data(user)?.to_record(&Roles::default())?)
}

/// The row's parameters, in the order of [`COLUMNS`].
pub(crate) fn values(record: UserRecord) -> [Value; PARAMETERS] {
    [
        record.id.into(),
        record.email.into(),
        record.first_name.into(),
        record.last_name.into(),
        record.role.into(),
        record.phone.into(),
        record.username.into(),
        record.image_url.into(),
        record.external_id.into(),
        record.public_metadata.into(),
        record.private_metadata.into(),
        record.last_sign_in_at.into(),
        Some(record.clerk_data).into(),
        record.created_at.into(),
        record.updated_at.into(),
    ]
}

/// `($k+1, …, $k+15, now())`: a row's placeholders, its first parameter the one after `k`.
pub(crate) fn placeholders(k: usize) -> String {
    let mut row = String::from("(");
    for p in k + 1..=k + PARAMETERS {
        row.push_str(&format!("${p}, "));
    }
    row.push_str("now())");
    row
}
