//! The usual route handler, for the end-to-end comparison: an actix-web endpoint that verifies
//! the Svix signature, maps the user and upserts its row straight into Postgres in a transaction
//! of its own, and answers 200 after the commit. No queue, no svix-id recorded, no history: what
//! the pipeline replaces. It writes the worker's row with the worker's conflict rule
//! ([`super::rows`]) and verifies with the ingest's verifier (svix's rules, without the `svix`
//! crate's copy of every body), so the comparison flatters neither side.

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use ingest::signature::Verifier;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement,
};
use secrecy::SecretString;
use test_support::signing::SECRET;

use super::rows;

/// What a request needs.
struct State {
    db: DatabaseConnection,
    verifier: Verifier,
    /// The one-row upsert.
    upsert: String,
}

/// The line the handler prints, with its port, once it listens.
pub(crate) const LISTENING: &str = "route handler listening on port ";

/// Serves `POST /api/webhooks` on a free local port, with a pool of `connections`, until
/// SIGTERM or SIGINT.
pub(crate) async fn serve(database_url: &str, connections: u32) -> anyhow::Result<()> {
    let mut options = ConnectOptions::new(database_url);
    options.max_connections(connections).sqlx_logging(false);
    let state = web::Data::new(State {
        db: Database::connect(options).await?,
        verifier: Verifier::new(&[SecretString::from(SECRET)])?,
        upsert: format!(
            "INSERT INTO users ({}) VALUES {} {}",
            rows::COLUMNS,
            rows::placeholders(0),
            rows::UPSERT_TAIL
        ),
    });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/api/webhooks", web::post().to(webhook))
    })
    .bind(("127.0.0.1", 0))?;
    let port = server.addrs().first().map(|address| address.port());
    println!("{LISTENING}{}", port.unwrap_or(0));
    server.run().await?;
    Ok(())
}

/// 200 once the row is committed; 401 for a bad signature, 400 for a body that is no user.
async fn webhook(state: web::Data<State>, request: HttpRequest, body: web::Bytes) -> HttpResponse {
    if state.verifier.verify(request.headers(), &body).is_err() {
        return HttpResponse::Unauthorized().finish();
    }
    let record = serde_json::from_slice::<serde_json::Value>(&body)
        .map_err(anyhow::Error::from)
        .and_then(|mut envelope| rows::record(envelope["data"].take()));
    let record = match record {
        Ok(record) => record,
        Err(error) => return HttpResponse::BadRequest().body(error.to_string()),
    };
    let upsert = Statement::from_sql_and_values(
        DbBackend::Postgres,
        state.upsert.as_str(),
        rows::values(record),
    );
    // One statement outside a transaction block: its own transaction, committed before it returns.
    match state.db.execute_raw(upsert).await {
        Ok(_) => HttpResponse::Ok().finish(),
        Err(error) => HttpResponse::ServiceUnavailable().body(error.to_string()),
    }
}
