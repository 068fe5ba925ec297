//! The sidecar agent: a QUIC endpoint that accepts pushes into its import targets and
//! serves pulls from its exports, each checked against the target's allow list.
//!
//! One task per connection (span `conn` with the peer's identity), one per job (span
//! `job`). Staged jobs that are never resumed are swept after `staging_ttl`; held jobs
//! (bulk loads) are journaled in `data_dir` and expire after `hold_ttl`.
//!
//! The targets, allow lists, hooks and limits live behind one lock and are swapped
//! whole on [`Agent::reload`]; a job takes what it needs when it starts, so a reload
//! never changes a job in flight. A reload also reads the certificates again (see
//! `certs`): rotation needs no restart. [`Agent::drain`] refuses new jobs (with a retry-after)
//! and waits for running ones before the endpoint closes.

mod certs;
mod conn;
mod control;
mod gate;
mod handover;
mod jobs;
mod pull;
mod push;
mod relay;
mod ship;
pub mod systemd;

use crate::config::{AllowList, Config, Export, HookSpec, Import};
use crate::engines::hook::{
    AfterCommitHook, AfterCommitJob, ExecHook, ExportedFile, ImportHook, MoveHook, ReplaceHook,
};
use crate::metrics::ratelimit::RateLimits;
use crate::metrics::{Gauges, Metrics, Outcome};
use crate::net::tcplane::LaneKind;
use crate::net::tls::{peer_identity, TlsError, TlsMaterial};
use crate::proto::job::ReceiveJob;
use crate::proto::path::RelPath;
use crate::proto::session::{self, Opening};
use crate::proto::wire::{code, JobId, Message, Offer, Refusal, WireCode};
use crate::store::commit::Ledger;
use crate::store::disk::Disk;
use crate::store::held::{Claim, Holds, Journal};
use crate::store::space::Reservation;
use crate::store::stage::{sweep_expired, Stage};
use crate::transfer::{self, JobTable, Received, TransferError};
use conn::accept_loop;
use handover::{drop_held, Handover};
use jobs::{ActiveGuard, ClaimGuard, JobSlot, Jobs, RETRY_BUSY};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tracing::{info, info_span, warn, Instrument};

