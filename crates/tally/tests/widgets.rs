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

/// Reads a live stream until an event with `value` arrives; returns its id and data.
async fn next_event(response: &mut reqwest::Response, buffer: &mut String) -> (String, Value) {
    loop {
        if let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let mut id = None;
            let mut data = None;
            for line in event.lines() {
                if let Some(rest) = line.strip_prefix("id:") {
                    id = Some(rest.trim().to_owned());
                }
                if let Some(rest) = line.strip_prefix("data:") {
                    data = Some(serde_json::from_str(rest.trim()).unwrap());
                }
            }
            if let (Some(id), Some(data)) = (id, data) {
                return (id, data);
            }
            continue;
        }
        let chunk = response
            .chunk()
            .await
            .unwrap()
            .expect("the stream does not end");
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test]
async fn live_clients_of_one_counter_share_one_watcher_and_see_increments_within_a_second() {
    let app = spawn_app().await;
    assert_eq!(app.increment("live", 5).await.status(), 202);
    app.wait_for_exact("live", 5).await;

    let mut clients = Vec::new();
    for _ in 0..50 {
        let response = get(&app, "/v1/counters/live/events").await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        clients.push((response, String::new()));
    }
    for (response, buffer) in &mut clients {
        let (id, data) = next_event(response, buffer).await;
        assert_eq!(id, "5");
        assert_eq!(data["counter"], "live");
        assert_eq!(data["value"], 5);
    }
    let metrics = get(&app, "/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("tally_widgets_live_counters 1"),
        "50 clients of one counter, one watcher"
    );

    let started = std::time::Instant::now();
    assert_eq!(app.increment("live", 2).await.status(), 202);
    for (response, buffer) in &mut clients {
        let (id, data) = next_event(response, buffer).await;
        assert_eq!((id.as_str(), data["value"].as_i64()), ("7", Some(7)));
    }
    let elapsed = started.elapsed();
    println!("50 live clients saw an increment {elapsed:?} after its 202 was asked for");
    assert!(elapsed < std::time::Duration::from_secs(2), "{elapsed:?}");

    // A reconnect that already saw 7 gets nothing until the value changes.
    let mut resumed = app
        .http
        .get(app.url("/v1/counters/live/events"))
        .header("Last-Event-ID", "7")
        .send()
        .await
        .unwrap();
    let mut buffer = String::new();
    assert_eq!(app.increment("live", 1).await.status(), 202);
    let (id, _) = next_event(&mut resumed, &mut buffer).await;
    assert_eq!(id, "8", "the resumed stream skips the value it had seen");
    drop(clients);
    drop(resumed);
    app.stop().await;
}

#[tokio::test]
async fn the_embed_page_and_script_are_served_small_and_self_contained() {
    let app = spawn_app().await;
    let response = get(&app, "/embed/my%2Fpage?label=views").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/html; charset=utf-8"
    );
    let page = response.text().await.unwrap();
    assert!(page.contains("../embed.js"), "{page}");
    assert!(page.len() < 4_096, "a few KB: {} bytes", page.len());

    let response = get(&app, "/embed.js").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    let script = response.text().await.unwrap();
    assert!(script.contains("EventSource") && script.contains("data-tally"));
    assert!(script.len() < 8_192, "a few KB: {} bytes", script.len());

    assert_eq!(get(&app, "/embed/").await.status(), 404);
    assert_eq!(get(&app, "/embed/a%01b").await.status(), 400);
    app.stop().await;
}
