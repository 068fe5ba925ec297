//! Region-aligned SST shipping against real RocksDB files and a real RocksDB: SSTs
//! written by `ldb write_extern_sst` in three regions (several compressions, binary
//! keys, keys with long shared prefixes), listed and pulled by key range from agent A,
//! pushed by range to agent B whose exec hook ingests them with `ldb
//! ingest_extern_sst --move_files`; `ldb scan` on B must return exactly region 2.

mod common;

use barge::agent::{Agent, Hooks};
use barge::client::{Peer, PushOptions};
use barge::config::Config;
use barge::proto::keys::{Key, KeyRange};
use barge::proto::wire::code;
use barge::transfer::TransferError;
use common::ldb::{have_ldb, hex, Pairs};
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};

/// Writes `pairs` (sorted here) as an SST file with RocksDB's own writer.
fn write_sst(path: &Path, compression: &str, mut pairs: Pairs) {
    pairs.sort();
    let input: String = pairs
        .iter()
        .map(|(k, v)| format!("0x{} ==> 0x{}\n", hex(k), hex(v)))
        .collect();
    let scratch = path.with_extension("ldb-scratch");
    let mut child = Command::new("ldb")
        .arg(format!("--db={}", scratch.display()))
        .args(["--create_if_missing", "--key_hex", "--value_hex"])
        .arg(format!("--compression_type={compression}"))
        .arg("write_extern_sst")
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "ldb write_extern_sst failed");
    std::fs::remove_dir_all(scratch).unwrap();
}

fn pairs(n: usize, key: impl Fn(usize) -> Vec<u8>) -> Pairs {
    (0..n).map(|i| (key(i), content(i as u64, 100))).collect()
}

/// The three regions: [.., k), [k, t), [t, ..). Returns region 2's pairs.
fn make_regions(dir: &Path) -> Pairs {
    let long = |i: usize| {
        let mut k = b"k".to_vec();
        k.extend(std::iter::repeat_n(b'x', 200));
        k.extend(format!("{i:05}").bytes());
        k
    };
    let binary = |i: usize| vec![b'm', 0x00, 0xff, (i / 256) as u8, (i % 256) as u8];
    let r2 = [
        ("000012.sst", "lz4", pairs(3000, long)),
        ("000013.sst", "zstd", pairs(500, binary)),
        ("000014.sst", "snappy", pairs(50, |i| format!("p{i:03}").into_bytes())),
    ];
    write_sst(
        &dir.join("000011.sst"),
        "zlib",
        pairs(300, |i| format!("apple{i:04}").into_bytes()),
    );
    write_sst(&dir.join("000015.sst"), "no", pairs(40, |i| vec![b't', i as u8, 0]));
    write_sst(
        &dir.join("000016.sst"),
        "zstd",
        pairs(20, |i| vec![0xff, 0xfe, i as u8]),
    );
    std::fs::write(dir.join("MANIFEST-000001"), b"not a table").unwrap();
    let mut all = vec![];
    for (name, compression, p) in r2 {
        write_sst(&dir.join(name), compression, p.clone());
        all.extend(p);
    }
    all.sort();
    all
}

const REGION2: &str = "k..t";

/// Agent A exports `ssts` (kind sst); agent B imports `rocks` through `ldb ingest`.
async fn two_hosts() -> (Env, Agent, Peer) {
    let a_targets = "[[export]]\nname = \"ssts\"\npath = \"outbox\"\nkind = \"sst\"\nallow = [\"client\"]\n\
[[export]]\nname = \"plain\"\npath = \"src\"\nallow = [\"client\"]\n";
    let env = env_with(a_targets, "", Hooks::new()).await;
    let b = env.root().join("host-b");
    std::fs::create_dir_all(b.join("ingest")).unwrap();
    let script = "cat > \"$BARGE_TARGET_DIR/../job.json\"; \
        for f; do ldb --db=\"$BARGE_TARGET_DIR/../db\" --create_if_missing ingest_extern_sst \"$f\" --move_files >&2 || exit 1; done; \
        echo ingested $#";
    let b_config = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"state\"\n[tls]\nca = \"../certs/ca.pem\"\ncert = \"../certs/agent.pem\"\nkey = \"../certs/agent.key\"\n\
[[import]]\nname = \"rocks\"\npath = \"ingest\"\nallow = [\"client\"]\nhook = \"exec\"\nexec = [\"sh\", \"-c\", {script:?}, \"ingest\"]\n"
    );
    std::fs::write(b.join("agent.toml"), b_config).unwrap();
    let agent_b = Agent::start(Config::load(&b.join("agent.toml")).unwrap())
        .await
        .unwrap();
    let peer_b = format!("agent@{}", agent_b.local_addr()).parse().unwrap();
    (env, agent_b, peer_b)
}

