//! Import hooks: how a received, verified and synced job is handed to the engine.
//!
//! A hook runs once per job, after every file is staged and on disk, and its result
//! decides commit or failure. `move` renames the files into the target folder and
//! `replace` over older ones, all or none even across crashes (their plan is written
//! first, see [`crate::store::commit`]); `exec` runs a command; engines that embed barge
//! implement [`ImportHook`]. barge can not see inside those two: they run at least once,
//! again if the agent died while they ran and the job is sent again (`BARGE_JOB` names
//! it, so they can notice).

use crate::proto::path::RelPath;
use crate::store::commit::{CommitError, JobRef, Kind, Ledger};
use crate::store::stage::{Stage, StageError};
use serde::Serialize;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Why a hook failed; the text reaches the sender.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// A staged or target file could not be used, or the target holds a name with other
    /// content.
    #[error(transparent)]
    Stage(#[from] StageError),
    /// `move` or `replace` could not place the files (nothing of the job stays in the
    /// target).
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// An `exec` command could not be started.
    #[error("hook command {program:?} could not start: {source}")]
    Spawn {
        /// The command.
        program: String,
        /// Why it could not start.
        source: std::io::Error,
    },
    /// `report` is the command's stdout (its stderr with `exec_stderr_to_sender`).
    #[error("hook command exited with {status}: {report}")]
    Exit {
        /// How it exited (`exit status: 3`, a signal).
        status: String,
        /// The end of its output.
        report: String,
    },
    /// An `exec` command ran past its time limit and was killed.
    #[error("hook timed out after {secs} s")]
    Timeout {
        /// The limit, in seconds.
        secs: u64,
    },
    /// Any other failure, as text: what an engine's [`ImportHook`] usually returns.
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
    /// Size in bytes.
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
    /// Smallest user key, hex.
    pub smallest: String,
    /// Largest user key, hex.
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
    /// The job's id, 32 hex digits (also `BARGE_JOB` for an `exec` hook).
    pub job: String,
    /// The import target's name and folder.
    pub target: String,
    /// The import target's folder.
    pub target_dir: PathBuf,
    /// Folder that holds the staged files under their relative names.
    pub staged_dir: PathBuf,
    /// Identity of the peer that sent the job.
    pub peer: String,
    /// The job's files, in the offer's order.
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
    /// Mode of the folders `move` and `replace` make in the target, if the target sets one.
    #[serde(skip)]
    pub(crate) dir_mode: Option<u32>,
}

impl ImportJob {
    /// Places the staged files with `kind`, crash-safe (see [`crate::store::commit`]): the
    /// intent is written first; if the files can not all be placed, those placed go
    /// back to staging and the job fails.
    fn place(&self, kind: Kind) -> Result<String, HookError> {
        self.place_only(kind, &self.paths)
    }

    /// [`ImportJob::place`] for some of the job's files.
    fn place_only(&self, kind: Kind, paths: &[RelPath]) -> Result<String, HookError> {
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
            dir_mode: self.dir_mode,
        };
        let ledger = match &self.ledger {
            Some(l) => l.clone(),
            None => std::sync::Arc::new(Ledger::open(stage.job_dir.clone())?),
        };
        Ok(crate::store::commit::place(kind, stage, paths, info, &ledger)?)
    }

    /// Splits the job's files into those the target already holds with the same blake3
    /// root and the rest; a file the target holds with other content is refused by name.
    fn split_identical(&self) -> Result<(Vec<RelPath>, Vec<RelPath>), HookError> {
        let roots = self.files.iter().map(|f| f.blake3.clone());
        split_identical(&self.target_dir, self.paths.iter().cloned().zip(roots))
    }
}

