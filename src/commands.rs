//! What each command does, with `anyhow` context for the one line a failure prints.

use crate::cli::{
    AgentArgs, CertsCommand, Command, HashArgs, IdentityArgs, JobArgs, LsArgs, PeerArgs, PullArgs, PushArgs,
    ZdbCloneArgs, ZdbHookArgs,
};
use anyhow::{bail, Context, Result};
use barge::agent::Agent;
use barge::client::{Client, Peer, PushOptions};
use barge::config::Config;
use barge::proto::keys::KeyRange;
use barge::tls::TlsFiles;
use barge::transfer::TransferError;
use std::path::PathBuf;

pub fn init_logging(cmd: &Command) {
    let default = match cmd {
        Command::Agent(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Certs(c) => certs(c),
        Command::Hash(h) => hash(h),
        Command::Agent(a) => runtime()?.block_on(agent(a)),
        Command::Push(p) => runtime()?.block_on(push(p)),
        Command::Pull(p) => runtime()?.block_on(pull(p)),
        Command::Ls(l) => runtime()?.block_on(ls(l)),
        Command::Jobs(j) => runtime()?.block_on(jobs(j)),
        Command::Commit(j) => runtime()?.block_on(job_op(j, true)),
        Command::Abort(j) => runtime()?.block_on(job_op(j, false)),
        Command::ZdbHook(z) => runtime()?.block_on(zdb_hook(z)),
        Command::ZdbClone(z) => runtime()?.block_on(zdb_clone(z)),
        Command::Demo(d) => runtime()?.block_on(crate::demo::run(d)),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// A command-line value that does not parse (exit code 2, like clap's own errors).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

fn usage(e: impl std::fmt::Display) -> UsageError {
    UsageError(e.to_string())
}

/// Exit code for a failure; see `--help`.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<UsageError>().is_some() {
        return 2;
    }
    if let Some(t) = e.downcast_ref::<TransferError>() {
        return transfer_code(t);
    }
    if let Some(z) = e.downcast_ref::<barge::zdb::ZdbError>() {
        return match z {
            barge::zdb::ZdbError::Transfer(t) => transfer_code(t),
            barge::zdb::ZdbError::Config { .. } => 3,
            _ => 1,
        };
    }
    if e.downcast_ref::<barge::config::ConfigError>().is_some()
        || e.downcast_ref::<barge::certs::CertError>().is_some()
        || e.downcast_ref::<barge::tls::TlsError>().is_some()
        || e.downcast_ref::<barge::agent::AgentError>().is_some()
    {
        return 3;
    }
    1
}

fn transfer_code(t: &TransferError) -> u8 {
    match t {
        TransferError::Connect { .. } | TransferError::Connection(_) => 4,
        TransferError::Rejected(_) => 5,
        TransferError::Failed(_) | TransferError::Job(_) | TransferError::Interrupted(_) => 6,
        TransferError::Source(_) | TransferError::Io { .. } | TransferError::SourceChanged(_) => 1,
        TransferError::Tls(_) => 3,
        _ => 6,
    }
}

fn certs(c: CertsCommand) -> Result<()> {
    match c {
        CertsCommand::Init { dir } => {
            barge::certs::init_ca(&dir)?;
            println!(
                "made CA {} and {} (keep the key private)",
                dir.join("ca.pem").display(),
                dir.join("ca.key").display()
            );
        }
        CertsCommand::Issue { name, dir, sans } => {
            barge::certs::issue(&dir, &name, &sans)?;
            let (cert, key) = barge::certs::host_paths(&dir, &name);
            println!("issued {} and {} for identity {name}", cert.display(), key.display());
        }
    }
    Ok(())
}

fn hash(h: HashArgs) -> Result<()> {
    for f in &h.files {
        let size = std::fs::metadata(f).with_context(|| format!("{}", f.display()))?.len();
        let hashes = barge::source::hash_file(f, size)?;
        println!("{}  {}", barge::proto::blocks::hex(&hashes.root), f.display());
    }
    Ok(())
}

async fn agent(a: AgentArgs) -> Result<()> {
    let config = match &a.config {
        Some(path) => Config::load(path)?,
        None => local_default(&a.data)?,
    };
    let agent = Agent::start(config).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    agent.shutdown().await;
    Ok(())
}

fn local_default(data: &std::path::Path) -> Result<Config> {
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let data = data.canonicalize()?;
    let (config, made) = Config::local_default(&data)?;
    if made {
        tracing::info!(certs = %data.join("certs").display(), "no --config: made development certificates (CA, localhost, client)");
    }
    tracing::info!(
        data = %data.display(),
        "no --config: local default; import target `inbox`, export `outbox`, any peer of the dev CA allowed"
    );
    Ok(config)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn client(id: &IdentityArgs) -> Result<Client> {
    let dir = id.certs.clone().unwrap_or_else(|| PathBuf::from("barge-data/certs"));
    let name = id.identity.clone().unwrap_or_else(|| "client".to_string());
    if !dir.join("ca.pem").exists() {
        bail!(barge::tls::TlsError::Empty {
            path: dir.join("ca.pem"),
            what: "CA certificate (set --certs DIR or BARGE_CERTS)"
        });
    }
    let mut tuning = barge::quic::Tuning::default();
    if let Some(cc) = &id.congestion {
        tuning.congestion = cc.parse().map_err(|e| usage(format!("--congestion: {e}")))?;
    }
    let mut client = Client::with_tuning(&TlsFiles::in_dir(&dir, &name), &tuning)?;
    let cache_path = match id.hash_cache.as_deref() {
        Some("off") => None,
        Some(p) => Some(PathBuf::from(p)),
        None => barge::hashcache::HashCache::default_path(),
    };
    if let Some(path) = cache_path {
        match barge::hashcache::HashCache::open(&path) {
            Ok(cache) => client.set_hash_cache(std::sync::Arc::new(cache)),
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "hash cache not used"),
        }
    }
    Ok(client)
}

fn parse_meta(meta: &[String]) -> Result<Vec<(String, String)>> {
    meta.iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(usage(format!("--meta {kv:?} is not KEY=VALUE")).into()),
        })
        .collect()
}

