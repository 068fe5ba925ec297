//! 0-db: offload sealed data files to a backup agent, fetch them back on demand, and
//! clone a whole namespace.
//!
//! 0-db keeps a namespace `NS` in `<data-root>/NS/d<N>` (append-only data files; `d<N>`
//! never changes once `d<N+1>` exists) and `<index-root>/NS/i<N>` plus
//! `<index-root>/NS/zdb-namespace` (mutable). It runs its `--hook` program as
//! `HOOK NAME ID ARGS...` with full paths. `barge zdb-hook` is such a program:
//!
//! - `jump-data ID OLD NEW`: push the sealed `OLD` data file to the backup's data target;
//! - `jump-index ID OLD NEW DIRTY`: push index file `OLD`, the dirty index files (their
//!   ids, space-separated, in `DIRTY`) and `zdb-namespace` to the backup's index target
//!   (which should use `hook = "replace"`, as these files change);
//! - `namespace-updated ID NS`: push `NS/zdb-namespace` to the index target (after
//!   `NSSET`, so the backup's descriptor is not stale until the next jump);
//! - `missing-data ID FILE`: 0-db needs a data file it no longer has and waits; pull it
//!   from the backup's data export and return only once it is in place (fails after
//!   `connect_timeout_secs` if the backup does not answer: this one can not wait);
//! - anything else (`ready`, `close`, `namespace-created`, ...): nothing to do, exit 0.
//!
//! 0-db waits for `jump-*` hooks, so a backup that is down must not hold it up. The work
//! of a pushing hook goes first into a durable spool (one file per entry under
//! `spool_dir`, outside 0-db's roots, written temp + fsync + rename + fsync of the folder;
//! entries name files, never hold their contents), then the spool is drained oldest
//! first, an entry removed only once its push committed, stopping at the first failure.
//! A hook whose push fails (the backup does not answer within `connect_timeout_secs`, or
//! refuses) leaves its entry there, says so on stderr and exits 0; the next pushing hook
//! or `barge zdb-sync` sends it. One lock on the spool serializes every barge process
//! pushing for this 0-db, and index files are always sent as they are at push time, so a
//! backup index file is never replaced by an older one.
//!
//! Every path 0-db hands over must lie directly in a namespace folder of the configured
//! roots and have 0-db's file name form; anything else is refused, so a hook call can
//! never make barge read or write outside those folders.

use crate::client::{Client, Peer, PushOptions};
use crate::net::quic::Tuning;
use crate::net::tls::TlsFiles;
use crate::store::hashcache::{FileStamp, HashCache};
use crate::transfer::TransferError;
use serde::Deserialize;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Default of `connect_timeout_secs`: how long a hook waits for the backup to answer.
pub const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 3;
/// Largest `connect_timeout_secs` accepted: 0-db waits for the hook meanwhile.
pub const MAX_CONNECT_TIMEOUT_SECS: u64 = 60;
/// Folder name of the default spool, next to the index root.
pub const DEFAULT_SPOOL_NAME: &str = "barge-zdb-spool";

/// Why a hook call or a clone failed.
#[derive(Debug, thiserror::Error)]
pub enum ZdbError {
    /// The zdb configuration file could not be read or is not valid.
    #[error("zdb config {path}: {reason}")]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A hook call with the wrong arguments.
    #[error("hook {hook}: expected {want}")]
    Args {
        /// The hook's name.
        hook: String,
        /// The arguments it takes.
        want: &'static str,
    },
    /// A file a hook named is not where 0-db keeps such files.
    #[error("{path} is not a 0-db {kind} file in a namespace folder of {root}")]
    Outside {
        /// The file as the hook named it.
        path: PathBuf,
        /// `data` or `index`.
        kind: &'static str,
        /// The data or index root it should be in.
        root: PathBuf,
    },
    /// A `jump-index` dirty id that is not a number.
    #[error("dirty index id {0:?} is not a number")]
    BadDirty(String),
    /// A namespace folder is missing or could not be read.
    #[error("namespace folder {0}: {1}")]
    Namespace(PathBuf, std::io::Error),
    /// `missing-data`: the pull committed but the file is still not there.
    #[error("{0} is still missing after the pull")]
    StillMissing(PathBuf),
    /// The spool folder or one of its entries could not be read or written.
    #[error("spool {0}: {1}")]
    Spool(PathBuf, std::io::Error),
    /// `zdb-sync`: the backup holds data files (named) whose hash differs from this host's.
    #[error("the backup holds a different {0} than this host (not replaced; check which is right)")]
    Differs(String),
    /// A push or pull to the backup agent failed.
    #[error(transparent)]
    Transfer(#[from] TransferError),
}

/// A hook call from 0-db, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hook {
    /// `jump-data`: 0-db sealed a data file and started the next.
    JumpData {
        /// The sealed data file, to push.
        old: PathBuf,
    },
    /// `jump-index`: 0-db moved on to a new index file.
    JumpIndex {
        /// The index file it left, to push.
        old: PathBuf,
        /// Ids of older index files it changed, sorted, without repeats (`i<id>`).
        dirty: Vec<u32>,
    },
    /// `missing-data`: 0-db needs a data file back and waits for it.
    MissingData {
        /// The data file to fetch from the backup.
        file: PathBuf,
    },
    /// `namespace-updated`: a namespace's settings changed.
    NamespaceUpdated {
        /// The namespace whose `zdb-namespace` to push.
        namespace: String,
    },
    /// A hook barge has nothing to do for (`ready`, `close`, ...).
    Ignored(String),
}

