//! Failpoints: places where a test can make the process die on purpose, to check that
//! what the process promised survives a crash exactly there.
//!
//! `BARGE_FAILPOINT=NAME` (or `NAME:N`) in the environment kills the process with
//! SIGKILL the first (or the Nth) time it reaches the failpoint NAME: no destructor runs,
//! no buffer is flushed, as in a real crash. Without the variable a failpoint costs one
//! load of a flag. The names are listed in [`NAMES`]; `benches/trials.sh` and the
//! integration tests use them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

/// Every failpoint, and where it is.
pub const NAMES: &[(&str, &str)] = &[
    ("commit-intent", "a commit's intent is durable, nothing is placed yet"),
    ("commit-rename", "after each rename of a commit (`:N`: after the Nth)"),
    (
        "commit-placed",
        "every file of a commit is placed, the outcome not yet recorded",
    ),
];

struct Armed {
    name: String,
    at: u64,
    seen: AtomicU64,
}

static ARMED: LazyLock<Option<Armed>> = LazyLock::new(|| {
    let spec = std::env::var("BARGE_FAILPOINT").ok()?;
    let (name, at) = match spec.split_once(':') {
        Some((n, at)) => (n.to_string(), at.parse().unwrap_or(1)),
        None => (spec, 1),
    };
    Some(Armed {
        name,
        at: at.max(1),
        seen: AtomicU64::new(0),
    })
});

/// Kills the process if `name` is the armed failpoint and this is its Nth hit.
pub fn hit(name: &str) {
    let Some(armed) = ARMED.as_ref() else { return };
    if armed.name != name || armed.seen.fetch_add(1, Ordering::SeqCst) + 1 != armed.at {
        return;
    }
    eprintln!("barge: failpoint {name} reached: killing the process");
    // SAFETY: kill and getpid have no preconditions; SIGKILL ends the process here.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}
