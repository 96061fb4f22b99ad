//! Who may write and how fast: API keys, rate limits, the admin token, header caps.

mod common;

use common::spawn_app_with;
use serde_json::Value;

#[tokio::test]
async fn writes_over_the_rate_limit_get_429_with_retry_after() {
    let app = spawn_app_with(|args| {
        args.security.rate_limit_per_second = 1;
        args.security.rate_limit_burst = 3;
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let response = app.increment("limited", 1).await;
        let status = response.status().as_u16();
        if status == 429 {
            let retry_after: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(retry_after >= 1);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["type"], "/problems/rate-limited");
        }
        statuses.push(status);
    }
    assert_eq!(
        &statuses[..3],
        &[202, 202, 202],
        "the burst is allowed: {statuses:?}"
    );
    assert!(
        statuses[3..].contains(&429),
        "past the burst the client is limited: {statuses:?}"
    );
    // Reads are not limited.
    for _ in 0..5 {
        app.read("limited", false).await;
    }
}

#[tokio::test]
async fn writes_need_a_valid_api_key_when_keys_are_enabled() {
    let app =
        spawn_app_with(|args| args.security.api_keys = vec!["k-one".into(), "k-two".into()]).await;
    let url = app.url("/v1/counters/secured/increment");
    let anonymous = app.http.post(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
    assert_eq!(
        anonymous.headers()["content-type"],
        "application/problem+json"
    );
    let wrong = app
        .http
        .post(&url)
        .bearer_auth("k-three")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = app
        .http
        .post(&url)
        .bearer_auth("k-two")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 202);
    let batch = app
        .http
        .post(app.url("/v1/increments"))
        .json(&serde_json::json!({"increments": [{"counter": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(batch.status(), 401, "the batch route is a write route too");
    // Reads stay open.
    assert_eq!(app.read("secured", true).await["counter"], "secured");
}

#[tokio::test]
async fn admin_routes_need_the_admin_token_and_are_off_without_one() {
    let closed = spawn_app_with(|_| {}).await;
    let response = closed
        .http
        .get(closed.url("/v1/admin/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let app = spawn_app_with(|args| args.security.admin_token = Some("admin-secret".into())).await;
    let url = app.url("/v1/admin/status");
    assert_eq!(app.http.get(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        app.http
            .get(&url)
            .bearer_auth("nope")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let status: Value = app
        .http
        .get(&url)
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["window_ms"], 1_000);
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let app = spawn_app_with(|args| args.security.header_max_bytes = 1_024).await;
    let response = app
        .http
        .post(app.url("/v1/counters/big-headers/increment"))
        .header("x-padding", "p".repeat(2_000))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 431);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "/problems/headers-too-large");
}
