//! Webhook signature verification, over the raw body bytes, before anything parses them.
//!
//! This module finds the three headers (`svix-*`, or the Standard Webhooks `webhook-*` names;
//! `svix-*` wins when both are present, as in svix itself), checks the ±5 minute window, and
//! compares HMAC-SHA256 over `{id}.{timestamp}.{body}` with every `v1` entry of the signature
//! header, for every configured secret (key rotation), in constant time. It sorts failures into
//! the ones that are the sender's formatting (400) and the ones that are a rejected signature
//! (401).
//!
//! The rules are the `svix` crate's, decision for decision (a property test compares the two on
//! random input). The HMAC itself is `hmac` + `sha2`, keyed once at start and fed the parts in
//! place: svix copies the body into a new string for every request and hashes it in portable
//! code, which was the largest single cost of an accepted request. `svix` still signs (for
//! `send-example`, tests and benchmarks).

use actix_web::http::header::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac as _};
use lapin::types::ShortString;
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use shared::ConfigError;
use shared::headers::{
    SVIX_ID, SVIX_SIGNATURE, SVIX_TIMESTAMP, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP,
};
use subtle::ConstantTimeEq as _;
use svix::webhooks::{Webhook, WebhookError};

/// How far the signed timestamp may be from now, either way (svix's tolerance).
const TOLERANCE_SECONDS: i64 = 5 * 60;
/// The only signature scheme Svix sends; other versions in the header are skipped.
const SIGNATURE_VERSION: &str = "v1";
/// Base64 of a 32-byte HMAC-SHA256 tag, padded.
const ENCODED_TAG_LEN: usize = 44;

/// Why a request's signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("malformed header {0}")]
    MalformedHeader(&'static str),
    #[error("signature timestamp too old")]
    TimestampTooOld,
    #[error("signature timestamp too far in the future")]
    TimestampInFuture,
    #[error("signature invalid")]
    InvalidSignature,
    /// The body is not UTF-8 text, so no Svix signature can cover it.
    #[error("signature invalid: body is not text")]
    BodyNotText,
}

impl VerifyError {
    /// Every [`VerifyError::reason`], so each metric series exists from the start.
    pub const REASONS: [&'static str; 6] = [
        "missing_header",
        "malformed_header",
        "timestamp_too_old",
        "timestamp_in_future",
        "invalid_signature",
        "body_not_text",
    ];

    /// True for the sender's formatting mistakes (answered 400); false for a rejected signature
    /// or timestamp (answered 401).
    pub fn is_malformed_request(&self) -> bool {
        matches!(self, Self::MissingHeader(_) | Self::MalformedHeader(_))
    }

    /// A short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingHeader(_) => "missing_header",
            Self::MalformedHeader(_) => "malformed_header",
            Self::TimestampTooOld => "timestamp_too_old",
            Self::TimestampInFuture => "timestamp_in_future",
            Self::InvalidSignature => "invalid_signature",
            Self::BodyNotText => "body_not_text",
        }
    }
}

/// The signature headers of a verified request, as the message carries them on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    /// `svix-id`: the message id, the same on every retry of one event. An AMQP short string
    /// (1 to 255 bytes), so that any verified event can become a message.
    pub id: ShortString,
    /// `svix-timestamp`: Unix seconds of this delivery attempt.
    pub timestamp: i64,
    /// `svix-signature`: the space-separated `v1,…` list, as received.
    pub signature: String,
}

/// One configured secret: the HMAC keyed once, and svix's signer for [`Verifier::sign`].
struct Key {
    mac: Hmac<Sha256>,
    signer: Webhook,
}

/// Checks signatures against every configured secret. Its `Debug` shows no key.
pub struct Verifier {
    keys: Vec<Key>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier {{ secrets: {} (redacted) }}", self.keys.len())
    }
}

