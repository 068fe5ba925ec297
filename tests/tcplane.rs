//! The TCP data lane: TLS 1.3 by default (mutual, the QUIC certificates, the job's
//! identity), clear text with sendfile where a target says so; every block verified.

mod common;

use barge::agent::Hooks;
use barge::client::PushOptions;
use barge::proto::wire::code;
use barge::proto::wire::{BlockHeader, TcpGrant};
use barge::transfer::{Fault, LaneUsed, TransferError};
use common::proc::{make_certs, AgentProc};
use common::*;
use std::io::Write;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TCP_TARGETS: &str =
    "[[import]]\nname = \"in\"\npath = \"inbox\"\nallow = [\"client\", \"stranger\"]\ntcp_lane = true\n\
[[import]]\nname = \"quic-only\"\npath = \"outbox\"\nallow = [\"client\"]\n\
[[import]]\nname = \"clear\"\npath = \"clear\"\nallow = [\"client\"]\ntcp_lane = \"cleartext\"\n";

fn tcp() -> PushOptions {
    PushOptions {
        tcp_lane: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_over_the_tcp_lane_arrives_verified() {
    let env = env_with(TCP_TARGETS, "", Hooks::new()).await;
    write(&env.src().join("t/big"), &content(1, (9 << 20) + 77));
    for i in 0..300u64 {
        write(
            &env.src().join(format!("t/small/{i}")),
            &content(100 + i, (i as usize * 13) % 3000),
        );
    }
    let client = env.client("client");
    let r = client
        .push(&env.peer(), "in", &[env.src().join("t")], &tcp())
        .await
        .unwrap();
    assert!(r.tcp_lane, "the lane was granted and used");
    assert_eq!(r.lane, LaneUsed::Tls, "tcp_lane = true is the TLS lane");
    assert!(r.streams > 1);
    assert_same_tree(&env.src(), &env.inbox());
    let done = client.tally().done.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        done, r.bytes_sent,
        "progress counts the TCP lane's bytes as it does QUIC's"
    );
    assert_eq!(r.bytes_sent, r.bytes_total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_without_the_lane_keeps_the_data_on_quic() {
    let env = env_with(TCP_TARGETS, "", Hooks::new()).await;
    write(&env.src().join("q"), &content(2, 3 << 20));
    let r = env
        .client("client")
        .push(&env.peer(), "quic-only", &[env.src().join("q")], &tcp())
        .await
        .unwrap();
    assert!(!r.tcp_lane);
    assert_eq!(r.lane, LaneUsed::Quic);
    assert_eq!(std::fs::read(env.outbox().join("q")).unwrap(), content(2, 3 << 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleartext_target_takes_the_lane_in_clear_text() {
    let env = env_with(TCP_TARGETS, "", Hooks::new()).await;
    write(&env.src().join("p/big"), &content(4, (5 << 20) + 3));
    write(&env.src().join("p/small"), &content(5, 700));
    let r = env
        .client("client")
        .push(&env.peer(), "clear", &[env.src().join("p")], &tcp())
        .await
        .unwrap();
    assert_eq!(r.lane, LaneUsed::Cleartext);
    assert_same_tree(&env.src(), &env.root().join("clear"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_lane_with_another_identitys_certificate_fails_the_job_by_name() {
    use barge::proto::wire::Message;
    let env = env_with(TCP_TARGETS, "", Hooks::new()).await;
    let (_conn, _send, mut recv, grant) = raw_job(&env, "in").await;
    assert!(grant.tls, "tcp_lane = true grants a TLS lane");
    // `stranger` has a valid certificate of the same CA, but the job is `client`'s.
    // (The agent closes that lane once it has read the token.)
    let _ = tls_lane(&env.certs(), "stranger", grant.port, &grant.token).await;
    let answer = barge::transfer::expect_msg(&mut recv, "an answer").await.unwrap();
    match answer {
        Message::Failed(r) => {
            assert_eq!(r.code, code::NOT_ALLOWED, "{r:?}");
            assert!(
                r.reason.contains("certificate of stranger, but the job is client's"),
                "{r:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(list(&env.inbox()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_lane_client_from_another_ca_is_refused_and_the_token_in_clear_text_fails_the_job() {
    use barge::proto::wire::Message;
    let env = env_with(TCP_TARGETS, "", Hooks::new()).await;
    let other = env.root().join("other-ca");
    barge::net::certs::init_ca(&other).unwrap();
    barge::net::certs::issue(&other, "client", &[]).unwrap();
    let (_conn, _send, mut recv, grant) = raw_job(&env, "in").await;
    // Another CA's `client`: the agent does not finish the handshake.
    let err = tls_lane(&other, "client", grant.port, &grant.token).await.unwrap_err();
    assert!(
        err.to_string().contains("alert") || err.to_string().contains("certificate"),
        "{err}"
    );
    // The job is untouched by that; its token in clear text on its TLS lane fails it.
    let _clear = lane_from("127.0.0.1", grant.port, &grant.token).await;
    match barge::transfer::expect_msg(&mut recv, "an answer").await.unwrap() {
        Message::Failed(r) => assert!(r.reason.contains("the job's lane is tls"), "{r:?}"),
        other => panic!("{other:?}"),
    }
}

/// A TLS lane connection as `name` (certificates in `certs`), the token sent inside;
/// an error if the agent refuses the handshake.
async fn tls_lane(certs: &std::path::Path, name: &str, port: u16, token: &[u8; 32]) -> std::io::Result<()> {
    let material = barge::net::tls::TlsMaterial::load(&barge::net::tls::TlsFiles::in_dir(certs, name)).unwrap();
    let connector = tokio_rustls::TlsConnector::from(material.lane_client_config().unwrap());
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let server = rustls::pki_types::ServerName::try_from("agent").unwrap();
    let mut tls = connector.connect(server, tcp).await?;
    tls.write_all(token).await?;
    tls.flush().await?;
    // TLS 1.3: the server checks the client's certificate after the client is done;
    // a refusal shows as an alert on the next read.
    let mut buf = [0u8; 1];
    match tokio::time::timeout(Duration::from_millis(500), tls.read(&mut buf)).await {
        Ok(Err(e)) => Err(e),
        _ => Ok(()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_block_on_the_tcp_lane_fails_the_job() {
    let env = env_with(TCP_TARGETS, "", Hooks::new()).await;
    write(&env.src().join("c/f"), &content(3, 4 << 20));
    let opts = PushOptions {
        fault: Fault {
            corrupt: Some((0, 2)),
            ..Default::default()
        },
        ..tcp()
    };
    let err = env
        .client("client")
        .push(&env.peer(), "in", &[env.src().join("c")], &opts)
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransferError::Failed(ref r) if r.code == code::BAD_BLOCK),
        "{err}"
    );
    assert!(list(&env.inbox()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_a_valid_token_gets_nothing() {
    let env = env_with(TCP_TARGETS, "", Hooks::new()).await;
    // Find the lane's port through a real job's grant, then try it with a wrong token.
    write(&env.src().join("x"), b"x");
    env.client("client")
        .push(&env.peer(), "in", &[env.src().join("x")], &tcp())
        .await
        .unwrap();
    let port = lane_port(&env).await;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&[9u8; 32]).unwrap();
    s.write_all(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, b'!']).unwrap();
    let mut buf = [0u8; 1];
    let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the agent closed the connection");
    assert_eq!(list(&env.inbox()), ["x"]);
}

/// The TCP lane port, as granted to a job (read from a raw offer's Accept).
async fn lane_port(env: &Env) -> u16 {
    raw_job(env, "clear").await.3.port
}

/// A job offered by hand to `target` (one file `y` of one byte) asking for the TCP lane: its
/// connection and control stream, and the lane's grant from `Accept`.
async fn raw_job(env: &Env, target: &str) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream, TcpGrant) {
    use barge::proto::blocks::FileHashes;
    use barge::proto::wire::{Message, Offer, OfferFile};
    let client = env.client("client");
    let conn = client.connect(&env.peer()).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hashes = FileHashes::from_reader(&b"y"[..], 1).unwrap();
    let offer = Offer {
        target: target.into(),
        files: vec![OfferFile {
            path: "y".into(),
            hashes,
            keys: None,
            mode: 0o644,
        }],
        meta: vec![],
        tcp_lane: true,
        hold: false,
        relay: vec![],
    };
    barge::transfer::write_msg(&mut send, &Message::Offer(offer))
        .await
        .unwrap();
    match barge::transfer::expect_msg(&mut recv, "an answer").await.unwrap() {
        Message::Accept { tcp: Some(g), .. } => (conn, send, recv, g),
        other => panic!("{other:?}"),
    }
}

/// A lane connection from `from` to the agent's lane that has sent `token`.
async fn lane_from(from: &str, port: u16, token: &[u8; 32]) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    s.write_all(token).await.unwrap();
    s
}

/// Whether the agent closed `s` within `wait` (end of stream or reset).
async fn closed_within(s: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 1];
    matches!(tokio::time::timeout(wait, s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_connection_from_another_address_is_refused_even_with_the_token() {
    let env = env_with(TCP_TARGETS, "", Hooks::new()).await;
    let (_conn, _send, _recv, grant) = raw_job(&env, "clear").await;
    // The job came on a QUIC connection from 127.0.0.1; 127.0.0.2 is loopback too.
    let mut stranger = lane_from("127.0.0.2", grant.port, &grant.token).await;
    let head = BlockHeader {
        file: 0,
        block: 0,
        len: 1,
    };
    let _ = stranger.write_all(&head.encode()).await;
    let _ = stranger.write_all(b"y").await;
    assert!(
        closed_within(&mut stranger, Duration::from_secs(3)).await,
        "a lane from another address than the job's is closed"
    );
    // The same token from the job's own address is taken (the connection stays open).
    let mut own = lane_from("127.0.0.1", grant.port, &grant.token).await;
    assert!(!closed_within(&mut own, Duration::from_millis(500)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_closes_the_jobs_open_lane_connections() {
    use barge::proto::wire::Message;
    let env = env_with(TCP_TARGETS, "", Hooks::new()).await;
    let (_conn, mut send, mut recv, grant) = raw_job(&env, "clear").await;
    let mut lane = lane_from("127.0.0.1", grant.port, &grant.token).await;
    assert!(!closed_within(&mut lane, Duration::from_millis(300)).await, "taken");
    // The job ends (aborted by its sender): its token is revoked.
    barge::transfer::write_msg(&mut send, &Message::Abort).await.unwrap();
    let answer = barge::transfer::expect_msg(&mut recv, "an answer").await.unwrap();
    assert!(
        matches!(answer, Message::Failed(ref r) if r.code == code::ABORTED),
        "{answer:?}"
    );
    assert!(
        closed_within(&mut lane, Duration::from_secs(5)).await,
        "the job's lane connection is closed once its token is revoked"
    );
}

/// An agent process with the TCP lane and metrics on, its file descriptors limited to
/// 256 (`prlimit`), and the lane and metrics ports from its log.
fn limited_agent() -> (tempfile::TempDir, AgentProc, u16, String) {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    make_certs(p, &["store-b", "ops"]);
    std::fs::create_dir(p.join("in")).unwrap();
    let text = "listen = \"127.0.0.1:0\"\ndata_dir = \"state\"\nmetrics = \"127.0.0.1:0\"\n\
        [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/store-b.pem\"\nkey = \"certs/store-b.key\"\n\
        [[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"ops\"]\ntcp_lane = true\n";
    std::fs::write(p.join("b.toml"), text).unwrap();
    let agent = AgentProc::start(&["--config", "b.toml"], p, &[]);
    let limit = libc::rlimit {
        rlim_cur: 256,
        rlim_max: 256,
    };
    // SAFETY: plain syscall on our own child.
    let rc = unsafe {
        libc::prlimit(
            agent.child.id() as i32,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let log = agent.log();
    let field = |line: &str, key: &str| -> String {
        let l = log
            .lines()
            .find(|l| l.contains(line))
            .unwrap_or_else(|| panic!("{line:?} in {log}"));
        l.split(key)
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let port = field("tcp data lane open", "port=").parse().unwrap();
    let metrics = field("metrics endpoint on", "addr=");
    (t, agent, port, metrics)
}

fn open_fds(agent: &AgentProc) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", agent.child.id()))
        .unwrap()
        .count()
}

/// `GET /metrics`, within 5 s.
async fn scrape(addr: &str) -> Result<String, String> {
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.map_err(|e| e.to_string())?;
        Ok(body)
    };
    tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .map_err(|_| "no answer in 5 s".to_string())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokenless_flood_neither_exhausts_descriptors_nor_stops_pushes_or_metrics() {
    let (t, agent, port, metrics) = limited_agent();
    let before = open_fds(&agent);
    // 300 connections that never send a token, from 30 addresses, all held open.
    let mut flood = Vec::new();
    for i in 0..300u32 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("127.0.1.{}:0", 1 + i % 30).parse().unwrap()).unwrap();
        flood.push(sock.connect(([127, 0, 0, 1], port).into()).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = open_fds(&agent);
    assert!(
        during <= before + 64 + 16,
        "{before} descriptors before the flood, {during} during it"
    );
    let m = scrape(&metrics).await.expect("metrics answer during the flood");
    assert!(m.starts_with("HTTP/1.1 200") && m.contains("barge_connections"), "{m}");
    // A real push over the lane, from the test (127.0.0.1), while the flood is held.
    let src = t.path().join("src");
    write(&src.join("big"), &content(7, (3 << 20) + 5));
    write(&src.join("small"), &content(8, 1000));
    let client =
        barge::client::Client::new(&barge::net::tls::TlsFiles::in_dir(&t.path().join("certs"), "ops")).unwrap();
    let peer = format!("store-b@{}", agent.addr).parse().unwrap();
    let (files, opts) = ([src.clone()], tcp());
    let push = client.push(&peer, "in", &files, &opts);
    let r = tokio::time::timeout(Duration::from_secs(20), push)
        .await
        .expect("the push finished")
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert!(r.tcp_lane, "the push used the lane");
    assert_same_tree(&src, &t.path().join("in/src"));
    let m = scrape(&metrics).await.expect("metrics answer after the flood");
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    drop(flood);
}

const PULL_TARGETS: &str = "[[export]]\nname = \"out\"\npath = \"outbox\"\nallow = [\"client\"]\ntcp_lane = true\n\
[[export]]\nname = \"clear\"\npath = \"clear\"\nallow = [\"client\"]\ntcp_lane = \"cleartext\"\n\
[[export]]\nname = \"quic\"\npath = \"src\"\nallow = [\"client\"]\n";

fn lane_pull() -> barge::client::PullOptions {
    barge::client::PullOptions {
        tcp_lane: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_over_the_tls_lane_arrives_verified() {
    let env = env_with(PULL_TARGETS, "", Hooks::new()).await;
    write(&env.outbox().join("d/big"), &content(21, (6 << 20) + 5));
    for i in 0..50u64 {
        write(
            &env.outbox().join(format!("d/s/{i}")),
            &content(200 + i, (i as usize * 31) % 5000),
        );
    }
    let client = env.client("client");
    let into = env.root().join("pulled");
    let r = client
        .pull_into(&env.peer(), "out", (&[], None), &into, lane_pull())
        .await
        .unwrap();
    assert_eq!(
        r.lane,
        LaneUsed::Tls,
        "the agent connected to this client's lane with TLS"
    );
    assert_same_tree(&env.outbox(), &into);
    // Without asking, the same export sends on QUIC.
    let again = env.root().join("pulled-quic");
    let r = client
        .pull_into(&env.peer(), "out", (&[], None), &again, Default::default())
        .await
        .unwrap();
    assert_eq!(r.lane, LaneUsed::Quic);
    assert_same_tree(&env.outbox(), &again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_from_an_export_without_the_lane_stays_on_quic_and_a_client_grants_only_tls() {
    let env = env_with(PULL_TARGETS, "", Hooks::new()).await;
    write(&env.src().join("q"), &content(22, 2 << 20));
    let into = env.root().join("pulled");
    let r = env
        .client("client")
        .pull_into(&env.peer(), "quic", (&[], None), &into, lane_pull())
        .await
        .unwrap();
    assert_eq!(r.lane, LaneUsed::Quic);
    assert_eq!(std::fs::read(into.join("q")).unwrap(), content(22, 2 << 20));
    // A clear-text export still sends over TLS to a client, which grants only TLS.
    write(&env.root().join("clear/c"), &content(23, 70_000));
    let into = env.root().join("pulled-clear");
    let r = env
        .client("client")
        .pull_into(&env.peer(), "clear", (&[], None), &into, lane_pull())
        .await
        .unwrap();
    assert_eq!(r.lane, LaneUsed::Tls);
    assert_eq!(std::fs::read(into.join("c")).unwrap(), content(23, 70_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_with_a_tls_lane_refuses_a_clear_text_grant_from_its_puller() {
    use barge::proto::wire::Message;
    let env = env_with(PULL_TARGETS, "", Hooks::new()).await;
    write(&env.outbox().join("secret"), &content(24, 3 << 20));
    let conn = env.client("client").connect(&env.peer()).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let fetch = Message::Fetch {
        export: "out".into(),
        files: vec![],
        range: None,
    };
    barge::transfer::write_msg(&mut send, &fetch).await.unwrap();
    let Message::Offer(offer) = barge::transfer::expect_msg(&mut recv, "an offer").await.unwrap() else {
        panic!("no offer")
    };
    assert!(offer.tcp_lane, "the export offers its lane");
    // A puller that grants a clear-text lane, listening for the agent to connect.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let have = (offer.files.iter())
        .map(|f| vec![0u8; barge::proto::blocks::block_count(f.hashes.size).div_ceil(8) as usize])
        .collect();
    let grant = TcpGrant {
        port: listener.local_addr().unwrap().port(),
        token: [7; 32],
        tls: false,
    };
    let accept = Message::Accept { have, tcp: Some(grant) };
    barge::transfer::write_msg(&mut send, &accept).await.unwrap();
    let answer = barge::transfer::expect_msg(&mut recv, "the agent's answer").await;
    assert!(matches!(answer, Ok(Message::Abort) | Err(_)), "{answer:?}");
    let connected = tokio::time::timeout(Duration::from_millis(500), listener.accept()).await;
    assert!(connected.is_err(), "the agent sent nothing in clear text");
}
