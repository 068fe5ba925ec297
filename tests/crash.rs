//! Crashes at the worst moments of a commit: real agent processes that kill themselves
//! (SIGKILL) at failpoints inside the hand-over. After a restart the target holds the
//! job's old state or its new one, never a mix, and the same push sent again is
//! answered "committed" without data.

mod common;

use common::proc::{barge, make_certs, ok, AgentProc};
use common::{content, list, write};
use std::path::Path;
use std::time::Duration;

const TLS: &str = "[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/store-b.pem\"\nkey = \"certs/store-b.key\"\n";

/// A host with certificates, an agent config `b.toml` whose targets are `targets`,
/// and the agent started once to learn its port (the config then keeps that address,
/// so a restarted agent is found where the first one was).
fn host(targets: &str) -> (tempfile::TempDir, String) {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    make_certs(p, &["store-b", "ops"]);
    for d in ["in", "idx"] {
        std::fs::create_dir(p.join(d)).unwrap();
    }
    let write_config = |listen: &str| {
        let text = format!("listen = \"{listen}\"\ndata_dir = \"state\"\n{TLS}{targets}");
        std::fs::write(p.join("b.toml"), text).unwrap();
    };
    write_config("127.0.0.1:0");
    let addr = AgentProc::start(&["--config", "b.toml"], p, &[]).addr.clone();
    write_config(&addr);
    (t, addr)
}

fn agent(p: &Path, failpoint: Option<&str>) -> AgentProc {
    let envs: Vec<(&str, &str)> = failpoint.map(|f| ("BARGE_FAILPOINT", f)).into_iter().collect();
    AgentProc::start(&["--config", "b.toml"], p, &envs)
}

