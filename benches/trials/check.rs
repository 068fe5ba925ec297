//! What the trials check: which of a job's files a target shows and whether they are
//! exact, and how many blocks a staging folder holds that would verify.

use barge::proto::blocks::{block_count, block_len, FileHashes, BLOCK_SIZE};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Deterministic contents: `len` bytes seeded by `seed`.
pub fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut buf);
    buf
}

pub fn write(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

/// Every regular file under `dir`, relative, sorted; `.barge-staging` skipped.
pub fn list(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().to_string();
            if rel == ".barge-staging" {
                continue;
            }
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// A job's source files: relative name (as the job names it) to blake3 and hashes.
pub struct Job {
    pub files: BTreeMap<String, (PathBuf, FileHashes)>,
}

impl Job {
    /// The files of a push of the folder `src` (named `<its name>/...` in the target).
    pub fn of_folder(src: &Path) -> Job {
        let top = src.file_name().unwrap().to_string_lossy().to_string();
        let files = list(src)
            .into_iter()
            .map(|rel| {
                let path = src.join(&rel);
                let size = std::fs::metadata(&path).unwrap().len();
                let hashes = barge::store::source::hash_file(&path, size).unwrap();
                (format!("{top}/{rel}"), (path, hashes))
            })
            .collect();
        Job { files }
    }

    pub fn bytes(&self) -> u64 {
        self.files.values().map(|(_, h)| h.size).sum()
    }

    pub fn blocks(&self) -> u64 {
        self.files.values().map(|(_, h)| block_count(h.size)).sum()
    }
}

/// How much of a job a target shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visible {
    None,
    All,
    /// Some files of the job and not others: what must never remain.
    Partial {
        shown: usize,
        of: usize,
    },
    /// A file of the job whose contents are not the job's.
    Corrupt(String),
}

/// Which of `job`'s files `target` holds, and whether they are exact.
pub fn visible(job: &Job, target: &Path) -> Visible {
    let mut shown = 0;
    for (rel, (_, h)) in &job.files {
        let Ok(data) = std::fs::read(target.join(rel)) else {
            continue;
        };
        if *blake3::hash(&data).as_bytes() != h.root {
            return Visible::Corrupt(rel.clone());
        }
        shown += 1;
    }
    match shown {
        0 => Visible::None,
        n if n == job.files.len() => Visible::All,
        n => Visible::Partial {
            shown: n,
            of: job.files.len(),
        },
    }
}

/// Where the agent whose config (`b.toml`) is in a folder above `target` stages that
/// target's jobs.
pub fn staging_root(target: &Path) -> PathBuf {
    let canon = target.canonicalize().unwrap_or_else(|_| target.to_path_buf());
    for dir in target.ancestors().skip(1).take(3) {
        let Ok(config) = barge::config::Config::load(&dir.join("b.toml")) else {
            continue;
        };
        if let Some(t) = config.imports.iter().find(|t| t.path == canon) {
            return t.staging.clone();
        }
    }
    target.join(".barge-staging")
}

/// The job folder in `target`'s staging area, if there is exactly one.
pub fn staged_job(target: &Path) -> Option<PathBuf> {
    let dirs: Vec<PathBuf> = std::fs::read_dir(staging_root(target))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    match dirs.len() {
        1 => dirs.into_iter().next(),
        _ => None,
    }
}

/// Blocks of `job` staged under `target` that verify, counted as the agent's resume
/// scan counts them: every block of a file up to its staged length.
pub fn verified_staged(job: &Job, target: &Path) -> u64 {
    verified_blocks(job, target).len() as u64
}

/// Which blocks [`verified_staged`] counts: (file, block).
pub fn verified_blocks(job: &Job, target: &Path) -> Vec<(String, u64)> {
    let Some(dir) = staged_job(target) else { return vec![] };
    let mut found = vec![];
    for (rel, (_, h)) in &job.files {
        let Ok(data) = std::fs::read(dir.join("files").join(rel)) else {
            continue;
        };
        for b in 0..block_count(h.size) {
            let (start, len) = ((b * BLOCK_SIZE) as usize, block_len(h.size, b));
            if data.len() < start + len {
                break;
            }
            if h.verify_block(b, &data[start..start + len]).is_ok() {
                found.push((rel.clone(), b));
            }
        }
    }
    found
}

/// [`verified_staged`] once it no longer changes: writes a killed agent had under way
/// (O_DIRECT, on io_uring) can still land after the process is gone.
pub fn settled(job: &Job, target: &Path) -> u64 {
    let mut last = verified_staged(job, target);
    for _ in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(150));
        let now = verified_staged(job, target);
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// Bytes free on the file system holding `dir`.
pub fn free(dir: &Path) -> u64 {
    barge::store::space::free_space(dir).unwrap()
}