/// Hands a verified job to an engine. Runs on a blocking thread; the returned text is
/// the report the sender sees on commit. Whatever it leaves in the staging folder is
/// removed after it returns `Ok`.
///
/// An agent runs it for import targets with `hook = "custom"`, registered under the
/// target's name with [`Agent::start_with_hooks`](crate::agent::Agent::start_with_hooks);
/// the [crate] docs run a whole agent with one.
///
/// # Example
///
/// A hook for a target that takes only SST files: other names are refused before any
/// data moves, and a committed job's files are handed to the engine.
///
/// ```
/// use barge::engines::hook::{HookError, ImportHook, ImportJob};
/// use barge::proto::path::RelPath;
/// use std::{path::Path, sync::Arc};
///
/// struct SstIngest;
///
/// impl ImportHook for SstIngest {
///     fn check(&self, _target_dir: &Path, files: &[RelPath]) -> Result<(), HookError> {
///         match files.iter().find(|f| !f.as_str().ends_with(".sst")) {
///             Some(f) => Err(HookError::Other(format!("{f} is not an SST file"))),
///             None => Ok(()),
///         }
///     }
///
///     fn import(&self, job: &ImportJob) -> Result<String, HookError> {
///         // Each `f.path` is staged, verified and synced; ingest it here (RocksDB's
///         // IngestExternalFile with move_files, say). An error fails the whole job.
///         let names: Vec<&str> = job.files.iter().map(|f| f.name.as_str()).collect();
///         Ok(format!("ingested {}", names.join(", ")))
///     }
/// }
///
/// let refused = SstIngest.check(Path::new("/data/db"), &[RelPath::new("notes.txt")?]);
/// assert_eq!(refused.unwrap_err().to_string(), "hook: notes.txt is not an SST file");
///
/// // `Agent::start_with_hooks(config, hooks)` runs it for the target named "region-in".
/// let hook: Arc<dyn ImportHook> = Arc::new(SstIngest);
/// let hooks = barge::agent::Hooks::from([("region-in".to_string(), hook)]);
/// # drop(hooks);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait ImportHook: Send + Sync + 'static {
    /// Called before any data moves, to refuse a job early (for example a name that
    /// already exists). The default accepts everything.
    fn check(&self, _target_dir: &Path, _files: &[RelPath]) -> Result<(), HookError> {
        Ok(())
    }

    /// Called before any data moves with each file's blake3 root, to refuse a job whose
    /// files conflict with what the target holds. The default accepts everything.
    fn check_roots(&self, _target_dir: &Path, _files: &[(RelPath, [u8; 32])]) -> Result<(), HookError> {
        Ok(())
    }

    /// Which of the job's files the target already holds with the same content: their
    /// bytes are not sent, and the import must count them as delivered. Called before
    /// any data moves, in place of [`ImportHook::check_roots`]; the default runs it and
    /// says none.
    fn already_there(&self, target_dir: &Path, files: &[(RelPath, [u8; 32])]) -> Result<Vec<bool>, HookError> {
        self.check_roots(target_dir, files)?;
        Ok(vec![false; files.len()])
    }

    /// Imports the job's files (staged, verified and synced: [`ImportFile::path`]) into the
    /// engine. `Ok` commits the job, its text the report the sender sees; `Err` fails the
    /// job, and the sender gets the error's text.
    fn import(&self, job: &ImportJob) -> Result<String, HookError>;
}

