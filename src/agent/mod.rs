//! The sidecar agent: a QUIC endpoint that accepts pushes into its import targets and
//! serves pulls from its exports, each checked against the target's allow list.
//!
//! One task per connection (span `conn` with the peer's identity), one per job (span
//! `job`). Staged jobs that are never resumed are swept after `staging_ttl`; held jobs
//! (bulk loads) are journaled in `data_dir` and expire after `hold_ttl`.
//!
//! The targets, allow lists, hooks and limits live behind one lock and are swapped
//! whole on [`Agent::reload`]; a job takes what it needs when it starts, so a reload
//! never changes a job in flight. [`Agent::drain`] refuses new jobs (with a retry-after)
//! and waits for running ones before the endpoint closes.

mod control;
mod gate;
mod handover;
pub mod metrics;
pub mod ratelimit;
pub mod systemd;

use crate::agent::metrics::{Gauges, Metrics, Outcome};
use crate::agent::ratelimit::RateLimits;
use crate::config::{AllowList, Config, Export, HookSpec, Import};
use crate::engines::hook::{
    AfterCommitHook, AfterCommitJob, ExecHook, ExportedFile, ImportHook, MoveHook, ReplaceHook,
};
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
use handover::{drop_held, Handover};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tracing::{info, info_span, warn, Instrument};

