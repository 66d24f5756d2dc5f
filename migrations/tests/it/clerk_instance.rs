//! `clerk_instance`: one row at most, and a database that synced before it takes its pin from
//! its event history. Each test gets a database of its own, dropped with it.

use migrations::{Migrator, MigratorTrait};
use sea_orm_migration::sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use test_support::TestDatabase;

const MIGRATION: &str = "m20261206_000030_create_clerk_instance";

/// Applies every migration before the one that creates `clerk_instance`.
async fn up_to_before_the_pin(db: &DatabaseConnection) {
    let before = Migrator::migrations()
        .iter()
        .position(|m| m.name() == MIGRATION)
        .expect("the migration is listed");
    Migrator::up(db, Some(u32::try_from(before).expect("a few")))
        .await
        .expect("up to before the pin");
}

async fn record_webhook(db: &DatabaseConnection, svix_id: &str, instance: Option<&str>) {
    let payload = match instance {
        Some(id) => format!(r#"{{"type":"user.updated","instance_id":"{id}","data":{{}}}}"#),
        None => r#"{"type":"user.updated","data":{}}"#.to_owned(),
    };
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO processed_events (svix_id, event_type, outcome, processed_at, source, \
         payload) VALUES ($1, 'user.updated', 'applied', now(), 'webhook', $2::jsonb)",
        [svix_id.into(), payload.into()],
    ))
    .await
    .expect("history row");
}

async fn pinned(db: &DatabaseConnection) -> Option<(String, String)> {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT id, pinned_by FROM clerk_instance",
        ))
        .await
        .expect("read");
    row.map(|row| {
        (
            row.try_get("", "id").expect("id"),
            row.try_get("", "pinned_by").expect("pinned_by"),
        )
    })
}

#[tokio::test]
async fn the_table_holds_one_instance_at_most() {
    let test = TestDatabase::empty().await;
    Migrator::up(&test.db, None).await.expect("up");
    assert_eq!(
        pinned(&test.db).await,
        None,
        "an empty history pins nothing"
    );
    let insert = |id: &str| {
        format!(
            "INSERT INTO clerk_instance (id, pinned_at, pinned_by) VALUES ('{id}', now(), \
             'webhook')"
        )
    };
    test.db
        .execute_unprepared(&insert("ins_a"))
        .await
        .expect("the first");
    assert!(test.db.execute_unprepared(&insert("ins_b")).await.is_err());
    assert!(
        test.db
            .execute_unprepared(
                "INSERT INTO clerk_instance (singleton, id, pinned_at, pinned_by) \
                 VALUES (false, 'ins_c', now(), 'webhook')"
            )
            .await
            .is_err(),
        "the key is always true"
    );
    // Down through this migration, whatever was added after it.
    let names: Vec<String> = Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    let from_the_end = names.len()
        - names
            .iter()
            .position(|name| name == MIGRATION)
            .expect("listed");
    Migrator::down(&test.db, Some(u32::try_from(from_the_end).expect("a few")))
        .await
        .expect("down");
    assert!(
        test.db
            .execute_unprepared("SELECT 1 FROM clerk_instance")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_history_of_one_instance_pins_it() {
    let test = TestDatabase::empty().await;
    up_to_before_the_pin(&test.db).await;
    record_webhook(&test.db, "msg_1", Some("ins_live")).await;
    record_webhook(&test.db, "msg_2", None).await;
    record_webhook(&test.db, "msg_3", Some("ins_live")).await;

    Migrator::up(&test.db, None).await.expect("up");

    assert_eq!(
        pinned(&test.db).await,
        Some(("ins_live".to_owned(), "history".to_owned()))
    );
}

#[tokio::test]
async fn a_history_of_two_instances_pins_neither() {
    let test = TestDatabase::empty().await;
    up_to_before_the_pin(&test.db).await;
    record_webhook(&test.db, "msg_1", Some("ins_live")).await;
    record_webhook(&test.db, "msg_2", Some("ins_test")).await;

    Migrator::up(&test.db, None).await.expect("up");

    assert_eq!(pinned(&test.db).await, None);
}
