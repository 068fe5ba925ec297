//! `barge zdb-hook` as 0-db runs it (`HOOK NAME ID ARGS...`, full paths, through a
//! link named `barge-zdb-hook`), against a real backup agent, on files laid out the way
//! 0-db lays them out; and a namespace clone.

mod common;

use barge::agent::Hooks;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Output;

const BACKUP_TARGETS: &str = "[[import]]\nname = \"zdb-data\"\npath = \"backup/data\"\nallow = [\"client\"]\n\
[[import]]\nname = \"zdb-index\"\npath = \"backup/index\"\nallow = [\"client\"]\nhook = \"replace\"\n\
[[export]]\nname = \"zdb-data\"\npath = \"backup/data\"\nallow = [\"client\"]\n";

struct Zdb {
    env: Env,
    hook: PathBuf,
    config: PathBuf,
}

impl Zdb {
    fn data(&self) -> PathBuf {
        self.env.root().join("zdb/data")
    }
    fn index(&self) -> PathBuf {
        self.env.root().join("zdb/index")
    }
    fn backup(&self) -> PathBuf {
        self.env.root().join("backup")
    }

    /// Runs the hook the way 0-db does: the program, then NAME ID ARGS.
    async fn run(&self, args: &[&str]) -> Output {
        let mut cmd = std::process::Command::new(&self.hook);
        cmd.args(args)
            .env("BARGE_ZDB_CONFIG", &self.config)
            .current_dir(self.env.root());
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    }
}

async fn zdb() -> Zdb {
    let env = backup_agent().await;
    let ns_data = env.root().join("zdb/data/default");
    let ns_index = env.root().join("zdb/index/default");
    write(&ns_data.join("d0"), &content(10, (2 << 20) + 3));
    write(&ns_data.join("d1"), &content(11, 5000));
    write(&ns_index.join("i0"), &content(20, 1024));
    write(&ns_index.join("i1"), &content(21, 2048));
    write(&ns_index.join("zdb-namespace"), b"default namespace descriptor");
    let hook = env.root().join("barge-zdb-hook");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_barge"), &hook).unwrap();
    let config = env.root().join("zdb.toml");
    let text = format!(
        "data_dir = \"zdb/data\"\nindex_dir = \"zdb/index\"\npeer = \"agent@{}\"\n\
data_target = \"zdb-data\"\nindex_target = \"zdb-index\"\ndata_export = \"zdb-data\"\n\
[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/client.pem\"\nkey = \"certs/client.key\"\n",
        env.agent.local_addr()
    );
    std::fs::write(&config, text).unwrap();
    Zdb { env, hook, config }
}

/// The backup agent: its folders must exist before it validates its config, so it
/// starts bare, gets them, and restarts with the backup targets.
async fn backup_agent() -> Env {
    let env = env_with("", "", Hooks::new()).await;
    for d in ["backup/data", "backup/index"] {
        std::fs::create_dir_all(env.root().join(d)).unwrap();
    }
    let text = std::fs::read_to_string(&env.config_path).unwrap() + BACKUP_TARGETS;
    std::fs::write(&env.config_path, text).unwrap();
    env.restart().await
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {err}", out.status);
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn same(a: &Path, b: &Path) {
    assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap(), "{}", b.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jump_data_offloads_and_missing_data_brings_the_file_back() {
    let z = zdb().await;
    let (d0, d1) = (z.data().join("default/d0"), z.data().join("default/d1"));
    let id = "unix:///run/zdb.sock";
    let out = ok(&z
        .run(&["jump-data", id, d0.to_str().unwrap(), d1.to_str().unwrap()])
        .await);
    assert!(out.contains("default/d0"), "{out}");
    same(&d0, &z.backup().join("data/default/d0"));
    assert!(
        !z.backup().join("data/default/d1").exists(),
        "the new data file is not sealed yet"
    );

    // 0-db dropped the offloaded file; a read needs it back and waits for the hook.
    let before = std::fs::read(&d0).unwrap();
    std::fs::remove_file(&d0).unwrap();
    ok(&z.run(&["missing-data", id, d0.to_str().unwrap()]).await);
    assert_eq!(
        std::fs::read(&d0).unwrap(),
        before,
        "the file is back, verified, in place"
    );
    assert!(list(&z.data().join("default")).iter().all(|n| n == "d0" || n == "d1"));

    // A file the backup never had: a clear failure, non-zero, nothing half-made.
    let d7 = z.data().join("default/d7");
    let out = z.run(&["missing-data", id, d7.to_str().unwrap()]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("default/d7") && err.contains("no such file"), "{err}");
    assert!(!d7.exists());
    assert_eq!(list(&z.data().join("default")), ["d0", "d1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jump_index_backs_up_old_dirty_and_namespace_files_replacing_older_copies() {
    let z = zdb().await;
    let idx = z.index().join("default");
    let (i1, i2) = (idx.join("i1"), idx.join("i2"));
    let args = [
        "jump-index",
        "tcp://[::]:9900",
        i1.to_str().unwrap(),
        i2.to_str().unwrap(),
        "0 1",
    ];
    ok(&z.run(&args).await);
    for n in ["i0", "i1", "zdb-namespace"] {
        same(&idx.join(n), &z.backup().join("index/default").join(n));
    }
    // Index files change; the next jump sends them again and replaces the backup's copy.
    write(&idx.join("i1"), &content(99, 4096));
    let args = ["jump-index", "id", i1.to_str().unwrap(), i2.to_str().unwrap(), ""];
    ok(&z.run(&args).await);
    same(&idx.join("i1"), &z.backup().join("index/default/i1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_hooks_exit_zero_and_bad_paths_are_refused() {
    let z = zdb().await;
    for args in [
        &["ready", "id"][..],
        &["close", "id"],
        &["namespace-created", "id", "default"],
    ] {
        ok(&z.run(args).await);
    }
    // `ready` must not fail even when the config is missing, or 0-db will not start.
    let out = tokio::task::spawn_blocking({
        let hook = z.hook.clone();
        move || {
            std::process::Command::new(hook)
                .args(["ready", "id"])
                .env("BARGE_ZDB_CONFIG", "/nonexistent/zdb.toml")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    ok(&out);
    let outside = z.env.root().join("elsewhere/d1");
    write(&outside, b"secret");
    let out = z.run(&["jump-data", "id", outside.to_str().unwrap(), "x"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not a 0-db data file"), "{err}");
    assert!(list(&z.backup().join("data")).is_empty());
    let out = z.run(&["jump-data", "id"]).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected ID OLD-DATA-FILE"));
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_clones_with_every_file_verified() {
    let z = zdb().await;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_barge"));
    cmd.args(["zdb-clone", "--namespace", "default"])
        .env("BARGE_ZDB_CONFIG", &z.config)
        .current_dir(z.env.root());
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let text = ok(&out);
    assert!(text.contains("2 data files and 3 index files"), "{text}");
    assert_same_tree(&z.data(), &z.backup().join("data"));
    assert_same_tree(&z.index(), &z.backup().join("index"));
}