fn parse_range(range: Option<&str>) -> Result<Option<KeyRange>> {
    let parse = |r: &str| KeyRange::parse(r).map_err(|e| usage(format!("--range: {e}")));
    Ok(range.map(parse).transpose()?)
}

async fn push(p: PushArgs) -> Result<()> {
    let peer: Peer = p.to.parse().map_err(usage)?;
    let opts = PushOptions {
        meta: parse_meta(&p.meta)?,
        tcp_lane: p.tcp_lane,
        connections: p.connections as usize,
        hold: p.hold,
        sst: p.sst,
        range: parse_range(p.range.as_deref())?,
        ..Default::default()
    };
    let client = client(&p.id)?;
    let started = std::time::Instant::now();
    let r = client
        .push(&peer, &p.import, &p.paths, &opts)
        .await
        .with_context(|| format!("push to {peer} ({})", p.import))?;
    let secs = started.elapsed().as_secs_f64();
    let verb = if r.held { "staged and held" } else { "committed" };
    println!(
        "{verb} {} files, {} bytes to {}:{} in {:.2}s ({:.1} MB/s); sent {} blocks, {} already there",
        r.files,
        r.bytes_total,
        peer.name,
        p.import,
        secs,
        r.bytes_sent as f64 / secs / 1e6,
        r.blocks_sent,
        r.blocks_held
    );
    match r.held {
        true => println!(
            "held as job {} until `barge commit {} {0}` or `barge abort {1} {0}`",
            r.job, p.to
        ),
        false if !r.report.is_empty() => println!("import hook: {}", r.report),
        false => {}
    }
    Ok(())
}

