//! The migrations against a real Postgres: each test gets a database of its own, dropped with it.

use migrations::{Migrator, MigratorTrait};
use sea_orm_migration::sea_orm::{ConnectionTrait, DatabaseConnection, DbErr};
use test_support::TestDatabase;

async fn insert_user(
    db: &DatabaseConnection,
    id: &str,
    email: Option<&str>,
    role: &str,
) -> Result<(), DbErr> {
    let email = email.map_or("NULL".to_owned(), |e| format!("'{e}'"));
    db.execute_unprepared(&format!(
        "INSERT INTO users (id, email, role, created_at, updated_at, synced_at) \
         VALUES ('{id}', {email}, '{role}', now(), now(), now())"
    ))
    .await
    .map(|_| ())
}

#[tokio::test]
async fn up_creates_the_tables_and_down_removes_them_again() {
    let test = TestDatabase::empty().await;
    Migrator::up(&test.db, None).await.expect("up");
    for table in ["users", "user_tombstones", "processed_events"] {
        test.db
            .execute_unprepared(&format!("SELECT 1 FROM {table}"))
            .await
            .unwrap_or_else(|e| panic!("{table} missing after up: {e}"));
    }
    Migrator::down(&test.db, None).await.expect("down");
    assert!(
        test.db
            .execute_unprepared("SELECT 1 FROM users")
            .await
            .is_err(),
        "users still there after down"
    );
    // And up again, as `fresh` would.
    Migrator::up(&test.db, None).await.expect("up after down");
}

#[tokio::test]
async fn users_reject_an_unknown_role_and_a_taken_email_but_allow_many_null_emails() {
    let test = TestDatabase::empty().await;
    Migrator::up(&test.db, None).await.expect("up");
    insert_user(&test.db, "u1", Some("a@example.org"), "admin")
        .await
        .expect("admin");
    insert_user(&test.db, "u2", None, "trainer")
        .await
        .expect("first null email");
    insert_user(&test.db, "u3", None, "client")
        .await
        .expect("second null email");
    assert!(
        insert_user(&test.db, "u4", Some("a@example.org"), "client")
            .await
            .is_err(),
        "a second user took a taken email"
    );
    assert!(
        insert_user(&test.db, "u5", None, "superuser")
            .await
            .is_err(),
        "an unknown role was accepted"
    );
    test.db
        .execute_unprepared(
            "INSERT INTO users (id, created_at, updated_at, synced_at) VALUES ('u6', now(), now(), now())",
        )
        .await
        .expect("role defaults");
}

#[tokio::test]
async fn processed_events_accept_only_the_known_outcomes() {
    let test = TestDatabase::empty().await;
    Migrator::up(&test.db, None).await.expect("up");
    let insert = |id: &str, outcome: &str| {
        format!(
            "INSERT INTO processed_events (svix_id, event_type, outcome, processed_at) \
             VALUES ('{id}', 'user.created', '{outcome}', now())"
        )
    };
    for (id, outcome) in [("a", "applied"), ("b", "stale"), ("c", "ignored")] {
        test.db
            .execute_unprepared(&insert(id, outcome))
            .await
            .expect(outcome);
    }
    assert!(
        test.db
            .execute_unprepared(&insert("d", "done"))
            .await
            .is_err()
    );
}
