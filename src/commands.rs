//! What each command does, with `anyhow` context for the one line a failure prints.

use crate::cli::{AgentArgs, CertsCommand, Command, HashArgs, IdentityArgs, PullArgs, PushArgs};
use anyhow::{bail, Context, Result};
use barge::agent::Agent;
use barge::client::{Client, Peer, PushOptions};
use barge::config::Config;
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
        return match t {
            TransferError::Connect { .. } | TransferError::Connection(_) => 4,
            TransferError::Rejected(_) => 5,
            TransferError::Failed(_) | TransferError::Job(_) | TransferError::Interrupted(_) => 6,
            TransferError::Source(_) | TransferError::Io { .. } | TransferError::SourceChanged(_) => 1,
            TransferError::Tls(_) => 3,
            _ => 6,
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

async fn push(p: PushArgs) -> Result<()> {
    let peer: Peer = p.to.parse().map_err(usage)?;
    let opts = PushOptions {
        meta: parse_meta(&p.meta)?,
        tcp_lane: p.tcp_lane,
        connections: p.connections as usize,
        ..Default::default()
    };
    let client = client(&p.id)?;
    let started = std::time::Instant::now();
    let r = client
        .push(&peer, &p.import, &p.paths, &opts)
        .await
        .with_context(|| format!("push to {peer} ({})", p.import))?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "committed {} files, {} bytes to {}:{} in {:.2}s ({:.1} MB/s); sent {} blocks, {} already there",
        r.files,
        r.bytes_total,
        peer.name,
        p.import,
        secs,
        r.bytes_sent as f64 / secs / 1e6,
        r.blocks_sent,
        r.blocks_held
    );
    if !r.report.is_empty() {
        println!("import hook: {}", r.report);
    }
    Ok(())
}

async fn pull(p: PullArgs) -> Result<()> {
    let peer: Peer = p.peer.parse().map_err(usage)?;
    let client = client(&p.id)?;
    let started = std::time::Instant::now();
    let r = client
        .pull(&peer, &p.export, &p.files, &p.into)
        .await
        .with_context(|| format!("pull from {peer} ({})", p.export))?;
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