/// Splits `(name, blake3 hex)` pairs into names the target holds with that root and
/// names it lacks; a name it holds with other content is refused.
fn split_identical(
    target_dir: &Path,
    files: impl Iterator<Item = (RelPath, String)>,
) -> Result<(Vec<RelPath>, Vec<RelPath>), HookError> {
    let target = crate::store::safefs::open_dir(target_dir).map_err(|e| HookError::Other(e.to_string()))?;
    let (mut same, mut rest) = (vec![], vec![]);
    for (rel, root) in files {
        let there = crate::store::safefs::open_beneath(target.as_fd(), Path::new(rel.as_str()), libc::O_RDONLY, false);
        match there {
            Ok(mut f) => {
                let mut h = blake3::Hasher::new();
                std::io::copy(&mut f, &mut h).map_err(|e| HookError::Other(format!("{rel}: {e}")))?;
                match h.finalize().to_hex().as_str() == root {
                    true => same.push(rel),
                    false => return Err(StageError::Differs(rel.to_string()).into()),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => rest.push(rel),
            Err(e) => return Err(HookError::Other(format!("{rel}: {e}"))),
        }
    }
    Ok((same, rest))
}

/// Renames the files into the target folder, all or none. A name that exists refuses
/// the job; with `skip_identical`, a file the target already holds with the same
/// content counts as delivered (a re-send after a lost answer, say) and only other
/// content is refused.
#[derive(Debug, Default)]
pub struct MoveHook {
    /// Count a file the target already holds with the same content as delivered.
    pub skip_identical: bool,
}

impl ImportHook for MoveHook {
    fn check(&self, target_dir: &Path, files: &[RelPath]) -> Result<(), HookError> {
        match self.skip_identical {
            // Whether what is there is the same is known once the roots are checked.
            true => Ok(crate::store::commit::check_replaceable(target_dir, files)?),
            false => Ok(crate::store::commit::check_destinations(target_dir, files)?),
        }
    }

    fn check_roots(&self, target_dir: &Path, files: &[(RelPath, [u8; 32])]) -> Result<(), HookError> {
        if self.skip_identical {
            let hex = files
                .iter()
                .map(|(rel, root)| (rel.clone(), blake3::Hash::from(*root).to_hex().to_string()));
            split_identical(target_dir, hex)?;
        }
        Ok(())
    }

    fn already_there(&self, target_dir: &Path, files: &[(RelPath, [u8; 32])]) -> Result<Vec<bool>, HookError> {
        if !self.skip_identical {
            return Ok(vec![false; files.len()]);
        }
        let hex = files
            .iter()
            .map(|(rel, root)| (rel.clone(), blake3::Hash::from(*root).to_hex().to_string()));
        let (same, _) = split_identical(target_dir, hex)?;
        let same: std::collections::HashSet<_> = same.into_iter().collect();
        Ok(files.iter().map(|(rel, _)| same.contains(rel)).collect())
    }

    fn import(&self, job: &ImportJob) -> Result<String, HookError> {
        if !self.skip_identical {
            return job.place(Kind::Move);
        }
        let (same, rest) = job.split_identical()?;
        if rest.is_empty() {
            let n = same.len();
            return Ok(format!("all {n} files already in {} with the same content", job.target));
        }
        let report = job.place_only(Kind::Move, &rest)?;
        Ok(match same.len() {
            0 => report,
            n => format!("{report}; {n} already there with the same content"),
        })
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
        Ok(crate::store::commit::check_replaceable(target_dir, files)?)
    }

    fn import(&self, job: &ImportJob) -> Result<String, HookError> {
        job.place(Kind::Replace)
    }
}

/// Runs `argv` followed by the staged file paths, with the job as JSON on stdin, in the
/// target folder, in an environment of its own: `BARGE_JOB`, `BARGE_TARGET`,
/// `BARGE_TARGET_DIR`, `BARGE_STAGED_DIR`, `PATH` ([`DEFAULT_PATH`]) and the variables
/// named in `env` that the agent has; nothing else of the agent's is passed on.
///
/// Exit status 0 commits, with the command's stdout as the report. Otherwise the job
/// fails with the exit status and stdout (stderr instead with `stderr_to_sender`). A run
/// longer than `timeout` is killed with its whole process group and the job fails. The
/// command's stderr always goes to the agent's log.
#[derive(Debug, Clone)]
pub struct ExecHook {
    /// The command and its arguments; the staged files' paths are appended.
    pub argv: Vec<String>,
    /// Names of variables copied from the agent's environment when set there.
    pub env: Vec<String>,
    /// Longest a run may take before it is killed and the job fails.
    pub timeout: Duration,
    /// Send the command's stderr to the sender on failure, instead of its stdout.
    pub stderr_to_sender: bool,
}

/// `PATH` an exec hook runs with, unless `PATH` is in its `env` allow list.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Most bytes of a hook's stdout or stderr kept for the report.
const OUTPUT_TAIL: usize = 4096;

/// After a timeout's kill, how long to wait for the output the command left.
const KILL_GRACE: Duration = Duration::from_secs(2);

impl ExecHook {
    /// `argv` with the default settings: no variables passed on, 600 s, stderr kept
    /// from the sender.
    pub fn new(argv: Vec<String>) -> ExecHook {
        ExecHook {
            argv,
            env: vec![],
            timeout: crate::config::DEFAULT_EXEC_TIMEOUT,
            stderr_to_sender: false,
        }
    }

    fn command(&self, job: &ImportJob) -> Command {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .args(job.files.iter().map(|f| &f.path))
            .current_dir(&job.target_dir)
            .env_clear()
            .env("PATH", DEFAULT_PATH);
        for name in &self.env {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        cmd.env("BARGE_JOB", &job.job)
            .env("BARGE_TARGET", &job.target)
            .env("BARGE_TARGET_DIR", &job.target_dir)
            .env("BARGE_STAGED_DIR", &job.staged_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout kills what it started as well.
            .process_group(0);
        cmd
    }
}

/// What the threads around a running hook report.
enum Event {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(std::io::Result<ExitStatus>),
}

/// A hook command's outcome as far as it got.
#[derive(Default)]
struct Run {
    out: Option<Vec<u8>>,
    err: Option<Vec<u8>>,
    status: Option<std::io::Result<ExitStatus>>,
}

impl Run {
    fn done(&self) -> bool {
        self.out.is_some() && self.err.is_some() && self.status.is_some()
    }

    /// Takes events until the command exited and closed its output, or `until`.
    fn collect(&mut self, events: &std::sync::mpsc::Receiver<Event>, until: Instant) {
        while !self.done() {
            let left = until.saturating_duration_since(Instant::now());
            match events.recv_timeout(left) {
                Ok(Event::Stdout(b)) => self.out = Some(b),
                Ok(Event::Stderr(b)) => self.err = Some(b),
                Ok(Event::Exit(s)) => self.status = Some(s),
                Err(_) => return,
            }
        }
    }
}

impl ImportHook for ExecHook {
    fn import(&self, job: &ImportJob) -> Result<String, HookError> {
        let json = serde_json::to_vec(job).map_err(|e| HookError::Other(e.to_string()))?;
        let output = run_command(self.command(job), &self.argv[0], json, self.timeout)?;
        if !output.err.is_empty() {
            tracing::info!(
                job = %job.job,
                target = %job.target,
                stderr = %tail(&output.err),
                "exec hook wrote to stderr"
            );
        }
        output.judge(self.timeout, self.stderr_to_sender, "receiving")
    }
}

/// What a hook command left: its output, and how it ended (`None`: killed at its time
/// limit).
struct Output {
    out: Vec<u8>,
    err: Vec<u8>,
    status: Option<std::io::Result<ExitStatus>>,
}

impl Output {
    /// Exit status 0 is success with stdout as the report; otherwise the error carries
    /// stdout, or stderr with `stderr_to_sender`. `side` names the agent whose log has
    /// the stderr.
    fn judge(self, timeout: Duration, stderr_to_sender: bool, side: &str) -> Result<String, HookError> {
        let status = match self.status {
            None => {
                return Err(HookError::Timeout {
                    secs: timeout.as_secs(),
                })
            }
            Some(Ok(s)) => s,
            Some(Err(e)) => return Err(HookError::Other(e.to_string())),
        };
        if status.success() {
            return Ok(tail(&self.out));
        }
        let report = match (stderr_to_sender, tail(&self.err), tail(&self.out)) {
            (true, e, _) if !e.is_empty() => e,
            (_, _, o) if !o.is_empty() => o,
            _ => format!("no report on stdout (its stderr is in the {side} agent's log)"),
        };
        Err(HookError::Exit {
            status: status.to_string(),
            report,
        })
    }
}

/// Spawns `cmd` (its stdio piped, in a process group of its own), writes `stdin` to it
/// and collects its output until it exits, or kills its whole group after `timeout`.
fn run_command(mut cmd: Command, program: &str, stdin: Vec<u8>, timeout: Duration) -> Result<Output, HookError> {
    let mut child = cmd.spawn().map_err(|source| HookError::Spawn {
        program: program.to_string(),
        source,
    })?;
    let started = Instant::now();
    let pid = child.id() as libc::pid_t;
    let mut pipe_in = child.stdin.take().expect("piped stdin");
    // A command that does not read stdin closes it early; that is not an error.
    std::thread::spawn(move || {
        let _ = pipe_in.write_all(&stdin);
    });
    let (tx, events) = std::sync::mpsc::channel();
    let pipe = |mut r: Box<dyn Read + Send>, wrap: fn(Vec<u8>) -> Event| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = r.read_to_end(&mut b);
            let _ = tx.send(wrap(b));
        });
    };
    pipe(Box::new(child.stdout.take().expect("piped stdout")), Event::Stdout);
    pipe(Box::new(child.stderr.take().expect("piped stderr")), Event::Stderr);
    std::thread::spawn(move || {
        let _ = tx.send(Event::Exit(child.wait()));
    });
    let mut run = Run::default();
    run.collect(&events, started + timeout);
    let timed_out = !run.done();
    if timed_out {
        // The whole group: a shell's children too. The waiter thread reaps it.
        // SAFETY: plain syscall; `pid` leads the group the command was started in.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        run.collect(&events, Instant::now() + KILL_GRACE);
    }
    Ok(Output {
        out: run.out.unwrap_or_default(),
        err: run.err.unwrap_or_default(),
        status: if timed_out { None } else { run.status },
    })
}

/// A pull that its receiver committed, as an export's `after_commit` command sees it
/// (as JSON on stdin).
#[derive(Debug, Clone, Serialize)]
pub struct AfterCommitJob {
    /// The pull's job id, 32 hex digits.
    pub job: String,
    /// The export's name and folder.
    pub export: String,
    /// The export's folder.
    pub export_dir: PathBuf,
    /// Identity of the peer that pulled and committed the files.
    pub peer: String,
    /// The files the receiver committed.
    pub files: Vec<ExportedFile>,
    /// The key range the pull asked for; `null` when it named files (or all).
    pub range: Option<HookRange>,
    /// What the receiver reported on commit.
    pub receiver_report: String,
}

/// One file of a committed pull, as an `after_commit` command sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ExportedFile {
    /// Relative name inside the export.
    pub name: String,
    /// Where the file is in the export folder.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// blake3 root, hex, as `b3sum` prints it.
    pub blake3: String,
    /// For an SST file: its smallest and largest user key, hex, both inclusive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys: Option<ImportKeys>,
}

