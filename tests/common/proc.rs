//! The `barge` binary as a separate process: commands, and agents whose address is
//! read from their log, that can be killed (or kill themselves at a failpoint) and
//! started again.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Runs `barge ARGS` in `cwd` and waits for it.
pub fn barge(args: &[&str], cwd: &Path) -> Output {
    command(args, cwd).output().unwrap()
}

/// `barge ARGS` in `cwd`, not started yet, with no identity from the environment.
pub fn command(args: &[&str], cwd: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_barge"));
    c.args(args)
        .current_dir(cwd)
        .env_remove("BARGE_CERTS")
        .env_remove("BARGE_IDENTITY")
        .env_remove("BARGE_FAILPOINT");
    c
}

/// Asserts success; returns stdout.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Asserts exit code `code` and a single error line on stderr containing `want`.
pub fn fails(out: &Output, code: i32, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("barge:")).collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    assert!(lines[0].contains(want), "expected {want:?} in {err}");
}

/// A CA in `p/certs` and an identity for each of `names`, made by `barge certs`.
pub fn make_certs(p: &Path, names: &[&str]) {
    ok(&barge(&["certs", "init", "--dir", "certs"], p));
    for name in names {
        ok(&barge(&["certs", "issue", name, "--dir", "certs"], p));
    }
}

/// A running `barge agent`; killed when dropped.
pub struct AgentProc {
    pub child: Child,
    /// The address from its "agent listening" log line.
    pub addr: String,
    log: Arc<Mutex<String>>,
}

impl AgentProc {
    /// Starts `barge agent ARGS` in `cwd` with `envs` and waits until it listens.
    pub fn start(args: &[&str], cwd: &Path, envs: &[(&str, &str)]) -> AgentProc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_barge"))
            .arg("agent")
            .args(args)
            .current_dir(cwd)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(envs.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let log = Arc::new(Mutex::new(String::new()));
        let addr = loop {
            let Some(Ok(line)) = lines.next() else {
                panic!("agent exited: {}", log.lock().unwrap())
            };
            let plain = strip_ansi(&line);
            log.lock().unwrap().push_str(&format!("{plain}\n"));
            if let Some(rest) = plain
                .split("addr=")
                .nth(1)
                .filter(|_| plain.contains("agent listening"))
            {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        let rest = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                rest.lock().unwrap().push_str(&format!("{}\n", strip_ansi(&line)));
            }
        });
        AgentProc { child, addr, log }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits up to `limit` for it to exit by itself (a failpoint).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for c in s.chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}
