//! An export's `after_commit` command: the source's side of a region move. It runs on
//! the exporting agent only once the receiver committed a pull, with the job as JSON on
//! stdin; against a real RocksDB it deletes the region just moved (`ldb deleterange`)
//! and leaves the others. A failing command leaves the receiver's commit alone and is
//! counted; a pull that fails or is refused runs nothing.

mod common;

use barge::agent::{Agent, Hooks};
use barge::config::Config;
use barge::proto::keys::{Key, KeyRange};
use common::ldb::{have_ldb, hex, Pairs};
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ldb(db: &Path) -> Command {
    let mut c = Command::new("ldb");
    c.arg(format!("--db={}", db.display()));
    c
}

/// Writes `pairs` as an SST with RocksDB's writer and ingests it into `db` (a copy:
/// the database's own file, as a region's SST is on a TDStore source).
fn ingest(db: &Path, scratch: &Path, name: &str, mut pairs: Pairs) {
    pairs.sort();
    let input: String = pairs
        .iter()
        .map(|(k, v)| format!("0x{} ==> 0x{}\n", hex(k), hex(v)))
        .collect();
    let sst = scratch.join(name);
    let mut child = ldb(&scratch.join(format!("{name}.db")))
        .args(["--create_if_missing", "--key_hex", "--value_hex", "write_extern_sst"])
        .arg(&sst)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "ldb write_extern_sst failed");
    let out = ldb(db)
        .args(["--create_if_missing", "ingest_extern_sst"])
        .arg(&sst)
        .output()
        .unwrap();
    assert!(out.status.success(), "ldb ingest_extern_sst: {out:?}");
}

fn scan(db: &Path) -> Pairs {
    let out = ldb(db).args(["--hex", "scan"]).output().unwrap();
    assert!(out.status.success(), "ldb scan failed: {out:?}");
    let unhex = |s: &str| {
        Key::parse(&format!("0x{}", s.trim().trim_start_matches("0x").to_lowercase()))
            .unwrap()
            .0
    };
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(" : ").expect("KEY : VALUE");
            (unhex(k), unhex(v))
        })
        .collect()
}

fn region(prefix: &str, n: usize) -> Pairs {
    (0..n)
        .map(|i| (format!("{prefix}{i:04}").into_bytes(), content(i as u64, 64)))
        .collect()
}

