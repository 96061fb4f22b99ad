//! Widgets against the real stack: the SVG badge (valid XML, cache headers, `304`, counting a
//! view), the shields.io endpoint JSON, and the CountAPI door.

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};

use common::{TestApp, spawn_app};
use serde_json::Value;

async fn get(app: &TestApp, path: &str) -> reqwest::Response {
    app.http.get(app.url(path)).send().await.unwrap()
}

/// `xmllint --noout` on the text: the badge must be well-formed XML.
fn assert_well_formed_xml(svg: &str) {
    let mut xmllint = Command::new("xmllint")
        .args(["--noout", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("xmllint should be installed: deploy/local/up.sh installs libxml2-utils");
    xmllint
        .stdin
        .take()
        .unwrap()
        .write_all(svg.as_bytes())
        .unwrap();
    let output = xmllint.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "xmllint refused the badge: {}\n{svg}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn a_badge_is_valid_svg_that_no_proxy_keeps_stale() {
    let app = spawn_app().await;
    assert_eq!(app.increment("badge-page", 1_234).await.status(), 202);
    app.wait_for_exact("badge-page", 1_234).await;

    let response = get(&app, "/badge/badge-page.svg?label=visits&color=green").await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "image/svg+xml");
    assert_eq!(headers["cache-control"], "no-cache, max-age=0");
    let etag = headers["etag"].to_str().unwrap().to_owned();
    assert!(
        etag.starts_with('"') && etag.ends_with('"'),
        "a strong ETag: {etag}"
    );
    let svg = response.text().await.unwrap();
    assert_well_formed_xml(&svg);
    assert!(svg.contains("<title>visits: 1.2k</title>"), "{svg}");
    assert!(svg.contains("aria-label=\"visits: 1.2k\""), "{svg}");

    // The same badge again: 304 without a body.
    let response = app
        .http
        .get(app.url("/badge/badge-page.svg?label=visits&color=green"))
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 304);
    assert_eq!(response.headers()["etag"], etag.as_str());

    // Every style is valid XML too, and the full format shows every digit.
    for style in ["flat", "flat-square", "plastic", "social", "for-the-badge"] {
        let response = get(
            &app,
            &format!("/badge/badge-page.svg?style={style}&format=full"),
        )
        .await;
        assert_eq!(response.status(), 200, "{style}");
        let svg = response.text().await.unwrap();
        assert_well_formed_xml(&svg);
        assert!(svg.to_lowercase().contains("1,234"), "{style}: {svg}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_badge_with_incr_counts_the_view_it_shows() {
    let app = spawn_app().await;
    for expected in 1..=3 {
        let response = get(&app, "/badge/counted.svg?incr=1").await;
        assert_eq!(response.status(), 200);
        let svg = response.text().await.unwrap();
        assert!(
            svg.contains(&format!("<title>views: {expected}</title>")),
            "{svg}"
        );
    }
    app.wait_for_exact("counted", 3).await;
    app.stop().await;
}

#[tokio::test]
async fn bad_badges_get_problems() {
    let app = spawn_app().await;
    let cases = [
        ("/badge/page.png", 404),
        ("/badge/.svg", 400),
        ("/badge/page.svg?style=round", 400),
        ("/badge/page.svg?color=red%3Bx", 400),
        ("/badge/page.svg?incr=2", 400),
        ("/badge/page.svg?unknown=1", 400),
        ("/v1/counters/page/shields?color=", 400),
    ];
    for (path, status) in cases {
        let response = get(&app, path).await;
        assert_eq!(response.status(), status, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{path}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn the_shields_endpoint_and_the_countapi_door_answer_what_their_clients_read() {
    let app = spawn_app().await;
    assert_eq!(app.increment("shielded", 2_500_000).await.status(), 202);
    app.wait_for_exact("shielded", 2_500_000).await;
    let response = get(&app, "/v1/counters/shielded/shields?label=downloads").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"schemaVersion": 1, "label": "downloads", "message": "2.5M", "color": "blue"})
    );

    // CountAPI: /hit counts and answers the new value, /get reads; CORS is open.
    for expected in 1..=2 {
        let response = get(&app, "/hit/my-site/home").await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["access-control-allow-origin"], "*");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body, serde_json::json!({"value": expected}));
    }
    app.wait_for_exact("my-site:home", 2).await;
    let body: Value = get(&app, "/get/my-site/home").await.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"value": 2}));
    let body: Value = get(&app, "/get/my-site/never-hit")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body, serde_json::json!({"value": 0}));
    assert_eq!(
        get(&app, "/hit/a%3Ab/c").await.status(),
        400,
        "no `:` in a namespace"
    );
    app.stop().await;
}
