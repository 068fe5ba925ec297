//! barge as a systemd service: the unit files pass `systemd-analyze verify` and rate
//! "OK" or better in `systemd-analyze security`; the agent binary speaks the notify
//! protocol (ready, watchdog, reloading, stopping), reloads on SIGHUP (refusing a bad
//! config and keeping the old one) and drains on SIGTERM, exiting 0 after a running
//! push committed.

mod common;

use common::{content, write};
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn have(tool: &str) -> bool {
    let found = Command::new(tool).arg("--version").output().is_ok();
    if !found {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{tool} is missing");
        eprintln!("skipped: {tool} is not installed");
    }
    found
}

/// The unit with ExecStart pointing at the binary this test built (verify checks it).
fn unit_here(dir: &Path) -> std::path::PathBuf {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/barge.service")).unwrap();
    let unit = unit.replace("/usr/bin/barge", env!("CARGO_BIN_EXE_barge"));
    std::fs::write(dir.join("barge.service"), unit).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/barge.socket"),
        dir.join("barge.socket"),
    )
    .unwrap();
    dir.join("barge.service")
}

#[test]
fn unit_files_pass_systemd_verify_and_security() {
    if !have("systemd-analyze") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let service = unit_here(t.path());
    // The man pages of Documentation= are installed by the package, not by a checkout
    // (tests/package.sh verifies the installed unit with them).
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&service)
        .arg(t.path().join("barge.socket"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "verify: {err}");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&service)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no rating in {text}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no score in {line}"));
    assert!(score <= 2.0 && line.contains("OK"), "{line}");
    // The example config is a valid config once its folders exist: check its keys parse.
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/barge.toml")).unwrap();
    let parsed: toml::Value = toml::from_str(&example).unwrap();
    assert_eq!(parsed["limits"]["rate_mbit"].as_integer(), Some(8000));
}

