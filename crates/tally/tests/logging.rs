//! Log lines a collector can take: no colour codes when stderr is not a terminal, one JSON
//! object per line with `TALLY_LOG_FORMAT=json`, and a bad format stops the start.
//!
//! These run the built binary with stderr piped, as a container runtime or systemd does. The
//! process never touches a store: it runs only the read role, without migrations, against ports
//! nothing listens on, and every connection it makes is lazy.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

fn dead_port() -> u16 {
    // Bound and dropped: nothing listens there afterwards.
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `tally` with a clean logging environment: the filter shows info lines, and nothing in the
/// caller's environment (`NO_COLOR`, a format of its own) decides the outcome for the test.
fn tally() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .env("TALLY_LOG", "info")
        .env_remove("TALLY_LOG_FORMAT")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// Runs `tally serve` until it logs that it serves, stops it with SIGTERM, and returns
/// everything it wrote to stderr, line by line.
fn serve_and_stop(log_format: Option<&str>) -> Vec<String> {
    let mut command = tally();
    command
        .args(["serve", "--roles", "read", "--migrate-on-start", "false"])
        .args(["--http-addr", "127.0.0.1:0"])
        .args(["--redis-url", &format!("redis://127.0.0.1:{}", dead_port())])
        .args(["--kafka-brokers", &format!("127.0.0.1:{}", dead_port())])
        .args([
            "--database-url",
            &format!("postgres://tally:tally@127.0.0.1:{}/tally", dead_port()),
        ]);
    if let Some(log_format) = log_format {
        command.env("TALLY_LOG_FORMAT", log_format);
    }
    let mut child = command.spawn().expect("the tally binary should start");
    let lines_rx = stderr_lines(&mut child);
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lines
        .iter()
        .any(|line: &String| line.contains("tally serving"))
    {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match lines_rx.recv_timeout(remaining) {
            Ok(line) => lines.push(line),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tally did not log that it serves; stderr so far: {lines:#?}");
            }
        }
    }
    let terminated = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let status = wait_with_timeout(&mut child, Duration::from_secs(30));
    assert!(status.success(), "tally should stop cleanly on SIGTERM");
    // The reader thread ends when the pipe closes, after the process exited.
    lines.extend(lines_rx.iter());
    lines
}

/// Each line the child writes to stderr, from a thread of its own.
fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("stderr should be piped");
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    lines_rx
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tally did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_no_ansi(lines: &[String]) {
    for line in lines {
        assert!(
            !line.contains("\x1b["),
            "a log line on a pipe carries an ANSI escape: {line:?}"
        );
    }
}

#[test]
fn text_logs_on_a_pipe_carry_no_colour_codes() {
    let lines = serve_and_stop(None);
    assert_no_ansi(&lines);
    let serving = lines
        .iter()
        .find(|line| line.contains("tally serving"))
        .unwrap();
    assert!(serving.contains("INFO"), "{serving}");
    assert!(
        lines.iter().any(|line| line.contains("tally stopped")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().all(|line| !line.starts_with('{')),
        "text is the default format: {lines:#?}"
    );
}

/// Every line is one JSON object with the fields a collector indexes on.
fn parse_json_lines(lines: &[String]) -> Vec<Value> {
    assert_no_ansi(lines);
    assert!(!lines.is_empty(), "tally logged nothing");
    lines
        .iter()
        .map(|line| {
            let event: Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("not a JSON line ({error}): {line:?}"));
            for field in ["timestamp", "level", "target", "message"] {
                assert!(event[field].is_string(), "{field} missing: {line}");
            }
            event
        })
        .collect()
}

#[test]
fn json_logs_are_one_object_per_line() {
    let events = parse_json_lines(&serve_and_stop(Some("json")));
    let serving = events
        .iter()
        .find(|event| event["message"] == "tally serving")
        .expect("the serving line should be logged");
    assert_eq!(serving["level"], "INFO");
    assert!(
        serving["http.addr"]
            .as_str()
            .is_some_and(|address| address.starts_with("127.0.0.1:")),
        "the structured fields sit beside the message: {serving}"
    );
    for message in ["shutdown requested", "tally stopped"] {
        assert!(
            events.iter().any(|event| event["message"] == message),
            "{message} missing: {events:#?}"
        );
    }
}

#[test]
fn with_json_logs_a_failed_start_is_a_json_line_too() {
    let output = tally()
        .args(["migrate", "--log-format", "json"])
        .args([
            "--database-url",
            &format!("postgres://tally:tally@127.0.0.1:{}/tally", dead_port()),
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    let lines: Vec<String> = stderr.lines().map(str::to_owned).collect();
    let events = parse_json_lines(&lines);
    let failure = events
        .iter()
        .find(|event| event["level"] == "ERROR")
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(
        failure["error"]
            .as_str()
            .unwrap()
            .contains("failed to apply the migrations"),
        "{failure}"
    );
}

#[test]
fn an_unknown_log_format_stops_the_start() {
    let output = tally()
        .args(["serve", "--roles", "read", "--http-addr", "127.0.0.1:0"])
        .env("TALLY_LOG_FORMAT", "jsno")
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(2),
        "a usage error, before anything starts"
    );
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("'jsno'") && stderr.contains("TALLY_LOG_FORMAT"),
        "the error names the value and the variable: {stderr}"
    );
    assert!(stderr.contains("`text` or `json`"), "{stderr}");
    assert!(!stderr.contains("tally serving"), "{stderr}");
}
