//! Agent configuration: a TOML file parsed into raw structs, then validated in one
//! place into a [`Config`] whose paths exist, whose TLS material loads and whose
//! targets do not overlap. Every refusal names the key and the problem.

use crate::net::quic::{Congestion, Tuning};
use crate::net::tcplane::LaneKind;
use crate::net::tls::{TlsFiles, TlsMaterial};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Port the agent listens on when the config does not say.
pub const DEFAULT_PORT: u16 = 7878;
/// How long an interrupted job's staged blocks are kept for a resume.
pub const DEFAULT_STAGING_TTL: Duration = Duration::from_secs(24 * 3600);
/// Held jobs (`push --hold`) wait this long for commit or abort by default: a week.
pub const DEFAULT_HOLD_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// On SIGTERM, running jobs get this long to finish by default.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(60);
/// QUIC connections one agent keeps at once by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Free space kept on a target's file system by default.
pub const DEFAULT_RESERVE: u64 = crate::store::space::DEFAULT_RESERVE;
/// Memory for received data (data streams open at once), all jobs together, by default.
pub const DEFAULT_MEMORY: u64 = 192 << 20;
/// Jobs one agent runs at once.
pub const DEFAULT_MAX_JOBS: usize = 64;
/// How long an exec hook may run by default before its process group is killed.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(600);

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has keys barge does not know.
    #[error("{path}: {message}")]
    Parse {
        /// The configuration file.
        path: PathBuf,
        /// The TOML parser's message.
        message: String,
    },
    /// A key has a value barge can not use.
    #[error("config key `{key}`: {problem}")]
    Invalid {
        /// The key, as written in the file (`limits.max_connections`).
        key: String,
        /// What is wrong with its value.
        problem: String,
    },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    staging_ttl_secs: Option<u64>,
    hold_ttl_secs: Option<u64>,
    drain_secs: Option<u64>,
    metrics: Option<String>,
    #[serde(default)]
    limits: RawLimits,
    max_jobs: Option<usize>,
    tcp_port: Option<u16>,
    tls: RawTls,
    #[serde(default)]
    transport: RawTransport,
    #[serde(default)]
    export: Vec<RawTarget>,
    #[serde(default)]
    import: Vec<RawTarget>,
}

/// The `[tls]` table as written (also used by the zdb hook's config).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    crl: Vec<PathBuf>,
    #[serde(default)]
    watch: bool,
}

impl RawTls {
    /// The files, relative paths taken from `base`.
    pub(crate) fn under(self, base: &Path) -> TlsFiles {
        TlsFiles {
            ca: base.join(self.ca),
            cert: base.join(self.cert),
            key: base.join(self.key),
            crl: self.crl.iter().map(|p| base.join(p)).collect(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransport {
    congestion: Option<Congestion>,
    bandwidth_mbit: Option<u64>,
    rtt_ms: Option<u64>,
    max_mtu: Option<u16>,
    idle_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    rate_mbit: Option<u64>,
    peer_rate_mbit: Option<u64>,
    max_connections: Option<usize>,
    max_staged_mib: Option<u64>,
    reserve_mib: Option<u64>,
    memory_mib: Option<u64>,
    identity_connections: Option<usize>,
    identity_jobs: Option<usize>,
    identity_streams: Option<usize>,
    identity_staged_mib: Option<u64>,
    stall_secs: Option<u64>,
    idle_connection_secs: Option<u64>,
    tcp_lane_pending: Option<usize>,
    tcp_lane_pending_per_ip: Option<usize>,
}

/// Admission control and rate limits; all but the connection limit apply on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Data rates in bytes per second (received for pushes, sent for pulls).
    pub rates: crate::metrics::ratelimit::Rates,
    /// QUIC connections at once; more are closed with a reason.
    pub max_connections: usize,
    /// Bytes staged at once (jobs being received plus held jobs); a job that would
    /// go over is refused before any data moves.
    pub max_staged_bytes: Option<u64>,
    /// Free space kept on a target's file system: a job that would eat into it is refused.
    pub reserve_bytes: u64,
    /// Memory for received data, all connections and jobs together: it sets how many
    /// data streams may be open at once (see `credit`).
    pub memory_bytes: u64,
    /// What one peer identity may take of the agent, so that no identity locks out
    /// the others.
    pub identity: IdentityLimits,
    /// A job whose data does not move for this long is given up (it resumes when sent
    /// again); a pull whose client does not answer likewise.
    pub stall: Duration,
    /// A connection with no request open for this long is closed.
    pub idle_connection: Duration,
    /// TCP lane connections waiting for their token at once, in total
    /// (`tcp_lane_pending`, 64) and from one IP address (`tcp_lane_pending_per_ip`, 8);
    /// more are closed at once.
    pub tcp_lane_pending: crate::net::listen::PendingLimits,
}

/// Limits per peer identity. The defaults leave a quarter of each agent-wide limit to
/// the other identities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityLimits {
    /// QUIC connections at once (`limits.identity_connections`).
    pub connections: usize,
    /// Jobs being received or held at once (`limits.identity_jobs`).
    pub jobs: usize,
    /// Requests (control streams) being served at once.
    pub streams: usize,
    /// Bytes staged at once (`limits.identity_staged_mib`); `None`: only the agent-wide
    /// limit.
    pub staged_bytes: Option<u64>,
}

/// Requests besides its jobs one identity may have served at once by default (listings,
/// job operations).
pub const EXTRA_IDENTITY_STREAMS: usize = 16;

/// Requests one identity may have served at once by default: its share of jobs, and a
/// few more.
fn default_streams(max_jobs: usize) -> usize {
    share(max_jobs) + EXTRA_IDENTITY_STREAMS
}
/// A job without progress for this long is given up, by default.
pub const DEFAULT_STALL: Duration = Duration::from_secs(60);
/// A connection with no request open is closed after this long, by default.
pub const DEFAULT_IDLE_CONNECTION: Duration = Duration::from_secs(60);

/// Three quarters of an agent-wide limit, at least 1: one identity's default share.
fn share(total: usize) -> usize {
    (total - total / 4).max(1)
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            rates: Default::default(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_staged_bytes: None,
            reserve_bytes: DEFAULT_RESERVE,
            memory_bytes: DEFAULT_MEMORY,
            identity: IdentityLimits {
                connections: share(DEFAULT_MAX_CONNECTIONS),
                jobs: share(DEFAULT_MAX_JOBS),
                streams: default_streams(DEFAULT_MAX_JOBS),
                staged_bytes: None,
            },
            stall: DEFAULT_STALL,
            idle_connection: DEFAULT_IDLE_CONNECTION,
            tcp_lane_pending: crate::net::tcplane::DEFAULT_LIMITS,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: String,
    path: PathBuf,
    #[serde(default)]
    allow: Vec<String>,
    hook: Option<String>,
    exec: Option<Vec<String>>,
    exec_env: Option<Vec<String>>,
    exec_timeout_secs: Option<u64>,
    exec_stderr_to_sender: Option<bool>,
    after_commit: Option<Vec<String>>,
    after_commit_env: Option<Vec<String>>,
    after_commit_timeout_secs: Option<u64>,
    tcp_lane: Option<toml::Value>,
    tcp_lane_peers: Option<Vec<String>>,
    kind: Option<ExportKind>,
    #[serde(default)]
    operators: Vec<String>,
    #[serde(default)]
    relay_from: Vec<String>,
    #[serde(default)]
    ship: Vec<String>,
    on_exists: Option<OnExists>,
    file_mode: Option<String>,
    dir_mode: Option<String>,
    staging: Option<PathBuf>,
}

/// What an export holds, and so how a range selects its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportKind {
    /// Any files; a key range can not be asked for.
    #[default]
    Files,
    /// RocksDB block-based table files (`*.sst`): a range selects them by their keys.
    Sst,
}

/// Peer identities allowed on a target; `*` allows every peer the CA vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList(pub Vec<String>);

impl Import {
    /// The TCP lane this target grants `peer`, if any.
    pub fn lane_for(&self, peer: &str) -> Option<LaneKind> {
        let open = self.tcp_lane_peers.as_ref().is_none_or(|l| l.allows(peer));
        self.tcp_lane.filter(|_| open)
    }
}

impl AllowList {
    /// Whether `identity` is on the list, or the list has `*`.
    pub fn allows(&self, identity: &str) -> bool {
        self.0.iter().any(|a| a == "*" || a == identity)
    }
}

/// What runs when an import job has been received and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookSpec {
    /// Rename the files into the target folder under their relative names.
    Move,
    /// Like `Move`, but a file replaces an older one of the same name (atomically per
    /// file): for mutable files such as 0-db index files.
    Replace,
    /// Run a command with the staged files (see `hook::ExecHook`).
    Exec(ExecSpec),
    /// A Rust `ImportHook` registered by the program that embeds the agent.
    Custom,
}

/// An exec hook's command and how it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    /// `exec`: the command and its first arguments.
    pub argv: Vec<String>,
    /// `exec_env`: names of variables copied from the agent's environment (when set
    /// there) into the hook's otherwise cleared one, besides `BARGE_*` and `PATH`.
    pub env: Vec<String>,
    /// `exec_timeout_secs` (600): a run that takes longer is killed (its whole process
    /// group) and the job fails.
    pub timeout: Duration,
    /// `exec_stderr_to_sender` (false): whether a failing hook's stderr reaches the
    /// sender; it always goes to the agent's log.
    pub stderr_to_sender: bool,
}