impl Hook {
    /// Parses `NAME ID ARGS...` as 0-db passes them. The hooks barge acts on must have
    /// exactly their arguments (a non-empty ID first); other hook names are ignored
    /// whatever follows them, so a new 0-db hook never fails.
    pub fn parse(args: &[String]) -> Result<Hook, ZdbError> {
        let name = args.first().map(String::as_str).unwrap_or("");
        let want = |want| ZdbError::Args {
            hook: name.to_string(),
            want,
        };
        let (id, rest) = match args.get(1..) {
            Some([id, rest @ ..]) => (id.as_str(), rest),
            _ => ("", &[][..]),
        };
        let acted = ["jump-data", "jump-index", "missing-data", "namespace-updated"];
        if acted.contains(&name) && id.is_empty() {
            return Err(want("a non-empty ID (0-db's instance id) after the hook name"));
        }
        match name {
            "jump-data" => match rest {
                [old, _new] => Ok(Hook::JumpData { old: old.into() }),
                _ => Err(want("ID OLD-DATA-FILE NEW-DATA-FILE")),
            },
            "jump-index" => match rest {
                [old, _new, dirty @ ..] => Ok(Hook::JumpIndex {
                    old: old.into(),
                    dirty: parse_dirty(dirty)?,
                }),
                _ => Err(want("ID OLD-INDEX-FILE NEW-INDEX-FILE [DIRTY-IDS]")),
            },
            "missing-data" => match rest {
                [file] => Ok(Hook::MissingData { file: file.into() }),
                _ => Err(want("ID DATA-FILE")),
            },
            "namespace-updated" => match rest {
                [ns] if is_namespace(ns) => Ok(Hook::NamespaceUpdated { namespace: ns.clone() }),
                _ => Err(want("ID NAMESPACE")),
            },
            other => Ok(Hook::Ignored(other.to_string())),
        }
    }

    /// True for an argument error (exit code 2, as for any usage error).
    pub fn is_usage(e: &ZdbError) -> bool {
        matches!(e, ZdbError::Args { .. } | ZdbError::BadDirty(_))
    }
}

/// A namespace name: one plain path component.
fn is_namespace(name: &str) -> bool {
    !name.contains('/') && crate::proto::path::RelPath::new(name).is_ok()
}

