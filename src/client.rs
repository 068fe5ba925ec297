//! The client side: push files to an agent's import target, pull from its export.
//!
//! A client has its own identity (a certificate from the same CA) and checks that the
//! agent's certificate names the peer it meant to reach. A pull is a push in reverse:
//! the client receives into a staging folder inside `--into`, verifies every block and
//! moves the files into place only when all of them arrived. Held jobs are committed
//! or aborted, and jobs and exports listed, with one request and one answer each. A
//! push to several replicas runs as a relay chain, and a ship asks an agent to push
//! its export itself (`chain`).

mod chain;
pub use chain::{replicas_failed, ChainReport, Replica, ShipReport};

use crate::config::OnExists;
use crate::engines::hook::{ImportHook, MoveHook, ReplaceHook};
use crate::net::quic::Tuning;
use crate::net::tls::{TlsFiles, TlsMaterial};
use crate::proto::job::ReceiveJob;
use crate::proto::keys::KeyRange;
use crate::proto::session::check_answer;
use crate::proto::wire::WireCode;
use crate::proto::wire::{JobId, JobInfo, JobOp, ListedFile, Message, Offer, Refusal};
use crate::store::commit::{JobRef, Kind, Ledger};
use crate::store::disk::Disk;
use crate::store::hashcache::HashCache;
use crate::store::source::SourceFile;
use crate::store::space::{check_space, DEFAULT_RESERVE};
use crate::store::stage::Stage;
#[cfg(feature = "faults")]
use crate::transfer::Fault;
use crate::transfer::{self, Flow, JobTable, Received, SendReport, TransferError};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// An agent to talk to: the name its certificate must carry and where to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The DNS name the agent's certificate must carry (its identity).
    pub name: String,
    /// Where to reach it: `HOST:PORT`, resolved when connecting.
    pub addr: String,
}

/// Why a peer string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("peer {0:?} is not HOST:PORT or NAME@ADDR:PORT")]
pub struct BadPeer(String);

impl FromStr for Peer {
    type Err = BadPeer;

    /// `HOST:PORT` (HOST is also the expected name) or `NAME@ADDR:PORT`, where ADDR is
    /// a host name, an IPv4 address or a bracketed IPv6 address, and PORT is 1-65535.
    fn from_str(s: &str) -> Result<Peer, BadPeer> {
        let bad = || BadPeer(s.to_string());
        let (name, addr) = match s.split_once('@') {
            Some((n, a)) => (n.to_string(), a.to_string()),
            None => {
                let (host, _) = s.rsplit_once(':').ok_or_else(bad)?;
                (host.trim_matches(['[', ']']).to_string(), s.to_string())
            }
        };
        let name_ok = !name.is_empty() && (is_host_name(&name) || name.parse::<std::net::IpAddr>().is_ok());
        if !name_ok || !is_address(&addr) {
            return Err(bad());
        }
        Ok(Peer { name, addr })
    }
}

/// Letters, digits, `-`, `_` and `.`, in labels that are not empty.
fn is_host_name(s: &str) -> bool {
    let chars = s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    chars && !s.is_empty() && s.split('.').all(|label| !label.is_empty())
}

/// `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT`, with a port other than 0.
fn is_address(addr: &str) -> bool {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return a.port() != 0;
    }
    match addr.rsplit_once(':') {
        Some((host, port)) => is_host_name(host) && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

/// Options of a push.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// Engine metadata passed to the receiving import hook.
    pub meta: Vec<(String, String)>,
    /// Ask for the TCP data lane (used only if the target allows it; TLS or clear text
    /// as the target grants).
    pub tcp_lane: bool,
    /// A ship's TCP lane per replica, by certificate name (its export's `tcp_lane` for
    /// that identity): `Tls` asks for the lane and takes only a TLS grant, `Cleartext`
    /// takes either. Replicas not named follow `tcp_lane`. A relay forwards on QUIC.
    pub hop_lanes: std::collections::BTreeMap<String, crate::net::tcplane::LaneKind>,
    /// QUIC connections for the data (1 to 4; 0 means 1): each connection is driven by
    /// its own task, so a large job can keep both ends' cores busy.
    pub connections: usize,
    /// Stage and verify on the receiver, then wait for [`Client::commit`] or
    /// [`Client::abort`]; the target is held by this job meanwhile.
    pub hold: bool,
    /// Send only the SST files (`*.sst`) of the sources, each with its key span.
    pub sst: bool,
    /// Send only the SST files whose keys lie in this range (implies `sst`); a file
    /// across a boundary fails the push before anything is sent.
    pub range: Option<KeyRange>,
    /// Faults to inject (the crate's own tests).
    #[cfg(feature = "faults")]
    pub fault: Fault,
}

