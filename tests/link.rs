//! Across emulated lossy links between two network namespaces (shared/tools/linkem),
//! short and long (100 ms): the files still arrive, verified. Needs root, iproute2, iptables and the emulator's
//! build dependencies; skipped with a message without them, except under CI=true.

mod common;

use common::{assert_same_tree, content, write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn linkem() -> Option<PathBuf> {
    let path = std::env::var_os("LINKEM")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/linkem/linkem"));
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["iptables", "ip", "gcc"]
        .iter()
        .all(|t| Command::new("which").arg(t).output().is_ok_and(|o| o.status.success()));
    (path.exists() && root && tools).then_some(path)
}

/// linkem makes one pair of namespaces: the tests take turns.
static LINK_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Link(PathBuf);

impl Link {
    fn up(linkem: PathBuf, args: &[&str]) -> Link {
        let status = Command::new("bash")
            .arg(&linkem)
            .arg("up")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "linkem up failed");
        Link(linkem)
    }
    fn exec(&self, side: &str) -> Command {
        let mut c = Command::new("bash");
        c.arg(&self.0).arg("exec").arg(side);
        c
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(&self.0)
            .arg("down")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn files_cross_a_lossy_link_verified() {
    cross(&["--delay", "5", "--rate", "200", "--loss", "0.5"], 6 << 20);
}

/// 100 ms round trip, 2 % loss each way: delivery and verification, not speed.
#[test]
fn files_cross_a_long_link_with_two_percent_loss_verified() {
    cross(&["--delay", "50", "--rate", "1000", "--loss", "2"], 8 << 20);
}

/// Pushes a large file of `big` bytes and 50 small ones across a link made with
/// `link_args`; they must arrive whole and verified.
fn cross(link_args: &[&str], big: usize) {
    let Some(linkem) = linkem() else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true: the lossy-link tests need root, linkem, iptables and gcc");
        }
        eprintln!("skipping: needs root, ../shared/tools/linkem, iptables and gcc");
        return;
    };
    let _one_link = LINK_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let t = tempfile::tempdir().unwrap();
    let p = t.path();
    let barge = env!("CARGO_BIN_EXE_barge");
    let run = |args: &[&str]| {
        assert!(Command::new(barge)
            .args(args)
            .current_dir(p)
            .status()
            .unwrap()
            .success())
    };
    run(&["certs", "init", "--dir", "c"]);
    run(&["certs", "issue", "b", "--dir", "c"]);
    run(&["certs", "issue", "a", "--dir", "c"]);
    std::fs::create_dir(p.join("in")).unwrap();
    write(&p.join("src/big"), &content(1, big));
    for i in 0..50u64 {
        write(
            &p.join(format!("src/small/{i}")),
            &content(10 + i, 1000 + i as usize * 77),
        );
    }
    std::fs::write(
        p.join("b.toml"),
        "listen = \"10.251.0.2:7878\"\n[tls]\nca = \"c/ca.pem\"\ncert = \"c/b.pem\"\nkey = \"c/b.key\"\n\
         [[import]]\nname = \"in\"\npath = \"in\"\nallow = [\"a\"]\n",
    )
    .unwrap();
    let link = Link::up(linkem, link_args);
    let mut agent = link
        .exec("b")
        .args([barge, "agent", "--config", "b.toml"])
        .current_dir(p)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(800));
    let out = link
        .exec("a")
        .args([
            barge,
            "push",
            "src",
            "--to",
            "b@10.251.0.2:7878",
            "--import",
            "in",
            "--certs",
            "c",
            "--identity",
            "a",
        ])
        .args(["--hash-cache", "off"])
        .current_dir(p)
        .output()
        .unwrap();
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        out.status.success(),
        "push failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(&p.join("src"), &p.join("in/src"));
}