impl Verifier {
    /// Decodes each `whsec_…` secret. The error names `CLERK_WEBHOOK_SECRET` and which entry
    /// failed, never the secret itself.
    pub fn new(secrets: &[SecretString]) -> Result<Self, ConfigError> {
        if secrets.is_empty() {
            return Err(ConfigError::Missing {
                variable: "CLERK_WEBHOOK_SECRET",
            });
        }
        let malformed = |index: usize, problem: &str| ConfigError::Malformed {
            variable: "CLERK_WEBHOOK_SECRET",
            reason: format!(
                "secret {} of {} is not a whsec_ base64 key ({problem})",
                index + 1,
                secrets.len(),
            ),
        };
        let keys = secrets
            .iter()
            .enumerate()
            .map(|(index, secret)| {
                let text = secret.expose_secret();
                // svix's decoding decides what is a valid secret; the same bytes key the HMAC.
                let signer =
                    Webhook::new(text).map_err(|error| malformed(index, secret_problem(&error)))?;
                let key = BASE64
                    .decode(text.strip_prefix("whsec_").unwrap_or(text))
                    .map_err(|_| malformed(index, "not valid padded base64"))?;
                let mac = Hmac::<Sha256>::new_from_slice(&key)
                    .map_err(|_| malformed(index, "unusable"))?;
                Ok(Key { mac, signer })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { keys })
    }

    /// Verifies `body` against the request's headers. Accepts when any `v1` signature in the
    /// header matches any configured secret and the timestamp is within 5 minutes of now.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<SignedHeaders, VerifyError> {
        let id = header(headers, SVIX_ID, WEBHOOK_ID, "id")?;
        let timestamp = header(headers, SVIX_TIMESTAMP, WEBHOOK_TIMESTAMP, "timestamp")?;
        let signature = header(headers, SVIX_SIGNATURE, WEBHOOK_SIGNATURE, "signature")?;
        // The id becomes the AMQP `message_id`, a short string: at most 255 bytes.
        let message_id = match ShortString::try_new(id) {
            Ok(message_id) if !id.is_empty() => message_id,
            _ => return Err(VerifyError::MalformedHeader("id")),
        };
        let timestamp_value: i64 = timestamp
            .parse()
            .map_err(|_| VerifyError::MalformedHeader("timestamp"))?;
        check_window(timestamp_value, unix_now())?;
        // Svix signs text; no signature can cover other bytes.
        if std::str::from_utf8(body).is_err() {
            return Err(VerifyError::BodyNotText);
        }
        // What is signed is the number as svix prints it ("+5" and "05" are signed as "5").
        let signed_timestamp = timestamp_value.to_string();
        for key in &self.keys {
            let mut mac = key.mac.clone();
            for part in [id.as_bytes(), b".", signed_timestamp.as_bytes(), b".", body] {
                mac.update(part);
            }
            let mut expected = [0_u8; ENCODED_TAG_LEN];
            let written = BASE64
                .encode_slice(mac.finalize().into_bytes(), &mut expected)
                .map_err(|_| VerifyError::InvalidSignature)?;
            let expected = &expected[..written];
            let matched = signature
                .split(' ')
                .filter_map(|entry| entry.split_once(','))
                .filter(|(version, _)| *version == SIGNATURE_VERSION)
                .any(|(_, candidate)| bool::from(candidate.as_bytes().ct_eq(expected)));
            if matched {
                return Ok(SignedHeaders {
                    id: message_id,
                    timestamp: timestamp_value,
                    signature: signature.to_owned(),
                });
            }
        }
        Err(VerifyError::InvalidSignature)
    }

    /// Signs `body` with the first secret, as Svix would: `v1,<base64>`. For `send-example`,
    /// tests and benchmarks.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> Result<String, VerifyError> {
        let key = self.keys.first().ok_or(VerifyError::InvalidSignature)?;
        key.signer
            .sign(id, timestamp, body)
            .map_err(|error| match error {
                WebhookError::InvalidPayload => VerifyError::BodyNotText,
                _other => VerifyError::InvalidSignature,
            })
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it, which rejects every timestamp).
fn unix_now() -> i64 {
    std::time::UNIX_EPOCH.elapsed().map_or(0, |since| {
        i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
    })
}

/// svix's window: at most 5 minutes old or ahead; a negative timestamp is too old.
fn check_window(timestamp: i64, now: i64) -> Result<(), VerifyError> {
    if timestamp < 0 || timestamp.saturating_add(TOLERANCE_SECONDS) < now {
        Err(VerifyError::TimestampTooOld)
    } else if timestamp > now.saturating_add(TOLERANCE_SECONDS) {
        Err(VerifyError::TimestampInFuture)
    } else {
        Ok(())
    }
}

/// The value of `svix_name`, or else of `webhook_name`, as text.
fn header<'a>(
    headers: &'a HeaderMap,
    svix_name: &'static str,
    webhook_name: &'static str,
    what: &'static str,
) -> Result<&'a str, VerifyError> {
    headers
        .get(svix_name)
        .or_else(|| headers.get(webhook_name))
        .ok_or(VerifyError::MissingHeader(what))?
        .to_str()
        .map_err(|_| VerifyError::MalformedHeader(what))
}

/// What is wrong with a secret, without repeating any of it.
fn secret_problem(error: &WebhookError) -> &'static str {
    match error {
        WebhookError::EmptySecret => "empty",
        WebhookError::InvalidSecret(_) => "not valid padded base64",
        WebhookError::InvalidTimestamp
        | WebhookError::InvalidHeader(_)
        | WebhookError::TimestampTooOldError
        | WebhookError::FutureTimestampError
        | WebhookError::MissingHeader(_)
        | WebhookError::InvalidSignature
        | WebhookError::InvalidPayload => "unusable",
    }
}

#[cfg(test)]
mod tests;
