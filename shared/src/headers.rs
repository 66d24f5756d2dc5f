//! Header names, HTTP and AMQP. One place, so the ingest, the worker and the `dlq` commands can
//! never disagree on a spelling.

/// Svix's branded request headers, as Clerk sends them.
pub const SVIX_ID: &str = "svix-id";
pub const SVIX_TIMESTAMP: &str = "svix-timestamp";
pub const SVIX_SIGNATURE: &str = "svix-signature";

/// The Standard Webhooks names of the same three headers, accepted as well.
pub const WEBHOOK_ID: &str = "webhook-id";
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// AMQP header: when the ingest received the request (RFC 3339). The message also carries the
/// three `svix-*` headers under their own names.
pub const RECEIVED_AT: &str = "received-at";

/// AMQP headers a dead letter adds. Deliberately not `x-` names: RabbitMQ reserves and rewrites
/// some of those.
pub const ERROR: &str = "error";
pub const ERROR_KIND: &str = "error-kind";
pub const ATTEMPTS: &str = "attempts";
pub const FAILED_AT: &str = "failed-at";

/// Set by RabbitMQ itself on a message it dead-lettered (for instance at its delivery limit).
pub const X_DEATH: &str = "x-death";

/// Set by RabbitMQ on a redelivered message of a quorum queue: how often it was delivered before.
pub const X_DELIVERY_COUNT: &str = "x-delivery-count";

/// The `error-kind` values of a dead letter.
pub const KIND_PERMANENT: &str = "permanent";
pub const KIND_EXHAUSTED: &str = "exhausted";
/// How `dlq` shows a message the broker dead-lettered at its delivery limit.
pub const KIND_DELIVERY_LIMIT: &str = "delivery-limit";
