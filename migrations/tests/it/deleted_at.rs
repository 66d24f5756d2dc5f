//! `m20261206_000040_add_deleted_at` against a real Postgres: kept rows never block live ones,
//! the views show the live rows, and `down` refuses while kept rows exist, then restores the
//! full unique rules.

use migrations::{Migrator, MigratorTrait};
use sea_orm_migration::sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement,
};
use test_support::TestDatabase;

const MIGRATION: &str = "m20261206_000040_add_deleted_at";

async fn insert_user(
    db: &DatabaseConnection,
    id: &str,
    email: &str,
    deleted: bool,
) -> Result<(), DbErr> {
    let deleted_at = if deleted { "now()" } else { "NULL" };
    db.execute_unprepared(&format!(
        "INSERT INTO users (id, email, role, created_at, updated_at, synced_at, deleted_at) \
         VALUES ('{id}', '{email}', 'client', now(), now(), now(), {deleted_at})"
    ))
    .await
    .map(|_| ())
}

async fn insert_membership(db: &DatabaseConnection, id: &str, deleted: bool) -> Result<(), DbErr> {
    let deleted_at = if deleted { "now()" } else { "NULL" };
    db.execute_unprepared(&format!(
        "INSERT INTO organization_memberships (id, organization_id, user_id, role, clerk_data, \
           created_at, updated_at, synced_at, deleted_at) \
         VALUES ('{id}', 'org_1', 'user_1', 'org:member', '{{}}', now(), now(), now(), \
           {deleted_at})"
    ))
    .await
    .map(|_| ())
}

async fn ids(db: &DatabaseConnection, view: &str) -> Vec<String> {
    db.query_all_raw(Statement::from_string(
        DbBackend::Postgres,
        format!("SELECT id FROM {view} ORDER BY id"),
    ))
    .await
    .expect(view)
    .into_iter()
    .map(|row| row.try_get("", "id").expect("id"))
    .collect()
}

/// How many `down` steps undo this migration, whatever migrations come after it.
fn steps_through_this() -> u32 {
    let names: Vec<String> = Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    let at = names
        .iter()
        .position(|name| name == MIGRATION)
        .expect("the migration is listed");
    u32::try_from(names.len() - at).expect("a few migrations")
}

#[tokio::test]
async fn kept_rows_block_no_live_row_and_the_views_show_the_live_ones() {
    let test = TestDatabase::empty().await;
    Migrator::up(&test.db, None).await.expect("up");
    insert_user(&test.db, "user_old", "ada@example.org", true)
        .await
        .expect("a kept user");
    insert_user(&test.db, "user_new", "ada@example.org", false)
        .await
        .expect("a live user with the kept user's email");
    assert!(
        insert_user(&test.db, "user_twin", "ada@example.org", false)
            .await
            .is_err(),
        "two live users with one email"
    );
    insert_membership(&test.db, "orgmem_old", true)
        .await
        .expect("a kept membership");
    insert_membership(&test.db, "orgmem_new", false)
        .await
        .expect("a live membership of the same member");
    assert!(
        insert_membership(&test.db, "orgmem_twin", false)
            .await
            .is_err(),
        "two live memberships of one member"
    );
    assert_eq!(ids(&test.db, "live_users").await, ["user_new"]);
    assert_eq!(
        ids(&test.db, "live_organization_memberships").await,
        ["orgmem_new"]
    );
    assert_eq!(
        ids(&test.db, "live_organizations").await,
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn down_refuses_while_rows_are_kept_and_then_restores_the_full_unique_rules() {
    let test = TestDatabase::empty().await;
    Migrator::up(&test.db, None).await.expect("up");
    insert_user(&test.db, "user_old", "ada@example.org", true)
        .await
        .expect("kept");
    insert_user(&test.db, "user_new", "ada@example.org", false)
        .await
        .expect("live");
    let error = Migrator::down(&test.db, Some(steps_through_this()))
        .await
        .expect_err("kept rows");
    assert!(
        error.to_string().contains("kept after their deletion"),
        "{error}"
    );
    assert_eq!(
        ids(&test.db, "live_users").await,
        ["user_new"],
        "nothing undone"
    );

    test.db
        .execute_unprepared("DELETE FROM users WHERE deleted_at IS NOT NULL")
        .await
        .expect("delete the kept rows");
    Migrator::down(&test.db, Some(steps_through_this()))
        .await
        .expect("down");
    let twin = test
        .db
        .execute_unprepared(
            "INSERT INTO users (id, email, role, created_at, updated_at, synced_at) \
             VALUES ('user_twin', 'ada@example.org', 'client', now(), now(), now())",
        )
        .await;
    assert!(twin.is_err(), "the email is unique again");
    let views = test
        .db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT count(*) AS n FROM pg_views WHERE viewname LIKE 'live_%'",
        ))
        .await
        .expect("views")
        .expect("a count")
        .try_get::<i64>("", "n")
        .expect("n");
    assert_eq!(views, 0);
    Migrator::up(&test.db, None).await.expect("up again");
    assert_eq!(ids(&test.db, "live_users").await, ["user_new"]);
}