/// Most QUIC connections one push opens.
pub const MAX_CONNECTIONS: usize = 4;

/// What a pull received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullReport {
    /// The job's id.
    pub job: crate::proto::wire::JobId,
    /// Each file's name and blake3 root.
    pub hashes: Vec<(String, crate::proto::blocks::Digest)>,
    /// Files received.
    pub files: usize,
    /// Bytes of all the files.
    pub bytes: u64,
    /// Blocks sent by the exporter for this pull.
    pub blocks_received: u64,
    /// Blocks already held from an earlier, interrupted pull of the same job.
    pub blocks_resumed: u64,
    /// Files `into` already held with the same content (`OnExists::SkipIdentical`):
    /// none of their bytes were sent.
    pub files_there: usize,
    /// What the exporter's `after_commit` command said, if the export has one: its
    /// report, or why it failed (the pull stays committed either way).
    pub after_commit: Option<Result<String, String>>,
    /// The lane the data came over.
    pub lane: transfer::LaneUsed,
}

/// How a pull runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullOptions {
    /// What to do with a name `into` already has.
    pub on_exists: OnExists,
    /// Take the data over the TCP lane, with TLS, if the export offers it to this
    /// identity: this client listens on a TCP port of its own for the job, and the
    /// agent connects to it from its QUIC address with its own certificate.
    pub tcp_lane: bool,
}

impl PullReport {
    /// The report of a pull whose files were placed by an earlier run.
    fn already_placed(job: &ReceiveJob) -> PullReport {
        let blocks = job
            .offer
            .files
            .iter()
            .map(|f| crate::proto::blocks::block_count(f.hashes.size))
            .sum();
        PullReport {
            job: job.id,
            hashes: job
                .offer
                .files
                .iter()
                .map(|f| (f.path.clone(), f.hashes.root))
                .collect(),
            files: job.paths.len(),
            bytes: job.offer.total_bytes(),
            blocks_received: 0,
            blocks_resumed: blocks,
            files_there: 0,
            after_commit: None,
            lane: transfer::LaneUsed::Quic,
        }
    }
}

/// How far the current transfer is, for progress bars: bytes verified or sent so far
/// of `total` (0 until the offer is known).
#[derive(Debug, Default)]
pub struct Tally {
    /// Files in the job.
    pub files: AtomicU64,
    /// Bytes of the whole job.
    pub total: AtomicU64,
    /// Bytes verified or sent so far.
    pub done: Arc<AtomicU64>,
}

