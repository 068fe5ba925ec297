//! File modes through real agents: a file arrives with the permission bits it had at
//! the sender (0-db writes 0600), on pushes and pulls; a target may force its own
//! file and folder modes instead.

mod common;

use barge::agent::Hooks;
use barge::client::PushOptions;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn set_mode(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_keep_their_modes_and_a_target_may_set_its_own() {
    let env = env_with(DEFAULT_TARGETS, "", Hooks::new()).await;
    // A second target whose own modes win, added by a reload once its folder exists.
    std::fs::create_dir_all(env.root().join("forced")).unwrap();
    let forced = "[[import]]\nname = \"forced\"\npath = \"forced\"\nallow = [\"client\"]\nfile_mode = \"0640\"\ndir_mode = \"0700\"\n";
    let text = std::fs::read_to_string(&env.config_path).unwrap() + forced;
    env.agent
        .reload(barge::config::Config::parse(&text, env.root()).unwrap())
        .unwrap();
    let ns = env.src().join("ns1");
    write(&ns.join("d0"), &content(1, 300_000));
    write(&ns.join("i0"), &content(2, 5000));
    write(&ns.join("shared"), &content(3, 100));
    set_mode(&ns.join("d0"), 0o600);
    set_mode(&ns.join("i0"), 0o600);
    set_mode(&ns.join("shared"), 0o644);
    set_mode(&ns, 0o700);
    let client = env.client("client");
    client
        .push(&env.peer(), "in", std::slice::from_ref(&ns), &PushOptions::default())
        .await
        .unwrap();
    assert_eq!(mode(&env.inbox().join("ns1/d0")), 0o600);
    assert_eq!(mode(&env.inbox().join("ns1/i0")), 0o600);
    assert_eq!(mode(&env.inbox().join("ns1/shared")), 0o644);

    // A held job keeps them too, across its journal.
    write(&env.src().join("held.sst"), &content(4, 2000));
    set_mode(&env.src().join("held.sst"), 0o400);
    let held = PushOptions {
        hold: true,
        ..Default::default()
    };
    let r = client
        .push(&env.peer(), "in", &[env.src().join("held.sst")], &held)
        .await
        .unwrap();
    client.commit(&env.peer(), r.job).await.unwrap();
    assert_eq!(mode(&env.inbox().join("held.sst")), 0o400);

    // A target's own modes win: files and the folders the job brings.
    client
        .push(
            &env.peer(),
            "forced",
            std::slice::from_ref(&ns),
            &PushOptions::default(),
        )
        .await
        .unwrap();
    let forced = env.root().join("forced");
    assert_eq!(mode(&forced.join("ns1")), 0o700);
    for f in ["d0", "i0", "shared"] {
        assert_eq!(mode(&forced.join("ns1").join(f)), 0o640, "{f}");
    }

    // A pull gives the files the modes they have in the export.
    write(&env.outbox().join("d1"), &content(5, 70_000));
    set_mode(&env.outbox().join("d1"), 0o600);
    let into = env.root().join("pulled");
    client.pull(&env.peer(), "out", &[], &into).await.unwrap();
    assert_eq!(mode(&into.join("d1")), 0o600);
}

#[test]
fn a_mode_beyond_permission_bits_is_refused_in_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    barge::net::certs::init_ca(&certs).unwrap();
    barge::net::certs::issue(&certs, "agent", &[]).unwrap();
    std::fs::create_dir_all(dir.path().join("in")).unwrap();
    for (bad, why) in [
        ("4755", "not an octal mode"),
        ("0x1ff", "not an octal mode"),
        ("rw", "not an octal mode"),
    ] {
        let text = format!(
            "[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/agent.pem\"\nkey = \"certs/agent.key\"\n\
[[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"*\"]\nfile_mode = \"{bad}\"\n"
        );
        let err = barge::config::Config::parse(&text, dir.path()).unwrap_err().to_string();
        assert!(err.contains("file_mode") && err.contains(why), "{bad}: {err}");
    }
}
