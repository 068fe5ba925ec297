//! What each command does, with `anyhow` context for the one line a failure prints.

use crate::cli::{
    AgentArgs, CertsCommand, Command, HashArgs, IdentityArgs, JobArgs, LsArgs, PeerArgs, PullArgs, PushArgs, ShipArgs,
    ZdbCloneArgs, ZdbHookArgs, ZdbSyncArgs,
};
use anyhow::{bail, Context, Result};
use barge::agent::systemd::{self, NotifyState};
use barge::agent::Agent;
use barge::client::{Client, Peer, PullOptions, PushOptions, Replica};
use barge::config::Config;
use barge::net::tls::TlsFiles;
use barge::proto::keys::KeyRange;
use barge::proto::wire::{ReplicaOutcome, ReplicaResult};
use barge::transfer::TransferError;
use std::path::PathBuf;

/// `println!` that ends the process quietly when stdout is closed (`barge ls ... | head`),
/// as other Unix tools do, instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

pub fn init_logging(cmd: &Command) {
    let (default, json) = match cmd {
        Command::Agent(a) => ("info", a.log_format == crate::cli::LogFormat::Json),
        _ => ("warn", false),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: journald keeps escape codes as they are.
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match json {
        true => fmt.json().with_current_span(true).with_span_list(false).init(),
        false => fmt.init(),
    }
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Certs(c) => certs(c),
        Command::Hash(h) => hash(h),
        Command::Agent(a) => runtime(None)?.block_on(agent(a)),
        Command::Push(p) => runtime(Some(p.connections.max(1).into()))?.block_on(push(p)),
        Command::Pull(p) => runtime(Some(1))?.block_on(pull(p)),
        Command::Ship(s) => runtime(Some(1))?.block_on(ship(s)),
        Command::Ls(l) => runtime(Some(1))?.block_on(ls(l)),
        Command::Jobs(j) => runtime(Some(1))?.block_on(jobs(j)),
        Command::Status(j) => runtime(Some(1))?.block_on(status(j)),
        Command::Commit(j) => runtime(Some(1))?.block_on(job_op(j, true)),
        Command::Abort(j) => runtime(Some(1))?.block_on(job_op(j, false)),
        Command::ZdbHook(z) => runtime(Some(1))?.block_on(zdb_hook(z)),
        Command::ZdbClone(z) => runtime(Some(1))?.block_on(zdb_clone(z)),
        Command::ZdbSync(z) => runtime(Some(1))?.block_on(zdb_sync(z)),
        Command::Demo(d) => runtime(None)?.block_on(crate::cli::demo::run(d)),
        Command::GenerateDocs { out } => generate_docs(&out),
    }
}

/// The async runtime: `workers` threads, or one per core. A client command runs one
/// job, and its tasks (reads, lanes, the QUIC driver) bouncing between two threads cost
/// more than they gained: one thread per connection made 20,000 small files ~7 %
/// faster and left one 2 GiB file as fast (interleaved runs on 2 cores). The agent
/// and the demo, which serve many connections, keep one per core.
fn runtime(workers: Option<usize>) -> Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n);
    }
    b.enable_all().build().context("starting the async runtime")
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
    if let Some(z) = e.downcast_ref::<barge::engines::zdb::ZdbError>() {
        return match z {
            barge::engines::zdb::ZdbError::Transfer(t) => transfer_code(t),
            barge::engines::zdb::ZdbError::Config { .. } => 3,
            z if barge::engines::zdb::Hook::is_usage(z) => 2,
            _ => 1,
        };
    }
    if e.downcast_ref::<barge::config::ConfigError>().is_some()
        || e.downcast_ref::<barge::net::certs::CertError>().is_some()
        || e.downcast_ref::<barge::net::tls::TlsError>().is_some()
        || e.downcast_ref::<barge::agent::AgentError>().is_some()
    {
        return 3;
    }
    1
}

fn transfer_code(t: &TransferError) -> u8 {
    match t {
        TransferError::Connect { .. } | TransferError::Connection(_) | TransferError::Revoked { .. } => 4,
        TransferError::Rejected(_) => 5,
        TransferError::Failed(_) | TransferError::Job(_) | TransferError::Interrupted(_) | TransferError::Lost(_) => 6,
        TransferError::Source(_) | TransferError::Io { .. } | TransferError::SourceChanged(_) => 1,
        TransferError::Tls(_) => 3,
        _ => 6,
    }
}

