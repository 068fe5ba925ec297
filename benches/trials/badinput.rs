//! The bad-input matrix: the CLI, configs, peer strings, certificates, files that change
//! and peers that go away, each with the exit code and message a user gets.

use crate::check::{content, staged_job, write};
use crate::host::{barge, Host};
use crate::{Ctx, Row};
use std::path::Path;
use std::time::{Duration, Instant};

/// One case: what was done, the exit code and message expected, what came.
struct Case {
    what: &'static str,
    code: i32,
    says: &'static str,
    got: (i32, String, String),
    /// Further conditions (time taken, nothing left staged), checked by the case.
    extra: Result<(), String>,
}

impl Case {
    fn new(what: &'static str, code: i32, says: &'static str, got: (i32, String, String)) -> Case {
        Case {
            what,
            code,
            says,
            got,
            extra: Ok(()),
        }
    }

    fn also(mut self, extra: Result<(), String>) -> Case {
        self.extra = extra;
        self
    }

    fn verdict(&self) -> Result<(), String> {
        let (code, _, err) = &self.got;
        let line = err
            .lines()
            .find(|l| l.starts_with("barge:") || l.starts_with("error:"))
            .unwrap_or("");
        if *code != self.code || !err.contains(self.says) {
            return Err(format!(
                "{}: expected exit {} with {:?}, got {code}: {line}",
                self.what, self.code, self.says
            ));
        }
        self.extra.clone().map_err(|e| format!("{}: {e}", self.what))
    }
}

pub fn matrix(ctx: &mut Ctx) -> Row {
    let mut row = Row::new("bad-input matrix (CLI, config, peers, certificates, files)");
    let dir = ctx.work.join("bad");
    let mut host = Host::new(
        &dir,
        "127.0.0.1",
        "[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"ops\"]\n",
    );
    std::fs::create_dir_all(dir.join("in")).unwrap();
    // 10 MB/s, so a push of 64 MiB runs long enough to change its file under it.
    host.top = "[limits]\npeer_rate_mbit = 80\n".into();
    host.start(None);
    let mut cases = vec![];
    cases.extend(cli_cases(&host, &dir));
    cases.extend(config_cases(&dir));
    cases.extend(peer_cases(&mut host, &dir));
    for c in &cases {
        let v = c.verdict();
        let mark = if v.is_ok() { "ok  " } else { "FAIL" };
        let line = c
            .got
            .2
            .lines()
            .find(|l| l.starts_with("barge:"))
            .unwrap_or("")
            .to_string();
        ctx.log(format!(
            "  {mark} exit {} (want {}) {}: {line}",
            c.got.0, c.code, c.what
        ));
        row.record(v);
    }
    row
}

fn cli_cases(host: &Host, dir: &Path) -> Vec<Case> {
    write(&dir.join("src/one/a"), b"a");
    let _ = std::os::unix::fs::symlink(dir.join("src/one/a"), dir.join("src/link"));
    let peer = host.peer();
    let push = |extra: &[&str]| {
        let mut a = vec!["push", "src/one", "--import", "in"];
        a.extend(extra);
        host.run(&a)
    };
    let to = ["--to", peer.as_str()];
    let with_to = |extra: &[&str]| {
        let mut a = to.to_vec();
        a.extend(extra);
        push(&a)
    };
    vec![
        Case::new(
            "push of a file that does not exist",
            1,
            "No such file",
            host.run(&["push", "src/none", "--to", &peer, "--import", "in"]),
        ),
        Case::new(
            "push of a PATH that is a symlink",
            1,
            "symlinks are not sent",
            host.run(&["push", "src/link", "--to", &peer, "--import", "in"]),
        ),
        changed_in_place(host, dir),
        Case::new(
            "peer recv@[::1:18701",
            2,
            "not HOST:PORT",
            push(&["--to", "recv@[::1:18701"]),
        ),
        Case::new(
            "peer recv@127.0.0.1:18701:5",
            2,
            "not HOST:PORT",
            push(&["--to", "recv@127.0.0.1:18701:5"]),
        ),
        Case::new("peer without a port", 2, "not HOST:PORT", push(&["--to", "nonsense"])),
        Case::new("--meta without =", 2, "KEY=VALUE", with_to(&["--meta", "region"])),
        Case::new(
            "--connections 9",
            2,
            "9 is not in 1..=4",
            with_to(&["--connections", "9"]),
        ),
        Case::new("--max-mtu 70000", 2, "--max-mtu", with_to(&["--max-mtu", "70000"])),
        Case::new(
            "--connect-timeout 0",
            2,
            "--connect-timeout",
            with_to(&["--connect-timeout", "0"]),
        ),
        Case::new("--range without ..", 2, "--range", with_to(&["--range", "abc"])),
        Case::new(
            "commit of a job id that is not hex",
            2,
            "32 hex digits",
            host.run(&["commit", &peer, "xyz"]),
        ),
    ]
}

/// A file overwritten in place, same size, while it is sent: exit 1, and the receiver
/// keeps nothing of it.
fn changed_in_place(host: &Host, dir: &Path) -> Case {
    // 96 MiB at 10 MB/s: the sender reads at most some 60 MiB ahead of what the agent
    // took, so the block changed at 90 MiB is read after the change.
    let file = dir.join("src/changing/data");
    write(&file, &content(9, 96 << 20));
    let push = host.push("ops", &[dir.join("src/changing").to_str().unwrap()], "in", &[]);
    std::thread::sleep(Duration::from_millis(1000));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all_at(&[0xAB; 4096], 90 << 20).unwrap();
    }
    let r = push.wait();
    std::thread::sleep(Duration::from_millis(300));
    let left = staged_job(&dir.join("in"));
    let case = Case::new(
        "a file overwritten in place during its push",
        1,
        "changed while it was sent",
        (r.code, String::new(), r.stderr),
    );
    case.also(match left {
        None => Ok(()),
        Some(d) => Err(format!("{} left staged", d.display())),
    })
}

