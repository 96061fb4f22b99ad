//! The Tally processes of one scenario, and the signals the faults send them.
//!
//! Roles run as separate processes (`tally serve --roles ingest,read` and one or more
//! `tally serve --roles aggregator`) so one role can be killed, stopped or paused alone. Every
//! signal goes to one child of ours, by its pid; nothing is ever found or signalled by name.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

use crate::checker::PipelineTiming;

/// Where the stores are and what isolates this scenario from every other one.
#[derive(Debug, Clone)]
pub struct TallySettings {
    pub binary: PathBuf,
    pub redis_url: String,
    pub database_url: String,
    pub kafka_brokers: String,
    pub kafka_topic: String,
    pub kafka_partitions: u32,
    pub redis_prefix: String,
    pub aggregator_group: String,
    pub timing: PipelineTiming,
    /// Logs of the processes go here, one file per process, appended to across restarts.
    pub log_dir: PathBuf,
    /// A pid file per running process, so `deploy/faults.sh` can stop our processes by pid if
    /// this binary itself dies.
    pub pid_dir: PathBuf,
    /// `TALLY_AGGREGATOR_MAX_PENDING` for the scenario's processes; `None` leaves Tally's default.
    pub aggregator_max_pending: Option<u64>,
}

impl TallySettings {
    fn store_args(&self) -> Vec<String> {
        [
            ("--redis-url", self.redis_url.clone()),
            ("--redis-prefix", self.redis_prefix.clone()),
            ("--kafka-brokers", self.kafka_brokers.clone()),
            ("--kafka-topic", self.kafka_topic.clone()),
            ("--kafka-partitions", self.kafka_partitions.to_string()),
            ("--database-url", self.database_url.clone()),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_owned(), value])
        .collect()
    }

    /// Starts `tally replay` with the scenario's stores and pipeline settings (those the
    /// aggregators run with, so it waits for the right group and windows). Its progress goes to
    /// stdout, which the caller reads; its log to `replay.log`.
    pub fn start_replay(&self) -> anyhow::Result<Child> {
        let log = open_log(&self.log_dir.join("replay.log"))?;
        tally_command(&self.binary)
            .arg("replay")
            .args(self.store_args())
            .args(self.pipeline_args())
            .arg("--aggregator-group")
            .arg(&self.aggregator_group)
            .env("TALLY_LOG", "info,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} replay", self.binary.display()))
    }

    /// The window, produce timeout and clock skew every process (and the checker) agrees on.
    fn pipeline_args(&self) -> Vec<String> {
        [
            ("--window-ms", self.timing.window),
            ("--produce-timeout-ms", self.timing.produce_timeout),
            ("--clock-skew-ms", self.timing.clock_skew),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_owned(), value.as_millis().to_string()])
        .collect()
    }

    /// `tally migrate`, once per scenario before any process starts, so the processes do not
    /// race each other to create the schema.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let log = open_log(&self.log_dir.join("migrate.log"))?;
        let status = tally_command(&self.binary)
            .arg("migrate")
            .arg("--database-url")
            .arg(&self.database_url)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .status()
            .await
            .with_context(|| format!("running {} migrate", self.binary.display()))?;
        if !status.success() {
            bail!(
                "tally migrate failed with {status}; see {}",
                self.log_dir.join("migrate.log").display()
            );
        }
        Ok(())
    }
}

/// Which roles a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleSet {
    IngestAndRead,
    Aggregator,
}

impl RoleSet {
    fn flag(self) -> &'static str {
        match self {
            RoleSet::IngestAndRead => "ingest,read",
            RoleSet::Aggregator => "aggregator",
        }
    }
}

/// One Tally process we started, which the faults may kill, stop and start again.
#[derive(Debug)]
pub struct TallyProcess {
    pub name: String,
    pub roles: RoleSet,
    pub http_port: u16,
    settings: TallySettings,
    child: Option<Child>,
    /// Set while the process is stopped with SIGSTOP.
    paused: bool,
}