fn certs(c: CertsCommand) -> Result<()> {
    match c {
        CertsCommand::Init { dir } => {
            barge::net::certs::init_ca(&dir)?;
            say!(
                "made CA {} and {} (keep the key private)",
                dir.join("ca.pem").display(),
                dir.join("ca.key").display()
            );
        }
        CertsCommand::Issue {
            name,
            dir,
            sans,
            days,
            replace,
        } => {
            let opts = barge::net::certs::IssueOptions { days, replace };
            barge::net::certs::issue_with(&dir, &name, &sans, opts)?;
            let (cert, key) = barge::net::certs::host_paths(&dir, &name);
            say!(
                "issued {} and {} for identity {name}, valid {days} days",
                cert.display(),
                key.display()
            );
        }
        CertsCommand::Revoke { name, dir, days } => {
            let serial = barge::net::certs::revoke(&dir, &name, days)?;
            say!(
                "revoked {name} (serial {serial}) in {}; reload the agents that use it",
                barge::net::certs::crl_path(&dir).display()
            );
        }
    }
    Ok(())
}

fn hash(h: HashArgs) -> Result<()> {
    for f in &h.files {
        let size = std::fs::metadata(f).with_context(|| format!("{}", f.display()))?.len();
        let hashes = barge::store::source::hash_file(f, size)?;
        say!("{}  {}", barge::proto::blocks::hex(&hashes.root), f.display());
    }
    Ok(())
}

async fn agent(a: AgentArgs) -> Result<()> {
    let config = match &a.config {
        Some(path) => Config::load(path)?,
        None => local_default(&a.data)?,
    };
    let drain = config.drain;
    let socket = systemd::activated_socket();
    if socket.is_some() {
        tracing::info!("listening on the socket systemd passed (the config's listen address is not used)");
    }
    let agent = Agent::start_on(config, Default::default(), socket).await?;
    let status = format!("listening on {}", agent.local_addr());
    systemd::notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    let watchdog = systemd::watchdog_interval().map(|every| {
        tokio::spawn(async move {
            loop {
                systemd::notify(&[NotifyState::Watchdog]);
                tokio::time::sleep(every).await;
            }
        })
    });
    serve_until_stopped(&agent, a.config.as_deref()).await;
    systemd::notify(&[NotifyState::Stopping]);
    tracing::info!(deadline_secs = drain.as_secs(), "stopping: draining running jobs");
    if let Some(w) = watchdog {
        w.abort();
    }
    agent.drain(drain).await;
    Ok(())
}

/// Reloads the config on SIGHUP until SIGTERM or Ctrl-C.
async fn serve_until_stopped(agent: &Agent, config: Option<&std::path::Path>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    let mut hup = signal(SignalKind::hangup()).expect("signal handler");
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = term.recv() => return,
            _ = hup.recv() => reload(agent, config),
        }
    }
}

