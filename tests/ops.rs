//! Running it for real, through a real agent: reload keeps running jobs and applies a
//! new allow list, drain lets jobs finish (or leaves them resumable), metrics move as a
//! job runs, and admission control refuses up front with a retry-after.

mod common;

use barge::agent::Hooks;
use barge::client::PushOptions;
use barge::config::Config;
use barge::proto::wire::code;
use barge::transfer::TransferError;
use common::*;
use std::time::Duration;

/// 40 Mbit/s: a 12 MiB push takes about 2.5 s, long enough to act while it runs.
const SLOW: &str = "[limits]\nrate_mbit = 40\n";
const BIG: usize = 12 << 20;

fn targets(allow: &str) -> String {
    format!("[[import]]\nname = \"in\"\npath = \"inbox\"\nallow = [{allow}]\n")
}

fn refused(e: &TransferError) -> &barge::proto::wire::Refusal {
    match e {
        TransferError::Rejected(r) => r,
        other => panic!("expected a refusal, got {other}"),
    }
}

/// Waits until the agent reports a job receiving, with some bytes staged.
async fn until_receiving(env: &Env) {
    let client = env.client("client");
    for _ in 0..200 {
        let jobs = client.jobs(&env.peer()).await.unwrap_or_default();
        if jobs.iter().any(|j| j.state == "receiving" && j.done > 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no job started receiving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_a_running_job_and_applies_a_new_allow_list() {
    let env = env_with(&format!("{SLOW}{}", targets("\"client\"")), "", Hooks::new()).await;
    write(&env.src().join("big.sst"), &content(1, BIG));
    write(&env.src().join("small"), b"small");
    let client = env.client("client");
    let (peer, src) = (env.peer(), vec![env.src().join("big.sst")]);
    let running = tokio::spawn(async move { client.push(&peer, "in", &src, &PushOptions::default()).await });
    until_receiving(&env).await;

    // Swap the allow list and lift the rate limit while the job runs.
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let text = text
        .replace(SLOW, "")
        .replace("allow = [\"client\"]", "allow = [\"stranger\"]");
    std::fs::write(&env.config_path, text).unwrap();
    env.agent.reload(Config::load(&env.config_path).unwrap()).unwrap();

    let r = running.await.unwrap().expect("the running job finishes");
    assert_eq!(r.files, 1);
    assert_eq!(std::fs::read(env.inbox().join("big.sst")).unwrap(), content(1, BIG));
    let small = [env.src().join("small")];
    let err = env
        .client("client")
        .push(&env.peer(), "in", &small, &PushOptions::default())
        .await
        .unwrap_err();
    assert_eq!(refused(&err).code, code::NOT_ALLOWED, "{err}");
    env.client("stranger")
        .push(&env.peer(), "in", &small, &PushOptions::default())
        .await
        .unwrap();

    // A reload that changes what needs a restart is refused; the running config stays.
    let mut moved = Config::load(&env.config_path).unwrap();
    moved.listen = "127.0.0.1:1".parse().unwrap();
    let err = env.agent.reload(moved).unwrap_err();
    assert!(err.to_string().contains("listen"), "{err}");
    assert!(env.inbox().join("small").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_running_jobs_finish_and_refuses_new_ones() {
    let env = env_with(&format!("{SLOW}{}", targets("\"client\"")), "", Hooks::new()).await;
    write(&env.src().join("big.sst"), &content(2, BIG));
    write(&env.src().join("late"), b"late");
    let client = env.client("client");
    let (peer, src) = (env.peer(), vec![env.src().join("big.sst")]);
    let running = tokio::spawn(async move { client.push(&peer, "in", &src, &PushOptions::default()).await });
    until_receiving(&env).await;
    let late_client = env.client("client");
    let (peer, late) = (env.peer(), vec![env.src().join("late")]);
    let Env { dir, agent, .. } = env;
    let drain = tokio::spawn(agent.drain(Duration::from_secs(60)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = late_client
        .push(&peer, "in", &late, &PushOptions::default())
        .await
        .unwrap_err();
    let r = refused(&err);
    assert_eq!((r.code, r.retry_after), (code::BUSY, 30), "{err}");
    assert!(r.reason.contains("shutting down"), "{err}");
    running
        .await
        .unwrap()
        .expect("the running job finishes during the drain");
    assert_eq!(drain.await.unwrap(), 0, "no job was cut off");
    assert_eq!(
        std::fs::read(dir.path().join("inbox/big.sst")).unwrap(),
        content(2, BIG)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_deadline_leaves_the_job_staged_and_resumable() {
    let env = env_with(&format!("{SLOW}{}", targets("\"client\"")), "", Hooks::new()).await;
    write(&env.src().join("big.sst"), &content(3, BIG));
    let client = env.client("client");
    let (peer, src) = (env.peer(), vec![env.src().join("big.sst")]);
    let running = tokio::spawn(async move { client.push(&peer, "in", &src, &PushOptions::default()).await });
    until_receiving(&env).await;
    let Env {
        dir,
        agent,
        config_path,
    } = env;
    assert_eq!(agent.drain(Duration::from_millis(200)).await, 1, "one job cut off");
    assert!(running.await.unwrap().is_err());
    assert!(!dir.path().join("inbox/big.sst").exists());

    // Restarted without the rate limit, the same push resumes from the staged blocks.
    let text = std::fs::read_to_string(&config_path).unwrap().replace(SLOW, "");
    std::fs::write(&config_path, text).unwrap();
    let agent = barge::agent::Agent::start(Config::load(&config_path).unwrap())
        .await
        .unwrap();
    let env = Env {
        dir,
        agent,
        config_path,
    };
    let r = env
        .client("client")
        .push(&env.peer(), "in", &[env.src().join("big.sst")], &PushOptions::default())
        .await
        .unwrap();
    assert!(r.blocks_held > 0, "resumed: {r:?}");
    assert_eq!(std::fs::read(env.inbox().join("big.sst")).unwrap(), content(3, BIG));
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

fn value(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}")) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_change_as_a_job_runs() {
    let extra = "metrics = \"127.0.0.1:0\"";
    let env = env_with(&format!("{SLOW}{}", targets("\"client\"")), extra, Hooks::new()).await;
    let addr = env.agent.metrics_addr().expect("metrics on");
    let before = scrape(addr).await;
    assert_eq!(value(&before, "barge_bytes_received_total"), 0);
    write(&env.src().join("big.sst"), &content(4, BIG));
    let client = env.client("client");
    let (peer, src) = (env.peer(), vec![env.src().join("big.sst")]);
    let running = tokio::spawn(async move { client.push(&peer, "in", &src, &PushOptions::default()).await });
    until_receiving(&env).await;
    let during = scrape(addr).await;
    assert_eq!(value(&during, "barge_jobs{state=\"receiving\"}"), 1);
    assert!(value(&during, "barge_bytes_received_total") > 0);
    assert!(value(&during, "barge_bytes_staged") > 0);
    assert!(value(&during, "barge_connections") >= 1);
    running.await.unwrap().unwrap();
    // The agent finishes its bookkeeping just after the client hears "committed".
    let mut after = scrape(addr).await;
    for _ in 0..100 {
        let done = value(&after, "barge_jobs_total{outcome=\"committed\"}") == 1;
        if done && value(&after, "barge_jobs{state=\"receiving\"}") == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = scrape(addr).await;
    }
    assert_eq!(value(&after, "barge_bytes_received_total"), BIG as u64);
    assert_eq!(
        value(&after, "barge_peer_received_bytes_total{peer=\"client\"}"),
        BIG as u64
    );
    assert_eq!(value(&after, "barge_jobs_total{outcome=\"committed\"}"), 1);
    assert_eq!(value(&after, "barge_hook_runs_total"), 1);
    assert_eq!(value(&after, "barge_jobs{state=\"receiving\"}"), 0);
    assert_eq!(value(&after, "barge_bytes_staged"), 0);
    assert_eq!(value(&after, "barge_blocks_failed_verification_total"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_target_refuses_up_front_with_a_retry_after() {
    let limits = "[limits]\nreserve_mib = 1000000000\n";
    let env = env_with(&format!("{limits}{}", targets("\"client\"")), "", Hooks::new()).await;
    write(&env.src().join("a.sst"), &content(5, 100_000));
    let err = env
        .client("client")
        .push(&env.peer(), "in", &[env.src().join("a.sst")], &PushOptions::default())
        .await
        .unwrap_err();
    let r = refused(&err);
    assert_eq!((r.code, r.retry_after), (code::NO_SPACE, 60), "{err}");
    assert!(
        r.reason.contains("not enough free space") && r.reason.contains("reserve"),
        "{err}"
    );
    assert!(list(&env.staging("in")).is_empty());
    assert!(!env.staging("in").exists(), "no staging folder left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_and_connection_limits_refuse_with_named_reasons() {
    let limits = "[limits]\nmax_staged_mib = 1\nmax_connections = 1\n";
    let metrics = "metrics = \"127.0.0.1:0\"";
    let env = env_with(&format!("{limits}{}", targets("\"client\"")), metrics, Hooks::new()).await;
    let addr = env.agent.metrics_addr().expect("metrics on");
    write(&env.src().join("two.sst"), &content(6, 2 << 20));
    let client = env.client("client");
    let err = client
        .push(&env.peer(), "in", &[env.src().join("two.sst")], &PushOptions::default())
        .await
        .unwrap_err();
    let r = refused(&err);
    assert_eq!((r.code, r.retry_after), (code::BUSY, 10), "{err}");
    assert!(r.reason.contains("staging is full"), "{err}");

    // The refused push's connection may not be released yet on the agent; a connection
    // opened meanwhile is itself closed at the limit, so open one until it stays open.
    // Wait until the agent counts exactly that one connection.
    let mut held_open = client.connect(&env.peer()).await.unwrap();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let counted = value(&scrape(addr).await, "barge_connections");
        if held_open.close_reason().is_none() && counted == 1 {
            break;
        }
        if held_open.close_reason().is_some() {
            held_open = client.connect(&env.peer()).await.unwrap();
        }
    }
    assert!(held_open.close_reason().is_none(), "one connection stays open");
    assert_eq!(value(&scrape(addr).await, "barge_connections"), 1);
    let err = client.jobs(&env.peer()).await.unwrap_err();
    assert!(
        err.to_string().contains("connection limit") || err.to_string().contains("limit of 1 connections"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_agent_refuses_a_job_over_max_jobs_with_a_retry_after() {
    let env = env_with(
        &format!("{SLOW}{}", targets("\"client\"")),
        "max_jobs = 1",
        Hooks::new(),
    )
    .await;
    write(&env.src().join("big.sst"), &content(7, BIG));
    write(&env.src().join("next"), b"next");
    let client = env.client("client");
    let (peer, src) = (env.peer(), vec![env.src().join("big.sst")]);
    let running = tokio::spawn(async move { client.push(&peer, "in", &src, &PushOptions::default()).await });
    until_receiving(&env).await;
    let err = env
        .client("client")
        .push(&env.peer(), "in", &[env.src().join("next")], &PushOptions::default())
        .await
        .unwrap_err();
    let r = refused(&err);
    assert_eq!((r.code, r.retry_after), (code::BUSY, 10), "{err}");
    assert!(r.reason.contains("limit of 1 jobs"), "{err}");
    assert!(err.to_string().ends_with("(retry after 10s)"), "{err}");
    running.await.unwrap().unwrap();
    env.client("client")
        .push(&env.peer(), "in", &[env.src().join("next")], &PushOptions::default())
        .await
        .expect("a slot is free again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_served_pull_counts_as_committed_on_the_exporter() {
    let env = env_with(DEFAULT_TARGETS, "metrics = \"127.0.0.1:0\"", Hooks::new()).await;
    let addr = env.agent.metrics_addr().expect("metrics on");
    write(&env.outbox().join("x/a"), &content(7, 300_000));
    let client = env.client("client");
    for i in 0..6 {
        let into = env.root().join(format!("pulled{i}"));
        client.pull(&env.peer(), "out", &[], &into).await.unwrap();
    }
    // The agent's count follows the client's answer; give it a moment to get there.
    let mut text = scrape(addr).await;
    for _ in 0..100 {
        if value(&text, "barge_jobs_total{outcome=\"committed\"}")
            + value(&text, "barge_jobs_total{outcome=\"failed\"}")
            >= 6
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        text = scrape(addr).await;
    }
    // The puller's last word (committed) must reach the exporter before the close.
    assert_eq!(value(&text, "barge_jobs_total{outcome=\"failed\"}"), 0, "{text}");
    assert_eq!(value(&text, "barge_jobs_total{outcome=\"committed\"}"), 6);
}
