//! Symlinks, hard links and foreign folders that a local user who can write into an
//! import target or an export plants there, against a real agent. The agent never
//! follows them: nothing outside the target is written, truncated or moved, and nothing
//! outside an export is sent.

mod common;

use barge::agent::Hooks;
use barge::client::PushOptions;
use common::crafted::{offer_for, send_offer};
use common::*;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

/// 35 bytes somewhere outside the target that must stay as they are.
const VICTIM: &[u8] = b"thirty-five bytes of someone's data";

/// A folder outside every target with the victim file at `files/f`, where a job folder
/// pointed at it would write.
fn outside(env: &Env) -> PathBuf {
    let out = env.root().join("outside");
    write(&out.join("files/f"), VICTIM);
    out
}

fn assert_untouched(out: &Path) {
    assert_eq!(std::fs::read(out.join("files/f")).unwrap(), VICTIM, "victim changed");
    assert_eq!(list(out), ["files/f"], "something was written outside");
}

fn staging(env: &Env) -> PathBuf {
    env.staging("in")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_planted_as_the_job_folder_is_not_followed() {
    let env = env().await;
    let out = outside(&env);
    write(&env.src().join("f"), b"data");
    let offer = offer_for(&["f"], b"data");
    std::fs::create_dir(staging(&env)).unwrap();
    symlink(&out, staging(&env).join(offer.job_id().to_string())).unwrap();
    let err = send_offer(&env, offer, env.src().join("f")).await.unwrap_err();
    assert!(err.to_string().contains("is a symlink or not a folder"), "{err}");
    assert_untouched(&out);
    assert!(list(&env.inbox()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_planted_in_a_partly_staged_job_are_not_followed() {
    let env = env().await;
    let out = outside(&env);
    write(&env.src().join("f"), b"data");
    // As the file itself, and as a folder on the way to it.
    for (name, link, to) in [("f", "f", out.join("files/f")), ("d/f", "d", out.join("files"))] {
        let offer = offer_for(&[name], b"data");
        let files = staging(&env).join(offer.job_id().to_string()).join("files");
        std::fs::create_dir_all(&files).unwrap();
        symlink(&to, files.join(link)).unwrap();
        let err = send_offer(&env, offer, env.src().join("f")).await.unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{name}: {err}");
        assert_untouched(&out);
    }
    assert!(list(&env.inbox()).is_empty());
    // The agent still takes pushes (of another job: those two keep being refused until
    // their staging folders expire).
    write(&env.src().join("g"), b"other");
    env.client("client")
        .push(&env.peer(), "in", &[env.src().join("g")], &PushOptions::default())
        .await
        .unwrap();
    assert_eq!(std::fs::read(env.inbox().join("g")).unwrap(), b"other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staging_folder_of_another_user_is_refused() {
    let env = env().await;
    // SAFETY: geteuid has no preconditions.
    let agent = unsafe { libc::geteuid() };
    if agent != 0 {
        eprintln!("skipped: only root can give a folder to another user");
        return;
    }
    std::fs::create_dir(staging(&env)).unwrap();
    std::os::unix::fs::chown(staging(&env), Some(12345), None).unwrap();
    write(&env.src().join("f"), b"data");
    let err = env
        .client("client")
        .push(&env.peer(), "in", &[env.src().join("f")], &PushOptions::default())
        .await
        .unwrap_err();
    let want = format!(
        "staging folder {} is owned by uid 12345, not the agent (uid 0)",
        staging(&env).display()
    );
    assert!(err.to_string().contains(&want), "{err}");
    assert!(list(&env.inbox()).is_empty());
    assert_eq!(std::fs::read_dir(staging(&env)).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_folders_are_private_to_the_agent() {
    use std::os::unix::fs::PermissionsExt;
    let env = env_with(DEFAULT_TARGETS, "data_dir = \".\"", Hooks::new()).await;
    // One made by an older agent, open to everyone: tightened.
    std::fs::create_dir(staging(&env)).unwrap();
    std::fs::set_permissions(staging(&env), std::fs::Permissions::from_mode(0o777)).unwrap();
    write(&env.src().join("f"), b"data");
    let hold = PushOptions {
        hold: true,
        ..Default::default()
    };
    let client = env.client("client");
    let r = client
        .push(&env.peer(), "in", &[env.src().join("f")], &hold)
        .await
        .unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&staging(&env)), 0o700);
    assert_eq!(mode(&staging(&env).join(r.job.to_string())), 0o700);
    client.commit(&env.peer(), r.job).await.unwrap();
    assert_eq!(std::fs::read(env.inbox().join("f")).unwrap(), b"data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_folder_turned_into_a_symlink_before_a_held_commit_places_nothing_outside() {
    let env = env_with(DEFAULT_TARGETS, "data_dir = \".\"", Hooks::new()).await;
    let out = outside(&env);
    write(&env.src().join("a/f"), b"data");
    let hold = PushOptions {
        hold: true,
        ..Default::default()
    };
    let client = env.client("client");
    let r = client
        .push(&env.peer(), "in", &[env.src().join("a")], &hold)
        .await
        .unwrap();
    // While the job is held, a local user plants `a` pointing outside.
    symlink(out.join("files"), env.inbox().join("a")).unwrap();
    let err = client.commit(&env.peer(), r.job).await.unwrap_err();
    assert!(err.to_string().contains("outside the target"), "{err}");
    assert_untouched(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_file_with_two_links_or_a_symlink_is_not_sent() {
    let env = env().await;
    write(&env.outbox().join("ok"), b"fine");
    write(&env.root().join("secret"), VICTIM);
    // A hard link into the export of a file the puller must not get.
    std::fs::hard_link(env.root().join("secret"), env.outbox().join("linked")).unwrap();
    let client = env.client("client");
    let into = env.root().join("pulled");
    std::fs::create_dir(&into).unwrap();
    for files in [vec![], vec!["linked".to_string()]] {
        let err = client.pull(&env.peer(), "out", &files, &into).await.unwrap_err();
        assert!(err.to_string().contains("has 2 hard links"), "{files:?}: {err}");
    }
    assert!(list(&into).is_empty());
    std::fs::remove_file(env.outbox().join("linked")).unwrap();
    symlink(env.root().join("secret"), env.outbox().join("link")).unwrap();
    let err = client
        .pull(&env.peer(), "out", &["link".to_string()], &into)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("symlinks are not sent"), "{err}");
    std::fs::remove_file(env.outbox().join("link")).unwrap();
    client.pull(&env.peer(), "out", &[], &into).await.unwrap();
    assert_eq!(list(&into), ["ok"]);
}
