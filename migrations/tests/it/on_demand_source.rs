//! The history accepts the source `on_demand` (the worker's on-demand sync API), and only the
//! known sources; `down` takes it back out.

use migrations::{Migrator, MigratorTrait};
use sea_orm_migration::sea_orm::ConnectionTrait;
use test_support::TestDatabase;

fn insert(id: &str, source: &str) -> String {
    format!(
        "INSERT INTO processed_events (svix_id, event_type, outcome, processed_at, source) \
         VALUES ('{id}', 'user.updated', 'applied', now(), '{source}')"
    )
}

#[tokio::test]
async fn the_history_accepts_on_demand_and_down_refuses_it_again() {
    let test = TestDatabase::empty().await;
    Migrator::up(&test.db, None).await.expect("up");
    for source in ["webhook", "reconcile", "replay", "on_demand"] {
        test.db
            .execute_unprepared(&insert(source, source))
            .await
            .unwrap_or_else(|e| panic!("{source}: {e}"));
    }
    assert!(
        test.db
            .execute_unprepared(&insert("x", "carrier_pigeon"))
            .await
            .is_err(),
        "an unknown source was accepted"
    );
    // Down to this migration first: those after it take nothing of the history's sources.
    let migrations: Vec<String> = Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    let this = migrations
        .iter()
        .position(|name| name == "m20261206_000001_allow_on_demand_source")
        .expect("the migration is listed");
    let after = (migrations.len() - this - 1) as u32;
    if after > 0 {
        Migrator::down(&test.db, Some(after))
            .await
            .expect("down to this migration");
    }
    // Down refuses while on_demand rows exist; without them it restores the narrower check.
    assert!(Migrator::down(&test.db, Some(1)).await.is_err());
    test.db
        .execute_unprepared("DELETE FROM processed_events WHERE source = 'on_demand'")
        .await
        .expect("delete");
    Migrator::down(&test.db, Some(1)).await.expect("down");
    assert!(
        test.db
            .execute_unprepared(&insert("later", "on_demand"))
            .await
            .is_err(),
        "on_demand accepted after down"
    );
    Migrator::up(&test.db, None).await.expect("up again");
}
