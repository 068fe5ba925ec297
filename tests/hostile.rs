//! A hostile or broken peer: crafted offers and malformed control messages against a
//! real agent. Each gets a named refusal, nothing lands outside the target, and the
//! agent keeps serving.

mod common;

use barge::client::PushOptions;
use barge::proto::blocks::{root_from_blocks, FileHashes};
use barge::proto::wire::{code, Message, Offer, OfferFile};
use barge::transfer::{self, TransferError};
use common::crafted::{offer_for, send_offer};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_escape_the_target_are_refused_and_nothing_is_written_outside() {
    let env = env().await;
    write(&env.src().join("f"), b"payload");
    for bad in ["../x", "/etc/passwd", "a/../../b", "a//b", "./a", ".barge-staging/x"] {
        let err = send_offer(&env, offer_for(&[bad], b"payload"), env.src().join("f"))
            .await
            .unwrap_err();
        let TransferError::Rejected(r) = err else {
            panic!("{bad}: {err}")
        };
        assert_eq!(r.code, code::BAD_NAME, "{bad}: {}", r.reason);
    }
    let err = send_offer(&env, offer_for(&["a", "a"], b"payload"), env.src().join("f"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransferError::Rejected(ref r) if r.code == code::BAD_NAME),
        "{err}"
    );
    assert!(!env.root().join("x").exists() && !env.root().join("b").exists());
    assert!(list(&env.inbox()).is_empty());
    assert_eq!(
        list(env.root())
            .iter()
            .filter(|p| p.ends_with("/x") || p.as_str() == "x")
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_in_the_target_does_not_lead_outside() {
    let env = env().await;
    let outside = env.root().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, env.inbox().join("link")).unwrap();
    write(&env.src().join("f"), b"payload");
    let err = send_offer(&env, offer_for(&["link/f"], b"payload"), env.src().join("f"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransferError::Rejected(ref r) if r.code == code::BAD_NAME),
        "{err}"
    );
    assert!(list(&outside).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_larger_than_the_free_space_is_refused() {
    let env = env().await;
    // A 900 GiB file: its block list is consistent, so only the space check can refuse it.
    let size = 900u64 << 30;
    let blocks = vec![[1u8; 32]; (size >> 20) as usize];
    let root = root_from_blocks(size, &blocks).unwrap();
    let offer = Offer {
        target: "in".into(),
        files: vec![OfferFile {
            path: "huge".into(),
            hashes: FileHashes { size, root, blocks },
            keys: None,
            mode: 0o644,
        }],
        meta: vec![],
        tcp_lane: false,
        hold: false,
        relay: vec![],
    };
    let err = send_offer(&env, offer, env.src().join("none")).await.unwrap_err();
    let TransferError::Rejected(r) = err else {
        panic!("{err}")
    };
    assert_eq!(r.code, code::NO_SPACE, "{}", r.reason);
    assert!(r.reason.contains("free"), "{}", r.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_whose_blocks_do_not_merge_to_the_root_is_refused() {
    let env = env().await;
    let data = content(3, 3 << 20);
    write(&env.src().join("f"), &data);
    let mut offer = offer_for(&["f"], &data);
    offer.files[0].hashes.root[0] ^= 1;
    let err = send_offer(&env, offer, env.src().join("f")).await.unwrap_err();
    assert!(
        matches!(err, TransferError::Rejected(ref r) if r.code == code::BAD_TREE),
        "{err}"
    );
}

/// Sends raw bytes on a fresh control stream and returns the agent's answer.
async fn raw(env: &Env, bytes: &[u8]) -> Message {
    let client = env.client("client");
    let conn = client.connect(&env.peer()).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    transfer::expect_msg(&mut recv, "an answer").await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_control_messages_get_named_errors_and_the_agent_survives() {
    let env = env().await;
    let good = Message::Fetch {
        export: "out".into(),
        files: vec![],
        range: None,
    }
    .encode()
    .unwrap();
    let mut unknown_version = good.clone();
    unknown_version[4] = 9;
    let mut unknown_type = good.clone();
    unknown_type[5] = 200;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated body", good[..good.len() - 2].to_vec(), "truncated"),
        ("truncated length", vec![0, 0], "truncated"),
        ("oversize", vec![0xff, 0xff, 0xff, 0xff, 1, 1], "limit"),
        ("unknown version", unknown_version, "version 9"),
        ("unknown type", unknown_type, "type 200"),
        (
            "commit first",
            Message::Commit { streams: 1 }.encode().unwrap(),
            "start with an offer",
        ),
    ];
    for (what, bytes, want) in cases {
        match raw(&env, &bytes).await {
            Message::Reject(r) => {
                assert_eq!(r.code, code::BAD_MESSAGE, "{what}");
                assert!(r.reason.contains(want), "{what}: {}", r.reason);
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    write(&env.src().join("after"), b"still alive");
    env.client("client")
        .push(&env.peer(), "in", &[env.src().join("after")], &PushOptions::default())
        .await
        .unwrap();
    assert_eq!(std::fs::read(env.inbox().join("after")).unwrap(), b"still alive");
}
