//! The seeded simulation of the job protocol at scale: `SIM_SEEDS` seeds (default
//! 100,000) from `SIM_START` (default: derived from the clock, and printed, so a new
//! run explores new seeds and any of them can be run again). Prints the seeds run, the
//! time, seeds per second, how often each fault struck, and every failing seed with the
//! command that replays it. Run with `cargo bench --bench sim`.

#[path = "../tests/sim/mod.rs"]
mod sim;

use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} is a number")))
}

fn main() {
    let seeds = env_u64("SIM_SEEDS").unwrap_or(100_000);
    let start = env_u64("SIM_START").unwrap_or_else(|| {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970");
        // Whole millions, so a start is easy to type again.
        t.as_secs() % 100_000 * 1_000_000
    });
    println!(
        "sim: seeds {start}..{} (SIM_START={start} SIM_SEEDS={seeds})",
        start + seeds
    );
    let (mut faults, mut stats) = (sim::Counts::default(), sim::Stats::default());
    let t = Instant::now();
    let failed = sim::run_many(start, seeds, &sim::Config::default(), &mut faults, &mut stats);
    let secs = t.elapsed().as_secs_f64();
    println!(
        "sim: {seeds} seeds in {secs:.1} s, {:.0} seeds/s; {} failed",
        seeds as f64 / secs,
        failed.len()
    );
    println!(
        "sim: {} attempts, {} blocks sent, {} confirmed as committed before, {} told failed and then committed",
        stats.attempts, stats.blocks_sent, stats.confirmed, stats.failed_then_committed
    );
    println!("sim: faults injected:\n{faults}");
    for r in &failed {
        println!("{}", r.describe());
    }
    if !failed.is_empty() {
        std::process::exit(1);
    }
}