/// A client endpoint with one identity; reusable for many jobs.
///
/// # Example
///
/// Push a file into an agent's import target, then pull an export's files back. The
/// agent here runs in the same program (hidden setup; the [crate] docs show it), but
/// it could be on any host the client reaches:
///
/// ```
/// use barge::client::{Client, Peer, PushOptions};
/// use barge::net::tls::TlsFiles;
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let certs = dir.path().join("certs");
/// # barge::net::certs::init_ca(&certs)?;
/// # barge::net::certs::issue(&certs, "store-b", &[])?;
/// # barge::net::certs::issue(&certs, "operator", &[])?;
/// # for d in ["ingest", "outbox", "src"] {
/// #     std::fs::create_dir(dir.path().join(d))?;
/// # }
/// # std::fs::write(dir.path().join("outbox/000007.sst"), b"an exported file")?;
/// # let config = barge::config::Config::parse(r#"
/// #     listen = "127.0.0.1:0"
/// #     [tls]
/// #     ca = "certs/ca.pem"
/// #     cert = "certs/store-b.pem"
/// #     key = "certs/store-b.key"
/// #     [[import]]
/// #     name = "ingest"
/// #     path = "ingest"
/// #     allow = ["operator"]
/// #     [[export]]
/// #     name = "outbox"
/// #     path = "outbox"
/// #     allow = ["operator"]
/// # "#, dir.path())?;
/// # let agent = barge::agent::Agent::start(config).await?;
/// # let addr = agent.local_addr();
/// # let (file, pulled) = (dir.path().join("src/000042.sst"), dir.path().join("pulled"));
/// # std::fs::write(&file, b"an immutable file")?;
/// // This side's identity: `certs` holds ca.pem, operator.pem and operator.key, as
/// // `barge certs` makes them. The agent's allow lists name "operator".
/// let client = Client::new(&TlsFiles::in_dir(&certs, "operator"))?;
/// // The agent: the name its certificate must carry, and its address.
/// let peer: Peer = format!("store-b@{addr}").parse()?;
///
/// // Every block is verified as it arrives; the import commits all files or none.
/// let sent = client.push(&peer, "ingest", &[file], &PushOptions::default()).await?;
/// assert_eq!((sent.files, sent.bytes_total), (1, 17));
///
/// // Every file of the export (an empty list asks for all), into a local folder.
/// let got = client.pull(&peer, "outbox", &[], &pulled).await?;
/// assert_eq!(got.files, 1);
/// assert_eq!(std::fs::read(pulled.join("000007.sst"))?, b"an exported file");
/// # agent.shutdown().await;
/// # Ok(()) }
/// ```
pub struct Client {
    endpoint: quinn::Endpoint,
    connect_timeout: std::time::Duration,
    disk: Disk,
    cache: Arc<HashCache>,
    tally: Arc<Tally>,
    /// The encrypted TCP lane's client side (same identity as on QUIC).
    lane_tls: Arc<rustls::ClientConfig>,
    /// Its server side, for pulls on the lane.
    lane_server: Arc<rustls::ServerConfig>,
    /// The listener of pulls on the lane, opened by the first such pull.
    pull_lanes: tokio::sync::OnceCell<crate::net::tcplane::TcpLanes>,
}

impl Client {
    /// Loads the identity and opens a local UDP endpoint with default tuning.
    pub fn new(tls: &TlsFiles) -> Result<Client, TransferError> {
        Client::with_tuning(tls, &Tuning::default())
    }

    /// Like [`Client::new`], with explicit QUIC tuning.
    pub fn with_tuning(tls: &TlsFiles, tuning: &Tuning) -> Result<Client, TransferError> {
        Client::with_material(&TlsMaterial::load(tls)?, tuning)
    }

    /// Like [`Client::with_tuning`], with certificates already loaded.
    pub fn with_material(material: &TlsMaterial, tuning: &Tuning) -> Result<Client, TransferError> {
        let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
        let udp_err = |e| TransferError::Io {
            path: "udp socket".into(),
            source: e,
        };
        let (sock, buffers) = crate::net::quic::udp_socket(bind, tuning).map_err(udp_err)?;
        // The CLI warns only on request: a user's push still works with smaller buffers.
        tracing::debug!(?buffers, "udp socket");
        let mut endpoint = crate::net::quic::endpoint(sock, None, tuning).map_err(udp_err)?;
        endpoint.set_default_client_config(material.client_config(tuning)?);
        let lane_tls = material.lane_client_config()?;
        let lane_server = material.lane_server_config()?;
        let disk = Disk::start().map_err(|e| TransferError::Io {
            path: "io_uring".into(),
            source: e,
        })?;
        Ok(Client {
            endpoint,
            connect_timeout: tuning.connect_timeout,
            disk,
            cache: Arc::new(HashCache::in_memory()),
            tally: Arc::default(),
            lane_tls,
            lane_server,
            pull_lanes: tokio::sync::OnceCell::new(),
        })
    }

    /// Uses `cache` (for example a persistent one) for the hashes of pushed files.
    pub fn set_hash_cache(&mut self, cache: Arc<HashCache>) {
        self.cache = cache;
    }

