//! The suite's own Redis, PostgreSQL and Kafka, restarted through `deploy/local/{up,down}.sh`
//! pointed at a separate state directory and separate ports.
//!
//! The shared stack (`<repo>/.local`, ports 6379/5432/9092/9093) serves other people's tests;
//! [`Stack::new`] refuses to touch it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

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

/// Longest wait for one `redis-cli` command: the suite's scripts run over at most tens of
/// thousands of keys, in milliseconds; more means Redis is stuck.
const REDIS_COMMAND_PATIENCE: Duration = Duration::from_secs(30);

/// A process that exists and is not a zombie (a SIGKILLed daemon is re-parented to PID 1, which
/// may reap it only seconds later; its port is free as soon as it is a zombie).
async fn process_alive(pid: u32) -> bool {
    match tokio::fs::read_to_string(format!("/proc/{pid}/status")).await {
        Ok(status) => !status
            .lines()
            .any(|line| line.starts_with("State:") && line.contains('Z')),
        Err(_) => false,
    }
}

fn info_number(info: &str, field: &str) -> Option<u64> {
    info.lines()
        .find_map(|line| line.trim_end().strip_prefix(field)?.strip_prefix(':'))?
        .parse()
        .ok()
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

    /// `kill -9` the Redis server, through the pid file up.sh keeps, and wait until it is gone
    /// (so its port is free for up.sh). It saves nothing on its way out.
    pub async fn kill_redis_hard(&self) -> anyhow::Result<()> {
        let pid = self.server_pid(Service::Redis).await?;
        send_signal(pid, "KILL").await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_alive(pid).await {
            ensure!(
                Instant::now() < deadline,
                "redis (pid {pid}) still alive 10 s after SIGKILL"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Where `SAVE` writes and where a starting Redis loads from: up.sh starts it with
    /// `--dir <local-dir>/redis` and the default `dbfilename`.
    pub fn redis_snapshot_path(&self) -> PathBuf {
        self.local_dir.join("redis").join("dump.rdb")
    }

    /// One Redis command through `redis-cli` (which the stack scripts need anyway), so the
    /// suite needs no Redis client of its own. `-e` makes an error reply a failure; the output
    /// is the raw reply, one line per element.
    pub async fn redis_command(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut command = Command::new("redis-cli");
        command
            .arg("-e")
            .arg("-h")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.ports.redis.to_string())
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(REDIS_COMMAND_PATIENCE, command.output())
            .await
            .with_context(|| format!("redis-cli {} took over {REDIS_COMMAND_PATIENCE:?}", args[0]))?
            .context("running redis-cli")?;
        ensure!(
            output.status.success(),
            "redis-cli {} failed with {}: {}",
            args[0],
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// One numeric field of `INFO <section>`, such as `used_memory` or `evicted_keys`.
    pub async fn redis_info_number(&self, section: &str, field: &str) -> anyhow::Result<u64> {
        let info = self.redis_command(&["INFO", section]).await?;
        info_number(&info, field).with_context(|| format!("INFO {section} has no {field}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_fields_are_found_by_their_exact_name() {
        let info =
            "# Memory\r\nused_memory:1049200\r\nused_memory_human:1.00M\r\nused_memory_rss:9\r\n";
        assert_eq!(info_number(info, "used_memory"), Some(1_049_200));
        assert_eq!(info_number(info, "used_memory_rss"), Some(9));
        assert_eq!(info_number(info, "evicted_keys"), None);
    }
}
