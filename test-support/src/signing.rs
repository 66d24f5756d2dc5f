//! Signed webhook requests, as Svix sends them for Clerk.

use svix::webhooks::Webhook;

/// The webhook secret the test services verify with (a known-answer vector of the Svix tests).
pub const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
/// A second valid secret, for rotation and wrong-secret cases.
pub const OTHER_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A fresh svix-id.
pub fn svix_id() -> String {
    format!("msg_{}", uuid::Uuid::new_v4().simple())
}

/// A signer holding `secret`, for signatures a test builds by hand.
pub fn signer(secret: &str) -> Webhook {
    Webhook::new(secret).expect("a whsec_ secret")
}

/// `svix-*` headers for `body`, signed now with [`SECRET`] and a fresh id.
pub fn signed_headers(body: &str) -> Vec<(String, String)> {
    signed_headers_with(
        SECRET,
        ["svix-id", "svix-timestamp", "svix-signature"],
        body,
    )
}

/// Headers with the given names (id, timestamp, signature), signed now with `secret` and a
/// fresh id.
pub fn signed_headers_with(secret: &str, names: [&str; 3], body: &str) -> Vec<(String, String)> {
    let id = svix_id();
    let timestamp = chrono::Utc::now().timestamp();
    let signature = signer(secret)
        .sign(&id, timestamp, body.as_bytes())
        .expect("sign");
    vec![
        (names[0].into(), id),
        (names[1].into(), timestamp.to_string()),
        (names[2].into(), signature),
    ]
}

/// A user event body of about `size` bytes, with a fresh user id.
pub fn event_body(event_type: &str, size: usize) -> String {
    let id = uuid::Uuid::new_v4().simple();
    let head = format!(
        r#"{{"type":"{event_type}","object":"event","data":{{"id":"user_{id}","padding":""#
    );
    let tail = r#""}}"#;
    let padding = "x".repeat(size.saturating_sub(head.len() + tail.len()));
    format!("{head}{padding}{tail}")
}