fn barge(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_barge"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

/// Next notification, or panic after 20 s.
fn next(sock: &UnixDatagram) -> String {
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification in time");
    // One `KEY=VALUE` per line; the last line may end with a newline.
    String::from_utf8_lossy(&buf[..n]).trim_end().to_string()
}

/// Waits for a notification starting with `want`, skipping watchdog pings.
fn expect(sock: &UnixDatagram, want: &str) -> String {
    loop {
        let msg = next(sock);
        if msg.starts_with(want) {
            return msg;
        }
        assert!(msg == "WATCHDOG=1", "expected {want}, got {msg:?}");
    }
}

const CONFIG: &str = "listen = \"127.0.0.1:0\"\ndata_dir = \"state\"\ndrain_secs = 60\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/store-b.pem\"\nkey = \"certs/store-b.key\"\n\
[limits]\nrate_mbit = 40\n[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"ops\"]\n";

#[test]
fn the_agent_notifies_reloads_on_sighup_and_drains_on_sigterm() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    barge(&["certs", "init", "--dir", "certs"], p);
    for name in ["store-b", "ops", "other"] {
        barge(&["certs", "issue", name, "--dir", "certs"], p);
    }
    std::fs::create_dir_all(p.join("in")).unwrap();
    std::fs::write(p.join("agent.toml"), CONFIG).unwrap();
    let staging = common::staging_of(&p.join("agent.toml"), "in");
    let notify = UnixDatagram::bind(p.join("notify.sock")).unwrap();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_barge"))
        .args(["agent", "--config", "agent.toml", "--log-format", "json"])
        .current_dir(p)
        .env("NOTIFY_SOCKET", p.join("notify.sock"))
        .env("WATCHDOG_USEC", "200000")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ready = expect(&notify, "READY=1");
    let addr = ready
        .split("listening on ")
        .nth(1)
        .expect("status names the address")
        .trim()
        .to_string();
    assert_eq!(expect(&notify, "WATCHDOG=1"), "WATCHDOG=1");
    let peer = format!("store-b@{addr}");
    let push = |who: &str, file: &str| {
        Command::new(env!("CARGO_BIN_EXE_barge"))
            .args([
                "push",
                file,
                "--to",
                &peer,
                "--import",
                "in",
                "--certs",
                "certs",
                "--identity",
                who,
            ])
            .args(["--hash-cache", "off"])
            .current_dir(p)
            .output()
            .unwrap()
    };
    write(&p.join("small"), b"small");
    assert_eq!(
        push("other", "small").status.code(),
        Some(5),
        "not on the allow list yet"
    );

    // A new allow list on SIGHUP; then a broken config, which is refused.
    std::fs::write(
        p.join("agent.toml"),
        CONFIG.replace("[\"ops\"]", "[\"ops\", \"other\"]"),
    )
    .unwrap();
    let hup = |pid: u32| unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    assert_eq!(hup(agent.id()), 0);
    expect(&notify, "RELOADING=1");
    expect(&notify, "READY=1");
    let out = push("other", "small");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(p.join("agent.toml"), "listen = [broken").unwrap();
    assert_eq!(hup(agent.id()), 0);
    expect(&notify, "RELOADING=1");
    expect(&notify, "READY=1");
    write(&p.join("small2"), b"small2");
    assert!(
        push("other", "small2").status.success(),
        "the old config stays after a bad reload"
    );

    // SIGTERM while a push runs (40 Mbit/s: about 2.5 s): it finishes, then exit 0.
    write(&p.join("big.sst"), &content(9, 12 << 20));
    // On a terminal (`script` gives it one) the push draws a progress bar.
    let cmd = format!(
        "{} push big.sst --to {peer} --import in --certs certs --identity ops --hash-cache off",
        env!("CARGO_BIN_EXE_barge")
    );
    let big = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .current_dir(p)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !staged_something(&staging) {
        assert!(started.elapsed() < Duration::from_secs(20), "the push never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new(env!("CARGO_BIN_EXE_barge"))
        .args(["status", &peer, "--certs", "certs", "--identity", "ops"])
        .current_dir(p)
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(
        status.contains("1 jobs receiving") && status.contains("%") && status.contains("MB/s"),
        "{status}"
    );
    assert_eq!(unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) }, 0);
    expect(&notify, "STOPPING=1");
    let big_out = big.wait_with_output().unwrap();
    let shown = String::from_utf8_lossy(&big_out.stdout);
    assert!(
        big_out.status.success(),
        "the running push committed during the drain: {shown}"
    );
    assert!(
        shown.contains("1 files [") && shown.contains("ETA"),
        "a progress bar: {shown}"
    );
    assert!(shown.contains("committed 1 files"), "{shown}");
    let status = agent.wait().unwrap();
    assert_eq!(status.code(), Some(0), "drained and exited 0");
    assert_eq!(std::fs::read(p.join("in/big.sst")).unwrap(), content(9, 12 << 20));
    let log: Vec<String> = BufReader::new(agent.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .collect();
    assert!(log.iter().all(|l| l.starts_with('{')), "JSON log lines: {log:?}");
    assert!(log.iter().any(|l| l.contains("reload refused")), "{log:?}");
    assert!(
        log.iter().any(|l| l.contains("\"span\"") && l.contains("\"peer\"")),
        "spans carry the peer"
    );
}

fn staged_something(staging: &Path) -> bool {
    walk_size(staging) > 0
}

fn walk_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => walk_size(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

#[test]
fn the_agent_takes_a_socket_from_socket_activation() {
    if !have("systemd-socket-activate") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    barge(&["certs", "init", "--dir", "certs"], p);
    for name in ["store-b", "ops"] {
        barge(&["certs", "issue", name, "--dir", "certs"], p);
    }
    std::fs::create_dir_all(p.join("in")).unwrap();
    // The config's listen address is unusable: only the passed socket can serve.
    std::fs::write(p.join("agent.toml"), CONFIG.replace("127.0.0.1:0", "127.0.0.1:1")).unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut activator = Command::new("systemd-socket-activate")
        .args([
            "--datagram",
            "-l",
            &format!("127.0.0.1:{port}"),
            env!("CARGO_BIN_EXE_barge"),
        ])
        .args(["agent", "--config", "agent.toml"])
        .current_dir(p)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    write(&p.join("hello"), b"hello");
    let out = Command::new(env!("CARGO_BIN_EXE_barge"))
        .args([
            "push",
            "hello",
            "--to",
            &format!("store-b@127.0.0.1:{port}"),
            "--import",
            "in",
        ])
        .args(["--certs", "certs", "--identity", "ops", "--hash-cache", "off"])
        .current_dir(p)
        .output()
        .unwrap();
    unsafe { libc::kill(activator.id() as i32, libc::SIGTERM) };
    let _ = activator.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(p.join("in/hello")).unwrap(), b"hello");
}
