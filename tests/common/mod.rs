//! Shared test setup: certificates made by barge's own certs code, real agents on
//! 127.0.0.1:0, a client with its own identity.
#![allow(dead_code)]

pub mod crafted;
pub mod ldb;
pub mod proc;

use barge::agent::{Agent, Hooks};
use barge::client::{Client, Peer};
use barge::config::Config;
use barge::net::tls::TlsFiles;
use std::path::{Path, PathBuf};

pub struct Env {
    pub dir: tempfile::TempDir,
    pub agent: Agent,
    pub config_path: PathBuf,
}

impl Env {
    pub fn root(&self) -> &Path {
        self.dir.path()
    }
    pub fn certs(&self) -> PathBuf {
        self.root().join("certs")
    }
    pub fn inbox(&self) -> PathBuf {
        self.root().join("inbox")
    }
    pub fn outbox(&self) -> PathBuf {
        self.root().join("outbox")
    }
    pub fn src(&self) -> PathBuf {
        self.root().join("src")
    }
    pub fn peer(&self) -> Peer {
        format!("agent@{}", self.agent.local_addr()).parse().unwrap()
    }
    pub fn client(&self, identity: &str) -> Client {
        Client::new(&TlsFiles::in_dir(&self.certs(), identity)).unwrap()
    }
    /// Restarts the agent on the same configuration (and so the same folders).
    pub async fn restart(self) -> Env {
        let Env {
            dir,
            agent,
            config_path,
        } = self;
        agent.shutdown().await;
        let agent = Agent::start(Config::load(&config_path).unwrap()).await.unwrap();
        Env {
            dir,
            agent,
            config_path,
        }
    }
}

/// Where the agent configured in `config` stages the jobs of import target `name`.
pub fn staging_of(config: &Path, name: &str) -> PathBuf {
    let config = Config::load(config).unwrap();
    config.import(name).expect("import target").staging.clone()
}

impl Env {
    /// Where the agent stages the jobs of import target `name`.
    pub fn staging(&self, name: &str) -> PathBuf {
        staging_of(&self.config_path, name)
    }
}

/// Default import target `in` (hook `move`) and export `out`, both allowing `client`.
pub const DEFAULT_TARGETS: &str = "[[import]]\nname = \"in\"\npath = \"inbox\"\nallow = [\"client\"]\n\
[[export]]\nname = \"out\"\npath = \"outbox\"\nallow = [\"client\"]\n";

pub async fn env() -> Env {
    env_with(DEFAULT_TARGETS, "", Hooks::new()).await
}

/// An agent named `agent` with `targets`; `extra` goes before the tables.
pub async fn env_with(targets: &str, extra: &str, hooks: Hooks) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    barge::net::certs::init_ca(&certs).unwrap();
    for name in ["agent", "client", "stranger"] {
        barge::net::certs::issue(&certs, name, &[]).unwrap();
    }
    for d in ["inbox", "outbox", "src", "clear"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    let text = format!(
        "listen = \"127.0.0.1:0\"\n{extra}\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/agent.pem\"\nkey = \"certs/agent.key\"\n{targets}"
    );
    let config_path = dir.path().join("agent.toml");
    std::fs::write(&config_path, text).unwrap();
    let agent = Agent::start_with_hooks(Config::load(&config_path).unwrap(), hooks)
        .await
        .unwrap();
    Env {
        dir,
        agent,
        config_path,
    }
}

/// Deterministic contents: `len` bytes seeded by `seed`.
pub fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut buf);
    buf
}

pub fn write(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

/// Every regular file under `dir`, relative, sorted; `.barge-staging` skipped.
pub fn list(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().to_string();
            if rel == ".barge-staging" {
                continue;
            }
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out.sort();
    out
}

/// Waits (up to 5 s) until no file is left under `dir`: an agent removes a job's
/// staging folder just after the sender got its answer. Returns whether it is empty.
pub fn emptied(dir: &Path) -> bool {
    for _ in 0..250 {
        if list(dir).is_empty() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    list(dir).is_empty()
}

/// Asserts that `dst` holds exactly the files of `src` with equal blake3 hashes.
pub fn assert_same_tree(src: &Path, dst: &Path) {
    let (a, b) = (list(src), list(dst));
    assert_eq!(a, b, "file lists differ");
    for rel in a {
        let x = blake3::hash(&std::fs::read(src.join(&rel)).unwrap());
        let y = blake3::hash(&std::fs::read(dst.join(&rel)).unwrap());
        assert_eq!(x, y, "{rel} differs");
    }
}