/// Why an agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("io_uring: {0}")]
    Disk(std::io::Error),
    #[error("import target {0:?} has hook = \"custom\" but no ImportHook was registered for it")]
    MissingHook(String),
    #[error(transparent)]
    Journal(#[from] crate::store::held::HeldError),
    #[error(transparent)]
    Commits(#[from] crate::store::commit::CommitError),
    #[error("{0} can not change on reload; restart the agent for it")]
    NeedsRestart(&'static str),
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
    /// Jobs being received or committed, and who sends each.
    active: Mutex<HashMap<JobId, String>>,
    /// Jobs running (pushes and pulls), against `max_jobs`.
    running: AtomicUsize,
    draining: AtomicBool,
    metrics: Arc<Metrics>,
    limits: Arc<RateLimits>,
    cache: Arc<crate::store::hashcache::HashCache>,
    tcp: Option<crate::net::tcplane::TcpLanes>,
    /// Jobs being received, from all connections.
    table: JobTable,
    /// Held jobs and the targets they claim, and their journal.
    holds: Holds,
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
}

impl Shared {
    /// The configuration and hooks now; a job keeps the ones it started with.
    fn live(&self) -> Arc<Live> {
        self.live.read().expect("live config").clone()
    }

    fn config(&self) -> Config {
        self.live().config.clone()
    }

    /// Jobs in flight and held, and bytes staged, for metrics and admission.
    fn gauges(&self) -> Gauges {
        let table = self.table.lock().expect("job table");
        let receiving: u64 = table
            .values()
            .map(|inc| inc.offer.total_bytes() - inc.missing_bytes())
            .sum();
        let held = self.holds.list();
        Gauges {
            jobs_receiving: table.len() as u64,
            jobs_held: held.len() as u64,
            bytes_staged: receiving + held.iter().map(|h| h.offer.total_bytes()).sum::<u64>(),
            draining: self.draining.load(Ordering::Relaxed),
        }
    }

    /// Bytes that jobs being received and held jobs may stage, in full: all of them,
    /// or those of one peer.
    fn staging_committed(&self, peer: Option<&str>) -> u64 {
        let of = |p: &str| peer.is_none_or(|peer| peer == p);
        let table = self.table.lock().expect("job table");
        let receiving: u64 = table
            .values()
            .filter(|inc| of(&inc.peer))
            .map(|inc| inc.offer.total_bytes())
            .sum();
        let held = self.holds.list().into_iter().filter(|h| of(&h.peer));
        receiving + held.map(|h| h.offer.total_bytes()).sum::<u64>()
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
        let endpoint = bind(&config, socket)?;
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
        let tcp = match config.imports.iter().any(|t| t.tcp_lane) {
            false => None,
            true => {
                let at = std::net::SocketAddr::new(addr.ip(), config.tcp_port);
                let lanes = crate::net::tcplane::TcpLanes::start(at, config.limits.tcp_lane_pending)
                    .await
                    .map_err(|source| AgentError::Bind { addr: at, source })?;
                info!(
                    port = lanes.port(),
                    "tcp data lane open (unencrypted, for trusted networks)"
                );
                Some(lanes)
            }
        };
        let metrics_at = config.metrics;
        let limits = Arc::new(RateLimits::new(config.limits.rates));
        let credit = crate::net::credit::Credit::for_memory(config.limits.memory_bytes);
        let shared = Arc::new(Shared {
            live: RwLock::new(Arc::new(Live { config, hooks })),
            custom,
            disk,
            active: Mutex::new(HashMap::new()),
            running: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            metrics: Arc::new(Metrics::default()),
            limits,
            cache,
            tcp,
            table: JobTable::default(),
            holds,
            journal,
            commits,
            space: Arc::default(),
            credit: Arc::new(credit),
            peers: Arc::default(),
            refusal_log: gate::LogLimit::new(20, Duration::from_secs(10)),
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
                "jobs are staged inside the import target (data_dir is on another file system): \
                 an engine that scans the target sees the staging folder while a job runs; set `staging`"
            );
        }
        info!(%addr, imports = live.config.imports.len(), exports = live.config.exports.len(), "agent listening");
        tasks.push(tokio::spawn(accept_loop(endpoint.clone(), shared.clone())));
        tasks.push(tokio::spawn(sweep_loop(shared.clone())));
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

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The agent's counters (what the metrics endpoint shows).
    pub fn metrics(&self) -> String {
        self.shared.metrics.render(self.shared.gauges())
    }

    /// Applies a new configuration: targets, allow lists, hooks, limits and timeouts.
    /// Jobs in flight keep the settings they started with. `listen`, `tls`, `data_dir`,
    /// `tcp_port` and `metrics` need a restart; a config that changes them is refused
    /// and the old one stays.
    pub fn reload(&self, config: Config) -> Result<(), AgentError> {
        let old = self.shared.live();
        let same = |a: &Config, b: &Config| -> Result<(), AgentError> {
            let checks: [(&'static str, bool); 5] = [
                ("listen", a.listen == b.listen),
                ("tls", a.tls == b.tls),
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
        let running = || self.shared.running.load(Ordering::SeqCst);
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
fn bind(config: &Config, socket: Option<std::net::UdpSocket>) -> Result<quinn::Endpoint, AgentError> {
    let mut server = TlsMaterial::load(&config.tls)?.server_config(&config.tuning)?;
    // A connection may open more data streams only once it carries data (see `credit`):
    // credit given in the handshake could not be taken back.
    server.transport_config(
        config
            .tuning
            .transport_with_uni_streams(crate::net::credit::MIN_STREAMS),
    );
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
    Ok((tokio::spawn(crate::agent::metrics::serve(listener, render)), addr))
}

fn resolve_hooks(config: &Config, custom: &Hooks) -> Result<Hooks, AgentError> {
    let mut out = Hooks::new();
    for t in &config.imports {
        let hook: Arc<dyn ImportHook> = match &t.hook {
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
        for job in shared.holds.take_expired(config.hold_ttl) {
            info!(job = %job.id, target = %job.offer.target, "held job expired; staged files removed");
            drop_held(&shared, &job);
        }
        shared.commits.forget(config.staging_ttl);
        // Held jobs expire on their own clock; a commit that could neither finish nor
        // be put back keeps its staging for the next start.
        let mut keep = shared.holds.staged_names();
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

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let shared = shared.clone();
        tokio::spawn(async move {
            match incoming.await {
                Ok(conn) => serve_conn(conn, shared).await,
                Err(e) => warn!(%remote, error = %e, "handshake failed"),
            }
        });
    }
}

async fn serve_conn(conn: quinn::Connection, shared: Arc<Shared>) {
    let Some(peer) = peer_identity(&conn) else {
        warn!(remote = %conn.remote_address(), "peer certificate names no DNS identity");
        conn.close(quinn::VarInt::from_u32(code::NOT_ALLOWED as u32), b"no identity");
        return;
    };
    let Some(_taken) = admit_conn(&conn, &peer, &shared) else {
        return;
    };
    let span = info_span!("conn", %peer, remote = %conn.remote_address());
    shared.metrics.connection_opened();
    async {
        info!("connected");
        let table = shared.table.clone();
        shared.credit.add(&conn);
        let credit = Some(shared.credit.clone());
        let router = transfer::spawn_data_router(conn.clone(), table.clone(), peer.clone(), credit);
        let idle = shared.config().limits.idle_connection;
        while let Some((send, recv)) = next_request(&conn, &peer, &shared, idle).await {
            let ctx = JobCtx {
                conn: conn.clone(),
                shared: shared.clone(),
                peer: peer.clone(),
                table: table.clone(),
            };
            let Some(request) = admit_request(ctx, send, recv) else {
                continue;
            };
            tokio::spawn(request.instrument(tracing::Span::current()));
        }
        router.abort();
        shared.credit.remove(conn.stable_id());
        info!("disconnected");
    }
    .instrument(span)
    .await;
    shared.metrics.connection_closed();
}

/// Closes a connection with its reason, and logs it (not every one of a flood).
fn close_refused(conn: &quinn::Connection, shared: &Shared, peer: &str, code: u16, why: &str) {
    if let Some(held_back) = shared.refusal_log.allow() {
        warn!(%peer, remote = %conn.remote_address(), held_back, "connection refused: {why}");
    }
    conn.close(quinn::VarInt::from_u32(code as u32), why.as_bytes());
}

/// Lets a connection in if its identity is on some allow list and under its own and
/// the agent's connection limits.
fn admit_conn(conn: &quinn::Connection, peer: &str, shared: &Arc<Shared>) -> Option<gate::Taken> {
    let live = shared.live();
    let limits = &live.config.limits;
    if !live.config.knows(peer) {
        let why = format!("{peer} is on no allow list of this agent");
        close_refused(conn, shared, peer, code::NOT_ALLOWED, &why);
        return None;
    }
    let max = limits.max_connections;
    if shared.metrics.connections() >= max as u64 {
        let why = format!("agent is at its limit of {max} connections");
        close_refused(conn, shared, peer, code::BUSY, &why);
        return None;
    }
    let per = limits.identity.connections;
    match shared.peers.take(peer, gate::Kind::Connections, 1, per as u64) {
        Ok(taken) => Some(taken),
        Err(_) => {
            let why = format!("{peer} has {per} connections open, its limit");
            close_refused(conn, shared, peer, code::BUSY, &why);
            None
        }
    }
}

/// The next request stream, or `None` once the connection is gone or has been idle
/// (no request of its identity open) for `idle`, in which case it is closed.
async fn next_request(
    conn: &quinn::Connection,
    peer: &str,
    shared: &Shared,
    idle: Duration,
) -> Option<(quinn::SendStream, quinn::RecvStream)> {
    let mut since = tokio::time::Instant::now();
    loop {
        let wait = (since + idle).saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(wait, conn.accept_bi()).await {
            Ok(stream) => return stream.ok(),
            Err(_) if shared.peers.holds(peer, gate::Kind::Requests) > 0 => {
                since = tokio::time::Instant::now();
            }
            Err(_) => {
                info!(idle_secs = idle.as_secs(), "closing an idle connection");
                conn.close(quinn::VarInt::from_u32(0), b"idle: no request open");
                return None;
            }
        }
    }
}

/// Serves a request if its identity is under its limit of requests at once; else
/// refuses it without reading it.
fn admit_request(
    ctx: JobCtx,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
    let per = ctx.shared.config().limits.identity.streams;
    match ctx.shared.peers.take(&ctx.peer, gate::Kind::Requests, 1, per as u64) {
        Ok(taken) => Some(async move {
            ctx.run(send, recv).await;
            drop(taken);
        }),
        Err(_) => {
            let why = format!("{} has {per} requests open, its limit", ctx.peer);
            let r = refuse(code::BUSY, why).retry_after(RETRY_BUSY);
            if let Some(held_back) = ctx.shared.refusal_log.allow() {
                warn!(held_back, reason = %r, "request refused");
            }
            let _ = recv.stop(quinn::VarInt::from_u32(0));
            tokio::spawn(async move {
                let _ = transfer::write_msg(&mut send, &Message::Reject(r)).await;
                let _ = send.finish();
            });
            None
        }
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

impl JobCtx {
    async fn run(self, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let authorize = |target: &str, len: u64| self.may_send_large(target, len);
        let opened = gate::read_request(&mut recv, authorize)
            .await
            .and_then(|m| session::opening(m).map_err(|p| p.refusal()));
        let result = match opened {
            Ok(Opening::Push(offer)) => self.push(offer, &mut send, &mut recv).await,
            Ok(Opening::Pull { export, files, range }) => self.pull(export, files, range, &mut send, &mut recv).await,
            Ok(Opening::Request(m)) => self.answer(m, &mut send).await,
            Err(r) => Err(r),
        };
        if let Err(r) = result {
            if let Some(held_back) = self.shared.refusal_log.allow() {
                warn!(code = r.code, reason = %r, held_back, "job refused");
            }
            self.shared.metrics.job(Outcome::Refused);
            let _ = transfer::write_msg(&mut send, &Message::Reject(r)).await;
            let _ = send.finish();
            let _ = send.stopped().await;
        }
    }

    /// Whether this peer may have an offer of more than a few KiB read: only into a
    /// target it may write to, and within its share of memory for such reads.
    fn may_send_large(&self, target: &str, len: u64) -> Result<gate::Taken, Refusal> {
        self.import_target(&self.shared.live(), target)?;
        let budget = gate::LARGE_BUDGET;
        self.shared
            .peers
            .take(&self.peer, gate::Kind::Reading, len, budget)
            .map_err(|_| {
                let why = format!("{} is sending other large offers; retry", self.peer);
                refuse(code::BUSY, why).retry_after(RETRY_BUSY)
            })
    }

    /// A push into one of our import targets. `Err` means refused before accepting.
    async fn push(
        &self,
        offer: Offer,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), Refusal> {
        let live = self.shared.live();
        let target = self.import_target(&live, &offer.target)?;
        let hook = live.hooks[&target.name].clone();
        let job = ReceiveJob::new(offer).map_err(|e| e.refusal())?;
        let span =
            info_span!("job", id = %job.id, target = %target.name, files = job.paths.len(), hold = job.offer.hold);
        let _guard = ActiveGuard::take_over(&self.shared, job.id, &self.peer)
            .instrument(span.clone())
            .await?;
        let slot = JobSlot::claim(&self.shared, &live, &self.peer)?;
        if let Some(done) = handover::committed_before(&self.shared.commits, job.id, &self.peer, &target, &job.paths) {
            span.in_scope(|| info!(report = %done.report, "committed before; sent again, confirmed without data"));
            // What a commit cut off after its outcome was recorded left in staging.
            Stage::at(target.staging.join(job.id.to_string())).remove();
            let confirm = transfer::confirm_committed(send, recv, &job, handover::again(&done));
            if let Err(e) = confirm.await {
                span.in_scope(|| warn!(error = %e, "confirming an earlier commit failed"));
            }
            return Ok(());
        }
        let _claim = self.claim_target(&target.name, job.id, job.offer.hold)?;
        let limits = &live.config.limits;
        let (job, stage, space) = async { self.prepare(job, &target, hook.as_ref(), limits).await }
            .instrument(span.clone())
            .await?;
        let run = self.receive(job, stage, (space, slot), target, hook, send, recv);
        if let Err(e) = run.instrument(span.clone()).await {
            span.in_scope(|| warn!(error = %e, "job failed"));
        }
        Ok(())
    }

    /// A held job has its target to itself: a hold claims the target (refused while
    /// another job holds it or writes into it); any other job is refused while it is
    /// held.
    fn claim_target(&self, target: &str, id: JobId, hold: bool) -> Result<ClaimGuard<'_>, Refusal> {
        let held_by = |c: Claim| {
            let by = match c.peer == self.peer {
                true => format!("your job {}", c.job),
                false => "another sender's job".to_string(),
            };
            refuse(code::HELD, format!("import target {target:?} is held by {by}"))
        };
        if !hold {
            return match self.shared.holds.holder(target) {
                Some(c) => Err(held_by(c)),
                None => Ok(ClaimGuard::none(&self.shared)),
            };
        }
        let claim = Claim {
            job: id,
            peer: self.peer.clone(),
        };
        self.shared.holds.claim(target, claim).map_err(held_by)?;
        let others = self.writers(target, id);
        if others > 0 {
            self.shared.holds.release(target, id);
            return Err(refuse(
                code::BUSY,
                format!(
                    "{others} other jobs are writing into import target {target:?}; a held load needs it to itself"
                ),
            ));
        }
        Ok(ClaimGuard {
            shared: &self.shared,
            target: Some((target.to_string(), id)),
        })
    }

    /// Jobs other than `id` receiving into `target` now.
    fn writers(&self, target: &str, id: JobId) -> usize {
        let table = self.table.lock().expect("job table");
        table
            .iter()
            .filter(|(j, inc)| **j != id && inc.offer.target == target)
            .count()
    }

    fn import_target(&self, live: &Live, name: &str) -> Result<Import, Refusal> {
        let t = live.config.import(name);
        let t = self.checked(t.map(|t| (t, &t.allow)), "import target", "write to", name)?;
        Ok(t.clone())
    }

    /// Refuses a target that does not exist or whose allow list lacks the peer, alike.
    fn checked<'t, T>(
        &self,
        target: Option<(&'t T, &AllowList)>,
        kind: &str,
        verb: &str,
        name: &str,
    ) -> Result<&'t T, Refusal> {
        // The same answer whether the target is missing or closed to this peer: an
        // identity learns nothing of targets it may not use.
        let no = || {
            refuse(
                code::NOT_ALLOWED,
                format!(
                    "{} may not {verb} {kind} {name:?} (there is none it may use by that name)",
                    self.peer
                ),
            )
        };
        match target {
            Some((t, allow)) if allow.allows(&self.peer) => Ok(t),
            _ => Err(no()),
        }
    }

    /// Checks, opens the staging folder, finds what an earlier attempt staged, and
    /// refuses up front (with a retry-after) what would not fit: the staging limit, or
    /// the target's free space less the reserve.
    async fn prepare(
        &self,
        mut job: ReceiveJob,
        target: &Import,
        hook: &dyn ImportHook,
        limits: &crate::config::Limits,
    ) -> Result<(ReceiveJob, Stage, Reservation), Refusal> {
        let t = std::time::Instant::now();
        hook.check(&target.path, &job.paths).map_err(|e| e.refusal())?;
        let roots: Vec<_> = job
            .paths
            .iter()
            .cloned()
            .zip(job.offer.files.iter().map(|f| f.hashes.root))
            .collect();
        hook.check_roots(&target.path, &roots).map_err(|e| e.refusal())?;
        if let Some(max) = limits.max_staged_bytes {
            let staged = self.shared.staging_committed(None);
            if staged.saturating_add(job.offer.total_bytes()) > max {
                let why = format!("staging is full: {staged} bytes staged or on their way, the limit is {max}");
                return Err(refuse(code::BUSY, why).retry_after(RETRY_BUSY));
            }
        }
        if let Some(max) = limits.identity.staged_bytes {
            let staged = self.shared.staging_committed(Some(&self.peer));
            if staged.saturating_add(job.offer.total_bytes()) > max {
                let why = format!(
                    "{} has {staged} bytes staged or on their way; its limit is {max}",
                    self.peer
                );
                return Err(refuse(code::BUSY, why).retry_after(RETRY_BUSY));
            }
        }
        if let Some(mode) = target.file_mode {
            // The target decides its files' modes; the journal of a held job keeps them.
            Arc::make_mut(&mut job.offer)
                .files
                .iter_mut()
                .for_each(|f| f.mode = mode);
        }
        let stage = Stage::open(&target.staging, &job).map_err(|e| e.refusal())?;
        let opened_ms = t.elapsed().as_millis() as u64;
        let found = stage.scan(&mut job, &self.shared.disk).await;
        tracing::debug!(opened_ms, ready_ms = t.elapsed().as_millis() as u64, "staging ready");
        let need = job.missing_bytes();
        let space = match self.shared.space.admit(&target.path, need, limits.reserve_bytes) {
            Ok(s) => s,
            Err(e) => {
                if found == 0 {
                    stage.remove();
                }
                return Err(e.refusal());
            }
        };
        info!(resumed_blocks = found, missing = job.missing(), "offer accepted");
        Ok((job, stage, space))
    }

    #[allow(clippy::too_many_arguments)]
    async fn receive(
        &self,
        job: ReceiveJob,
        stage: Stage,
        (space, job_slot): (Reservation, JobSlot<'_>),
        target: Import,
        hook: Arc<dyn ImportHook>,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<Received, TransferError> {
        let peer = self.peer.clone();
        let (tcp_allowed, dir_mode) = (target.tcp_lane, target.dir_mode);
        let stage2 = stage.clone();
        let shared = self.shared.clone();
        // The commit's outcome is recorded once the sender has its answer (see
        // `Handover::run`), and also if the answer could not be sent.
        let recording = Arc::new(Mutex::new(None));
        let slot = recording.clone();
        let run_hook = move |offer: Arc<Offer>, paths: Vec<RelPath>| async move {
            if offer.hold {
                return handover::hold(&shared, &offer, &peer, &stage2).map(|_| Received::Held);
            }
            let import = handover::import_job(&offer, paths, &stage2, &target, peer);
            let handover = Handover::new(&target, hook, shared.commits.clone());
            let (report, placed) = handover.run(import, &shared.metrics).await?;
            *slot.lock().expect("recording") = Some(placed);
            Ok(Received::Committed(report))
        };
        let started = std::time::Instant::now();
        let tcp = (self.shared.tcp.as_ref())
            .filter(|_| tcp_allowed)
            .map(|lanes| (lanes, self.conn.remote_address().ip()));
        let meter = crate::agent::metrics::Meter {
            metrics: self.shared.metrics.clone(),
            limits: self.shared.limits.clone(),
            peer: self.peer.clone(),
            progress: None,
        };
        let at = transfer::ReceiveAt {
            peer: &self.peer,
            disk: &self.shared.disk,
            table: &self.table,
            meter: Some(&meter),
            tcp,
            space: Some(&space),
            stall: Some(self.shared.config().limits.stall),
            dir_mode,
        };
        let out = transfer::receive_job(send, recv, job, stage, at, run_hook).await;
        // The sender has its answer: its next job may have the slot while this one's
        // outcome is recorded (the same job sent again still waits, see `ActiveGuard`).
        drop(job_slot);
        let placed = recording.lock().expect("recording").take();
        self.shared.metrics.job(match (&out, &placed) {
            (Ok(Received::Committed(_)), _) | (Err(_), Some(_)) => Outcome::Committed,
            (Ok(Received::Held), _) => Outcome::Held,
            (Ok(Received::Aborted), _) => Outcome::Aborted,
            (Err(_), None) => Outcome::Failed,
        });
        if let Some(p) = placed {
            p.record_async().await;
        }
        let out = out?;
        match &out {
            Received::Committed(report) => {
                info!(elapsed_ms = started.elapsed().as_millis() as u64, %report, "committed")
            }
            Received::Held => info!(elapsed_ms = started.elapsed().as_millis() as u64, "staged and held"),
            Received::Aborted => info!("aborted by sender; staging removed"),
        }
        Ok(out)
    }

    /// A pull from one of our exports: we are the sender.
    async fn pull(
        &self,
        export: String,
        files: Vec<String>,
        range: Option<crate::proto::keys::KeyRange>,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), Refusal> {
        let live = self.shared.live();
        let ex = self.export_target(&live, &export)?;
        let _slot = JobSlot::claim(&self.shared, &live, &self.peer)?;
        let (list, offer) = self.export_offer(&ex, &files, range.as_ref()).await?;
        let span = info_span!("job", id = %offer.job_id(), export = %ex.name, files = list.len());
        let after = ex.after_commit.as_ref().map(|spec| {
            (
                AfterCommitHook::from(spec),
                self.after_commit_job(&ex, &offer, range.as_ref()),
            )
        });
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let pacer = crate::agent::metrics::Meter {
            metrics: self.shared.metrics.clone(),
            limits: self.shared.limits.clone(),
            peer: self.peer.clone(),
            progress: None,
        };
        let flow = transfer::Flow::new(Some(sent.clone()), Some(pacer));
        let run = transfer::send_job(
            std::slice::from_ref(&self.conn),
            send,
            recv,
            offer,
            list,
            &self.shared.disk,
            &flow,
        );
        // A client that never answers or stops reading must not keep the job slot.
        let stall = live.config.limits.stall;
        let res = tokio::select! {
            r = run.instrument(span.clone()) => r,
            _ = gate::quiet_for(sent, stall) => Err(TransferError::Failed(refuse(
                code::ABORTED,
                format!("the client took no data for {}s: the pull was given up", stall.as_secs()),
            ))),
        };
        let committed = match &res {
            Ok(r) if !r.held => Some(r.report.clone()),
            _ => None,
        };
        let outcome = span.in_scope(|| match res {
            Ok(r) => {
                info!(blocks = r.blocks_sent, bytes = r.bytes_sent, "pull served");
                self.shared.metrics.sent(&self.peer, r.blocks_sent, r.bytes_sent);
                Outcome::Committed
            }
            Err(e) => {
                warn!(error = %e, "pull failed");
                Outcome::Failed
            }
        });
        self.shared.metrics.job(outcome);
        if let (Some((hook, mut job)), Some(report)) = (after, committed) {
            // The client has its files; it hears how the command went once it is done
            // (a committed reply, or a failure that does not undo its commit). The job
            // slot is kept until then, so a drain waits for it.
            let _ = recv.stop(quinn::VarInt::from_u32(0));
            job.receiver_report = report;
            let said = match self.after_commit(hook, job).instrument(span).await {
                Ok(report) => Message::Committed {
                    report: crate::proto::wire::cut_reason(format!("after_commit: {report}")),
                },
                Err(why) => Message::Failed(refuse(
                    code::HOOK_FAILED,
                    crate::proto::wire::cut_reason(format!("after_commit: {why}")),
                )),
            };
            let _ = transfer::write_msg(send, &said).await;
        }
        let _ = send.finish();
        Ok(())
    }

    /// What an export's `after_commit` command is told about a pull of `offer`.
    fn after_commit_job(
        &self,
        ex: &Export,
        offer: &Offer,
        range: Option<&crate::proto::keys::KeyRange>,
    ) -> AfterCommitJob {
        AfterCommitJob {
            job: offer.job_id().to_string(),
            export: ex.name.clone(),
            export_dir: ex.path.clone(),
            peer: self.peer.clone(),
            files: offer
                .files
                .iter()
                .map(|f| ExportedFile {
                    name: f.path.clone(),
                    path: ex.path.join(&f.path),
                    size: f.hashes.size,
                    blake3: crate::proto::blocks::hex(&f.hashes.root),
                    keys: f.keys.as_ref().map(Into::into),
                })
                .collect(),
            range: range.map(Into::into),
            receiver_report: String::new(),
        }
    }

    /// Runs an export's `after_commit` command for a pull the receiver committed. Its
    /// failure can not undo that commit: it is logged, counted
    /// (`barge_after_commit_failures_total`) and told to the client.
    async fn after_commit(&self, hook: AfterCommitHook, job: AfterCommitJob) -> Result<String, String> {
        let started = std::time::Instant::now();
        let res = tokio::task::spawn_blocking(move || hook.run(&job))
            .await
            .unwrap_or_else(|e| Err(crate::engines::hook::HookError::Other(e.to_string())));
        let elapsed_ms = started.elapsed().as_millis() as u64;
        self.shared.metrics.after_commit(res.is_ok());
        match res {
            Ok(report) => {
                info!(elapsed_ms, %report, "after_commit command done");
                Ok(report)
            }
            Err(e) => {
                warn!(
                    elapsed_ms,
                    error = %e,
                    "after_commit command failed; the pull stays committed on the receiver"
                );
                Err(e.to_string())
            }
        }
    }

    fn export_target(&self, live: &Live, name: &str) -> Result<Export, Refusal> {
        let t = live.config.export(name);
        let t = self.checked(t.map(|t| (t, &t.allow)), "export", "read", name)?;
        Ok(t.clone())
    }
}

/// How long a refused sender should wait before trying again.
const RETRY_BUSY: u32 = transfer::RETRY_BUSY;
const RETRY_DRAIN: u32 = 30;

/// One of the agent's `max_jobs` job slots, and of its peer's share of them, given
/// back on drop. None are given out while the agent drains for shutdown.
struct JobSlot<'a>(&'a Shared, #[allow(dead_code)] gate::Taken);

impl<'a> JobSlot<'a> {
    fn claim(shared: &'a Shared, live: &Live, peer: &str) -> Result<Self, Refusal> {
        if shared.draining.load(Ordering::SeqCst) {
            return Err(refuse(code::BUSY, "agent is shutting down").retry_after(RETRY_DRAIN));
        }
        let max_jobs = live.config.max_jobs;
        if shared.running.fetch_add(1, Ordering::SeqCst) >= max_jobs {
            shared.running.fetch_sub(1, Ordering::SeqCst);
            let why = format!("agent is at its limit of {max_jobs} jobs");
            return Err(refuse(code::BUSY, why).retry_after(RETRY_BUSY));
        }
        let per = live.config.limits.identity.jobs;
        let mine = shared.peers.take(peer, gate::Kind::Jobs, 1, per as u64).map_err(|_| {
            shared.running.fetch_sub(1, Ordering::SeqCst);
            let why = format!("{peer} has {per} jobs running, its limit");
            refuse(code::BUSY, why).retry_after(RETRY_BUSY)
        })?;
        Ok(JobSlot(shared, mine))
    }
}

impl Drop for JobSlot<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Frees a target claimed by a `hold` job that did not get as far as being held.
struct ClaimGuard<'a> {
    shared: &'a Shared,
    target: Option<(String, JobId)>,
}

impl<'a> ClaimGuard<'a> {
    fn none(shared: &'a Shared) -> Self {
        ClaimGuard { shared, target: None }
    }
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if let Some((target, id)) = &self.target {
            if !self.shared.holds.staged_names().contains(&id.to_string()) {
                self.shared.holds.release(target, *id);
            }
        }
    }
}

/// Marks a job id as running (being received or committed), and by whom.
struct ActiveGuard<'a> {
    shared: &'a Shared,
    id: JobId,
}

/// How long a sender's new attempt waits for its orphaned earlier one to let go.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

impl<'a> ActiveGuard<'a> {
    /// Claims `id` for `peer`, or says who has it.
    fn try_claim(shared: &'a Shared, id: JobId, peer: &str) -> Result<Self, Option<String>> {
        let mut active = shared.active.lock().expect("active jobs");
        match active.get(&id) {
            None => {
                active.insert(id, peer.to_string());
                Ok(ActiveGuard { shared, id })
            }
            Some(holder) => Err(Some(holder.clone()).filter(|h| h != peer)),
        }
    }

    /// Claims `id` for `peer`. If the same sender's earlier attempt still has it (a
    /// sender that died or gave up leaves its job waiting until the connection times
    /// out), that attempt is failed and this one takes over once it has let go: its
    /// verified blocks stay staged and count for this one. Another sender is refused.
    async fn take_over(shared: &'a Shared, id: JobId, peer: &str) -> Result<Self, Refusal> {
        let until = tokio::time::Instant::now() + TAKEOVER_WAIT;
        loop {
            match ActiveGuard::try_claim(shared, id, peer) {
                Ok(g) => return Ok(g),
                Err(Some(_)) => {
                    let why = format!("job {id} is being sent by another sender");
                    return Err(refuse(code::BUSY, why).retry_after(RETRY_BUSY));
                }
                Err(None) => {}
            }
            let earlier = shared.table.lock().expect("job table").get(&id).cloned();
            if let Some(inc) = earlier {
                if inc.take_over() {
                    info!("taking over the same sender's earlier attempt at this job");
                }
            }
            if tokio::time::Instant::now() >= until {
                let why = format!("job {id} is still finishing an earlier attempt of the same sender");
                return Err(refuse(code::BUSY, why).retry_after(RETRY_BUSY));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.shared.active.lock().expect("active jobs").remove(&self.id);
    }
}
