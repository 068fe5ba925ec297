//! Bulk-load jobs through a real agent: `hold` stages and verifies without anything
//! becoming visible, then commit or abort; held jobs survive a restart, expire, and
//! keep other jobs out of their target.

mod common;

use barge::agent::Hooks;
use barge::client::PushOptions;
use barge::proto::wire::code;
use barge::transfer::TransferError;
use common::*;
use std::time::Duration;

fn hold() -> PushOptions {
    PushOptions {
        hold: true,
        ..Default::default()
    }
}

fn journal(env: &Env) -> Vec<String> {
    list(&env.root().join("jobs"))
}

/// Files of the held job's staging folder.
fn staged(env: &Env) -> Vec<String> {
    list(&env.staging("in"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_job_is_invisible_until_commit() {
    let env = env_with(DEFAULT_TARGETS, "data_dir = \".\"", Hooks::new()).await;
    write(&env.src().join("load/1.sst"), &content(1, 3 << 20));
    write(&env.src().join("load/2.sst"), &content(2, 700));
    let client = env.client("client");
    let r = client
        .push(&env.peer(), "in", &[env.src().join("load")], &hold())
        .await
        .unwrap();
    assert!(r.held, "{r:?}");
    assert!(list(&env.inbox()).is_empty(), "nothing visible before commit");
    assert_eq!(journal(&env), [format!("{}.json", r.job)]);
    let jobs = client.jobs(&env.peer()).await.unwrap();
    assert_eq!(jobs.len(), 1);
    let j = &jobs[0];
    assert_eq!((j.id, j.state.as_str(), j.target.as_str()), (r.job, "held", "in"));
    assert_eq!((j.files, j.bytes, j.done), (2, (3 << 20) + 700, (3 << 20) + 700));
    assert_eq!(j.peer, "client");

    let report = client.commit(&env.peer(), r.job).await.unwrap();
    assert!(report.contains("moved 2 files"), "{report}");
    assert_same_tree(&env.src(), &env.inbox());
    assert!(staged(&env).is_empty() && journal(&env).is_empty());
    assert!(client.jobs(&env.peer()).await.unwrap().is_empty());
    // A commit sent again (its answer lost, say) is confirmed, not refused; an abort of
    // a committed job is refused, naming why.
    let again = client.commit(&env.peer(), r.job).await.unwrap();
    assert!(
        again.contains("moved 2 files") && again.contains("sent again"),
        "{again}"
    );
    let abort = client.abort(&env.peer(), r.job).await.unwrap_err();
    assert!(
        matches!(&abort, TransferError::Rejected(x) if x.code == code::NOT_FOUND && x.reason.contains("committed")),
        "{abort}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_removes_everything_staged() {
    let env = env_with(DEFAULT_TARGETS, "data_dir = \".\"", Hooks::new()).await;
    write(&env.src().join("a.sst"), &content(3, 2 << 20));
    let client = env.client("client");
    let r = client
        .push(&env.peer(), "in", &[env.src().join("a.sst")], &hold())
        .await
        .unwrap();
    assert_eq!(staged(&env).len(), 1);
    client.abort(&env.peer(), r.job).await.unwrap();
    assert!(list(&env.inbox()).is_empty() && staged(&env).is_empty() && journal(&env).is_empty());
    assert!(!env.staging("in").join(r.job.to_string()).exists());
    // The target is free again: a plain push goes through.
    client
        .push(&env.peer(), "in", &[env.src().join("a.sst")], &PushOptions::default())
        .await
        .unwrap();
    assert_same_tree(&env.src(), &env.inbox());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_job_survives_an_agent_restart() {
    let env = env_with(DEFAULT_TARGETS, "data_dir = \".\"", Hooks::new()).await;
    write(&env.src().join("big.sst"), &content(4, (5 << 20) + 1));
    let r = env
        .client("client")
        .push(&env.peer(), "in", &[env.src().join("big.sst")], &hold())
        .await
        .unwrap();
    let env = env.restart().await;
    let client = env.client("client");
    let jobs = client.jobs(&env.peer()).await.unwrap();
    assert_eq!(
        jobs.iter().map(|j| (j.id, j.state.as_str())).collect::<Vec<_>>(),
        [(r.job, "held")]
    );
    // Still holding the target after the restart.
    write(&env.src().join("other"), b"x");
    let err = client
        .push(&env.peer(), "in", &[env.src().join("other")], &PushOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, TransferError::Rejected(x) if x.code == code::HELD),
        "{err}"
    );
    assert!(list(&env.inbox()).is_empty());
    client.commit(&env.peer(), r.job).await.unwrap();
    assert_eq!(
        std::fs::read(env.inbox().join("big.sst")).unwrap(),
        content(4, (5 << 20) + 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_jobs_expire_and_are_cleaned_up_completely() {
    let env = env_with(DEFAULT_TARGETS, "data_dir = \".\"\nhold_ttl_secs = 1", Hooks::new()).await;
    write(&env.src().join("a.sst"), &content(5, 100_000));
    let client = env.client("client");
    let r = client
        .push(&env.peer(), "in", &[env.src().join("a.sst")], &hold())
        .await
        .unwrap();
    let job_dir = env.staging("in").join(r.job.to_string());
    assert!(job_dir.exists());
    // The sweep runs every second; give it a generous while on a busy machine.
    for _ in 0..100 {
        if !job_dir.exists() && journal(&env).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!job_dir.exists(), "staged files removed");
    assert!(journal(&env).is_empty(), "journal entry removed");
    assert!(client.jobs(&env.peer()).await.unwrap().is_empty());
    let err = client.commit(&env.peer(), r.job).await.unwrap_err();
    assert!(
        matches!(&err, TransferError::Rejected(x) if x.code == code::NOT_FOUND),
        "{err}"
    );
    assert!(list(&env.inbox()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_racing_for_one_target_get_one_hold() {
    let targets = "[[import]]\nname = \"in\"\npath = \"inbox\"\nallow = [\"client\", \"stranger\"]\n";
    let env = env_with(targets, "data_dir = \".\"", Hooks::new()).await;
    write(&env.src().join("a/1.sst"), &content(6, 4 << 20));
    write(&env.src().join("b/1.sst"), &content(7, 4 << 20));
    let (ca, cb) = (env.client("client"), env.client("stranger"));
    let (pa, pb) = (env.peer(), env.peer());
    let (sa, sb) = ([env.src().join("a")], [env.src().join("b")]);
    let opts = hold();
    let (ra, rb) = tokio::join!(ca.push(&pa, "in", &sa, &opts), cb.push(&pb, "in", &sb, &opts));
    let (won, lost, winner, loser) = match (ra, rb) {
        (Ok(w), Err(l)) => (w, l, "client", &cb),
        (Err(l), Ok(w)) => (w, l, "stranger", &ca),
        other => panic!("exactly one hold must win: {other:?}"),
    };
    let TransferError::Rejected(refusal) = &lost else {
        panic!("the loser is refused up front: {lost}");
    };
    assert_eq!(refusal.code, code::HELD, "{}", refusal.reason);
    assert!(
        refusal.reason.contains("held by another sender's job")
            && !refusal.reason.contains(&won.job.to_string())
            && !refusal.reason.contains(winner),
        "the refusal says the target is held, not by whom: {}",
        refusal.reason
    );
    // A plain push is kept out too, until the holder commits.
    write(&env.src().join("c"), b"c");
    let err = loser
        .push(&env.peer(), "in", &[env.src().join("c")], &PushOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, TransferError::Rejected(x) if x.code == code::HELD),
        "{err}"
    );
    // The job is its sender's: to the loser it is as if there were none.
    let err = loser.commit(&env.peer(), won.job).await.unwrap_err();
    assert!(
        matches!(&err, TransferError::Rejected(x) if x.code == code::NOT_FOUND),
        "{err}"
    );
    assert!(loser.jobs(&env.peer()).await.unwrap().is_empty(), "nor listed to it");
    let holder = if winner == "client" { &ca } else { &cb };
    holder.commit(&env.peer(), won.job).await.unwrap();
    loser
        .push(&env.peer(), "in", &[env.src().join("c")], &PushOptions::default())
        .await
        .unwrap();
    assert_eq!(list(&env.inbox()).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_hook_fails_leaves_the_job_held() {
    let targets = "[[import]]\nname = \"in\"\npath = \"inbox\"\nallow = [\"client\"]\nhook = \"exec\"\n\
exec = [\"sh\", \"-c\", \"test -e \\\"$BARGE_TARGET_DIR/../engine-ready\\\" || { echo engine not ready; exit 1; }; echo ingested $#\", \"hook\"]\n";
    let env = env_with(targets, "data_dir = \".\"", Hooks::new()).await;
    write(&env.src().join("a.sst"), &content(8, 5000));
    let client = env.client("client");
    let r = client
        .push(&env.peer(), "in", &[env.src().join("a.sst")], &hold())
        .await
        .unwrap();
    let err = client.commit(&env.peer(), r.job).await.unwrap_err();
    assert!(err.to_string().contains("engine not ready"), "{err}");
    let jobs = client.jobs(&env.peer()).await.unwrap();
    assert_eq!(jobs.iter().map(|j| j.state.as_str()).collect::<Vec<_>>(), ["held"]);
    assert_eq!(journal(&env).len(), 1, "still journaled");
    std::fs::write(env.root().join("engine-ready"), b"").unwrap();
    assert_eq!(client.commit(&env.peer(), r.job).await.unwrap(), "ingested 1");
    assert!(journal(&env).is_empty() && staged(&env).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_entry_pointing_outside_the_staging_area_is_dropped_not_followed() {
    let env = env_with(DEFAULT_TARGETS, "data_dir = \".\"", Hooks::new()).await;
    write(&env.src().join("a.sst"), &content(9, 1000));
    let r = env
        .client("client")
        .push(&env.peer(), "in", &[env.src().join("a.sst")], &hold())
        .await
        .unwrap();
    let entry = env.root().join("jobs").join(format!("{}.json", r.job));
    let precious = env.root().join("precious");
    write(&precious.join("keep"), b"keep");
    let text = std::fs::read_to_string(&entry).unwrap();
    let staged = env.staging("in").join(r.job.to_string());
    let moved = text.replace(&*staged.to_string_lossy(), &precious.to_string_lossy());
    assert_ne!(moved, text, "the entry names the staging folder");
    std::fs::write(&entry, moved).unwrap();
    let env = env.restart().await;
    assert!(env.client("client").jobs(&env.peer()).await.unwrap().is_empty());
    assert!(!entry.exists(), "the entry is dropped");
    assert_eq!(
        std::fs::read(precious.join("keep")).unwrap(),
        b"keep",
        "nothing outside is deleted"
    );
}

/// Flips one byte of `path` at `at`.
fn flip(path: &std::path::Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_job_whose_staged_bytes_changed_is_not_committed_until_sent_again() {
    let env = env_with(DEFAULT_TARGETS, "data_dir = \".\"", Hooks::new()).await;
    write(&env.src().join("load/big.sst"), &content(11, (3 << 20) + 5));
    write(&env.src().join("load/small.sst"), &content(12, 700));
    let client = env.client("client");
    let src = [env.src().join("load")];
    let r = client.push(&env.peer(), "in", &src, &hold()).await.unwrap();
    let staged = env.staging("in").join(r.job.to_string());
    flip(&staged.join("files/load/big.sst"), (1 << 20) + 77);

    let err = client.commit(&env.peer(), r.job).await.unwrap_err();
    let TransferError::Rejected(refusal) = &err else {
        panic!("refused: {err}")
    };
    assert_eq!(refusal.code, code::BAD_BLOCK);
    assert!(
        refusal.reason.contains("load/big.sst") && !refusal.reason.contains("small"),
        "names the bad file only: {}",
        refusal.reason
    );
    assert!(list(&env.inbox()).is_empty(), "nothing visible");
    let jobs = client.jobs(&env.peer()).await.unwrap();
    assert_eq!(jobs.iter().map(|j| j.state.as_str()).collect::<Vec<_>>(), ["held"]);

    // The same push again sends just the bad block; then the commit goes through.
    let again = client.push(&env.peer(), "in", &src, &hold()).await.unwrap();
    assert_eq!((again.blocks_sent, again.blocks_held), (1, 4), "{again:?}");
    client.commit(&env.peer(), r.job).await.unwrap();
    assert_same_tree(&env.src(), &env.inbox());
}
