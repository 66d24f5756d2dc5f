//! The HTTP routes: the webhook intake, health, readiness and metrics.
//!
//! Every answer is a short JSON object. The webhook's order is fixed: take a concurrency slot,
//! read the body (bounded in size and time, and all bodies together by the body budget), verify
//! the signature over the raw bytes, and only then parse the JSON and publish.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header::{CONTENT_LENGTH, ContentType, RETRY_AFTER};
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use futures_util::StreamExt;
use prometheus::IntGauge;
use serde::Deserialize;
use tokio::sync::{Semaphore, SemaphorePermit};
use tracing::Instrument as _;

use crate::metrics::{Metrics, Outcome};
use crate::publisher::{InvalidMessage, Message, PublishError, Publisher};
use crate::signature::{Verifier, VerifyError};
use crate::throttle::LogThrottle;

/// Seconds a client is asked to wait after a 503.
const RETRY_AFTER_SECONDS: &str = "5";
/// The answer to an accepted event, the same every time.
const ACCEPTED: &str = r#"{"status":"accepted"}"#;

/// What the routes share.
pub struct AppState {
    pub verifier: Verifier,
    pub publisher: Publisher,
    pub metrics: Metrics,
    /// Slots for webhook requests in progress; none free means 503.
    pub slots: Arc<Semaphore>,
    /// One permit a byte: the bytes of bodies all requests may hold at once; none left means 503.
    pub body_budget: Semaphore,
    pub body_limit: usize,
    pub client_timeout: Duration,
    /// Keeps the "signature rejected" line to a few a second under a flood of junk.
    pub rejection_log: LogThrottle,
}

/// Why a webhook request was not accepted. Each variant maps to one status code.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("{0}")]
    MalformedHeaders(VerifyError),
    #[error("{0}")]
    SignatureRejected(VerifyError),
    #[error("body is not a JSON object with a string \"type\"")]
    NotAnEvent,
    #[error("{0}")]
    InvalidMessage(#[from] InvalidMessage),
    #[error("body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("body not received in time")]
    BodyTimeout,
    #[error("body could not be read")]
    BodyUnreadable,
    #[error("too many requests in progress")]
    Overloaded,
    #[error("too many request bodies in progress")]
    BodyBudgetExhausted,
    #[error("broker unavailable")]
    Unavailable(#[source] PublishError),
}

impl WebhookError {
    fn outcome(&self) -> Outcome {
        match self {
            Self::MalformedHeaders(_)
            | Self::NotAnEvent
            | Self::InvalidMessage(_)
            | Self::BodyUnreadable => Outcome::BadRequest,
            Self::SignatureRejected(_) => Outcome::Unauthorized,
            Self::TooLarge(_) => Outcome::PayloadTooLarge,
            Self::BodyTimeout => Outcome::RequestTimeout,
            Self::Overloaded => Outcome::Overloaded,
            Self::BodyBudgetExhausted => Outcome::BodyBudgetExhausted,
            Self::Unavailable(_) => Outcome::BrokerUnavailable,
        }
    }
}

impl ResponseError for WebhookError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::MalformedHeaders(_)
            | Self::NotAnEvent
            | Self::InvalidMessage(_)
            | Self::BodyUnreadable => StatusCode::BAD_REQUEST,
            Self::SignatureRejected(_) => StatusCode::UNAUTHORIZED,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Overloaded | Self::BodyBudgetExhausted | Self::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if self.status_code() == StatusCode::SERVICE_UNAVAILABLE {
            response.insert_header((RETRY_AFTER, RETRY_AFTER_SECONDS));
        }
        // The Display texts name no secret and no internal detail (the 503 one is opaque).
        response.json(serde_json::json!({ "error": self.to_string() }))
    }
}

/// Only the envelope's `type` is read; serde skips the other fields without keeping them.
#[derive(Deserialize)]
struct EventType<'a> {
    #[serde(rename = "type", borrow)]
    event_type: Cow<'a, str>,
}

