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
//! - `missing-data ID FILE`: 0-db needs a data file it no longer has and waits; pull it
//!   from the backup's data export and return only once it is in place;
//! - anything else (`ready`, `close`, `namespace-created`, ...): nothing to do, exit 0.
//!
//! Every path 0-db hands over must lie directly in a namespace folder of the configured
//! roots and have 0-db's file name form; anything else is refused, so a hook call can
//! never make barge read or write outside those folders.

use crate::client::{Client, Peer, PushOptions};
use crate::tls::TlsFiles;
use crate::transfer::TransferError;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Why a hook call or a clone failed.
#[derive(Debug, thiserror::Error)]
pub enum ZdbError {
    #[error("zdb config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("hook {hook}: expected {want}")]
    Args { hook: String, want: &'static str },
    #[error("{path} is not a 0-db {kind} file in a namespace folder of {root}")]
    Outside {
        path: PathBuf,
        kind: &'static str,
        root: PathBuf,
    },
    #[error("dirty index id {0:?} is not a number")]
    BadDirty(String),
    #[error("namespace folder {0}: {1}")]
    Namespace(PathBuf, std::io::Error),
    #[error("{0} is still missing after the pull")]
    StillMissing(PathBuf),
    #[error(transparent)]
    Transfer(#[from] TransferError),
}

/// A hook call from 0-db, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hook {
    JumpData {
        old: PathBuf,
    },
    JumpIndex {
        old: PathBuf,
        dirty: Vec<u32>,
    },
    MissingData {
        file: PathBuf,
    },
    /// A hook barge has nothing to do for (`ready`, `close`, ...).
    Ignored(String),
}

impl Hook {
    /// Parses `NAME ID ARGS...` as 0-db passes them.
    pub fn parse(args: &[String]) -> Result<Hook, ZdbError> {
        let name = args.first().map(String::as_str).unwrap_or("");
        let rest = args.get(2..).unwrap_or(&[]);
        let want = |want| ZdbError::Args {
            hook: name.to_string(),
            want,
        };
        match name {
            "jump-data" => match rest {
                [old, _new, ..] => Ok(Hook::JumpData { old: old.into() }),
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
                [file, ..] => Ok(Hook::MissingData { file: file.into() }),
                _ => Err(want("ID DATA-FILE")),
            },
            other => Ok(Hook::Ignored(other.to_string())),
        }
    }
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
    pub namespace: String,
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
    tls: crate::config::RawTls,
}

/// What `barge zdb-hook` and `barge zdb-clone` need to know: where 0-db keeps its
/// files, and the backup agent with its targets.
#[derive(Debug, Clone)]
pub struct ZdbConfig {
    pub data_dir: PathBuf,
    pub index_dir: PathBuf,
    pub peer: Peer,
    pub tls: TlsFiles,
    /// Import target on the peer for sealed data files (`hook = "move"`).
    pub data_target: String,
    /// Import target on the peer for index and namespace files (`hook = "replace"`).
    pub index_target: String,
    /// Export on the peer to fetch data files back from (the data target's folder).
    pub data_export: String,
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
        Ok(ZdbConfig {
            data_dir: base.join(raw.data_dir),
            index_dir: base.join(raw.index_dir),
            peer,
            tls: raw.tls.under(base),
            data_target: raw.data_target,
            index_target: raw.index_target,
            data_export: raw.data_export,
        })
    }
}

/// Runs one hook call; returns a line for the log.
pub async fn run_hook(config: &ZdbConfig, hook: &Hook) -> Result<String, ZdbError> {
    match hook {
        Hook::Ignored(name) => Ok(format!("{name}: nothing to do")),
        Hook::JumpData { old } => {
            let f = locate(&config.data_dir, old, 'd')?;
            let files = [(f.rel(), old.clone())];
            let r = push(config, &config.data_target, &files).await?;
            Ok(format!(
                "jump-data: {} ({} bytes) pushed to {}",
                f.rel(),
                r,
                config.peer
            ))
        }
        Hook::JumpIndex { old, dirty } => {
            let f = locate(&config.index_dir, old, 'i')?;
            let files = index_files(&config.index_dir, &f, dirty);
            let r = push(config, &config.index_target, &files).await?;
            Ok(format!(
                "jump-index: {} files ({r} bytes) pushed to {}",
                files.len(),
                config.peer
            ))
        }
        Hook::MissingData { file } => {
            let f = locate(&config.data_dir, file, 'd')?;
            let client = Client::new(&config.tls)?;
            let pulled = client
                .pull(&config.peer, &config.data_export, &[f.rel()], &config.data_dir)
                .await;
            client.close().await;
            pulled?;
            if !file.is_file() {
                return Err(ZdbError::StillMissing(file.clone()));
            }
            Ok(format!("missing-data: {} fetched from {}", f.rel(), config.peer))
        }
    }
}

/// The index files a `jump-index` sends: the old one, the dirty ones and the
/// namespace descriptor, those that exist.
fn index_files(root: &Path, old: &ZdbFile, dirty: &[u32]) -> Vec<(String, PathBuf)> {
    let ns = root.join(&old.namespace);
    let mut names: Vec<String> = dirty.iter().map(|d| format!("i{d}")).collect();
    names.push(old.name.clone());
    names.push("zdb-namespace".into());
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter(|n| ns.join(n).is_file())
        .map(|n| (format!("{}/{n}", old.namespace), ns.join(n)))
        .collect()
}

async fn push(config: &ZdbConfig, target: &str, files: &[(String, PathBuf)]) -> Result<u64, ZdbError> {
    let client = Client::new(&config.tls)?;
    let r = client
        .push_named(&config.peer, target, files, &PushOptions::default())
        .await;
    client.close().await;
    Ok(r?.bytes_total)
}

/// What a namespace clone sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneReport {
    pub data_files: usize,
    pub index_files: usize,
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
    let bytes = push(config, &config.data_target, &data).await? + push(config, &config.index_target, &index).await?;
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
    fn jump_index_sends_old_dirty_and_namespace_files_that_exist() {
        let t = tempfile::tempdir().unwrap();
        let ns = t.path().join("ns");
        std::fs::create_dir_all(&ns).unwrap();
        for n in ["i0", "i1", "i2", "zdb-namespace"] {
            std::fs::write(ns.join(n), n).unwrap();
        }
        let old = ZdbFile {
            namespace: "ns".into(),
            name: "i2".into(),
        };
        let names: Vec<String> = index_files(t.path(), &old, &[0, 9]).into_iter().map(|f| f.0).collect();
        assert_eq!(names, ["ns/i0", "ns/i2", "ns/zdb-namespace"]);
    }
}