/// A folder peers may read from.
#[derive(Debug, Clone)]
pub struct Export {
    /// The name peers pull by.
    pub name: String,
    /// The folder (a relative path in the file is taken from the file's folder).
    pub path: PathBuf,
    /// Identities that may list and pull its files.
    pub allow: AllowList,
    /// What it holds: any files, or SST files a key range can select.
    pub kind: ExportKind,
    /// `after_commit`: a command run on this agent once a receiver committed a pull
    /// from this export (see `hook::AfterCommitHook`).
    pub after_commit: Option<AfterCommitSpec>,
    /// `ship`: identities that may order this agent to send the export's files to
    /// another agent (`barge ship`); separate from `allow`, which lets a peer pull.
    pub ship: AllowList,
    /// The TCP data lane pulls may use: the puller listens, this agent connects and
    /// sends (TLS unless `"cleartext"`).
    pub tcp_lane: Option<LaneKind>,
    /// `tcp_lane_peers`: the pullers the lane is open to; `None`: every allowed one.
    pub tcp_lane_peers: Option<AllowList>,
}

impl Export {
    /// The TCP lane this export sends a pull by `peer` on, if any.
    pub fn lane_for(&self, peer: &str) -> Option<LaneKind> {
        let open = self.tcp_lane_peers.as_ref().is_none_or(|l| l.allows(peer));
        self.tcp_lane.filter(|_| open)
    }
}

/// An export's `after_commit` command and how it runs: like an import's exec hook,
/// in a cleared environment and with a time limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AfterCommitSpec {
    /// `after_commit`: the command and its arguments (no file paths are added).
    pub argv: Vec<String>,
    /// `after_commit_env`: names of variables copied from the agent's environment (when
    /// set there) into the command's otherwise cleared one, besides `BARGE_*` and `PATH`.
    pub env: Vec<String>,
    /// `after_commit_timeout_secs` (600): a run that takes longer is killed (its whole
    /// process group) and counted as failed.
    pub timeout: Duration,
}

/// A folder peers may write to, and the hook that hands their files to the engine.
#[derive(Debug, Clone)]
pub struct Import {
    /// The name peers push to.
    pub name: String,
    /// The folder the engine reads (a relative path in the file is taken from the file's
    /// folder).
    pub path: PathBuf,
    /// Identities that may push to it.
    pub allow: AllowList,
    /// What hands a committed job's files to the engine.
    pub hook: HookSpec,
    /// The TCP data lane senders may use for this target, if any: TLS (`tcp_lane =
    /// true` or `"tls"`) or clear text (`"cleartext"`).
    pub tcp_lane: Option<LaneKind>,
    /// `tcp_lane_peers`: the senders the lane is open to; `None`: every allowed sender.
    pub tcp_lane_peers: Option<AllowList>,
    /// Identities that may list, commit and abort other senders' held jobs here.
    pub operators: AllowList,
    /// `relay_from`: senders whose jobs this target forwards to the next replica of a
    /// relay chain, with this agent's identity. Empty: it relays for nobody.
    pub relay_from: AllowList,
    /// What a `move` does with a name the target already has.
    pub on_exists: OnExists,
    /// Modes its files and the folders a job brings get, instead of the sender's
    /// (files) and the agent's umask (folders).
    pub file_mode: Option<u32>,
    /// `dir_mode`: the mode of folders a job brings, instead of the agent's umask.
    pub dir_mode: Option<u32>,
    /// Where its jobs are staged: a folder on the target's file system, outside the
    /// target: `staging` if given, else `data_dir/staging/NAME` when `data_dir` is on
    /// that file system, else `<target>/.barge-staging`.
    pub staging: PathBuf,
    /// The staging folder lies inside the target (no `staging` given, and `data_dir` is
    /// on another file system): an engine that scans the target sees it while a job runs.
    pub staging_in_target: bool,
}

