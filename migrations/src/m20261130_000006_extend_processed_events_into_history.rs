//! `processed_events` becomes the event history: besides the svix-id (still the one place for
//! deduplication), each row keeps what the event concerned (`subject_kind`, `subject_id`), the
//! raw payload (null when `WORKER_STORE_PAYLOADS=false`), the svix timestamp, when the ingest
//! received it, where it came from (`source`) and why it ended as it did (`reason`). A delete
//! that took effect is now recorded as `deleted`. `processed_at` stays the time it was applied.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const SUBJECT_INDEX: &str = "processed_events_subject_idx";

/// Raw SQL for the check constraints: sea-query's `ALTER TABLE` adds and drops columns, not
/// constraints.
const OUTCOMES_WITH_DELETED: &str = "\
ALTER TABLE processed_events DROP CONSTRAINT IF EXISTS processed_events_outcome_check, \
  ADD CONSTRAINT processed_events_outcome_check \
    CHECK (outcome IN ('applied', 'stale', 'ignored', 'deleted')), \
  ADD CONSTRAINT processed_events_source_check \
    CHECK (source IN ('webhook', 'reconcile', 'replay')), \
  ADD CONSTRAINT processed_events_subject_kind_check \
    CHECK (subject_kind IN ('user', 'organization', 'membership'))";

const OUTCOMES_WITHOUT_DELETED: &str = "\
UPDATE processed_events SET outcome = 'applied' WHERE outcome = 'deleted'; \
ALTER TABLE processed_events DROP CONSTRAINT processed_events_outcome_check, \
  ADD CONSTRAINT processed_events_outcome_check \
    CHECK (outcome IN ('applied', 'stale', 'ignored'))";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(ProcessedEvents::Table)
                    .add_column(
                        ColumnDef::new(ProcessedEvents::Source)
                            .text()
                            .not_null()
                            .default("webhook"),
                    )
                    .add_column(ColumnDef::new(ProcessedEvents::SubjectKind).text().null())
                    .add_column(ColumnDef::new(ProcessedEvents::SubjectId).text().null())
                    .add_column(
                        ColumnDef::new(ProcessedEvents::Payload)
                            .json_binary()
                            .null(),
                    )
                    .add_column(
                        ColumnDef::new(ProcessedEvents::SvixTimestamp)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .add_column(
                        ColumnDef::new(ProcessedEvents::ReceivedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .add_column(ColumnDef::new(ProcessedEvents::Reason).text().null())
                    .to_owned(),
            )
            .await?;
        manager
            .get_connection()
            .execute_unprepared(OUTCOMES_WITH_DELETED)
            .await?;
        // "By subject" in time order; "by time" is `processed_events_processed_at_idx`.
        manager
            .create_index(
                Index::create()
                    .name(SUBJECT_INDEX)
                    .table(ProcessedEvents::Table)
                    .col(ProcessedEvents::SubjectId)
                    .col(ProcessedEvents::ProcessedAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
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
            .await
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
    ProcessedAt,
}