    /// Progress of the transfer under way (reset when one starts).
    pub fn tally(&self) -> Arc<Tally> {
        self.tally.clone()
    }

    fn start_tally(&self, files: usize, total: u64) {
        self.tally.files.store(files as u64, Ordering::Relaxed);
        self.tally.total.store(total, Ordering::Relaxed);
        self.tally.done.store(0, Ordering::Relaxed);
    }

    /// The hash cache, to see how many files a push had to read and hash.
    pub fn hash_cache(&self) -> &Arc<HashCache> {
        &self.cache
    }

    /// Closes every connection and gives the endpoint a moment to send the close: call
    /// before the process exits, so agents do not hold the connection until it times
    /// out. It does not wait out the draining period (three probe timeouts, ~230 ms on a
    /// 20 ms link): every job's answer is in by now, and a lost close only costs the
    /// agent an idle connection.
    pub async fn close(&self) {
        self.endpoint.close(quinn::VarInt::from_u32(0), b"done");
        let _ = tokio::time::timeout(std::time::Duration::from_millis(20), self.endpoint.wait_idle()).await;
    }

    /// The listener pulls on the lane grant their tokens on (all addresses, a port of
    /// its own), opened once.
    async fn pull_lanes(&self) -> Result<&crate::net::tcplane::TcpLanes, TransferError> {
        let open = || async {
            let any: SocketAddr = ([0, 0, 0, 0], 0).into();
            let limits = crate::net::tcplane::DEFAULT_LIMITS;
            crate::net::tcplane::TcpLanes::start(any, limits, self.lane_server.clone()).await
        };
        let lanes = self.pull_lanes.get_or_try_init(open).await;
        lanes.map_err(|source| TransferError::Io {
            path: "tcp lane listener".into(),
            source,
        })
    }

    /// What a TLS lane to `peer` needs: the lane's client side and `peer`'s name.
    pub(crate) fn lane_tls_for(&self, peer: &Peer) -> Option<transfer::LaneTls> {
        let server = rustls::pki_types::ServerName::try_from(peer.name.clone()).ok()?;
        Some(transfer::LaneTls {
            config: self.lane_tls.clone(),
            server,
        })
    }

    /// The certificate `peer` presents (a new connection, closed again).
    pub async fn peer_certificate(&self, peer: &Peer) -> Result<crate::net::tls::CertInfo, TransferError> {
        let conn = self.connect(peer).await?;
        let cert = crate::net::tls::peer_cert(&conn);
        conn.close(quinn::VarInt::from_u32(0), b"done");
        cert.ok_or_else(|| connect_err(peer, "its certificate does not parse"))
    }

    /// Opens an authenticated connection to `peer`.
    pub async fn connect(&self, peer: &Peer) -> Result<quinn::Connection, TransferError> {
        let addr = tokio::net::lookup_host(&peer.addr)
            .await
            .map_err(|e| connect_err(peer, e))?
            .next()
            .ok_or_else(|| connect_err(peer, "no address"))?;
        let connecting = self
            .endpoint
            .connect(addr, &peer.name)
            .map_err(|e| connect_err(peer, e))?;
        let limit = self.connect_timeout;
        match tokio::time::timeout(limit, connecting).await {
            Ok(r) => r.map_err(|e| transfer::revoked(&e).unwrap_or_else(|| connect_err(peer, e))),
            Err(_) => Err(connect_err(peer, format!("no answer within {}s", limit.as_secs()))),
        }
    }

    /// Pushes files and folders into `target` on `peer` and waits for the commit.
    pub async fn push(
        &self,
        peer: &Peer,
        target: &str,
        paths: &[PathBuf],
        opts: &PushOptions,
    ) -> Result<SendReport, TransferError> {
        let paths = paths.to_vec();
        let files = async {
            let t = std::time::Instant::now();
            let walk = tokio::task::spawn_blocking(move || crate::store::source::collect_push(&paths));
            let files = walk.await.expect("walk task")?;
            tracing::debug!(files = files.len(), ms = t.elapsed().as_millis() as u64, "walked");
            Ok(files)
        };
        self.send(peer, target, files, opts).await
    }

