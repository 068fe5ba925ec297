//! The `barge` binary as an operator uses it: certs, agent, push, pull, hash, exit codes.

mod common;

use common::proc::{barge, fails, make_certs, ok, AgentProc};
use common::{content, list, write};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// `p/b.toml`: agent `store-b` on 127.0.0.1:0 with `top` keys and `targets` tables.
fn store_b_config(p: &Path, top: &str, targets: &str) {
    let tls = "[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/store-b.pem\"\nkey = \"certs/store-b.key\"\n";
    std::fs::write(
        p.join("b.toml"),
        format!("listen = \"127.0.0.1:0\"\n{top}\n{tls}{targets}"),
    )
    .unwrap();
}

/// Starts `barge agent` and returns it with the address from its log.
fn agent(args: &[&str], cwd: &Path) -> (AgentProc, String) {
    let a = AgentProc::start(args, cwd, &[]);
    let addr = a.addr.clone();
    (a, addr)
}

#[test]
fn certs_commands_make_a_ca_and_identities() {
    let t = tempfile::tempdir().unwrap();
    ok(&barge(&["certs", "init", "--dir", "c"], t.path()));
    ok(&barge(
        &["certs", "issue", "store-a", "--dir", "c", "--san", "127.0.0.1"],
        t.path(),
    ));
    for key in ["c/ca.key", "c/store-a.key"] {
        let mode = std::fs::metadata(t.path().join(key)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    fails(&barge(&["certs", "init", "--dir", "c"], t.path()), 3, "already exists");
    fails(
        &barge(&["certs", "issue", "bad name", "--dir", "c"], t.path()),
        3,
        "not a valid DNS name",
    );
}

#[test]
fn hash_prints_what_b3sum_prints() {
    let t = tempfile::tempdir().unwrap();
    let sizes = [0usize, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, (5 << 20) + 123];
    let mut names = Vec::new();
    for s in sizes {
        let name = format!("f{s}");
        write(&t.path().join(&name), &content(s as u64, s));
        names.push(name);
    }
    let args: Vec<&str> = std::iter::once("hash")
        .chain(names.iter().map(String::as_str))
        .collect();
    let out = ok(&barge(&args, t.path()));
    let want: String = names
        .iter()
        .map(|n| {
            format!(
                "{}  {n}\n",
                blake3::hash(&std::fs::read(t.path().join(n)).unwrap()).to_hex()
            )
        })
        .collect();
    assert_eq!(out, want);
    match Command::new("b3sum").args(&names).current_dir(t.path()).output() {
        Ok(b3) => assert_eq!(out, String::from_utf8_lossy(&b3.stdout)),
        Err(_) if std::env::var("CI").as_deref() == Ok("true") => panic!("b3sum must be installed under CI"),
        Err(_) => eprintln!("skipping the b3sum comparison: b3sum is not installed"),
    }
    fails(&barge(&["hash", "missing"], t.path()), 1, "missing");
}

#[test]
fn bad_configs_are_refused_at_start_naming_the_key() {
    let t = tempfile::tempdir().unwrap();
    fails(&barge(&["agent", "--config", "none.toml"], t.path()), 3, "none.toml");
    ok(&barge(&["certs", "init", "--dir", "c"], t.path()));
    ok(&barge(&["certs", "issue", "a", "--dir", "c"], t.path()));
    let base = "listen = \"127.0.0.1:0\"\n[tls]\nca = \"c/ca.pem\"\ncert = \"c/a.pem\"\n";
    std::fs::write(t.path().join("nokey.toml"), format!("{base}key = \"c/zz.key\"\n")).unwrap();
    fails(&barge(&["agent", "--config", "nokey.toml"], t.path()), 3, "tls.key");
    std::fs::write(
        t.path().join("missing.toml"),
        format!("{base}key = \"c/a.key\"\n[[import]]\nname = \"x\"\npath = \"gone\"\nallow = [\"a\"]\n"),
    )
    .unwrap();
    fails(
        &barge(&["agent", "--config", "missing.toml"], t.path()),
        3,
        "import[0] (x).path",
    );
}

#[test]
fn push_and_pull_through_the_cli_with_documented_exit_codes() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    make_certs(p, &["store-b", "ops", "intruder"]);
    for d in ["in", "out", "data/sub"] {
        std::fs::create_dir_all(p.join(d)).unwrap();
    }
    write(&p.join("data/sub/a.sst"), &content(1, 3 << 20));
    write(&p.join("data/b.sst"), &content(2, 77));
    write(&p.join("out/exported.sst"), &content(3, 1234));
    store_b_config(
        p,
        "",
        "[[import]]\nname = \"ingest\"\npath = \"in\"\nallow = [\"ops\"]\n[[export]]\nname = \"ssts\"\npath = \"out\"\nallow = [\"ops\"]\n",
    );
    let (_agent, addr) = agent(&["--config", "b.toml"], p);
    let peer = format!("store-b@{addr}");
    let id = ["--certs", "certs", "--identity", "ops"];
    let push = |who: &str, target: &str| {
        let mut args = vec![
            "push",
            "data",
            "--to",
            &peer,
            "--import",
            target,
            "--certs",
            "certs",
            "--identity",
        ];
        args.push(who);
        barge(&args, p)
    };
    let out = ok(&push("ops", "ingest"));
    assert!(out.contains("committed 2 files"), "{out}");
    common::assert_same_tree(&p.join("data"), &p.join("in/data"));

    fails(
        &push("intruder", "ingest"),
        5,
        "intruder is on no allow list of this agent",
    );
    // A missing target and one closed to the peer get the same answer.
    fails(
        &push("ops", "nowhere"),
        5,
        "ops may not write to import target \"nowhere\" (there is none it may use by that name)",
    );
    let wrong_name = format!("store-x@{addr}");
    let out = barge(
        &[
            "push",
            "data",
            "--to",
            &wrong_name,
            "--import",
            "ingest",
            id[0],
            id[1],
            id[2],
            id[3],
        ],
        p,
    );
    fails(&out, 4, "cannot connect");
    fails(
        &barge(&["push", "data", "--to", "nonsense", "--import", "ingest"], p),
        2,
        "not HOST:PORT",
    );
    let jumbo = |mtu: &str| {
        let mut args = vec!["push", "data", "--to", &peer, "--import", "ingest", "--max-mtu", mtu];
        args.extend(id);
        barge(&args, p)
    };
    fails(&jumbo("70000"), 2, "--max-mtu: 70000 is not a size from 1200 to 65000");
    std::fs::remove_dir_all(p.join("in/data")).unwrap();
    assert!(ok(&jumbo("8952")).contains("committed 2 files"));
    common::assert_same_tree(&p.join("data"), &p.join("in/data"));

    let mut pull = vec!["pull", peer.as_str(), "--export", "ssts", "--into", "got"];
    pull.extend(id);
    ok(&barge(&pull, p));
    assert_eq!(list(&p.join("got")), ["exported.sst"]);
    fails(&barge(&pull, p), 5, "already exists");
}

#[test]
fn agent_without_config_runs_the_local_default() {
    let t = tempfile::tempdir().unwrap();
    let (agent, addr) = agent(&["--data", "state"], t.path());
    assert!(addr.ends_with(":7878"), "{addr}");
    assert!(agent.log().contains("development certificates"), "{}", agent.log());
    assert!(t.path().join("state/certs/client.key").exists());
    write(&t.path().join("hello.txt"), b"hello barge");
    let out = ok(&barge(
        &[
            "push",
            "hello.txt",
            "--to",
            "localhost:7878",
            "--import",
            "inbox",
            "--certs",
            "state/certs",
        ],
        t.path(),
    ));
    assert!(out.contains("committed 1 files"), "{out}");
    assert_eq!(
        std::fs::read(t.path().join("state/inbox/hello.txt")).unwrap(),
        b"hello barge"
    );
}

/// Polls until `dir` holds a file of at least `bytes` bytes (anywhere below it).
fn wait_for_staged(dir: &Path, bytes: u64) -> bool {
    fn biggest(dir: &Path) -> u64 {
        let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
        rd.flatten()
            .map(|e| {
                if e.path().is_dir() {
                    biggest(&e.path())
                } else {
                    e.metadata().map(|m| m.len()).unwrap_or(0)
                }
            })
            .max()
            .unwrap_or(0)
    }
    for _ in 0..500 {
        if biggest(dir) >= bytes {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}

#[test]
fn an_agent_killed_mid_job_resumes_from_its_staged_blocks() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    make_certs(p, &["store-b", "ops"]);
    std::fs::create_dir_all(p.join("in")).unwrap();
    let big = content(7, 64 << 20);
    write(&p.join("src/big.sst"), &big);
    let config = |listen: &str| {
        format!(
            "listen = \"{listen}\"\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/store-b.pem\"\nkey = \"certs/store-b.key\"\n\
             [[import]]\nname = \"ingest\"\npath = \"in\"\nallow = [\"ops\"]\n"
        )
    };
    std::fs::write(p.join("b.toml"), config("127.0.0.1:0")).unwrap();
    let (mut first, addr) = agent(&["--config", "b.toml"], p);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt
        .block_on(async { barge::client::Client::new(&barge::net::tls::TlsFiles::in_dir(&p.join("certs"), "ops")) })
        .unwrap();
    let client = std::sync::Arc::new(client);
    let peer: barge::client::Peer = format!("store-b@{addr}").parse().unwrap();
    let src = vec![p.join("src/big.sst")];
    let opts = barge::client::PushOptions::default();
    let push = {
        let (client, peer, src, opts) = (client.clone(), peer.clone(), src.clone(), opts.clone());
        rt.spawn(async move { client.push(&peer, "ingest", &src, &opts).await })
    };
    assert!(
        wait_for_staged(&common::staging_of(&p.join("b.toml"), "ingest"), 8 << 20),
        "the push never started"
    );
    first.kill();
    push.abort();
    assert!(list(&p.join("in")).is_empty(), "nothing is visible after the kill");

    std::fs::write(p.join("b.toml"), config(&addr)).unwrap();
    let (_second, _) = agent(&["--config", "b.toml"], p);
    let r = rt.block_on(client.push(&peer, "ingest", &src, &opts)).unwrap();
    assert!(r.blocks_held > 0, "the restarted agent kept verified blocks");
    assert_eq!(r.blocks_held + r.blocks_sent, 64);
    assert_eq!(
        blake3::hash(&std::fs::read(p.join("in/big.sst")).unwrap()),
        blake3::hash(&big)
    );
}

#[test]
fn a_bulk_load_through_the_cli_holds_lists_commits_and_aborts() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    make_certs(p, &["store-b", "ops"]);
    for d in ["in", "state"] {
        std::fs::create_dir_all(p.join(d)).unwrap();
    }
    write(&p.join("load/1.sst"), &content(1, 2 << 20));
    write(&p.join("other.sst"), &content(2, 10));
    store_b_config(
        p,
        "data_dir = \"state\"",
        "[[import]]\nname = \"ingest\"\npath = \"in\"\nallow = [\"ops\"]\n[[export]]\nname = \"inbox\"\npath = \"in\"\nallow = [\"ops\"]\n",
    );
    let (_agent, addr) = agent(&["--config", "b.toml"], p);
    let peer = format!("store-b@{addr}");
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--certs", "certs", "--identity", "ops"]);
        barge(&all, p)
    };
    let out = ok(&run(&["push", "load", "--to", &peer, "--import", "ingest", "--hold"]));
    assert!(out.contains("staged and held 1 files"), "{out}");
    let job = out
        .split_whitespace()
        .find(|w| w.len() == 32 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .expect("the job id is printed")
        .to_string();
    assert!(!p.join("in/load").exists(), "nothing visible before commit");
    let jobs = ok(&run(&["jobs", &peer]));
    let line = jobs
        .lines()
        .find(|l| l.starts_with(&job))
        .expect("the held job is listed");
    assert!(
        line.contains("held") && line.contains("ingest") && line.contains("ops"),
        "{line}"
    );
    fails(
        &run(&["push", "other.sst", "--to", &peer, "--import", "ingest"]),
        5,
        &format!("held by your job {job}"),
    );
    let out = ok(&run(&["commit", &peer, &job]));
    assert!(out.contains("committed job") && out.contains("moved 1 files"), "{out}");
    assert_eq!(std::fs::read(p.join("in/load/1.sst")).unwrap(), content(1, 2 << 20));
    let ls = ok(&run(&["ls", &peer, "--export", "inbox"]));
    let hash = blake3::hash(&content(1, 2 << 20)).to_hex().to_string();
    assert!(ls.contains("load/1.sst") && ls.contains(&hash), "{ls}");

    let out = ok(&run(&[
        "push",
        "other.sst",
        "--to",
        &peer,
        "--import",
        "ingest",
        "--hold",
    ]));
    let job = out.split_whitespace().find(|w| w.len() == 32).unwrap().to_string();
    ok(&run(&["abort", &peer, &job]));
    assert!(!p.join("in/other.sst").exists());
    fails(&run(&["abort", &peer, &job]), 5, "no held job");
    fails(&run(&["commit", &peer, "nothex"]), 2, "not 32 hex digits");
    assert!(
        ok(&run(&["jobs", &peer])).lines().count() == 1,
        "only the header is left"
    );
}

#[test]
fn json_results_and_status_for_scripts() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    make_certs(p, &["store-b", "ops"]);
    std::fs::create_dir_all(p.join("in")).unwrap();
    write(&p.join("data/a.sst"), &content(1, (1 << 20) + 7));
    write(&p.join("data/b.sst"), &content(2, 10));
    store_b_config(
        p,
        "",
        "[[import]]\nname = \"ingest\"\npath = \"in\"\nallow = [\"ops\"]\ntcp_lane = true\n\
         [[import]]\nname = \"clear\"\npath = \"clear\"\nallow = [\"ops\"]\ntcp_lane = \"cleartext\"\n\
         [[import]]\nname = \"quic\"\npath = \"quic\"\nallow = [\"ops\"]\n\
         [[export]]\nname = \"back\"\npath = \"in\"\nallow = [\"ops\"]\ntcp_lane = true\n",
    );
    for d in ["clear", "quic"] {
        std::fs::create_dir_all(p.join(d)).unwrap();
    }
    let (_agent, addr) = agent(&["--config", "b.toml"], p);
    let peer = format!("store-b@{addr}");
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--certs", "certs", "--identity", "ops", "--hash-cache", "off"]);
        barge(&all, p)
    };
    let push = |target: &str| {
        let out = ok(&run(&[
            "push",
            "data",
            "--to",
            &peer,
            "--import",
            target,
            "--json",
            "--tcp-lane",
        ]));
        assert_eq!(out.lines().count(), 1, "one JSON result: {out}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let v = push("ingest");
    assert_eq!(v["lane"], "tls", "tcp_lane = true is the TLS lane: {v}");
    for (target, lane) in [("clear", "cleartext"), ("quic", "quic")] {
        let w = push(target);
        assert_eq!(w["lane"], lane, "{target}: {w}");
    }
    assert_eq!(
        (v["files"].as_u64(), v["bytes"].as_u64()),
        (Some(2), Some((1 << 20) + 17))
    );
    assert_eq!(v["job"].as_str().unwrap().len(), 32);
    let want = blake3::hash(&content(1, (1 << 20) + 7)).to_hex().to_string();
    assert_eq!(v["hashes"]["data/a.sst"], want.as_str());
    assert!(v["seconds"].as_f64().unwrap() >= 0.0);

    let out = ok(&run(&["pull", &peer, "--export", "back", "--into", "got", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["files"].as_u64(), Some(2));
    assert_eq!(v["hashes"]["data/a.sst"], want.as_str());
    assert_eq!(v["lane"], "quic");
    common::assert_same_tree(&p.join("in"), &p.join("got"));
    let out = ok(&run(&[
        "pull",
        &peer,
        "--export",
        "back",
        "--into",
        "got2",
        "--json",
        "--tcp-lane",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["lane"], "tls", "{v}");
    common::assert_same_tree(&p.join("in"), &p.join("got2"));

    let out = ok(&run(&["status", &peer]));
    assert!(out.contains("0 jobs receiving, 0 held"), "{out}");
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let t = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..2000).map(|i| format!("f{i}")).collect();
    for n in &names {
        write(&t.path().join(n), n.as_bytes());
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_barge"))
        .arg("hash")
        .args(&names)
        .current_dir(t.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.ends_with("  f0\n"), "{first}");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

#[test]
fn bad_input_gets_its_documented_exit_code_and_a_dead_peer_is_noticed_in_seconds() {
    use std::time::{Duration, Instant};
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    make_certs(p, &["store-b", "ops"]);
    std::fs::create_dir_all(p.join("in")).unwrap();
    write(&p.join("data/a"), b"a");
    std::os::unix::fs::symlink(p.join("data/a"), p.join("link")).unwrap();
    let id = ["--certs", "certs", "--identity", "ops"];
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(id);
        barge(&all, p)
    };
    // Usage and local errors, before anything connects.
    fails(
        &run(&["push", "link", "--to", "x@127.0.0.1:9", "--import", "in"]),
        1,
        "link: symlinks are not sent",
    );
    for peer in ["recv@[::1:18701", "recv@127.0.0.1:18701:5", "recv@host:0"] {
        fails(
            &run(&["push", "data", "--to", peer, "--import", "in"]),
            2,
            "is not HOST:PORT",
        );
    }
    let timeout = [
        "push",
        "data",
        "--to",
        "x@127.0.0.1:9",
        "--import",
        "in",
        "--connect-timeout",
        "0",
    ];
    fails(&run(&timeout), 2, "--connect-timeout: 0 is not a number of seconds");

    // Configs that must not start an agent, each naming its key.
    let tls =
        |key: &str| format!("[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/store-b.pem\"\nkey = \"certs/{key}\"\n");
    let target = "[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"ops\"]\n";
    std::fs::write(p.join("k.toml"), format!("{}{target}", tls("ops.key"))).unwrap();
    fails(&barge(&["agent", "--config", "k.toml"], p), 3, "config key `tls.key`");
    std::fs::write(
        p.join("d.toml"),
        format!("data_dir = \"in/state\"\n{}{target}", tls("store-b.key")),
    )
    .unwrap();
    fails(&barge(&["agent", "--config", "d.toml"], p), 3, "config key `data_dir`");

    // Nothing listens: refused after the connect timeout, not a minute.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nobody = format!("store-b@127.0.0.1:{port}");
    let started = Instant::now();
    let out = run(&[
        "push",
        "data",
        "--to",
        &nobody,
        "--import",
        "in",
        "--connect-timeout",
        "2",
    ]);
    fails(&out, 4, "no answer within 2s");
    assert!(started.elapsed() < Duration::from_secs(6), "{:?}", started.elapsed());

    // The agent dies after accepting a (slow) job: exit 6 within the idle timeout.
    store_b_config(p, "[limits]\npeer_rate_mbit = 80", target);
    let (mut agent, addr) = agent(&["--config", "b.toml"], p);
    write(&p.join("slow/data"), &content(3, 64 << 20));
    let peer = format!("store-b@{addr}");
    let mut args = vec!["push", "slow", "--to", &peer, "--import", "in", "--idle-timeout", "3"];
    args.extend(id);
    let push = common::proc::command(&args, p).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    agent.kill();
    let killed = Instant::now();
    let out = push.wait_with_output().unwrap();
    fails(&out, 6, "connection lost after the job was accepted");
    assert!(killed.elapsed() < Duration::from_secs(8), "{:?}", killed.elapsed());
}

#[test]
fn a_file_overwritten_in_place_while_sent_fails_the_push_locally_and_leaves_nothing_staged() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    make_certs(p, &["store-b", "ops"]);
    std::fs::create_dir_all(p.join("in")).unwrap();
    // 10 MB/s: the sender reads at most some 60 MiB ahead of what the agent took, so
    // the block changed at 90 MiB is read after the change.
    store_b_config(
        p,
        "[limits]\npeer_rate_mbit = 80",
        "[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"ops\"]\n",
    );
    let (_agent, addr) = agent(&["--config", "b.toml"], p);
    let file = p.join("src/data");
    write(&file, &content(4, 96 << 20));
    let peer = format!("store-b@{addr}");
    let args = [
        "push",
        "src",
        "--to",
        &peer,
        "--import",
        "in",
        "--certs",
        "certs",
        "--identity",
        "ops",
    ];
    let push = common::proc::command(&args, p).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1000));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all_at(&[0xAB; 4096], 90 << 20).unwrap();
    }
    let out = push.wait_with_output().unwrap();
    fails(&out, 1, "changed while it was sent");
    // The sender aborted the job: the agent removed what it had staged.
    let staged = common::staging_of(&p.join("b.toml"), "in");
    for _ in 0..100 {
        if list(&staged).is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(list(&staged).is_empty(), "{:?}", list(&staged));
    assert!(list(&p.join("in")).is_empty());
}

#[test]
fn man_pages_and_completions_are_made_from_the_commands_themselves() {
    let t = tempfile::tempdir().unwrap();
    ok(&barge(&["generate-docs", "--out", "docs"], t.path()));
    let man = t.path().join("docs/man");
    let top = std::fs::read_to_string(man.join("barge.1")).unwrap();
    assert!(top.contains(".TH barge 1"), "{top}");
    // One page per subcommand that --help lists (the generator itself is hidden).
    for sub in [
        "agent",
        "push",
        "pull",
        "ship",
        "ls",
        "jobs",
        "status",
        "commit",
        "abort",
        "certs-issue",
        "hash",
    ] {
        let page = std::fs::read_to_string(man.join(format!("barge-{sub}.1"))).unwrap();
        assert!(page.contains(&format!(".TH barge-{sub} 1")), "barge-{sub}.1");
    }
    assert!(!man.join("barge-generate-docs.1").exists());
    let ship = std::fs::read_to_string(man.join("barge-ship.1")).unwrap();
    assert!(ship.contains("relay chain"), "the page says what --help says");
    let completions = t.path().join("docs/completions");
    for (file, mark) in [
        ("barge.bash", "_barge()"),
        ("_barge", "#compdef barge"),
        ("barge.fish", "complete -c barge"),
    ] {
        let text = std::fs::read_to_string(completions.join(file)).unwrap();
        assert!(text.contains(mark) && text.contains("ship"), "{file}");
    }
    // A folder that can not be made is a named error, not a panic.
    std::fs::write(t.path().join("file"), "").unwrap();
    let out = barge(&["generate-docs", "--out", "file/docs"], t.path());
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("creating file/docs/man"));
}