impl Import {
    /// Staging folders an earlier version made inside the target
    /// (`<target>/.barge-staging`): still swept, and trusted for held jobs and intents.
    pub fn legacy_staging(&self) -> PathBuf {
        self.path.join(crate::proto::path::STAGING_DIR)
    }
}

/// What a `move` import does with a name the target already has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnExists {
    /// Refuse the job, naming the file.
    #[default]
    Refuse,
    /// A file with the same blake3 root counts as delivered (its bytes are not sent);
    /// other content is refused.
    SkipIdentical,
    /// The file is replaced, atomically (as `hook = "replace"`).
    Replace,
}

impl std::str::FromStr for OnExists {
    type Err = String;

    /// `refuse`, `skip-identical` or `replace`, as in the config.
    fn from_str(s: &str) -> Result<OnExists, String> {
        match s {
            "refuse" => Ok(OnExists::Refuse),
            "skip-identical" => Ok(OnExists::SkipIdentical),
            "replace" => Ok(OnExists::Replace),
            _ => Err(format!("{s:?} is not refuse, skip-identical or replace")),
        }
    }
}

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The UDP address the QUIC endpoint binds (`listen`).
    pub listen: SocketAddr,
    /// The agent's own state: held-job journal, commit intents, staging (`data_dir`).
    pub data_dir: PathBuf,
    /// CA, certificate, key and revocation lists of this agent (`[tls]`); read again
    /// on every reload.
    pub tls: TlsFiles,
    /// Reload `tls` by itself when its files change (`[tls] watch`).
    pub tls_watch: bool,
    /// Folders peers may pull from.
    pub exports: Vec<Export>,
    /// Folders peers may push to.
    pub imports: Vec<Import>,
    /// How long a staged, unfinished job may wait to be resumed before it is removed.
    pub staging_ttl: Duration,
    /// How long a held job (`push --hold`) waits for commit or abort before it is removed.
    pub hold_ttl: Duration,
    /// On SIGTERM, how long running jobs may take to finish before the agent exits.
    pub drain: Duration,
    /// Loopback address of the Prometheus endpoint, if on.
    pub metrics: Option<SocketAddr>,
    /// Admission limits, budgets per identity, and rates.
    pub limits: Limits,
    /// Jobs received or held at once, over all identities (`max_jobs`).
    pub max_jobs: usize,
    /// QUIC transport tuning (`[transport]`).
    pub tuning: Tuning,
    /// Port of the TCP data lane listener (0: any free port), if an import allows the lane.
    pub tcp_port: u16,
}

impl Config {
    /// Reads and validates a TOML file. Relative paths are taken from the file's folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("config"),
            message: e.message().to_string(),
        })?;
        validate(raw, base)
    }

    /// The local default: listen on 127.0.0.1, data under `base` (`./barge-data`),
    /// development certificates made there on first start, one import target `inbox`
    /// and one export `outbox` open to any peer the dev CA vouches for.
    /// Returns the config and whether certificates were made.
    pub fn local_default(base: &Path) -> Result<(Config, bool), ConfigError> {
        let certs = base.join("certs");
        let made = crate::net::certs::ensure_dev_certs(&certs, &["localhost", "client"])
            .map_err(|e| invalid("tls", e.to_string()))?;
        for dir in ["inbox", "outbox"] {
            let p = base.join(dir);
            std::fs::create_dir_all(&p).map_err(|e| invalid("data_dir", format!("{}: {e}", p.display())))?;
        }
        let text = format!(
            r#"listen = "127.0.0.1:{DEFAULT_PORT}"
data_dir = "."
[tls]
ca = "certs/ca.pem"
cert = "certs/localhost.pem"
key = "certs/localhost.key"
[[import]]
name = "inbox"
path = "inbox"
allow = ["*"]
[[export]]
name = "outbox"
path = "outbox"
allow = ["*"]
"#
        );
        Ok((Config::parse(&text, base)?, made))
    }

    /// The import target of that name.
    pub fn import(&self, name: &str) -> Option<&Import> {
        self.imports.iter().find(|t| t.name == name)
    }

    /// The export of that name.
    pub fn export(&self, name: &str) -> Option<&Export> {
        self.exports.iter().find(|t| t.name == name)
    }

    /// Whether `identity` is on any allow or operators list: an identity on none may
    /// open nothing on this agent.
    pub fn knows(&self, identity: &str) -> bool {
        let imports = self.imports.iter().flat_map(|t| [&t.allow, &t.operators]);
        let exports = self.exports.iter().flat_map(|t| [&t.allow, &t.ship]);
        imports.chain(exports).any(|a| a.allows(identity))
    }
}