    /// Pushes files under names the caller chose: `(relative name, local path)`.
    pub async fn push_named(
        &self,
        peer: &Peer,
        target: &str,
        files: &[(String, PathBuf)],
        opts: &PushOptions,
    ) -> Result<SendReport, TransferError> {
        let files = crate::store::source::collect_named(files)?;
        self.send(peer, target, async { Ok(files) }, opts).await
    }

    /// Sends `files` once listed. Connecting runs meanwhile, so the handshake is not on
    /// the way of the first block; if listing or hashing fails, that error returns at
    /// once and the connections are dropped (closed) unused.
    async fn send(
        &self,
        peer: &Peer,
        target: &str,
        files: impl std::future::Future<Output = Result<Vec<SourceFile>, TransferError>>,
        opts: &PushOptions,
    ) -> Result<SendReport, TransferError> {
        let prepared = async { self.prepare(target, files.await?, opts).await };
        let connected = async {
            let mut conns = vec![self.connect(peer).await?];
            for _ in 1..opts.connections.clamp(1, MAX_CONNECTIONS) {
                conns.push(self.connect(peer).await?);
            }
            Ok::<_, TransferError>(conns)
        };
        let ((offer, files), conns) = tokio::try_join!(prepared, connected)?;
        #[cfg_attr(not(feature = "faults"), allow(unused_mut))]
        let mut flow = Flow::new(Some(self.tally.done.clone()), None);
        flow.lane_tls = self.lane_tls_for(peer);
        #[cfg(feature = "faults")]
        {
            flow.fault = opts.fault.clone();
        }
        let (mut send, mut recv) = conns[0].open_bi().await?;
        let result = transfer::send_job(&conns, &mut send, &mut recv, offer, files, &self.disk, &flow).await;
        for c in &conns {
            log_path(c);
            c.close(quinn::VarInt::from_u32(0), b"done");
        }
        result
    }

    /// The offer for `files` (only the SST files in range, if asked), and the files it lists.
    async fn prepare(
        &self,
        target: &str,
        mut files: Vec<SourceFile>,
        opts: &PushOptions,
    ) -> Result<(Offer, Vec<SourceFile>), TransferError> {
        let mut spans = vec![];
        if opts.sst || opts.range.is_some() {
            let picked = crate::store::source::select_sst(files, opts.range.as_ref(), &self.cache)?;
            (files, spans) = picked.into_iter().map(|(f, s)| (f, Some(s))).unzip();
        }
        let t = std::time::Instant::now();
        let mut offer = crate::store::source::make_offer(target, &files, opts.meta.clone(), &self.cache).await?;
        tracing::debug!(files = files.len(), ms = t.elapsed().as_millis() as u64, "offer made");
        for (f, span) in offer.files.iter_mut().zip(spans) {
            f.keys = span;
        }
        offer.tcp_lane = opts.tcp_lane;
        offer.hold = opts.hold;
        self.start_tally(offer.files.len(), offer.total_bytes());
        Ok((offer, files))
    }

    /// Pulls `files` (all if empty) of `export` on `peer` into `into`.
    pub async fn pull(
        &self,
        peer: &Peer,
        export: &str,
        files: &[String],
        into: &Path,
    ) -> Result<PullReport, TransferError> {
        self.pull_into(peer, export, (files, None), into, PullOptions::default())
            .await
    }

    /// Pulls the SST files of `export` whose keys lie in `range` into `into`. The
    /// exporter refuses the pull if a file has keys across a boundary.
    pub async fn pull_range(
        &self,
        peer: &Peer,
        export: &str,
        range: &KeyRange,
        into: &Path,
    ) -> Result<PullReport, TransferError> {
        self.pull_into(peer, export, (&[], Some(range.clone())), into, PullOptions::default())
            .await
    }

    /// Lists the files of `export` (inside `range`, for an SST export).
    pub async fn list(
        &self,
        peer: &Peer,
        export: &str,
        range: Option<&KeyRange>,
    ) -> Result<Vec<ListedFile>, TransferError> {
        let ask = Message::List {
            export: export.to_string(),
            range: range.cloned(),
        };
        match self.request(peer, &ask).await? {
            Message::Listing(files) => Ok(files),
            _ => unreachable!("check_answer takes only a listing"),
        }
    }

