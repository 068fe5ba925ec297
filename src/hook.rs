//! Import hooks: how a received, verified and synced job is handed to the engine.
//!
//! A hook runs once per job, after every file is staged and on disk, and its result
//! decides commit or failure. `move` renames the files into the target folder and
//! `replace` over older ones, all or none even across crashes (their plan is written
//! first, see [`crate::commit`]); `exec` runs a command; engines that embed barge
//! implement [`ImportHook`]. barge can not see inside those two: they run at least once,
//! again if the agent died while they ran and the job is sent again (`BARGE_JOB` names
//! it, so they can notice).

use crate::commit::{CommitError, JobRef, Kind, Ledger};
use crate::proto::path::RelPath;
use crate::stage::{Stage, StageError};
use serde::Serialize;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Why a hook failed; the text reaches the sender.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error("hook command {program:?} could not start: {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("hook command exited with {status}: {stderr}")]
    Exit { status: String, stderr: String },
    #[error("hook: {0}")]
    Other(String),
}

/// One file of a job, as the hook sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ImportFile {
    /// Relative name from the offer, checked.
    pub name: String,
    /// Where the file is now: synced, inside the staging folder.
    pub path: PathBuf,
    pub size: u64,
    /// blake3 root, hex, as `b3sum` prints it.
    pub blake3: String,
    /// For an SST file: its smallest and largest user key, hex, both inclusive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys: Option<ImportKeys>,
}

/// An SST file's key span as hooks see it.
#[derive(Debug, Clone, Serialize)]
pub struct ImportKeys {
    pub smallest: String,
    pub largest: String,
}

impl From<&crate::proto::keys::KeySpan> for ImportKeys {
    fn from(s: &crate::proto::keys::KeySpan) -> ImportKeys {
        ImportKeys {
            smallest: s.smallest.hex(),
            largest: s.largest.hex(),
        }
    }
}

/// A job ready to be imported.
#[derive(Debug, Clone, Serialize)]
pub struct ImportJob {
    pub job: String,
    /// The import target's name and folder.
    pub target: String,
    pub target_dir: PathBuf,
    /// Folder that holds the staged files under their relative names.
    pub staged_dir: PathBuf,
    /// Identity of the peer that sent the job.
    pub peer: String,
    pub files: Vec<ImportFile>,
    /// Engine metadata from the offer.
    pub meta: std::collections::BTreeMap<String, String>,
    #[serde(skip)]
    pub(crate) stage: Option<Stage>,
    #[serde(skip)]
    pub(crate) paths: Vec<RelPath>,
    /// Where `move` and `replace` write their intent (the agent's ledger); without
    /// one, in the job's staging folder.
    #[serde(skip)]
    pub(crate) ledger: Option<std::sync::Arc<Ledger>>,
    /// The job was held (`push --hold`) before this commit.
    #[serde(skip)]
    pub(crate) held: bool,
}

impl ImportJob {
    /// Places the staged files with `kind`, crash-safe (see [`crate::commit`]): the
    /// intent is written first; if the files can not all be placed, those placed go
    /// back to staging and the job fails.
    fn place(&self, kind: Kind) -> Result<String, HookError> {
        let stage = self
            .stage
            .as_ref()
            .ok_or_else(|| HookError::Other("no staging folder".into()))?;
        let info = JobRef {
            job: self.job.clone(),
            target: &self.target,
            target_dir: &self.target_dir,
            peer: &self.peer,
            held: self.held,
        };
        let ledger = match &self.ledger {
            Some(l) => l.clone(),
            None => std::sync::Arc::new(Ledger::open(stage.job_dir.clone())?),
        };
        Ok(crate::commit::place(kind, stage, &self.paths, info, &ledger)?)
    }
}

/// Hands a verified job to an engine. Runs on a blocking thread; the returned text is
/// the report the sender sees on commit. Whatever it leaves in the staging folder is
/// removed after it returns `Ok`.
pub trait ImportHook: Send + Sync + 'static {
    /// Called before any data moves, to refuse a job early (for example a name that
    /// already exists). The default accepts everything.
    fn check(&self, _target_dir: &Path, _files: &[RelPath]) -> Result<(), HookError> {
        Ok(())
    }

    fn import(&self, job: &ImportJob) -> Result<String, HookError>;
}

/// Renames the files into the target folder, all or none.
#[derive(Debug, Default)]
pub struct MoveHook;

impl ImportHook for MoveHook {
    fn check(&self, target_dir: &Path, files: &[RelPath]) -> Result<(), HookError> {
        Ok(crate::commit::check_destinations(target_dir, files)?)
    }

