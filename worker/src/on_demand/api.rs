//! The on-demand sync API over HTTP: `POST /v1/sync/users/{id}` and
//! `POST /v1/sync/organizations/{id}`, with `Authorization: Bearer <WORKER_API_TOKEN>`.
//!
//! Answers (every body a JSON object):
//! - 200: the row as stored after the commit (`users` or `organizations`, every column);
//! - 400: an id that cannot be a Clerk id; 401: no bearer token; 403: a wrong one;
//! - 404: Clerk has no such object (the deletion was applied), or the id is tombstoned;
//! - 429 with `Retry-After`: the shared Backend API rate limit is reached, or Clerk said so;
//! - 503 with `Retry-After`: the database or the Backend API is unreachable, or no answer came
//!   within `WORKER_API_TIMEOUT_MS`;
//! - 500: anything else (the reason is in the worker's log, never in the body).

use std::net::TcpListener;

use actix_web::dev::Server;
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Found, Object, OnDemand, SyncError, retry_after};

/// The longest id accepted; Clerk's are about 30 characters.
const LONGEST_ID: usize = 128;

/// What the routes share: the service and the token.
pub(crate) struct Api {
    service: OnDemand,
    /// SHA-256 of `WORKER_API_TOKEN`: comparing digests takes the same time whatever the
    /// presented token's length and content.
    token_digest: [u8; 32],
}

impl Api {
    pub(crate) fn new(service: OnDemand, token: &SecretString) -> Self {
        Self {
            service,
            token_digest: Sha256::digest(token.expose_secret().as_bytes()).into(),
        }
    }
}

/// Adds the routes to an app (the health server's, or the API's own).
pub(crate) fn routes(config: &mut web::ServiceConfig, api: web::Data<Api>) {
    config.service(
        web::scope("/v1/sync")
            .app_data(api)
            .route("/users/{id}", web::post().to(sync_user))
            .route("/organizations/{id}", web::post().to(sync_organization)),
    );
}

/// Serves the API alone on `listener` (`WORKER_API_LISTEN`). Signals are left to the worker,
/// which stops the server itself.
pub(crate) fn serve(listener: TcpListener, api: web::Data<Api>) -> std::io::Result<Server> {
    Ok(
        HttpServer::new(move || App::new().configure(|config| routes(config, api.clone())))
            .workers(1)
            .disable_signals()
            .shutdown_timeout(5)
            .listen(listener)?
            .run(),
    )
}

async fn sync_user(
    request: HttpRequest,
    api: web::Data<Api>,
    id: web::Path<String>,
) -> HttpResponse {
    sync(&request, &api, Object::User, &id).await
}

async fn sync_organization(
    request: HttpRequest,
    api: web::Data<Api>,
    id: web::Path<String>,
) -> HttpResponse {
    sync(&request, &api, Object::Organization, &id).await
}

async fn sync(request: &HttpRequest, api: &Api, object: Object, id: &str) -> HttpResponse {
    if let Err(refusal) = authorize(request, &api.token_digest) {
        api.service.refused(object, refusal.outcome());
        return refusal.answer();
    }
    if !plausible_id(id) {
        api.service.refused(object, "bad_request");
        return HttpResponse::BadRequest().json(json!({
            "error": "bad_request",
            "message": "the id must be 1 to 128 letters, digits, '_' or '-'",
        }));
    }
    match api.service.sync(object, id).await {
        Ok(synced) => match (synced.found, synced.row) {
            (_, Some(row)) => HttpResponse::Ok()
                .content_type("application/json")
                .body(row.to_string()),
            (Found::Tombstoned, None) => not_found("deleted"),
            (Found::Deleted, None) => not_found("not in Clerk"),
            // A newer delete landed between the write and the read.
            (Found::Synced | Found::Reused, None) => not_found("deleted"),
        },
        Err(error) => failure(object, id, &error),
    }
}

fn not_found(reason: &str) -> HttpResponse {
    HttpResponse::NotFound().json(json!({"error": "not_found", "message": reason}))
}