/// `POST /api/webhooks`.
pub async fn webhook(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WebhookError> {
    let span = request_span(&request);
    let result = accept(&request, payload, &state)
        .instrument(span.clone())
        .await;
    let outcome = match &result {
        Ok(()) => Outcome::Accepted,
        Err(error) => error.outcome(),
    };
    state.metrics.record(outcome);
    if !span.is_none() {
        let status = match &result {
            Ok(()) => StatusCode::OK,
            Err(error) => error.status_code(),
        };
        span.record("outcome", outcome.label());
        span.record("http.response.status_code", status.as_u16());
        if status.is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
    }
    result.map(|()| {
        HttpResponse::Ok()
            .content_type(ContentType::json())
            .body(ACCEPTED)
    })
}

async fn accept(
    request: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
) -> Result<(), WebhookError> {
    // Held until the answer: bounds the bodies in memory and the publishes in flight.
    let _slot = state
        .slots
        .try_acquire()
        .map_err(|_| WebhookError::Overloaded)?;
    let received_at = chrono::Utc::now();
    // Held until the answer too: the body stays in memory until the broker has it.
    let mut reservation = Reservation::new(&state.body_budget, &state.metrics.body_budget_used);
    let body = read_body(request, payload, state, &mut reservation).await?;

    let signed = state
        .verifier
        .verify(request.headers(), &body)
        .map_err(|error| {
            state
                .metrics
                .verification_failures
                .with_label_values(&[error.reason()])
                .inc();
            if let Some(left_out) = state.rejection_log.admit() {
                tracing::info!(
                    claimed_svix_id = claimed_id(request),
                    reason = error.reason(),
                    rejections_not_logged = left_out,
                    "webhook signature rejected"
                );
            }
            if error.is_malformed_request() {
                WebhookError::MalformedHeaders(error)
            } else {
                WebhookError::SignatureRejected(error)
            }
        })?;

    if shared::telemetry::enabled() {
        tracing::Span::current().record("svix_id", signed.id.as_str());
    }
    let event_type = parse_event_type(&body).ok_or_else(|| {
        tracing::info!(svix_id = %signed.id, "signed body is not an event");
        WebhookError::NotAnEvent
    })?;
    if shared::telemetry::enabled() {
        tracing::Span::current().record("event_type", &*event_type);
    }
    // The message shares the body's bytes (a reference count, not a copy).
    let message = Message::new(&event_type, &signed, body.clone(), received_at)?;
    match state.publisher.publish(message).await {
        Ok(()) => {
            tracing::debug!(svix_id = %signed.id, event_type = %event_type, "event accepted");
            Ok(())
        }
        Err(error) => {
            tracing::warn!(
                svix_id = %signed.id,
                event_type = %event_type,
                error = %error,
                "event not accepted: broker trouble"
            );
            Err(WebhookError::Unavailable(error))
        }
    }
}

/// The request's span when spans are exported (none otherwise, at no cost): it continues the
/// trace of an incoming `traceparent`, and gets the svix-id, the event type, the outcome and the
/// status code as they become known.
fn request_span(request: &HttpRequest) -> tracing::Span {
    if !shared::telemetry::enabled() {
        return tracing::Span::none();
    }
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let span = tracing::info_span!(
        "POST /api/webhooks",
        otel.kind = "server",
        http.request.method = "POST",
        http.route = "/api/webhooks",
        http.response.status_code = tracing::field::Empty,
        svix_id = tracing::field::Empty,
        event_type = tracing::field::Empty,
        outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let parent = shared::trace_context::extract_from(&RequestHeaders(request));
    // Only fails when the span is disabled or already started; neither is the case here.
    let _ = span.set_parent(parent);
    span
}

/// A request's headers as the trace context propagator reads them.
struct RequestHeaders<'a>(&'a HttpRequest);

impl opentelemetry::propagation::Extractor for RequestHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .headers()
            .get(key)
            .and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.headers().keys().map(|name| name.as_str()).collect()
    }
}

/// The svix-id a rejected request claims, for the log line: not verified, so cut short.
fn claimed_id(request: &HttpRequest) -> &str {
    let headers = request.headers();
    let id = headers
        .get(shared::headers::SVIX_ID)
        .or_else(|| headers.get(shared::headers::WEBHOOK_ID))
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    // Header text is visible ASCII, so any byte index is a character boundary.
    &id[..id.len().min(64)]
}

/// The event's `type`, if the body is a JSON object with a string `type`. Borrowed from the
/// body unless it holds escapes.
fn parse_event_type(body: &[u8]) -> Option<Cow<'_, str>> {
    // serde reads a struct from a JSON array as well (`["user.created"]`), so check that the
    // body is an object before letting it fill the struct.
    if body.iter().find(|byte| !byte.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    shared::json::from_slice::<EventType<'_>>(body)
        .ok()
        .map(|event| event.event_type)
}

/// The part of the body budget one request holds, given back when it is dropped.
struct Reservation<'a> {
    budget: &'a Semaphore,
    gauge: &'a IntGauge,
    permit: Option<SemaphorePermit<'a>>,
}

impl<'a> Reservation<'a> {
    fn new(budget: &'a Semaphore, gauge: &'a IntGauge) -> Self {
        Self {
            budget,
            gauge,
            permit: None,
        }
    }

    /// Takes `bytes` more from the budget, or fails at once when they are not left.
    fn take(&mut self, bytes: usize) -> Result<(), WebhookError> {
        let permits = u32::try_from(bytes).map_err(|_| WebhookError::BodyBudgetExhausted)?;
        let permit = self
            .budget
            .try_acquire_many(permits)
            .map_err(|_| WebhookError::BodyBudgetExhausted)?;
        self.gauge.add(i64::from(permits));
        match &mut self.permit {
            Some(held) => held.merge(permit),
            None => self.permit = Some(permit),
        }
        Ok(())
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(permit) = &self.permit {
            self.gauge
                .sub(i64::try_from(permit.num_permits()).unwrap_or(i64::MAX));
        }
    }
}

