//! The trials behind barge's all-or-nothing promise, with real processes: agents and
//! senders killed (SIGKILL) at random moments, deaths at failpoints inside the
//! hand-over, a full disk, bytes flipped in staging, many jobs at once, a lossy link,
//! and a matrix of bad input. Prints a table: trial | count | passed | failed.
//!
//! Run it with `benches/trials.sh` (root: it mounts a loop file system and makes
//! network namespaces); `TRIALS_SCALE=0.1` for a short run, `TRIALS_ONLY=kills,full`
//! for some of them, `TRIALS_SEED=N` to repeat a run's random choices.

mod badinput;
mod check;
mod host;
mod hostile;
mod kills;
mod limits;

use rand::SeedableRng;
use std::path::PathBuf;
use std::time::Instant;

/// What every trial gets: a work folder, how many times to run, random choices.
pub struct Ctx {
    pub work: PathBuf,
    pub scale: f64,
    pub rng: rand::rngs::StdRng,
    /// Peak agent RSS per `max_jobs` setting of the concurrency trial.
    pub peaks: Vec<(usize, u64)>,
}

impl Ctx {
    /// `n` scaled, at least 1.
    pub fn count(&self, n: u32) -> u32 {
        ((n as f64 * self.scale).round() as u32).max(1)
    }

    pub fn log(&self, line: String) {
        eprintln!("{line}");
    }
}

/// One line of the table.
pub struct Row {
    pub name: String,
    pub passed: u32,
    pub failed: u32,
    pub notes: Vec<String>,
    pub secs: f64,
    started: Instant,
}

impl Row {
    pub fn new(name: &str) -> Row {
        eprintln!("== {name}");
        Row {
            name: name.to_string(),
            passed: 0,
            failed: 0,
            notes: vec![],
            secs: 0.0,
            started: Instant::now(),
        }
    }

    pub fn record(&mut self, r: Result<(), String>) {
        match r {
            Ok(()) => self.passed += 1,
            Err(e) => {
                self.failed += 1;
                eprintln!("   FAILED: {e}");
                if self.notes.len() < 5 {
                    self.notes.push(format!("failed: {e}"));
                }
            }
        }
        self.secs = self.started.elapsed().as_secs_f64();
        let n = self.passed + self.failed;
        if n % 10 == 0 {
            eprintln!(
                "   {n} done: {} passed, {} failed, {:.0} s",
                self.passed, self.failed, self.secs
            );
        }
    }

    pub fn note(&mut self, n: String) {
        eprintln!("   {n}");
        self.notes.push(n);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") && std::env::var("TRIALS_RUN").is_err() {
        // `cargo bench` runs every bench target: this one only from trials.sh.
        eprintln!("trials: run benches/trials.sh (root) for the crash and fault trials");
        return;
    }
    let scale: f64 = env("TRIALS_SCALE").and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let seed: u64 = env("TRIALS_SEED")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let only: Vec<String> = env("TRIALS_ONLY")
        .map(|s| s.split(',').map(String::from).collect())
        .unwrap_or_default();
    let work = PathBuf::from(env("TRIALS_DIR").unwrap_or_else(|| "/var/tmp/barge-trials".into()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let mut ctx = Ctx {
        work: work.canonicalize().unwrap(),
        scale,
        rng: rand::rngs::StdRng::seed_from_u64(seed),
        peaks: vec![],
    };
    eprintln!(
        "trials: seed {seed} (TRIALS_SEED={seed} repeats the random choices), scale {scale}, in {}",
        work.display()
    );
    let started = Instant::now();
    let want = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let mut rows = vec![];
    if want("kills") {
        rows.push(kills::receiver_kills(&mut ctx));
        rows.push(kills::hook_kills(&mut ctx, true));
        rows.push(kills::hook_kills(&mut ctx, false));
        rows.push(kills::sender_kills(&mut ctx));
    }
    if want("failpoints") {
        rows.push(kills::failpoints(&mut ctx));
    }
    if want("full") {
        rows.extend(limits::disk_full(&mut ctx));
    }
    if want("flips") {
        rows.extend(limits::flips(&mut ctx));
    }
    if want("many") {
        rows.extend(limits::concurrency(&mut ctx));
    }
    if want("lossy") {
        rows.push(limits::lossy_link(&mut ctx));
    }
    if want("bad") {
        rows.push(badinput::matrix(&mut ctx));
    }
    if want("hostile") {
        rows.extend(hostile::attacks(&mut ctx));
    }
    print_table(&rows, started.elapsed().as_secs_f64(), seed);
    let _ = std::fs::remove_dir_all(&work);
    if rows.iter().any(|r| r.failed > 0) {
        std::process::exit(1);
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.is_empty())
}

fn print_table(rows: &[Row], secs: f64, seed: u64) {
    println!("| trial | count | passed | failed | seconds |");
    println!("|---|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {:.0} |",
            r.name,
            r.passed + r.failed,
            r.passed,
            r.failed,
            r.secs
        );
    }
    println!();
    for r in rows.iter().filter(|r| !r.notes.is_empty()) {
        println!("- {}: {}", r.name, r.notes.join("; "));
    }
    println!("\n{secs:.0} s in all; seed {seed}");
}
