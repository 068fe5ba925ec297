//! Admission on a small file system (a 200 MiB ext4 on a loop device): jobs that
//! together do not fit are refused up front, space taken from outside during a job
//! stops it with a named error, and the reserve is kept. Needs root, `mkfs.ext4`,
//! `mount` and `fallocate`; skipped with a message without them, except under CI=true.
//! Also: state and storage on two bind mounts of one file system stage on the target's.

mod common;

use barge::client::PushOptions;
use barge::proto::wire::code;
use barge::transfer::TransferError;
use common::{content, list, write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const RESERVE: u64 = 64 << 20;

/// A 200 MiB ext4 file system mounted at `dir`; unmounted when dropped.
struct LoopFs(PathBuf);

impl LoopFs {
    fn mount(dir: &Path) -> Option<LoopFs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let image = dir.with_extension("img");
        std::fs::create_dir_all(dir).unwrap();
        let ok = |c: &mut Command| c.output().is_ok_and(|o| o.status.success());
        let made = ok(Command::new("truncate").arg("-s").arg("200M").arg(&image))
            && ok(Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0"]).arg(&image))
            && ok(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(dir));
        made.then(|| LoopFs(dir.to_path_buf()))
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn free(dir: &Path) -> u64 {
    barge::store::space::free_space(dir).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_that_together_do_not_fit_are_refused_up_front_and_the_reserve_is_kept() {
    let t = tempfile::tempdir().unwrap();
    let Some(fs) = LoopFs::mount(&t.path().join("small")) else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true: this test needs root and a loop file system (mkfs.ext4, mount)");
        }
        eprintln!("skipping: needs root and a loop file system (mkfs.ext4, mount)");
        return;
    };
    let small = fs.0.clone();
    // 25 MB/s for the sender, so the jobs overlap and one runs long enough to take
    // space from under it.
    let targets = format!(
        "[[import]]\nname = \"small\"\npath = \"{}\"\nallow = [\"client\"]\n",
        small.display()
    );
    let env = common::env_with(&targets, "[limits]\npeer_rate_mbit = 200", Default::default()).await;
    let client = std::sync::Arc::new(env.client("client"));
    let opts = PushOptions::default();

    // Three jobs of 40 % of what may be used: each fits alone, two together, not three.
    let each = (free(&small) - RESERVE) * 2 / 5;
    let srcs: Vec<PathBuf> = (0..3u64)
        .map(|i| {
            let d = env.src().join(format!("third{i}"));
            write(&d.join("data"), &content(i, each as usize));
            d
        })
        .collect();
    let pushes = srcs.iter().map(|s| {
        let (client, peer, s, opts) = (client.clone(), env.peer(), s.clone(), opts.clone());
        tokio::spawn(async move { client.push(&peer, "small", &[s], &opts).await })
    });
    let mut results = vec![];
    for p in pushes.collect::<Vec<_>>() {
        results.push(p.await.unwrap());
    }
    let refused: Vec<_> = results
        .iter()
        .filter_map(|r| match r {
            Err(TransferError::Rejected(x)) => Some(x.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2, "{results:?}");
    assert_eq!(refused.len(), 1, "{results:?}");
    assert_eq!(refused[0].code, code::NO_SPACE);
    assert!(
        refused[0].reason.contains("promised to jobs in flight"),
        "{}",
        refused[0].reason
    );
    assert!(refused[0].retry_after > 0);
    assert!(free(&small) >= RESERVE);
    for s in &srcs {
        let _ = std::fs::remove_dir_all(small.join(s.file_name().unwrap()));
    }

    // Space taken from outside while a job runs: it stops before the reserve is gone,
    // with a named error, and what it staged is removed.
    let big = env.src().join("big");
    write(
        &big.join("data"),
        &content(9, ((free(&small) - RESERVE) * 7 / 10) as usize),
    );
    let job = {
        let (client, peer, big, opts) = (client.clone(), env.peer(), big.clone(), opts.clone());
        tokio::spawn(async move { client.push(&peer, "small", &[big], &opts).await })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let filler = small.join("filler");
    let st = Command::new("fallocate")
        .arg("-l")
        .arg((free(&small) / 2).to_string())
        .arg(&filler)
        .status()
        .unwrap();
    assert!(st.success());
    let err = job.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, TransferError::Failed(x) if x.code == code::NO_SPACE && x.reason.contains("filled up")),
        "{err}"
    );
    std::fs::remove_file(&filler).unwrap();
    let visible: Vec<String> = list(&small)
        .into_iter()
        .filter(|f| !f.starts_with("lost+found"))
        .collect();
    assert!(visible.is_empty(), "{visible:?}");
    let staging = small.join(".barge-staging");
    assert!(
        std::fs::read_dir(&staging).map_or(true, |mut d| d.next().is_none()),
        "staging emptied"
    );
    // And the agent serves afterwards.
    write(&env.src().join("after/a"), b"a");
    client
        .push(&env.peer(), "small", &[env.src().join("after")], &opts)
        .await
        .unwrap();
    env.agent.shutdown().await;
}

/// `dir` bind-mounted at `at`, as systemd's `ReadWritePaths=` does for each path;
/// unmounted when dropped.
struct Bind(PathBuf);

impl Bind {
    fn mount(dir: &Path, at: &Path) -> Option<Bind> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount").arg("--bind").arg(dir).arg(at).status();
        status.is_ok_and(|s| s.success()).then(|| Bind(at.to_path_buf()))
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// State and storage on one file system but two mounts (the packaged unit's
/// `ReadWritePaths=/var/lib/barge /srv/storage`): a rename between them fails, so the
/// default staging must go inside the target, and a `staging` on the state's mount is
/// refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_stays_on_the_targets_mount_when_state_is_another_bind_mount_of_one_file_system() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    let (state, storage) = (
        Bind::mount(&p.join("disk/state"), &p.join("state")),
        Bind::mount(&p.join("disk/storage"), &p.join("storage")),
    );
    let (Some(_state), Some(_storage)) = (state, storage) else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true: this test needs root and mount --bind");
        }
        eprintln!("skipping: needs root and mount --bind");
        return;
    };
    let certs = p.join("certs");
    barge::net::certs::init_ca(&certs).unwrap();
    for name in ["agent", "client"] {
        barge::net::certs::issue(&certs, name, &[]).unwrap();
    }
    std::fs::create_dir_all(p.join("storage/in")).unwrap();
    let config = |staging: &str| {
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"state\"\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/agent.pem\"\nkey = \"certs/agent.key\"\n\
             [[import]]\nname = \"in\"\npath = \"storage/in\"\nallow = [\"client\"]\n{staging}"
        )
    };
    let path = p.join("agent.toml");
    std::fs::write(&path, config("staging = \"state/staging-in\"\n")).unwrap();
    let err = barge::config::Config::load(&path).unwrap_err().to_string();
    assert!(err.contains("another file system or mount"), "{err}");

    std::fs::write(&path, config("")).unwrap();
    let loaded = barge::config::Config::load(&path).unwrap();
    let target = loaded.import("in").unwrap();
    assert!(target.staging_in_target, "{}", target.staging.display());
    let agent = barge::agent::Agent::start(loaded).await.unwrap();
    write(&p.join("a.sst"), &content(3, 3 << 20));
    let client = barge::client::Client::new(&barge::net::tls::TlsFiles::in_dir(&certs, "client")).unwrap();
    let peer = format!("agent@{}", agent.local_addr()).parse().unwrap();
    client
        .push(&peer, "in", &[p.join("a.sst")], &PushOptions::default())
        .await
        .expect("the commit is a rename within the target's mount");
    assert_eq!(std::fs::read(p.join("storage/in/a.sst")).unwrap(), content(3, 3 << 20));
    agent.shutdown().await;
}
