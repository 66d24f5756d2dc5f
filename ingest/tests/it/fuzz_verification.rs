//! Property tests of the intake's pure steps: random bodies and headers never panic, nothing
//! without a valid signature is ever accepted, and the verifier decides exactly as the `svix`
//! crate's does. 256 cases a property by default; set `PROPTEST_CASES` for a longer run.

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use actix_web::web::Bytes;
use ingest::publisher::Message;
use ingest::signature::{SignedHeaders, Verifier};
use lapin::types::ShortString;
use proptest::prelude::*;
use secrecy::SecretString;

const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const NAMES: [&str; 6] = [
    "svix-id",
    "svix-timestamp",
    "svix-signature",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

fn verifier() -> Verifier {
    Verifier::new(&[SecretString::from(SECRET)]).expect("secret")
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Header values as a client could send them: arbitrary bytes, or plausible ones.
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..120),
        "[ -~]{0,80}".prop_map(String::into_bytes),
        (-10_000i64..10_000).prop_map(|offset| (now() + offset).to_string().into_bytes()),
        "(v1,[A-Za-z0-9+/]{0,44}=? ?){1,4}".prop_map(String::into_bytes),
    ]
}

fn headers_from(pairs: &[(usize, Vec<u8>)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (index, value) in pairs {
        // A value no HTTP parser would deliver cannot reach the route either.
        if let Ok(value) = HeaderValue::from_bytes(value) {
            map.insert(HeaderName::from_static(NAMES[index % NAMES.len()]), value);
        }
    }
    map
}

/// What Svix's own verifier says about the same request.
fn svix_accepts(headers: &HeaderMap, body: &[u8]) -> bool {
    let mut converted = http::HeaderMap::new();
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_str().as_bytes()),
            http::HeaderValue::from_bytes(value.as_bytes()),
        ) {
            converted.insert(name, value);
        }
    }
    svix::webhooks::Webhook::new(SECRET)
        .expect("secret")
        .verify(body, &converted)
        .is_ok()
}

/// A signature header: junk entries, and maybe the valid signature or a near miss of it.
fn signature_header(valid: String) -> impl Strategy<Value = String> {
    let entry = prop_oneof![
        Just(valid.clone()),
        Just(valid.replacen("v1,", "v2,", 1)),
        Just(format!("{valid} ")),
        (any::<prop::sample::Index>(), "[A-Za-z0-9+/=,]").prop_map(move |(at, with)| {
            let mut near = valid.clone();
            let at = 3 + at.index(near.len() - 3);
            near.replace_range(at..=at, &with);
            near
        }),
        "v1,[A-Za-z0-9+/]{0,44}=?",
        "[ -~]{0,20}",
    ];
    proptest::collection::vec(entry, 0..4).prop_map(|entries| entries.join(" "))
}

proptest! {
    #[test]
    fn the_verifier_decides_as_svix_does(
        (id, ts, body, header_names, signature) in (
            "[ -~]{1,60}",
            // Inside and outside the window, not within a few seconds of its edge: the two
            // verifiers read the clock at slightly different moments.
            prop_oneof![-290i64..290, 310i64..1000, -1000i64..-310],
            prop_oneof![
                "\\PC{0,300}".prop_map(String::into_bytes),
                proptest::collection::vec(any::<u8>(), 0..300),
            ],
            prop_oneof![Just(0usize), Just(3)],
        )
            .prop_flat_map(|(id, offset, body, names)| {
                let ts = now() + offset;
                let valid = verifier()
                    .sign(&id, ts, &body)
                    .unwrap_or_else(|_| "v1,AAAA".into());
                (
                    Just(id),
                    Just(ts),
                    Just(body),
                    Just(names),
                    signature_header(valid),
                )
            })
    ) {
        let mut headers = HeaderMap::new();
        for (index, value) in [(0, id), (1, ts.to_string()), (2, signature)] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(HeaderName::from_static(NAMES[header_names + index]), value);
            }
        }
        let ours = verifier().verify(&headers, &body).is_ok();
        prop_assert_eq!(ours, svix_accepts(&headers, &body));
    }

    #[test]
    fn random_headers_and_bodies_never_panic_and_are_never_accepted(
        pairs in proptest::collection::vec((0usize..6, header_value()), 0..8),
        body in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let result = verifier().verify(&headers_from(&pairs), &body);
        prop_assert!(result.is_err(), "accepted without a valid signature: {result:?}");
    }

    #[test]
    fn a_signature_for_one_body_never_verifies_another(
        signed_body in "\\PC{0,200}",
        sent_body in "\\PC{0,200}",
        id in "[a-zA-Z0-9_]{1,40}",
        offset in -290i64..290,
    ) {
        prop_assume!(signed_body != sent_body);
        let verifier = verifier();
        let ts = now() + offset;
        let signature = verifier.sign(&id, ts, signed_body.as_bytes()).expect("sign");
        let mut headers = HeaderMap::new();
        for (name, value) in [("svix-id", id.clone()), ("svix-timestamp", ts.to_string()), ("svix-signature", signature)] {
            headers.insert(HeaderName::from_static(name), HeaderValue::from_str(&value).expect("value"));
        }
        prop_assert!(verifier.verify(&headers, sent_body.as_bytes()).is_err());
        prop_assert!(verifier.verify(&headers, signed_body.as_bytes()).is_ok());
    }

    #[test]
    fn a_mutated_signature_never_verifies(
        body in "\\PC{0,200}",
        position in any::<prop::sample::Index>(),
        replacement in any::<u8>(),
    ) {
        let verifier = verifier();
        let ts = now();
        let id = "msg_fuzz";
        let valid = verifier.sign(id, ts, body.as_bytes()).expect("sign");
        let mut mutated = valid.clone().into_bytes();
        let index = position.index(mutated.len());
        mutated[index] = replacement;
        prop_assume!(mutated != valid.as_bytes());
        let mut headers = HeaderMap::new();
        headers.insert(HeaderName::from_static("svix-id"), HeaderValue::from_static(id));
        headers.insert(HeaderName::from_static("svix-timestamp"), HeaderValue::from_str(&ts.to_string()).expect("ts"));
        if let Ok(value) = HeaderValue::from_bytes(&mutated) {
            headers.insert(HeaderName::from_static("svix-signature"), value);
        }
        prop_assert!(verifier.verify(&headers, body.as_bytes()).is_err());
    }

    #[test]
    fn any_event_type_and_id_either_make_a_message_or_are_refused_without_panicking(
        event_type in "\\PC{0,300}",
        id in "[ -~]{1,300}",
        body in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        // An id over 255 bytes cannot be held by `SignedHeaders`: `verify` refuses it.
        let Ok(id) = ShortString::try_new(id.clone()) else {
            prop_assert!(id.len() > 255);
            return Ok(());
        };
        let signed = SignedHeaders { id, timestamp: now(), signature: "v1,x".into() };
        let made = Message::new(&event_type, &signed, Bytes::from(body), chrono::Utc::now());
        prop_assert_eq!(made.is_ok(), event_type.len() <= 255);
    }
}