    /// The receiving and held jobs on the targets this client may write to.
    pub async fn jobs(&self, peer: &Peer) -> Result<Vec<JobInfo>, TransferError> {
        match self.request(peer, &Message::ListJobs).await? {
            Message::Jobs(jobs) => Ok(jobs),
            _ => unreachable!("check_answer takes only a job list"),
        }
    }

    /// Commits a held job: the target's hook runs; returns its report.
    pub async fn commit(&self, peer: &Peer, job: JobId) -> Result<String, TransferError> {
        let op = Message::JobOp { op: JobOp::Commit, job };
        match self.request(peer, &op).await? {
            Message::Committed { report } => Ok(report),
            _ => unreachable!("check_answer takes only committed"),
        }
    }

    /// Aborts a held job: everything it staged is removed.
    pub async fn abort(&self, peer: &Peer, job: JobId) -> Result<(), TransferError> {
        let op = Message::JobOp { op: JobOp::Abort, job };
        self.request(peer, &op).await.map(drop)
    }

    /// Sends one request on a new stream and reads its answer; refusals are errors.
    async fn request(&self, peer: &Peer, msg: &Message) -> Result<Message, TransferError> {
        let conn = self.connect(peer).await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        transfer::write_msg(&mut send, msg).await?;
        let _ = send.finish();
        let answer = transfer::expect_msg(&mut recv, "an answer").await;
        conn.close(quinn::VarInt::from_u32(0), b"done");
        Ok(check_answer(msg, answer?)?)
    }

    /// Pulls `files` (all if empty; or, for an SST export, those in `range`) of
    /// `export` into `into`, doing `on_exists` with a name `into` already has: refuse
    /// the pull, skip a file with the same content (none of its bytes are sent, so a
    /// pull run again moves no data), or replace it.
    pub async fn pull_into(
        &self,
        peer: &Peer,
        export: &str,
        (files, range): (&[String], Option<KeyRange>),
        into: &Path,
        opts: PullOptions,
    ) -> Result<PullReport, TransferError> {
        std::fs::create_dir_all(into).map_err(|source| TransferError::Io {
            path: into.to_path_buf(),
            source,
        })?;
        let into = into.canonicalize().map_err(|source| TransferError::Io {
            path: into.to_path_buf(),
            source,
        })?;
        let conn = self.connect(peer).await?;
        let table = JobTable::default();
        let router = transfer::spawn_data_router(conn.clone(), table.clone(), peer.name.clone(), None);
        let (mut send, mut recv) = conn.open_bi().await?;
        let fetch = Message::Fetch {
            export: export.to_string(),
            files: files.to_vec(),
            range,
        };
        transfer::write_msg(&mut send, &fetch).await?;
        let lanes = match opts.tcp_lane {
            true => Some(self.pull_lanes().await?),
            false => None,
        };
        let lane = lanes.map(|lanes| transfer::LaneAt {
            lanes,
            ip: conn.remote_address().ip(),
            kind: crate::net::tcplane::LaneKind::Tls,
        });
        let pulling = (into.as_path(), &table, &fetch, opts.on_exists);
        let mut result = self.receive_pull(&peer.name, pulling, lane, &mut send, &mut recv).await;
        if let Ok(report) = &mut result {
            // Our last word (committed) is only queued: closing now would drop it, and
            // the exporter would count a pull that worked as failed. Wait until the
            // exporter has acknowledged it (transport-level, not read), briefly.
            let _ = tokio::time::timeout(transfer::REPLY_GRACE, send.stopped()).await;
            // An export with an `after_commit` command says how it went; others just
            // end the stream.
            report.after_commit = match transfer::read_msg(&mut recv).await {
                Ok(Some(Message::Committed { report })) => Some(Ok(report)),
                Ok(Some(Message::Failed(r))) => Some(Err(r.reason)),
                _ => None,
            };
        }
        router.abort();
        conn.close(quinn::VarInt::from_u32(0), b"done");
        result
    }

