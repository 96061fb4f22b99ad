//! Starts and stops the Tally process a run measures: the real release binary, isolated from
//! everyone else on the machine by its own database, topic, Redis prefix and consumer group.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Deserialize;
use tokio::process::{Child, Command};

/// Everything that makes one benchmark Tally separate from other Tallys on the same stack.
#[derive(Debug, Clone)]
pub struct TallyServerSettings {
    pub binary: PathBuf,
    pub database_url: String,
    pub redis_url: String,
    pub redis_prefix: String,
    pub kafka_topic: String,
    pub aggregator_group: String,
    /// `None` keeps Tally's default (5 s), the setting the published numbers use.
    pub window_ms: Option<u64>,
    pub log_file: PathBuf,
}

pub struct TallyServer {
    child: Child,
    pub base_url: String,
    pub log_file: PathBuf,
}

#[derive(Deserialize)]
struct CounterReadBody {
    source: String,
}

/// A port nobody listens on right now. Another process could take it before Tally binds it,
/// but on loopback during a benchmark that race is theoretical; Tally then fails loudly.
fn free_loopback_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The last lines of Tally's log, for error messages.
fn log_tail(log_file: &Path) -> String {
    let log = std::fs::read_to_string(log_file).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

impl TallyServer {
    /// Starts Tally and waits until it is ready and serves reads from Redis (the aggregator has
    /// published its first closed windows), so no scenario measures a warming-up process.
    pub async fn start(settings: &TallyServerSettings) -> anyhow::Result<Self> {
        if !settings.binary.is_file() {
            bail!(
                "no Tally binary at {}: build it with `cargo build --release -p tally` or pass --tally-bin",
                settings.binary.display()
            );
        }
        let port = free_loopback_port()?;
        let log = File::create(&settings.log_file)
            .with_context(|| format!("creating {}", settings.log_file.display()))?;
        let mut command = Command::new(&settings.binary);
        command
            .arg("serve")
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--database-url")
            .arg(&settings.database_url)
            .arg("--redis-url")
            .arg(&settings.redis_url)
            .arg("--redis-prefix")
            .arg(&settings.redis_prefix)
            .arg("--kafka-topic")
            .arg(&settings.kafka_topic)
            .arg("--aggregator-group")
            .arg(&settings.aggregator_group);
        if let Some(window_ms) = settings.window_ms {
            command.arg("--window-ms").arg(window_ms.to_string());
        }
        command
            .env("TALLY_LOG", "info,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // If the benchmark itself dies, the server must not outlive it.
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", settings.binary.display()))?;
        let mut server = Self {
            child,
            base_url: format!("http://127.0.0.1:{port}"),
            log_file: settings.log_file.clone(),
        };
        if let Err(error) = server.wait_until_serving().await {
            server.stop().await;
            return Err(error.context(format!(
                "Tally did not become ready; the end of {}:\n{}",
                settings.log_file.display(),
                log_tail(&settings.log_file)
            )));
        }
        Ok(server)
    }

    async fn wait_until_serving(&mut self) -> anyhow::Result<()> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let warm_up_url = format!("{}/v1/counters/bench-warm-up?fresh=true", self.base_url);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("Tally exited early with {status}");
            }
            let ready = matches!(
                http.get(format!("{}/readyz", self.base_url)).send().await,
                Ok(response) if response.status().is_success()
            );
            if ready {
                let source = match http.get(&warm_up_url).send().await {
                    Ok(response) => response
                        .json::<CounterReadBody>()
                        .await
                        .map(|body| body.source)
                        .ok(),
                    Err(_) => None,
                };
                if source.as_deref() == Some("redis") {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("not ready and serving reads from Redis after 120 s");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Stops Tally the way an operator would (SIGTERM, so it drains cleanly), and kills it if it
    /// has not exited within 40 s (its own shutdown timeout is 30 s).
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // Only this process, by its own pid: the stack and everyone else's Tally stay up.
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        if tokio::time::timeout(Duration::from_secs(40), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
