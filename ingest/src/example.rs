//! `ingest send-example`: a correctly signed example event, posted to a running ingest, so the
//! pipeline can be seen working before Clerk is wired up.

use anyhow::{Context as _, anyhow};
use serde_json::Value;

use crate::signature::Verifier;

const USER_CREATED: &str = include_str!("../../fixtures/clerk/user.created.json");
const USER_UPDATED: &str = include_str!("../../fixtures/clerk/user.updated.json");
const USER_DELETED: &str = include_str!("../../fixtures/clerk/user.deleted.json");

/// The event types `send-example` can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExampleKind {
    #[value(name = "user.created")]
    UserCreated,
    #[value(name = "user.updated")]
    UserUpdated,
    #[value(name = "user.deleted")]
    UserDeleted,
}

/// A signed request, ready to send.
#[derive(Debug, Clone)]
pub struct SignedExample {
    pub id: String,
    pub timestamp: i64,
    pub signature: String,
    pub body: String,
}

/// Builds Clerk's documented example of `kind` for `user_id`, made fresh: `created_at` and
/// `updated_at` are now (so a worker applies it as the newest version), the email address is
/// unique to the user, and it is signed with a new svix-id and the current time.
pub fn build(
    kind: ExampleKind,
    user_id: &str,
    verifier: &Verifier,
) -> anyhow::Result<SignedExample> {
    let template = match kind {
        ExampleKind::UserCreated => USER_CREATED,
        ExampleKind::UserUpdated => USER_UPDATED,
        ExampleKind::UserDeleted => USER_DELETED,
    };
    let mut event: Value = serde_json::from_str(template).context("reading the example")?;
    let now = chrono::Utc::now();
    let millis = now.timestamp_millis();
    event["timestamp"] = millis.into();
    let data = event
        .get_mut("data")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| anyhow!("example has no data object"))?;
    data.insert("id".into(), user_id.into());
    if kind != ExampleKind::UserDeleted {
        if kind == ExampleKind::UserCreated {
            data.insert("created_at".into(), millis.into());
        }
        data.insert("updated_at".into(), millis.into());
        let email = format!("{}@example.org", user_id.to_lowercase());
        if let Some(addresses) = data
            .get_mut("email_addresses")
            .and_then(Value::as_array_mut)
        {
            for address in addresses {
                address["email_address"] = email.clone().into();
            }
        }
    }
    let body = serde_json::to_string(&event).context("writing the example")?;
    let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
    let timestamp = now.timestamp();
    let signature = verifier
        .sign(&id, timestamp, body.as_bytes())
        .context("signing the example")?;
    Ok(SignedExample {
        id,
        timestamp,
        signature,
        body,
    })
}

/// Posts `example` to `url` and returns the status and the answer's body.
pub async fn send(url: &str, example: &SignedExample) -> anyhow::Result<(u16, String)> {
    let client = awc::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .finish();
    let mut response = client
        .post(url)
        .insert_header(("content-type", "application/json"))
        .insert_header((shared::headers::SVIX_ID, example.id.as_str()))
        .insert_header((
            shared::headers::SVIX_TIMESTAMP,
            example.timestamp.to_string(),
        ))
        .insert_header((shared::headers::SVIX_SIGNATURE, example.signature.as_str()))
        .send_body(example.body.clone())
        .await
        // awc's errors are not Send; keep their text.
        .map_err(|error| anyhow!("POST {url}: {error}"))?;
    let body = response
        .body()
        .await
        .map_err(|error| anyhow!("reading the answer from {url}: {error}"))?;
    Ok((
        response.status().as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// A fresh Clerk-looking user id.
pub fn fresh_user_id() -> String {
    format!("user_example_{}", uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;
    use shared::events::{ClerkUser, DeletedObject, Envelope};

    use super::*;

    fn verifier() -> Verifier {
        Verifier::new(&[SecretString::from("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD")])
            .expect("secret")
    }

    #[test]
    fn examples_are_fresh_parseable_events_for_the_given_user() {
        let before = chrono::Utc::now().timestamp_millis();
        for kind in [ExampleKind::UserCreated, ExampleKind::UserUpdated] {
            let example = build(kind, "user_abc", &verifier()).expect("example");
            let envelope = Envelope::parse(example.body.as_bytes()).expect("envelope");
            let user: ClerkUser = serde_json::from_value(envelope.data).expect("user");
            assert_eq!(user.fields.id, "user_abc");
            assert!(user.fields.updated_at >= before, "{kind:?}");
        }
        let deleted = build(ExampleKind::UserDeleted, "user_abc", &verifier()).expect("example");
        let envelope = Envelope::parse(deleted.body.as_bytes()).expect("envelope");
        assert_eq!(envelope.event_type, "user.deleted");
        let object: DeletedObject = serde_json::from_value(envelope.data).expect("deleted");
        assert_eq!(object.id.as_deref(), Some("user_abc"));
    }

    #[test]
    fn two_examples_have_different_ids_and_valid_signatures() {
        let verifier = verifier();
        let a = build(ExampleKind::UserCreated, "user_a", &verifier).expect("a");
        let b = build(ExampleKind::UserCreated, "user_a", &verifier).expect("b");
        assert_ne!(a.id, b.id);
        let expected = verifier
            .sign(&a.id, a.timestamp, a.body.as_bytes())
            .expect("sign");
        assert_eq!(a.signature, expected);
    }
}
