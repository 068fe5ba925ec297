//! A receiving host for the trials: certificates, a config, a `barge agent` process that
//! can be killed (SIGKILL) and started again at the same address, and `barge push`
//! processes against it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BARGE: &str = env!("CARGO_BIN_EXE_barge");

/// Runs `barge ARGS` in `cwd` and returns (exit code, stdout, stderr).
pub fn barge(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let out = Command::new(BARGE).args(args).current_dir(cwd).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// A CA and the identities `store-b` (the agent) and `ops`, `ops2` (senders) in `dir/certs`.
pub fn make_certs(dir: &Path) {
    assert_eq!(barge(&["certs", "init", "--dir", "certs"], dir).0, 0);
    for name in ["store-b", "ops", "ops2"] {
        assert_eq!(barge(&["certs", "issue", name, "--dir", "certs"], dir).0, 0);
    }
}

/// A free UDP port on loopback (free now; the agent binds it right after).
pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One receiving host: its folder holds `certs/`, `b.toml`, `state/` and the targets.
pub struct Host {
    pub dir: PathBuf,
    pub addr: String,
    /// TOML inserted before `[tls]` (limits, max_jobs, ...).
    pub top: String,
    /// `[[import]]` tables.
    pub targets: String,
    /// Extra environment of the agent (RUST_LOG, a failpoint).
    pub env: Vec<(String, String)>,
    agent: Option<Agent>,
}

impl Host {
    pub fn new(dir: &Path, ip: &str, targets: &str) -> Host {
        std::fs::create_dir_all(dir).unwrap();
        if !dir.join("certs/ca.pem").exists() {
            make_certs(dir);
        }
        Host {
            dir: dir.to_path_buf(),
            addr: format!("{ip}:{}", free_port()),
            top: String::new(),
            targets: targets.to_string(),
            env: vec![],
            agent: None,
        }
    }

    pub fn peer(&self) -> String {
        format!("store-b@{}", self.addr)
    }

    fn write_config(&self) {
        let text = format!(
            "listen = \"{}\"\ndata_dir = \"state\"\n{}\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/store-b.pem\"\nkey = \"certs/store-b.key\"\n{}",
            self.addr, self.top, self.targets
        );
        std::fs::write(self.dir.join("b.toml"), text).unwrap();
    }

    /// Starts the agent (with `failpoint`, if any) and waits until it listens.
    pub fn start(&mut self, failpoint: Option<&str>) -> &mut Agent {
        self.stop();
        self.write_config();
        let mut cmd = Command::new(BARGE);
        // The absolute path names the agent as the trials' own (trials.sh stops them by it).
        cmd.arg("agent")
            .arg("--config")
            .arg(self.dir.join("b.toml"))
            .current_dir(&self.dir)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,barge::transfer=debug,barge::agent::handover=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(f) = failpoint {
            cmd.env("BARGE_FAILPOINT", f);
        }
        self.agent = Some(Agent::spawn(cmd));
        self.agent.as_mut().unwrap()
    }

    /// The running agent.
    pub fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("agent running")
    }

    pub fn running(&mut self) -> bool {
        self.agent.as_mut().is_some_and(|a| a.alive())
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill();
        }
    }

    /// Stops the agent (SIGKILL too: nothing it promised may depend on a clean stop).
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts `barge push PATHS --to this host --import TARGET --json` as `who`.
    pub fn push(&self, who: &str, paths: &[&str], target: &str, extra: &[&str]) -> Push {
        let mut args: Vec<String> = vec!["push".into()];
        args.extend(paths.iter().map(|p| p.to_string()));
        for a in [
            "--to",
            &self.peer(),
            "--import",
            target,
            "--certs",
            "certs",
            "--identity",
            who,
        ] {
            args.push(a.to_string());
        }
        args.extend(["--json".to_string(), "--hash-cache".into(), format!("hashes-{who}")]);
        args.extend(extra.iter().map(|s| s.to_string()));
        Push::spawn(Command::new(BARGE).args(&args).current_dir(&self.dir))
    }

    /// Runs `barge ARGS --certs certs --identity ops` against this host.
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        self.run_as("ops", args)
    }

    /// Runs `barge ARGS --certs certs --identity WHO` against this host.
    pub fn run_as(&self, who: &str, args: &[&str]) -> (i32, String, String) {
        let mut all = args.to_vec();
        all.extend(["--certs", "certs", "--identity", who]);
        barge(&all, &self.dir)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running `barge agent`: its log lines as they come, and its pid.
pub struct Agent {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    fn spawn(mut cmd: Command) -> Agent {
        let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let log = Arc::new(Mutex::new(vec![]));
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                keep.lock().unwrap().push(line.clone());
                let _ = tx.send((Instant::now(), line));
            }
        });
        let mut a = Agent { child, lines, log };
        assert!(
            a.wait_line("agent listening", Duration::from_secs(20)).is_some(),
            "agent did not start: {}",
            a.log().join("\n")
        );
        a
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a log line containing `text`; returns when it was seen.
    pub fn wait_line(&mut self, text: &str, limit: Duration) -> Option<Instant> {
        let until = Instant::now() + limit;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) if line.contains(text) => return Some(at),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits up to `limit` for the agent to exit by itself (a failpoint).
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if !self.alive() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Peak resident memory so far, MiB (VmHWM).
    pub fn peak_rss_mib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let kib: u64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        kib / 1024
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `barge push` process.
pub struct Push {
    child: Child,
    pub started: Instant,
}

/// How a push ended.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub code: i32,
    pub json: Option<serde_json::Value>,
    pub stderr: String,
    pub secs: f64,
}

impl Pushed {
    pub fn num(&self, key: &str) -> u64 {
        self.json.as_ref().and_then(|j| j[key].as_u64()).unwrap_or(u64::MAX)
    }

    pub fn report(&self) -> String {
        self.json
            .as_ref()
            .and_then(|j| j["report"].as_str())
            .unwrap_or("")
            .to_string()
    }
}

impl Push {
    fn spawn(cmd: &mut Command) -> Push {
        let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        Push {
            child,
            started: Instant::now(),
        }
    }

    /// Waits for it to end.
    pub fn wait(self) -> Pushed {
        let started = self.started;
        let out = self.child.wait_with_output().unwrap();
        Pushed {
            code: out.status.code().unwrap_or(-1),
            json: serde_json::from_slice(&out.stdout).ok(),
            stderr: String::from_utf8_lossy(&out.stderr).to_string(),
            secs: started.elapsed().as_secs_f64(),
        }
    }

    /// SIGKILL.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
