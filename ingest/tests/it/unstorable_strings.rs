//! A body carrying what Postgres cannot store (NUL, lone surrogate escapes) is still a webhook
//! like any other: accepted and published byte for byte, so the worker can store it without them.
//! The ingest must not refuse it (serde_json refuses a lone surrogate where it builds a string).

use test_support::TestIngest;

#[actix_web::test]
async fn a_body_with_nul_and_lone_surrogates_is_accepted_and_published_as_sent() {
    let app = TestIngest::spawn().await;
    let body = r#"{"type":"user.updated","object":"event","data":{"id":"user_1","first_name":"A\u0000da","unsafe_metadata":{"k\u0000":"\ud800","x":["\udc00"]}}}"#;

    let answer = app.post_signed(body).await;

    assert_eq!(answer.status, 200, "{answer:?}");
    let delivery = app.next_message().await;
    assert_eq!(delivery.data, body.as_bytes());
    assert_eq!(delivery.routing_key.as_str(), "user.updated");
    app.stop().await;
}
