//! End-to-end transfers between a real agent and a real client over QUIC on loopback.

mod common;

use barge::client::PushOptions;
use barge::proto::blocks::BLOCK_SIZE;
use barge::proto::wire::code;
use barge::transfer::{Fault, TransferError};
use common::*;

const MIB: usize = BLOCK_SIZE as usize;
const SIZES: &[usize] = &[0, 1, MIB - 1, MIB, MIB + 1, 5 * MIB + 123];

fn size_table(root: &std::path::Path) {
    for (i, &s) in SIZES.iter().enumerate() {
        write(&root.join(format!("sizes/f{s}")), &content(i as u64, s));
    }
    write(&root.join("nested/a/b/c/deep.sst"), &content(99, 3000));
    write(&root.join("nested/a/x.sst"), &content(98, 2 * MIB + 5));
    for i in 0..2000u64 {
        write(
            &root.join(format!("many/{:02}/{i}.d", i % 20)),
            &content(1000 + i, (i as usize * 37) % 5000),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_delivers_every_size_and_2000_small_files_verified() {
    let env = env().await;
    size_table(&env.src());
    let paths: Vec<_> = ["sizes", "nested", "many"].iter().map(|d| env.src().join(d)).collect();
    let r = env
        .client("client")
        .push(&env.peer(), "in", &paths, &PushOptions::default())
        .await
        .unwrap();
    assert_eq!(r.files, SIZES.len() + 2 + 2000);
    assert!(r.streams > 1, "blocks were spread over several streams");
    assert_same_tree(&env.src(), &env.inbox());
    assert!(emptied(&env.staging("in")), "staging is cleaned up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_fetches_all_or_named_files_verified() {
    let env = env().await;
    size_table(&env.outbox());
    let into = env.root().join("pulled");
    let r = env.client("client").pull(&env.peer(), "out", &[], &into).await.unwrap();
    assert_eq!(r.files, SIZES.len() + 2 + 2000);
    assert_same_tree(&env.outbox(), &into);

    let one = env.root().join("one");
    let name = format!("sizes/f{}", 5 * MIB + 123);
    env.client("client")
        .pull(&env.peer(), "out", std::slice::from_ref(&name), &one)
        .await
        .unwrap();
    assert_eq!(list(&one), vec![name.clone()]);
    assert_eq!(
        std::fs::read(one.join(&name)).unwrap(),
        std::fs::read(env.outbox().join(&name)).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_of_missing_or_escaping_names_is_refused() {
    let env = env().await;
    write(&env.root().join("secret"), b"s");
    let into = env.root().join("pulled");
    for (name, want) in [
        ("nope", code::NOT_FOUND),
        ("../secret", code::BAD_NAME),
        ("/etc/passwd", code::BAD_NAME),
    ] {
        let err = env
            .client("client")
            .pull(&env.peer(), "out", &[name.into()], &into)
            .await
            .unwrap_err();
        match err {
            TransferError::Rejected(r) => assert_eq!(r.code, want, "{name}: {}", r.reason),
            other => panic!("{name}: {other}"),
        }
    }
    assert!(list(&into).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_from_another_ca_is_refused() {
    let env = env().await;
    let other = env.root().join("other-ca");
    barge::net::certs::init_ca(&other).unwrap();
    barge::net::certs::issue(&other, "client", &[]).unwrap();
    write(&env.src().join("f"), b"data");
    let client = barge::client::Client::new(&barge::net::tls::TlsFiles::in_dir(&other, "client")).unwrap();
    let err = client
        .push(&env.peer(), "in", &[env.src().join("f")], &PushOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransferError::Connect { .. } | TransferError::Connection(_)),
        "{err}"
    );
    assert!(list(&env.inbox()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_on_no_allow_list_gets_one_refusal_and_targets_stay_unnamed() {
    let targets = format!("{DEFAULT_TARGETS}[[import]]\nname = \"shut\"\npath = \"src\"\nallow = [\"someone\"]\n");
    let env = env_with(&targets, "", barge::agent::Hooks::new()).await;
    write(&env.root().join("f"), b"data");
    let f = [env.root().join("f")];
    let err = env
        .client("stranger")
        .push(&env.peer(), "in", &f, &PushOptions::default())
        .await
        .unwrap_err();
    let TransferError::Rejected(r) = err else {
        panic!("{err}")
    };
    assert_eq!(r.code, code::NOT_ALLOWED);
    assert_eq!(r.reason, "stranger is on no allow list of this agent");
    let err = env
        .client("stranger")
        .pull(&env.peer(), "out", &[], &env.root().join("p"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransferError::Rejected(ref r) if r.code == code::NOT_ALLOWED),
        "{err}"
    );
    // A target that does not exist and one closed to the peer get the same answer.
    let refusal = |name: &'static str| {
        let (client, peer, f) = (env.client("client"), env.peer(), f.clone());
        async move {
            match client.push(&peer, name, &f, &PushOptions::default()).await {
                Err(TransferError::Rejected(r)) => (r.code, r.reason.replace(name, "NAME")),
                other => panic!("{other:?}"),
            }
        }
    };
    let (nope, shut) = (refusal("nope").await, refusal("shut").await);
    assert_eq!(nope, shut);
    assert_eq!(nope.0, code::NOT_ALLOWED);
    assert!(list(&env.inbox()).is_empty());
    assert_eq!(list(&env.src()), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_block_fails_the_job_and_nothing_is_visible() {
    let env = env().await;
    write(&env.src().join("d/big"), &content(1, 3 * MIB + 7));
    write(&env.src().join("d/small"), &content(2, 100));
    let opts = PushOptions {
        fault: Fault {
            corrupt: Some((0, 1)),
            ..Default::default()
        },
        ..Default::default()
    };
    let err = env
        .client("client")
        .push(&env.peer(), "in", &[env.src().join("d")], &opts)
        .await
        .unwrap_err();
    let TransferError::Failed(r) = err else { panic!("{err}") };
    assert_eq!(r.code, code::BAD_BLOCK, "{}", r.reason);
    assert!(
        r.reason.contains("d/big") && r.reason.contains("block 1"),
        "{}",
        r.reason
    );
    assert!(list(&env.inbox()).is_empty(), "nothing of the job is visible");
    // The same push without the fault then completes.
    env.client("client")
        .push(&env.peer(), "in", &[env.src().join("d")], &PushOptions::default())
        .await
        .unwrap();
    assert_same_tree(&env.src(), &env.inbox());
}

fn blocks_of(sizes: &[usize]) -> u64 {
    sizes.iter().map(|s| s.div_ceil(MIB) as u64).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incomplete_job_resumes_sending_only_missing_blocks_even_after_a_restart() {
    let env = env().await;
    let sizes = [6 * MIB + 1, 3 * MIB, 10];
    for (i, s) in sizes.iter().enumerate() {
        write(&env.src().join(format!("r/{i}")), &content(i as u64, *s));
    }
    let total = blocks_of(&sizes);
    let stop = PushOptions {
        fault: Fault {
            stop_after_blocks: Some(4),
            ..Default::default()
        },
        ..Default::default()
    };
    let err = env
        .client("client")
        .push(&env.peer(), "in", &[env.src().join("r")], &stop)
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransferError::Failed(ref r) if r.code == code::INCOMPLETE),
        "{err}"
    );
    assert!(list(&env.inbox()).is_empty(), "an incomplete job shows nothing");

    let env = env.restart().await;
    let r = env
        .client("client")
        .push(&env.peer(), "in", &[env.src().join("r")], &PushOptions::default())
        .await
        .unwrap();
    assert_eq!(r.blocks_held, 4, "the restarted agent found the staged blocks");
    assert_eq!(r.blocks_sent, total - 4);
    assert_same_tree(&env.src(), &env.inbox());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_half_way_leaves_nothing_visible_and_resumes() {
    let env = env().await;
    let sizes = [8 * MIB, 4 * MIB + 3];
    for (i, s) in sizes.iter().enumerate() {
        write(&env.src().join(format!("c/{i}")), &content(10 + i as u64, *s));
    }
    let total = blocks_of(&sizes);
    let cut = PushOptions {
        fault: Fault {
            drop_after_blocks: Some(6),
            ..Default::default()
        },
        ..Default::default()
    };
    let err = env
        .client("client")
        .push(&env.peer(), "in", &[env.src().join("c")], &cut)
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::Interrupted(6)), "{err}");
    assert!(list(&env.inbox()).is_empty());
    // Let the agent notice the lost connection and release the job.
    let mut r = None;
    for _ in 0..50 {
        match env
            .client("client")
            .push(&env.peer(), "in", &[env.src().join("c")], &PushOptions::default())
            .await
        {
            Ok(rep) => {
                r = Some(rep);
                break;
            }
            Err(TransferError::Rejected(x)) if x.code == code::BUSY => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    let r = r.expect("resumed push");
    assert_eq!(r.blocks_held + r.blocks_sent, total);
    assert!(
        r.blocks_sent < total,
        "only missing blocks were sent (held {})",
        r.blocks_held
    );
    assert_same_tree(&env.src(), &env.inbox());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_job_is_cleaned_up_after_the_staging_ttl() {
    let env = env_with(DEFAULT_TARGETS, "staging_ttl_secs = 1", Default::default()).await;
    write(&env.src().join("t/f"), &content(5, 3 * MIB));
    let stop = PushOptions {
        fault: Fault {
            stop_after_blocks: Some(1),
            ..Default::default()
        },
        ..Default::default()
    };
    env.client("client")
        .push(&env.peer(), "in", &[env.src().join("t")], &stop)
        .await
        .unwrap_err();
    let staging = env.staging("in");
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 1, "the job is staged");
    let mut left = 1;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        left = std::fs::read_dir(&staging).map_or(0, |d| d.count());
        if left == 0 {
            break;
        }
    }
    assert_eq!(left, 0, "expired staging was swept");
    assert!(!staging.exists(), "and the empty staging folder with it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushing_onto_an_existing_file_is_refused_before_data_moves() {
    let env = env().await;
    write(&env.src().join("f.sst"), b"new");
    write(&env.inbox().join("f.sst"), b"old");
    let err = env
        .client("client")
        .push(&env.peer(), "in", &[env.src().join("f.sst")], &PushOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransferError::Rejected(ref r) if r.code == code::EXISTS),
        "{err}"
    );
    assert_eq!(std::fs::read(env.inbox().join("f.sst")).unwrap(), b"old");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_file_is_hashed_once_and_a_changed_one_again() {
    let env = env().await;
    write(&env.src().join("h/a"), &content(1, 2 * MIB + 3));
    write(&env.src().join("h/b"), &content(2, 10));
    let client = env.client("client");
    let (peer, paths, opts) = (env.peer(), [env.src().join("h")], PushOptions::default());
    let push = || client.push(&peer, "in", &paths, &opts);
    push().await.unwrap();
    assert_eq!(client.hash_cache().hashed(), 2);
    std::fs::remove_dir_all(env.inbox().join("h")).unwrap();
    push().await.unwrap();
    assert_eq!(
        client.hash_cache().hashed(),
        2,
        "the second push read no file to hash it"
    );
    std::fs::remove_dir_all(env.inbox().join("h")).unwrap();
    write(&env.src().join("h/b"), b"rewritten");
    push().await.unwrap();
    assert_eq!(
        client.hash_cache().hashed(),
        3,
        "only the rewritten file was hashed again"
    );
    assert_same_tree(&env.src(), &env.inbox());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_changes_while_it_is_sent_aborts_the_job() {
    let env = env().await;
    // A file of several blocks is checked by path after its last read; a file of one
    // block through the descriptor it was read from.
    for (name, size) in [("growing.log", 3 * MIB), ("small.log", 1000)] {
        let dir = env.src().join(name.replace('.', "-"));
        write(&dir.join(name), &content(3, size));
        let opts = PushOptions {
            fault: Fault {
                change_source: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let err = env
            .client("client")
            .push(&env.peer(), "in", &[dir], &opts)
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransferError::SourceChanged(ref p) if p.ends_with(name)),
            "{err}"
        );
    }
    assert!(list(&env.inbox()).is_empty(), "nothing of the job is visible");
    let staging = env.staging("in");
    let mut left = usize::MAX;
    for _ in 0..50 {
        left = std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(left, 0, "the aborted job's staging was removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_job_spread_over_several_connections_arrives_verified() {
    let env = env().await;
    write(&env.src().join("m/big"), &content(21, 12 * MIB + 5));
    write(&env.src().join("m/small"), &content(22, 700));
    let opts = PushOptions {
        connections: 3,
        ..Default::default()
    };
    let r = env
        .client("client")
        .push(&env.peer(), "in", &[env.src().join("m")], &opts)
        .await
        .unwrap();
    assert_eq!(r.blocks_sent, 14);
    assert_eq!(r.connections, 3, "streams on every connection");
    assert_same_tree(&env.src(), &env.inbox());
}

/// A source that is not there ends the push with an error naming it, and nothing
/// reaches the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_source_fails_naming_it() {
    let env = env().await;
    let missing = env.src().join("not-there");
    let err = env
        .client("client")
        .push(&env.peer(), "in", &[missing], &PushOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, TransferError::Source(_)) && err.to_string().contains("not-there"),
        "{err}"
    );
    assert!(list(&env.inbox()).is_empty(), "nothing arrived");
}
