//! `barge zdb-hook` as 0-db runs it (`HOOK NAME ID ARGS...`, full paths, through a
//! link named `barge-zdb-hook`), against a real backup agent, on files laid out the way
//! 0-db lays them out; the spool that keeps 0-db going while the backup is down; catching
//! up with `zdb-sync`; and a namespace clone.

mod common;

use barge::agent::Hooks;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Output;

const BACKUP_TARGETS: &str = "[[import]]\nname = \"zdb-data\"\npath = \"backup/data\"\nallow = [\"client\"]\ndir_mode = \"0700\"\n\
[[import]]\nname = \"zdb-index\"\npath = \"backup/index\"\nallow = [\"client\"]\nhook = \"replace\"\ndir_mode = \"0700\"\n\
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

    /// Runs `barge zdb-sync` with this config.
    async fn sync(&self) -> Output {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_barge"));
        cmd.args(["zdb-sync", "--config"])
            .arg(&self.config)
            .current_dir(self.env.root());
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    }

    /// Points the config at `peer` (`NAME@ADDR:PORT`) with `extra` keys.
    fn configure(&self, peer: &str, extra: &str) {
        let text = format!(
            "data_dir = \"zdb/data\"\nindex_dir = \"zdb/index\"\npeer = \"{peer}\"\n\
data_target = \"zdb-data\"\nindex_target = \"zdb-index\"\ndata_export = \"zdb-data\"\n{extra}\
[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/client.pem\"\nkey = \"certs/client.key\"\n"
        );
        std::fs::write(&self.config, text).unwrap();
    }

    /// Points the config at a port where nothing answers, with a 1 s timeout.
    fn backup_down(&self) {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        drop(sock);
        self.configure(&format!("agent@{addr}"), "connect_timeout_secs = 1\n");
    }

    /// Points the config back at the running backup agent.
    fn backup_up(&self) {
        self.configure(&format!("agent@{}", self.env.agent.local_addr()), "");
    }

    /// The spooled entries' names, oldest first (the default spool, next to the index root).
    fn spool(&self) -> Vec<String> {
        let dir = self.env.root().join("zdb/barge-zdb-spool");
        let mut v: Vec<String> = list(&dir).into_iter().filter(|n| n.ends_with(".job")).collect();
        v.sort();
        v
    }

    fn spooled_work(&self) -> Vec<barge::engines::zdb::Work> {
        barge::engines::zdb::Spool::open(&self.env.root().join("zdb/barge-zdb-spool"))
            .unwrap()
            .pending()
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
    let z = Zdb { env, hook, config };
    z.backup_up();
    z
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
    assert_eq!(out.status.code(), Some(1), "a refused path is not a usage error");
    assert!(z.spool().is_empty(), "a refused path is not spooled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_argument_errors_exit_2_and_send_nothing() {
    let z = zdb().await;
    let d0 = z.data().join("default/d0");
    let i1 = z.index().join("default/i1");
    let (d0, i1) = (d0.to_str().unwrap(), i1.to_str().unwrap());
    for (args, want) in [
        (&["jump-data", "id"][..], "expected ID OLD-DATA-FILE"),
        (&["jump-data"], "non-empty ID"),
        (&["jump-data", "", d0, "x"], "non-empty ID"),
        (&["jump-data", "id", d0, "x", "unknown"], "expected ID OLD-DATA-FILE"),
        (&["jump-index", "id", i1], "expected ID OLD-INDEX-FILE"),
        (&["jump-index", "id", i1, "x", "1 two"], "\"two\" is not a number"),
        (&["missing-data", "id"], "expected ID DATA-FILE"),
        (&["missing-data", "id", d0, "unknown"], "expected ID DATA-FILE"),
        (&["namespace-updated", "id"], "expected ID NAMESPACE"),
        (&["namespace-updated", "id", "../default"], "expected ID NAMESPACE"),
    ] {
        let out = z.run(args).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert!(list(&z.backup().join("data")).is_empty());
    assert!(list(&z.backup().join("index")).is_empty());
    assert!(z.spool().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_backup_spools_the_work_and_the_next_hook_drains_it_newest_index_wins() {
    let z = zdb().await;
    z.backup_down();
    let data = z.data().join("default");
    let idx = z.index().join("default");
    let (d0, d1, i1, i2) = (data.join("d0"), data.join("d1"), idx.join("i1"), idx.join("i2"));
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();

    // 0-db waits for these: each must come back within the timeout, exit 0, spooled.
    let jumps = [
        vec!["jump-data".to_string(), "id".into(), s(&d0), s(&d1)],
        vec!["jump-index".into(), "id".into(), s(&i1), s(&i2), "0".into()],
        vec!["namespace-updated".into(), "id".into(), "default".into()],
    ];
    for args in &jumps {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let t = std::time::Instant::now();
        let out = z.run(&args).await;
        let took = t.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {err}");
        assert!(took < std::time::Duration::from_secs(4), "{args:?} took {took:?}");
        assert!(err.contains("spooled"), "{err}");
    }
    assert_eq!(z.spool().len(), 3, "one durable entry per hook call");
    let work = z.spooled_work();
    assert!(
        matches!(&work[0], barge::engines::zdb::Work::Data(f) if f.rel() == "default/d0"),
        "{work:?}"
    );
    assert!(
        matches!(&work[1], barge::engines::zdb::Work::Index { names, .. } if names == &["i0", "i1", "zdb-namespace"])
    );
    assert!(list(&z.backup().join("data")).is_empty() && list(&z.backup().join("index")).is_empty());

    // 0-db rewrites an index file while the backup is away: the drain must send what the
    // file holds now, never the content it had when its entry was spooled.
    write(&i1, &content(77, 3000));
    write(&idx.join("zdb-namespace"), b"descriptor after NSSET");

    // The backup is back: the next pushing hook drains the spool, oldest first.
    z.backup_up();
    let out = ok(&z.run(&["namespace-updated", "id", "default"]).await);
    assert!(out.contains("4 spooled entries sent"), "{out}");
    assert!(z.spool().is_empty(), "every pushed entry is removed");
    same(&d0, &z.backup().join("data/default/d0"));
    assert!(!z.backup().join("data/default/d1").exists());
    for n in ["i0", "i1", "zdb-namespace"] {
        same(&idx.join(n), &z.backup().join("index/default").join(n));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_that_can_not_drain_keeps_its_order_and_entries() {
    let z = zdb().await;
    z.backup_down();
    let data = z.data().join("default");
    write(&data.join("d2"), &content(12, 7000));
    for (old, new) in [("d0", "d1"), ("d1", "d2")] {
        let (old, new) = (data.join(old), data.join(new));
        ok(&z
            .run(&["jump-data", "id", old.to_str().unwrap(), new.to_str().unwrap()])
            .await);
    }
    let before = z.spool();
    // Still down: a third call drains nothing, and keeps the two older entries first.
    let i1 = z.index().join("default/i1");
    ok(&z.run(&["jump-index", "id", i1.to_str().unwrap(), "x", ""]).await);
    let after = z.spool();
    assert_eq!(after.len(), 3);
    assert_eq!(after[..2], before[..]);
    let rels: Vec<String> = z
        .spooled_work()
        .iter()
        .map(|w| match w {
            barge::engines::zdb::Work::Data(f) => f.rel(),
            barge::engines::zdb::Work::Index { namespace, .. } => format!("{namespace}/index"),
        })
        .collect();
    assert_eq!(rels, ["default/d0", "default/d1", "default/index"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_data_fails_fast_when_the_backup_is_silent() {
    let z = zdb().await;
    z.backup_down();
    let d0 = z.data().join("default/d0");
    std::fs::remove_file(&d0).unwrap();
    let t = std::time::Instant::now();
    let out = z.run(&["missing-data", "id", d0.to_str().unwrap()]).await;
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(took < std::time::Duration::from_secs(4), "took {took:?}");
    assert!(err.contains("no answer within 1s"), "{err}");
    assert!(z.spool().is_empty(), "a missing file can not wait: nothing spooled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_updated_pushes_the_namespace_descriptor_only() {
    let z = zdb().await;
    let idx = z.index().join("default");
    ok(&z.run(&["namespace-updated", "id", "default"]).await);
    same(
        &idx.join("zdb-namespace"),
        &z.backup().join("index/default/zdb-namespace"),
    );
    assert_eq!(list(&z.backup().join("index/default")), ["zdb-namespace"]);
    write(&idx.join("zdb-namespace"), b"descriptor after NSSET password");
    ok(&z.run(&["namespace-updated", "id", "default"]).await);
    same(
        &idx.join("zdb-namespace"),
        &z.backup().join("index/default/zdb-namespace"),
    );
    // A namespace 0-db does not have is refused, not spooled.
    let out = z.run(&["namespace-updated", "id", "nosuch"]).await;
    assert!(!out.status.success());
    assert!(z.spool().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zdb_sync_catches_up_a_backup_that_missed_files_and_is_idempotent() {
    let z = zdb().await;
    let data = z.data().join("default");
    write(&data.join("d2"), &content(12, 7000));
    std::fs::create_dir_all(z.data().join("second")).unwrap();
    write(&z.data().join("second/d0"), &content(30, 4000));
    write(&z.data().join("second/d1"), &content(31, 10));
    write(&z.index().join("second/i0"), &content(32, 100));
    write(&z.index().join("second/zdb-namespace"), b"second");
    // The backup got d0 from a hook; it missed d1 (the backup was down, say).
    let (d0, d1) = (data.join("d0"), data.join("d1"));
    ok(&z
        .run(&["jump-data", "id", d0.to_str().unwrap(), d1.to_str().unwrap()])
        .await);

    let out = ok(&z.sync().await);
    assert!(
        out.contains("2 sealed data files sent (1 already there), 5 index files"),
        "{out}"
    );
    let backup = z.backup().join("data");
    assert_eq!(list(&backup.join("default")), ["d0", "d1"], "d2 is still being written");
    same(&d1, &backup.join("default/d1"));
    assert_eq!(list(&backup.join("second")), ["d0"]);
    assert_same_tree(&z.index(), &z.backup().join("index"));

    // Again: nothing left to send but the index files, which are sent as they are now.
    write(&z.index().join("default/i1"), &content(88, 999));
    let out = ok(&z.sync().await);
    assert!(out.contains("0 sealed data files sent (3 already there)"), "{out}");
    assert_same_tree(&z.index(), &z.backup().join("index"));

    // A backup copy that differs is never overwritten, and the sync says so.
    write(&backup.join("default/d1"), b"not what this host sealed");
    let out = z.sync().await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("different default/d1"), "{err}");
    assert_eq!(
        std::fs::read(backup.join("default/d1")).unwrap(),
        b"not what this host sealed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zdb_sync_drains_what_the_hook_spooled() {
    let z = zdb().await;
    z.backup_down();
    let idx = z.index().join("default");
    let (i1, i2) = (idx.join("i1"), idx.join("i2"));
    ok(&z
        .run(&["jump-index", "id", i1.to_str().unwrap(), i2.to_str().unwrap(), "0"])
        .await);
    assert_eq!(z.spool().len(), 1);
    // Still down: the sync fails (non-zero, for the timer's log) and keeps the entry.
    let out = z.sync().await;
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(z.spool().len(), 1);
    z.backup_up();
    let out = ok(&z.sync().await);
    assert!(out.contains("1 spooled entries"), "{out}");
    assert!(z.spool().is_empty());
    assert_same_tree(&z.index(), &z.backup().join("index"));
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
    // 0-db loads every folder of its roots as a namespace: nothing but the clone's.
    for root in ["data", "index"] {
        let names: Vec<_> = std::fs::read_dir(z.backup().join(root))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, ["default"], "{root}");
    }
}

#[test]
fn the_sync_timer_units_pass_systemd_verify_and_security() {
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "systemd-analyze is missing"
        );
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/");
    let unit = std::fs::read_to_string(format!("{dir}barge-zdb-sync.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/barge zdb-sync --config "), "{unit}");
    let service = t.path().join("barge-zdb-sync.service");
    std::fs::write(&service, unit.replace("/usr/bin/barge", env!("CARGO_BIN_EXE_barge"))).unwrap();
    let timer = t.path().join("barge-zdb-sync.timer");
    std::fs::copy(format!("{dir}barge-zdb-sync.timer"), &timer).unwrap();
    // Documentation='s man pages come with the package, not with a checkout.
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args([&service, &timer])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Verify runs as the test's user: a missing `zdb` user is the host's, not the unit's.
    let real: Vec<&str> = err
        .lines()
        .filter(|l| !l.contains("zdb") || !l.contains("user"))
        .collect();
    assert!(out.status.success() && real.is_empty(), "verify: {err}");
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&service)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no rating in {text}"));
    assert!(line.contains("OK") || line.contains("SAFE"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_file_the_backup_already_holds_counts_as_sent_and_does_not_block_the_spool() {
    let z = zdb().await;
    let data = z.data().join("default");
    let (d0, d1) = (data.join("d0"), data.join("d1"));
    write(&data.join("d2"), &content(12, 7000));
    // The backup got d0 (with d1, in one job) from a sync; then the hook's own push of
    // d0 comes (a hook spooled while the sync ran): a different job, refused as "file
    // exists". The backup lists d0 with the same hash, so the entry is done.
    ok(&z.sync().await);
    let args = ["jump-data", "id", d0.to_str().unwrap(), d1.to_str().unwrap()];
    let out = z.run(&args).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("spooled"), "{err}");
    assert!(z.spool().is_empty(), "{:?}", z.spool());
    same(&d0, &z.backup().join("data/default/d0"));
    // A backup copy that differs is not taken for this file: the entry stays.
    write(&z.backup().join("data/default/d0"), b"something else");
    let out = z.run(&args).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("spooled"), "{err}");
    assert_eq!(z.spool().len(), 1);
}

/// Gives every file and folder of the 0-db roots 0-db's own modes: 0600 and 0700.
fn zero_db_modes(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for e in walkdir(root) {
        let m = if e.is_dir() { 0o700 } else { 0o600 };
        std::fs::set_permissions(&e, std::fs::Permissions::from_mode(m)).unwrap();
    }
}

fn walkdir(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(root).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        }
        out.push(p);
    }
    out
}

/// Every file under `root` is 0600 and every folder 0700, as 0-db makes them.
fn assert_zero_db_modes(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let entries = walkdir(root);
    assert!(!entries.is_empty(), "{} is empty", root.display());
    for e in entries {
        let m = std::fs::metadata(&e).unwrap().permissions().mode() & 0o7777;
        let want = if e.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(m, want, "{}: {m:o}", e.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_keep_zero_dbs_modes_through_jumps_clone_and_restore() {
    // Jumps: sealed data and index files on the backup are 0600 in 0700 folders.
    let z = zdb().await;
    zero_db_modes(&z.env.root().join("zdb"));
    let (d0, d1) = (z.data().join("default/d0"), z.data().join("default/d1"));
    ok(&z
        .run(&["jump-data", "id", d0.to_str().unwrap(), d1.to_str().unwrap()])
        .await);
    let idx = z.index().join("default");
    let (i1, i2) = (idx.join("i1"), idx.join("i2"));
    ok(&z
        .run(&["jump-index", "id", i1.to_str().unwrap(), i2.to_str().unwrap(), "0"])
        .await);
    assert_zero_db_modes(&z.backup().join("data"));
    assert_zero_db_modes(&z.backup().join("index"));
    // Restored by missing-data: 0600 again.
    std::fs::remove_file(&d0).unwrap();
    ok(&z.run(&["missing-data", "id", d0.to_str().unwrap()]).await);
    assert_zero_db_modes(&z.data());

    // A clone of the whole namespace into a fresh backup.
    let z = zdb().await;
    zero_db_modes(&z.env.root().join("zdb"));
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_barge"));
    cmd.args(["zdb-clone", "--namespace", "default"])
        .env("BARGE_ZDB_CONFIG", &z.config)
        .current_dir(z.env.root());
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    ok(&out);
    assert_zero_db_modes(&z.backup().join("data"));
    assert_zero_db_modes(&z.backup().join("index"));
}
