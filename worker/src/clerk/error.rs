//! Why a call failed: the error a caller gets, Clerk's error body, and a transport error in one
//! line.

use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;

/// Why a call to the Backend API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClerkError {
    /// 401 or 403: the key is wrong, revoked or lacks access.
    #[error(
        "{call}: {status}{}: check CLERK_SECRET_KEY (the secret key of the instance to reconcile)",
        clerk_reason(.code, .message)
    )]
    Unauthorized {
        call: String,
        status: StatusCode,
        code: Option<String>,
        message: Option<String>,
    },
    /// A status that retrying does not change (4xx other than 401, 403, 404 and 429).
    #[error("{call}: {status}{}", clerk_reason(.code, .message))]
    Rejected {
        call: String,
        status: StatusCode,
        code: Option<String>,
        message: Option<String>,
    },
    /// 5xx, timeouts or connection failures that outlasted the retries, or 429s that kept coming.
    #[error("{call}: gave up after {attempts} attempts: {last}")]
    GaveUp {
        call: String,
        attempts: u32,
        last: String,
    },
    /// The rate limit was reached, for an impatient client: Clerk answered 429, or the shared
    /// client-side limit (`CLERK_API_RATE_LIMIT`) has no room soon enough.
    #[error("{call}: rate limited, next request possible in {} ms", retry_after.as_millis())]
    RateLimited { call: String, retry_after: Duration },
    /// A 2xx whose body is not what the API describes.
    #[error("{call}: unexpected answer: {reason}")]
    Decode { call: String, reason: String },
    /// The request could not even be built or sent (e.g. a malformed URL).
    #[error("{call}: {reason}")]
    Request { call: String, reason: String },
}

pub(super) fn clerk_reason(code: &Option<String>, message: &Option<String>) -> String {
    match (code, message) {
        (Some(code), Some(message)) => format!(" ({code}: {message})"),
        (Some(code), None) => format!(" ({code})"),
        (None, Some(message)) => format!(" ({message})"),
        (None, None) => String::new(),
    }
}

/// Clerk's error body: `{"errors": [{"message", "long_message", "code", "meta"}], "clerk_trace_id"}`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ErrorBody {
    #[serde(default)]
    pub(super) errors: Vec<ErrorEntry>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ErrorEntry {
    #[serde(default)]
    pub(super) code: Option<String>,
    #[serde(default)]
    pub(super) message: Option<String>,
}

/// A transport error in one line with its causes (reqwest's own line hides them), without the
/// URL.
pub(super) fn transport_error(error: reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "transport error"
    };
    let error = error.without_url();
    let mut line = kind.to_owned();
    let mut cause: Option<&dyn std::error::Error> = Some(&error);
    while let Some(current) = cause {
        line.push_str(": ");
        line.push_str(&current.to_string());
        cause = current.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unauthorized_error_names_the_call_the_code_and_the_setting() {
        let error = ClerkError::Unauthorized {
            call: "GET /v1/users/count".into(),
            status: StatusCode::UNAUTHORIZED,
            code: Some("authentication_invalid".into()),
            message: Some("Invalid authentication".into()),
        };
        assert_eq!(
            error.to_string(),
            "GET /v1/users/count: 401 Unauthorized (authentication_invalid: Invalid \
             authentication): check CLERK_SECRET_KEY (the secret key of the instance to reconcile)"
        );
    }
}
