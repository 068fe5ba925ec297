//! Hostile peers against a real agent process: floods by an identity on no allow list
//! and by an allowed one, connection and job-slot lockouts, a takeover of another
//! sender's held job. Each row says what was tried and what held.

use crate::check::{content, list, write};
use crate::host::{barge, Host};
use crate::{Ctx, Row};
use barge::proto::wire::Message;
use std::time::{Duration, Instant};

const TARGETS: &str = "[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"ops\", \"ops2\"]\n\
[[import]]\nname = \"shut\"\npath = \"shut\"\nallow = [\"someone\"]\n\
[[export]]\nname = \"out\"\npath = \"out\"\nallow = [\"ops\", \"ops2\"]\n";

pub fn attacks(ctx: &mut Ctx) -> Vec<Row> {
    let dir = ctx.work.join("hostile");
    let mut host = Host::new(&dir, "127.0.0.1", TARGETS);
    for d in ["in", "shut", "out", "src"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    assert_eq!(barge(&["certs", "issue", "intruder", "--dir", "certs"], &dir).0, 0);
    write(&dir.join("out/big"), &content(1, 32 << 20));
    write(&dir.join("src/job/a"), &content(2, 4 << 20));
    host.top = "max_jobs = 8\n[limits]\nmax_connections = 16\n".into();
    host.start(None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let rows = vec![
        memory_flood(ctx, &mut host, &rt, "intruder"),
        memory_flood(ctx, &mut host, &rt, "ops2"),
        connection_lockout(&mut host, &rt),
        slot_lockout(&mut host, &rt),
        takeover(&mut host),
        planted(&mut host),
    ];
    host.stop();
    let mut rows = rows;
    rows.push(lane_flood(ctx));
    rows
}

fn rss_mib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    kib / 1024
}

fn client(host: &Host, who: &str) -> barge::client::Client {
    let tls = barge::net::tls::TlsFiles::in_dir(&host.dir.join("certs"), who);
    barge::client::Client::new(&tls).unwrap()
}

fn peer(host: &Host) -> barge::client::Peer {
    host.peer().parse().unwrap()
}

/// Streams that each announce a 64 MiB request and send 1 MiB of it: a list request
/// (never authorized to be large) and an offer into a target closed to the sender.
async fn flood(
    host: &Host,
    who: &str,
    conns: usize,
    streams: usize,
) -> (usize, (barge::client::Client, Vec<quinn::Connection>)) {
    let c = client(host, who);
    let mut opened = 0;
    let mut keep = vec![];
    let list = Message::ListJobs.encode().unwrap();
    let offer = Message::Offer(barge::proto::wire::Offer {
        target: "shut".into(),
        files: vec![],
        meta: vec![],
        tcp_lane: false,
        hold: false,
        relay: vec![],
    })
    .encode()
    .unwrap();
    for _ in 0..conns {
        let Ok(conn) = c.connect(&peer(host)).await else {
            continue;
        };
        for s in 0..streams {
            let Ok((mut send, _recv)) = conn.open_bi().await else {
                break;
            };
            let body = if s % 2 == 0 { &list[4..] } else { &offer[4..] };
            let mut frame = (64u32 << 20).to_be_bytes().to_vec();
            frame.extend_from_slice(body);
            frame.resize(1 << 20, 0);
            let sent = tokio::time::timeout(Duration::from_secs(2), send.write_all(&frame)).await;
            if matches!(sent, Ok(Ok(()))) {
                opened += 1;
            }
            std::mem::forget(send);
        }
        keep.push(conn);
    }
    (opened, (c, keep))
}

/// 16 connections x 64 streams, each announcing 64 MiB: the agent's resident memory
/// stays within 64 MiB of idle, a push still commits, and the log is not flooded.
fn memory_flood(ctx: &Ctx, host: &mut Host, rt: &tokio::runtime::Runtime, who: &str) -> Row {
    let what = match who {
        "intruder" => "an identity on no allow list",
        _ => "an allowed identity, into a target closed to it",
    };
    let mut row = Row::new(&format!(
        "memory flood by {what}: 16 connections x 64 streams announcing 64 MiB each"
    ));
    let pid = host.agent().pid();
    let idle = rss_mib(pid, "VmRSS:");
    let warned_before = warnings(host);
    let started = Instant::now();
    let (opened, conns) = rt.block_on(flood(host, who, 16, 64));
    std::thread::sleep(Duration::from_secs(3));
    let (code, _, err) = host.run(&["push", "src/job", "--to", &host.peer(), "--import", "in"]);
    let now = rss_mib(pid, "VmHWM:");
    for c in &conns.1 {
        c.close(0u32.into(), b"done");
    }
    std::thread::sleep(Duration::from_millis(500));
    drop(conns);
    let warned = warnings(host) - warned_before;
    row.note(format!(
        "{opened} streams got their first MiB out; agent RSS {idle} MiB idle, peak {now} MiB by the end; \
         {warned} warnings logged; push meanwhile exit {code}; {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    let _ = ctx;
    row.record(match (code, now.saturating_sub(idle)) {
        (0, grew) if grew < 64 && warned <= 60 => Ok(()),
        (0, grew) if grew >= 64 => Err(format!("RSS grew by {grew} MiB")),
        (0, _) => Err(format!("{warned} warnings logged")),
        (c, _) => Err(format!("push during the flood exit {c}: {err}")),
    });
    clear(host);
    row
}

fn warnings(host: &mut Host) -> usize {
    host.agent().log().iter().filter(|l| l.contains("WARN")).count()
}

/// Removes what the pushes committed, so the next attack can push the same job (a
/// recorded outcome whose files are gone answers for nothing).
fn clear(host: &Host) {
    let _ = std::fs::remove_dir_all(host.dir.join("in/job"));
}

/// 32 connections from an identity on no allow list and 16 from an allowed one, held
/// open (limit 16, 12 per identity): another allowed identity still pushes.
fn connection_lockout(host: &mut Host, rt: &tokio::runtime::Runtime) -> Row {
    let mut row = Row::new("connection lockout: 32 connections by an outsider, 16 by one allowed identity (limit 16)");
    let held = rt.block_on(async {
        let (intruder, ops2) = (client(host, "intruder"), client(host, "ops2"));
        let mut keep = vec![];
        for c in std::iter::repeat_n(&intruder, 32).chain(std::iter::repeat_n(&ops2, 16)) {
            if let Ok(conn) = c.connect(&peer(host)).await {
                keep.push(conn);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        (intruder, ops2, keep)
    });
    let open = held.2.iter().filter(|c| c.close_reason().is_none()).count();

    let (code, _, err) = host.run(&["push", "src/job", "--to", &host.peer(), "--import", "in"]);
    row.note(format!(
        "{open} of 48 connections left open by the agent; the other identity's push exit {code}"
    ));
    row.record(match code {
        0 if open <= 12 => Ok(()),
        0 => Err(format!("{open} connections kept open")),
        c => Err(format!("push exit {c}: {err}")),
    });
    drop(held);
    clear(host);
    row
}

/// 8 pulls by one identity that never read a byte (max_jobs 8): another identity's
/// push still runs, and the stalled pulls give their slots back.
fn slot_lockout(host: &mut Host, rt: &tokio::runtime::Runtime) -> Row {
    let mut row = Row::new("job-slot lockout: 8 pulls that never read (max_jobs 8)");
    let streams = rt.block_on(async {
        let c = client(host, "ops2");
        let conn = c.connect(&peer(host)).await.unwrap();
        let mut keep = vec![];
        for _ in 0..8 {
            let Ok((mut send, recv)) = conn.open_bi().await else {
                break;
            };
            let fetch = Message::Fetch {
                export: "out".into(),
                files: vec![],
                range: None,
            };
            let _ = barge::transfer::write_msg(&mut send, &fetch).await;
            keep.push((send, recv));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        (c, conn, keep)
    });
    let (code, _, err) = host.run(&["push", "src/job", "--to", &host.peer(), "--import", "in"]);
    row.note(format!("the other identity's push exit {code}"));
    row.record(match code {
        0 => Ok(()),
        c => Err(format!("push exit {c}: {err}")),
    });
    drop(streams);
    clear(host);
    row
}

/// `ops` holds a job; `ops2`, allowed on the same target, sends the same files with
/// other metadata and with the same, then commits and aborts ops's job id.
fn takeover(host: &mut Host) -> Row {
    let mut row = Row::new("takeover of another sender's held job");
    let id = |out: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(out).unwrap_or_default();
        v["job"].as_str().unwrap_or_default().to_string()
    };
    let push = |who: &str, meta: &str| {
        let to = host.peer();
        host.run_as(
            who,
            &[
                "push", "src/job", "--to", &to, "--import", "in", "--hold", "--meta", meta, "--json",
            ],
        )
    };
    let (code, out, err) = push("ops", "region=1");
    if code != 0 {
        row.record(Err(format!("the owner's hold exit {code}: {err}")));
        return row;
    }
    let job = id(&out);
    let to = host.peer();
    let tries = [
        ("same files, other metadata", push("ops2", "region=7")),
        ("same files, same metadata", push("ops2", "region=1")),
        ("commit", host.run_as("ops2", &["commit", &to, &job])),
        ("abort", host.run_as("ops2", &["abort", &to, &job])),
    ];
    for (what, (code, _, err)) in &tries {
        row.record(match code {
            5 => Ok(()),
            c => Err(format!("{what} by another identity: exit {c}: {err}")),
        });
    }
    let jobs = host.run_as("ops2", &["jobs", &to]).1;
    row.record(match jobs.contains(&job) {
        false => Ok(()),
        true => Err(format!("another identity lists the job: {jobs}")),
    });
    let (code, _, err) = host.run(&["commit", &to, &job]);
    row.record(match (code, list(&host.dir.join("in")).len()) {
        (0, 1) => Ok(()),
        (c, n) => Err(format!("the owner's commit exit {c} ({n} files): {err}")),
    });
    row.note(format!(
        "{} of {} refused or hidden; the owner committed",
        row.passed.saturating_sub(1),
        tries.len() + 1
    ));
    clear(host);
    row
}

/// 35 bytes outside every target and export that must stay as they are.
const VICTIM: &[u8] = b"thirty-five bytes of someone's data";

/// The id the agent will give `src/job` pushed into `in` (no metadata).
fn job_id(host: &Host) -> String {
    let data = std::fs::read(host.dir.join("src/job/a")).unwrap();
    let hashes = barge::proto::blocks::FileHashes::from_reader(&data[..], data.len() as u64).unwrap();
    let offer = barge::proto::wire::Offer {
        target: "in".into(),
        files: vec![barge::proto::wire::OfferFile {
            path: "job/a".into(),
            hashes,
            keys: None,
            mode: 0o644,
        }],
        meta: vec![],
        tcp_lane: false,
        hold: false,
        relay: vec![],
    };
    offer.job_id().to_string()
}

/// A local user who can write into the target and the export plants symlinks, a hard
/// link and a staging folder of its own: nothing outside is written, truncated, moved
/// or sent, and each push or pull is refused with a reason.
fn planted(host: &mut Host) -> Row {
    let mut row = Row::new("planted symlinks, hard links and foreign staging (a local user)");
    let dir = host.dir.clone();
    let outside = dir.join("outside");
    let reset_victim = || {
        let _ = std::fs::remove_dir_all(&outside);
        write(&outside.join("files/job/a"), VICTIM);
        write(&outside.join("secret"), VICTIM);
    };
    let untouched = |what: &str| -> Result<(), String> {
        let same = std::fs::read(outside.join("files/job/a")).ok().as_deref() == Some(VICTIM)
            && std::fs::read(outside.join("secret")).ok().as_deref() == Some(VICTIM)
            && list(&outside).len() == 2;
        match same {
            true => Ok(()),
            false => Err(format!("{what}: something outside changed: {:?}", list(&outside))),
        }
    };
    let staging = crate::check::staging_root(&dir.join("in"));
    std::fs::create_dir_all(&staging).unwrap();
    let push = |host: &Host| host.run(&["push", "src/job", "--to", &host.peer(), "--import", "in"]);
    let mut tried = vec![];
    // 1. The job's (predictable) staging folder is a symlink to a folder outside.
    reset_victim();
    let job = staging.join(job_id(host));
    std::os::unix::fs::symlink(&outside, &job).unwrap();
    let (code, _, err) = push(host);
    tried.push((
        "a symlink as the job's staging folder",
        code != 0,
        err,
        untouched("job folder"),
    ));
    let _ = std::fs::remove_file(&job);
    // 2. The staging folder owned by another user.
    reset_victim();
    std::os::unix::fs::chown(&staging, Some(12345), None).unwrap();
    let (code, _, err) = push(host);
    tried.push((
        "a staging folder owned by another user",
        code != 0,
        err,
        untouched("foreign staging"),
    ));
    std::os::unix::fs::chown(&staging, Some(0), None).unwrap();
    // 3. The job's top folder in the target is a symlink to a folder outside.
    reset_victim();
    clear(host);
    std::os::unix::fs::symlink(outside.join("files/job"), dir.join("in/job")).unwrap();
    let (code, _, err) = push(host);
    tried.push((
        "a target folder that is a symlink",
        code != 0,
        err,
        untouched("target folder"),
    ));
    let _ = std::fs::remove_file(dir.join("in/job"));
    // 4. An export file that is a hard link to, or a symlink at, a file outside.
    reset_victim();
    std::fs::hard_link(outside.join("secret"), dir.join("out/linked")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), dir.join("out/sym")).unwrap();
    for name in ["linked", "sym"] {
        let into = dir.join(format!("pulled-{name}"));
        let into_s = into.to_string_lossy().to_string();
        let args = [
            "pull",
            &host.peer(),
            "--export",
            "out",
            "--file",
            name,
            "--into",
            &into_s,
        ];
        let (code, _, err) = host.run(&args);
        let leaked = into.join(name).exists();
        let check = match leaked {
            false => untouched(name),
            true => Err(format!("{name} was sent")),
        };
        tried.push(("an export file linked to one outside", code != 0, err, check));
    }
    let _ = std::fs::remove_file(dir.join("out/linked"));
    let _ = std::fs::remove_file(dir.join("out/sym"));
    for (what, refused, err, check) in tried {
        let line = err.lines().find(|l| l.starts_with("barge:")).unwrap_or("").to_string();
        row.note(format!("{what}: {line}"));
        row.record(match (refused, check) {
            (true, Ok(())) => Ok(()),
            (false, _) => Err(format!("{what}: not refused")),
            (_, Err(e)) => Err(e),
        });
    }
    clear(host);
    row
}

/// 1,000 token-less connections to the TCP lane, from 100 addresses, held open against
/// an agent limited to 256 open files: a push over the lane still commits and the
/// metrics endpoint still answers.
fn lane_flood(ctx: &Ctx) -> Row {
    let mut row = Row::new("TCP lane flood: 1,000 token-less connections (agent limited to 256 files)");
    let dir = ctx.work.join("hostile-lane");
    let mut host = Host::new(
        &dir,
        "127.0.0.1",
        "[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"ops\"]\ntcp_lane = true\n",
    );
    std::fs::create_dir_all(dir.join("in")).unwrap();
    write(&dir.join("src/job/a"), &content(3, 64 << 20));
    let lane = free_tcp_port();
    let metrics = free_tcp_port();
    host.top = format!("tcp_port = {lane}\nmetrics = \"127.0.0.1:{metrics}\"\n");
    host.start(None);
    let pid = host.agent().pid().to_string();
    let limited = std::process::Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=256:256"])
        .status()
        .is_ok_and(|s| s.success());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let flood = rt.block_on(async {
        let mut held = vec![];
        for i in 0..1000u32 {
            let from = std::net::SocketAddr::from(([127, 0, 0, 2 + (i % 100) as u8], 0));
            let to = std::net::SocketAddr::from(([127, 0, 0, 1], lane));
            let Ok(sock) = tokio::net::TcpSocket::new_v4() else {
                continue;
            };
            let _ = sock.bind(from);
            if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_millis(500), sock.connect(to)).await {
                held.push(c);
            }
        }
        held
    });
    std::thread::sleep(Duration::from_millis(500));
    let (code, _, err) = host.run(&[
        "push",
        "src/job",
        "--to",
        &host.peer(),
        "--import",
        "in",
        "--tcp-lane",
        "--json",
    ]);
    let scrape = scrape(metrics);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    row.note(format!(
        "{} connections made; fd limit set: {limited}; agent fds {fds}; push over the lane exit {code}; metrics answered: {}",
        flood.len(),
        scrape
    ));
    row.record(match (limited, code, scrape) {
        (true, 0, true) => Ok(()),
        (false, _, _) => Err("prlimit failed".into()),
        (_, c, false) => Err(format!("metrics did not answer (push exit {c})")),
        (_, c, _) => Err(format!("push exit {c}: {err}")),
    });
    drop(flood);
    host.stop();
    row
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether the metrics endpoint answers a GET with barge's counters.
fn scrape(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains("barge_")
}
