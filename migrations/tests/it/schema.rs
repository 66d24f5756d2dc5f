//! The migrations against a real Postgres: each test gets a database of its own, dropped with it.

use migrations::{Migrator, MigratorTrait};
use sea_orm_migration::sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement,
};
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
    for table in [
        "users",
        "user_tombstones",
        "processed_events",
        "reconcile_runs",
        "organizations",
        "organization_memberships",
        "organization_tombstones",
        "membership_tombstones",
    ] {
        test.db
            .execute_unprepared(&format!("SELECT 1 FROM {table}"))
            .await
            .unwrap_or_else(|e| panic!("{table} missing after up: {e}"));
    }
    Migrator::down(&test.db, None).await.expect("down");
    for table in ["users", "organization_memberships", "reconcile_runs"] {
        assert!(
            test.db
                .execute_unprepared(&format!("SELECT 1 FROM {table}"))
                .await
                .is_err(),
            "{table} still there after down"
        );
    }
    // And up again, as `fresh` would.
    Migrator::up(&test.db, None).await.expect("up after down");
}

#[tokio::test]
async fn users_reject_a_taken_email_but_allow_many_null_emails_and_any_role() {
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
    // Roles are the worker's setting, not the schema's.
    insert_user(&test.db, "u5", None, "owner")
        .await
        .expect("a role outside the seed's three");
    assert!(
        test.db
            .execute_unprepared(
                "INSERT INTO users (id, created_at, updated_at, synced_at) \
                 VALUES ('u6', now(), now(), now())",
            )
            .await
            .is_err(),
        "a user without a role was stored: the schema has no default role any more"
    );
}

#[tokio::test]
async fn the_profile_columns_hold_json_and_external_id_is_indexed() {
    let test = TestDatabase::empty().await;
    Migrator::up(&test.db, None).await.expect("up");
    test.db
        .execute_unprepared(
            "INSERT INTO users (id, role, created_at, updated_at, synced_at, username, image_url, \
               external_id, public_metadata, private_metadata, last_sign_in_at, clerk_data) \
             VALUES ('u1', 'client', now(), now(), now(), 'name', 'https://img', 'ext-1', \
               '{\"plan\": \"pro\"}', NULL, now(), '{\"id\": \"u1\", \"locale\": \"fr\"}')",
        )
        .await
        .expect("insert with every new column");
    let row = test
        .db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT public_metadata->>'plan' AS plan, clerk_data->>'locale' AS locale \
             FROM users WHERE external_id = 'ext-1'",
        ))
        .await
        .expect("query")
        .expect("row");
    assert_eq!(row.try_get::<String>("", "plan").expect("plan"), "pro");
    assert_eq!(row.try_get::<String>("", "locale").expect("locale"), "fr");
    let indexed = test
        .db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT indexdef FROM pg_indexes \
             WHERE tablename = 'users' AND indexname = 'users_external_id_idx'",
        ))
        .await
        .expect("pg_indexes")
        .expect("external_id index");
    let definition: String = indexed.try_get("", "indexdef").expect("indexdef");
    assert!(definition.contains("(external_id)"), "{definition}");
}

