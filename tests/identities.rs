//! Hostile or greedy peers against a real agent: an identity on no allow list, huge
//! or missing requests, one identity holding every connection or job slot, a sender
//! taking over another's held job, senders and pullers that stop half way. Each is
//! refused or given up with a named reason while the others keep being served.

mod common;

use barge::agent::Hooks;
use barge::client::PushOptions;
use barge::proto::blocks::FileHashes;
use barge::proto::wire::{code, Message, Offer, OfferFile, Refusal};
use barge::transfer::{self, TransferError};
use common::*;
use std::time::{Duration, Instant};

fn issue(env: &Env, names: &[&str]) {
    for n in names {
        barge::net::certs::issue(&env.certs(), n, &[]).unwrap();
    }
}

fn refused(r: Result<impl std::fmt::Debug, TransferError>) -> Refusal {
    match r {
        Err(TransferError::Rejected(r)) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The refusal a request stream gets back.
async fn answer(recv: &mut quinn::RecvStream) -> Refusal {
    match tokio::time::timeout(Duration::from_secs(15), transfer::expect_msg(recv, "an answer")).await {
        Ok(Ok(Message::Reject(r) | Message::Failed(r))) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn offer(target: &str, data: &[u8], meta: Vec<(String, String)>) -> Offer {
    let hashes = FileHashes::from_reader(data, data.len() as u64).unwrap();
    Offer {
        target: target.into(),
        files: vec![OfferFile {
            path: "f".into(),
            hashes,
            keys: None,
            mode: 0o644,
        }],
        meta,
        tcp_lane: false,
        hold: false,
        relay: vec![],
    }
}

/// Waits until the agent closes `conn`, up to `within`; returns why.
async fn closed_within(conn: &quinn::Connection, within: Duration) -> Option<quinn::ConnectionError> {
    tokio::time::timeout(within, conn.closed()).await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_is_read_only_once_it_is_authorized() {
    let targets = format!("{DEFAULT_TARGETS}[[import]]\nname = \"shut\"\npath = \"src\"\nallow = [\"someone\"]\n");
    let env = env_with(&targets, "", Hooks::new()).await;
    let conn = env.client("client").connect(&env.peer()).await.unwrap();
    let started = Instant::now();

    // 60 MiB announced for something that is not an offer: refused unread.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let list = Message::ListJobs.encode().unwrap();
    let mut frame = (60u32 << 20).to_be_bytes().to_vec();
    frame.extend_from_slice(&list[4..]);
    frame.resize(4 + Message::PEEK_LEN, 0);
    send.write_all(&frame).await.unwrap();
    let r = answer(&mut recv).await;
    assert_eq!(r.code, code::LIMIT, "{r}");
    assert!(r.reason.contains("only an offer may be larger"), "{r}");

    // A 10 MiB offer into a target closed to this peer: refused from its first bytes.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let whole = Message::Offer(offer("shut", b"x", vec![])).encode().unwrap();
    let mut frame = (10u32 << 20).to_be_bytes().to_vec();
    frame.extend_from_slice(&whole[4..]);
    frame.resize(4 + Message::PEEK_LEN, 0);
    send.write_all(&frame).await.unwrap();
    let r = answer(&mut recv).await;
    assert_eq!(r.code, code::NOT_ALLOWED, "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered without waiting for the announced bytes: {:?}",
        started.elapsed()
    );
    // A request whose bytes never come is given up after the first-message deadline.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 0]).await.unwrap();
    let r = answer(&mut recv).await;
    assert_eq!(r.code, code::BAD_MESSAGE, "{r}");
    assert!(r.reason.contains("no request within 10s"), "{r}");
    // And the agent still serves.
    write(&env.root().join("f"), b"fine");
    let f = [env.root().join("f")];
    env.client("client")
        .push(&env.peer(), "in", &f, &PushOptions::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_identity_can_hold_every_connection() {
    let extra = "[limits]\nmax_connections = 4\nidentity_connections = 2\nidle_connection_secs = 30";
    let env = env_with(DEFAULT_TARGETS, extra, Hooks::new()).await;
    issue(&env, &["client2"]);
    let targets = DEFAULT_TARGETS.replace("[\"client\"]", "[\"client\", \"client2\"]");
    let config = std::fs::read_to_string(&env.config_path).unwrap();
    let config = config.replace(DEFAULT_TARGETS, &targets);
    env.agent
        .reload(barge::config::Config::parse(&config, env.root()).unwrap())
        .unwrap();

    // Identities on no allow list are closed at once and count for nothing.
    let stranger = env.client("stranger");
    let mut strangers = vec![];
    for _ in 0..8 {
        let c = stranger.connect(&env.peer()).await.unwrap();
        let why = closed_within(&c, Duration::from_secs(5)).await;
        assert!(
            matches!(&why, Some(quinn::ConnectionError::ApplicationClosed(a)) if a.error_code.into_inner() == code::NOT_ALLOWED as u64),
            "{why:?}"
        );
        strangers.push(c);
    }
    // One allowed identity gets its two connections, not a third.
    let client = env.client("client");
    let mine = [
        client.connect(&env.peer()).await.unwrap(),
        client.connect(&env.peer()).await.unwrap(),
    ];
    let third = client.connect(&env.peer()).await.unwrap();
    let why = closed_within(&third, Duration::from_secs(5)).await;
    let Some(quinn::ConnectionError::ApplicationClosed(a)) = why else {
        panic!("the third connection is closed: {why:?}")
    };
    assert_eq!(a.error_code.into_inner(), code::BUSY as u64);
    assert!(String::from_utf8_lossy(&a.reason).contains("client has 2 connections open"));
    for c in &mine {
        assert!(c.close_reason().is_none(), "the first two stay open");
    }
    // Another identity still gets in and is served.
    write(&env.root().join("f"), b"other");
    let f = [env.root().join("f")];
    env.client("client2")
        .push(&env.peer(), "in", &f, &PushOptions::default())
        .await
        .unwrap();
    assert_eq!(list(&env.inbox()), ["f"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_nothing_open_is_closed() {
    let env = env_with(DEFAULT_TARGETS, "[limits]\nidle_connection_secs = 1", Hooks::new()).await;
    let conn = env.client("client").connect(&env.peer()).await.unwrap();
    let why = closed_within(&conn, Duration::from_secs(10)).await;
    assert!(
        matches!(&why, Some(quinn::ConnectionError::ApplicationClosed(a)) if String::from_utf8_lossy(&a.reason).contains("idle")),
        "{why:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_job_belongs_to_its_sender_and_the_targets_operators() {
    let targets = "[[import]]\nname = \"in\"\npath = \"inbox\"\nallow = [\"client\", \"client2\"]\n\
operators = [\"ops\"]\nhook = \"exec\"\nexec = [\"sh\", \"-c\", \"cat > \\\"$BARGE_TARGET_DIR/../hook.json\\\"\"]\n";
    let env = env_with(targets, "data_dir = \".\"", Hooks::new()).await;
    issue(&env, &["client2", "ops"]);
    write(&env.src().join("a.sst"), &content(3, 300_000));
    let src = [env.src().join("a.sst")];
    let hold = |meta: &[(&str, &str)]| PushOptions {
        hold: true,
        meta: meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    let (a, b, ops) = (env.client("client"), env.client("client2"), env.client("ops"));
    let held = a
        .push(&env.peer(), "in", &src, &hold(&[("region", "1")]))
        .await
        .unwrap();

    // The same files from another sender, with other metadata or the same: not its job.
    for meta in [[("region", "7")], [("region", "1")]] {
        let r = refused(b.push(&env.peer(), "in", &src, &hold(&meta)).await);
        assert_eq!(r.code, code::HELD, "{r}");
        assert!(r.reason.contains("another sender's job"), "{r}");
    }
    let r = refused(b.commit(&env.peer(), held.job).await);
    assert_eq!(
        (r.code, r.reason.as_str()),
        (code::NOT_FOUND, &*format!("no held job {}", held.job))
    );
    let r = refused(b.abort(&env.peer(), held.job).await);
    assert_eq!(r.code, code::NOT_FOUND, "{r}");
    assert!(
        b.jobs(&env.peer()).await.unwrap().is_empty(),
        "others' jobs are not listed"
    );
    let listed = ops.jobs(&env.peer()).await.unwrap();
    assert_eq!(listed.len(), 1, "an operator sees it");
    assert_eq!(listed[0].peer, "client");

    // The operator commits it; the hook is told who sent it, and with what metadata.
    ops.commit(&env.peer(), held.job).await.unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.root().join("hook.json")).unwrap()).unwrap();
    assert_eq!(json["peer"], "client", "{json}");
    assert_eq!(json["meta"]["region"], "1", "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_that_never_read_can_not_hold_every_job_slot() {
    let targets = DEFAULT_TARGETS.replace("[\"client\"]", "[\"client\", \"client2\"]");
    let extra = "max_jobs = 4\n[limits]\nidentity_jobs = 2\nstall_secs = 2";
    let env = env_with(&targets, extra, Hooks::new()).await;
    issue(&env, &["client2"]);
    write(&env.outbox().join("big"), &content(4, 32 << 20));
    let conn = env.client("client").connect(&env.peer()).await.unwrap();
    // Two pulls that ask and then never read a byte (not even the offer).
    let mut idle = vec![];
    for _ in 0..2 {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let fetch = Message::Fetch {
            export: "out".into(),
            files: vec![],
            range: None,
        };
        transfer::write_msg(&mut send, &fetch).await.unwrap();
        idle.push((send, recv));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let into = env.root().join("p");
    let r = refused(env.client("client").pull(&env.peer(), "out", &[], &into).await);
    assert_eq!((r.code, r.retry_after), (code::BUSY, 10), "{r}");
    assert!(r.reason.contains("client has 2 jobs running, its limit"), "{r}");
    // Another identity is served meanwhile.
    let other = env.root().join("q");
    env.client("client2")
        .pull(&env.peer(), "out", &[], &other)
        .await
        .unwrap();
    assert_same_tree(&env.outbox(), &other);
    // The stalled pulls give their slots back.
    let started = Instant::now();
    loop {
        match env.client("client").pull(&env.peer(), "out", &[], &into).await {
            Ok(_) => break,
            Err(e) if started.elapsed() < Duration::from_secs(15) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the stalled pulls still hold their slots: {e}"),
        }
    }
    assert_same_tree(&env.outbox(), &into);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_that_stops_sending_is_given_up() {
    let env = env_with(DEFAULT_TARGETS, "[limits]\nstall_secs = 1", Hooks::new()).await;
    let conn = env.client("client").connect(&env.peer()).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let data = content(5, 3 << 20);
    transfer::write_msg(&mut send, &Message::Offer(offer("in", &data, vec![])))
        .await
        .unwrap();
    let accepted = transfer::expect_msg(&mut recv, "an answer").await.unwrap();
    assert!(matches!(accepted, Message::Accept { .. }), "{accepted:?}");
    let started = Instant::now();
    let r = answer(&mut recv).await;
    assert_eq!(r.code, code::ABORTED, "{r}");
    assert!(r.reason.contains("no data arrived for 1s"), "{r}");
    assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
    assert!(conn.close_reason().is_none(), "the job is given up, not the connection");
    assert!(list(&env.inbox()).is_empty());
}
