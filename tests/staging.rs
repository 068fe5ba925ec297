//! Where jobs are staged: outside the import target by default (under `data_dir`,
//! on the target's file system), or in a `staging` folder the target names, which must
//! share the target's file system. An engine scanning the target never sees barge's
//! folders.

mod common;

use barge::agent::Hooks;
use barge::client::PushOptions;
use common::*;
use std::os::unix::fs::MetadataExt;

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_staged_outside_the_target_and_nothing_of_barges_stays_in_it() {
    let env = env_with(DEFAULT_TARGETS, "data_dir = \"state\"", Hooks::new()).await;
    let staging = env.staging("in");
    assert_eq!(staging, env.root().join("state/staging/in"));
    write(&env.src().join("ns1/d0"), &content(1, 3 << 20));
    let client = env.client("client");
    let held = PushOptions {
        hold: true,
        ..Default::default()
    };
    let r = client
        .push(&env.peer(), "in", &[env.src().join("ns1")], &held)
        .await
        .unwrap();
    // Staged and held: the engine's folder is as it was, the job sits in staging.
    assert!(names(&env.inbox()).is_empty(), "{:?}", names(&env.inbox()));
    assert_eq!(names(&staging), [r.job.to_string()]);
    let mode = std::fs::metadata(&staging).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o700);
    client.commit(&env.peer(), r.job).await.unwrap();
    assert_eq!(names(&env.inbox()), ["ns1"]);
    assert!(!staging.exists(), "the empty staging folder goes too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_may_name_its_staging_folder() {
    let targets = "[[import]]\nname = \"in\"\npath = \"inbox\"\nallow = [\"client\"]\nstaging = \"spool/in\"\n";
    let env = {
        let env = env_with("", "", Hooks::new()).await;
        std::fs::create_dir_all(env.root().join("spool")).unwrap();
        let text = std::fs::read_to_string(&env.config_path).unwrap() + targets;
        std::fs::write(&env.config_path, text).unwrap();
        env.restart().await
    };
    assert_eq!(env.staging("in"), env.root().join("spool/in"));
    write(&env.src().join("f"), &content(2, 100_000));
    let r = env
        .client("client")
        .push(
            &env.peer(),
            "in",
            &[env.src().join("f")],
            &PushOptions {
                hold: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(env.root().join("spool/in").join(r.job.to_string()).is_dir());
    assert!(names(&env.inbox()).is_empty());
}

#[test]
fn a_staging_folder_on_another_file_system_is_refused_at_start() {
    let shm = std::path::Path::new("/dev/shm");
    let dir = tempfile::tempdir().unwrap();
    let same = shm.exists() && std::fs::metadata(shm).unwrap().dev() == std::fs::metadata(dir.path()).unwrap().dev();
    if !shm.is_dir() || same {
        if std::env::var_os("CI").is_some_and(|v| v == "true") {
            panic!("/dev/shm is needed as a second file system");
        }
        eprintln!("skipped: no second file system at /dev/shm");
        return;
    }
    let certs = dir.path().join("certs");
    barge::net::certs::init_ca(&certs).unwrap();
    barge::net::certs::issue(&certs, "agent", &[]).unwrap();
    std::fs::create_dir_all(dir.path().join("in")).unwrap();
    let elsewhere = tempfile::tempdir_in(shm).unwrap();
    let tls = "[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/agent.pem\"\nkey = \"certs/agent.key\"\n";
    let text = format!(
        "{tls}[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"*\"]\nstaging = \"{}\"\n",
        elsewhere.path().join("st").display()
    );
    let err = barge::config::Config::parse(&text, dir.path()).unwrap_err().to_string();
    assert!(err.contains("staging") && err.contains("another file system"), "{err}");
    // With data_dir on another file system and no `staging`, jobs are staged in the
    // target, and the agent says so at start.
    let text = format!(
        "data_dir = \"{}\"\n{tls}[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"*\"]\n",
        elsewhere.path().join("state").display()
    );
    let config = barge::config::Config::parse(&text, dir.path()).unwrap();
    let t = config.import("in").unwrap();
    assert!(t.staging_in_target);
    assert_eq!(
        t.staging,
        dir.path().join("in").canonicalize().unwrap().join(".barge-staging")
    );
}