async fn pull(p: PullArgs) -> Result<()> {
    let peer: Peer = p.peer.parse().map_err(usage)?;
    let client = client(&p.id)?;
    let started = std::time::Instant::now();
    let r = match parse_range(p.range.as_deref())? {
        Some(range) => client.pull_range(&peer, &p.export, &range, &p.into).await,
        None => client.pull(&peer, &p.export, &p.files, &p.into).await,
    };
    let r = r.with_context(|| format!("pull from {peer} ({})", p.export))?;
    println!(
        "pulled {} files, {} bytes into {} in {:.2}s; received {} blocks, {} already there",
        r.files,
        r.bytes,
        p.into.display(),
        started.elapsed().as_secs_f64(),
        r.blocks_received,
        r.blocks_resumed
    );
    Ok(())
}

async fn ls(l: LsArgs) -> Result<()> {
    let peer: Peer = l.peer.parse().map_err(usage)?;
    let range = parse_range(l.range.as_deref())?;
    let client = client(&l.id)?;
    let files = client
        .list(&peer, &l.export, range.as_ref())
        .await
        .with_context(|| format!("listing {peer} ({})", l.export))?;
    for f in files {
        let hash = barge::proto::blocks::hex(&f.root);
        if l.json {
            let keys = f
                .keys
                .as_ref()
                .map(|k| serde_json::json!({"smallest": k.smallest.hex(), "largest": k.largest.hex()}));
            let line = serde_json::json!({"path": f.path, "size": f.size, "blake3": hash, "keys": keys});
            println!("{line}");
        } else {
            let keys = f.keys.map_or_else(|| "-".to_string(), |k| k.to_string());
            println!("{:>12}  {hash}  {}  {keys}", f.size, f.path);
        }
    }
    Ok(())
}

async fn jobs(j: PeerArgs) -> Result<()> {
    let peer: Peer = j.peer.parse().map_err(usage)?;
    let client = client(&j.id)?;
    let jobs = client.jobs(&peer).await.with_context(|| format!("jobs on {peer}"))?;
    println!(
        "{:<32}  {:<9}  {:<16}  {:>6}  {:>14}  {:>14}  {:>7}  PEER",
        "JOB", "STATE", "TARGET", "FILES", "BYTES", "DONE", "AGE(s)"
    );
    for j in jobs {
        println!(
            "{:<32}  {:<9}  {:<16}  {:>6}  {:>14}  {:>14}  {:>7}  {}",
            j.id.to_string(),
            j.state,
            j.target,
            j.files,
            j.bytes,
            j.done,
            j.age_secs,
            j.peer
        );
    }
    Ok(())
}

async fn job_op(j: JobArgs, commit: bool) -> Result<()> {
    let peer: Peer = j.peer.parse().map_err(usage)?;
    let job: barge::proto::wire::JobId = j.job.parse().map_err(usage)?;
    let client = client(&j.id)?;
    if commit {
        let report = client
            .commit(&peer, job)
            .await
            .with_context(|| format!("commit {job} on {peer}"))?;
        println!("committed job {job}");
        if !report.is_empty() {
            println!("import hook: {report}");
        }
    } else {
        client
            .abort(&peer, job)
            .await
            .with_context(|| format!("abort {job} on {peer}"))?;
        println!("aborted job {job}; its staged files are removed");
    }
    Ok(())
}

async fn zdb_hook(z: ZdbHookArgs) -> Result<()> {
    let hook = barge::zdb::Hook::parse(&z.args)?;
    if let barge::zdb::Hook::Ignored(name) = &hook {
        // Never let a missing config stop 0-db over a hook barge does not handle
        // (`ready` must exit 0 or 0-db will not start).
        tracing::debug!(hook = %name, "nothing to do");
        return Ok(());
    }
    let config = barge::zdb::ZdbConfig::load(&z.config)?;
    let line = barge::zdb::run_hook(&config, &hook).await?;
    println!("{line}");
    Ok(())
}

async fn zdb_clone(z: ZdbCloneArgs) -> Result<()> {
    let config = barge::zdb::ZdbConfig::load(&z.config)?;
    let r = barge::zdb::clone_namespace(&config, &z.namespace)
        .await
        .with_context(|| format!("clone of namespace {:?} to {}", z.namespace, config.peer))?;
    println!(
        "cloned namespace {}: {} data files and {} index files, {} bytes, verified, to {}",
        z.namespace, r.data_files, r.index_files, r.bytes, config.peer
    );
    Ok(())
}
