//! The opt-in TCP data lane: sendfile on the sender, every block still verified.

mod common;

use barge::agent::Hooks;
use barge::client::PushOptions;
use barge::proto::wire::code;
use barge::transfer::{Fault, TransferError};
use common::*;
use std::io::Write;

const TCP_TARGETS: &str = "[[import]]\nname = \"in\"\npath = \"inbox\"\nallow = [\"client\"]\ntcp_lane = true\n\
[[import]]\nname = \"quic-only\"\npath = \"outbox\"\nallow = [\"client\"]\n";

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
    let r = env
        .client("client")
        .push(&env.peer(), "in", &[env.src().join("t")], &tcp())
        .await
        .unwrap();
    assert!(r.tcp_lane, "the lane was granted and used");
    assert!(r.streams > 1);
    assert_same_tree(&env.src(), &env.inbox());
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
    assert_eq!(std::fs::read(env.outbox().join("q")).unwrap(), content(2, 3 << 20));
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
    use barge::proto::blocks::FileHashes;
    use barge::proto::wire::{Message, Offer, OfferFile};
    let client = env.client("client");
    let conn = client.connect(&env.peer()).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hashes = FileHashes::from_reader(&b"y"[..], 1).unwrap();
    let offer = Offer {
        target: "in".into(),
        files: vec![OfferFile {
            path: "y".into(),
            hashes,
            keys: None,
        }],
        meta: vec![],
        tcp_lane: true,
        hold: false,
    };
    barge::transfer::write_msg(&mut send, &Message::Offer(offer))
        .await
        .unwrap();
    match barge::transfer::expect_msg(&mut recv).await.unwrap() {
        Message::Accept { tcp: Some(g), .. } => g.port,
        other => panic!("{other:?}"),
    }
}
