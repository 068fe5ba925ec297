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
    ];
    host.stop();
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
    let tls = barge::tls::TlsFiles::in_dir(&host.dir.join("certs"), who);
    barge::client::Client::new(&tls).unwrap()
}

fn peer(host: &Host) -> barge::client::Peer {
    host.peer().parse().unwrap()
}

/// Streams that each announce a 64 MiB request and send 1 MiB of it: a list request
/// (never authorized to be large) and an offer into a target closed to the sender.
async fn flood(host: &Host, who: &str, conns: usize, streams: usize) -> (usize, Vec<quinn::Connection>) {
    let c = client(host, who);
    let mut opened = 0;
    let mut keep = vec![];
    let list = Message::ListJobs.encode();
    let offer = Message::Offer(barge::proto::wire::Offer {
        target: "shut".into(),
        files: vec![],
        meta: vec![],
        tcp_lane: false,
        hold: false,
    })
    .encode();
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
    (opened, keep)
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
    let now = rss_mib(pid, "VmRSS:");
    drop(conns);
    let warned = warnings(host) - warned_before;
    row.note(format!(
        "{opened} streams got their first MiB out; agent RSS {idle} MiB idle, {now} MiB during the flood; \
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

/// Removes what the pushes committed, so the next attack can push the same job.
fn clear(host: &Host) {
    let _ = std::fs::remove_dir_all(host.dir.join("in/job"));
    let _ = std::fs::remove_dir_all(host.dir.join("state/commits"));
}

/// 32 connections from an identity on no allow list and 16 from an allowed one, held
/// open (limit 16, 12 per identity): another allowed identity still pushes.
fn connection_lockout(host: &mut Host, rt: &tokio::runtime::Runtime) -> Row {
    let mut row = Row::new("connection lockout: 32 connections by an outsider, 16 by one allowed identity (limit 16)");
    let held = rt.block_on(async {
        let mut keep = vec![];
        for who in ["intruder"; 32].into_iter().chain(["ops2"; 16]) {
            if let Ok(c) = client(host, who).connect(&peer(host)).await {
                keep.push(c);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        keep
    });
    let open = held.iter().filter(|c| c.close_reason().is_none()).count();
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
        let conn = client(host, "ops2").connect(&peer(host)).await.unwrap();
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
        (conn, keep)
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
