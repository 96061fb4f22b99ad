//! The README and docker-compose.yml must stay true to the code.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use clap::CommandFactory as _;
use common::{spawn_app, wait_until};
use tally::cli::Cli;

fn repository_file(path: &str) -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    std::fs::read_to_string(format!("{root}/{path}"))
        .unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// Every `TALLY_*` variable of every subcommand, with its default.
fn settings() -> BTreeMap<String, Option<String>> {
    let mut settings = BTreeMap::new();
    for subcommand in Cli::command().get_subcommands() {
        for argument in subcommand.get_arguments() {
            if let Some(env) = argument.get_env() {
                let default = argument
                    .get_default_values()
                    .first()
                    .map(|value| value.to_string_lossy().into_owned());
                settings.insert(env.to_string_lossy().into_owned(), default);
            }
        }
    }
    settings
}

#[test]
fn the_readme_documents_every_setting_with_its_default() {
    let readme = repository_file("README.md");
    for (variable, default) in settings() {
        let row = readme
            .lines()
            .find(|line| line.starts_with(&format!("| `{variable}` |")))
            .unwrap_or_else(|| panic!("the README's configuration table lacks {variable}"));
        if let Some(default) = default.filter(|default| !default.is_empty()) {
            assert!(
                row.contains(&format!("`{default}`")),
                "the README gives another default for {variable}: {row}"
            );
        }
    }
}

#[test]
fn docker_compose_agrees_with_the_config_defaults() {
    let compose: serde_yaml::Value =
        serde_yaml::from_str(&repository_file("docker-compose.yml")).unwrap();
    let services = &compose["services"];
    for service in ["redis", "kafka", "postgres", "tally"] {
        assert_eq!(
            services[service]["network_mode"], "host",
            "{service} should share the host's ports"
        );
    }
    let settings = settings();
    let environment = services["tally"]["environment"].as_mapping().unwrap();
    for (variable, value) in environment {
        let variable = variable.as_str().unwrap();
        let default = settings
            .get(variable)
            .unwrap_or_else(|| panic!("tally has no setting {variable}"));
        assert_eq!(
            default.as_deref(),
            value.as_str(),
            "{variable} differs from the default"
        );
    }
    let default = |variable: &str| settings[variable].clone().unwrap();
    // The stores listen where the defaults point.
    let redis_command = services["redis"]["command"].as_sequence().unwrap();
    let redis_port = default("TALLY_REDIS_URL")
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    assert!(
        redis_command
            .iter()
            .any(|word| word.as_str() == Some(redis_port.as_str()))
    );
    let kafka = &services["kafka"]["environment"];
    let brokers = default("TALLY_KAFKA_BROKERS");
    assert_eq!(
        kafka["KAFKA_ADVERTISED_LISTENERS"].as_str(),
        Some(format!("PLAINTEXT://{brokers}").as_str())
    );
    let postgres = &services["postgres"]["environment"];
    let url = format!(
        "postgres://{}:{}@127.0.0.1:5432/{}",
        postgres["POSTGRES_USER"].as_str().unwrap(),
        postgres["POSTGRES_PASSWORD"].as_str().unwrap(),
        postgres["POSTGRES_DB"].as_str().unwrap()
    );
    assert_eq!(url, default("TALLY_DATABASE_URL"));
    let postgres_command = services["postgres"]["command"].as_sequence().unwrap();
    assert!(
        postgres_command
            .iter()
            .any(|word| word.as_str() == Some("port=5432"))
    );
}

/// The shell block that follows `<!-- readme-test: NAME -->` in the README.
fn readme_block(name: &str) -> String {
    let readme = repository_file("README.md");
    let marker = format!("<!-- readme-test: {name} -->");
    let after = &readme[readme
        .find(&marker)
        .unwrap_or_else(|| panic!("no {marker}"))
        + marker.len()..];
    let body = &after[after.find("```sh\n").unwrap() + 6..];
    body[..body.find("```").unwrap()].to_owned()
}

async fn run_shell(script: &str, address: &str) -> String {
    let script = script.replace("http://127.0.0.1:8080", address);
    let output = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn the_readme_curl_walkthrough_works() {
    let app = spawn_app().await;
    let printed = run_shell(&readme_block("increments"), &app.address).await;
    assert_eq!(
        printed.matches("HTTP/1.1 202 Accepted").count(),
        3,
        "{printed}"
    );
    assert!(
        printed.contains(r#"{"counter":"page:home","by":5,"duplicate":false}"#),
        "{printed}"
    );
    assert!(
        printed.contains(r#"{"accepted":2,"duplicates":0}"#),
        "{printed}"
    );
    let reads = readme_block("reads");
    wait_until(
        Duration::from_secs(10),
        "the README's reads show the increments",
        || async {
            let printed = run_shell(&reads, &app.address).await;
            // curl prints the two bodies back to back.
            let mut bodies =
                serde_json::Deserializer::from_str(&printed).into_iter::<serde_json::Value>();
            let one = bodies.next().unwrap().unwrap();
            let many = bodies.next().unwrap().unwrap();
            one["value"] == 8
                && many["counters"][0]["value"] == 8
                && many["counters"][1]["value"] == 1
        },
    )
    .await;
}
