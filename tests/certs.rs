//! Certificates in operation, with real agent processes and certificates made by
//! `barge certs`: rotation on SIGHUP (and by `[tls] watch`) while a push runs, broken
//! rotations refused, revocation on both sides, and expiry in metrics, log and status.

mod common;

use common::proc::{barge, command, fails, make_certs, ok, AgentProc};
use common::{content, write};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

fn config(crl: bool, watch: bool) -> String {
    let crl = if crl { "crl = [\"certs/ca.crl.pem\"]\n" } else { "" };
    format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"state\"\nmetrics = \"127.0.0.1:0\"\n\
         [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/store-a.pem\"\nkey = \"certs/store-a.key\"\n{crl}watch = {watch}\n\
         [limits]\nrate_mbit = 40\n[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"ops\", \"other\"]\n"
    )
}

/// An agent `store-a` in `p` with `config`, and certificates for it, `ops` and `other`.
fn start(p: &Path, days: Option<&str>, config: &str) -> AgentProc {
    ok(&barge(&["certs", "init", "--dir", "certs"], p));
    let mut issue = vec!["certs", "issue", "store-a", "--dir", "certs"];
    issue.extend(days.map(|d| ["--days", d]).into_iter().flatten());
    ok(&barge(&issue, p));
    make_certs_but_ca(p, &["ops", "other"]);
    std::fs::create_dir_all(p.join("in")).unwrap();
    std::fs::write(p.join("agent.toml"), config).unwrap();
    AgentProc::start(&["--config", "agent.toml"], p, &[])
}

fn make_certs_but_ca(p: &Path, names: &[&str]) {
    for name in names {
        ok(&barge(&["certs", "issue", name, "--dir", "certs"], p));
    }
}

fn push(p: &Path, agent: &AgentProc, who: &str, file: &str) -> std::process::Output {
    let to = format!("store-a@{}", agent.addr);
    let args = ["push", file, "--to", &to, "--import", "in", "--certs", "certs"];
    let mut c = command(&args, p);
    c.args(["--identity", who, "--hash-cache", "off"]);
    c.output().unwrap()
}