    async fn receive_pull(
        &self,
        peer: &str,
        (into, table, fetch, on_exists): (&Path, &JobTable, &Message, OnExists),
        lane: Option<transfer::LaneAt<'_>>,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<PullReport, TransferError> {
        let answer = transfer::expect_msg(recv, "an offer").await?;
        let Message::Offer(offer) = check_answer(fetch, answer)? else {
            unreachable!("check_answer takes only an offer")
        };
        if let Some(job) = finish_cut_off_pull(&offer, into) {
            let report = PullReport::already_placed(&job);
            transfer::confirm_committed(send, recv, &job, "pulled before".into()).await?;
            return Ok(report);
        }
        let (job, stage) = match prepare_pull(offer, into, &self.disk, on_exists).await {
            Ok(x) => x,
            Err(r) => {
                transfer::write_msg(send, &Message::Reject(r.clone())).await?;
                let _ = send.finish();
                return Err(TransferError::Rejected(r));
            }
        };
        self.start_tally(job.paths.len(), job.offer.total_bytes());
        self.tally
            .done
            .store(job.offer.total_bytes() - job.missing_bytes(), Ordering::Relaxed);
        let meter = crate::metrics::Meter {
            metrics: Arc::default(),
            limits: Arc::default(),
            peer: peer.to_string(),
            progress: Some(self.tally.done.clone()),
        };
        let mut report = PullReport {
            job: job.id,
            hashes: job
                .offer
                .files
                .iter()
                .map(|f| (f.path.clone(), f.hashes.root))
                .collect(),
            files: job.paths.len(),
            bytes: job.offer.total_bytes(),
            blocks_received: job.missing(),
            blocks_resumed: 0,
            files_there: job.there().iter().filter(|t| **t).count(),
            after_commit: None,
            lane: match lane.is_some() && job.offer.tcp_lane {
                true => transfer::LaneUsed::Tls,
                false => transfer::LaneUsed::Quic,
            },
        };
        let total: u64 = job
            .offer
            .files
            .iter()
            .map(|f| crate::proto::blocks::block_count(f.hashes.size))
            .sum();
        let there: u64 = (job.offer.files.iter().zip(job.there()))
            .filter(|(_, t)| **t)
            .map(|(f, _)| crate::proto::blocks::block_count(f.hashes.size))
            .sum();
        report.blocks_resumed = total - job.missing() - there;
        let skip = job.there().to_vec();
        let kind = match on_exists {
            OnExists::Replace => Kind::Replace,
            _ => Kind::Move,
        };
        let st = stage.clone();
        let (into2, peer2, id) = (into.to_path_buf(), peer.to_string(), job.id.to_string());
        let hook = move |_offer, paths: Vec<crate::proto::path::RelPath>| async move {
            let paths: Vec<_> = (paths.into_iter().zip(skip))
                .filter(|(_, there)| !there)
                .map(|(p, _)| p)
                .collect();
            let place = move || {
                let info = JobRef {
                    job: id,
                    target: "pull",
                    target_dir: &into2,
                    peer: &peer2,
                    held: false,
                    dir_mode: None,
                };
                // The intent lives in the job's staging folder: a pull cut off while
                // placing finishes when the same pull runs again.
                let ledger = Ledger::open(st.job_dir.clone())?;
                crate::store::commit::place(kind, &st, &paths, info, &ledger).map(|_| st.remove())
            };
            let res = tokio::task::spawn_blocking(place).await.expect("move task");
            res.map(|_| Received::Committed("pulled".to_string()))
                .map_err(|e| e.refusal())
        };
        let at = transfer::ReceiveAt {
            peer,
            disk: &self.disk,
            table,
            meter: Some(&meter),
            tcp: lane,
            space: None,
            stall: None,
            dir_mode: None,
            relay: None,
        };
        let received = transfer::receive_job(send, recv, job, stage, at, hook).await;
        match received.map_err(transfer::after_accept)? {
            Received::Committed(_) | Received::Held => Ok(report),
            Received::Aborted => Err(TransferError::Failed(Refusal::new(
                crate::proto::wire::code::ABORTED,
                "the exporter aborted the pull",
            ))),
        }
    }
}

