//! The suite's own Redis, PostgreSQL and Kafka, restarted through `deploy/local/{up,down}.sh`
//! pointed at a separate state directory and separate ports.
//!
//! The shared stack (`<repo>/.local`, ports 6379/5432/9092/9093) serves other people's tests;
//! [`Stack::new`] refuses to touch it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context as _, bail, ensure};
use tokio::process::Command;

use crate::processes::{open_log, send_signal};

/// The ports of the suite's stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackPorts {
    pub redis: u16,
    pub postgres: u16,
    pub kafka: u16,
    pub kafka_controller: u16,
}

/// The default stack's ports, which the suite must never use.
const SHARED_STACK_PORTS: [u16; 4] = [6379, 5432, 9092, 9093];

/// One service of the stack, named as the scripts name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Redis,
    Postgres,
    Kafka,
}

impl Service {
    fn script_name(self) -> &'static str {
        match self {
            Service::Redis => "redis",
            Service::Postgres => "postgres",
            Service::Kafka => "kafka",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Stack {
    /// `<repo>/deploy/local`.
    scripts_dir: PathBuf,
    /// The isolated stack's state (`TALLY_LOCAL_DIR` for the scripts).
    local_dir: PathBuf,
    pub ports: StackPorts,
    /// The scripts' output goes here rather than to our report.
    log_path: PathBuf,
}

impl Stack {
    /// Checks that `local_dir` and `ports` are not the shared stack's, so no fault can ever
    /// restart a server someone else is using.
    pub fn new(
        scripts_dir: &Path,
        local_dir: &Path,
        ports: StackPorts,
        log_path: &Path,
    ) -> anyhow::Result<Self> {
        let scripts_dir = scripts_dir
            .canonicalize()
            .with_context(|| format!("no scripts directory {}", scripts_dir.display()))?;
        ensure!(
            scripts_dir.join("up.sh").is_file() && scripts_dir.join("down.sh").is_file(),
            "{} has no up.sh/down.sh",
            scripts_dir.display()
        );
        let local_dir = local_dir.canonicalize().with_context(|| {
            format!("the stack directory {} does not exist", local_dir.display())
        })?;
        let repo_root = scripts_dir
            .parent()
            .and_then(Path::parent)
            .context("deploy/local has no repository above it")?;
        let shared_local_dir = repo_root.join(".local");
        if shared_local_dir.canonicalize().ok().as_deref() == Some(local_dir.as_path()) {
            bail!(
                "{} is the shared stack's directory; the suite needs its own (TALLY_LOCAL_DIR)",
                local_dir.display()
            );
        }
        for port in [
            ports.redis,
            ports.postgres,
            ports.kafka,
            ports.kafka_controller,
        ] {
            ensure!(
                !SHARED_STACK_PORTS.contains(&port),
                "port {port} belongs to the shared stack; the suite restarts its servers, so it must run on other ports"
            );
        }
        Ok(Stack {
            scripts_dir,
            local_dir,
            ports,
            log_path: log_path.to_owned(),
        })
    }

    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.ports.redis)
    }

    pub fn database_url(&self, database: &str) -> String {
        format!(
            "postgres://tally:tally@127.0.0.1:{}/{database}",
            self.ports.postgres
        )
    }

    pub fn kafka_brokers(&self) -> String {
        format!("127.0.0.1:{}", self.ports.kafka)
    }

    /// `down.sh SERVICE`: stops it by its pid file (PostgreSQL: fast shutdown; Kafka: controlled
    /// shutdown). Redis keeps nothing on disk, so it comes back empty.
    pub async fn stop(&self, service: Service) -> anyhow::Result<()> {
        self.run_script("down.sh", service).await
    }

    /// `up.sh SERVICE`: starts it again and waits until it answers.
    pub async fn start(&self, service: Service) -> anyhow::Result<()> {
        self.run_script("up.sh", service).await
    }

    async fn run_script(&self, script: &str, service: Service) -> anyhow::Result<()> {
        let log = open_log(&self.log_path)?;
        let path = self.scripts_dir.join(script);
        let status = Command::new(&path)
            .arg(service.script_name())
            .env("TALLY_LOCAL_DIR", &self.local_dir)
            .env("TALLY_REDIS_PORT", self.ports.redis.to_string())
            .env("TALLY_PG_PORT", self.ports.postgres.to_string())
            .env("TALLY_KAFKA_PORT", self.ports.kafka.to_string())
            .env(
                "TALLY_KAFKA_CONTROLLER_PORT",
                self.ports.kafka_controller.to_string(),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .await
            .with_context(|| format!("running {}", path.display()))?;
        ensure!(
            status.success(),
            "{script} {} failed with {status}; see {}",
            service.script_name(),
            self.log_path.display()
        );
        Ok(())
    }

    /// The suite's Redis server or Kafka broker, from the pid file up.sh keeps, checked
    /// against `/proc` so a stale pid file can never make us signal another process.
    async fn server_pid(&self, service: Service) -> anyhow::Result<u32> {
        let (pid_file, must_contain) = match service {
            Service::Redis => (
                self.local_dir.join("redis").join("redis.pid"),
                vec![
                    "redis-server".to_owned(),
                    format!("127.0.0.1:{}", self.ports.redis),
                ],
            ),
            Service::Kafka => (
                self.local_dir.join("kafka").join("kafka.pid"),
                vec![format!(
                    "kafka.Kafka {}",
                    self.local_dir
                        .join("kafka")
                        .join("server.properties")
                        .display()
                )],
            ),
            // PostgreSQL is a postmaster with backends: stopping only the postmaster would not
            // stop the database, so the suite never pauses it.
            Service::Postgres => bail!("the suite does not pause postgres"),
        };
        let pid: u32 = tokio::fs::read_to_string(&pid_file)
            .await
            .with_context(|| format!("reading {}", pid_file.display()))?
            .trim()
            .parse()
            .with_context(|| format!("{} holds no pid", pid_file.display()))?;
        let command_line = tokio::fs::read(format!("/proc/{pid}/cmdline"))
            .await
            .unwrap_or_default();
        let command_line = String::from_utf8_lossy(&command_line).replace('\0', " ");
        ensure!(
            must_contain.iter().all(|part| command_line.contains(part)),
            "pid {pid} from {} is not our {} server",
            pid_file.display(),
            service.script_name()
        );
        Ok(pid)
    }

    /// SIGSTOP the server: it keeps its connections open but answers nothing.
    pub async fn pause(&self, service: Service) -> anyhow::Result<()> {
        send_signal(self.server_pid(service).await?, "STOP").await
    }

    /// SIGCONT.
    pub async fn resume(&self, service: Service) -> anyhow::Result<()> {
        send_signal(self.server_pid(service).await?, "CONT").await
    }
}
