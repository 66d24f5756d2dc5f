//! `worker rebuild` and `worker replay` over a large history: `processed_events` filled by SQL
//! (`generate_series`) with `user.updated` events carrying payloads, several versions of each
//! subject, and `users` holding each subject's newest version, as if a worker had applied them.
//! A worker applies live `user.updated` events of the same users meanwhile, always newer than
//! the history.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use migrations::{Migrator, MigratorTrait};
use sea_orm::{ConnectionTrait, DatabaseConnection};

use super::live::LiveLoad;
use super::process::{Target, WorkerProcess, run_command};
use super::reconcile::{LIVE_WITHIN, STRIDE, count, now_ms};
use super::{CREATED_AT_BASE, Phase, Setup, user};
use crate::{TestDatabase, TestTopology, proc_stats};

/// Rows inserted per statement while filling.
const FILL_CHUNK: u64 = 100_000;

/// What a history scenario runs.
#[derive(Debug, Clone, Copy)]
pub struct HistoryScenario {
    /// Rows of history.
    pub rows: u64,
    /// Users they are about (each gets about `rows / subjects` versions).
    pub subjects: u64,
    /// Whether to run `rebuild`.
    pub rebuild: bool,
    /// Whether to run `replay` (after `rebuild`, when both run).
    pub replay: bool,
}

/// What a history scenario measured.
#[derive(Debug, Clone)]
pub struct HistoryFigures {
    /// How long the SQL fill took (not part of any other figure).
    pub fill: Duration,
    /// `rebuild`, then `replay` over the whole history (those that ran).
    pub phases: Vec<Phase>,
    /// Rows in `users` at the end.
    pub stored_users: u64,
}

/// Runs the scenario on a database and broker names of its own, both removed afterwards.
pub async fn run(setup: &Setup, scenario: HistoryScenario) -> anyhow::Result<HistoryFigures> {
    let database = TestDatabase::empty_on(&setup.admin_url).await;
    Migrator::up(&database.db, None)
        .await
        .context("migrating the bench database")?;
    let topology = TestTopology::declared().await;
    let target = Target {
        db_url: database.url.clone(),
        amqp_url: setup.amqp_url.clone(),
        env: setup.env.clone(),
        topology: topology.topology.clone(),
    };
    let started = Instant::now();
    fill(&database.db, scenario.rows, scenario.subjects).await?;
    let fill_took = started.elapsed();

    let worker = WorkerProcess::start(&setup.worker_bin, &target).await?;
    let subjects = usize::try_from(scenario.subjects.max(1))?;
    let live = LiveLoad::start(
        &database.db,
        &database.url,
        &setup.amqp_url,
        &topology.exchange,
        setup.live_rate,
        Arc::new(move |n| user(n.wrapping_mul(STRIDE) % subjects, now_ms())),
    )
    .await?;
    let mut commands = Vec::new();
    if scenario.rebuild {
        commands.push(("rebuild", vec!["rebuild"]));
    }
    if scenario.replay {
        // The whole history: the fill spreads it over the hours before now.
        commands.push(("replay", vec!["replay", "--since", "7d"]));
    }
    let mut phases = Vec::new();
    for (name, args) in commands {
        let idle = live.baseline(setup.idle, LIVE_WITHIN).await;
        let from = live.mark();
        let warnings = worker.warnings();
        let run = run_command(
            &setup.worker_bin,
            &target,
            &args,
            &[],
            setup.command_timeout,
        )
        .await?;
        let to = live.mark();
        let worker_peak_kib = worker.peak_kib();
        let during = live.latency(from, to, LIVE_WITHIN).await;
        phases.push(Phase {
            name: format!(
                "{name} ({} history rows, {} subjects)",
                scenario.rows, scenario.subjects
            ),
            wall: run.wall,
            outcome: run.outcome,
            command_peak_kib: run.peak_kib,
            worker_peak_kib,
            idle,
            during,
            load: proc_stats::load_average().unwrap_or_default(),
            worker_warnings: worker.warnings().since(&warnings),
        });
        // As each command ends: a long run shows what it has so far.
        if let Some(phase) = phases.last() {
            print!("{phase}");
        }
    }
    live.finish().await?;
    worker.stop().await?;
    let stored_users = count(&database.db, "SELECT count(*) AS n FROM users").await?;
    Ok(HistoryFigures {
        fill: fill_took,
        phases,
        stored_users,
    })
}

/// Fills `processed_events` with `rows` applied `user.updated` events (svix-ids `hist_<g>`, g
/// from 0) about `subjects` users, event g about the user at position g modulo `subjects`,
/// each newer than the one before, applied 10 ms apart up to now; then `users` with each
/// subject's newest version.
pub async fn fill(db: &DatabaseConnection, rows: u64, subjects: u64) -> anyhow::Result<()> {
    let subjects = subjects.max(1);
    // The shape of [`super::user`], in SQL.
    let mut from = 0;
    while from < rows {
        let to = (from + FILL_CHUNK).min(rows) - 1;
        db.execute_unprepared(&format!(
            "INSERT INTO processed_events (svix_id, event_type, outcome, source, subject_kind, \
               subject_id, payload, svix_timestamp, received_at, processed_at) \
             SELECT 'hist_' || g, 'user.updated', 'applied', 'webhook', 'user', \
               'user_gen' || lpad(s::text, 10, '0'), \
               jsonb_build_object('type', 'user.updated', 'object', 'event', 'timestamp', 1, \
                 'data', jsonb_build_object( \
                   'id', 'user_gen' || lpad(s::text, 10, '0'), 'object', 'user', \
                   'email_addresses', jsonb_build_array(jsonb_build_object( \
                     'id', 'idn_' || s, 'object', 'email_address', \
                     'email_address', 'user' || s || '@example.org')), \
                   'primary_email_address_id', 'idn_' || s, \
                   'phone_numbers', '[]'::jsonb, 'primary_phone_number_id', NULL, \
                   'first_name', 'Bench', 'last_name', 'No' || s || ' v' || g / {subjects}, \
                   'public_metadata', '{{\"role\": \"client\"}}'::jsonb, \
                   'private_metadata', '{{}}'::jsonb, 'unsafe_metadata', '{{}}'::jsonb, \
                   'created_at', {CREATED_AT_BASE} + s, \
                   'updated_at', {CREATED_AT_BASE} + 1000 + g)), \
               at, at, at \
             FROM (SELECT g, g % {subjects} AS s, \
                          now() - ({rows} - g) * interval '10 milliseconds' AS at \
                   FROM generate_series({from}::bigint, {to}::bigint) AS g) AS generated"
        ))
        .await
        .with_context(|| format!("filling history rows {from}..={to}"))?;
        from = to + 1;
    }
    db.execute_unprepared(
        "INSERT INTO users (id, email, first_name, last_name, role, public_metadata, \
           private_metadata, clerk_data, created_at, updated_at, synced_at) \
         SELECT DISTINCT ON (subject_id) subject_id, \
           d -> 'email_addresses' -> 0 ->> 'email_address', d ->> 'first_name', \
           d ->> 'last_name', 'client', d -> 'public_metadata', d -> 'private_metadata', d, \
           to_timestamp((d ->> 'created_at')::bigint / 1000.0), \
           to_timestamp((d ->> 'updated_at')::bigint / 1000.0), processed_at \
         FROM (SELECT subject_id, payload -> 'data' AS d, processed_at FROM processed_events \
               WHERE svix_id LIKE 'hist\\_%') AS history \
         ORDER BY subject_id, processed_at DESC; \
         ANALYZE processed_events; ANALYZE users",
    )
    .await
    .context("filling users from the history")?;
    Ok(())
}