fn scan(db: &Path) -> Pairs {
    let out = Command::new("ldb")
        .arg(format!("--db={}", db.display()))
        .args(["--hex", "scan"])
        .output()
        .unwrap();
    assert!(out.status.success(), "ldb scan failed");
    let unhex = |s: &str| {
        Key::parse(&format!("0x{}", s.trim().trim_start_matches("0x").to_lowercase()))
            .unwrap()
            .0
    };
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(" : ").expect("KEY : VALUE");
            (unhex(k), unhex(v))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_two_is_listed_pulled_and_ingested_into_rocksdb_exactly() {
    if !have_ldb() {
        return;
    }
    let (env, agent_b, peer_b) = two_hosts().await;
    let want = make_regions(&env.outbox());
    let client = env.client("client");
    let range = KeyRange::parse(REGION2).unwrap();

    let all = client.list(&env.peer(), "ssts", None).await.unwrap();
    let names: Vec<&str> = all.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        names,
        [
            "000011.sst",
            "000012.sst",
            "000013.sst",
            "000014.sst",
            "000015.sst",
            "000016.sst"
        ]
    );
    let listed = client.list(&env.peer(), "ssts", Some(&range)).await.unwrap();
    let names: Vec<&str> = listed.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(names, ["000012.sst", "000013.sst", "000014.sst"]);
    let spans: Vec<_> = listed
        .iter()
        .map(|f| f.keys.clone().expect("an SST has keys"))
        .collect();
    assert_eq!(
        spans[0].smallest.0, want[0].0,
        "long-prefix file starts at region 2's first key"
    );
    assert_eq!(spans[1].smallest.0, [b'm', 0, 0xff, 0, 0]);
    assert_eq!(spans[1].largest.0, [b'm', 0, 0xff, 1, 243]);
    assert_eq!(spans[2].largest.0, want.last().unwrap().0);
    for f in &listed {
        let bytes = std::fs::read(env.outbox().join(&f.path)).unwrap();
        assert_eq!(f.root, *blake3::hash(&bytes).as_bytes(), "{}", f.path);
    }

    // Pull region 2 into a folder: exactly its files, byte for byte.
    let into = env.root().join("pulled");
    client.pull_range(&env.peer(), "ssts", &range, &into).await.unwrap();
    assert_eq!(list(&into), ["000012.sst", "000013.sst", "000014.sst"]);
    for n in list(&into) {
        assert_eq!(
            std::fs::read(into.join(&n)).unwrap(),
            std::fs::read(env.outbox().join(&n)).unwrap()
        );
    }

    // Push region 2 from host A's folder to host B, ingested by RocksDB there.
    let opts = PushOptions {
        range: Some(range),
        ..Default::default()
    };
    let r = client.push(&peer_b, "rocks", &[env.outbox()], &opts).await.unwrap();
    assert_eq!((r.files, r.report.as_str()), (3, "ingested 3"));
    let host_b = env.root().join("host-b");
    assert_eq!(scan(&host_b.join("db")), want, "B holds exactly region 2");
    let job: serde_json::Value = serde_json::from_slice(&std::fs::read(host_b.join("job.json")).unwrap()).unwrap();
    assert_eq!(job["files"][2]["name"], "outbox/000014.sst");
    assert_eq!(job["files"][2]["keys"]["smallest"], hex(b"p000").to_lowercase());
    assert_eq!(job["files"][2]["keys"]["largest"], hex(b"p049").to_lowercase());
    agent_b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_that_cuts_through_a_file_is_refused_naming_file_and_key() {
    if !have_ldb() {
        return;
    }
    let (env, agent_b, peer_b) = two_hosts().await;
    make_regions(&env.outbox());
    let client = env.client("client");
    let cut = KeyRange::parse("k..p010").unwrap();
    let into = env.root().join("pulled");
    let err = client.pull_range(&env.peer(), "ssts", &cut, &into).await.unwrap_err();
    let TransferError::Rejected(r) = &err else {
        panic!("refused before any data: {err}");
    };
    assert_eq!(r.code, code::NOT_ALIGNED);
    assert!(
        r.reason.contains("000014.sst") && r.reason.contains("p010"),
        "{}",
        r.reason
    );
    assert!(list(&into).is_empty(), "nothing pulled");
    let err = client.list(&env.peer(), "ssts", Some(&cut)).await.unwrap_err();
    assert!(
        matches!(&err, TransferError::Rejected(r) if r.code == code::NOT_ALIGNED),
        "{err}"
    );

    // The push side refuses the same range before sending anything.
    let opts = PushOptions {
        range: Some(KeyRange::parse("0x6d00ff0100..t").unwrap()),
        ..Default::default()
    };
    let err = client.push(&peer_b, "rocks", &[env.outbox()], &opts).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("not aligned") && msg.contains("000013.sst") && msg.contains("0x6d00ff0100"),
        "{msg}"
    );
    assert!(!env.root().join("host-b/db").exists(), "nothing ingested");

    // A key range means nothing to an export of plain files.
    let err = client
        .list(&env.peer(), "plain", Some(&KeyRange::parse("a..b").unwrap()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not of kind \"sst\""), "{err}");
    agent_b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_and_pulls_by_range_with_documented_exit_codes() {
    if !have_ldb() {
        return;
    }
    let (env, agent_b, _) = two_hosts().await;
    make_regions(&env.outbox());
    let peer = env.peer().to_string();
    let root = env.root().to_path_buf();
    let barge = move |args: Vec<String>| {
        let root = root.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                Command::new(env!("CARGO_BIN_EXE_barge"))
                    .args(&args)
                    .args(["--certs", "certs", "--identity", "client", "--hash-cache", "off"])
                    .current_dir(root)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let out = barge(args(&["ls", &peer, "--export", "ssts", "--range", REGION2, "--json"])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["path"], "000014.sst");
    assert_eq!(lines[2]["keys"]["smallest"], hex(b"p000").to_lowercase());
    let out = barge(args(&["ls", &peer, "--export", "ssts"])).await;
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("000013.sst") && table.contains("0x6d00ff0000..=0x6d00ff01f3"),
        "{table}"
    );

    let out = barge(args(&[
        "pull", &peer, "--export", "ssts", "--range", "k..p010", "--into", "got",
    ]))
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("region not aligned") && err.contains("000014.sst"),
        "{err}"
    );
    let out = barge(args(&[
        "pull", &peer, "--export", "ssts", "--range", "t..k", "--into", "got",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2), "an empty range is a usage error");
    let out = barge(args(&[
        "pull", &peer, "--export", "ssts", "--range", "t..", "--into", "got",
    ]))
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(list(&env.root().join("got")), ["000015.sst", "000016.sst"]);
    agent_b.shutdown().await;
}