fn validate(raw: RawConfig, base: &Path) -> Result<Config, ConfigError> {
    let listen = match raw.listen.as_deref() {
        None => SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
        Some(s) => s
            .parse()
            .map_err(|_| invalid("listen", format!("{s:?} is not ADDR:PORT")))?,
    };
    let data_dir = base.join(raw.data_dir.unwrap_or_else(|| PathBuf::from("barge-data")));
    std::fs::create_dir_all(&data_dir).map_err(|e| invalid("data_dir", format!("{}: {e}", data_dir.display())))?;
    let tls_watch = raw.tls.watch;
    let tls = raw.tls.under(base);
    let tls = TlsFiles {
        ca: existing_file("tls.ca", &tls.ca)?,
        cert: existing_file("tls.cert", &tls.cert)?,
        key: existing_file("tls.key", &tls.key)?,
        crl: tls
            .crl
            .iter()
            .map(|p| existing_file("tls.crl", p))
            .collect::<Result<_, _>>()?,
    };
    TlsMaterial::load(&tls).map_err(|e| invalid(tls_key(&tls, &e), e.to_string()))?;
    let exports = raw
        .export
        .into_iter()
        .enumerate()
        .map(|(i, t)| target(&format!("export[{i}]"), t, base, false))
        .collect::<Result<Vec<_>, _>>()?;
    let imports = raw
        .import
        .into_iter()
        .enumerate()
        .map(|(i, t)| target(&format!("import[{i}]"), t, base, true))
        .collect::<Result<Vec<_>, _>>()?;
    check_unique("export", exports.iter().map(|e| &e.0.name))?;
    check_unique("import", imports.iter().map(|e| &e.0.name))?;
    check_no_overlap(&imports)?;
    check_data_dir(&data_dir, imports.iter().map(|t| ("import", &t.0)))?;
    check_data_dir(&data_dir, exports.iter().map(|t| ("export", &t.0)))?;
    let staging_ttl = raw
        .staging_ttl_secs
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_STAGING_TTL);
    let hold_ttl = raw.hold_ttl_secs.map(Duration::from_secs).unwrap_or(DEFAULT_HOLD_TTL);
    let drain = raw.drain_secs.map(Duration::from_secs).unwrap_or(DEFAULT_DRAIN);
    let metrics = raw.metrics.as_deref().map(metrics_addr).transpose()?;
    let max_jobs = raw.max_jobs.unwrap_or(DEFAULT_MAX_JOBS);
    if max_jobs == 0 {
        return Err(invalid("max_jobs", "must be at least 1"));
    }
    let limits = limits(&raw.limits, max_jobs)?;
    let tuning = tuning(&raw.transport)?;
    let stagings = imports
        .iter()
        .map(|(t, _)| staging_root(t, &data_dir, base))
        .collect::<Result<Vec<_>, _>>()?;
    let mut stagings = stagings.into_iter();
    Ok(Config {
        tuning,
        listen,
        data_dir,
        tls,
        tls_watch,
        exports: exports
            .into_iter()
            .map(|(t, _)| Export {
                name: t.name,
                path: t.path,
                allow: t.allow,
                kind: t.kind,
                after_commit: t.after_commit,
                ship: t.ship,
                tcp_lane: t.tcp_lane,
                tcp_lane_peers: t.tcp_lane_peers,
            })
            .collect(),
        imports: imports
            .into_iter()
            .map(|(t, hook)| Import {
                name: t.name,
                path: t.path,
                allow: t.allow,
                hook,
                tcp_lane: t.tcp_lane,
                tcp_lane_peers: t.tcp_lane_peers,
                operators: t.operators,
                relay_from: t.relay_from,
                on_exists: t.on_exists,
                file_mode: t.file_mode,
                dir_mode: t.dir_mode,
                staging_in_target: false,
                staging: PathBuf::new(),
            })
            .zip(stagings.by_ref())
            .map(|(mut t, (staging, inside))| {
                (t.staging, t.staging_in_target) = (staging, inside);
                t
            })
            .collect(),
        staging_ttl,
        hold_ttl,
        drain,
        metrics,
        limits,
        max_jobs,
        tcp_port: raw.tcp_port.unwrap_or(0),
    })
}

fn metrics_addr(text: &str) -> Result<SocketAddr, ConfigError> {
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| invalid("metrics", format!("{text:?} is not IP:PORT")))?;
    if !addr.ip().is_loopback() {
        return Err(invalid(
            "metrics",
            "must be a loopback address (metrics name peers and targets)",
        ));
    }
    Ok(addr)
}

fn limits(raw: &RawLimits, max_jobs: usize) -> Result<Limits, ConfigError> {
    let mbit = |key: &str, v: Option<u64>| match v {
        Some(0) => Err(invalid(
            format!("limits.{key}"),
            "must be at least 1 (leave it out for no limit)",
        )),
        v => Ok(v.map(|m| m * 1_000_000 / 8)),
    };
    let max_connections = raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if max_connections == 0 {
        return Err(invalid("limits.max_connections", "must be at least 1"));
    }
    let tcp_lane_pending = crate::net::listen::PendingLimits {
        total: raw.tcp_lane_pending.unwrap_or(crate::net::tcplane::DEFAULT_PENDING),
        per_ip: raw
            .tcp_lane_pending_per_ip
            .unwrap_or(crate::net::tcplane::DEFAULT_PENDING_PER_IP),
    };
    if tcp_lane_pending.total == 0 {
        return Err(invalid("limits.tcp_lane_pending", "must be at least 1"));
    }
    if tcp_lane_pending.per_ip == 0 {
        return Err(invalid("limits.tcp_lane_pending_per_ip", "must be at least 1"));
    }
    Ok(Limits {
        rates: crate::metrics::ratelimit::Rates {
            global: mbit("rate_mbit", raw.rate_mbit)?,
            per_peer: mbit("peer_rate_mbit", raw.peer_rate_mbit)?,
        },
        max_connections,
        max_staged_bytes: raw.max_staged_mib.map(|m| m << 20),
        reserve_bytes: raw.reserve_mib.map_or(DEFAULT_RESERVE, |m| m << 20),
        memory_bytes: match raw.memory_mib {
            None => DEFAULT_MEMORY,
            Some(m @ 24..=1_048_576) => m << 20,
            Some(_) => return Err(invalid("limits.memory_mib", "must be 24 to 1048576")),
        },
        identity: identity_limits(raw, max_connections, max_jobs)?,
        stall: secs("limits.stall_secs", raw.stall_secs, DEFAULT_STALL)?,
        idle_connection: secs(
            "limits.idle_connection_secs",
            raw.idle_connection_secs,
            DEFAULT_IDLE_CONNECTION,
        )?,
        tcp_lane_pending,
    })
}

/// A number of seconds from 1 to a day.
fn secs(key: &str, v: Option<u64>, default: Duration) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s @ 1..=86_400) => Ok(Duration::from_secs(s)),
        Some(_) => Err(invalid(key, "must be 1 to 86400")),
    }
}