fn reload(agent: &Agent, config: Option<&std::path::Path>) {
    let Some(path) = config else {
        tracing::warn!("SIGHUP: no --config to reload (the local default does not change)");
        return;
    };
    systemd::reloading();
    let result = Config::load(path)
        .map_err(anyhow::Error::from)
        .and_then(|c| Ok(agent.reload(c)?));
    match result {
        Ok(()) => tracing::info!(config = %path.display(), "reloaded"),
        Err(e) => {
            tracing::error!(config = %path.display(), error = %format!("{e:#}"), "reload refused; the running config stays")
        }
    }
    systemd::notify(&[NotifyState::Ready]);
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

fn client(id: &IdentityArgs) -> Result<Client> {
    let dir = id.certs.clone().unwrap_or_else(|| PathBuf::from("barge-data/certs"));
    let name = id.identity.clone().unwrap_or_else(|| "client".to_string());
    if !dir.join("ca.pem").exists() {
        bail!(barge::net::tls::TlsError::Empty {
            path: dir.join("ca.pem"),
            what: "CA certificate (set --certs DIR or BARGE_CERTS)"
        });
    }
    let mut tuning = barge::net::quic::Tuning::default();
    if let Some(cc) = &id.congestion {
        tuning.congestion = cc.parse().map_err(|e| usage(format!("--congestion: {e}")))?;
    }
    if let Some(mtu) = &id.max_mtu {
        tuning.max_mtu = match mtu.parse() {
            Ok(m @ 1200..=65_000) => m,
            _ => return Err(usage(format!("--max-mtu: {mtu} is not a size from 1200 to 65000")).into()),
        };
    }
    tuning.connect_timeout = seconds(
        "--connect-timeout",
        id.connect_timeout.as_deref(),
        tuning.connect_timeout,
    )?;
    tuning.idle_timeout = seconds("--idle-timeout", id.idle_timeout.as_deref(), tuning.idle_timeout)?;
    let mut client = Client::with_tuning(&TlsFiles::in_dir(&dir, &name), &tuning)?;
    let cache_path = match id.hash_cache.as_deref() {
        Some("off") => None,
        Some(p) => Some(PathBuf::from(p)),
        None => barge::store::hashcache::HashCache::default_path(),
    };
    if let Some(path) = cache_path {
        client.set_hash_cache(std::sync::Arc::new(barge::store::hashcache::HashCache::load(&path)));
    }
    Ok(client)
}

/// The man pages and shell completions, made from the same definitions as `--help`.
fn generate_docs(out: &std::path::Path) -> Result<()> {
    use clap::CommandFactory;
    let cmd = crate::cli::args::Cli::command();
    let (man, completions) = (out.join("man"), out.join("completions"));
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    clap_mangen::generate_to(cmd.clone(), &man).with_context(|| format!("writing {}", man.display()))?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        let written = clap_complete::generate_to(shell, &mut cmd.clone(), "barge", &completions);
        written.with_context(|| format!("writing {} completions", shell))?;
    }
    say!(
        "man pages in {}, completions in {}",
        man.display(),
        completions.display()
    );
    Ok(())
}