/// A key range `[start, end)` as hooks see it: hex; an empty start is the first key, a
/// `null` end is past the last.
#[derive(Debug, Clone, Serialize)]
pub struct HookRange {
    /// First key of the range, hex; empty: the first key.
    pub start: String,
    /// Key past the range, hex; `None` (`null`): past the last key.
    pub end: Option<String>,
}

impl From<&crate::proto::keys::KeyRange> for HookRange {
    fn from(r: &crate::proto::keys::KeyRange) -> HookRange {
        HookRange {
            start: r.start.hex(),
            end: r.end.as_ref().map(|e| e.hex()),
        }
    }
}

/// An export's `after_commit` command: runs on the source once the receiver committed
/// a pull, for example to delete the region just moved (`ldb deleterange`, a script
/// calling RocksDB's `DeleteFilesInRange`). It gets the job as JSON on stdin, runs in
/// the export folder and in an environment of its own, like [`ExecHook`]: `PATH`
/// ([`DEFAULT_PATH`]), the variables named in `env` that the agent has, `BARGE_JOB`,
/// `BARGE_EXPORT`, `BARGE_EXPORT_DIR`, `BARGE_PEER`, and with a key range
/// `BARGE_RANGE_START` and (unless open-ended) `BARGE_RANGE_END`, in hex without `0x`.
/// No file paths are added to `argv`.
///
/// Exit status 0 is success, with stdout as the report. Otherwise, or past `timeout`
/// (the whole process group is killed), it failed; the error has its stderr (stdout if
/// it wrote none). A failure can not undo the receiver's commit: the agent logs it and
/// counts it.
#[derive(Debug, Clone)]
pub struct AfterCommitHook {
    /// The command and its arguments (no file paths are added).
    pub argv: Vec<String>,
    /// Names of variables copied from the agent's environment when set there.
    pub env: Vec<String>,
    /// Longest a run may take before its process group is killed and it counts as failed.
    pub timeout: Duration,
}

