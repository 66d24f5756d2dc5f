//! Fuzzing the event parser: whatever bytes arrive, parsing answers with a value or an error and
//! never panics. The case count follows `PROPTEST_CASES` (256 by default; the README shows a
//! longer run).

use proptest::prelude::*;
use serde_json::{Value, json};
use shared::Roles;
use shared::events::{ClerkUser, DeletedObject, Envelope};

/// Arbitrary JSON, a few levels deep, with the keys Clerk's user object uses among random ones,
/// so that the interesting fields are hit with values of every type.
fn arbitrary_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("id".to_owned()),
        Just("type".to_owned()),
        Just("data".to_owned()),
        Just("email_addresses".to_owned()),
        Just("primary_email_address_id".to_owned()),
        Just("email_address".to_owned()),
        Just("phone_numbers".to_owned()),
        Just("primary_phone_number_id".to_owned()),
        Just("public_metadata".to_owned()),
        Just("role".to_owned()),
        Just("created_at".to_owned()),
        Just("updated_at".to_owned()),
        "[a-z_]{1,12}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,16}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..8)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// Runs everything the worker does with a body, and returns nothing: the test is that it returns.
fn parse_everything(body: &[u8]) {
    if let Ok(envelope) = Envelope::parse(body) {
        if let Ok(user) = serde_json::from_value::<ClerkUser>(envelope.data.clone()) {
            let _ = user.to_record(&Roles::default());
        }
        let _ = serde_json::from_value::<DeletedObject>(envelope.data);
    }
}

proptest! {
    #[test]
    fn random_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        parse_everything(&body);
    }

    #[test]
    fn random_json_never_panics(value in arbitrary_json()) {
        let body = serde_json::to_vec(&value).expect("serialisable");
        parse_everything(&body);
    }

    #[test]
    fn user_events_with_random_fields_never_panic(data in arbitrary_json(), created in any::<i64>(), updated in any::<i64>()) {
        let mut data = data;
        if let Value::Object(map) = &mut data {
            map.insert("id".into(), json!("user_fuzz"));
            map.insert("created_at".into(), json!(created));
            map.insert("updated_at".into(), json!(updated));
        }
        let body = serde_json::to_vec(&json!({"type": "user.updated", "data": data})).expect("serialisable");
        parse_everything(&body);
    }

    /// Timestamps out of chrono's range are an error, never a panic or a wrapped-around date.
    #[test]
    fn any_millisecond_timestamp_is_a_date_or_an_error(millis in any::<i64>()) {
        let user: ClerkUser = serde_json::from_value(json!({"id": "u", "created_at": millis, "updated_at": millis}))
            .expect("parses");
        match user.to_record(&Roles::default()) {
            Ok(record) => prop_assert_eq!(record.updated_at.timestamp_millis(), millis),
            Err(error) => prop_assert!(error.to_string().contains("updated_at") || error.to_string().contains("created_at")),
        }
    }
}