fn config_cases(dir: &Path) -> Vec<Case> {
    let agent = |name: &str, text: String| {
        std::fs::write(dir.join(name), text).unwrap();
        barge(&["agent", "--config", name], dir)
    };
    let conf = |top: &str, key: &str, targets: &str| {
        format!(
            "listen = \"127.0.0.1:0\"\n{top}\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/store-b.pem\"\nkey = \"certs/{key}\"\n{targets}"
        )
    };
    let target = "[[import]]\nname = \"x\"\npath = \"in\"\nallow = [\"ops\"]\n";
    let gone = target.replace("\"in\"", "\"gone\"");
    let bad_listen = conf("", "store-b.key", target).replace("127.0.0.1:0", "here");
    vec![
        Case::new(
            "a key that does not match its certificate",
            3,
            "config key `tls.key`",
            agent("c1.toml", conf("", "ops.key", target)),
        ),
        Case::new(
            "data_dir inside an import target",
            3,
            "config key `data_dir`",
            agent("c2.toml", conf("data_dir = \"in/state\"", "store-b.key", target)),
        ),
        Case::new(
            "an import path that does not exist",
            3,
            "config key `import[0] (x).path`",
            agent("c3.toml", conf("", "store-b.key", &gone)),
        ),
        Case::new(
            "an unknown key",
            3,
            "unknown field",
            agent("c4.toml", conf("colour = \"red\"", "store-b.key", target)),
        ),
        Case::new(
            "listen that is not an address",
            3,
            "config key `listen`",
            agent("c5.toml", bad_listen),
        ),
    ]
}

fn peer_cases(host: &mut Host, dir: &Path) -> Vec<Case> {
    let peer = host.peer();
    let dead = format!("store-b@127.0.0.1:{}", crate::host::free_port());
    let started = Instant::now();
    let nobody = host.run(&["push", "src/one", "--to", &dead, "--import", "in"]);
    let waited = started.elapsed();
    // Another CA's identity.
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let _ = barge(&["certs", "init", "--dir", "certs"], &other);
    let _ = barge(&["certs", "issue", "ops", "--dir", "certs"], &other);
    let foreign = barge(
        &[
            "push",
            "../src/one",
            "--to",
            &peer,
            "--import",
            "in",
            "--certs",
            "certs",
            "--identity",
            "ops",
        ],
        &other,
    );
    let mut cases = vec![
        Case::new("push to a port where nothing listens", 4, "no answer within 5s", nobody).also(match waited {
            w if w < Duration::from_secs(10) => Ok(()),
            w => Err(format!("took {:.1} s", w.as_secs_f64())),
        }),
        Case::new(
            "an identity without a certificate",
            3,
            "ghost.pem",
            barge(
                &[
                    "push",
                    "src/one",
                    "--to",
                    &peer,
                    "--import",
                    "in",
                    "--certs",
                    "certs",
                    "--identity",
                    "ghost",
                ],
                dir,
            ),
        ),
        Case::new("a client certificate from another CA", 4, "cannot connect", foreign),
        Case::new(
            "an import target that does not exist",
            5,
            "ops may not write to import target \"nowhere\" (there is none it may use by that name)",
            host.run(&["push", "src/one", "--to", &peer, "--import", "nowhere"]),
        ),
        Case::new(
            "an identity on no allow list",
            5,
            "ops2 is on no allow list of this agent",
            barge(
                &[
                    "push",
                    "src/one",
                    "--to",
                    &peer,
                    "--import",
                    "in",
                    "--certs",
                    "certs",
                    "--identity",
                    "ops2",
                ],
                dir,
            ),
        ),
        Case::new(
            "commit of a job that is not held",
            5,
            "no held job",
            host.run(&["commit", &peer, &"0".repeat(32)]),
        ),
    ];
    let first = host.run(&["push", "src/one", "--to", &peer, "--import", "in"]);
    assert_eq!(first.0, 0, "{}", first.2);
    write(&dir.join("src/two/one/a"), b"other a");
    cases.push(Case::new(
        "a file that exists in the target",
        5,
        "already exists",
        host.run(&["push", "src/two/one", "--to", &peer, "--import", "in"]),
    ));
    cases.push(killed_after_accept(host, dir));
    cases
}

/// The agent dies after it accepted the job: exit 6 within seconds, not a minute.
fn killed_after_accept(host: &mut Host, dir: &Path) -> Case {
    write(&dir.join("src/slow/data"), &content(11, 64 << 20));
    let push = host.push("ops", &[dir.join("src/slow").to_str().unwrap()], "in", &[]);
    std::thread::sleep(Duration::from_millis(1500));
    let killed = Instant::now();
    host.kill();
    let r = push.wait();
    let waited = killed.elapsed();
    host.start(None);
    Case::new(
        "the agent killed after it accepted the job",
        6,
        "connection lost after the job was accepted",
        (r.code, String::new(), r.stderr),
    )
    .also(match waited {
        w if w < Duration::from_secs(15) => Ok(()),
        w => Err(format!("noticed after {:.1} s", w.as_secs_f64())),
    })
}
