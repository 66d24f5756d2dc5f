//! `worker instance show|move`: the Clerk instance this database mirrors (`crate::pin`), and a
//! deliberate move to another one. What the pin is and what it refuses: docs/instance.md.

use std::io::Write as _;

use anyhow::Context as _;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};

pub use crate::pin::{PinnedInstance, pinned_instance, show};

/// `worker instance show|move`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum InstanceCommand {
    /// Show the Clerk instance this database mirrors.
    Show {
        /// Print one JSON object (`null` when nothing is pinned yet).
        #[arg(long)]
        json: bool,
    },
    /// Make this database mirror another Clerk instance from now on. Says what it will do;
    /// changes nothing without --yes.
    Move {
        /// The instance to follow (`ins_…`, `GET /v1/instance`'s `id`, the `instance_id` of its
        /// webhook events).
        #[arg(long, value_name = "INSTANCE_ID")]
        to: String,
        /// Do it.
        #[arg(long)]
        yes: bool,
    },
}

/// Runs `worker instance …` with the process's stdout.
pub async fn execute(settings: &shared::Settings, command: InstanceCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    match command {
        InstanceCommand::Show { json } => {
            let db = crate::commands::connect_reader(settings, 1).await?;
            let pinned = pinned_instance(&db).await;
            db.close().await.ok();
            let pinned = pinned.context("cannot read the pinned Clerk instance")?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&pinned)?)?;
            } else {
                writeln!(out, "{}", show(pinned.as_ref()))?;
            }
            Ok(())
        }
        InstanceCommand::Move { to, yes } => {
            let to = to.trim().to_owned();
            if !to.starts_with("ins_") || to.len() <= "ins_".len() {
                anyhow::bail!(
                    "--to {to:?} is not a Clerk instance id (ins_…): read it from `GET \
                     /v1/instance` or from the instance_id of the instance's webhook events"
                );
            }
            let db = crate::commands::connect_command(settings, 1).await?;
            let result = move_to(&db, &to, yes, &mut out).await;
            db.close().await.ok();
            result
        }
    }
}

async fn move_to(
    db: &DatabaseConnection,
    to: &str,
    yes: bool,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let pinned = pinned_instance(db)
        .await
        .context("cannot read the pinned Clerk instance")?;
    if pinned.as_ref().is_some_and(|pinned| pinned.id == to) {
        writeln!(out, "{} Nothing to do.", show(pinned.as_ref()))?;
        return Ok(());
    }
    let rows = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT (SELECT count(*) FROM users) AS users, \
                    (SELECT count(*) FROM organizations) AS organizations, \
                    (SELECT count(*) FROM organization_memberships) AS memberships",
        ))
        .await
        .context("cannot count the stored rows")?;
    let count = |column: &str| -> i64 {
        rows.as_ref()
            .and_then(|row| row.try_get::<i64>("", column).ok())
            .unwrap_or(0)
    };
    let from = pinned.as_ref().map_or_else(
        || "no instance (nothing pinned yet)".to_owned(),
        |p| p.described(),
    );
    writeln!(
        out,
        "This database mirrors {from}. Moving it to {to} means:"
    )?;
    writeln!(
        out,
        "- events of {to} are applied from now on, and events of any other instance are \
         dead-lettered (dead letters of {to} already in the queue can be replayed with `worker \
         dlq replay`);"
    )?;
    writeln!(
        out,
        "- the rows stored now ({} users, {} organizations, {} memberships) stay as they are. \
         The next `worker reconcile` with the key of {to} lists {to}, writes what it holds, and \
         deletes the stored rows it does not hold, within --max-delete: raise it for that run \
         if the old rows are meant to go;",
        count("users"),
        count("organizations"),
        count("memberships")
    )?;
    writeln!(
        out,
        "- workers that are running pick the move up with their next batch; a batch in flight \
         finishes under the old pin."
    )?;
    if !yes {
        anyhow::bail!("nothing was changed. Run it again with --yes to move");
    }
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO clerk_instance (singleton, id, environment_type, pinned_at, pinned_by) \
         VALUES (true, $1, NULL, now(), 'move') \
         ON CONFLICT (singleton) DO UPDATE SET id = excluded.id, environment_type = NULL, \
           pinned_at = excluded.pinned_at, pinned_by = excluded.pinned_by",
        [to.into()],
    ))
    .await
    .context("cannot pin the new instance")?;
    tracing::warn!(from = ?pinned.map(|p| p.id), to, "moved the database to another Clerk instance");
    writeln!(out, "Done: this database now mirrors {to}.")?;
    Ok(())
}
