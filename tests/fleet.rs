//! Fleets: files a replica already holds are not sent again, pulls run again move no
//! data, third-party ships, and one upload relayed to many replicas (real agents over
//! loopback QUIC, certificates from barge's own certs code).

mod common;

use barge::agent::Hooks;
use barge::client::PushOptions;
use barge::config::OnExists;
use common::*;

const SKIPPING: &str =
    "[[import]]\nname = \"in\"\npath = \"inbox\"\nallow = [\"client\"]\non_exists = \"skip-identical\"\n\
[[export]]\nname = \"out\"\npath = \"outbox\"\nallow = [\"client\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_the_target_holds_with_the_same_content_is_not_sent() {
    let env = env_with(SKIPPING, "", Hooks::new()).await;
    let client = env.client("client");
    let (a, b) = (env.src().join("a"), env.src().join("b"));
    write(&a, &content(1, 3 << 20));
    write(&b, &content(2, 2 << 20));
    // Each push a job of its own (the same job sent again is confirmed from the record).
    let n = std::sync::atomic::AtomicU32::new(0);
    let push = |files: Vec<std::path::PathBuf>| {
        let (client, peer) = (&client, env.peer());
        let k = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let opts = PushOptions {
            meta: vec![("try".into(), k.to_string())],
            ..Default::default()
        };
        async move { client.push(&peer, "in", &files, &opts).await }
    };
    push(vec![a.clone()]).await.unwrap();
    let r = push(vec![a.clone(), b.clone()]).await.unwrap();
    assert_eq!(r.blocks_sent, 2, "only b's two blocks travel");
    assert_eq!(r.bytes_sent, 2 << 20);
    assert_eq!(r.blocks_held, 3);
    assert!(
        r.report.contains("1 already there with the same content"),
        "{}",
        r.report
    );
    assert_same_tree(&env.src(), &env.inbox());
    // Sent again whole: nothing travels, and the commit says so.
    let r = push(vec![a.clone(), b.clone()]).await.unwrap();
    assert_eq!((r.blocks_sent, r.bytes_sent), (0, 0));
    assert!(r.report.contains("all 2 files already in in"), "{}", r.report);
    // Other content under a name the target has is still refused, before any data.
    write(&b, &content(3, 2 << 20));
    let err = push(vec![b.clone()]).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("b already exists in the target with other content"),
        "{err}"
    );
    assert!(emptied(&env.staging("in")), "nothing left staged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_job_stages_even_the_files_the_target_holds() {
    let env = env_with(SKIPPING, "", Hooks::new()).await;
    let client = env.client("client");
    let a = env.src().join("a");
    write(&a, &content(1, 2 << 20));
    let peer = env.peer();
    client
        .push(&peer, "in", &[a.clone()], &PushOptions::default())
        .await
        .unwrap();
    let held = PushOptions {
        hold: true,
        meta: vec![("held".into(), "yes".into())],
        ..Default::default()
    };
    let r = client.push(&peer, "in", &[a.clone()], &held).await.unwrap();
    assert!(r.held);
    assert_eq!(r.blocks_sent, 2, "a held job's commit may come when the target changed");
    let report = client.commit(&peer, r.job).await.unwrap();
    assert!(report.contains("already in in"), "{report}");
    assert_eq!(std::fs::read(env.inbox().join("a")).unwrap(), content(1, 2 << 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_run_again_with_skip_identical_moves_no_data() {
    let env = env().await;
    write(&env.outbox().join("x/one"), &content(4, 3 << 20));
    write(&env.outbox().join("two"), &content(5, 1000));
    let client = env.client("client");
    let into = env.root().join("pulled");
    let pull = |on: OnExists| {
        let (client, peer, into) = (&client, env.peer(), into.clone());
        async move { client.pull_into(&peer, "out", (&[], None), &into, on).await }
    };
    let first = pull(OnExists::SkipIdentical).await.unwrap();
    assert_eq!((first.blocks_received, first.files_there), (4, 0));
    assert_same_tree(&env.outbox(), &into);
    let again = pull(OnExists::SkipIdentical).await.unwrap();
    assert_eq!(
        (again.blocks_received, again.files_there),
        (0, 2),
        "no data the second time"
    );
    assert_same_tree(&env.outbox(), &into);
    // The default refuses names the folder has, naming one.
    let err = pull(OnExists::Refuse).await.unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    // A changed source file: skip-identical refuses it, replace takes it.
    write(&env.outbox().join("two"), &content(6, 1000));
    let err = pull(OnExists::SkipIdentical).await.unwrap_err();
    assert!(err.to_string().contains("two already exists"), "{err}");
    let r = pull(OnExists::Replace).await.unwrap();
    assert_eq!(r.files, 2);
    assert_same_tree(&env.outbox(), &into);
}