/// The serial number `barge status` shows for the agent's certificate.
fn served_serial(p: &Path, agent: &AgentProc) -> String {
    let to = format!("store-a@{}", agent.addr);
    let out = ok(&barge(&["status", &to, "--certs", "certs", "--identity", "ops"], p));
    let line = out
        .lines()
        .find(|l| l.starts_with("certificate: store-a"))
        .unwrap_or_else(|| panic!("{out}"));
    line.split("serial ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_string()
}

/// The serial number of the certificate in `file`.
fn serial_of(file: &Path) -> String {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_file(file).unwrap();
    barge::net::tls::CertInfo::of(&der).unwrap().serial
}

fn hup(agent: &AgentProc) {
    assert_eq!(unsafe { libc::kill(agent.child.id() as i32, libc::SIGHUP) }, 0);
}

/// Waits up to 20 s for the agent's log to hold `want` `n` times.
fn logged(agent: &AgentProc, want: &str, n: usize) {
    let until = Instant::now() + Duration::from_secs(20);
    while agent.log().matches(want).count() < n {
        assert!(Instant::now() < until, "no {want:?} (x{n}) in: {}", agent.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_push_finishes_across_a_rotation_and_broken_rotations_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    let agent = start(p, None, &config(false, false));
    let before = served_serial(p, &agent);
    assert_eq!(before, serial_of(&p.join("certs/store-a.pem")));

    // 24 MiB at 40 Mbit/s: about 5 s, so the rotation lands while it runs.
    write(&p.join("big.sst"), &content(5, 24 << 20));
    let to = format!("store-a@{}", agent.addr);
    let args = ["push", "big.sst", "--to", &to, "--import", "in", "--certs", "certs"];
    let mut running = command(&args, p)
        .args(["--identity", "ops", "--hash-cache", "off"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    logged(&agent, "offer accepted", 1);
    ok(&barge(
        &[
            "certs",
            "issue",
            "store-a",
            "--dir",
            "certs",
            "--replace",
            "--days",
            "30",
        ],
        p,
    ));
    hup(&agent);
    logged(&agent, "certificates rotated", 1);
    assert!(
        running.try_wait().unwrap().is_none(),
        "the push was still running at the rotation"
    );
    let after = served_serial(p, &agent);
    assert_ne!(after, before, "a new connection sees the new certificate");
    assert_eq!(after, serial_of(&p.join("certs/store-a.pem")));
    let out = running.wait_with_output().unwrap();
    ok(&out);
    assert_eq!(std::fs::read(p.join("in/big.sst")).unwrap(), content(5, 24 << 20));

    // A certificate that does not parse, then one for another identity: both refused.
    std::fs::write(p.join("certs/store-a.pem"), "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    hup(&agent);
    logged(&agent, "reload refused", 1);
    assert_eq!(served_serial(p, &agent), after, "the old certificate stays");
    std::fs::copy(p.join("certs/other.pem"), p.join("certs/store-a.pem")).unwrap();
    std::fs::copy(p.join("certs/other.key"), p.join("certs/store-a.key")).unwrap();
    hup(&agent);
    logged(&agent, "reload refused", 2);
    assert!(
        agent.log().contains("an identity changes only with a restart"),
        "{}",
        agent.log()
    );
    assert_eq!(served_serial(p, &agent), after);
    write(&p.join("small"), b"small");
    ok(&push(p, &agent, "ops", "small"));
}

#[test]
fn with_watch_the_agent_takes_rotated_files_by_itself() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    let agent = start(p, None, &config(false, true));
    let before = served_serial(p, &agent);
    ok(&barge(&["certs", "issue", "store-a", "--dir", "certs", "--replace"], p));
    logged(&agent, "tls files changed: reloaded", 1);
    let after = served_serial(p, &agent);
    assert_ne!(after, before);
    assert_eq!(after, serial_of(&p.join("certs/store-a.pem")));
}

#[test]
fn a_revoked_client_is_refused_others_are_not_and_a_revoked_agent_is_refused_by_the_cli() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    let agent = start(p, None, &config(false, false));
    write(&p.join("one"), b"one");
    ok(&push(p, &agent, "other", "one"));

    let said = ok(&barge(&["certs", "revoke", "other", "--dir", "certs"], p));
    assert!(said.contains(&serial_of(&p.join("certs/other.pem"))), "{said}");
    std::fs::write(p.join("agent.toml"), config(true, false)).unwrap();
    hup(&agent);
    logged(&agent, "reloaded", 1);
    write(&p.join("two"), b"two");
    fails(&push(p, &agent, "other", "two"), 4, "our certificate: it is revoked");
    logged(&agent, "certificate is revoked", 1);
    ok(&push(p, &agent, "ops", "two"));
    assert_eq!(std::fs::read(p.join("in/two")).unwrap(), b"two");

    // The agent's own certificate revoked: clients using the folder's list refuse it.
    ok(&barge(&["certs", "revoke", "store-a", "--dir", "certs"], p));
    let to = format!("store-a@{}", agent.addr);
    let status = barge(&["status", &to, "--certs", "certs", "--identity", "ops"], p);
    fails(&status, 4, "its certificate is revoked");
}

#[test]
fn expiry_shows_in_metrics_status_and_a_warning() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    let agent = start(p, Some("3"), &config(false, false));
    let metrics = agent
        .log()
        .split("metrics endpoint on http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .map(str::to_string)
        .expect("metrics address in the log");
    let text = scrape(&metrics);
    let gauge = |which: &str| -> i64 {
        let key = format!("barge_cert_expiry_seconds{{which=\"{which}\"}} ");
        let line = text
            .lines()
            .find(|l| l.starts_with(&key))
            .unwrap_or_else(|| panic!("{text}"));
        line[key.len()..].trim().parse().unwrap()
    };
    let three_days = 3 * 86_400;
    assert!((three_days - 600..=three_days).contains(&gauge("agent")), "{text}");
    assert!(gauge("ca") > 4 * 365 * 86_400, "{text}");
    logged(&agent, "certificate expires soon", 1);
    let log = agent.log();
    let warning = log.lines().find(|l| l.contains("certificate expires soon")).unwrap();
    assert!(
        warning.contains("which=\"agent\"") || warning.contains("which=agent"),
        "{warning}"
    );
    // Issued for 3 days a moment ago: 2 whole days left, or 3 within the same second.
    assert!(
        warning.contains("days_left=2") || warning.contains("days_left=3"),
        "{warning}"
    );
    assert!(
        !log.contains("which=\"ca\"") && !log.contains("which=ca"),
        "the CA is not near expiry"
    );
    let to = format!("store-a@{}", agent.addr);
    let status = ok(&barge(&["status", &to, "--certs", "certs", "--identity", "ops"], p));
    assert!(
        status.contains("(in 2 days)") || status.contains("(in 3 days)"),
        "{status}"
    );
}

#[test]
fn certs_commands_refuse_bad_input() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    make_certs(p, &["a"]);
    fails(
        &barge(&["certs", "issue", "b", "--dir", "certs", "--days", "0"], p),
        3,
        "0 days",
    );
    fails(
        &barge(&["certs", "issue", "a", "--dir", "certs"], p),
        3,
        "already exists",
    );
    fails(
        &barge(&["certs", "revoke", "nobody", "--dir", "certs"], p),
        3,
        "nobody.pem",
    );
    // A certificate of another CA can not be put on this CA's list.
    ok(&barge(&["certs", "init", "--dir", "other"], p));
    ok(&barge(&["certs", "issue", "x", "--dir", "other"], p));
    std::fs::copy(p.join("other/x.pem"), p.join("certs/x.pem")).unwrap();
    fails(
        &barge(&["certs", "revoke", "x", "--dir", "certs"], p),
        3,
        "not issued by this folder's CA",
    );
    assert!(!p.join("certs/ca.crl.pem").exists(), "nothing written");
}

/// `GET /metrics`, within 5 s.
fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}