/// A number of seconds from 1 to 600 given for `flag`, or `default`.
fn seconds(flag: &str, value: Option<&str>, default: std::time::Duration) -> Result<std::time::Duration> {
    match value.map(str::parse::<u64>) {
        None => Ok(default),
        Some(Ok(s @ 1..=600)) => Ok(std::time::Duration::from_secs(s)),
        Some(_) => Err(usage(format!(
            "{flag}: {} is not a number of seconds from 1 to 600",
            value.unwrap_or("")
        ))
        .into()),
    }
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

/// The replicas of a push: each `--to`, with its `--import` (one for all, or
/// NAME=TARGET each).
fn replicas(to: &[String], import: &[String]) -> Result<Vec<Replica>> {
    let peers = to
        .iter()
        .map(|t| t.parse::<Peer>().map_err(usage))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = peers.iter().find(|p| !seen.insert(&p.name)) {
        return Err(usage(format!("--to {}: a replica may be named once", twice.name)).into());
    }
    if let [target] = import {
        if !target.contains('=') {
            let one = |peer: Peer| Replica {
                peer,
                target: target.clone(),
            };
            return Ok(peers.into_iter().map(one).collect());
        }
    }
    let mut named = std::collections::HashMap::new();
    for i in import {
        let (name, target) = i
            .split_once('=')
            .filter(|(n, t)| !n.is_empty() && !t.is_empty())
            .ok_or_else(|| usage(format!("--import {i:?}: with several, each is NAME=TARGET")))?;
        named.insert(name.to_string(), target.to_string());
    }
    let with_target = |peer: Peer| match named.remove(&peer.name) {
        Some(target) => Ok(Replica { peer, target }),
        None => Err(usage(format!("no --import NAME=TARGET for {}", peer.name))),
    };
    let list = peers.into_iter().map(with_target).collect::<Result<Vec<_>, _>>()?;
    if let Some(name) = named.keys().next() {
        return Err(usage(format!("--import {name}=...: no --to names {name}")).into());
    }
    Ok(list)
}

async fn push(p: PushArgs) -> Result<()> {
    let mut chain = replicas(&p.to, &p.import)?;
    if chain.len() > 1 {
        return push_chain(p, chain).await;
    }
    let Replica { peer, target } = chain.remove(0);
    // With the test-only `faults` feature PushOptions has one more field.
    #[allow(clippy::needless_update)]
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
    let r = with_progress(&client, client.push(&peer, &target, &p.paths, &opts)).await;
    client.close().await;
    let r = r.with_context(|| format!("push to {peer} ({target})"))?;
    let secs = started.elapsed().as_secs_f64();
    if p.json {
        let extra = serde_json::json!({
            "held": r.held,
            "report": r.report,
            "sent_bytes": r.bytes_sent,
            "sent_blocks": r.blocks_sent,
            "held_blocks": r.blocks_held,
            "lane": r.lane.as_str(),
        });
        print_json(r.job, r.files, r.bytes_total, secs, &r.hashes, extra);
        return Ok(());
    }
    let verb = if r.held { "staged and held" } else { "committed" };
    say!(
        "{verb} {} files, {} bytes to {}:{} in {:.2}s ({:.1} MB/s); sent {} blocks, {} already there",
        r.files,
        r.bytes_total,
        peer.name,
        target,
        secs,
        r.bytes_sent as f64 / secs / 1e6,
        r.blocks_sent,
        r.blocks_held
    );
    match r.held {
        true => say!(
            "held as job {} until `barge commit {} {0}` or `barge abort {1} {0}`",
            r.job,
            p.to[0]
        ),
        false if !r.report.is_empty() => say!("import hook: {}", r.report),
        false => {}
    }
    Ok(())
}

/// A push to several replicas, relayed: a line (or JSON entry) per replica.
async fn push_chain(p: PushArgs, chain: Vec<Replica>) -> Result<()> {
    #[allow(clippy::needless_update)]
    let opts = PushOptions {
        meta: parse_meta(&p.meta)?,
        hold: p.hold,
        sst: p.sst,
        range: parse_range(p.range.as_deref())?,
        ..Default::default()
    };
    if p.tcp_lane || p.connections > 1 {
        tracing::warn!("a relay chain sends on one QUIC connection: --tcp-lane and --connections are not used");
    }
    let client = client(&p.id)?;
    let started = std::time::Instant::now();
    let r = with_progress(&client, client.push_chain(&chain, &p.paths, &opts)).await;
    client.close().await;
    let r = r.context("push to the replicas")?;
    let secs = started.elapsed().as_secs_f64();
    report_replicas(&r.replicas, p.json, || {
        let f = &r.first;
        let extra = serde_json::json!({"sent_bytes": r.bytes_sent, "sent_blocks": r.blocks_sent});
        (f.job, f.files, f.bytes_total, secs, f.hashes.clone(), extra)
    });
    if !p.json {
        say!(
            "sent {} bytes for {} replicas of {} files, {} bytes, in {secs:.2}s",
            r.bytes_sent,
            r.replicas.len(),
            r.first.files,
            r.first.bytes_total
        );
    }
    replicas_failed(&r.replicas)
}

type JsonHead = (
    barge::proto::wire::JobId,
    usize,
    u64,
    f64,
    Vec<(String, barge::proto::blocks::Digest)>,
    serde_json::Value,
);

/// Prints how the job ended on each replica: a line each, or one JSON object whose
/// `replicas` lists them (with `head`'s fields).
fn report_replicas(list: &[ReplicaResult], json: bool, head: impl FnOnce() -> JsonHead) {
    if json {
        let (job, files, bytes, secs, hashes, mut extra) = head();
        let entries: Vec<_> = list.iter().map(replica_json).collect();
        extra["replicas"] = entries.into();
        print_json(job, files, bytes, secs, &hashes, extra);
        return;
    }
    for r in list {
        say!("{}: {} ({}): {}", r.peer, r.outcome.as_str(), r.target, r.text);
        if r.outcome == ReplicaOutcome::Held {
            say!(
                "  held as job {} until `barge commit {} {0}` or `barge abort`",
                r.job,
                r.peer
            );
        }
    }
}

fn replica_json(r: &ReplicaResult) -> serde_json::Value {
    let (report, error) = match r.outcome {
        ReplicaOutcome::Failed => (None, Some(&r.text)),
        _ => (Some(&r.text), None),
    };
    serde_json::json!({
        "peer": r.peer,
        "target": r.target,
        "outcome": r.outcome.as_str(),
        "job": r.job.to_string(),
        "report": report,
        "error": error,
        "code": r.code,
        "received_bytes": r.bytes,
    })
}

/// An error naming every replica that failed (exit 6).
fn replicas_failed(list: &[ReplicaResult]) -> Result<()> {
    match barge::client::replicas_failed(list) {
        None => Ok(()),
        Some(why) => Err(TransferError::Failed(why).into()),
    }
}

async fn ship(a: ShipArgs) -> Result<()> {
    let agent: Peer = a.peer.parse().map_err(usage)?;
    let chain = replicas(&a.to, &a.import)?;
    let ship = barge::proto::wire::Ship {
        export: a.export.clone(),
        files: a.files.clone(),
        range: parse_range(a.range.as_deref())?,
        to: chain
            .iter()
            .map(|r| barge::proto::wire::Hop {
                peer: r.peer.to_string(),
                target: r.target.clone(),
            })
            .collect(),
        hold: a.hold,
    };
    let client = client(&a.id)?;
    let started = std::time::Instant::now();
    let r = with_progress(&client, client.ship(&agent, ship)).await;
    client.close().await;
    let r = r.with_context(|| format!("ship from {agent} ({})", a.export))?;
    let secs = started.elapsed().as_secs_f64();
    let tally = client.tally();
    let total = tally.total.load(std::sync::atomic::Ordering::Relaxed);
    report_replicas(&r.replicas, a.json, || {
        let job = r.replicas.first().map(|x| x.job).unwrap_or_default();
        let extra = serde_json::json!({"from": agent.to_string(), "report": r.report});
        (job, 0, total, secs, vec![], extra)
    });
    if !a.json {
        say!("{}: {} ({total} bytes, {secs:.2}s)", agent.name, r.report);
    }
    replicas_failed(&r.replicas)
}

async fn pull(p: PullArgs) -> Result<()> {
    let peer: Peer = p.peer.parse().map_err(usage)?;
    let client = client(&p.id)?;
    let started = std::time::Instant::now();
    let range = parse_range(p.range.as_deref())?;
    let what = (p.files.as_slice(), range);
    let pull_opts = PullOptions {
        on_exists: p.on_exists,
        tcp_lane: p.tcp_lane,
    };
    let r = with_progress(&client, client.pull_into(&peer, &p.export, what, &p.into, pull_opts)).await;
    client.close().await;
    let r = r.with_context(|| format!("pull from {peer} ({})", p.export))?;
    if p.json {
        let secs = started.elapsed().as_secs_f64();
        let after = match &r.after_commit {
            None => serde_json::Value::Null,
            Some(Ok(report)) => serde_json::json!({"ok": true, "report": report}),
            Some(Err(why)) => serde_json::json!({"ok": false, "error": why}),
        };
        let extra = serde_json::json!({
            "into": p.into,
            "received_blocks": r.blocks_received,
            "files_there": r.files_there,
            "after_commit": after,
            "lane": r.lane.as_str(),
        });
        print_json(r.job, r.files, r.bytes, secs, &r.hashes, extra);
        return Ok(());
    }
    say!(
        "pulled {} files, {} bytes into {} in {:.2}s; received {} blocks, {} already there",
        r.files,
        r.bytes,
        p.into.display(),
        started.elapsed().as_secs_f64(),
        r.blocks_received,
        r.blocks_resumed
    );
    if r.files_there > 0 {
        say!(
            "{} files were in {} with the same content: not sent",
            r.files_there,
            p.into.display()
        );
    }
    match &r.after_commit {
        Some(Ok(report)) => say!("source: {report}"),
        // The pull committed; the source's own step after it did not.
        Some(Err(why)) => eprintln!("barge: warning: the pull committed, but on the source {why}"),
        None => {}
    }
    Ok(())
}

async fn ls(l: LsArgs) -> Result<()> {
    let peer: Peer = l.peer.parse().map_err(usage)?;
    let range = parse_range(l.range.as_deref())?;
    let client = client(&l.id)?;
    let files = client.list(&peer, &l.export, range.as_ref()).await;
    client.close().await;
    let files = files.with_context(|| format!("listing {peer} ({})", l.export))?;
    for f in files {
        let hash = barge::proto::blocks::hex(&f.root);
        if l.json {
            let keys = f
                .keys
                .as_ref()
                .map(|k| serde_json::json!({"smallest": k.smallest.hex(), "largest": k.largest.hex()}));
            let line = serde_json::json!({"path": f.path, "size": f.size, "blake3": hash, "keys": keys});
            say!("{line}");
        } else {
            let keys = f.keys.map_or_else(|| "-".to_string(), |k| k.to_string());
            say!("{:>12}  {hash}  {}  {keys}", f.size, f.path);
        }
    }
    Ok(())
}

async fn jobs(j: PeerArgs) -> Result<()> {
    let peer: Peer = j.peer.parse().map_err(usage)?;
    let client = client(&j.id)?;
    let jobs = client.jobs(&peer).await;
    client.close().await;
    let jobs = jobs.with_context(|| format!("jobs on {peer}"))?;
    say!(
        "{:<32}  {:<9}  {:<16}  {:>6}  {:>14}  {:>14}  {:>7}  PEER",
        "JOB",
        "STATE",
        "TARGET",
        "FILES",
        "BYTES",
        "DONE",
        "AGE(s)"
    );
    for j in jobs {
        say!(
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
    let (job, peers) = j.args.split_last().expect("clap asks for two at least");
    let job: barge::proto::wire::JobId = job.parse().map_err(usage)?;
    let peers = peers
        .iter()
        .map(|p| p.parse::<Peer>().map_err(usage))
        .collect::<Result<Vec<_>, _>>()?;
    let client = client(&j.id)?;
    if let [peer] = &peers[..] {
        let done = job_op_one(&client, peer, job, commit).await;
        client.close().await;
        return done;
    }
    let mut failed = vec![];
    for peer in &peers {
        if let Err(e) = job_op_one(&client, peer, job, commit).await {
            eprintln!("barge: {peer}: {e:#}");
            failed.push(peer.to_string());
        }
    }
    client.close().await;
    match failed.len() {
        0 => Ok(()),
        n => anyhow::bail!("{n} of {} agents failed: {}", peers.len(), failed.join(", ")),
    }
}

async fn job_op_one(client: &Client, peer: &Peer, job: barge::proto::wire::JobId, commit: bool) -> Result<()> {
    if commit {
        let report = client.commit(peer, job).await;
        let report = report.with_context(|| format!("commit {job} on {peer}"))?;
        say!("{}: committed job {job}", peer.name);
        if !report.is_empty() {
            say!("import hook: {report}");
        }
    } else {
        let done = client.abort(peer, job).await;
        done.with_context(|| format!("abort {job} on {peer}"))?;
        say!("{}: aborted job {job}; its staged files are removed", peer.name);
    }
    Ok(())
}

async fn zdb_hook(z: ZdbHookArgs) -> Result<()> {
    let hook = barge::engines::zdb::Hook::parse(&z.args)?;
    if let barge::engines::zdb::Hook::Ignored(name) = &hook {
        // Never let a missing config stop 0-db over a hook barge does not handle
        // (`ready` must exit 0 or 0-db will not start).
        tracing::debug!(hook = %name, "nothing to do");
        return Ok(());
    }
    let config = barge::engines::zdb::ZdbConfig::load(&z.config)?;
    match barge::engines::zdb::run_hook(&config, &hook).await? {
        barge::engines::zdb::Outcome::Done(line) => say!("{line}"),
        // The work is safe in the spool: exit 0 so 0-db goes on, and say why on stderr.
        barge::engines::zdb::Outcome::Spooled(line) => {
            eprintln!("barge: {line}");
        }
    }
    Ok(())
}

async fn zdb_sync(z: ZdbSyncArgs) -> Result<()> {
    let config = barge::engines::zdb::ZdbConfig::load(&z.config)?;
    let r = barge::engines::zdb::sync(&config)
        .await
        .with_context(|| format!("zdb-sync to {}", config.peer))?;
    say!(
        "synced to {}: {} spooled entries, {} sealed data files sent ({} already there), {} index files, {} bytes",
        config.peer,
        r.spooled,
        r.data_sent,
        r.data_present,
        r.index_files,
        r.bytes
    );
    Ok(())
}

async fn zdb_clone(z: ZdbCloneArgs) -> Result<()> {
    let config = barge::engines::zdb::ZdbConfig::load(&z.config)?;
    let r = barge::engines::zdb::clone_namespace(&config, &z.namespace)
        .await
        .with_context(|| format!("clone of namespace {:?} to {}", z.namespace, config.peer))?;
    say!(
        "cloned namespace {}: {} data files and {} index files, {} bytes, verified, to {}",
        z.namespace,
        r.data_files,
        r.index_files,
        r.bytes,
        config.peer
    );
    Ok(())
}

async fn status(j: PeerArgs) -> Result<()> {
    let peer: Peer = j.peer.parse().map_err(usage)?;
    let client = client(&j.id)?;
    let cert = client.peer_certificate(&peer).await;
    let jobs = client.jobs(&peer).await;
    client.close().await;
    let cert = cert.with_context(|| format!("status of {peer}"))?;
    let jobs = jobs.with_context(|| format!("status of {peer}"))?;
    let receiving: Vec<_> = jobs.iter().filter(|j| j.state == "receiving").collect();
    let held = jobs.len() - receiving.len();
    say!("{peer}: {} jobs receiving, {held} held", receiving.len());
    say!(
        "certificate: {}, serial {}, expires {} (in {} days)",
        cert.identity.as_deref().unwrap_or("?"),
        cert.serial,
        cert.expiry(),
        cert.expires_in().div_euclid(86_400)
    );
    for j in receiving {
        let pct = if j.bytes == 0 {
            100.0
        } else {
            j.done as f64 * 100.0 / j.bytes as f64
        };
        let rate = j.done as f64 / (j.age_secs.max(1)) as f64;
        let eta = match rate > 0.0 {
            true => format!("{:.0}s", (j.bytes - j.done) as f64 / rate),
            false => "-".into(),
        };
        say!(
            "{}  {} <- {}  {} files  {}/{} bytes ({pct:.1}%)  {:.1} MB/s  ETA {eta}",
            j.id,
            j.target,
            j.peer,
            j.files,
            j.done,
            j.bytes,
            rate / 1e6
        );
    }
    Ok(())
}

/// Runs `work`, with a progress bar on stderr if stderr is a terminal.
async fn with_progress<T>(client: &Client, work: impl std::future::Future<Output = T>) -> T {
    use std::io::IsTerminal;
    use std::sync::atomic::Ordering::Relaxed;
    if !std::io::stderr().is_terminal() {
        return work.await;
    }
    let bar = indicatif::ProgressBar::new(0);
    let style = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    )
    .expect("progress template")
    .progress_chars("=> ");
    bar.set_style(style);
    let (tally, shown) = (client.tally(), bar.clone());
    let ticker = tokio::spawn(async move {
        loop {
            shown.set_length(tally.total.load(Relaxed));
            shown.set_position(tally.done.load(Relaxed));
            shown.set_message(format!("{} files", tally.files.load(Relaxed)));
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    let out = work.await;
    ticker.abort();
    bar.finish_and_clear();
    out
}

/// The one JSON result of `push --json` and `pull --json`.
fn print_json(
    job: barge::proto::wire::JobId,
    files: usize,
    bytes: u64,
    secs: f64,
    hashes: &[(String, barge::proto::blocks::Digest)],
    extra: serde_json::Value,
) {
    let hashes: serde_json::Map<String, serde_json::Value> = hashes
        .iter()
        .map(|(name, root)| (name.clone(), barge::proto::blocks::hex(root).into()))
        .collect();
    let mut out = serde_json::json!({
        "job": job.to_string(),
        "files": files,
        "bytes": bytes,
        "seconds": (secs * 1000.0).round() / 1000.0,
        "hashes": hashes,
    });
    if let (Some(o), serde_json::Value::Object(e)) = (out.as_object_mut(), extra) {
        o.extend(e);
    }
    say!("{out}");
}