fn identity_limits(raw: &RawLimits, max_connections: usize, max_jobs: usize) -> Result<IdentityLimits, ConfigError> {
    let at_least_one = |key: &str, v: Option<usize>, default: usize| match v {
        Some(0) => Err(invalid(format!("limits.{key}"), "must be at least 1")),
        v => Ok(v.unwrap_or(default)),
    };
    let staged = match raw.identity_staged_mib {
        Some(0) => return Err(invalid("limits.identity_staged_mib", "must be at least 1")),
        Some(m) => Some(m << 20),
        None => raw.max_staged_mib.map(|m| (m - m / 4) << 20),
    };
    Ok(IdentityLimits {
        connections: at_least_one("identity_connections", raw.identity_connections, share(max_connections))?,
        jobs: at_least_one("identity_jobs", raw.identity_jobs, share(max_jobs))?,
        streams: at_least_one("identity_streams", raw.identity_streams, default_streams(max_jobs))?,
        staged_bytes: staged,
    })
}

fn tuning(raw: &RawTransport) -> Result<Tuning, ConfigError> {
    let d = Tuning::default();
    let t = Tuning {
        congestion: raw.congestion.unwrap_or(d.congestion),
        bandwidth_mbit: raw.bandwidth_mbit.unwrap_or(d.bandwidth_mbit),
        rtt_ms: raw.rtt_ms.unwrap_or(d.rtt_ms),
        max_mtu: raw.max_mtu.unwrap_or(d.max_mtu),
        idle_timeout: raw.idle_timeout_secs.map_or(d.idle_timeout, Duration::from_secs),
        connect_timeout: d.connect_timeout,
    };
    if !(1..=600).contains(&t.idle_timeout.as_secs()) {
        return Err(invalid("transport.idle_timeout_secs", "must be 1 to 600"));
    }
    if !(1..=1_000_000).contains(&t.bandwidth_mbit) {
        return Err(invalid("transport.bandwidth_mbit", "must be 1 to 1000000"));
    }
    if t.rtt_ms > 10_000 {
        return Err(invalid("transport.rtt_ms", "must be at most 10000"));
    }
    if !(1200..=65_000).contains(&t.max_mtu) {
        return Err(invalid("transport.max_mtu", "must be 1200 to 65000"));
    }
    Ok(t)
}

fn tls_key(tls: &TlsFiles, e: &crate::net::tls::TlsError) -> &'static str {
    let msg = e.to_string();
    if msg.contains(&*tls.key.to_string_lossy()) {
        "tls.key"
    } else if msg.contains(&*tls.ca.to_string_lossy()) {
        "tls.ca"
    } else if tls.crl.iter().any(|p| msg.contains(&*p.to_string_lossy())) {
        "tls.crl"
    } else {
        "tls.cert"
    }
}

struct Target {
    name: String,
    path: PathBuf,
    allow: AllowList,
    tcp_lane: Option<LaneKind>,
    tcp_lane_peers: Option<AllowList>,
    kind: ExportKind,
    operators: AllowList,
    relay_from: AllowList,
    ship: AllowList,
    on_exists: OnExists,
    file_mode: Option<u32>,
    dir_mode: Option<u32>,
    after_commit: Option<AfterCommitSpec>,
    staging: Option<PathBuf>,
}

fn target(key: &str, t: RawTarget, base: &Path, import: bool) -> Result<(Target, HookSpec), ConfigError> {
    check_name(&format!("{key}.name"), &t.name)?;
    let key = format!("{key} ({})", t.name);
    let path = base.join(&t.path);
    let meta =
        std::fs::metadata(&path).map_err(|e| invalid(format!("{key}.path"), format!("{}: {e}", path.display())))?;
    if !meta.is_dir() {
        return Err(invalid(
            format!("{key}.path"),
            format!("{} is not a folder", path.display()),
        ));
    }
    let path = path
        .canonicalize()
        .map_err(|e| invalid(format!("{key}.path"), format!("{}: {e}", path.display())))?;
    if t.allow.is_empty() {
        return Err(invalid(
            format!("{key}.allow"),
            "is empty: nobody could use this target",
        ));
    }
    if import && t.kind.is_some() {
        return Err(invalid(format!("{key}.kind"), "only exports have a kind"));
    }
    if t.on_exists.is_some() && !(import && matches!(t.hook.as_deref(), None | Some("move"))) {
        return Err(invalid(
            format!("{key}.on_exists"),
            "only import targets with hook = \"move\" have it",
        ));
    }
    let file_mode = mode(&format!("{key}.file_mode"), t.file_mode.as_deref())?;
    let dir_mode = mode(&format!("{key}.dir_mode"), t.dir_mode.as_deref())?;
    if !import && (file_mode.is_some() || dir_mode.is_some()) {
        return Err(invalid(format!("{key}.file_mode"), "only import targets set modes"));
    }
    if !import && !t.relay_from.is_empty() {
        return Err(invalid(format!("{key}.relay_from"), "only import targets relay"));
    }
    if import && !t.ship.is_empty() {
        return Err(invalid(format!("{key}.ship"), "only exports are shipped from"));
    }
    if !import && !t.operators.is_empty() {
        return Err(invalid(
            format!("{key}.operators"),
            "only import targets have operators",
        ));
    }
    let exec_keys = [
        ("exec_env", t.exec_env.is_some()),
        ("exec_timeout_secs", t.exec_timeout_secs.is_some()),
        ("exec_stderr_to_sender", t.exec_stderr_to_sender.is_some()),
    ];
    let after_commit = after_commit_spec(
        &key,
        import,
        t.after_commit,
        t.after_commit_env,
        t.after_commit_timeout_secs,
    )?;
    let hook = if import {
        hook_spec(&key, t.hook.as_deref(), t.exec)?
    } else if t.hook.is_some() || t.exec.is_some() {
        return Err(invalid(format!("{key}.hook"), "exports have no hook"));
    } else {
        HookSpec::Move
    };
    let hook = match hook {
        HookSpec::Exec(spec) => HookSpec::Exec(exec_spec(
            &key,
            spec.argv,
            t.exec_env,
            t.exec_timeout_secs,
            t.exec_stderr_to_sender,
        )?),
        other => {
            if let Some((name, _)) = exec_keys.iter().find(|(_, set)| *set) {
                return Err(invalid(format!("{key}.{name}"), "only used with hook = \"exec\""));
            }
            other
        }
    };
    Ok((
        Target {
            name: t.name,
            path,
            allow: AllowList(t.allow),
            tcp_lane: lane_kind(&key, t.tcp_lane.as_ref())?,
            tcp_lane_peers: lane_peers(&key, t.tcp_lane.as_ref(), t.tcp_lane_peers)?,
            kind: t.kind.unwrap_or_default(),
            operators: AllowList(t.operators),
            relay_from: AllowList(t.relay_from),
            ship: AllowList(t.ship),
            on_exists: t.on_exists.unwrap_or_default(),
            file_mode,
            dir_mode,
            after_commit,
            staging: t.staging,
        },
        hook,
    ))
}

