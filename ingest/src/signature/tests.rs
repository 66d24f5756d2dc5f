use actix_web::http::header::{HeaderName, HeaderValue};

use super::*;

const K1_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const K1_ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
const K1_BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
const K2_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn verifier(secrets: &[&str]) -> Verifier {
    let secrets: Vec<SecretString> = secrets.iter().map(|s| SecretString::from(*s)).collect();
    Verifier::new(&secrets).expect("valid secrets")
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.insert(
            HeaderName::from_static(name),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    map
}

fn svix(id: &str, ts: i64, signature: &str) -> HeaderMap {
    headers(&[
        (SVIX_ID, id),
        (SVIX_TIMESTAMP, &ts.to_string()),
        (SVIX_SIGNATURE, signature),
    ])
}

fn signed(ts: i64) -> (HeaderMap, String) {
    let signature = verifier(&[K1_SECRET])
        .sign(K1_ID, ts, K1_BODY)
        .expect("sign");
    (svix(K1_ID, ts, &signature), signature)
}

#[test]
fn known_answer_vectors_sign_as_the_reference_libraries_do() {
    let vectors: [(&str, &str, i64, &[u8], &str); 5] = [
        (
            K1_SECRET,
            K1_ID,
            1649367553,
            K1_BODY,
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
        ),
        (
            K2_SECRET,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ),
        (
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ),
        (
            "whsec_plJ3nmyCDGBKInavdOK15jsl",
            "msg_loFOjxBNrRLzqYUf",
            1731705121,
            br#"{"event_type":"ping","data":{"success":true}}"#,
            "v1,rAvfW3dJ/X/qxhsaXPOyyCGmRKsaKWcsNccKXlIktD0=",
        ),
        (
            K1_SECRET,
            "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
            1674087231,
            br#"{"type":"contact.created","timestamp":"2022-11-03T20:26:10.344522Z","data":{"id":"1f81eb52-5198-4599-803e-771906343485"}}"#,
            "v1,Inw/unYkpAh6Njpdz4O+hnN82xYMXQ6NjnZIQN/mzIQ=",
        ),
    ];
    for (secret, id, ts, body, expected) in vectors {
        let signature = verifier(&[secret]).sign(id, ts, body).expect("sign");
        assert_eq!(signature, expected, "vector {id}");
    }
}

#[test]
fn a_known_answer_vector_outside_the_window_is_rejected_as_too_old() {
    let headers = svix(
        K1_ID,
        1649367553,
        "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
    );
    assert_eq!(
        verifier(&[K1_SECRET]).verify(&headers, K1_BODY),
        Err(VerifyError::TimestampTooOld)
    );
}

#[test]
fn a_fresh_signature_verifies_with_svix_headers() {
    let ts = now();
    let (headers, signature) = signed(ts);
    let verified = verifier(&[K1_SECRET])
        .verify(&headers, K1_BODY)
        .expect("verified");
    assert_eq!(
        verified,
        SignedHeaders {
            id: K1_ID.into(),
            timestamp: ts,
            signature
        }
    );
}

#[test]
fn a_fresh_signature_verifies_with_webhook_headers() {
    let ts = now();
    let signature = verifier(&[K1_SECRET])
        .sign(K1_ID, ts, K1_BODY)
        .expect("sign");
    let headers = headers(&[
        (WEBHOOK_ID, K1_ID),
        (WEBHOOK_TIMESTAMP, &ts.to_string()),
        (WEBHOOK_SIGNATURE, &signature),
    ]);
    assert!(verifier(&[K1_SECRET]).verify(&headers, K1_BODY).is_ok());
}

#[test]
fn either_of_two_rotating_secrets_verifies() {
    let both = verifier(&[K2_SECRET, K1_SECRET]);
    let (headers, _) = signed(now());
    assert!(both.verify(&headers, K1_BODY).is_ok());
    let ts = now();
    let by_k2 = verifier(&[K2_SECRET])
        .sign(K1_ID, ts, K1_BODY)
        .expect("sign");
    assert!(both.verify(&svix(K1_ID, ts, &by_k2), K1_BODY).is_ok());
    assert_eq!(
        verifier(&[K1_SECRET]).verify(&svix(K1_ID, ts, &by_k2), K1_BODY),
        Err(VerifyError::InvalidSignature)
    );
}

#[test]
fn wrong_junk_partial_and_near_miss_signatures_are_rejected() {
    let ts = now();
    let (_, valid) = signed(ts);
    let mut near_miss = valid.clone();
    let last = near_miss.pop().expect("non-empty");
    near_miss.push(if last == 'A' { 'B' } else { 'A' });
    for signature in [
        "v1,R3PTzyfHASBKHH98a7yexTwaJ4yNIcGhFQc1yuN+BPU=".to_owned(),
        "v1,dawfeoifkpqwoekfpqoekf".to_owned(),
        "v1,".to_owned(),
        valid[..8].to_owned(),
        near_miss,
        valid.replace("v1,", "v2,"),
        valid.replace("v1,", "v1a,"),
        String::new(),
    ] {
        assert_eq!(
            verifier(&[K1_SECRET]).verify(&svix(K1_ID, ts, &signature), K1_BODY),
            Err(VerifyError::InvalidSignature),
            "{signature:?}"
        );
    }
}

#[test]
fn a_tampered_body_is_rejected() {
    let (headers, _) = signed(now());
    assert_eq!(
        verifier(&[K1_SECRET]).verify(&headers, br#"{"email":"evil@example.com"}"#),
        Err(VerifyError::InvalidSignature)
    );
}

#[test]
fn the_window_is_five_minutes_either_way() {
    let v = verifier(&[K1_SECRET]);
    // 299 rather than 300: the clock may tick between signing and verifying.
    for offset in [-299, 299] {
        let (headers, _) = signed(now() + offset);
        assert!(v.verify(&headers, K1_BODY).is_ok(), "offset {offset}");
    }
    let (old, _) = signed(now() - 301);
    assert_eq!(v.verify(&old, K1_BODY), Err(VerifyError::TimestampTooOld));
    let (new, _) = signed(now() + 301);
    assert_eq!(v.verify(&new, K1_BODY), Err(VerifyError::TimestampInFuture));
    let (negative, _) = signed(-1);
    assert_eq!(
        v.verify(&negative, K1_BODY),
        Err(VerifyError::TimestampTooOld)
    );
}

#[test]
fn a_header_timestamp_that_differs_from_the_signed_one_is_rejected() {
    let ts = now();
    let (_, signature) = signed(ts);
    for header_ts in [ts + 1, 946684800] {
        let result = verifier(&[K1_SECRET]).verify(&svix(K1_ID, header_ts, &signature), K1_BODY);
        assert!(
            matches!(
                result,
                Err(VerifyError::InvalidSignature | VerifyError::TimestampTooOld)
            ),
            "{result:?}"
        );
    }
    assert_eq!(
        verifier(&[K1_SECRET]).verify(&svix(K1_ID, ts + 1, &signature), K1_BODY),
        Err(VerifyError::InvalidSignature)
    );
}

#[test]
fn one_valid_entry_among_several_is_enough_and_other_versions_are_skipped() {
    let ts = now();
    let (_, valid) = signed(ts);
    let others = "v1,tFtCZ5RDCPxzWQRWXWPgrCgE2frDBe9gjpbWQxnVfsQ= v1,Mm7xgUVICxZfQ3bgf0h0Dof65L/IFx+PnZvnDWPCX6Q=";
    let v = verifier(&[K1_SECRET]);
    let with_valid = format!("{others} {valid} v1,9DfC1c3eeOrXB6w/5dIDydLNQaEyww5KalE5jLBZucE=");
    assert!(v.verify(&svix(K1_ID, ts, &with_valid), K1_BODY).is_ok());
    let without = format!("{others} v1,9DfC1c3eeOrXB6w/5dIDydLNQaEyww5KalE5jLBZucE=");
    assert_eq!(
        v.verify(&svix(K1_ID, ts, &without), K1_BODY),
        Err(VerifyError::InvalidSignature)
    );
    let v2 = "v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=";
    let mixed = format!("v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= {v2} {valid}");
    assert!(v.verify(&svix(K1_ID, ts, &mixed), K1_BODY).is_ok());
}

#[test]
fn each_missing_header_is_named_in_both_families() {
    let ts = now().to_string();
    let (_, signature) = signed(now());
    for family in [
        [SVIX_ID, SVIX_TIMESTAMP, SVIX_SIGNATURE],
        [WEBHOOK_ID, WEBHOOK_TIMESTAMP, WEBHOOK_SIGNATURE],
    ] {
        let values = [K1_ID, ts.as_str(), signature.as_str()];
        for (missing, what) in ["id", "timestamp", "signature"].iter().enumerate() {
            let pairs: Vec<(&'static str, &str)> = family
                .iter()
                .zip(values)
                .enumerate()
                .filter(|(index, _)| *index != missing)
                .map(|(_, (name, value))| (*name, value))
                .collect();
            let error = verifier(&[K1_SECRET])
                .verify(&headers(&pairs), K1_BODY)
                .expect_err("missing");
            assert_eq!(error, VerifyError::MissingHeader(what));
            assert!(error.is_malformed_request());
        }
    }
}

#[test]
fn a_non_numeric_timestamp_is_a_malformed_header() {
    let error = verifier(&[K1_SECRET])
        .verify(
            &headers(&[
                (SVIX_ID, K1_ID),
                (SVIX_TIMESTAMP, "hello"),
                (SVIX_SIGNATURE, "v1,x"),
            ]),
            K1_BODY,
        )
        .expect_err("malformed");
    assert_eq!(error, VerifyError::MalformedHeader("timestamp"));
    assert!(error.is_malformed_request());
}

#[test]
fn an_overlong_id_is_a_malformed_header() {
    let id = "m".repeat(256);
    let ts = now();
    let signature = verifier(&[K1_SECRET]).sign(&id, ts, K1_BODY).expect("sign");
    assert_eq!(
        verifier(&[K1_SECRET]).verify(&svix(&id, ts, &signature), K1_BODY),
        Err(VerifyError::MalformedHeader("id"))
    );
}

#[test]
fn empty_body_signed_verifies_and_a_non_text_body_is_rejected() {
    let ts = now();
    let v = verifier(&[K1_SECRET]);
    let signature = v.sign(K1_ID, ts, b"").expect("sign");
    assert!(v.verify(&svix(K1_ID, ts, &signature), b"").is_ok());
    let error = v
        .verify(&svix(K1_ID, ts, &signature), &[0xff, 0xfe])
        .expect_err("not text");
    assert_eq!(error, VerifyError::BodyNotText);
    assert!(!error.is_malformed_request());
}

#[test]
fn empty_unpadded_and_junk_secrets_are_refused_without_echoing_them() {
    for secret in [
        "",
        "whsec_",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS",
        "whsec_***",
    ] {
        let error = Verifier::new(&[SecretString::from(secret)]).expect_err("invalid");
        let line = error.to_string();
        assert!(line.contains("CLERK_WEBHOOK_SECRET"), "{line}");
        if secret.len() > 6 {
            assert!(!line.contains(&secret[6..]), "{line}");
        }
    }
}

#[test]
fn the_prefix_is_optional() {
    let ts = now();
    let with = verifier(&[K2_SECRET]).sign("m", ts, b"{}").expect("sign");
    let without = verifier(&["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])
        .sign("m", ts, b"{}")
        .expect("sign");
    assert_eq!(with, without);
}

#[test]
fn when_both_header_families_are_present_the_svix_ones_count() {
    let ts = now();
    let (_, valid) = signed(ts);
    let junk = "v1,R3PTzyfHASBKHH98a7yexTwaJ4yNIcGhFQc1yuN+BPU=";
    let ts = ts.to_string();
    let both = |svix_signature: &str, webhook_signature: &str| {
        headers(&[
            (SVIX_ID, K1_ID),
            (SVIX_TIMESTAMP, &ts),
            (SVIX_SIGNATURE, svix_signature),
            (WEBHOOK_ID, K1_ID),
            (WEBHOOK_TIMESTAMP, &ts),
            (WEBHOOK_SIGNATURE, webhook_signature),
        ])
    };
    let v = verifier(&[K1_SECRET]);
    assert!(v.verify(&both(&valid, junk), K1_BODY).is_ok());
    assert_eq!(
        v.verify(&both(junk, &valid), K1_BODY),
        Err(VerifyError::InvalidSignature)
    );
}

#[test]
fn every_reason_is_listed_for_the_metrics() {
    for error in [
        VerifyError::MissingHeader("id"),
        VerifyError::MalformedHeader("id"),
        VerifyError::TimestampTooOld,
        VerifyError::TimestampInFuture,
        VerifyError::InvalidSignature,
        VerifyError::BodyNotText,
    ] {
        assert!(VerifyError::REASONS.contains(&error.reason()), "{error:?}");
    }
}

#[test]
fn debug_output_shows_no_key() {
    let debug = format!("{:?}", verifier(&[K1_SECRET]));
    assert!(!debug.contains("C2FVsBQ"), "{debug}");
}