/// Why an agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent's certificates could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The QUIC, TCP lane or metrics address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// io_uring could not be set up for the disk thread.
    #[error("io_uring: {0}")]
    Disk(std::io::Error),
    /// An import target has `hook = "custom"`, but no
    /// [`ImportHook`] was given for it.
    #[error("import target {0:?} has hook = \"custom\" but no ImportHook was registered for it")]
    MissingHook(String),
    /// The journal of held jobs could not be opened.
    #[error(transparent)]
    Journal(#[from] crate::store::held::HeldError),
    /// The commit ledger's folder could not be made.
    #[error(transparent)]
    Commits(#[from] crate::store::commit::CommitError),
    /// A reload changed a setting that needs a restart (named).
    #[error("{0} can not change on reload; restart the agent for it")]
    NeedsRestart(&'static str),
    /// A rotated certificate names another identity than the running one.
    #[error("the new certificate is for {now:?}, the agent is {was:?}; an identity changes only with a restart")]
    IdentityChanged {
        /// The running identity.
        was: String,
        /// The new certificate's.
        now: String,
    },
}

/// Import hooks registered by a program that embeds the agent, by target name.
pub type Hooks = HashMap<String, Arc<dyn ImportHook>>;

/// What a reload replaces: the configuration and the hooks built from it.
struct Live {
    config: Config,
    hooks: Hooks,
}

struct Shared {
    live: RwLock<Arc<Live>>,
    /// Hooks registered by the embedding program, to build `Live::hooks` again on reload.
    custom: Hooks,
    disk: Disk,
    /// Every job: running, being received, held.
    jobs: Jobs,
    draining: AtomicBool,
    metrics: Arc<Metrics>,
    limits: Arc<RateLimits>,
    cache: Arc<crate::store::hashcache::HashCache>,
    tcp: Option<crate::net::tcplane::TcpLanes>,
    /// The QUIC endpoint, whose server side a rotation replaces.
    endpoint: quinn::Endpoint,
    /// The certificates now (swapped whole by a rotation).
    tls: RwLock<Arc<certs::TlsNow>>,
    /// The journal of held jobs.
    journal: Journal,
    /// Intents of commits under way and outcomes of finished ones.
    commits: Arc<Ledger>,
    /// What admitted jobs have still to write, per file system.
    space: Arc<crate::store::space::Ledger>,
    /// Data streams open at once, shared by the connections that carry data.
    credit: Arc<crate::net::credit::Credit>,
    /// Connections, requests, jobs and large reads of each peer identity.
    peers: Arc<gate::Peers>,
    /// Refused connections and requests are logged, but not every one of a flood.
    refusal_log: gate::LogLimit,
    /// The agent's own client, for relays and ships (see `relay`).
    client: Mutex<Option<Arc<crate::client::Client>>>,
    /// Ships running now.
    ships: ship::Ships,
}

impl Shared {
    /// The configuration and hooks now; a job keeps the ones it started with.
    fn live(&self) -> Arc<Live> {
        self.live.read().expect("live config").clone()
    }

    fn config(&self) -> Config {
        self.live().config.clone()
    }
}

/// A running agent.
pub struct Agent {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    shared: Arc<Shared>,
    metrics_addr: Option<SocketAddr>,
}

impl Agent {
    /// Starts an agent with the built-in hooks (`move`, `exec`).
    pub async fn start(config: Config) -> Result<Agent, AgentError> {
        Agent::start_with_hooks(config, Hooks::new()).await
    }

    /// Starts an agent; `hooks` serve the import targets configured with `hook = "custom"`.
    pub async fn start_with_hooks(config: Config, custom: Hooks) -> Result<Agent, AgentError> {
        Agent::start_on(config, custom, None).await
    }

    /// Starts an agent on `socket` if given (one systemd passed, for example), else
    /// on the configured `listen` address.
    pub async fn start_on(
        config: Config,
        custom: Hooks,
        socket: Option<std::net::UdpSocket>,
    ) -> Result<Agent, AgentError> {
        let hooks = resolve_hooks(&config, &custom)?;
        let tls = certs::TlsNow::load(&config.tls)?;
        let endpoint = bind(&config, &tls.material, socket)?;
        let addr = endpoint.local_addr().map_err(|source| AgentError::Bind {
            addr: config.listen,
            source,
        })?;
        let disk = Disk::start().map_err(AgentError::Disk)?;
        let cache = Arc::new(open_cache(&config.data_dir));
        let journal = Journal::open(&config.data_dir)?;
        let commits = Arc::new(Ledger::open(config.data_dir.join("commits"))?);
        handover::recover(&config, &commits, &journal);
        let holds = handover::restore_held(&config, &journal, &commits);
        let tcp = match config.imports.iter().any(|t| t.tcp_lane.is_some()) {
            false => None,
            true => {
                let at = std::net::SocketAddr::new(addr.ip(), config.tcp_port);
                let lane_tls = tls.material.lane_server_config()?;
                let lanes = crate::net::tcplane::TcpLanes::start(at, config.limits.tcp_lane_pending, lane_tls)
                    .await
                    .map_err(|source| AgentError::Bind { addr: at, source })?;
                let clear = config
                    .imports
                    .iter()
                    .filter(|t| t.tcp_lane == Some(LaneKind::Cleartext));
                let clear: Vec<&str> = clear.map(|t| t.name.as_str()).collect();
                info!(port = lanes.port(), cleartext = ?clear, "tcp data lane open (TLS, but clear text for the targets named)");
                Some(lanes)
            }
        };
        let metrics_at = config.metrics;
        let limits = Arc::new(RateLimits::new(config.limits.rates));
        let credit = crate::net::credit::Credit::for_memory(config.limits.memory_bytes, config.tuning.stream_window());
        let shared = Arc::new(Shared {
            live: RwLock::new(Arc::new(Live { config, hooks })),
            custom,
            disk,
            jobs: Jobs::new(holds),
            draining: AtomicBool::new(false),
            metrics: Arc::new(Metrics::default()),
            limits,
            cache,
            tcp,
            endpoint: endpoint.clone(),
            tls: RwLock::new(Arc::new(tls)),
            journal,
            commits,
            space: Arc::default(),
            credit: Arc::new(credit),
            peers: Arc::default(),
            refusal_log: gate::LogLimit::new(20, Duration::from_secs(10)),
            client: Mutex::default(),
            ships: Default::default(),
        });
        let mut tasks = vec![];
        let mut metrics_addr = None;
        if let Some(at) = metrics_at {
            let (task, bound) = start_metrics(at, shared.clone()).await?;
            tasks.push(task);
            metrics_addr = Some(bound);
        }
        let live = shared.live();
        for t in live.config.imports.iter().filter(|t| t.staging_in_target) {
            warn!(
                target = %t.name,
                staging = %t.staging.display(),
                "jobs are staged inside the import target (data_dir is on another file system or mount): \
                 an engine that scans the target sees the staging folder while a job runs; set `staging`"
            );
        }
        info!(%addr, imports = live.config.imports.len(), exports = live.config.exports.len(), "agent listening");
        tasks.push(tokio::spawn(accept_loop(endpoint.clone(), shared.clone())));
        tasks.push(tokio::spawn(sweep_loop(shared.clone())));
        tasks.push(tokio::spawn(certs::cert_loop(shared.clone())));
        Ok(Agent {
            endpoint,
            addr,
            tasks,
            shared,
            metrics_addr,
        })
    }

    /// Where the Prometheus endpoint listens, if it is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The address the QUIC endpoint is bound to (the real port when `listen` has port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The agent's counters (what the metrics endpoint shows).
    pub fn metrics(&self) -> String {
        self.shared.metrics.render(self.shared.gauges())
    }

    /// The agent's own certificate, as it serves it now.
    pub fn certificate(&self) -> crate::net::tls::CertInfo {
        self.shared.tls().own.clone()
    }

    /// Applies a new configuration: targets, allow lists, hooks, limits and timeouts,
    /// and the certificates, key and revocation lists of `[tls]`, read again (a
    /// rotation: new connections use them, open ones keep theirs). Jobs in flight keep
    /// the settings they started with. `listen`, `data_dir`, `tcp_port` and `metrics`
    /// need a restart, and so does a certificate for another identity; a config that
    /// changes them, or certificates that do not load, are refused and the old stay.
    pub fn reload(&self, config: Config) -> Result<(), AgentError> {
        let old = self.shared.live();
        let same = |a: &Config, b: &Config| -> Result<(), AgentError> {
            let checks: [(&'static str, bool); 4] = [
                ("listen", a.listen == b.listen),
                ("data_dir", a.data_dir == b.data_dir),
                ("tcp_port", a.tcp_port == b.tcp_port),
                ("metrics", a.metrics == b.metrics),
            ];
            match checks.iter().find(|(_, ok)| !ok) {
                Some((key, _)) => Err(AgentError::NeedsRestart(key)),
                None => Ok(()),
            }
        };
        same(&old.config, &config)?;
        let hooks = resolve_hooks(&config, &self.shared.custom)?;
        self.shared.rotate(&config.tls, &config.tuning)?;
        self.shared.limits.set(config.limits.rates);
        if let Some(lanes) = &self.shared.tcp {
            lanes.set_limits(config.limits.tcp_lane_pending);
        }
        *self.shared.live.write().expect("live config") = Arc::new(Live { config, hooks });
        info!("configuration reloaded");
        Ok(())
    }

    /// Stops taking new jobs (they are refused as busy, with a retry-after), waits up
    /// to `deadline` for running ones, then shuts down. Jobs still running then keep
    /// their verified blocks staged and resume when sent again; held jobs stay held.
    /// Returns how many jobs were cut off.
    pub async fn drain(self, deadline: Duration) -> usize {
        self.shared.draining.store(true, Ordering::SeqCst);
        let until = tokio::time::Instant::now() + deadline;
        let running = || self.shared.jobs.running();
        while running() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let cut = running();
        match cut {
            0 => info!("drained: no job running"),
            n => warn!(
                jobs = n,
                "drain deadline passed; cut-off jobs stay staged and resume when sent again"
            ),
        }
        self.shutdown().await;
        cut
    }

    /// Closes every connection and stops the agent.
    pub async fn shutdown(self) {
        self.endpoint.close(quinn::VarInt::from_u32(0), b"agent shutting down");
        for t in &self.tasks {
            t.abort();
        }
        self.endpoint.wait_idle().await;
    }
}

/// The export hash cache in `data_dir`; in memory only if the file can not be used.
fn open_cache(data_dir: &std::path::Path) -> crate::store::hashcache::HashCache {
    let path = data_dir.join("hash-cache");
    crate::store::hashcache::HashCache::open(&path).unwrap_or_else(|e| {
        warn!(path = %path.display(), error = %e, "hash cache kept in memory only");
        crate::store::hashcache::HashCache::in_memory()
    })
}

/// The QUIC endpoint, on the given socket or on `config.listen`.
fn bind(
    config: &Config,
    tls: &TlsMaterial,
    socket: Option<std::net::UdpSocket>,
) -> Result<quinn::Endpoint, AgentError> {
    let server = certs::quic_server(tls, &config.tuning)?;
    let addr = config.listen;
    let bind_err = |source| AgentError::Bind { addr, source };
    let (sock, buffers) = match socket {
        None => crate::net::quic::udp_socket(addr, &config.tuning).map_err(bind_err)?,
        Some(sock) => {
            let got = crate::net::quic::size_buffers(&sock, config.tuning.socket_buffer());
            (sock, got)
        }
    };
    if buffers.short() {
        warn!(
            asked = buffers.asked,
            receive = buffers.receive,
            send = buffers.send,
            "UDP buffers smaller than asked: datagrams may be dropped under load; \
             raise net.core.rmem_max and wmem_max (systemd/99-barge.conf)"
        );
    }
    crate::net::quic::endpoint(sock, Some(server), &config.tuning).map_err(bind_err)
}

async fn start_metrics(
    at: SocketAddr,
    shared: Arc<Shared>,
) -> Result<(tokio::task::JoinHandle<()>, SocketAddr), AgentError> {
    let listener = tokio::net::TcpListener::bind(at)
        .await
        .map_err(|source| AgentError::Bind { addr: at, source })?;
    let addr = listener.local_addr().unwrap_or(at);
    info!(%addr, "metrics endpoint on http://{addr}/metrics");
    let render = move || shared.metrics.render(shared.gauges());
    Ok((tokio::spawn(crate::metrics::serve(listener, render)), addr))
}

fn resolve_hooks(config: &Config, custom: &Hooks) -> Result<Hooks, AgentError> {
    let mut out = Hooks::new();
    for t in &config.imports {
        let hook: Arc<dyn ImportHook> = match &t.hook {
            HookSpec::Move if t.on_exists == crate::config::OnExists::Replace => Arc::new(ReplaceHook),
            HookSpec::Move => Arc::new(MoveHook {
                skip_identical: t.on_exists == crate::config::OnExists::SkipIdentical,
            }),
            HookSpec::Replace => Arc::new(ReplaceHook),
            HookSpec::Exec(spec) => Arc::new(ExecHook {
                argv: spec.argv.clone(),
                env: spec.env.clone(),
                timeout: spec.timeout,
                stderr_to_sender: spec.stderr_to_sender,
            }),
            HookSpec::Custom => custom
                .get(&t.name)
                .cloned()
                .ok_or_else(|| AgentError::MissingHook(t.name.clone()))?,
        };
        out.insert(t.name.clone(), hook);
    }
    Ok(out)
}

async fn sweep_loop(shared: Arc<Shared>) {
    loop {
        let config = shared.config();
        let ttl = config.staging_ttl.min(config.hold_ttl);
        let period = (ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
        for job in shared.jobs.held.take_expired(config.hold_ttl) {
            info!(job = %job.id, target = %job.offer.target, "held job expired; staged files removed");
            drop_held(&shared, &job);
        }
        shared.commits.forget(config.staging_ttl);
        // Held jobs expire on their own clock; a commit that could neither finish nor
        // be put back keeps its staging for the next start.
        let mut keep = shared.jobs.held.staged_names();
        keep.extend(shared.commits.pending().into_iter().flatten().map(|i| i.job));
        for t in &config.imports {
            sweep_expired(&t.staging, config.staging_ttl, &keep);
            if t.staging != t.legacy_staging() {
                // What an earlier version staged inside the target expires there.
                sweep_expired(&t.legacy_staging(), config.staging_ttl, &keep);
            }
        }
        tokio::time::sleep(period).await;
    }
}

struct JobCtx {
    conn: quinn::Connection,
    shared: Arc<Shared>,
    peer: String,
    table: JobTable,
}

fn refuse(code: u16, reason: impl Into<String>) -> Refusal {
    Refusal::new(code, reason)
}