#[tokio::test]
async fn down_of_the_role_and_profile_migrations_restores_the_seed_schema() {
    // How many `down` steps undo the role migration, and the profile columns one before it,
    // whatever migrations were added after them.
    let names: Vec<String> = Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    let role_check = names
        .iter()
        .position(|name| name == "m20261130_000002_drop_users_role_check")
        .expect("the role migration is listed");
    assert_eq!(
        names[role_check - 1],
        "m20261130_000001_add_user_profile_columns",
        "the profile columns come just before"
    );
    let through_role_check = u32::try_from(names.len() - role_check).expect("a few migrations");

    let test = TestDatabase::empty().await;
    Migrator::up(&test.db, None).await.expect("up");
    insert_user(&test.db, "u1", None, "owner")
        .await
        .expect("owner");
    assert!(
        Migrator::down(&test.db, Some(through_role_check))
            .await
            .is_err(),
        "the seed's role check came back over a row it rejects"
    );
    Migrator::up(&test.db, None)
        .await
        .expect("up again after the refused down");
    test.db
        .execute_unprepared("DELETE FROM users")
        .await
        .expect("delete");
    Migrator::down(&test.db, Some(through_role_check + 1))
        .await
        .expect("down through the profile columns");
    assert!(
        insert_user(&test.db, "u2", None, "owner").await.is_err(),
        "the role check is back"
    );
    assert!(
        test.db
            .execute_unprepared("SELECT clerk_data FROM users")
            .await
            .is_err(),
        "clerk_data still there after down"
    );
    test.db
        .execute_unprepared(
            "INSERT INTO users (id, created_at, updated_at, synced_at) VALUES ('u3', now(), now(), now())",
        )
        .await
        .expect("the role default is back");
    Migrator::up(&test.db, None).await.expect("up again");
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

#[tokio::test]
async fn processed_at_is_indexed_for_pruning_and_the_index_goes_with_down() {
    use sea_orm_migration::sea_orm::{DbBackend, Statement};
    let test = TestDatabase::empty().await;
    Migrator::up(&test.db, None).await.expect("up");
    let definition = |db: DatabaseConnection| async move {
        db.query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT indexdef FROM pg_indexes \
             WHERE indexname = 'processed_events_processed_at_idx'",
        ))
        .await
        .expect("pg_indexes")
        .map(|row| row.try_get::<String>("", "indexdef").expect("indexdef"))
    };
    let index = definition(test.db.clone()).await.expect("index after up");
    assert!(index.contains("(processed_at)"), "{index}");
    // Down to just before this migration, whatever came after it.
    let names: Vec<String> = Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    let at = names
        .iter()
        .position(|name| name == "m20261130_000003_index_processed_events_processed_at")
        .expect("the index migration");
    let steps = u32::try_from(names.len() - at).expect("few migrations");
    Migrator::down(&test.db, Some(steps))
        .await
        .expect("down past the index");
    test.db
        .execute_unprepared("SELECT 1 FROM processed_events")
        .await
        .expect("the table stays");
    assert_eq!(definition(test.db.clone()).await, None, "index after down");
}

#[tokio::test]
async fn memberships_are_unique_per_member_and_organization_slugs_are_not_unique() {
    let test = TestDatabase::empty().await;
    Migrator::up(&test.db, None).await.expect("up");
    let organization = |id: &str, slug: &str| {
        format!(
            "INSERT INTO organizations (id, name, slug, clerk_data, created_at, updated_at, \
               synced_at) VALUES ('{id}', 'N', {slug}, '{{}}', now(), now(), now())"
        )
    };
    for (id, slug) in [
        ("o1", "'same'"),
        ("o2", "'same'"),
        ("o3", "NULL"),
        ("o4", "NULL"),
    ] {
        test.db
            .execute_unprepared(&organization(id, slug))
            .await
            .unwrap_or_else(|e| panic!("organization {id}: {e}"));
    }
    let membership = |id: &str, organization: &str, user: &str| {
        format!(
            "INSERT INTO organization_memberships (id, organization_id, user_id, role, \
               clerk_data, created_at, updated_at, synced_at) \
             VALUES ('{id}', '{organization}', '{user}', 'org:member', '{{}}', now(), now(), now())"
        )
    };
    // No foreign keys: neither the organization nor the user has to exist.
    test.db
        .execute_unprepared(&membership("m1", "o_missing", "u1"))
        .await
        .expect("a membership before its organization and user");
    test.db
        .execute_unprepared(&membership("m2", "o_missing", "u2"))
        .await
        .expect("another member");
    assert!(
        test.db
            .execute_unprepared(&membership("m3", "o_missing", "u1"))
            .await
            .is_err(),
        "a second membership for one member of one organization"
    );
}
