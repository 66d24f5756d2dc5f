//! A database of the test's own on the shared Postgres, dropped (with its sessions) on drop.

use migrations::{Migrator, MigratorTrait};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};

use crate::services::{database_url, with_database};

/// A fresh database. Dropped, it drops the database, even when the test failed.
pub struct TestDatabase {
    /// The database's name, unique to this test.
    pub name: String,
    /// Its URL, for a service under test or a command.
    pub url: String,
    /// A small pool on it, for the test's own reads and writes.
    pub db: DatabaseConnection,
    /// The server's URL it was created from, to drop it again.
    admin_url: String,
}

impl TestDatabase {
    /// A fresh database with every migration applied.
    pub async fn migrated() -> Self {
        let database = Self::empty().await;
        Migrator::up(&database.db, None)
            .await
            .expect("migrations apply");
        database
    }

    /// A fresh database without any table.
    pub async fn empty() -> Self {
        Self::empty_on(&database_url()).await
    }

    /// A fresh database without any table on the server of `admin_url` (a database URL of
    /// that server): a private cluster rather than the shared Postgres.
    pub async fn empty_on(admin_url: &str) -> Self {
        let admin = Database::connect(admin_url)
            .await
            .expect("the test Postgres is reachable at DATABASE_URL");
        let name = format!("test_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute_unprepared(&format!(r#"CREATE DATABASE "{name}""#))
            .await
            .expect("create the test database");
        let _ = admin.close().await;
        let url = with_database(admin_url, &name);
        let mut options = ConnectOptions::new(url.as_str());
        options.sqlx_logging(false).max_connections(4);
        let db = Database::connect(options)
            .await
            .expect("connect to the test database");
        Self {
            name,
            url,
            db,
            admin_url: admin_url.to_owned(),
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin_url = self.admin_url.clone();
        let dropped = crate::block_on_own_runtime(async move {
            let admin = Database::connect(admin_url.as_str())
                .await
                .expect("admin connection");
            // FORCE ends the sessions a stopped (or crashed) service left behind.
            admin
                .execute_unprepared(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
                .await
                .expect("drop the test database");
            let _ = admin.close().await;
        });
        if dropped.is_err() && !std::thread::panicking() {
            panic!("dropping the test database {} failed", self.name);
        }
    }
}