impl From<&crate::config::AfterCommitSpec> for AfterCommitHook {
    fn from(s: &crate::config::AfterCommitSpec) -> AfterCommitHook {
        AfterCommitHook {
            argv: s.argv.clone(),
            env: s.env.clone(),
            timeout: s.timeout,
        }
    }
}

impl AfterCommitHook {
    fn command(&self, job: &AfterCommitJob) -> Command {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .current_dir(&job.export_dir)
            .env_clear()
            .env("PATH", DEFAULT_PATH);
        for name in &self.env {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        cmd.env("BARGE_JOB", &job.job)
            .env("BARGE_EXPORT", &job.export)
            .env("BARGE_EXPORT_DIR", &job.export_dir)
            .env("BARGE_PEER", &job.peer);
        if let Some(range) = &job.range {
            cmd.env("BARGE_RANGE_START", &range.start);
            if let Some(end) = &range.end {
                cmd.env("BARGE_RANGE_END", end);
            }
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout kills what it started as well.
            .process_group(0);
        cmd
    }

    /// Runs the command for `job`; blocks until it exits or is killed.
    pub fn run(&self, job: &AfterCommitJob) -> Result<String, HookError> {
        let json = serde_json::to_vec(job).map_err(|e| HookError::Other(e.to_string()))?;
        let output = run_command(self.command(job), &self.argv[0], json, self.timeout)?;
        if !output.err.is_empty() {
            tracing::info!(
                job = %job.job,
                export = %job.export,
                stderr = %tail(&output.err),
                "after_commit command wrote to stderr"
            );
        }
        output.judge(self.timeout, true, "source")
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
            dir_mode: None,
        }
    }

    fn sh(script: &str) -> ExecHook {
        ExecHook::new(vec!["sh".into(), "-c".into(), script.into(), "sh".into()])
    }

    #[test]
    fn exec_hook_gets_paths_as_arguments_and_json_on_stdin() {
        let t = tempfile::tempdir().unwrap();
        let j = job(t.path());
        let report = sh("echo \"$1\"; cat").import(&j).unwrap();
        assert!(
            report.starts_with(&t.path().join("a").display().to_string()),
            "{report}"
        );
        let json: serde_json::Value = serde_json::from_str(report.lines().nth(1).unwrap()).unwrap();
        assert_eq!(json["meta"]["region"], "2");
        assert_eq!(json["files"][0]["name"], "a");
    }

    #[test]
    fn exec_hook_failure_keeps_stderr_from_the_sender_unless_asked() {
        let t = tempfile::tempdir().unwrap();
        let hook = sh("echo ingest refused >&2; echo partial; exit 3");
        let err = hook.import(&job(t.path())).unwrap_err().to_string();
        assert!(
            !err.contains("ingest refused") && err.contains("partial") && err.contains('3'),
            "{err}"
        );
        let told = ExecHook {
            stderr_to_sender: true,
            ..hook
        };
        let err = told.import(&job(t.path())).unwrap_err().to_string();
        assert!(err.contains("ingest refused") && err.contains('3'), "{err}");
        let missing = ExecHook::new(vec!["/nonexistent/hook".into()]);
        assert!(matches!(missing.import(&job(t.path())), Err(HookError::Spawn { .. })));
    }

    #[test]
    fn exec_hook_runs_with_a_cleared_environment() {
        let t = tempfile::tempdir().unwrap();
        // Both are in the test process's environment; only the allowed one goes on.
        let report = ExecHook {
            env: vec!["CARGO_MANIFEST_DIR".into(), "NOT_SET_ANYWHERE_X".into()],
            ..sh("env | sort")
        }
        .import(&job(t.path()))
        .unwrap();
        let mut names: Vec<&str> = report.lines().filter_map(|l| l.split('=').next()).collect();
        names.retain(|n| !["PWD", "OLDPWD", "SHLVL", "_"].contains(n)); // the shell's own
        let mut want = vec!["BARGE_JOB", "BARGE_STAGED_DIR", "BARGE_TARGET", "BARGE_TARGET_DIR"];
        if std::env::var_os("CARGO_MANIFEST_DIR").is_some() {
            want.push("CARGO_MANIFEST_DIR"); // set by cargo for tests
        }
        want.push("PATH");
        assert_eq!(names, want, "{report}");
        assert!(report.contains(&format!("PATH={DEFAULT_PATH}\n")), "{report}");
    }

    fn after_job(dir: &Path, range: Option<crate::proto::keys::KeyRange>) -> AfterCommitJob {
        AfterCommitJob {
            job: "j".into(),
            export: "e".into(),
            export_dir: dir.to_path_buf(),
            peer: "p".into(),
            files: vec![],
            range: range.as_ref().map(Into::into),
            receiver_report: "pulled".into(),
        }
    }

    fn after(script: &str) -> AfterCommitHook {
        AfterCommitHook {
            argv: vec!["sh".into(), "-c".into(), script.into(), "sh".into()],
            env: vec![],
            timeout: Duration::from_secs(60),
        }
    }

    #[test]
    fn after_commit_gets_the_range_in_its_environment_and_its_stderr_in_the_error() {
        let t = tempfile::tempdir().unwrap();
        let range = crate::proto::keys::KeyRange::parse("k..0x74").unwrap();
        let script = "echo \"$BARGE_RANGE_START ${BARGE_RANGE_END-none} $#\"";
        let report = after(script).run(&after_job(t.path(), Some(range))).unwrap();
        assert_eq!(report, "6b 74 0");
        let open = crate::proto::keys::KeyRange::parse("k..").unwrap();
        let report = after(script).run(&after_job(t.path(), Some(open))).unwrap();
        assert_eq!(report, "6b none 0");
        let report = after("echo ${BARGE_RANGE_START-unset}; cat")
            .run(&after_job(t.path(), None))
            .unwrap();
        assert!(report.starts_with("unset\n{"), "{report}");
        assert!(report.contains("\"range\":null"), "{report}");
        let err = after("echo told; echo region busy >&2; exit 5")
            .run(&after_job(t.path(), None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("region busy") && err.contains('5'), "{err}");
    }

    #[test]
    fn exec_hook_past_its_time_is_killed_with_its_children() {
        let t = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let hook = ExecHook {
            timeout: Duration::from_millis(300),
            ..sh("sleep 30 & sleep 30; echo done")
        };
        let err = hook.import(&job(t.path())).unwrap_err();
        assert!(matches!(err, HookError::Timeout { .. }), "{err}");
        // Both sleeps held stdout: returning at all means the group was killed.
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    }
}