/// Where an import target's jobs are staged, and whether that is inside the target. A
/// `staging` folder given must be on the target's mount (a commit is a rename); by
/// default `data_dir/staging/NAME` when `data_dir` is on it, else
/// `<target>/.barge-staging`.
fn staging_root(t: &Target, data_dir: &Path, base: &Path) -> Result<(PathBuf, bool), ConfigError> {
    let key = format!("import ({}).staging", t.name);
    // The same mount, not only the same file system: a commit is a rename.
    let dev = |p: &Path| crate::store::space::mount_of(p);
    let target_dev = dev(&t.path).map_err(|e| invalid(&key, format!("{}: {e}", t.path.display())))?;
    let Some(given) = &t.staging else {
        let shared = data_dir.join("staging");
        if dev(data_dir).ok() == Some(target_dev) {
            std::fs::create_dir_all(&shared).map_err(|e| invalid("data_dir", format!("{}: {e}", shared.display())))?;
            return Ok((shared.join(&t.name), false));
        }
        return Ok((t.path.join(crate::proto::path::STAGING_DIR), true));
    };
    let root = base.join(given);
    let parent = root.parent().filter(|p| !p.as_os_str().is_empty());
    let Some(parent) = parent.filter(|p| p.is_dir()) else {
        return Err(invalid(
            key,
            format!("{}: its parent folder does not exist", root.display()),
        ));
    };
    let there = if root.exists() { dev(&root) } else { dev(parent) };
    match there {
        Ok(d) if d == target_dev => {
            let inside = root.starts_with(&t.path);
            Ok((root, inside))
        }
        Ok(_) => Err(invalid(
            key,
            format!(
                "{} is on another file system or mount than the target {}; staging and target must share one, so that a commit is a rename",
                root.display(),
                t.path.display()
            ),
        )),
        Err(e) => Err(invalid(key, format!("{}: {e}", root.display()))),
    }
}

/// `tcp_lane`: `true` or `"tls"` (the encrypted lane), `"cleartext"`, `false` or `"off"`.
fn lane_kind(key: &str, value: Option<&toml::Value>) -> Result<Option<LaneKind>, ConfigError> {
    match value {
        None | Some(toml::Value::Boolean(false)) => Ok(None),
        Some(toml::Value::Boolean(true)) => Ok(Some(LaneKind::Tls)),
        Some(toml::Value::String(s)) if s == "tls" => Ok(Some(LaneKind::Tls)),
        Some(toml::Value::String(s)) if s == "cleartext" => Ok(Some(LaneKind::Cleartext)),
        Some(toml::Value::String(s)) if s == "off" => Ok(None),
        Some(other) => Err(invalid(
            format!("{key}.tcp_lane"),
            format!("{other} is not true, false, \"tls\", \"cleartext\" or \"off\""),
        )),
    }
}

/// `tcp_lane_peers`: only with a lane.
fn lane_peers(
    key: &str,
    lane: Option<&toml::Value>,
    peers: Option<Vec<String>>,
) -> Result<Option<AllowList>, ConfigError> {
    match (lane_kind(key, lane)?, peers) {
        (None, Some(_)) => Err(invalid(format!("{key}.tcp_lane_peers"), "only used with a tcp_lane")),
        (_, peers) => Ok(peers.map(AllowList)),
    }
}

/// A permission mode written in octal (`"0640"`): read, write and execute bits only.
fn mode(key: &str, text: Option<&str>) -> Result<Option<u32>, ConfigError> {
    let Some(text) = text else {
        return Ok(None);
    };
    match u32::from_str_radix(text, 8) {
        Ok(m) if m <= crate::proto::wire::MODE_BITS => Ok(Some(m)),
        _ => Err(invalid(
            key,
            format!("{text:?} is not an octal mode from \"0000\" to \"0777\""),
        )),
    }
}

fn hook_spec(key: &str, hook: Option<&str>, exec: Option<Vec<String>>) -> Result<HookSpec, ConfigError> {
    match (hook.unwrap_or("move"), exec) {
        ("move", None) => Ok(HookSpec::Move),
        ("replace", None) => Ok(HookSpec::Replace),
        ("custom", None) => Ok(HookSpec::Custom),
        ("exec", Some(argv)) if !argv.is_empty() && !argv[0].is_empty() => Ok(HookSpec::Exec(ExecSpec {
            argv,
            env: vec![],
            timeout: DEFAULT_EXEC_TIMEOUT,
            stderr_to_sender: false,
        })),
        ("exec", _) => Err(invalid(
            format!("{key}.exec"),
            "hook = \"exec\" needs exec = [\"/path/to/command\", ...]",
        )),
        ("move" | "custom", Some(_)) => Err(invalid(format!("{key}.exec"), "only used with hook = \"exec\"")),
        (other, _) => Err(invalid(
            format!("{key}.hook"),
            format!("{other:?} is not one of move, replace, exec, custom"),
        )),
    }
}

/// An export's `after_commit` command and its settings, checked: exports only, a
/// command that is not empty, the settings only with a command.
fn after_commit_spec(
    key: &str,
    import: bool,
    argv: Option<Vec<String>>,
    env: Option<Vec<String>>,
    timeout_secs: Option<u64>,
) -> Result<Option<AfterCommitSpec>, ConfigError> {
    let settings = [
        ("after_commit", argv.is_some()),
        ("after_commit_env", env.is_some()),
        ("after_commit_timeout_secs", timeout_secs.is_some()),
    ];
    if import {
        if let Some((name, _)) = settings.iter().find(|(_, set)| *set) {
            return Err(invalid(
                format!("{key}.{name}"),
                "only exports have an after_commit command (it runs on the source after a pull)",
            ));
        }
        return Ok(None);
    }
    let Some(argv) = argv else {
        if let Some((name, _)) = settings.iter().find(|(_, set)| *set) {
            return Err(invalid(format!("{key}.{name}"), "only used with after_commit"));
        }
        return Ok(None);
    };
    if argv.is_empty() || argv[0].is_empty() {
        return Err(invalid(
            format!("{key}.after_commit"),
            "needs a command: after_commit = [\"/path/to/command\", ...]",
        ));
    }
    let (env, timeout) = command_limits(key, "after_commit", env, timeout_secs)?;
    Ok(Some(AfterCommitSpec { argv, env, timeout }))
}