fn failure(object: Object, id: &str, error: &SyncError) -> HttpResponse {
    let (status, code) = match error {
        SyncError::RateLimited(..) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        SyncError::ClerkUnavailable(_)
        | SyncError::DatabaseUnavailable(_)
        | SyncError::TimedOut => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        SyncError::Failed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    if status.is_server_error() {
        tracing::warn!(kind = object.name(), %id, %error, "on-demand sync failed");
    } else {
        tracing::info!(kind = object.name(), %id, %error, "on-demand sync refused");
    }
    let mut answer = HttpResponse::build(status);
    if let Some(seconds) = retry_after(error) {
        answer.insert_header((header::RETRY_AFTER, seconds.to_string()));
    }
    answer.json(json!({"error": code}))
}

/// Why a request's credentials are refused.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// No `Authorization: Bearer …` at all: 401.
    Missing,
    /// A bearer token that is not the configured one: 403.
    Wrong,
}

impl Refusal {
    fn outcome(&self) -> &'static str {
        match self {
            Refusal::Missing => "unauthorized",
            Refusal::Wrong => "forbidden",
        }
    }

    fn answer(&self) -> HttpResponse {
        match self {
            Refusal::Missing => HttpResponse::Unauthorized()
                .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
                .json(json!({"error": "unauthorized", "message": "Authorization: Bearer <WORKER_API_TOKEN> is required"})),
            Refusal::Wrong => HttpResponse::Forbidden().json(json!({"error": "forbidden"})),
        }
    }
}

/// Checks `Authorization: Bearer <token>` against the configured token's digest, in constant
/// time.
fn authorize(request: &HttpRequest, token_digest: &[u8; 32]) -> Result<(), Refusal> {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(bearer)
        .ok_or(Refusal::Missing)?;
    let digest: [u8; 32] = Sha256::digest(presented).into();
    if bool::from(digest.ct_eq(token_digest)) {
        Ok(())
    } else {
        Err(Refusal::Wrong)
    }
}

/// The token of a `Bearer` credential (the scheme is case-insensitive).
fn bearer(value: &HeaderValue) -> Option<&[u8]> {
    let value = value.as_bytes();
    let scheme = value.get(..7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = value[7..].trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Whether `id` can be a Clerk id (`user_2x…`, `org_2x…`): never sent to Clerk otherwise.
fn plausible_id(id: &str) -> bool {
    (1..=LONGEST_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;

    fn digest(token: &str) -> [u8; 32] {
        Sha256::digest(token.as_bytes()).into()
    }

    #[test]
    fn the_bearer_token_is_checked_and_a_missing_one_told_apart_from_a_wrong_one() {
        let expected = digest("s3cret");
        let with = |value: &str| {
            TestRequest::default()
                .insert_header((header::AUTHORIZATION, value))
                .to_http_request()
        };
        assert_eq!(authorize(&with("Bearer s3cret"), &expected), Ok(()));
        assert_eq!(authorize(&with("bearer  s3cret "), &expected), Ok(()));
        assert_eq!(
            authorize(&with("Bearer s3cret2"), &expected),
            Err(Refusal::Wrong)
        );
        assert_eq!(
            authorize(&with("Bearer "), &expected),
            Err(Refusal::Missing)
        );
        assert_eq!(
            authorize(&with("Basic czNjcmV0"), &expected),
            Err(Refusal::Missing)
        );
        assert_eq!(
            authorize(&TestRequest::default().to_http_request(), &expected),
            Err(Refusal::Missing)
        );
    }

    #[test]
    fn only_ids_shaped_like_clerks_are_accepted() {
        assert!(plausible_id("user_2NNEqL2nrIRdJ194ndJqAHwEfxC"));
        assert!(plausible_id("org_29w9UfSVoXVMeGmsprqeVQJ3vZ6"));
        assert!(!plausible_id(""));
        assert!(!plausible_id("user_1/../../v1/users"));
        assert!(!plausible_id("user 1"));
        assert!(!plausible_id(&"a".repeat(129)));
    }
}