/// Dirty index ids: one argument of space-separated numbers (possibly empty), or several.
fn parse_dirty(args: &[String]) -> Result<Vec<u32>, ZdbError> {
    let mut ids = vec![];
    for word in args.iter().flat_map(|a| a.split_whitespace()) {
        ids.push(word.parse().map_err(|_| ZdbError::BadDirty(word.to_string()))?);
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// A 0-db file located inside a root: its namespace and file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZdbFile {
    /// The namespace (the folder under the root).
    pub namespace: String,
    /// The file's name in that folder (`d<N>`, `i<N>` or `zdb-namespace`).
    pub name: String,
}

impl ZdbFile {
    /// The name it has on the backup: `NS/NAME`.
    pub fn rel(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Checks that `path` is `<root>/<ns>/<prefix><digits>` and returns its parts. The file
/// itself need not exist (a missing data file), its namespace folder must.
pub fn locate(root: &Path, path: &Path, prefix: char) -> Result<ZdbFile, ZdbError> {
    let kind = if prefix == 'd' { "data" } else { "index" };
    let outside = || ZdbError::Outside {
        path: path.to_path_buf(),
        kind,
        root: root.to_path_buf(),
    };
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(outside)?;
    let digits = name.strip_prefix(prefix).ok_or_else(outside)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.parse::<u32>().is_err() {
        return Err(outside());
    }
    let ns_dir = path.parent().ok_or_else(outside)?;
    let ns = ns_dir.file_name().and_then(|n| n.to_str()).ok_or_else(outside)?;
    let real_ns = ns_dir
        .canonicalize()
        .map_err(|e| ZdbError::Namespace(ns_dir.to_path_buf(), e))?;
    let real_root = root.canonicalize().map_err(|_| outside())?;
    if real_ns.parent() != Some(real_root.as_path()) || crate::proto::path::RelPath::new(ns).is_err() {
        return Err(outside());
    }
    Ok(ZdbFile {
        namespace: ns.to_string(),
        name: name.to_string(),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawZdbConfig {
    data_dir: PathBuf,
    index_dir: PathBuf,
    peer: String,
    data_target: String,
    index_target: String,
    data_export: String,
    connect_timeout_secs: Option<u64>,
    spool_dir: Option<PathBuf>,
    tls: crate::config::RawTls,
}

/// What `barge zdb-hook` and `barge zdb-clone` need to know: where 0-db keeps its
/// files, and the backup agent with its targets.
#[derive(Debug, Clone)]
pub struct ZdbConfig {
    /// 0-db's data root (`--data`).
    pub data_dir: PathBuf,
    /// 0-db's index root (`--index`).
    pub index_dir: PathBuf,
    /// The backup agent.
    pub peer: Peer,
    /// This host's CA, certificate and key, to reach the backup.
    pub tls: TlsFiles,
    /// Import target on the peer for sealed data files (`hook = "move"`).
    pub data_target: String,
    /// Import target on the peer for index and namespace files (`hook = "replace"`).
    pub index_target: String,
    /// Export on the peer to fetch data files back from (the data target's folder).
    pub data_export: String,
    /// How long to wait for the backup to answer before spooling (or failing a
    /// `missing-data`): `connect_timeout_secs`, 1 to 60, default 3.
    pub connect_timeout: Duration,
    /// The spool of pushes still to make: `spool_dir`, default `barge-zdb-spool` next to
    /// the index root; never inside the data or index root (0-db takes every folder
    /// there for a namespace).
    pub spool_dir: PathBuf,
}

impl ZdbConfig {
    /// Reads and validates a TOML file; relative paths are taken from its folder.
    pub fn load(path: &Path) -> Result<ZdbConfig, ZdbError> {
        let bad = |reason: String| ZdbError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let raw: RawZdbConfig = toml::from_str(&text).map_err(|e| bad(e.message().to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let peer = raw
            .peer
            .parse()
            .map_err(|e: crate::client::BadPeer| bad(e.to_string()))?;
        let secs = raw.connect_timeout_secs.unwrap_or(DEFAULT_CONNECT_TIMEOUT_SECS);
        if !(1..=MAX_CONNECT_TIMEOUT_SECS).contains(&secs) {
            return Err(bad(format!(
                "connect_timeout_secs = {secs}: must be 1 to {MAX_CONNECT_TIMEOUT_SECS} (0-db waits meanwhile)"
            )));
        }
        let data_dir = base.join(raw.data_dir);
        let index_dir = base.join(raw.index_dir);
        let spool_dir = match raw.spool_dir {
            Some(d) => base.join(d),
            None => absolute(&index_dir)
                .parent()
                .map(|p| p.join(DEFAULT_SPOOL_NAME))
                .ok_or_else(|| bad("index_dir has no parent folder: set spool_dir".into()))?,
        };
        for (key, root) in [("data_dir", &data_dir), ("index_dir", &index_dir)] {
            if absolute(&spool_dir).starts_with(absolute(root)) {
                return Err(bad(format!(
                    "spool_dir {} lies in {key} {}: 0-db would take it for a namespace",
                    spool_dir.display(),
                    root.display()
                )));
            }
        }
        Ok(ZdbConfig {
            data_dir,
            index_dir,
            peer,
            tls: raw.tls.under(base),
            data_target: raw.data_target,
            index_target: raw.index_target,
            data_export: raw.data_export,
            connect_timeout: Duration::from_secs(secs),
            spool_dir,
        })
    }

    /// A client that gives up on a silent backup after `connect_timeout`, hashing
    /// through a cache kept in the spool folder (sealed files are hashed once).
    fn client(&self) -> Result<Client, ZdbError> {
        let tuning = Tuning {
            connect_timeout: self.connect_timeout,
            ..Tuning::default()
        };
        let mut client = Client::with_tuning(&self.tls, &tuning)?;
        if let Ok(cache) = HashCache::open(&self.spool_dir.join("hashes")) {
            client.set_hash_cache(Arc::new(cache));
        }
        Ok(client)
    }
}

/// `path` made absolute and cleaned of `.` and `..` without touching the disk (the
/// folders need not exist yet).
fn absolute(path: &Path) -> PathBuf {
    let full = std::env::current_dir().unwrap_or_default().join(path);
    let mut out = PathBuf::new();
    for c in full.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// What a hook call did, for the log: done (stdout), or spooled for later (stderr;
/// still exit 0, so 0-db goes on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The work is done; what was done.
    Done(String),
    /// The backup did not take it; it waits in the spool (the message says why).
    Spooled(String),
}

/// Runs one hook call.
pub async fn run_hook(config: &ZdbConfig, hook: &Hook) -> Result<Outcome, ZdbError> {
    let work = match hook {
        Hook::Ignored(name) => return Ok(Outcome::Done(format!("{name}: nothing to do"))),
        Hook::MissingData { file } => return fetch_missing(config, file).await.map(Outcome::Done),
        Hook::JumpData { old } => {
            let f = locate(&config.data_dir, old, 'd')?;
            Work::Data(f)
        }
        Hook::JumpIndex { old, dirty } => {
            let f = locate(&config.index_dir, old, 'i')?;
            let mut names: Vec<String> = dirty.iter().map(|d| format!("i{d}")).collect();
            names.push(f.name.clone());
            names.push(NAMESPACE_FILE.into());
            names.sort();
            names.dedup();
            Work::Index {
                namespace: f.namespace,
                names,
            }
        }
        Hook::NamespaceUpdated { namespace } => {
            let dir = config.index_dir.join(namespace);
            if !dir.is_dir() {
                return Err(ZdbError::Namespace(dir, std::io::ErrorKind::NotFound.into()));
            }
            Work::Index {
                namespace: namespace.clone(),
                names: vec![NAMESPACE_FILE.into()],
            }
        }
    };
    let what = format!("{}: {}", hook_name(hook), work.describe());
    let spool = Spool::open(&config.spool_dir)?;
    spool.add(&work)?;
    let Some(_lock) = spool.lock(Some(config.connect_timeout)).await? else {
        return Ok(Outcome::Spooled(format!(
            "{what}: spooled in {}; another barge process is pushing from the spool and will \
             send it, or the next hook call or `barge zdb-sync` will",
            spool.dir.display()
        )));
    };
    let client = match config.client() {
        Ok(c) => c,
        Err(e) => return Ok(Outcome::Spooled(spooled_line(&what, &spool, &e, spool.len()))),
    };
    let drained = spool.drain(config, &client).await;
    client.close().await;
    match drained {
        Ok(d) => Ok(Outcome::Done(format!(
            "{what}: pushed to {} ({} spooled entries sent, {} bytes)",
            config.peer, d.entries, d.bytes
        ))),
        Err((e, left)) => Ok(Outcome::Spooled(spooled_line(&what, &spool, &e, left))),
    }
}

fn spooled_line(what: &str, spool: &Spool, e: &ZdbError, left: usize) -> String {
    format!(
        "{what}: not sent ({e}); spooled in {} ({left} entries waiting) for the next hook call \
         or `barge zdb-sync`",
        spool.dir.display()
    )
}

fn hook_name(hook: &Hook) -> &'static str {
    match hook {
        Hook::JumpData { .. } => "jump-data",
        Hook::JumpIndex { .. } => "jump-index",
        Hook::MissingData { .. } => "missing-data",
        Hook::NamespaceUpdated { .. } => "namespace-updated",
        Hook::Ignored(_) => "ignored",
    }
}

/// `missing-data`: 0-db waits for the file, so it is fetched now or the hook fails
/// (after `connect_timeout` if the backup is silent); nothing to spool.
async fn fetch_missing(config: &ZdbConfig, file: &Path) -> Result<String, ZdbError> {
    let f = locate(&config.data_dir, file, 'd')?;
    let client = config.client()?;
    let pulled = client
        .pull(&config.peer, &config.data_export, &[f.rel()], &config.data_dir)
        .await;
    client.close().await;
    pulled?;
    if !file.is_file() {
        return Err(ZdbError::StillMissing(file.to_path_buf()));
    }
    Ok(format!("missing-data: {} fetched from {}", f.rel(), config.peer))
}

/// The name of 0-db's namespace descriptor in an index namespace folder.
const NAMESPACE_FILE: &str = "zdb-namespace";

/// One spooled push: file names only, so a drain sends what the files hold then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// A sealed data file, to the data target.
    Data(ZdbFile),
    /// Index files and/or `zdb-namespace` of one namespace, to the index target.
    Index {
        /// The namespace the files belong to.
        namespace: String,
        /// File names in the namespace's index folder.
        names: Vec<String>,
    },
}

impl Work {
    fn describe(&self) -> String {
        match self {
            Work::Data(f) => f.rel(),
            Work::Index { namespace, names } => format!("{namespace}/{{{}}}", names.join(",")),
        }
    }

    fn encode(&self) -> String {
        match self {
            Work::Data(f) => format!("data\n{}\n{}\n", f.namespace, f.name),
            Work::Index { namespace, names } => format!("index\n{namespace}\n{}\n", names.join("\n")),
        }
    }

    fn decode(text: &str) -> Option<Work> {
        let mut lines = text.lines();
        let (kind, ns) = (lines.next()?, lines.next()?);
        let names: Vec<String> = lines.map(str::to_string).collect();
        if !is_namespace(ns) || names.is_empty() {
            return None;
        }
        match kind {
            "data" => match &names[..] {
                [n] if is_numbered(n, 'd') => Some(Work::Data(ZdbFile {
                    namespace: ns.into(),
                    name: n.clone(),
                })),
                _ => None,
            },
            "index" if names.iter().all(|n| is_numbered(n, 'i') || n == NAMESPACE_FILE) => Some(Work::Index {
                namespace: ns.into(),
                names,
            }),
            _ => None,
        }
    }
}

/// The durable queue of pushes a hook could not make: `<seq>.job` files, oldest first.
pub struct Spool {
    dir: PathBuf,
}

/// What a drain sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Spool entries sent (and removed).
    pub entries: usize,
    /// Bytes pushed for them.
    pub bytes: u64,
}

/// The spool's lock, held while pushing: released when dropped (or the process ends).
pub struct SpoolLock(#[allow(dead_code)] std::fs::File);

const SPOOL_EXT: &str = ".job";

impl Spool {
    /// The spool in `dir`, created (0700) if missing.
    pub fn open(dir: &Path) -> Result<Spool, ZdbError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| ZdbError::Spool(dir.to_path_buf(), e))?;
        Ok(Spool { dir: dir.to_path_buf() })
    }

    fn err(&self, e: std::io::Error) -> ZdbError {
        ZdbError::Spool(self.dir.clone(), e)
    }

    /// Appends `work` durably: written to a temporary file, synced, renamed to a name
    /// that sorts after every earlier entry (nanoseconds, then pid), the folder synced.
    pub fn add(&self, work: &Work) -> Result<PathBuf, ZdbError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let name = format!("{nanos:024}-{:010}", std::process::id());
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let path = self.dir.join(format!("{name}{SPOOL_EXT}"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(work.encode().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            self.err(e)
        })?;
        Ok(path)
    }

    /// The entries, oldest first.
    pub fn entries(&self) -> Result<Vec<PathBuf>, ZdbError> {
        let mut out = vec![];
        for e in std::fs::read_dir(&self.dir).map_err(|e| self.err(e))? {
            let e = e.map_err(|e| self.err(e))?;
            let name = e.file_name().to_string_lossy().to_string();
            if name.ends_with(SPOOL_EXT) && !name.starts_with('.') {
                out.push(e.path());
            }
        }
        out.sort();
        Ok(out)
    }

    /// The entries' work, oldest first (unreadable entries left out).
    pub fn pending(&self) -> Result<Vec<Work>, ZdbError> {
        Ok(self
            .entries()?
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok().and_then(|t| Work::decode(&t)))
            .collect())
    }

    fn len(&self) -> usize {
        self.entries().map(|e| e.len()).unwrap_or(0)
    }

    /// Takes the lock on the spool, waiting up to `wait` (`None`: as long as it takes);
    /// `None` if another process still holds it then.
    pub async fn lock(&self, wait: Option<Duration>) -> Result<Option<SpoolLock>, ZdbError> {
        let path = self.dir.join("lock");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| self.err(e))?;
        let start = std::time::Instant::now();
        loop {
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Some(SpoolLock(file)));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(self.err(e));
            }
            if wait.is_some_and(|w| start.elapsed() >= w) {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Pushes the entries oldest first (hold the lock), removing each once its push
    /// committed; stops at the first failure, returning it and how many entries are left.
    pub async fn drain(&self, config: &ZdbConfig, client: &Client) -> Result<Drained, (ZdbError, usize)> {
        let entries = self.entries().map_err(|e| (e, 0))?;
        let mut done = Drained::default();
        for (i, entry) in entries.iter().enumerate() {
            let text = std::fs::read_to_string(entry);
            let Some(work) = text.as_deref().ok().and_then(Work::decode) else {
                let bad = entry.with_extension("bad");
                tracing::warn!(entry = %entry.display(), "unreadable spool entry set aside");
                std::fs::rename(entry, &bad).map_err(|e| (self.err(e), entries.len() - i))?;
                continue;
            };
            let bytes = push_work(config, client, &work)
                .await
                .map_err(|e| (e, entries.len() - i))?;
            std::fs::remove_file(entry)
                .and_then(|_| std::fs::File::open(&self.dir)?.sync_all())
                .map_err(|e| (self.err(e), entries.len() - i))?;
            done.entries += 1;
            done.bytes += bytes;
        }
        Ok(done)
    }
}

/// Sends one spooled push, the files as they are now. A data file the backup already
/// holds identical (a push whose answer was lost) counts as sent; one that is gone
/// here can not be sent and is dropped with a warning.
async fn push_work(config: &ZdbConfig, client: &Client, work: &Work) -> Result<u64, ZdbError> {
    match work {
        Work::Data(f) => {
            let path = config.data_dir.join(&f.namespace).join(&f.name);
            if !path.is_file() {
                tracing::warn!(file = %path.display(), "spooled data file is gone; not sent");
                return Ok(0);
            }
            let files = [(f.rel(), path.clone())];
            match push(client, config, &config.data_target, &files).await {
                Ok(n) => Ok(n),
                Err(e @ ZdbError::Transfer(TransferError::Connect { .. })) => Err(e),
                Err(e) => match backup_has(client, config, &f.rel(), &path).await {
                    Ok(Some(true)) => Ok(0),
                    _ => Err(e),
                },
            }
        }
        Work::Index { namespace, names } => {
            let dir = config.index_dir.join(namespace);
            let files: Vec<(String, PathBuf)> = names
                .iter()
                .filter(|n| dir.join(n).is_file())
                .map(|n| (format!("{namespace}/{n}"), dir.join(n)))
                .collect();
            if files.is_empty() {
                return Ok(0);
            }
            push(client, config, &config.index_target, &files).await
        }
    }
}

/// Whether the backup's data export lists `rel`: `Some(true)` with the same blake3
/// root as `local`, `Some(false)` different, `None` not there.
async fn backup_has(client: &Client, config: &ZdbConfig, rel: &str, local: &Path) -> Result<Option<bool>, ZdbError> {
    let listed = client.list(&config.peer, &config.data_export, None).await?;
    match listed.iter().find(|l| l.path == rel) {
        None => Ok(None),
        Some(l) => Ok(Some(same_file(client, local, l.size, &l.root)?)),
    }
}

fn same_file(client: &Client, local: &Path, size: u64, root: &crate::proto::blocks::Digest) -> Result<bool, ZdbError> {
    let io = |e| TransferError::Io {
        path: local.to_path_buf(),
        source: e,
    };
    let stamp = FileStamp::now(local).map_err(io)?;
    let meta = std::fs::metadata(local).map_err(io)?;
    if meta.len() != size {
        return Ok(false);
    }
    let hashes = client.hash_cache().get_or_hash(local, stamp).map_err(io)?;
    Ok(&hashes.root == root)
}

async fn push(client: &Client, config: &ZdbConfig, target: &str, files: &[(String, PathBuf)]) -> Result<u64, ZdbError> {
    let r = client
        .push_named(&config.peer, target, files, &PushOptions::default())
        .await?;
    Ok(r.bytes_total)
}

/// What `zdb-sync` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Spooled entries sent.
    pub spooled: usize,
    /// Sealed data files sent, and those the backup already held identical.
    pub data_sent: usize,
    /// Sealed data files the backup already held, identical, so not sent.
    pub data_present: usize,
    /// Index and namespace files sent (all of them, as they are now).
    pub index_files: usize,
    /// Bytes pushed in all.
    pub bytes: u64,
}

/// Catches the backup up, idempotently: drains the spool, then sends every sealed data
/// file (all but the newest `d<N>` of each namespace) the backup's data export does not
/// list, and every index file and `zdb-namespace` of every namespace as it is now. A
/// data file the backup lists with a different hash is not replaced: it is reported
/// ([`ZdbError::Differs`]) after everything else was sent.
pub async fn sync(config: &ZdbConfig) -> Result<SyncReport, ZdbError> {
    let spool = Spool::open(&config.spool_dir)?;
    let _lock = spool.lock(None).await?;
    let client = config.client()?;
    let r = sync_locked(config, &spool, &client).await;
    client.close().await;
    r
}

async fn sync_locked(config: &ZdbConfig, spool: &Spool, client: &Client) -> Result<SyncReport, ZdbError> {
    let mut report = SyncReport::default();
    let d = spool.drain(config, client).await.map_err(|(e, _)| e)?;
    report.spooled += d.entries;
    report.bytes += d.bytes;

    let listed = client.list(&config.peer, &config.data_export, None).await?;
    let listed: std::collections::HashMap<&str, _> = listed.iter().map(|l| (l.path.as_str(), l)).collect();
    let (mut send, mut differs) = (vec![], vec![]);
    for ns in namespaces(&config.data_dir)? {
        let mut files = namespace_files(&config.data_dir, &ns, |n| is_numbered(n, 'd'))?;
        files.sort_by_key(|(rel, _)| number(rel));
        files.pop(); // the newest is still being written
        for (rel, path) in files {
            match listed.get(rel.as_str()) {
                None => send.push((rel, path)),
                Some(l) if same_file(client, &path, l.size, &l.root)? => report.data_present += 1,
                Some(_) => differs.push(rel),
            }
        }
    }
    if !send.is_empty() {
        report.bytes += push(client, config, &config.data_target, &send).await?;
        report.data_sent = send.len();
    }

    let mut index = vec![];
    for ns in namespaces(&config.index_dir)? {
        index.extend(namespace_files(&config.index_dir, &ns, |n| {
            is_numbered(n, 'i') || n == NAMESPACE_FILE
        })?);
    }
    if !index.is_empty() {
        report.bytes += push(client, config, &config.index_target, &index).await?;
        report.index_files = index.len();
    }
    // Hooks that found the lock taken left their work in the spool meanwhile.
    let d = spool.drain(config, client).await.map_err(|(e, _)| e)?;
    report.spooled += d.entries;
    report.bytes += d.bytes;
    if !differs.is_empty() {
        return Err(ZdbError::Differs(differs.join(", ")));
    }
    Ok(report)
}

/// The number of `NS/d<N>`.
fn number(rel: &str) -> u64 {
    rel.rsplit('/')
        .next()
        .and_then(|n| n.get(1..))
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

/// The namespace folders of a root (a root not made yet has none).
fn namespaces(root: &Path) -> Result<Vec<String>, ZdbError> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(ZdbError::Namespace(root.to_path_buf(), e)),
    };
    let mut out = vec![];
    for e in entries {
        let e = e.map_err(|e| ZdbError::Namespace(root.to_path_buf(), e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if e.file_type().is_ok_and(|t| t.is_dir()) && is_namespace(&name) {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// What a namespace clone sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneReport {
    /// Data files sent.
    pub data_files: usize,
    /// Index files and `zdb-namespace` sent.
    pub index_files: usize,
    /// Bytes sent in all.
    pub bytes: u64,
}

/// Sends a whole namespace of a frozen 0-db (stopped, or not writing to it): every
/// data file to the data target, every index file and `zdb-namespace` to the index
/// target. Each file is verified on arrival; each of the two jobs commits all or none.
pub async fn clone_namespace(config: &ZdbConfig, namespace: &str) -> Result<CloneReport, ZdbError> {
    let data = namespace_files(&config.data_dir, namespace, |n| is_numbered(n, 'd'))?;
    let index = namespace_files(&config.index_dir, namespace, |n| {
        is_numbered(n, 'i') || n == "zdb-namespace"
    })?;
    let client = config.client()?;
    let sent = async {
        Ok::<_, ZdbError>(
            push(&client, config, &config.data_target, &data).await?
                + push(&client, config, &config.index_target, &index).await?,
        )
    }
    .await;
    client.close().await;
    let bytes = sent?;
    Ok(CloneReport {
        data_files: data.len(),
        index_files: index.len(),
        bytes,
    })
}

fn is_numbered(name: &str, prefix: char) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

fn namespace_files(
    root: &Path,
    namespace: &str,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<(String, PathBuf)>, ZdbError> {
    crate::proto::path::RelPath::new(namespace).map_err(|_| ZdbError::Outside {
        path: root.join(namespace),
        kind: "namespace",
        root: root.to_path_buf(),
    })?;
    let dir = root.join(namespace);
    let entries = std::fs::read_dir(&dir).map_err(|e| ZdbError::Namespace(dir.clone(), e))?;
    let mut out = vec![];
    for e in entries {
        let e = e.map_err(|e| ZdbError::Namespace(dir.clone(), e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if keep(&name) && e.file_type().is_ok_and(|t| t.is_file()) {
            out.push((format!("{namespace}/{name}"), e.path()));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn hooks_parse_with_zdb_argument_conventions() {
        let h = Hook::parse(&args(&["jump-data", "tcp://[::]:9900", "/zd/ns/d3", "/zd/ns/d4"])).unwrap();
        assert_eq!(
            h,
            Hook::JumpData {
                old: "/zd/ns/d3".into()
            }
        );
        let h = Hook::parse(&args(&["jump-index", "id", "/zi/ns/i3", "/zi/ns/i4", "3 1 3"])).unwrap();
        assert_eq!(
            h,
            Hook::JumpIndex {
                old: "/zi/ns/i3".into(),
                dirty: vec![1, 3]
            }
        );
        let h = Hook::parse(&args(&["jump-index", "id", "/zi/ns/i3", "/zi/ns/i4", ""])).unwrap();
        assert!(matches!(h, Hook::JumpIndex { dirty, .. } if dirty.is_empty()));
        let h = Hook::parse(&args(&["missing-data", "id", "/zd/ns/d2"])).unwrap();
        assert_eq!(
            h,
            Hook::MissingData {
                file: "/zd/ns/d2".into()
            }
        );
        assert_eq!(
            Hook::parse(&args(&["ready", "id"])).unwrap(),
            Hook::Ignored("ready".into())
        );
        assert!(matches!(
            Hook::parse(&args(&["jump-data", "id", "/zd/ns/d3"])),
            Err(ZdbError::Args { .. })
        ));
        assert!(matches!(
            Hook::parse(&args(&["jump-index", "id", "a", "b", "1 x"])),
            Err(ZdbError::BadDirty(_))
        ));
        assert_eq!(
            Hook::parse(&args(&["namespace-updated", "id", "ns"])).unwrap(),
            Hook::NamespaceUpdated { namespace: "ns".into() }
        );
        for bad in [
            &["jump-data", "id", "/zd/ns/d3", "/zd/ns/d4", "extra"][..],
            &["jump-data", "", "/zd/ns/d3", "/zd/ns/d4"],
            &["missing-data", "id"],
            &["missing-data", "id", "/zd/ns/d2", "extra"],
            &["namespace-updated", "id"],
            &["namespace-updated", "id", "../etc"],
            &["jump-index"],
        ] {
            let e = Hook::parse(&args(bad)).unwrap_err();
            assert!(Hook::is_usage(&e), "{bad:?}");
        }
    }

    #[test]
    fn only_zdb_files_inside_a_namespace_of_the_root_are_located() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("data");
        std::fs::create_dir_all(root.join("ns")).unwrap();
        std::fs::create_dir_all(t.path().join("elsewhere")).unwrap();
        let f = locate(&root, &root.join("ns/d12"), 'd').unwrap();
        assert_eq!(f.rel(), "ns/d12");
        for bad in [
            root.join("ns/i12"),
            root.join("ns/d"),
            root.join("ns/d1x"),
            root.join("ns/../../elsewhere/d1"),
            t.path().join("elsewhere/d1"),
            root.join("d1"),
            root.join("ns/sub/d1"),
        ] {
            assert!(locate(&root, &bad, 'd').is_err(), "{}", bad.display());
        }
    }

    #[test]
    fn spool_entries_round_trip_in_order_and_name_files_only() {
        let t = tempfile::tempdir().unwrap();
        let spool = Spool::open(&t.path().join("spool")).unwrap();
        let works = [
            Work::Data(ZdbFile {
                namespace: "ns".into(),
                name: "d3".into(),
            }),
            Work::Index {
                namespace: "ns".into(),
                names: vec!["i0".into(), "i2".into(), NAMESPACE_FILE.into()],
            },
            Work::Data(ZdbFile {
                namespace: "other".into(),
                name: "d0".into(),
            }),
        ];
        for w in &works {
            spool.add(w).unwrap();
        }
        assert_eq!(spool.pending().unwrap(), works);
        let names: Vec<String> = std::fs::read_dir(t.path().join("spool"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert!(
            names.iter().all(|n| n.ends_with(".job")),
            "no temporary left: {names:?}"
        );
        for bad in [
            "data\nns\ni3\n",
            "index\n../x\ni1\n",
            "data\nns\n",
            "copy\nns\nd1\n",
            "index\nns\n/etc/passwd\n",
        ] {
            assert_eq!(Work::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn config_validates_timeout_and_keeps_the_spool_out_of_zdb_roots() {
        let t = tempfile::tempdir().unwrap();
        let write = |extra: &str| {
            let p = t.path().join("zdb.toml");
            std::fs::write(
                &p,
                format!(
                    "data_dir = \"zdb/data\"\nindex_dir = \"zdb/index\"\npeer = \"b@127.0.0.1:1\"\n\
                     data_target = \"d\"\nindex_target = \"i\"\ndata_export = \"d\"\n{extra}\
                     [tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n"
                ),
            )
            .unwrap();
            ZdbConfig::load(&p)
        };
        let c = write("").unwrap();
        assert_eq!(c.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.spool_dir, absolute(&t.path().join("zdb/barge-zdb-spool")));
        assert_eq!(
            write("connect_timeout_secs = 1\n").unwrap().connect_timeout,
            Duration::from_secs(1)
        );
        for bad in [
            "connect_timeout_secs = 0\n",
            "connect_timeout_secs = 61\n",
            "spool_dir = \"zdb/index/spool\"\n",
            "spool_dir = \"zdb/data\"\n",
            "spool_dir = \"zdb/x/../data/s\"\n",
        ] {
            assert!(matches!(write(bad), Err(ZdbError::Config { .. })), "{bad}");
        }
        assert_eq!(
            write("spool_dir = \"state\"\n").unwrap().spool_dir,
            t.path().join("state")
        );
    }
}