fn push_args<'a>(addr: &'a str, what: &'a str, target: &'a str) -> Vec<String> {
    [
        "push",
        what,
        "--to",
        &format!("store-b@{addr}"),
        "--import",
        target,
        "--certs",
        "certs",
        "--identity",
        "ops",
        "--hash-cache",
        "off",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Pushes while the agent runs into its failpoint; returns once the agent is dead.
fn push_into_failpoint(p: &Path, agent: &mut AgentProc, args: &[String]) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut push = common::proc::command(&args, p)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let died = agent.wait_exit(Duration::from_secs(30));
    let _ = push.kill();
    let _ = push.wait();
    assert!(died.is_some(), "the agent never reached its failpoint: {}", agent.log());
}

/// Pushes and returns the JSON result.
fn push_ok(p: &Path, args: &[String]) -> serde_json::Value {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    serde_json::from_str(&ok(&barge(&args, p))).unwrap()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// Whether every file of `src` is in `dst` with the same content; `dst` may hold more.
fn holds_all(src: &Path, dst: &Path) -> bool {
    list(src)
        .iter()
        .all(|rel| dst.join(rel).is_file() && read(&src.join(rel)) == read(&dst.join(rel)))
}

/// Whether no file of `src` is in `dst`.
fn holds_none(src: &Path, dst: &Path) -> bool {
    list(src).iter().all(|rel| !dst.join(rel).exists())
}

#[test]
fn a_commit_killed_between_renames_finishes_at_the_next_start() {
    let (t, addr) = host("[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"ops\"]\n");
    let p = t.path();
    // The target has the job's folder already, so files are renamed one by one.
    write(&p.join("in/w/keep"), b"kept");
    for i in 0..50 {
        write(&p.join(format!("src/w/f{i:02}")), &content(i, 100 + i as usize));
    }
    let args = push_args(&addr, "src/w", "in");
    let mut first = agent(p, Some("commit-rename:20"));
    push_into_failpoint(p, &mut first, &args);
    assert_eq!(list(&p.join("in/w")).len(), 21, "the crash came after 20 renames");

    let second = agent(p, None);
    assert!(
        second.log().contains("commit cut off by a restart finished"),
        "{}",
        second.log()
    );
    assert!(holds_all(&p.join("src"), &p.join("in")));
    assert_eq!(read(&p.join("in/w/keep")), b"kept");
    assert!(
        list(&common::staging_of(&p.join("b.toml"), "in")).is_empty(),
        "nothing left staged"
    );

    // The same push again: confirmed, nothing sent, nothing refused as existing.
    let r = push_ok(p, &args);
    assert_eq!(r["sent_bytes"], 0, "{r}");
    assert!(r["report"].as_str().unwrap().contains("sent again"), "{r}");
}

#[test]
fn a_commit_killed_before_or_after_its_renames_ends_all_placed() {
    let (t, addr) = host("[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"ops\"]\n");
    let p = t.path();
    for (round, fp) in ["commit-intent", "commit-placed"].iter().enumerate() {
        let src = p.join(format!("src{round}"));
        for i in 0..5u64 {
            write(
                &src.join(format!("d{round}/f{i}")),
                &content(i + 10 * round as u64, 3000),
            );
        }
        let what = format!("src{round}/d{round}");
        let args = push_args(&addr, &what, "in");
        let mut first = agent(p, Some(fp));
        push_into_failpoint(p, &mut first, &args);
        match *fp {
            "commit-intent" => assert!(holds_none(&src, &p.join("in")), "nothing placed yet"),
            _ => assert!(holds_all(&src, &p.join("in")), "all placed, outcome not recorded"),
        }
        let _second = agent(p, None);
        assert!(holds_all(&src, &p.join("in")), "{fp}");
        let r = push_ok(p, &args);
        assert_eq!(r["sent_bytes"], 0, "{fp}: {r}");
    }
}

#[test]
fn a_replace_killed_half_way_ends_all_new_or_all_old() {
    let (t, addr) = host("[[import]]\nname = \"idx\"\npath = \"idx\"\nallow = [\"ops\"]\nhook = \"replace\"\n");
    let p = t.path();
    let version = |v: u64| {
        for i in 0..5u64 {
            write(&p.join(format!("v{v}/ns/i{i}")), &content(100 * v + i, 4096));
            write(&p.join(format!("idx/ns/i{i}")), &content(100 * v + i, 4096));
        }
    };
    version(1);
    // Version 2, cut off after two of five files were replaced: finished at start.
    for i in 0..5u64 {
        write(&p.join(format!("v2/ns/i{i}")), &content(200 + i, 4096));
    }
    let mut first = agent(p, Some("commit-rename:2"));
    push_into_failpoint(p, &mut first, &push_args(&addr, "v2/ns", "idx"));
    let _second = agent(p, None);
    assert!(holds_all(&p.join("v2"), &p.join("idx")), "all new");
    drop(_second);

    // Version 3, cut off the same way; before the restart someone makes the last name
    // a folder, so the commit can not finish: it is undone to version 2 (and that one
    // folder), never a mix.
    for i in 0..5u64 {
        write(&p.join(format!("v3/ns/i{i}")), &content(300 + i, 4096));
    }
    let mut third = agent(p, Some("commit-rename:2"));
    push_into_failpoint(p, &mut third, &push_args(&addr, "v3/ns", "idx"));
    std::fs::remove_file(p.join("idx/ns/i4")).unwrap();
    std::fs::create_dir(p.join("idx/ns/i4")).unwrap();
    let fourth = agent(p, None);
    assert!(fourth.log().contains("could not finish"), "{}", fourth.log());
    for i in 0..4 {
        let rel = format!("ns/i{i}");
        assert_eq!(
            read(&p.join("idx").join(&rel)),
            read(&p.join("v2").join(&rel)),
            "{rel} is old"
        );
    }
    assert!(p.join("idx/ns/i4").is_dir());
}

#[test]
fn a_held_job_whose_commit_was_cut_off_is_committed_after_the_restart() {
    let (t, addr) = host("[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"ops\"]\n");
    let p = t.path();
    write(&p.join("in/load/old"), b"o");
    for i in 0..8u64 {
        write(&p.join(format!("src/load/f{i}")), &content(i, 2000));
    }
    let mut args = push_args(&addr, "src/load", "in");
    args.push("--hold".into());
    let first = agent(p, Some("commit-rename:3"));
    let held = push_ok(p, &args);
    let job = held["job"].as_str().unwrap().to_string();
    let mut first = first;
    let id = ["--certs", "certs", "--identity", "ops"];
    let peer = format!("store-b@{addr}");
    let mut commit = vec!["commit", peer.as_str(), job.as_str(), "--idle-timeout", "2"];
    commit.extend(id);
    let _ = barge(&commit, p);
    assert!(first.wait_exit(Duration::from_secs(30)).is_some(), "{}", first.log());

    let second = agent(p, None);
    assert!(holds_all(&p.join("src"), &p.join("in")));
    assert!(
        list(&p.join("state/jobs")).is_empty(),
        "no longer held: {:?}",
        list(&p.join("state/jobs"))
    );
    assert!(!second.log().contains("held job restored"), "{}", second.log());
    let again = ok(&barge(&commit, p));
    assert!(again.contains("sent again"), "{again}");
}

#[test]
fn a_killed_senders_job_is_taken_over_by_its_next_push_and_refused_to_others() {
    let targets = "[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"ops\", \"ops2\"]\n";
    let (t, addr) = host(&format!("[limits]\npeer_rate_mbit = 200\n{targets}"));
    let p = t.path();
    ok(&barge(&["certs", "issue", "ops2", "--dir", "certs"], p));
    write(&p.join("src/big/data"), &content(21, 48 << 20));
    let _agent = agent(p, None);
    let args = push_args(&addr, "src/big", "in");
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut sender = common::proc::command(&argv, p)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let staged = |p: &Path| list(&common::staging_of(&p.join("b.toml"), "in")).len();
    let started = std::time::Instant::now();
    while staged(p) == 0 && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    // SIGKILL: no close reaches the agent, whose job waits for a sender that is gone.
    sender.kill().unwrap();
    sender.wait().unwrap();

    let other: Vec<&str> = argv.iter().map(|a| if *a == "ops" { "ops2" } else { a }).collect();
    let refused = barge(&other, p);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(5), "{err}");
    assert!(
        err.contains("being sent by another sender") && err.contains("retry after") && !err.contains("ops"),
        "{err}"
    );

    let again = std::time::Instant::now();
    let r = push_ok(p, &args);
    assert!(r["held_blocks"].as_u64().unwrap() > 0, "the orphan's blocks count: {r}");
    assert!(
        again.elapsed() < Duration::from_secs(8),
        "taken over at once, not after the idle timeout: {:?}",
        again.elapsed()
    );
    assert_eq!(read(&p.join("in/big/data")), content(21, 48 << 20));
}