/// The exec hook's settings beyond its command, checked.
fn exec_spec(
    key: &str,
    argv: Vec<String>,
    env: Option<Vec<String>>,
    timeout_secs: Option<u64>,
    stderr_to_sender: Option<bool>,
) -> Result<ExecSpec, ConfigError> {
    let (env, timeout) = command_limits(key, "exec", env, timeout_secs)?;
    Ok(ExecSpec {
        argv,
        env,
        timeout,
        stderr_to_sender: stderr_to_sender.unwrap_or(false),
    })
}

/// A command's `{prefix}_env` allow list and `{prefix}_timeout_secs`, checked.
fn command_limits(
    key: &str,
    prefix: &str,
    env: Option<Vec<String>>,
    timeout_secs: Option<u64>,
) -> Result<(Vec<String>, Duration), ConfigError> {
    let env = env.unwrap_or_default();
    for name in &env {
        let ok = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(invalid(
                format!("{key}.{prefix}_env"),
                format!("{name:?} is not a variable name (letters, digits, _)"),
            ));
        }
        if name.starts_with("BARGE_") {
            return Err(invalid(
                format!("{key}.{prefix}_env"),
                format!("{name:?}: BARGE_* variables are set by the agent"),
            ));
        }
    }
    let timeout = match timeout_secs {
        None => DEFAULT_EXEC_TIMEOUT,
        Some(s @ 1..=604_800) => Duration::from_secs(s),
        Some(_) => return Err(invalid(format!("{key}.{prefix}_timeout_secs"), "must be 1 to 604800")),
    };
    Ok((env, timeout))
}

fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= crate::proto::limits::MAX_NAME_LEN
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(key, format!("{name:?} must be 1-255 of A-Z a-z 0-9 - _ .")))
    }
}

fn existing_file(key: &str, path: &Path) -> Result<PathBuf, ConfigError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(path.to_path_buf()),
        Ok(_) => Err(invalid(key, format!("{} is not a file", path.display()))),
        Err(e) => Err(invalid(key, format!("{}: {e}", path.display()))),
    }
}

fn check_unique<'a>(kind: &str, names: impl Iterator<Item = &'a String>) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for n in names {
        if !seen.insert(n) {
            return Err(invalid(format!("{kind}.name"), format!("{n:?} is defined twice")));
        }
    }
    Ok(())
}

/// The agent's own state (journal, commit ledger, hash cache) must not be inside a
/// target, where the engine would see it, or a peer could pull it.
fn check_data_dir<'a>(
    data_dir: &Path,
    targets: impl Iterator<Item = (&'a str, &'a Target)>,
) -> Result<(), ConfigError> {
    let dir = data_dir.canonicalize().unwrap_or_else(|_| data_dir.to_path_buf());
    for (kind, t) in targets {
        if dir.starts_with(&t.path) {
            return Err(invalid(
                "data_dir",
                format!(
                    "{} is inside {kind} {:?} ({}): the agent's own files would appear there",
                    dir.display(),
                    t.name,
                    t.path.display()
                ),
            ));
        }
    }
    Ok(())
}

