//! `barge demo`: two agents on loopback, fresh certificates, a generated data set,
//! a push and a pull, and a check that every received file hashes like its source.

use crate::cli::DemoArgs;
use anyhow::{ensure, Context, Result};
use barge::agent::Agent;
use barge::client::{Client, Peer, PushOptions};
use barge::config::Config;
use barge::net::tls::TlsFiles;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub async fn run(args: DemoArgs) -> Result<()> {
    let tmp = tempfile_dir()?;
    let root = tmp.path.clone();
    println!("barge demo in {}", root.display());
    let certs = root.join("certs");
    barge::net::certs::init_ca(&certs)?;
    for name in ["store-a", "store-b", "operator"] {
        barge::net::certs::issue(&certs, name, &[])?;
    }
    println!("made a private CA and certificates for store-a, store-b and operator");
    let data = root.join("a-export/dataset");
    let (files, bytes) = generate(&data, args.size_mib << 20)?;
    println!(
        "generated {files} files, {:.0} MiB in {}",
        bytes as f64 / (1 << 20) as f64,
        data.display()
    );

    let a = start_agent(
        &root,
        "store-a",
        "[[export]]\nname = \"ssts\"\npath = \"a-export\"\nallow = [\"operator\"]\n",
    )
    .await?;
    let b = start_agent(
        &root,
        "store-b",
        "[[import]]\nname = \"ingest\"\npath = \"b-import\"\nallow = [\"operator\"]\n",
    )
    .await?;
    println!(
        "agents: store-a on {} (export ssts), store-b on {} (import ingest)",
        a.local_addr(),
        b.local_addr()
    );

    let client = Client::new(&TlsFiles::in_dir(&certs, "operator"))?;
    let peer_b: Peer = format!("store-b@{}", b.local_addr()).parse()?;
    let t = Instant::now();
    let r = client
        .push(&peer_b, "ingest", std::slice::from_ref(&data), &PushOptions::default())
        .await
        .context("push to store-b")?;
    report("push  -> store-b:ingest", r.files, r.bytes_total, t);
    let n = compare(&data, &root.join("b-import/dataset"))?;
    println!("        every one of {n} files on store-b has the source's blake3 root");

    let peer_a: Peer = format!("store-a@{}", a.local_addr()).parse()?;
    let into = root.join("pulled");
    let t = Instant::now();
    let r = client
        .pull(&peer_a, "ssts", &[], &into)
        .await
        .context("pull from store-a")?;
    report("pull  <- store-a:ssts ", r.files, r.bytes, t);
    let n = compare(&data, &into.join("dataset"))?;
    println!("        every one of {n} pulled files has the source's blake3 root");

    a.shutdown().await;
    b.shutdown().await;
    if args.keep {
        tmp.keep();
        println!("kept {}", root.display());
    }
    println!("demo OK");
    Ok(())
}

fn report(what: &str, files: usize, bytes: u64, t: Instant) {
    let s = t.elapsed().as_secs_f64();
    println!(
        "{what}: {files} files, {:.0} MiB in {s:.2}s = {:.0} MB/s, {:.0} files/s, committed",
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / s / 1e6,
        files as f64 / s
    );
}

async fn start_agent(root: &Path, name: &str, targets: &str) -> Result<Agent> {
    for d in ["a-export", "b-import"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let text = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{name}-data\"\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/{name}.pem\"\nkey = \"certs/{name}.key\"\n{targets}"
    );
    let path = root.join(format!("{name}.toml"));
    std::fs::write(&path, text)?;
    Ok(Agent::start(Config::load(&path)?).await?)
}

/// A few large files, some medium, many small; contents from blake3's XOF.
fn generate(dir: &Path, total: u64) -> Result<(usize, u64)> {
    let mut sizes = Vec::new();
    let large = total * 6 / 10;
    sizes.extend([large / 2, large / 2 + 12345]);
    sizes.extend(std::iter::repeat_n(
        (4 << 20) + 17,
        (total * 25 / 100 / (4 << 20)) as usize,
    ));
    let small_total = total.saturating_sub(sizes.iter().sum());
    sizes.extend((0..(small_total / (16 << 10)).min(4000)).map(|i| 1 + (i * 7919) % (32 << 10)));
    let mut bytes = 0;
    for (i, size) in sizes.iter().enumerate() {
        let sub = match i {
            0 | 1 => "large".to_string(),
            i if *size > (1 << 20) => format!("medium/{i:03}"),
            i => format!("small/{:02}", i % 16),
        };
        let path = dir.join(format!("{sub}.{i}.sst"));
        std::fs::create_dir_all(path.parent().expect("parent"))?;
        let mut buf = vec![0u8; *size as usize];
        blake3::Hasher::new()
            .update(&i.to_le_bytes())
            .finalize_xof()
            .fill(&mut buf);
        std::fs::write(&path, &buf)?;
        bytes += size;
    }
    Ok((sizes.len(), bytes))
}

fn compare(src: &Path, dst: &Path) -> Result<usize> {
    let files = barge::store::source::collect_push(&[src.to_path_buf()])?;
    for f in &files {
        let rel: PathBuf = f.name.as_str().split('/').skip(1).collect();
        let got = std::fs::read(dst.join(&rel)).with_context(|| format!("{}", dst.join(&rel).display()))?;
        let want = std::fs::read(&f.path)?;
        ensure!(
            blake3::hash(&got) == blake3::hash(&want),
            "{} differs from its source",
            rel.display()
        );
    }
    Ok(files.len())
}

struct TempDir {
    path: PathBuf,
    keep: bool,
}

fn tempfile_dir() -> Result<TempDir> {
    let path = std::env::temp_dir().join(format!("barge-demo-{}", std::process::id()));
    std::fs::create_dir_all(&path)?;
    Ok(TempDir { path, keep: false })
}

impl TempDir {
    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
