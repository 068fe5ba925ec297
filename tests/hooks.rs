//! Import hooks through a real agent: exec gets exactly the job's files in an
//! environment of its own, a failing hook fails the job with its report (its stderr
//! only if the target says so), a hook past its time is killed, and a Rust
//! `ImportHook` sees the whole job.

mod common;

use barge::agent::Hooks;
use barge::client::PushOptions;
use barge::engines::hook::{HookError, ImportHook, ImportJob};
use barge::proto::wire::code;
use barge::transfer::TransferError;
use common::*;
use std::sync::{Arc, Mutex};

fn exec_targets(script: &str) -> String {
    format!("[[import]]\nname = \"in\"\npath = \"inbox\"\nallow = [\"client\"]\nhook = \"exec\"\nexec = [\"sh\", \"-c\", {script:?}, \"hook\"]\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_hook_receives_exactly_the_jobs_files() {
    // The hook records its arguments and stdin, then ingests by copying the files.
    let script = "for f in \"$@\"; do echo \"$f\"; done > \"$BARGE_TARGET_DIR/../args\"; cat > \"$BARGE_TARGET_DIR/../job.json\"; echo ingested $#";
    let env = env_with(&exec_targets(script), "", Hooks::new()).await;
    write(&env.src().join("region/1.sst"), &content(1, 1500));
    write(&env.src().join("region/2.sst"), &content(2, (1 << 20) + 9));
    let opts = PushOptions {
        meta: vec![("region".into(), "42".into())],
        ..Default::default()
    };
    let r = env
        .client("client")
        .push(&env.peer(), "in", &[env.src().join("region")], &opts)
        .await
        .unwrap();
    assert_eq!(r.report, "ingested 2");
    let args = std::fs::read_to_string(env.root().join("args")).unwrap();
    let args: Vec<&str> = args.lines().collect();
    assert_eq!(args.len(), 2);
    assert!(
        args[0].ends_with("/files/region/1.sst") && args[1].ends_with("/files/region/2.sst"),
        "{args:?}"
    );
    let job: serde_json::Value = serde_json::from_slice(&std::fs::read(env.root().join("job.json")).unwrap()).unwrap();
    assert_eq!(job["meta"]["region"], "42");
    assert_eq!(job["peer"], "client");
    let names: Vec<&str> = job["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["region/1.sst", "region/2.sst"]);
    let want = blake3::hash(&content(2, (1 << 20) + 9)).to_hex().to_string();
    assert_eq!(job["files"][1]["blake3"], want.as_str());
    // Removed once the outcome is recorded, just after the sender got its answer.
    assert!(emptied(&env.staging("in")), "staging removed after the hook");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_exec_hook_fails_the_job_and_the_sender_sees_its_report_not_its_stderr() {
    let script = "echo 'ldb: corrupt SST at /srv/secret/path' >&2; echo 'region 7 refused'; exit 4";
    for (extra, stderr_sent) in [("", false), ("exec_stderr_to_sender = true\n", true)] {
        let env = env_with(&format!("{}{extra}", exec_targets(script)), "", Hooks::new()).await;
        write(&env.src().join("x.sst"), b"sst");
        let err = env
            .client("client")
            .push(&env.peer(), "in", &[env.src().join("x.sst")], &PushOptions::default())
            .await
            .unwrap_err();
        let TransferError::Failed(r) = err else { panic!("{err}") };
        assert_eq!(r.code, code::HOOK_FAILED);
        assert!(r.reason.contains("exit status: 4"), "{}", r.reason);
        assert_eq!(
            r.reason.contains("ldb: corrupt SST"),
            stderr_sent,
            "{extra}: {}",
            r.reason
        );
        assert_eq!(
            r.reason.contains("region 7 refused"),
            !stderr_sent,
            "{extra}: {}",
            r.reason
        );
        assert!(list(&env.inbox()).is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_hook_past_its_time_limit_is_killed_and_the_job_fails() {
    let targets = format!(
        "{}exec_timeout_secs = 1\n",
        exec_targets("sleep 30 & sleep 30; echo late")
    );
    let env = env_with(&targets, "", Hooks::new()).await;
    write(&env.src().join("x.sst"), b"sst");
    let started = std::time::Instant::now();
    let err = env
        .client("client")
        .push(&env.peer(), "in", &[env.src().join("x.sst")], &PushOptions::default())
        .await
        .unwrap_err();
    let TransferError::Failed(r) = err else { panic!("{err}") };
    assert_eq!(r.code, code::HOOK_FAILED);
    assert!(r.reason.contains("hook timed out after 1 s"), "{}", r.reason);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(list(&env.inbox()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_hook_sees_only_its_own_variables_and_the_allowed_ones() {
    use common::proc::{make_certs, AgentProc};
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    make_certs(p, &["store-b", "ops"]);
    std::fs::create_dir(p.join("in")).unwrap();
    let text = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"state\"\n\
         [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/store-b.pem\"\nkey = \"certs/store-b.key\"\n\
         [[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"ops\"]\nhook = \"exec\"\n\
         exec = [\"sh\", \"-c\", {:?}]\nexec_env = [\"HOOKTEST_ALLOWED\", \"HOOKTEST_UNSET\"]\n",
        "env > \"$BARGE_TARGET_DIR/../hook-env\"; echo ok"
    );
    std::fs::write(p.join("b.toml"), text).unwrap();
    // The agent's own environment has a secret, an allowed name and RUST_LOG.
    let envs = [("HOOKTEST_SECRET", "leaked"), ("HOOKTEST_ALLOWED", "passed on")];
    let agent = AgentProc::start(&["--config", "b.toml"], p, &envs);
    write(&p.join("src/x"), b"x");
    let client = barge::client::Client::new(&barge::net::tls::TlsFiles::in_dir(&p.join("certs"), "ops")).unwrap();
    let peer = format!("store-b@{}", agent.addr).parse().unwrap();
    let r = client
        .push(&peer, "in", &[p.join("src/x")], &PushOptions::default())
        .await
        .unwrap();
    assert_eq!(r.report, "ok");
    let seen = std::fs::read_to_string(p.join("hook-env")).unwrap();
    let names: Vec<&str> = seen.lines().filter_map(|l| l.split('=').next()).collect();
    assert!(seen.lines().any(|l| l == "HOOKTEST_ALLOWED=passed on"), "{seen}");
    assert!(seen.lines().any(|l| l == "PATH=/usr/local/bin:/usr/bin:/bin"), "{seen}");
    assert!(seen.lines().any(|l| l.starts_with("BARGE_JOB=")), "{seen}");
    for unexpected in [
        "HOOKTEST_SECRET",
        "HOOKTEST_UNSET",
        "RUST_LOG",
        "HOME",
        "CARGO_MANIFEST_DIR",
    ] {
        assert!(
            !names.contains(&unexpected),
            "{unexpected} in the hook's environment:\n{seen}"
        );
    }
}

type Seen = Vec<(Vec<String>, Vec<(String, String)>)>;

struct Recorder(Arc<Mutex<Seen>>);

impl ImportHook for Recorder {
    fn import(&self, job: &ImportJob) -> Result<String, HookError> {
        for f in &job.files {
            let data = std::fs::read(&f.path).map_err(|e| HookError::Other(e.to_string()))?;
            if blake3::hash(&data).to_hex().as_str() != f.blake3 {
                return Err(HookError::Other(format!("{} is not what was offered", f.name)));
            }
        }
        let names = job.files.iter().map(|f| f.name.clone()).collect();
        self.0
            .lock()
            .unwrap()
            .push((names, job.meta.clone().into_iter().collect()));
        if job.meta.contains_key("fail") {
            return Err(HookError::Other("engine said no".into()));
        }
        Ok(format!("engine took {} files", job.files.len()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_import_hook_sees_the_whole_verified_job() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut hooks = Hooks::new();
    hooks.insert(
        "in".to_string(),
        Arc::new(Recorder(seen.clone())) as Arc<dyn ImportHook>,
    );
    let targets = "[[import]]\nname = \"in\"\npath = \"inbox\"\nallow = [\"client\"]\nhook = \"custom\"\n";
    let env = env_with(targets, "", hooks).await;
    write(&env.src().join("a"), &content(1, 10));
    write(&env.src().join("b"), &content(2, 3 << 20));
    let paths = [env.src().join("a"), env.src().join("b")];
    let opts = PushOptions {
        meta: vec![("range".into(), "k1..k9".into())],
        ..Default::default()
    };
    let r = env
        .client("client")
        .push(&env.peer(), "in", &paths, &opts)
        .await
        .unwrap();
    assert_eq!(r.report, "engine took 2 files");
    let fail = PushOptions {
        meta: vec![("fail".into(), "1".into())],
        ..Default::default()
    };
    write(&env.src().join("c"), b"c");
    let err = env
        .client("client")
        .push(&env.peer(), "in", &[env.src().join("c")], &fail)
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransferError::Failed(ref r) if r.reason.contains("engine said no")),
        "{err}"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].0, ["a", "b"]);
    assert_eq!(seen[0].1, [("range".to_string(), "k1..k9".to_string())]);
    assert_eq!(seen.len(), 2);
}

#[tokio::test]
async fn a_custom_hook_target_without_a_registered_hook_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    barge::net::certs::init_ca(&dir.path().join("certs")).unwrap();
    barge::net::certs::issue(&dir.path().join("certs"), "agent", &[]).unwrap();
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let text = "listen = \"127.0.0.1:0\"\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/agent.pem\"\nkey = \"certs/agent.key\"\n\
                [[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"x\"]\nhook = \"custom\"\n";
    let config = barge::config::Config::parse(text, dir.path()).unwrap();
    let err = barge::agent::Agent::start(config).await.err().unwrap();
    assert!(err.to_string().contains("no ImportHook"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_target_may_take_files_it_already_holds_with_the_same_content() {
    let targets = "[[import]]\nname = \"in\"\npath = \"inbox\"\nallow = [\"client\"]\non_exists = \"skip-identical\"\n\
[[import]]\nname = \"strict\"\npath = \"outbox\"\nallow = [\"client\"]\n";
    let env = env_with(targets, "", Hooks::new()).await;
    let client = env.client("client");
    let push = |target: &'static str, files: Vec<std::path::PathBuf>| {
        let (client, peer) = (&client, env.peer());
        async move { client.push(&peer, target, &files, &PushOptions::default()).await }
    };
    write(&env.src().join("a"), &content(1, 300_000));
    write(&env.src().join("b"), &content(2, 5000));
    let (a, b) = (env.src().join("a"), env.src().join("b"));
    for target in ["in", "strict"] {
        push(target, vec![a.clone()]).await.unwrap();
    }
    // A job that holds a file already there, same content: delivered, the rest placed.
    let r = push("in", vec![a.clone(), b.clone()]).await.unwrap();
    assert_eq!(r.report, "moved 1 files into in; 1 already there with the same content");
    assert_eq!(list(&env.inbox()), ["a", "b"]);
    // Without the option it is refused by name, as before.
    let err = push("strict", vec![a.clone(), b.clone()]).await.unwrap_err();
    assert!(
        matches!(&err, TransferError::Rejected(r) if r.code == code::EXISTS && r.reason.contains("a already exists")),
        "{err}"
    );
    // Other content under the same name is refused by name, and nothing is overwritten.
    write(&a, &content(3, 300_000));
    let err = push("in", vec![a.clone()]).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("a already exists in the target with other content"),
        "{err}"
    );
    assert_eq!(std::fs::read(env.inbox().join("a")).unwrap(), content(1, 300_000));
    assert!(emptied(&env.staging("in")), "nothing left staged");
}