impl TallyProcess {
    pub async fn start(
        name: &str,
        roles: RoleSet,
        settings: &TallySettings,
    ) -> anyhow::Result<Self> {
        let mut process = TallyProcess {
            name: name.to_owned(),
            roles,
            http_port: free_loopback_port()?,
            settings: settings.clone(),
            child: None,
            paused: false,
        };
        process.spawn()?;
        Ok(process)
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    fn log_path(&self) -> PathBuf {
        self.settings.log_dir.join(format!("{}.log", self.name))
    }

    /// The pid file of the running process (rewritten on every start).
    pub fn pid_path(&self) -> PathBuf {
        self.settings.pid_dir.join(format!("{}.pid", self.name))
    }

    /// Starts the process (again), on the same port, with the same settings.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let timing = &self.settings.timing;
        let mut log = open_log(&self.log_path())?;
        writeln!(
            log,
            "=== tally-faults: starting {} ({}) ===",
            self.name,
            self.roles.flag()
        )?;
        let mut command = tally_command(&self.settings.binary);
        command
            .arg("serve")
            .arg("--roles")
            .arg(self.roles.flag())
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{}", self.http_port))
            .args(self.settings.store_args())
            .args(self.settings.pipeline_args())
            .arg("--aggregator-group")
            .arg(&self.settings.aggregator_group)
            .arg("--read-cache-ttl-ms")
            .arg(timing.read_cache_ttl.as_millis().to_string())
            .arg("--migrate-on-start")
            .arg("false")
            .arg("--auto-replay")
            .arg("true")
            .arg("--shutdown-timeout-secs")
            .arg("10")
            .env("TALLY_LOG", "info,sqlx=warn")
            // The set mode's admin client sets counters and reads the audit trail; a variable
            // rather than `--admin-token`, so the token is not in every process listing.
            .env("TALLY_ADMIN_TOKEN", crate::sets::ADMIN_TOKEN)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // If this binary dies, its Tally processes must not outlive it.
            .kill_on_drop(true);
        if let Some(max_pending) = self.settings.aggregator_max_pending {
            // A variable rather than `--aggregator-max-pending`: a Tally that predates the
            // setting ignores it and still starts (and then fails the memory bound, which is
            // the finding), where an unknown flag would stop it at once.
            command.env("TALLY_AGGREGATOR_MAX_PENDING", max_pending.to_string());
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.settings.binary.display()))?;
        if let Some(pid) = child.id() {
            std::fs::write(self.pid_path(), format!("{pid}\n"))?;
        }
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    fn pid(&self) -> anyhow::Result<u32> {
        self.child
            .as_ref()
            .and_then(Child::id)
            .with_context(|| format!("{} is not running", self.name))
    }

    /// `kill -9`, and reap it.
    pub async fn kill_hard(&mut self) -> anyhow::Result<()> {
        let mut child = self
            .child
            .take()
            .with_context(|| format!("{} is not running", self.name))?;
        child.start_kill()?;
        child.wait().await?;
        self.forget_pid();
        Ok(())
    }

    /// SIGTERM (Tally's clean shutdown) and wait for the exit; `kill -9` after `patience`.
    pub async fn terminate(&mut self, patience: Duration) -> anyhow::Result<ExitStatus> {
        if self.paused {
            self.resume().await?;
        }
        let pid = self.pid()?;
        send_signal(pid, "TERM").await?;
        let mut child = self.child.take().expect("pid() checked the child exists");
        let status = match tokio::time::timeout(patience, child.wait()).await {
            Ok(status) => status?,
            Err(_) => {
                child.start_kill()?;
                child.wait().await?
            }
        };
        self.forget_pid();
        Ok(status)
    }

    /// SIGSTOP: the process keeps its sockets and Kafka membership but does nothing.
    pub async fn pause(&mut self) -> anyhow::Result<()> {
        send_signal(self.pid()?, "STOP").await?;
        self.paused = true;
        Ok(())
    }

    /// SIGCONT.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        send_signal(self.pid()?, "CONT").await?;
        self.paused = false;
        Ok(())
    }

    /// `Some(status)` when the process exited without us stopping it (a crash, or a role that
    /// gave up): the runner reports it and starts the process again, like a supervisor would.
    pub fn exited_by_itself(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                self.forget_pid();
                Some(status)
            }
            _ => None,
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn forget_pid(&self) {
        let _ = std::fs::remove_file(self.pid_path());
    }
}

impl Drop for TallyProcess {
    fn drop(&mut self) {
        // kill_on_drop does the killing; a stopped process must not stay stopped meanwhile.
        self.forget_pid();
    }
}

/// Waits until the ingest and read process answers `/readyz` and serves reads from Redis (the
/// aggregator has published closed windows and Redis is marked complete).
pub async fn wait_until_serving(
    tally: &crate::client::TallyClient,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if tally.answers_ok("/readyz").await {
            if let Ok(read) = tally.read("faults-warm-up", true).await {
                if read.source == "redis" && !read.stale {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            bail!(
                "tally at {} did not serve reads from redis within {timeout:?}",
                tally.base_url()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A command running the Tally binary with no TALLY_* variable of ours: every setting comes
/// from flags, so an API key, a rate limit or another stack's URL in the environment of whoever
/// runs the suite cannot change what it tests.
fn tally_command(binary: &Path) -> Command {
    let mut command = Command::new(binary);
    for (variable, _) in std::env::vars_os() {
        if variable.to_string_lossy().starts_with("TALLY_") {
            command.env_remove(variable);
        }
    }
    command
}

/// Sends a signal with kill(1), to exactly one pid. (No `unsafe` libc call needed.)
pub async fn send_signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .await
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed with {status}");
    }
    Ok(())
}

/// A port nobody listens on right now. Another process could take it before Tally binds it, but
/// on loopback that race is theoretical, and Tally then fails loudly.
pub fn free_loopback_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

pub fn open_log(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}