/// Finishes a pull of the same job that a crash cut off while it placed the files; if
/// that placed them, returns the job, for the exporter to be told it is done.
fn finish_cut_off_pull(offer: &Offer, into: &Path) -> Option<ReceiveJob> {
    let id = offer.job_id().to_string();
    let job_dir = into.join(crate::proto::path::STAGING_DIR).join(&id);
    let ledger = Ledger::open(job_dir.clone()).ok().filter(|_| job_dir.is_dir())?;
    let intent = ledger.intent(&id)?.ok()?;
    if intent.target_dir != into || intent.job_dir != job_dir {
        return None;
    }
    match intent.apply() {
        Ok(()) => {
            Stage::at(job_dir).remove();
            ReceiveJob::new(offer.clone()).ok()
        }
        Err(u) => {
            if u.back.is_ok() {
                let _ = ledger.abandon(&id);
            }
            None
        }
    }
}

async fn prepare_pull(
    offer: crate::proto::wire::Offer,
    into: &Path,
    disk: &Disk,
    on_exists: OnExists,
) -> Result<(ReceiveJob, Stage), Refusal> {
    let mut job = ReceiveJob::new(offer).map_err(|e| e.refusal())?;
    let hook: Box<dyn ImportHook> = match on_exists {
        OnExists::Refuse => Box::new(MoveHook::default()),
        OnExists::SkipIdentical => Box::new(MoveHook { skip_identical: true }),
        OnExists::Replace => Box::new(ReplaceHook),
    };
    hook.check(into, &job.paths).map_err(|e| e.refusal())?;
    let roots: Vec<_> = (job.paths.iter().cloned())
        .zip(job.offer.files.iter().map(|f| f.hashes.root))
        .collect();
    let there = hook.already_there(into, &roots).map_err(|e| e.refusal())?;
    (there.iter().enumerate())
        .filter(|(_, t)| **t)
        .for_each(|(i, _)| job.already_there(i));
    let stage = Stage::open(&into.join(crate::proto::path::STAGING_DIR), &job).map_err(|e| e.refusal())?;
    stage.scan(&mut job, disk).await;
    check_space(into, job.missing_bytes(), DEFAULT_RESERVE).map_err(|e| e.refusal())?;
    Ok((job, stage))
}

/// What the connection's path looked like (debug): round trip, window, losses.
fn log_path(c: &quinn::Connection) {
    let p = c.stats().path;
    tracing::debug!(
        rtt_us = p.rtt.as_micros() as u64,
        cwnd = p.cwnd,
        sent = p.sent_packets,
        lost = p.lost_packets,
        congestion_events = p.congestion_events,
        mtu = p.current_mtu,
        "path"
    );
}

fn connect_err(peer: impl std::fmt::Display, e: impl std::fmt::Display) -> TransferError {
    TransferError::Connect {
        peer: peer.to_string(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_in_both_forms() {
        let p: Peer = "store-b:7878".parse().unwrap();
        assert_eq!(
            p,
            Peer {
                name: "store-b".into(),
                addr: "store-b:7878".into()
            }
        );
        let p: Peer = "store-b@127.0.0.1:9000".parse().unwrap();
        assert_eq!(
            p,
            Peer {
                name: "store-b".into(),
                addr: "127.0.0.1:9000".into()
            }
        );
        let p: Peer = "b@[::1]:9000".parse().unwrap();
        assert_eq!(p.addr, "[::1]:9000");
        let p: Peer = "[::1]:9000".parse().unwrap();
        assert_eq!(p.name, "::1");
        for bad in [
            "nohost",
            "a@b",
            "x:notaport",
            "@1.2.3.4:5",
            ":80",
            "recv@[::1:18701",
            "recv@127.0.0.1:18701:5",
            "recv@host:0",
            "re cv@1.2.3.4:5",
            "a..b:80",
            "[::1:80",
        ] {
            assert!(bad.parse::<Peer>().is_err(), "{bad}");
        }
    }
}