    fn import(&self, job: &ImportJob) -> Result<String, HookError> {
        job.place(Kind::Move)
    }
}

/// Renames each file into the target folder, replacing an older file of the same name
/// (never a folder or a symlink): for mutable files that are sent again and again, such
/// as 0-db index files. Each file is replaced atomically, and the job as a whole after a
/// crash: the older files are kept until the commit is done, so one that can not finish
/// puts them back.
#[derive(Debug, Default)]
pub struct ReplaceHook;

impl ImportHook for ReplaceHook {
    fn check(&self, target_dir: &Path, files: &[RelPath]) -> Result<(), HookError> {
        Ok(crate::commit::check_replaceable(target_dir, files)?)
    }

    fn import(&self, job: &ImportJob) -> Result<String, HookError> {
        job.place(Kind::Replace)
    }
}

/// Runs `argv` followed by the staged file paths, with the job as JSON on stdin and
/// `BARGE_JOB`, `BARGE_TARGET`, `BARGE_TARGET_DIR`, `BARGE_STAGED_DIR` set, in the target
/// folder. Exit status 0 commits; otherwise the job fails with the command's stderr.
#[derive(Debug, Clone)]
pub struct ExecHook {
    pub argv: Vec<String>,
}

/// Most bytes of a hook's stdout or stderr kept for the report.
const OUTPUT_TAIL: usize = 4096;

impl ImportHook for ExecHook {
    fn import(&self, job: &ImportJob) -> Result<String, HookError> {
        let program = self.argv[0].clone();
        let mut child = Command::new(&program)
            .args(&self.argv[1..])
            .args(job.files.iter().map(|f| &f.path))
            .current_dir(&job.target_dir)
            .env("BARGE_JOB", &job.job)
            .env("BARGE_TARGET", &job.target)
            .env("BARGE_TARGET_DIR", &job.target_dir)
            .env("BARGE_STAGED_DIR", &job.staged_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| HookError::Spawn { program, source })?;
        let json = serde_json::to_vec(job).map_err(|e| HookError::Other(e.to_string()))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        // A command that does not read stdin closes it early; that is not an error.
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&json);
        });
        let mut stdout = child.stdout.take().expect("piped stdout");
        let err_reader = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                let mut s = Vec::new();
                let _ = e.read_to_end(&mut s);
                s
            })
        });
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        let status = child.wait().map_err(|e| HookError::Other(e.to_string()))?;
        let _ = writer.join();
        let err = err_reader.and_then(|h| h.join().ok()).unwrap_or_default();
        if status.success() {
            Ok(tail(&out))
        } else {
            Err(HookError::Exit {
                status: status.to_string(),
                stderr: tail(&err),
            })
        }
    }
}

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(OUTPUT_TAIL);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(dir: &Path) -> ImportJob {
        std::fs::write(dir.join("a"), b"x").unwrap();
        ImportJob {
            job: "j".into(),
            target: "t".into(),
            target_dir: dir.to_path_buf(),
            staged_dir: dir.to_path_buf(),
            peer: "p".into(),
            files: vec![ImportFile {
                name: "a".into(),
                path: dir.join("a"),
                size: 1,
                blake3: "00".into(),
                keys: None,
            }],
            meta: [("region".to_string(), "2".to_string())].into(),
            stage: None,
            paths: vec![],
            ledger: None,
            held: false,
        }
    }

    #[test]
    fn exec_hook_gets_paths_as_arguments_and_json_on_stdin() {
        let t = tempfile::tempdir().unwrap();
        let j = job(t.path());
        let hook = ExecHook {
            argv: vec!["sh".into(), "-c".into(), "echo \"$1\"; cat".into(), "sh".into()],
        };
        let report = hook.import(&j).unwrap();
        assert!(
            report.starts_with(&t.path().join("a").display().to_string()),
            "{report}"
        );
        let json: serde_json::Value = serde_json::from_str(report.lines().nth(1).unwrap()).unwrap();
        assert_eq!(json["meta"]["region"], "2");
        assert_eq!(json["files"][0]["name"], "a");
    }

    #[test]
    fn exec_hook_failure_carries_stderr() {
        let t = tempfile::tempdir().unwrap();
        let hook = ExecHook {
            argv: vec!["sh".into(), "-c".into(), "echo ingest refused >&2; exit 3".into()],
        };
        let err = hook.import(&job(t.path())).unwrap_err().to_string();
        assert!(err.contains("ingest refused") && err.contains('3'), "{err}");
        let missing = ExecHook {
            argv: vec!["/nonexistent/hook".into()],
        };
        assert!(matches!(missing.import(&job(t.path())), Err(HookError::Spawn { .. })));
    }
}
