//! `processed_events` becomes the event history: besides the svix-id (still the one place for
//! deduplication), each row keeps what the event concerned (`subject_kind`, `subject_id`), the
//! raw payload (null when `WORKER_STORE_PAYLOADS=false`), the svix timestamp, when the ingest
//! received it, where it came from (`source`) and why it ended as it did (`reason`). A delete
//! that took effect is now recorded as `deleted`. `processed_at` stays the time it was applied.
//!
//! Locks, on `processed_events` (the largest table), outside a transaction, step by step:
//! 1. adding the columns: ACCESS EXCLUSIVE for a moment (no rewrite: the one default is a
//!    constant);
//! 2. each check constraint: ACCESS EXCLUSIVE for a moment to add it `NOT VALID`, then a full
//!    scan under SHARE UPDATE EXCLUSIVE to validate it (reads and writes go on);
//! 3. the subject index: built `CONCURRENTLY`, SHARE UPDATE EXCLUSIVE for the build (reads and
//!    writes go on).
//!
//! Each step waits at most `WORKER_LOCK_TIMEOUT` for its lock and can be run again, so a retry
//! after a lock timeout or an interruption finishes the job. First written as one transaction
//! (ACCESS EXCLUSIVE for the whole migration, two scans and the index build included); the
//! schema it leaves is the same.

use sea_orm_migration::prelude::*;

use crate::online::{add_check, create_index_concurrently};

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

const SUBJECT_INDEX: &str = "processed_events_subject_idx";

/// The check constraints this migration adds (`processed_events_outcome_check` replaces the one
/// of `m20261127_000003_create_processed_events`).
const CHECKS: [(&str, &str); 3] = [
    (
        "processed_events_outcome_check",
        "outcome IN ('applied', 'stale', 'ignored', 'deleted')",
    ),
    (
        "processed_events_source_check",
        "source IN ('webhook', 'reconcile', 'replay')",
    ),
    (
        "processed_events_subject_kind_check",
        "subject_kind IN ('user', 'organization', 'membership')",
    ),
];

const OUTCOMES_WITHOUT_DELETED: &str = "\
UPDATE processed_events SET outcome = 'applied' WHERE outcome = 'deleted'; \
ALTER TABLE processed_events DROP CONSTRAINT processed_events_outcome_check, \
  ADD CONSTRAINT processed_events_outcome_check \
    CHECK (outcome IN ('applied', 'stale', 'ignored'))";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    /// Step by step, each step committed on its own: see the module comment.
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(ProcessedEvents::Table)
                    .add_column_if_not_exists(
                        ColumnDef::new(ProcessedEvents::Source)
                            .text()
                            .not_null()
                            .default("webhook"),
                    )
                    .add_column_if_not_exists(
                        ColumnDef::new(ProcessedEvents::SubjectKind).text().null(),
                    )
                    .add_column_if_not_exists(
                        ColumnDef::new(ProcessedEvents::SubjectId).text().null(),
                    )
                    .add_column_if_not_exists(
                        ColumnDef::new(ProcessedEvents::Payload)
                            .json_binary()
                            .null(),
                    )
                    .add_column_if_not_exists(
                        ColumnDef::new(ProcessedEvents::SvixTimestamp)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .add_column_if_not_exists(
                        ColumnDef::new(ProcessedEvents::ReceivedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .add_column_if_not_exists(ColumnDef::new(ProcessedEvents::Reason).text().null())
                    .to_owned(),
            )
            .await?;
        for (name, check) in CHECKS {
            add_check(manager, "processed_events", name, check).await?;
        }
        // "By subject" in time order; "by time" is `processed_events_processed_at_idx`.
        create_index_concurrently(
            manager,
            SUBJECT_INDEX,
            "processed_events",
            &["subject_id", "processed_at"],
        )
        .await
    }

    /// In one transaction of its own (ACCESS EXCLUSIVE on `processed_events` until it commits):
    /// rolling back is an operator's deliberate step, not an online one.
    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let manager = manager.begin().await?;
        manager
            .drop_index(
                Index::drop()
                    .name(SUBJECT_INDEX)
                    .table(ProcessedEvents::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .get_connection()
            .execute_unprepared(OUTCOMES_WITHOUT_DELETED)
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(ProcessedEvents::Table)
                    .drop_column(ProcessedEvents::Source)
                    .drop_column(ProcessedEvents::SubjectKind)
                    .drop_column(ProcessedEvents::SubjectId)
                    .drop_column(ProcessedEvents::Payload)
                    .drop_column(ProcessedEvents::SvixTimestamp)
                    .drop_column(ProcessedEvents::ReceivedAt)
                    .drop_column(ProcessedEvents::Reason)
                    .to_owned(),
            )
            .await?;
        manager.commit().await
    }
}

#[derive(DeriveIden)]
enum ProcessedEvents {
    Table,
    Source,
    SubjectKind,
    SubjectId,
    Payload,
    SvixTimestamp,
    ReceivedAt,
    Reason,
}