/// A body as it arrives. A body that comes whole in one chunk is kept as it is (no copy); any
/// other is copied into a buffer of its own, so a stalled upload never pins the connection's
/// (larger) read buffer.
#[derive(Default)]
enum Body {
    #[default]
    Empty,
    Whole(Bytes),
    Joined(BytesMut),
}

impl Body {
    fn push(&mut self, chunk: Bytes, declared: Option<usize>) {
        *self = match std::mem::take(self) {
            Body::Empty if declared == Some(chunk.len()) => Body::Whole(chunk),
            Body::Empty => {
                let mut joined = BytesMut::with_capacity(declared.unwrap_or(chunk.len()));
                joined.extend_from_slice(&chunk);
                Body::Joined(joined)
            }
            Body::Whole(first) => {
                let mut joined = BytesMut::with_capacity(first.len() + chunk.len());
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&chunk);
                Body::Joined(joined)
            }
            Body::Joined(mut joined) => {
                joined.extend_from_slice(&chunk);
                Body::Joined(joined)
            }
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Body::Empty => Bytes::new(),
            Body::Whole(bytes) => bytes,
            Body::Joined(joined) => joined.freeze(),
        }
    }
}

/// Reads the whole body: 413 as soon as it is known to exceed the limit, 408 if it does not
/// arrive within the client timeout, 503 when the body budget has not enough left for it.
/// (actix's own limit for `web::Bytes` is 256 KiB; this replaces it.)
async fn read_body(
    request: &HttpRequest,
    mut payload: web::Payload,
    state: &AppState,
    reservation: &mut Reservation<'_>,
) -> Result<Bytes, WebhookError> {
    let limit = state.body_limit;
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(WebhookError::TooLarge(limit));
    }
    // A declared length (Svix always sends one) is taken from the budget before any of the body
    // is read, so a request that does not fit is refused without reading it; a chunked body is
    // counted as it arrives.
    if let Some(length) = declared {
        reservation.take(length)?;
    }
    let read = async {
        let mut body = Body::default();
        let mut received = 0_usize;
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|_| WebhookError::BodyUnreadable)?;
            received += chunk.len();
            if received > limit {
                return Err(WebhookError::TooLarge(limit));
            }
            if declared.is_none() {
                reservation.take(chunk.len())?;
            }
            body.push(chunk, declared);
        }
        Ok(body.into_bytes())
    };
    tokio::time::timeout(state.client_timeout, read)
        .await
        .unwrap_or(Err(WebhookError::BodyTimeout))
}

/// `GET /healthz`: the process is alive.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// `GET /readyz`: 200 when the broker connection and a publishing channel are usable, naming the
/// broker node (`host:port`) in use.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    if let Some(node) = state.publisher.ready_node() {
        HttpResponse::Ok().json(serde_json::json!({ "status": "ready", "node": node }))
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header((RETRY_AFTER, RETRY_AFTER_SECONDS))
            .json(serde_json::json!({ "error": "broker unavailable" }))
    }
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    match state.metrics.render() {
        Ok(text) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4")
            .body(text),
        Err(error) => {
            tracing::error!(%error, "cannot render metrics");
            HttpResponse::InternalServerError()
                .json(serde_json::json!({ "error": "metrics unavailable" }))
        }
    }
}

/// Any other path or method.
pub async fn not_found() -> HttpResponse {
    HttpResponse::NotFound().json(serde_json::json!({ "error": "not found" }))
}

#[cfg(test)]
mod tests {
    use super::parse_event_type;

    #[test]
    fn only_a_json_object_with_a_string_type_is_an_event() {
        assert_eq!(
            parse_event_type(br#"{"type":"user.created","data":{"id":"u"}}"#).as_deref(),
            Some("user.created")
        );
        assert_eq!(
            parse_event_type(br#"{"data":1,"type":"a\"b"}"#).as_deref(),
            Some("a\"b")
        );
        for body in [
            &b"not json"[..],
            b"[]",
            b"\"user.created\"",
            b"{}",
            br#"{"type":7}"#,
            br#"{"type":null}"#,
            br#"{"type":"x"} trailing"#,
            b"",
        ] {
            assert_eq!(
                parse_event_type(body),
                None,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    /// An end user can nest `unsafe_metadata` deeper than serde_json's 128 levels: the signed
    /// event is still an event, not a 400 that Svix retries in vain.
    #[test]
    fn an_event_with_metadata_nested_deeper_than_serde_json_reads_is_an_event() {
        let depth = 2_000;
        let body = format!(
            r#"{{"data":{{"unsafe_metadata":{}1{}}},"type":"user.updated"}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        assert_eq!(
            parse_event_type(body.as_bytes()).as_deref(),
            Some("user.updated")
        );
    }
}