fn check_no_overlap(imports: &[(Target, HookSpec)]) -> Result<(), ConfigError> {
    for (i, (a, _)) in imports.iter().enumerate() {
        for (b, _) in &imports[i + 1..] {
            if a.path.starts_with(&b.path) || b.path.starts_with(&a.path) {
                return Err(invalid(
                    format!("import ({}).path", b.name),
                    format!(
                        "{} overlaps import {:?} at {}",
                        b.path.display(),
                        a.name,
                        a.path.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        crate::net::certs::init_ca(&dir.path().join("certs")).unwrap();
        crate::net::certs::issue(&dir.path().join("certs"), "a", &[]).unwrap();
        for d in ["in1", "in2", "in1/sub", "out"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        dir
    }

    const TLS: &str = "[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/a.pem\"\nkey = \"certs/a.key\"\n";

    fn parse(dir: &tempfile::TempDir, rest: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("listen = \"127.0.0.1:0\"\n{TLS}{rest}"), dir.path())
    }

    #[test]
    fn a_full_config_validates() {
        let dir = setup();
        let c = parse(
            &dir,
            "[[import]]\nname = \"in1\"\npath = \"in1\"\nallow = [\"b\"]\nhook = \"exec\"\nexec = [\"/bin/true\"]\n\
             [[export]]\nname = \"out\"\npath = \"out\"\nallow = [\"*\"]\n",
        )
        .unwrap();
        let HookSpec::Exec(spec) = &c.imports[0].hook else {
            panic!("{:?}", c.imports[0].hook)
        };
        assert_eq!(spec.argv, ["/bin/true"]);
        assert_eq!(spec.timeout, DEFAULT_EXEC_TIMEOUT);
        assert!(spec.env.is_empty() && !spec.stderr_to_sender);
        assert!(c.imports[0].allow.allows("b") && !c.imports[0].allow.allows("c"));
        assert!(c.exports[0].allow.allows("anyone"));
        assert_eq!(c.staging_ttl, DEFAULT_STAGING_TTL);
    }

    fn refused(dir: &tempfile::TempDir, rest: &str, key: &str) {
        let err = parse(dir, rest).unwrap_err().to_string();
        assert!(err.contains(key), "expected key {key} in: {err}");
    }

    #[test]
    fn bad_configs_name_the_key() {
        let dir = setup();
        refused(
            &dir,
            "[[import]]\nname = \"x\"\npath = \"missing\"\nallow = [\"a\"]\n",
            "import[0] (x).path",
        );
        refused(&dir, "[[import]]\nname = \"x\"\npath = \"in1\"\nallow = []\n", "allow");
        refused(
            &dir,
            "[[import]]\nname = \"x\"\npath = \"in1\"\nallow = [\"a\"]\n[[import]]\nname = \"y\"\npath = \"in1/sub\"\nallow = [\"a\"]\n",
            "overlaps",
        );
        refused(
            &dir,
            "[[import]]\nname = \"x\"\npath = \"in1\"\nallow = [\"a\"]\nhook = \"exec\"\n",
            "exec",
        );
        refused(
            &dir,
            "[[import]]\nname = \"x\"\npath = \"in1\"\nallow = [\"a\"]\nhook = \"nope\"\n",
            "hook",
        );
        refused(
            &dir,
            "[[import]]\nname = \"../x\"\npath = \"in1\"\nallow = [\"a\"]\n",
            "name",
        );
        refused(&dir, "bogus = 1\n", "bogus");
        // The agent's own files may not land inside a target.
        let inside = "data_dir = \"in1/state\"\n[[import]]\nname = \"x\"\npath = \"in1\"\nallow = [\"a\"]\n";
        let err = Config::parse(&format!("{inside}{TLS}"), dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config key `data_dir`") && err.contains("inside import \"x\""),
            "{err}"
        );
        let err = Config::parse(
            "listen = \"nowhere\"\n[tls]\nca=\"certs/ca.pem\"\ncert=\"certs/a.pem\"\nkey=\"certs/a.key\"\n",
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("listen"), "{err}");
    }

    #[test]
    fn the_tcp_lane_is_tls_unless_a_target_says_cleartext_and_may_be_per_peer() {
        let dir = setup();
        let target = |lane: &str| format!("[[import]]\nname = \"x\"\npath = \"in1\"\nallow = [\"a\", \"b\"]\n{lane}");
        let lane = |text: &str, peer: &str| parse(&dir, &target(text)).unwrap().imports[0].lane_for(peer);
        assert_eq!(lane("", "a"), None);
        assert_eq!(lane("tcp_lane = true\n", "a"), Some(LaneKind::Tls));
        assert_eq!(lane("tcp_lane = \"tls\"\n", "a"), Some(LaneKind::Tls));
        assert_eq!(lane("tcp_lane = \"cleartext\"\n", "a"), Some(LaneKind::Cleartext));
        assert_eq!(lane("tcp_lane = \"off\"\n", "a"), None);
        assert_eq!(lane("tcp_lane = false\n", "a"), None);
        let peers = "tcp_lane = true\ntcp_lane_peers = [\"a\"]\n";
        assert_eq!((lane(peers, "a"), lane(peers, "b")), (Some(LaneKind::Tls), None));
        refused(&dir, &target("tcp_lane = \"fast\"\n"), "tcp_lane");
        refused(&dir, &target("tcp_lane = 1\n"), "tcp_lane");
        refused(&dir, &target("tcp_lane_peers = [\"a\"]\n"), "tcp_lane_peers");
    }

    #[test]
    fn exec_settings_and_lane_bounds_parse_and_are_checked() {
        let dir = setup();
        let exec =
            "[[import]]\nname = \"x\"\npath = \"in1\"\nallow = [\"a\"]\nhook = \"exec\"\nexec = [\"/bin/true\"]\n";
        let c = parse(
            &dir,
            &format!(
                "[limits]\ntcp_lane_pending = 10\ntcp_lane_pending_per_ip = 2\n{exec}\
                 exec_env = [\"HOME\", \"ROCKSDB_OPTS\"]\nexec_timeout_secs = 30\nexec_stderr_to_sender = true\n"
            ),
        )
        .unwrap();
        let HookSpec::Exec(spec) = &c.imports[0].hook else {
            panic!("{:?}", c.imports[0].hook)
        };
        assert_eq!(spec.env, ["HOME", "ROCKSDB_OPTS"]);
        assert_eq!(spec.timeout, Duration::from_secs(30));
        assert!(spec.stderr_to_sender);
        assert_eq!(
            c.limits.tcp_lane_pending,
            crate::net::listen::PendingLimits { total: 10, per_ip: 2 }
        );
        let d = parse(&dir, exec).unwrap();
        assert_eq!(d.limits.tcp_lane_pending, crate::net::tcplane::DEFAULT_LIMITS);
        refused(&dir, &format!("{exec}exec_timeout_secs = 0\n"), "exec_timeout_secs");
        refused(&dir, &format!("{exec}exec_env = [\"A=B\"]\n"), "exec_env");
        refused(&dir, &format!("{exec}exec_env = [\"BARGE_JOB\"]\n"), "exec_env");
        refused(
            &dir,
            "[[import]]\nname = \"x\"\npath = \"in1\"\nallow = [\"a\"]\nexec_timeout_secs = 5\n",
            "import[0] (x).exec_timeout_secs",
        );
        refused(
            &dir,
            "[limits]\ntcp_lane_pending_per_ip = 0\n",
            "limits.tcp_lane_pending_per_ip",
        );
    }

    #[test]
    fn missing_or_unreadable_key_is_refused() {
        let dir = setup();
        let text = "[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/a.pem\"\nkey = \"certs/none.key\"\n";
        let err = Config::parse(text, dir.path()).unwrap_err().to_string();
        assert!(err.contains("tls.key"), "{err}");
        std::fs::write(dir.path().join("certs/junk.key"), "junk").unwrap();
        let text = text.replace("none.key", "junk.key");
        let err = Config::parse(&text, dir.path()).unwrap_err().to_string();
        assert!(err.contains("tls.key"), "{err}");
        // A key of another identity: named as the key that does not match.
        crate::net::certs::issue(&dir.path().join("certs"), "b", &[]).unwrap();
        let text = text.replace("junk.key", "b.key");
        let err = Config::parse(&text, dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("config key `tls.key`") && err.contains("does not match"),
            "{err}"
        );
    }

    #[test]
    fn local_default_makes_dev_certs_once() {
        let dir = tempfile::tempdir().unwrap();
        let (c, made) = Config::local_default(dir.path()).unwrap();
        assert!(made);
        assert_eq!(c.listen.port(), DEFAULT_PORT);
        assert!(c.import("inbox").is_some() && c.export("outbox").is_some());
        let (_, made) = Config::local_default(dir.path()).unwrap();
        assert!(!made);
    }
}