/// The agent's counter `name`.
fn counter(agent: &Agent, name: &str) -> u64 {
    let text = agent.metrics();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Waits until the agent ran `n` after_commit commands: the client's pull returns as
/// soon as the exporter acknowledged its commit, before the command is done.
async fn wait_runs(agent: &Agent, n: u64) {
    let until = Instant::now() + Duration::from_secs(30);
    while counter(agent, "barge_after_commit_runs_total") < n {
        assert!(Instant::now() < until, "after_commit did not run:\n{}", agent.metrics());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Agent A exports `outbox` (kind sst) with `after_commit = argv`, and `src` (plain,
/// with `plain_after` when given).
async fn source(after: &str, plain_after: Option<&str>) -> Env {
    let plain = plain_after.map(|a| format!("after_commit = {a}\n")).unwrap_or_default();
    let targets = format!(
        "[[export]]\nname = \"ssts\"\npath = \"outbox\"\nkind = \"sst\"\nallow = [\"client\"]\nafter_commit = {after}\n\
after_commit_timeout_secs = 60\n\
[[export]]\nname = \"plain\"\npath = \"src\"\nallow = [\"client\"]\n{plain}"
    );
    env_with(&targets, "", Hooks::new()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_region_pull_deletes_the_region_on_the_source_only() {
    if !have_ldb() {
        return;
    }
    // The command learns the region from its environment and keeps what it was told.
    let script = "cat > \"$BARGE_EXPORT_DIR/../after.json\"; \
        ldb --db=\"$BARGE_EXPORT_DIR\" --hex deleterange 0x$BARGE_RANGE_START 0x$BARGE_RANGE_END";
    let env = source(&format!("[\"sh\", \"-c\", {script:?}]"), None).await;
    let db = env.outbox();
    let scratch = env.root().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let (r1, r2, r3) = (region("apple", 300), region("kiwi", 500), region("tomato", 200));
    ingest(&db, &scratch, "r1.sst", r1.clone());
    ingest(&db, &scratch, "r2.sst", r2.clone());
    ingest(&db, &scratch, "r3.sst", r3.clone());
    let mut all = [r1.clone(), r2.clone(), r3.clone()].concat();
    all.sort();
    assert_eq!(scan(&db), all);

    let client = env.client("client");
    let range = KeyRange::parse("k..t").unwrap();
    let listed = client.list(&env.peer(), "ssts", Some(&range)).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let into = env.root().join("pulled");
    client.pull_range(&env.peer(), "ssts", &range, &into).await.unwrap();
    wait_runs(&env.agent, 1).await;
    assert_eq!(counter(&env.agent, "barge_after_commit_failures_total"), 0);

    // The receiver has the region's file, byte for byte (the source keeps the file:
    // deleterange hides its keys).
    let name = &listed[0].path;
    assert_eq!(list(&into), [name.as_str()]);
    assert_eq!(
        std::fs::read(into.join(name)).unwrap(),
        std::fs::read(db.join(name)).unwrap()
    );
    // The source no longer returns region 2; regions 1 and 3 are intact.
    let mut kept = [r1, r3].concat();
    kept.sort();
    assert_eq!(scan(&db), kept);
    let out = ldb(&db).args(["get", "kiwi0007"]).output().unwrap();
    assert!(!out.status.success(), "kiwi0007 still there: {out:?}");
    let out = ldb(&db).args(["get", "apple0007"]).output().unwrap();
    assert!(out.status.success(), "apple0007 gone: {out:?}");

    // What the command was told on stdin.
    let job = read_json(&env.root().join("after.json"));
    assert_eq!(job["export"], "ssts");
    assert_eq!(job["peer"], "client");
    assert_eq!(job["range"]["start"], "6b");
    assert_eq!(job["range"]["end"], "74");
    assert_eq!(job["receiver_report"], "pulled");
    assert_eq!(job["job"].as_str().unwrap().len(), 32);
    let files = job["files"].as_array().unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0]["name"], name.as_str());
    assert_eq!(files[0]["size"], listed[0].size);
    assert_eq!(
        files[0]["blake3"],
        blake3::hash(&std::fs::read(into.join(name)).unwrap()).to_hex().as_str()
    );
    assert_eq!(files[0]["keys"]["smallest"], hex(b"kiwi0000").to_lowercase());
    assert_eq!(files[0]["keys"]["largest"], hex(b"kiwi0499").to_lowercase());
    assert_eq!(
        files[0]["path"],
        db.canonicalize().unwrap().join(name).to_str().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_commit_gets_the_job_on_stdin_in_a_cleared_environment() {
    let script = "cat > ../plain.json; env | sort > ../plain.env; pwd > ../plain.pwd";
    let env = source("[\"/bin/false\"]", Some(&format!("[\"sh\", \"-c\", {script:?}]"))).await;
    write(&env.src().join("a"), &content(1, 5000));
    write(&env.src().join("d/b"), &content(2, 300_000));
    let client = env.client("client");
    let into = env.root().join("pulled");
    let report = client.pull(&env.peer(), "plain", &[], &into).await.unwrap();
    assert!(matches!(&report.after_commit, Some(Ok(_))), "{:?}", report.after_commit);
    wait_runs(&env.agent, 1).await;
    assert_eq!(counter(&env.agent, "barge_after_commit_failures_total"), 0);

    let job = read_json(&env.root().join("plain.json"));
    assert_eq!(job["export"], "plain");
    assert_eq!(job["job"], report.job.to_string());
    assert!(job["range"].is_null(), "{job}");
    let files: Vec<(String, u64)> = job["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["name"].as_str().unwrap().to_string(), f["size"].as_u64().unwrap()))
        .collect();
    assert_eq!(files, [("a".to_string(), 5000), ("d/b".to_string(), 300_000)]);
    assert!(job["files"][0].get("keys").is_none(), "{job}");

    let vars = std::fs::read_to_string(env.root().join("plain.env")).unwrap();
    let mut names: Vec<&str> = vars.lines().filter_map(|l| l.split('=').next()).collect();
    names.retain(|n| !["PWD", "OLDPWD", "SHLVL", "_"].contains(n)); // the shell's own
    assert_eq!(
        names,
        ["BARGE_EXPORT", "BARGE_EXPORT_DIR", "BARGE_JOB", "BARGE_PEER", "PATH"],
        "{vars}"
    );
    let pwd = std::fs::read_to_string(env.root().join("plain.pwd")).unwrap();
    assert_eq!(Path::new(pwd.trim()), env.src().canonicalize().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_after_commit_leaves_the_pull_committed_and_is_counted() {
    let failing = "[\"sh\", \"-c\", \"echo region is busy >&2; exit 4\"]";
    let env = source("[\"/bin/false\"]", Some(failing)).await;
    write(&env.src().join("a"), &content(3, 70_000));
    let client = env.client("client");
    let into = env.root().join("pulled");
    let r = client.pull(&env.peer(), "plain", &[], &into).await.unwrap();
    // The caller hears of it; its files stay committed.
    assert!(
        matches!(&r.after_commit, Some(Err(e)) if e.contains("region is busy")),
        "{:?}",
        r.after_commit
    );
    wait_runs(&env.agent, 1).await;
    assert_eq!(counter(&env.agent, "barge_after_commit_failures_total"), 1);
    assert_same_tree(&env.src(), &into);
    assert_eq!(counter(&env.agent, "barge_jobs_total{outcome=\"committed\"}"), 1);

    // A command that can not start, or outlives its time, fails the same way.
    let missing = "[[export]]\nname = \"gone\"\npath = \"src\"\nallow = [\"client\"]\n\
after_commit = [\"/nonexistent/after\"]\n\
[[export]]\nname = \"slow\"\npath = \"outbox\"\nallow = [\"client\"]\n\
after_commit = [\"sh\", \"-c\", \"sleep 30\"]\nafter_commit_timeout_secs = 1\n";
    let env2 = env_with(missing, "", Hooks::new()).await;
    write(&env2.src().join("a"), &content(4, 1000));
    write(&env2.outbox().join("b"), &content(5, 1000));
    let client = env2.client("client");
    let r = client
        .pull(&env2.peer(), "gone", &[], &env2.root().join("p1"))
        .await
        .unwrap();
    assert!(matches!(&r.after_commit, Some(Err(_))), "{:?}", r.after_commit);
    let started = Instant::now();
    let r = client
        .pull(&env2.peer(), "slow", &[], &env2.root().join("p2"))
        .await
        .unwrap();
    assert!(
        matches!(&r.after_commit, Some(Err(e)) if e.contains("timed out")),
        "{:?}",
        r.after_commit
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the command was stopped at its time limit"
    );
    wait_runs(&env2.agent, 2).await;
    assert_eq!(counter(&env2.agent, "barge_after_commit_failures_total"), 2);
    assert_eq!(list(&env2.root().join("p1")), ["a"]);
    assert_eq!(list(&env2.root().join("p2")), ["b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_commit_does_not_run_when_the_pull_fails_or_is_refused() {
    let marker = "[\"sh\", \"-c\", \"echo ran >> ../ran\"]";
    let env = source(marker, Some(marker)).await;
    write(&env.src().join("a"), &content(6, 1000));
    let into = env.root().join("pulled");
    // Refused: a file the export does not have; a peer it does not allow.
    let client = env.client("client");
    client
        .pull(&env.peer(), "plain", &["nope".to_string()], &into)
        .await
        .unwrap_err();
    env.client("stranger")
        .pull(&env.peer(), "plain", &[], &into)
        .await
        .unwrap_err();
    // Failed on the receiver: its folder has a file of that name already.
    write(&into.join("a"), b"older");
    client.pull(&env.peer(), "plain", &[], &into).await.unwrap_err();
    assert_eq!(std::fs::read(into.join("a")).unwrap(), b"older");
    // A range that is not an sst export's is refused too.
    let range = KeyRange::parse("a..b").unwrap();
    client
        .pull_range(&env.peer(), "plain", &range, &env.root().join("p2"))
        .await
        .unwrap_err();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(counter(&env.agent, "barge_after_commit_runs_total"), 0);
    assert!(!env.root().join("ran").exists());

    // The same export runs it once a pull commits.
    std::fs::remove_file(into.join("a")).unwrap();
    client.pull(&env.peer(), "plain", &[], &into).await.unwrap();
    wait_runs(&env.agent, 1).await;
    assert_eq!(std::fs::read_to_string(env.root().join("ran")).unwrap(), "ran\n");
}

#[test]
fn after_commit_is_checked_in_the_config() {
    let dir = tempfile::tempdir().unwrap();
    for d in ["certs", "src", "in"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    barge::net::certs::init_ca(&dir.path().join("certs")).unwrap();
    barge::net::certs::issue(&dir.path().join("certs"), "agent", &[]).unwrap();
    let parse = |targets: &str| {
        let text = format!(
            "listen = \"127.0.0.1:0\"\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/agent.pem\"\nkey = \"certs/agent.key\"\n{targets}"
        );
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    };
    let export = "[[export]]\nname = \"x\"\npath = \"src\"\nallow = [\"a\"]\n";
    let c = parse(&format!(
        "{export}after_commit = [\"ldb\", \"deleterange\"]\nafter_commit_env = [\"HOME\"]\n"
    ))
    .unwrap();
    let spec = c.exports[0].after_commit.as_ref().unwrap();
    assert_eq!(spec.argv, ["ldb", "deleterange"]);
    assert_eq!(spec.env, ["HOME"]);
    assert_eq!(spec.timeout, Duration::from_secs(600));
    assert!(parse(export).unwrap().exports[0].after_commit.is_none());
    let refused = |targets: &str, key: &str| {
        let err = parse(targets).unwrap_err().to_string();
        assert!(err.contains(key), "{key}: {err}");
    };
    refused(&format!("{export}after_commit = []\n"), "export[0] (x).after_commit");
    refused(
        &format!("{export}after_commit = [\"\"]\n"),
        "export[0] (x).after_commit",
    );
    refused(
        &format!("{export}after_commit_timeout_secs = 5\n"),
        "export[0] (x).after_commit_timeout_secs",
    );
    refused(
        &format!("{export}after_commit = [\"x\"]\nafter_commit_timeout_secs = 0\n"),
        "after_commit_timeout_secs",
    );
    refused(
        &format!("{export}after_commit = [\"x\"]\nafter_commit_env = [\"BARGE_JOB\"]\n"),
        "after_commit_env",
    );
    refused(
        "[[import]]\nname = \"i\"\npath = \"in\"\nallow = [\"a\"]\nafter_commit = [\"/bin/true\"]\n",
        "import[0] (i).after_commit",
    );
}
